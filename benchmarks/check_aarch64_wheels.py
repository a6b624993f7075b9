"""Can the runtime install on a Jetson without a compiler? (issue 20, item 2; not run in CI: it needs the package
index.)

Resolves nxc's runtime dependencies (pyproject's `dependencies`, plus the `serve` extra with --serve) for JetPack 6's
Python, CPython 3.10 on aarch64 with glibc 2.35 (Ubuntu 22.04), wheels only (`pip download --only-binary=:all:`
with every manylinux tag that glibc accepts). Prints JSON: each wheel resolved, and `ok` false naming what has no
binary wheel (a dependency that would need a compiler on the device). TensorRT is not resolved: JetPack brings
TensorRT's Python bindings itself (no pip `tensorrt` on a Jetson, so not nxc's `trt` extra either); with --cuda
the check adds cuda-python for JetPack 6's CUDA 12 (`cuda-python>=12,<13`), which the tensorrt backend needs beside
JetPack's TensorRT. See the README's "On a Jetson".

    python benchmarks/check_aarch64_wheels.py [--serve] [--cuda] [--python 3.10] [--glibc 2.35]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# manylinux tags a glibc accepts: the legacy manylinux2014 (= 2.17) and every manylinux_2_N up to it
FIRST_GLIBC_MINOR = 17


JETSON_CUDA_PYTHON = "cuda-python>=12,<13"        # JetPack 6 ships CUDA 12.x


def requirements(serve: bool, cuda: bool = False) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    if serve:
        reqs += project["optional-dependencies"]["serve"]
    if cuda:
        reqs.append(JETSON_CUDA_PYTHON)
    return reqs


def platforms(glibc: str) -> list[str]:
    major, minor = (int(v) for v in glibc.split("."))
    tags = ["manylinux2014_aarch64"]
    tags += [f"manylinux_{major}_{m}_aarch64" for m in range(FIRST_GLIBC_MINOR, minor + 1)]
    return tags


def download_command(dest, python: str, glibc: str) -> list[str]:
    """`pip download` of binary wheels only into `dest`, for CPython `python` on aarch64 with `glibc` (requirements
    to be appended)."""
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "-d", str(dest), "--python-version", python,
           "--implementation", "cp", "--abi", "cp" + python.replace(".", "")]
    for p in platforms(glibc):
        cmd += ["--platform", p]
    return cmd


def check(reqs: list[str], python: str, glibc: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cmd = download_command(d, python, glibc) + ["--no-cache-dir"]
        print(f"[check-wheels] resolving {len(reqs)} requirements for CPython {python} aarch64, glibc {glibc}",
              file=sys.stderr, flush=True)
        out = subprocess.run(cmd + reqs, capture_output=True, text=True)
        wheels = sorted(p.name for p in Path(d).glob("*.whl"))
    missing = re.findall(r"No matching distribution found for (\S+)", out.stdout + out.stderr)
    return {"python": python, "platform": f"aarch64, glibc {glibc} (manylinux tags: {len(platforms(glibc))})",
            "requirements": reqs, "ok": out.returncode == 0 and not missing, "wheels": wheels,
            "no_binary_wheel": missing,
            "pip_error": None if out.returncode == 0 else (out.stderr.strip().splitlines() or [""])[-1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve", action="store_true", help="the serve extra too")
    ap.add_argument("--cuda", action="store_true", help=f"and {JETSON_CUDA_PYTHON} (the tensorrt backend's CUDA calls)")
    ap.add_argument("--python", default="3.10", help="JetPack 6: 3.10 (JetPack 5: 3.8)")
    ap.add_argument("--glibc", default="2.35", help="JetPack 6 (Ubuntu 22.04): 2.35 (JetPack 5: 2.31)")
    a = ap.parse_args(argv)
    report = check(requirements(a.serve, a.cuda), a.python, a.glibc)
    print(json.dumps(report, indent=2))
    if not report["ok"]:
        print(f"[check-wheels] no binary wheel for: {', '.join(report['no_binary_wheel']) or report['pip_error']}",
              file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
