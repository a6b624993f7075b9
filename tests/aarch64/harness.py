"""make test-aarch64: the runtime run for real on aarch64 under emulation, its answers compared with x86's (issue 20).

    host: x86, the export venv                              guest: arm64 Debian, chroot + qemu-aarch64 (binfmt)
    nxc-export embedded, retrieval -> .aarch64/builds ------ bound at /builds (nothing is exported on arm64)
    answers.py, nxc-run --json     -> x86 answers            answers.py, nxc-run --json -> arm64 answers
                                                             pytest tests/runtime (NXC_TEST_PREBUILT=/builds)
    POST /v1/chat/completions ---------- loopback ---------> nxc-serve /builds/embedded
    compare: greedy ids identical, boxes within 1e-3, masks IoU >= 0.99  ->  reports/aarch64.json

The guest (tests/aarch64/guest.py) is a Debian bookworm arm64 userland (debootstrap --foreign, second stage under
emulation), run through qemu-user with binfmt_misc in a private mount namespace, with a venv of aarch64 wheels from
the package index for the runtime only (its dependencies, the serve extra, pytest, hypothesis, httpx): no torch, no
compiler. The rootfs and the venv stay in .aarch64/ between runs; builds, the nxc wheel and the answers are fresh.
Needs root (apt-get installs qemu-user-static and debootstrap where missing).

    python tests/aarch64/harness.py [--quick] [--skip-unavailable]
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import check_aarch64_wheels as wheel_check  # noqa: E402  (the same resolution as the wheel check)
from compare import compare_answers  # noqa: E402
from guest import GUEST_VENV, QEMU_CPU, SUITE, Guest, Unavailable, ensure_binfmt, ensure_tools, log  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / ".aarch64"
TEST_PACKAGES = ["pytest>=8", "hypothesis>=6.100", "httpx>=0.27"]
# --quick (CI): four of tests/runtime's files, about 3 minutes under emulation where the whole folder takes the better
# part of an hour (measured per file, 2026-12-05: README "make test-aarch64")
QUICK_TESTS = ["tests/runtime/test_pipeline.py", "tests/runtime/test_retrieval.py", "tests/runtime/test_cli.py",
               "tests/runtime/test_tokenizer.py",
               "--deselect", "tests/runtime/test_pipeline.py::test_hot_sampling_never_breaks_a_conversation"]  # 143 s


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


class Stage:
    """Times a stage into `timings` and says when it starts and ends."""
    timings: dict[str, float] = {}

    def __init__(self, name: str, what: str):
        self.name, self.what = name, what

    def __enter__(self):
        log(f"{self.what} ...")
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        seconds = round(time.perf_counter() - self.t0, 1)
        Stage.timings[self.name] = seconds
        log(f"{self.what}: {'failed after' if exc[0] else 'done in'} {seconds} s")


# -- wheels, builds ------------------------------------------------------------------------------------------------

def requirements(*, runtime_only: bool = False) -> list[str]:
    """pyproject's runtime dependencies; unless `runtime_only`, with the serve extra and what the tests import."""
    return wheel_check.requirements(serve=not runtime_only) + ([] if runtime_only else TEST_PACKAGES)


def download_wheels(dest: Path, python: str, glibc: str) -> list[str]:
    """aarch64 wheels (binary only) of the runtime's dependencies for the guest's Python and glibc."""
    dest.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(wheel_check.download_command(dest, python, glibc) + ["-q"] + requirements(),
                         capture_output=True, text=True)
    if out.returncode:                                       # no index, or a dependency with no aarch64 wheel
        raise Unavailable(f"pip could not download the aarch64 wheels: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return sorted(p.name for p in dest.glob("*.whl"))


def nxc_wheel(dest: Path) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), str(ROOT)],
        capture_output=True)
    (wheel,) = dest.glob("nxc-*.whl")
    return wheel


def export_builds(dest: Path) -> None:
    """The embedded and retrieval models exported on x86 (fp32), and the tiny tokenizer.json of the tests."""
    import tempfile
    from nxc.assets import retrieval_checkpoint
    from nxc.export.exporter import ExportOptions, export_build
    from nxc.export.tokenizer_json import write_tokenizer_json
    from nxc.model.sp_files import train_tiny_sentencepiece, write_tokenizer_files
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    export_build(None, dest / "embedded", options=ExportOptions())
    export_build(retrieval_checkpoint(), dest / "retrieval", options=ExportOptions())
    with tempfile.TemporaryDirectory() as d:
        sp = write_tokenizer_files(Path(d), train_tiny_sentencepiece(Path(d), seed=0))   # as tests/conftest.py
        write_tokenizer_json(sp, dest / "tiny_tokenizer.json")


# -- the stages run in the guest -------------------------------------------------------------------------------------

def same_cli_answer(a: dict, b: dict) -> list[str]:
    """nxc-run --json on x86 and arm64: ids and text identical, boxes within 0.5 px, mask scores within 1e-3."""
    why = [f"{k} differs" for k in ("token_ids", "text", "finish_reason") if a[k] != b[k]]
    if len(a["detections"]) != len(b["detections"]):
        return why + ["detection counts differ"]
    for da, db in zip(a["detections"], b["detections"]):
        if max(abs(x - y) for x, y in zip(da["box"], db["box"])) > 0.5 or abs(da["score"] - db["score"]) > 1e-3:
            why.append(f"detection {da['phrase']!r}: {da['box']} vs {db['box']}")
    return why


def serve_request(guest: Guest, x86_first: dict, port: int, image_png: str) -> dict:
    """nxc-serve in the guest, one chat completion from here over loopback, compared with x86's answer."""
    import httpx
    proc = guest.popen(["nxc-serve", "/work/builds/embedded", "--port", str(port), "--log-level", "warning"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).raise_for_status()
                break
            except httpx.TransportError:
                if proc.poll() is not None:
                    return {"ok": False, "why": f"nxc-serve exited: {proc.stderr.read()[-1500:]}"}
                if time.monotonic() > deadline:
                    return {"ok": False, "why": "nxc-serve did not answer /healthz within 600 s"}
                time.sleep(1)
        content = [{"type": "text", "text": x86_first["question"]},
                   {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_png}}]
        t0 = time.perf_counter()
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=600,
                          json={"messages": [{"role": "user", "content": content}], "max_tokens": 48,
                                **({"boxes": x86_first["boxes"]} if x86_first["boxes"] else {})})
        seconds = round(time.perf_counter() - t0, 1)
        if resp.status_code != 200:
            return {"ok": False, "why": f"HTTP {resp.status_code}: {resp.text[:500]}"}
        choice = resp.json()["choices"][0]
        why = []
        if choice["token_ids"] != x86_first["token_ids"] or choice["message"]["content"] != x86_first["text"]:
            why.append(f"reply {choice['message']['content']!r} != x86's {x86_first['text']!r}")
        grounding = choice["message"].get("grounding") or []
        if len(grounding) != len(x86_first["detections"]):
            why.append(f"{len(grounding)} groundings != x86's {len(x86_first['detections'])}")
        for g, d in zip(grounding, x86_first["detections"]):
            if max(abs(x - y) for x, y in zip(g["box_norm"], d["box_norm"])) > 1e-3:
                why.append(f"grounding {g['phrase']!r}: box_norm {g['box_norm']} vs {d['box_norm']}")
        return {"ok": not why, "why": "; ".join(why) or None, "seconds": seconds,
                "reply": choice["message"]["content"], "groundings": len(grounding)}
    finally:                    # the guest's processes are in this session: SIGTERM them all, then SIGKILL the rest
        import signal
        for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def guest_pytest(guest: Guest, quick: bool) -> dict:
    """tests/runtime in the guest over the x86-exported builds; counts read back from its junit XML."""
    import xml.etree.ElementTree as ET
    junit = WORK / "pytest-arm64.xml"
    junit.unlink(missing_ok=True)
    targets = QUICK_TESTS if quick else ["tests/runtime"]
    log_file = WORK / "pytest-arm64.log"
    log(f"pytest's progress: {log_file}")
    with open(log_file, "w") as f:
        out = guest.run(["python", "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "addopts=", "-rs",
                         "--durations=10", f"--junitxml=/work/{junit.name}", *targets],
                        env={"NXC_TEST_PREBUILT": "/work/builds", "HYPOTHESIS_STORAGE_DIRECTORY": "/tmp/hypothesis"},
                        stdout=f, stderr=subprocess.STDOUT, text=True)
    out.stdout = log_file.read_text()
    out.stderr = ""
    if not junit.is_file():
        return {"ok": False, "why": f"pytest wrote no report (exit {out.returncode}): {out.stdout[-1500:]}"
                                    f"{out.stderr[-1500:]}"}
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    torch_free = [c for c in suite.iter("testcase") if c.get("name") == "test_runtime_runs_without_torch_transformers_onnx"]
    return {"ok": out.returncode == 0, "targets": targets, **counts, "failed": failed,
            "torch_free_test_passed": bool(torch_free) and all(len(list(c)) == 0 for c in torch_free),
            "summary": (out.stdout.strip().splitlines() or [""])[-1]}


def guest_facts(guest: Guest) -> dict:
    code = ("import json, platform, importlib.metadata as md, importlib.util as u\n"
            "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(),\n"
            " 'glibc': platform.libc_ver()[1], 'torch_installed': u.find_spec('torch') is not None,\n"
            " 'packages': {n: md.version(n) for n in ('numpy', 'Pillow', 'onnxruntime', 'tokenizers', 'nxc')}}))")
    out = guest.run(["python", "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def find_python310() -> str | None:
    """A python3.10 that runs: on PATH (a pyenv shim there may refuse to), else pyenv's own, else None."""
    candidates = [shutil.which("python3.10"), *sorted(Path.home().glob(".pyenv/versions/3.10*/bin/python3.10")),
                  "/usr/bin/python3.10", "/usr/local/bin/python3.10"]
    for c in filter(None, candidates):
        if subprocess.run([str(c), "-c", "import venv"], capture_output=True).returncode == 0:
            return str(c)
    return None


def jetpack6_python(x86: dict) -> dict:
    """JetPack 6's Python is CPython 3.10, and PyPI gives it older wheels (onnxruntime 1.23 where 3.11 gets the
    newest): the emulated guest is Debian's 3.11, so the same answers are also made here with a python3.10 and the
    runtime's wheels as PyPI resolves them for 3.10, and compared with x86's. Skipped (said so) without a python3.10."""
    python310 = find_python310()
    if python310 is None:
        return {"ok": True, "skipped": "no working python3.10 on this machine"}
    venv = WORK / "py310"
    if not (venv / ".nxc-deps").is_file():
        shutil.rmtree(venv, ignore_errors=True)
        run([python310, "-m", "venv", str(venv)])
        run([str(venv / "bin/python"), "-m", "pip", "install", "-q", *requirements(runtime_only=True)], capture_output=True)
        (venv / ".nxc-deps").write_text("ok")
    py = str(venv / "bin/python")
    run([py, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", *WORK.glob("dist/nxc-*.whl")],
        capture_output=True)
    run([py, str(ROOT / "tests/aarch64/answers.py"), str(WORK / "builds"), str(WORK / "py310.json")])
    versions = json.loads(run([py, "-c", "import json, platform, importlib.metadata as md; print(json.dumps("
                                         "{'python': platform.python_version(), **{n: md.version(n) for n in "
                                         "('numpy', 'Pillow', 'onnxruntime', 'tokenizers')}}))"],
                              capture_output=True, text=True).stdout)
    c = compare_answers(x86, json.loads((WORK / "py310.json").read_text()))
    return {"ok": not c["mismatches"] and c["answers"] > 0, "versions": versions,
            **{k: c[k] for k in ("answers", "identical_ids", "max_box_norm_diff", "min_mask_iou", "mismatches")}}


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(guest: Guest) -> dict:
    """The userland (kept), the aarch64 wheels and the guest venv (kept while the wheels are the same), this nxc's
    wheel in it, and the x86-exported builds. Returns the guest's facts."""
    guest.write_cpu_files()
    guest.ensure_rootfs(Stage)
    python = guest.python_version()
    glibc = guest.run(["/usr/bin/ldd", "--version"], capture_output=True, text=True).stdout.split("\n")[0].split()[-1]
    with Stage("wheels", f"aarch64 wheels for CPython {python}, glibc {glibc} (binary only) and the nxc wheel"):
        deps = download_wheels(WORK / "wheels", python, glibc)
        wheel = nxc_wheel(WORK / "dist")
    stamp = guest.rootfs / GUEST_VENV.lstrip("/") / ".nxc-deps"
    if not stamp.is_file() or stamp.read_text() != "\n".join(deps):
        with Stage("venv", f"guest venv {GUEST_VENV} with {len(deps)} wheels, no index"):
            shutil.rmtree(guest.rootfs / GUEST_VENV.lstrip("/"), ignore_errors=True)
            guest.run([f"/usr/bin/python{python}", "-m", "venv", GUEST_VENV], check=True)
            guest.run(["python", "-m", "pip", "install", "-q", "--no-index", "--find-links", "/work/wheels",
                       *requirements()], check=True)
            stamp.write_text("\n".join(deps))
    with Stage("install_nxc", "nxc wheel into the guest venv"):
        guest.run(["python", "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", f"/work/dist/{wheel.name}"],
                  check=True, capture_output=True)
    with Stage("export_x86", "export the embedded and retrieval models on x86 (fp32)"):
        export_builds(WORK / "builds")
    return guest_facts(guest)


def nxc_run_both(guest: Guest, first: dict) -> dict:
    """`nxc-run --json` on x86 and in the guest, on the first prompt's image."""
    image = WORK / "scene.png"
    image.write_bytes(base64.b64decode(first["image_png"]))
    args = ["--prompt", first["question"], "--json", "--max-new-tokens", "48"]
    x86 = json.loads(run([str(Path(sys.executable).parent / "nxc-run"), str(WORK / "builds/embedded"),
                          "--image", str(image), *args], capture_output=True, text=True).stdout)
    arm = json.loads(guest.run(["nxc-run", "/work/builds/embedded", "--image", "/work/scene.png", *args],
                               capture_output=True, text=True, check=True).stdout)
    why = same_cli_answer(x86, arm)
    return {"ok": not why, "why": why, "reply": arm["text"], "detections": len(arm["detections"])}


def checks(guest: Guest, quick: bool) -> dict:
    """Every comparison and test, each in its own timed stage."""
    with Stage("answers_x86", "answers on x86"):
        run([sys.executable, str(ROOT / "tests/aarch64/answers.py"), str(WORK / "builds"), str(WORK / "x86.json")])
    with Stage("answers_arm64", "the same answers under aarch64 emulation"):
        guest.run(["python", "tests/aarch64/answers.py", "/work/builds", "/work/arm64.json"], check=True)
    x86 = json.loads((WORK / "x86.json").read_text())
    out = {"answers": compare_answers(x86, json.loads((WORK / "arm64.json").read_text()))}
    with Stage("nxc_run", "nxc-run --json on x86 and on arm64"):
        out["nxc_run"] = nxc_run_both(guest, x86["embedded"][0])
    with Stage("nxc_serve", "nxc-serve under emulation, one request over loopback"):
        out["nxc_serve"] = serve_request(guest, x86["embedded"][0], free_port(), x86["embedded"][0]["image_png"])
    with Stage("python310_x86", "the answers with CPython 3.10 and the wheels PyPI gives it (JetPack 6's Python)"):
        out["cpython310_x86"] = jetpack6_python(x86)
    with Stage("pytest_arm64", f"pytest {'(quick) ' if quick else ''}tests/runtime under emulation"):
        out["pytest"] = guest_pytest(guest, quick)
    return out


def failures(facts: dict, c: dict) -> list[str]:
    why = list(c["answers"]["mismatches"][:5]) + ([] if c["answers"]["answers"] else ["no answers compared"])
    why += [f"nxc-run: {c['nxc_run']['why']}"] if not c["nxc_run"]["ok"] else []
    why += [f"nxc-serve: {c['nxc_serve']['why']}"] if not c["nxc_serve"]["ok"] else []
    why += [f"CPython 3.10: {c['cpython310_x86'].get('mismatches', [])[:3]}"] if not c["cpython310_x86"]["ok"] else []
    t = c["pytest"]
    why += [f"pytest: {t.get('summary') or t.get('why')}"] if not t["ok"] else []
    why += ["the torch-free test did not pass"] if t["ok"] and not t["torch_free_test_passed"] else []
    why += ["torch is installed in the guest"] if facts["torch_installed"] else []
    why += [f"the guest is {facts['machine']}, not aarch64"] if facts["machine"] != "aarch64" else []
    return why


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="run part of tests/runtime (CI; QUICK_TESTS)")
    ap.add_argument("--skip-unavailable", action="store_true",
                    help="exit 0, saying why, where this machine cannot make or run the guest (not root, no "
                         "binfmt_misc, no Debian mirror or package index)")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    WORK.mkdir(exist_ok=True)
    try:
        tools = ensure_tools()
        interpreter = ensure_binfmt(tools["qemu"])
        guest = Guest(tools, root=ROOT, work=WORK)
        facts = prepare(guest)
    except Unavailable as e:
        log(f"{'skipped' if a.skip_unavailable else 'cannot run'}: {e}")
        return 0 if a.skip_unavailable else 2
    results = checks(guest, a.quick)
    why = failures(facts, results)
    qemu = subprocess.run([tools["qemu"], "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    report = {"ok": not why, "failures": why, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count()},
              "guest": {**facts, "debian": SUITE, "qemu": qemu,
                        "emulation": f"qemu-user via binfmt_misc ({interpreter}), -cpu {QEMU_CPU}, chroot"},
              **results, "seconds": {**Stage.timings, "total": round(time.perf_counter() - t_start, 1)}}
    (ROOT / "reports").mkdir(exist_ok=True)
    (ROOT / "reports" / "aarch64.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    a_ = results["answers"]
    log(f"FAILED: {'; '.join(why)}" if why else
        f"ok: {a_['identical_ids']}/{a_['answers']} answers identical to x86's, nxc-run and nxc-serve equal, "
        f"{results['pytest']['passed']} tests passed ({results['pytest']['skipped']} skipped), "
        f"{report['seconds']['total']} s (reports/aarch64.json)")
    return 1 if why else 0


if __name__ == "__main__":
    sys.exit(main())
