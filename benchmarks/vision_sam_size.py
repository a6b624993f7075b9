"""Peak memory and time of each export step of the `vision`, `sam_encoder`, `sam_decoder` and `loc_heads` graphs at
true size (CLIP ViT-L/14-336 + SAM ViT-H by default; random weights built here, no LLaMA), printed as JSON.

    python benchmarks/vision_sam_size.py [--vision clip-vit-l-336] [--sam vit_h] [--llm vicuna-7b]
        [--graphs vision sam_encoder sam_decoder loc_heads] [--precisions fp32 fp16 int8]
        [--calib-images 2] [--accuracy-images 2] [--work DIR] [--keep] [--rss-limit-gb 11]

Every step runs in its own subprocess, one at a time; its peak RSS is that child's ru_maxrss (os.wait4), so a
step is measured alone, with only its own graph's torch modules in memory (`modules` is that floor: the modules
built and nothing else). A child over --rss-limit-gb is killed and reported as such.

    fp32   export (export_graph: torch.onnx.export + the graph/data files), parity (check_graph)
    fp16   export (to_fp16 + export_graph), parity, fp32_nodes (the manifest's record), accuracy (compare_graphs
           against the fp32 graph, the parity shapes at batch 1, as nxc-export's reports/accuracy.json)
    int8   quantize (vision, sam_encoder: quantize_static_graph QDQ, calibrated on --calib-images generated scenes;
           loc_heads: quantize_weights_int8; sam_decoder stays fp32 in an int8 build), accuracy (compare_graphs
           on --accuracy-images other scenes)

Sizes come from nxc.config's registries (`--vision tiny --sam tiny --llm tiny-64` for a CI-size run); the
`--llm` only sets the projector's and loc heads' width (its hidden size). Not run in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

GRAPHS = ("vision", "sam_encoder", "sam_decoder", "loc_heads")
STEPS = {"fp32": ("modules", "export", "parity"),
         "fp16": ("export", "parity", "fp32_nodes", "accuracy"),
         "int8": ("quantize", "accuracy")}
INT8_GRAPHS = ("vision", "sam_encoder", "loc_heads")          # sam_decoder stays fp32 in an int8 build


# ---- the child: one step ------------------------------------------------------------------------------------

def _config(a):
    from nxc.config import LLAMA_SIZES, SAM_SIZES, VISION_SIZES, NextChatConfig
    llm = LLAMA_SIZES["tiny"] if a.llm == "tiny-64" else LLAMA_SIZES[a.llm]
    if llm.vocab_size == 0:
        llm = replace(llm, vocab_size=64)
    vision = VISION_SIZES[a.vision]
    return NextChatConfig(llm=llm, vision=vision, sam=SAM_SIZES[a.sam], mm_hidden_size=vision.hidden_size)


def _parts(a, graph: str):
    """The torch modules the graph's wrapper reads, seeded (every step of a graph builds the same weights)."""
    import torch
    from torch import nn

    from transformers import CLIPVisionModel

    from nxc.model.nextchat import build_projector, clip_config, mlp2
    from nxc.model.sam import build_sam

    cfg = _config(a)
    torch.manual_seed(0)
    m = nn.Module()
    m.config = cfg
    h = cfg.llm.hidden_size
    with torch.no_grad():
        if graph == "vision":
            m.vision_tower = CLIPVisionModel(clip_config(cfg.vision))
            m.mm_projector = build_projector(cfg.mm_hidden_size, h, cfg.mm_depth)
        elif graph == "loc_heads":
            m.loc_encoder, m.loc_decoder = mlp2(4, h // 2, h), mlp2(h, h // 2, 4)
            m.seg_prompt_mlp = mlp2(h, h, 4 * cfg.sam.prompt_embed_dim)
        elif graph == "sam_encoder":
            m.sam = build_sam(cfg.sam)
        else:   # the decoder reads only the prompt encoder and mask decoder: a one-block image encoder suffices
            m.sam = build_sam(replace(cfg.sam, encoder_embed_dim=16, encoder_depth=1, encoder_num_heads=1,
                                      encoder_global_attn_indexes=(0,)))
    return m.eval()


def _images(n: int, seed: int):
    from nxc.calib.data import calibration_images
    return calibration_images(None, samples=n, embedded=True, seed=seed)


def _image_feeds(cfg, graph: str, images) -> list[dict]:
    from nxc.runtime import preprocess as pp
    if graph == "vision":
        return [{"pixel_values": pp.clip_pixels(im, cfg.vision.image_size)} for im in images]
    return [{"image": pp.sam_pixels(im, cfg.sam.image_size)} for im in images]


def _random_feeds(spec, cfg, n: int) -> list[dict]:
    import numpy as np

    from nxc.export.parity import SHAPES, random_inputs
    return [random_inputs(spec, {**SHAPES[i % len(SHAPES)], "batch": 1}, np.random.default_rng(100 + i),
                          sam_size=cfg.sam.image_size) for i in range(n)]


def _graph_path(work: Path, precision: str, graph: str) -> Path:
    return work / precision / f"{graph}.onnx"


def _files(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.parent.glob(path.name + "*")) if p.is_file()}


def run_step(a) -> dict:
    import torch

    from nxc.export.exporter import ExportOptions, export_graph, wrapper_for
    from nxc.specs import graph_specs
    torch.set_num_threads(os.cpu_count() or 1)

    work, g, p, step = Path(a.work), a.graph, a.precision, a.step
    cfg = _config(a)
    spec = graph_specs(cfg)[g]
    path = _graph_path(work, p, g)
    fp32_path = _graph_path(work, "fp32", g)
    out: dict = {}
    t_build = time.perf_counter()
    parts = _parts(a, g) if step in ("modules", "export", "parity") else None
    if parts is not None and p == "fp16":
        from nxc.export.fp16 import to_fp16
        parts = to_fp16(parts)
    out["build_s"] = round(time.perf_counter() - t_build, 2)
    t0 = time.perf_counter()
    if step == "export":
        path.parent.mkdir(parents=True, exist_ok=True)
        opts = ExportOptions(precision=p)
        wrapper = wrapper_for(parts, g, opts)
        out["external_data"] = export_graph(wrapper, spec, cfg, path, opts)
        out["file_bytes"] = _files(path)
    elif step == "parity":
        from nxc.export.parity import check_graph
        wrapper = wrapper_for(parts, g, ExportOptions(precision=p))
        rep = check_graph(wrapper, path, spec, precision=p, sam_size=cfg.sam.image_size)
        out["ok"], out["checks"] = rep["ok"], len(rep["checks"])
        out["max_abs"] = max(v["max_abs"] for c in rep["checks"] for v in c["outputs"].values() if "max_abs" in v)
    elif step == "fp32_nodes":
        from nxc.export.fp16 import float32_nodes
        out["count"] = float32_nodes(path)["count"]
    elif step == "accuracy":
        from nxc.calib.quantize import compare_graphs
        if p == "int8" and g != "loc_heads":
            feeds = _image_feeds(cfg, g, _images(a.accuracy_images, seed=1))
        else:
            feeds = _random_feeds(spec, cfg, a.accuracy_images)
        rep = compare_graphs(fp32_path, path, feeds)
        out["cosine"] = min(v["cosine"] for v in rep.values())
        out["feeds"] = len(feeds)
    elif step == "quantize":
        from nxc.calib.quantize import quantize_static_graph, quantize_weights_int8
        path.parent.mkdir(parents=True, exist_ok=True)
        if g == "loc_heads":
            out["weights"] = quantize_weights_int8(fp32_path, path)
        else:
            feeds = _image_feeds(cfg, g, _images(a.calib_images, seed=0))
            t_feeds = time.perf_counter()
            cache = work / "calib" / f"{g}.json"
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.unlink(missing_ok=True)                       # calibrate, do not reuse
            quantize_static_graph(fp32_path, path, feeds, method="minmax", cache=cache)
            out["calibration_images"] = len(feeds)
            t0 = t_feeds
        out["file_bytes"] = _files(path)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["self_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 3)
    return out


# ---- the parent: one child per step ---------------------------------------------------------------------------

def _rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return 0.0


def _child(a, graph: str, precision: str, step: str, work: Path) -> dict:
    result = work / "results" / f"{graph}-{precision}-{step}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    argv = [sys.executable, __file__, "--child", "--graph", graph, "--precision", precision, "--step", step,
            "--work", str(work), "--result", str(result), "--vision", a.vision, "--sam", a.sam, "--llm", a.llm,
            "--calib-images", str(a.calib_images), "--accuracy-images", str(a.accuracy_images)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = threading.Event()
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()

    def watch():
        while proc.returncode is None and not killed.is_set():
            if _rss_gb(proc.pid) > a.rss_limit_gb:
                killed.set()
                proc.kill()
            time.sleep(0.1)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(5)
    rec = {"peak_rss_gb": round(usage.ru_maxrss / 1024 ** 2, 3), "wall_s": round(time.perf_counter() - t0, 1)}
    if killed.is_set():
        rec["killed"] = f"RSS over {a.rss_limit_gb} GB"
    if proc.returncode != 0:
        rec["error"] = "".join(err)[-1500:]
    elif result.is_file():
        rec.update(json.loads(result.read_text()))
    print(f"{graph} {precision} {step}: {json.dumps(rec)[:300]}", file=sys.stderr, flush=True)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vision", default="clip-vit-l-336")
    ap.add_argument("--sam", default="vit_h")
    ap.add_argument("--llm", default="vicuna-7b", help="sets the projector's and loc heads' width; tiny-64 for CI size")
    ap.add_argument("--graphs", nargs="+", default=list(GRAPHS), choices=GRAPHS)
    ap.add_argument("--precisions", nargs="+", default=list(STEPS), choices=list(STEPS))
    ap.add_argument("--steps", nargs="+", help="only these steps (their inputs must exist in --work)")
    ap.add_argument("--calib-images", type=int, default=2)
    ap.add_argument("--accuracy-images", type=int, default=2)
    ap.add_argument("--work", help="where the graphs go (default: a temporary folder, removed unless --keep)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--rss-limit-gb", type=float, default=11.0, help="a step over this is killed")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--graph", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        Path(a.result).write_text(json.dumps(run_step(a)))
        return 0

    import shutil
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="nxc-vision-sam-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"sizes": {"vision": a.vision, "sam": a.sam, "llm": a.llm}, "calibration_images": a.calib_images,
                    "accuracy_images": a.accuracy_images, "cpus": os.cpu_count(), "graphs": {}}
    try:
        for g in a.graphs:
            for p in a.precisions:
                if p == "int8" and g not in INT8_GRAPHS:
                    continue
                recs = report["graphs"].setdefault(g, {}).setdefault(p, {})
                for step in STEPS[p]:
                    if a.steps and step not in a.steps:
                        continue
                    recs[step] = _child(a, g, p, step, work)
                    if "error" in recs[step] or "killed" in recs[step]:
                        break
                path = _graph_path(work, p, g)
                if path.is_file():
                    recs["file_bytes"] = _files(path)
    finally:
        if not a.work and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
