"""nxc-profile: where the time goes, per stage, for one or more builds side by side."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nxc.runtime.timing import STAGES


def _cell(st: dict | None) -> str:
    """A stage's median, p90 and share (32 characters); '-' where the build has no such stage."""
    if st is None:
        return f"{'-':>32}"
    share = f"{100 * st['share']:>9.1f}%" if "share" in st else f"{'':>10}"
    return f"{st['median_ms']:>12.2f}{st.get('p90_ms', float('nan')):>10.2f}{share}"


def _per_step(b: dict) -> str:
    st = b["stages"].get("denoiser_per_step")
    return "-" if st is None else f"{st['count']} calls x {st['median_ms']:.2f} ms"


def format_table(report: dict) -> str:
    """The stages side by side; a build that draws adds its graphs (projector, denoiser, latent_decoder) after the
    usual stages and a "denoiser per step" line: calls per picture-making turn x the median call."""
    builds = report["builds"]
    head = f"{'stage':<20}" + "".join(f"{Path(b['build']).name + ' (' + b['precision'] + ')':>32}" for b in builds)
    sub = f"{'':<20}" + "".join(f"{'median ms':>12}{'p90 ms':>10}{'share':>10}" for _ in builds)
    rows = [head, sub]
    drawing = [s for b in builds for s in b["stages"] if s not in (*STAGES, "decode_per_token", "denoiser_per_step")]
    for s in (*STAGES, *dict.fromkeys(drawing), "decode_per_token"):
        cells = [b["stages"].get(s) for b in builds]
        if s != "decode_per_token" and not any(c and (c.get("median_ms") or c.get("p90_ms")) for c in cells):
            continue                      # a stage none of these builds has (SAM in a retrieval build, ...)
        rows.append(f"{s:<20}" + "".join(_cell(c) for c in cells))

    def line(label, fn):
        rows.append(f"{label:<20}" + "".join(f"{fn(b):>32}" for b in builds))
    if drawing:
        line("denoiser per step", _per_step)
    line("end-to-end ms", lambda b: f"{b['end_to_end_ms']['median']:.2f} (p90 {b['end_to_end_ms']['p90']:.2f})")
    line("time to first token", lambda b: f"{b['ttft_ms']:.2f} ms")
    line("decode tokens/s", lambda b: f"{b['decode_tokens_per_s']:.1f}")
    line("decode vs roofline", lambda b: f"{b['roofline']['decode_achieved_gbs']:.2f} GB/s = "
                                         f"{b['roofline']['decode_pct_of_roofline']:.1f}%")
    line("vision vs matmul", lambda b: f"{b['roofline']['vision_achieved_gflops']:.1f} GF/s = "
                                       f"{b['roofline']['vision_pct_of_matmul']:.1f}%")
    line("tokens / triggers", lambda b: f"{b['tokens']} / {b['triggers']}")
    if drawing:
        line("pictures", lambda b: str(b["pictures"]))
    if "torch" in report:
        line("PyTorch ref e2e", lambda b: f"{report['torch']['end_to_end_ms']:.1f} ms = "
                                          f"{report['torch']['end_to_end_ms'] / b['end_to_end_ms']['median']:.2f}x")
    m = report["machine"]
    rows.append(f"\nmachine: copy bandwidth {m['bandwidth_gbs']:.1f} GB/s, float32 matmul {m['matmul_gflops']:.0f} "
                f"GFLOP/s; peak RSS {report['peak_rss_mb']:.0f} MB (CPU figures)")
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nxc-profile", description=__doc__.split("\n")[0],
                                 epilog="example: nxc-profile build/fp32 build/int4 --runs 10 --json profile.json")
    ap.add_argument("builds", nargs="+", help="build directories (profiled side by side, runs interleaved)")
    ap.add_argument("--image", help="image file (default: a generated shapes scene)")
    ap.add_argument("--prompt", default="Can you describe the image and include object locations?")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    ap.add_argument("--steps", type=int, help="a build that draws: denoise steps per picture (default: the build's)")
    ap.add_argument("--guidance", type=float, help="a build that draws: classifier-free guidance (default: the build's)")
    ap.add_argument("--json", metavar="FILE", help="write the report as JSON ('-' for stdout instead of the table)")
    ap.add_argument("--trace", metavar="FILE", help="write a Chrome/Perfetto trace of each build's last run")
    ap.add_argument("--vs-torch", action="store_true", help="also time the PyTorch reference (export extra)")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.runs < 1 or a.warmup < 0:
        print("nxc-profile: --runs must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    if a.vs_torch:                           # before any run: not after minutes of profiling
        try:
            import nxc.model.reference  # noqa: F401
        except ImportError as e:
            print(f"nxc-profile: --vs-torch needs the export extra ({e.name} is not installed): pip install "
                  "'nxc[export]'", file=sys.stderr)
            return 2
    from nxc.manifest import BuildError
    from nxc.profile.profiler import chrome_trace, profile, torch_reference_ms
    from nxc.runtime.backends import BackendError
    from nxc.runtime.images import ImageError, load_image
    try:
        if a.image:
            image = load_image(a.image)
        else:
            import numpy as np

            from nxc.shapes.data import make_scene
            image = make_scene(np.random.default_rng(7), max_objects=3).image

        def progress(done, total, build):
            print(f"\r[nxc-profile] run {done}/{total} ({build})", end="", file=sys.stderr, flush=True)

        draw = {k: v for k, v in (("steps", a.steps), ("guidance", a.guidance)) if v is not None}
        report = profile([Path(b) for b in a.builds], image, a.prompt, runs=a.runs, warmup=a.warmup,
                         max_new_tokens=a.max_new_tokens, progress=progress, threads=a.threads, draw=draw)
        print(file=sys.stderr)
        if a.vs_torch:
            from nxc.manifest import load_manifest
            report["torch"] = torch_reference_ms(load_manifest(a.builds[0]), image, a.prompt, runs=a.runs,
                                                 max_new_tokens=a.max_new_tokens)
    except (BuildError, BackendError, ImageError, FileNotFoundError, ValueError) as e:
        print(f"nxc-profile: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"nxc-profile: --vs-torch needs the export extra ({e.name} is missing)", file=sys.stderr)
        return 2
    timelines = report.pop("_timelines")
    if a.trace:
        Path(a.trace).write_text(json.dumps(chrome_trace(timelines)))
    if a.json and a.json != "-":
        Path(a.json).write_text(json.dumps(report, indent=2))
    if a.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
