"""The build directory on disk while nxc-export writes it: one writer, a hidden partial directory, a recoverable swap.

    <parent>/<name>.lock               the pid of the nxc-export writing <name> (O_CREAT|O_EXCL); a dead pid's lock
                                       is taken over, a live one's is refused with its pid
    <parent>/.<name>.partial-<pid>/    the build being written, scratch folders included (the fp32 reference graphs
                                       of an fp16 export); removed on failure, and by the next export if killed
    <parent>/.<name>.old-<pid>/        the previous build during the swap:
                                           <name> ─▶ .old      .partial ─▶ <name>      rm .old
A kill between the swap's two renames leaves no <name> and a complete .old: the next export moves it back before
anything else (`recover`), so a build that loaded before an interrupted export still loads after it.
Torch-free, so that `ExportError` can be caught without the export extra.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


class ExportError(RuntimeError):
    """The export cannot go on: the message says what and what to do."""


def lock_path(out: Path) -> Path:
    return out.parent / f"{out.name}.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:            # someone else's live process
        return True
    return True


def _lock_owner(lock: Path) -> int | None:
    """The pid recorded in `lock`, None if unreadable (a writer killed between create and write: stale)."""
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


@contextmanager
def locked(out: Path, log: Callable[[str], None] = lambda _m: None) -> Iterator[Path]:
    """Hold `<out>.lock` for the duration; ExportError if a live nxc-export holds it. Creates out's parent."""
    blocker = next((p for p in (out.parent, *out.parent.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ExportError(f"--out {out}: {blocker} is a file, not a folder; choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--out {out}: cannot create {e.filename or out.parent} ({e.strerror}); "
                          "choose another --out") from None
    lock = lock_path(out)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _lock_owner(lock)
            if pid is not None and _pid_alive(pid):
                raise ExportError(f"another nxc-export (pid {pid}) is writing {out}; wait for it or remove {lock} "
                                  "if it is gone") from None
            log(f"[nxc-export] taking over {lock} (its nxc-export, pid {pid}, is gone)")
            lock.unlink(missing_ok=True)
            continue
        except OSError as e:
            raise ExportError(f"--out {out}: cannot write in {out.parent} ({e.strerror}); "
                              "choose another --out") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        break
    else:
        raise ExportError(f"could not take {lock} (other exports keep taking it); wait for them or remove it")
    try:
        yield lock
    finally:
        if _lock_owner(lock) == os.getpid():
            lock.unlink(missing_ok=True)


def recover(out: Path, log: Callable[[str], None] = lambda _m: None) -> None:
    """Undo what a killed export left (call with the lock held): move a previous build back if the swap was cut
    between its renames, then remove stale .old, .partial and (from nxc <= 0.1 exports) .fp32ref-* folders."""
    olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not out.exists():
        for old in olds:
            if (old / "manifest.json").is_file():
                old.rename(out)
                olds.remove(old)
                log(f"[nxc-export] restored {out} from {old.name} (an export was killed while replacing it)")
                break
    stale = [*olds, *out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(".fp32ref-*")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)


def prepare(out: Path) -> Path:
    """The fresh partial directory to write the build into (call with the lock held, after `recover`)."""
    if out.exists() and not (out / "manifest.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not a build directory; refusing to replace it. "
                          "Choose another --out or remove it.")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write in {out.parent} ({e.strerror}); "
                          "choose another --out") from None
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished build into place; an existing build is replaced only now (see the module's diagram)."""
    old = None
    if out.exists():
        if not (out / "manifest.json").is_file() and any(out.iterdir()):
            raise ExportError(f"{out} exists and is not a build directory; refusing to replace it. "
                              "Choose another --out or remove it.")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
