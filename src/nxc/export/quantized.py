"""The int8 / int4 step of an export: calibrate (or reuse cached ranges), quantize, measure against fp32.

    tmp/graphs/<g>.onnx (fp32, parity-checked) ─▶ scratch/<g>.fp32.onnx
        vision, sam_encoder ─ QDQ int8 with ranges in tmp/calib/<g>.json ─▶ tmp/graphs/<g>.onnx
        loc_heads ─ int8 weights (DequantizeLinear), float activations ─▶ tmp/graphs/loc_heads.onnx
        llm: already written as MatMulNBits (8 or 4 bits) by nxc.export.llm_writer, one weight at a time
    reports/accuracy.json: per graph, cosine and max error against the fp32 graph on inputs not used to calibrate.
Ranges are reused from <out>/calib when the fp32 graphs, the calibration data and the method are all unchanged
(calib/calib.json records their hashes) and --recalibrate is not given. Calibration data is asked for only when a
graph is calibrated (`calibrated_graphs`): the weight-only graphs need none, and their accuracy report then runs on
random inputs. The calibration data and the quantizers are nxc.calib's; this module is the export's use of them
(nxc.calib never imports nxc.export).
"""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np

from nxc.calib.data import CalibrationError, calibration_images, calibration_prompts, fingerprint
from nxc.calib.quantize import (STATIC_GRAPHS, WEIGHT_ONLY_GRAPHS, collect_feeds, compare_graphs,
                                quantize_static_graph, quantize_weights_int8)
from nxc.manifest import sha256_file


def _reusable(prev: Path, key: dict, graphs: list[str]) -> bool:
    try:
        old = json.loads((prev / "calib.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    same = old.get("fingerprint") == key["fingerprint"] and all(
        old.get("graphs", {}).get(g) == key["graphs"][g] for g in graphs)
    return same and all((prev / f"{g}.json").is_file() for g in graphs)


def calibrated_graphs(options, graphs) -> list[str]:
    """The graphs among `graphs` that options.precision calibrates: the static QDQ encoders (vision, sam_encoder)
    in an int8 / int4 build, less those --float-graphs keeps float32. The weight-only llm and loc_heads are not."""
    if options.precision not in ("int8", "int4"):
        return []
    return [g for g in STATIC_GRAPHS if g in graphs and g not in options.float_graphs]


def check_calibration_data(options, graphs, *, embedded: bool) -> None:
    """Before any graph is exported: the calibration data a calibrated graph needs is there and readable (a real
    checkpoint has no default images), so that a long export does not fail at its quantization step."""
    static = calibrated_graphs(options, graphs)
    if not static:
        return
    if options.calib_images is None and not embedded:
        raise CalibrationError(
            f"int8/int4 calibration of {' and '.join(static)} needs --calib-images DIR for a real checkpoint (a few "
            "dozen images like the ones it will see): activation ranges measured on the kit's synthetic shapes would "
            f"clip a real model's activations; or keep {'them' if len(static) > 1 else 'it'} float32 with "
            f"--float-graphs {' '.join(static)}")
    calibration_prompts(options.calib_prompts, embedded=embedded)
    if options.calib_images is not None:
        calibration_images(options.calib_images, samples=options.calib_samples, embedded=embedded)


def quantize_build(tmp: Path, out: Path, model, tokenizer, options, graphs: dict, *, embedded: bool, log) -> dict:
    """Quantize the graphs in `tmp` in place for options.precision ("int8" | "int4"); updates `graphs` (the
    manifest's per-graph records) and returns the accuracy report."""
    import onnx

    from nxc.export.parity import SHAPES, random_inputs
    from nxc.export.trt_lint import lint

    static = calibrated_graphs(options, graphs)
    weight_only = [g for g in WEIGHT_ONLY_GRAPHS if g in graphs]
    # loc_heads' report feeds are the trigger hiddens of real replies where the torch LLaMA exists (it does not in
    # an export, which never builds it) and there are images to reply about; otherwise random hiddens
    detections = (bool(weight_only) and model.llm.lm_head.weight.device.type != "meta"
                  and (bool(static) or options.calib_images is not None or embedded))
    calib_dir = tmp / "calib"
    calib_dir.mkdir()
    scratch = tmp / ".fp32"
    scratch.mkdir()
    report: dict = {"precision": options.precision, "graphs": {}}
    fresh: dict = {}
    if static or detections:
        images = calibration_images(options.calib_images, samples=options.calib_samples, embedded=embedded)
        prompts = calibration_prompts(options.calib_prompts, embedded=embedded)
        # inputs not used for calibration, for the accuracy report
        fresh_images = (calibration_images(None, samples=4, embedded=True, seed=1) if options.calib_images is None
                        else calibration_images(options.calib_images, samples=options.calib_samples + 4,
                                                embedded=embedded)[-4:])
        fresh = collect_feeds(model, tokenizer, fresh_images, prompts, log=lambda _m: None, detections=detections)
    if static:
        key = {"fingerprint": fingerprint(images, prompts, method=options.calib_method,
                                          extra=f"{options.calib_samples}"),
               "graphs": {g: sha256_file(tmp / graphs[g]["file"]) for g in static},
               "method": options.calib_method, "samples": len(images),
               "images": options.calib_images or "generated shapes scenes (seed 0)"}
        reuse = not options.recalibrate and _reusable(out / "calib", key, static)
        if reuse:
            log(f"[nxc-export] calibration: reusing the ranges in {out / 'calib'} (same graphs, images, prompts "
                "and method; --recalibrate to measure again)")
            for g in static:
                shutil.copy(out / "calib" / f"{g}.json", calib_dir / f"{g}.json")
            feeds = {}
        else:
            log(f"[nxc-export] calibration: {len(images)} images, {len(prompts)} prompts, method {options.calib_method}")
            feeds = collect_feeds(model, tokenizer, images, prompts, log=log, detections=False)
        (calib_dir / "calib.json").write_text(json.dumps({**key, "reused": reuse}, indent=2) + "\n")
        for g in static:
            fp32 = scratch / f"{g}.onnx"
            _move_graph(tmp, graphs[g], scratch)
            log(f"[nxc-export] {g}: int8 QDQ ({options.calib_method})")
            progress = functools.partial(_progress, log, g)
            external = quantize_static_graph(fp32, tmp / graphs[g]["file"], feeds.get(g), method=options.calib_method,
                                             cache=calib_dir / f"{g}.json", log=progress)
            graphs[g]["external_data"] = [str(Path(graphs[g]["file"]).parent / e) for e in external]
            report["graphs"][g] = compare_graphs(fp32, tmp / graphs[g]["file"], fresh[g], log=progress)
            graphs[g]["precision"] = "int8"
            graphs[g]["quantization"] = {"scheme": "QDQ static, symmetric int8, per-channel weights",
                                         "calibration": options.calib_method, "ranges": f"calib/{g}.json"}
    for g in weight_only:
        fp32 = scratch / f"{g}.onnx"
        _move_graph(tmp, graphs[g], scratch)
        log(f"[nxc-export] {g}: int8 weight-only (DequantizeLinear)")
        quantize_weights_int8(fp32, tmp / graphs[g]["file"])
        feeds_g = fresh.get(g) or [random_inputs(_spec(graphs, g), {**a, "batch": 1}, np.random.default_rng(i))
                                   for i, a in enumerate(SHAPES)]
        report["graphs"][g] = compare_graphs(fp32, tmp / graphs[g]["file"], feeds_g)
        graphs[g]["precision"] = "int8-weight-only"
        graphs[g]["quantization"] = {"scheme": "int8 weights per output channel behind DequantizeLinear"}
    for g in graphs:
        if g in static or g in weight_only:
            graphs[g]["tensorrt_lint"] = lint(onnx.load(str(tmp / graphs[g]["file"]), load_external_data=False))
    shutil.rmtree(scratch)
    for g, rep in report["graphs"].items():
        worst = min(v["cosine"] for v in rep.values())
        log(f"[nxc-export] {g}: cosine vs fp32 >= {worst:.5f}")
    return report


def _progress(log, graph: str, message: str) -> None:
    log(f"[nxc-export] {graph}: {message}")


def _move_graph(tmp: Path, record: dict, scratch: Path) -> None:
    """The fp32 graph and its external-data files (their locations are relative: they move together) to scratch."""
    for f in [record["file"], *record["external_data"]]:
        shutil.move(tmp / f, scratch / Path(f).name)
    record["external_data"] = []


def _spec(graphs: dict, name: str):
    from nxc.specs import GraphSpec
    return GraphSpec.from_dict(name, graphs[name])
