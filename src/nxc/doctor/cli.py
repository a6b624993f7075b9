"""nxc-doctor: what this machine can run (platform, runtime packages, ONNX Runtime providers, TensorRT, GPU, Jetson
release, memory) and, given a build, which of its graphs and engines run here and what fixes the rest."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nxc import __version__
from nxc.doctor.build import check_build
from nxc.doctor.machine import machine_facts


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="nxc-doctor", description=__doc__,
        epilog="example: nxc-doctor build/fp16 --provider cuda   (exit status: 0 the build runs here with some "
               "backend, 1 it does not, 2 it cannot be read)")
    ap.add_argument("build", nargs="?", type=Path, help="a build directory written by nxc-export (optional)")
    ap.add_argument("--provider", action="append", metavar="PROVIDER",
                    help="ONNX Runtime provider the build should run on: cpu (default), cuda, tensorrt (repeatable)")
    ap.add_argument("--verify", action="store_true", help="re-hash every file of the build against its manifest")
    ap.add_argument("--load", action="store_true",
                    help="make an ONNX Runtime session of each graph (real; takes the graph's time and memory)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return ap


def _v(value, missing: str = "-") -> str:
    return missing if value is None else str(value)


def machine_lines(f: dict) -> list[str]:
    p, pk, ort, trt, gpu, jet, mem = (f[k] for k in ("platform", "packages", "onnxruntime", "tensorrt", "gpu",
                                                      "jetson", "memory"))
    rows = [("platform", f"{p['system']} {p['machine']}, {_v(p['os'], 'unknown OS')}, glibc {_v(p['glibc'])}, "
                         f"{p['implementation']} {p['python']}, {p['cpus']} CPUs")]
    if jet:
        rows.append(("jetson", f"{_v(jet['model'], 'unknown module')}, L4T {_v(jet['l4t'])}, JetPack "
                               f"{_v(jet['jetpack'], 'unknown')}" + (f" ({jet['problem']})" if jet.get("problem") else "")))
    rows.append(("memory", f"{_v(mem['total_gb'])} GB total, {_v(mem['available_gb'])} GB available"
                           + (" (shared with the GPU)" if jet else "")))
    for name in ("nxc", "numpy", "tokenizers", "Pillow"):
        rows.append((name, _v(pk.get(name), "not installed")))
    rows.append(("onnxruntime", f"{ort['version']}, providers: {', '.join(ort['providers'])}" if ort["version"]
                 else f"- ({ort['problem']})"))
    rows.append(("tensorrt", trt["version"] or f"- ({trt['problem']})"))
    cuda = pk.get("cuda-python") or pk.get("cuda-bindings")
    rows.append(("cuda-python", _v(cuda, "- (not installed: pip install 'nxc[trt]'; on a Jetson: cuda-python for "
                                         "JetPack's CUDA)")))
    rows.append(("gpu", f"{gpu['name']}, compute capability {gpu['compute_capability']} (from {gpu['source']})"
                 if gpu else "- (no NVIDIA GPU visible)"))
    return [f"  {k:<12} {v}" for k, v in rows]


def build_lines(r: dict) -> list[str]:
    """The build's table: one row per graph, "no [n]" pointing at the n-th reason below it and its fix."""
    if not r["readable"]:
        return [f"build {r['build']}: cannot be read: {r['why']}", f"  fix: {r['fix']}"]
    head = (f"build {r['build']} ({r['precision']}, nxc {r['nxc_version']}"
            + (", draws pictures" if r.get("draws") else "")
            + (f", module calls {', '.join(f'{k}: {b}' for k, b in r['modules'].items())}" if r.get("modules") else "")
            + "): "
            + (f"runs here with {' and '.join(r['runs_with'])}" if r["runs"] else f"does not run here: {r['why']}"))
    lines = [head] + ([f"  note: {r['note']}"] if r.get("note") else [])
    reasons: list[tuple[str, str]] = []

    def cell(row: dict) -> str:
        if row["ok"]:
            return "yes"
        key = (row["why"], row["fix"])
        if key not in reasons:
            reasons.append(key)
        return f"no [{reasons.index(key) + 1}]"

    width = max(len(g["graph"]) for g in r["graphs"] + [{"graph": "graph"}])
    lines.append(f"  {'graph':<{width}}  {'precision':<17} {'onnxruntime':<12} {'tensorrt':<12} for")
    for g in r["graphs"]:
        lines.append(f"  {g['graph']:<{width}}  {g['precision']:<17} {cell(g['onnxruntime']):<12} "
                     f"{cell(g['tensorrt']):<12} {g.get('role', '-')}")
    for e in r["engines"]:
        built = (f"TensorRT {_v(e.get('tensorrt'))}, {_v(e.get('gpu'))} ({_v(e.get('compute_capability'))}), "
                 f"{_v(e.get('precision'))}")
        lines.append(f"  engines/{e['folder']}/: {built}: " + ("runs here" if e["ok"] else cell(e)))
    for i, (why, fix) in enumerate(reasons, 1):
        lines += [f"  [{i}] {why}", f"      fix: {fix}"]
    return lines


def main(argv: list[str] | None = None, *, root: Path | str = "/") -> int:
    a = parser().parse_args(argv)
    facts = machine_facts(root)
    report = check_build(a.build, facts, providers=a.provider, verify=a.verify, load=a.load) if a.build else None
    if a.json:
        print(json.dumps({"nxc_doctor": __version__, "machine": facts, "build": report}, indent=2))
    else:
        print(f"nxc-doctor {__version__}: this machine")
        print("\n".join(machine_lines(facts)))
        if report:
            print("\n".join([""] + build_lines(report)))
    if report is None:
        return 0
    return 0 if report["runs"] else 1 if report["readable"] else 2


if __name__ == "__main__":
    sys.exit(main())
