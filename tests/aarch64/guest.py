"""The arm64 guest of `make test-aarch64`: a Debian userland run through qemu-user, each command in a private mount
namespace (unshare) chrooted into it, with the repository at /src and .aarch64/ at /work.

    binfmt_misc: aarch64 ELF -> qemu-aarch64 (flag F: opened once, so it works inside the chroot)
    unshare --mount: bind /proc, /dev, the repository, .aarch64, and the CPU description below; chroot; env -i

Why not proot: proot -q ran the same work but lost the guest process silently part way, with exit status 0 and no
output after it (measured 2026-12-05: tests/runtime/test_bad_inputs.py stopped at test 19, 47 or 48 of 55 on three
runs; the chroot ran all 55). Root is needed, for binfmt_misc, mount namespaces and chroot.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

SUITE = "bookworm"
MIRROR = os.environ.get("NXC_DEBIAN_MIRROR", "http://deb.debian.org/debian")
GUEST_VENV = "/opt/nxc-venv"
# Debian bookworm's qemu 7.2 ran the runtime into heap corruption (`malloc(): unaligned tcache chunk`, SIGSEGV) or a
# hang within a few dozen answers (measured 2026-12-05, with 1 and 2 ONNX Runtime threads); bookworm-backports' qemu
# 10.0 ran the same work clean
QEMU_MIN = 8
# The emulated CPU: qemu's cortex-a76, the nearest model qemu has to the Orin's Cortex-A78AE (both ARMv8.2-A with
# dotprod, no SVE; qemu's default "max" adds SVE and ran the answers 1.5x slower). ONNX Runtime's cpuinfo reads
# /proc/cpuinfo and the /sys CPU topology, and the host's x86 ones made it crash at import under emulation (measured:
# SIGSEGV in `import onnxruntime`), so the guest sees two Cortex-A76 cores there too.
QEMU_CPU = "cortex-a76"
CPUINFO = "".join(f"""processor\t: {i}
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1

""" for i in range(2))
BINFMT = Path("/proc/sys/fs/binfmt_misc")
DEBIAN_BINFMT = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
AARCH64_MAGIC = (r"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00",
                 r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff")
# in the private mount namespace: the binds, then chroot; "$1" is the working directory, the rest the command
ENTER = """set -e
R="$NXC_ROOTFS"
mount --bind /proc "$R/proc"
mount --bind "$NXC_FAKE/cpuinfo" "$R/proc/cpuinfo"
mount --bind "$NXC_FAKE/cpu" "$R/sys/devices/system/cpu"
mount --rbind /dev "$R/dev"
mount --bind "$NXC_SRC" "$R/src"
mount --bind "$NXC_WORK" "$R/work"
exec chroot "$R" /bin/sh -c 'cd "$1" && shift && exec "$@"' sh "$@"
"""


class Unavailable(RuntimeError):
    """This machine cannot run the guest: the message says why and what would fix it."""


def log(msg: str) -> None:
    import sys
    print(f"[aarch64] {msg}", file=sys.stderr, flush=True)


def _qemu_major(qemu: str) -> int:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version (\d+)\.", out)
    return int(m.group(1)) if m else 0


def _apt_install(packages: list[str], *, release: str | None = None) -> None:
    """apt-get install (after an update if the first try fails); Unavailable with apt's last line if it cannot."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", *(["-t", release] if release else []), *packages]
    if subprocess.run(cmd, env=env, capture_output=True).returncode:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            last = (out.stderr.strip().splitlines() or ["?"])[-1]
            raise Unavailable(f"apt-get could not install {' '.join(packages)}: {last}")


def _where(tool: str) -> str | None:
    return shutil.which(tool) or next((p for p in (f"/usr/sbin/{tool}", f"/sbin/{tool}") if Path(p).exists()), None)


def ensure_tools() -> dict[str, str]:
    """debootstrap, unshare, chroot and qemu-aarch64-static >= QEMU_MIN (apt-get installs what is missing)."""
    if os.geteuid() != 0:
        raise Unavailable("needs root (binfmt_misc, mount namespaces, chroot)")
    can_apt = shutil.which("apt-get") is not None
    missing = [t for t in ("qemu-aarch64-static", "debootstrap") if _where(t) is None]
    if missing:
        if not can_apt:
            raise Unavailable(f"needs {', '.join(missing)} (apt-get install qemu-user-static debootstrap)")
        log(f"installing {', '.join(missing)} with apt-get")
        _apt_install(["qemu-user-static", "debootstrap"])
    if _qemu_major(_where("qemu-aarch64-static")) < QEMU_MIN:
        release = dict(re.findall(r'^(\w+)="?([^"\n]*)"?$', Path("/etc/os-release").read_text(), re.M))
        if not (can_apt and release.get("VERSION_CODENAME") == "bookworm"):
            raise Unavailable(f"qemu-aarch64-static {_qemu_major(_where('qemu-aarch64-static'))} is too old: the "
                              f"runtime crashes under qemu 7; install qemu >= {QEMU_MIN}")
        log(f"qemu-aarch64-static < {QEMU_MIN}: installing bookworm-backports' qemu-user-static")
        Path("/etc/apt/sources.list.d/nxc-bookworm-backports.list").write_text(f"deb {MIRROR} bookworm-backports main\n")
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        _apt_install(["qemu-user-static"], release="bookworm-backports")
    tools = {"qemu": _where("qemu-aarch64-static"), "debootstrap": _where("debootstrap"),
             "unshare": _where("unshare"), "chroot": _where("chroot")}
    if None in tools.values():
        raise Unavailable(f"needs {', '.join(k for k, v in tools.items() if v is None)} (util-linux, coreutils)")
    return tools


def ensure_binfmt(qemu: str) -> str:
    """Register aarch64 ELF binaries with qemu (again: a registration made before qemu was upgraded holds the old
    binary open). Returns the interpreter registered."""
    if not (BINFMT / "register").exists():
        out = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True, text=True)
        if out.returncode:
            raise Unavailable(f"binfmt_misc cannot be mounted here ({out.stderr.strip()})")
    entry = BINFMT / "qemu-aarch64"
    if entry.exists():
        entry.write_text("-1")
    line = DEBIAN_BINFMT.read_text().strip() if DEBIAN_BINFMT.is_file() else \
        f":qemu-aarch64:M::{AARCH64_MAGIC[0]}:{AARCH64_MAGIC[1]}:{os.path.realpath(qemu)}:F"
    try:
        (BINFMT / "register").write_text(line)
    except OSError as e:
        raise Unavailable(f"cannot register qemu with binfmt_misc ({e})") from None
    return re.search(r"interpreter (\S+)", entry.read_text()).group(1)


class Guest:
    def __init__(self, tools: dict[str, str], *, root: Path, work: Path):
        self.tools, self.root, self.work = tools, root, work
        self.rootfs, self.fake = work / "rootfs", work / "fake"

    def command(self, argv: list[str], *, env: dict | None = None, cwd: str = "/src") -> list[str]:
        guest_env = {"PATH": f"{GUEST_VENV}/bin:/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
                     "QEMU_CPU": QEMU_CPU, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        return ([self.tools["unshare"], "--mount", "--propagation", "private", "bash", "-c", ENTER, "nxc-guest", cwd,
                 "/usr/bin/env", "-i"] + [f"{k}={v}" for k, v in guest_env.items()] + argv)

    def host_env(self) -> dict:
        return {**os.environ, "NXC_ROOTFS": str(self.rootfs), "NXC_FAKE": str(self.fake), "NXC_SRC": str(self.root),
                "NXC_WORK": str(self.work), "QEMU_CPU": QEMU_CPU}

    def run(self, argv: list[str], *, env: dict | None = None, cwd: str = "/src", **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv, env=env, cwd=cwd), env=self.host_env(), **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv), env=self.host_env(), **kw)

    def write_cpu_files(self) -> None:
        (self.fake / "cpu").mkdir(parents=True, exist_ok=True)
        (self.fake / "cpuinfo").write_text(CPUINFO)
        for name in ("possible", "present", "online"):
            (self.fake / "cpu" / name).write_text("0-1\n")

    def ensure_rootfs(self, stage) -> None:
        """Debian arm64 minbase + python3 + python3-venv (kept: made once, about 5 minutes)."""
        stamp = self.rootfs / ".nxc-rootfs-ok"
        if stamp.is_file():
            return
        shutil.rmtree(self.rootfs, ignore_errors=True)
        with stage("debootstrap_first_stage", f"debootstrap arm64 {SUITE} (first stage: download and unpack)"):
            out = subprocess.run([self.tools["debootstrap"], "--arch=arm64", "--foreign", "--variant=minbase",
                                  "--include=python3,python3-venv", SUITE, str(self.rootfs), MIRROR],
                                 capture_output=True, text=True)
            if out.returncode:                               # the mirror unreachable, most often
                last = ((out.stderr + out.stdout).strip().splitlines() or ["?"])[-1]
                raise Unavailable(f"debootstrap could not fetch Debian {SUITE} arm64 from {MIRROR}: {last}")
        with stage("debootstrap_second_stage", "debootstrap second stage, emulated (configures the packages)"):
            out = subprocess.run([self.tools["unshare"], "--mount", "--propagation", "private", self.tools["chroot"],
                                  str(self.rootfs), "/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                                  "HOME=/root", "DEBOOTSTRAP_DIR=/debootstrap", "/debootstrap/debootstrap",
                                  "--second-stage"], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"debootstrap's second stage failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
        for d in ("src", "work", "sys/devices/system/cpu"):
            (self.rootfs / d).mkdir(parents=True, exist_ok=True)
        stamp.write_text(datetime.now(timezone.utc).isoformat())

    def python_version(self) -> str:
        found = sorted(p.name[len("python"):] for p in (self.rootfs / "usr/bin").glob("python3.*")
                       if p.name[len("python3."):].isdigit())
        if not found:
            raise RuntimeError(f"no python3.N in {self.rootfs}/usr/bin: remove {self.rootfs} and run again")
        return found[-1]
