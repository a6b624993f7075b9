"""A generator folder (diffusers' layout, nxc.model.generator) -> its graphs in a build directory (issue 28).

    folder ─ load_generator ─▶ unet, vae (float32), scheduler config, sizes
           ─ unconditional_conditioning ─▶ uncond.npy
    per graph (DenoiserGraph, LatentDecoderGraph): torch.onnx.export (nxc.export.exporter.export_graph: external
      data over EXTERNAL_DATA_BYTES) ─▶ graphs/<g>.onnx ─▶ TensorRT lint ─▶ ORT parity vs torch (batch 1, 2)
    fp16:  fp32 reference graphs first (scratch), then the modules to fp16 (norms fp32, nxc.export.fp16);
           latent_decoder: fp16 graph vs fp32 graph on random latents (overflow / error check) ─ fails ─▶ the fp32
           graph ships, and its record says why ("fp32_reason")
    int8 / int4:  fp32 graphs, parity-checked; denoiser ─ int8 weights behind DequantizeLinear (MatMul / Gemm,
           nxc.calib.quantize.quantize_weights_int8); latent_decoder stays fp32 (convolutions: nothing to gain)
    ─▶ GeneratorExport: the manifest's "generator" entry, per-graph records (merged into manifest "graphs"),
       parity reports (reports/parity.json) and, below fp32, accuracy vs fp32 (reports/accuracy.json)
The caller (nxc.export.exporter) writes the reports and the manifest; this module writes the graphs and uncond.npy.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nxc import names
from nxc.export.options import PRECISIONS, ExportOptions
from nxc.export.outdir import ExportError
from nxc.export.reports import graph_mb, lint_summary
from nxc.export.reports import log as _log
from nxc.specs import GraphSpec, generator_specs

UNCOND_FILE = "uncond.npy"
GROUNDING_BETA = 0.3       # StableDiffusionGLIGENPipeline's gligen_scheduled_sampling_beta: grounded for 30% of steps
PIXEL_FORMAT = "rgb01"
# latent_decoder at fp16 ships only if, on random latents N(0, s^2) for each s, its pixels (in [0, 1]) are finite
# and within these of the fp32 graph's: 8 levels of 255 at worst, 1 on average. Else the fp32 graph ships.
FP16_DECODER_TOLERANCE = {"max_abs": 8 / 255, "mean_abs": 1 / 255}
DECODER_CHECK_SCALES = (1.0, 1.0, 1.5, 2.0)
KEPT_ENCODER_FP32 = ("the VAE encoder runs once an edit and its latents are the picture outside the edited "
                     "region: kept float32")
KEPT_FP32_AT_INT8 = ("the VAE decoder is convolutions (int8 weight-only covers MatMul / Gemm only, its one "
                     "attention block) and decides every pixel: kept float32")


@dataclass(frozen=True)
class GeneratorExport:
    """What export_generator wrote into the build: `entry`, the manifest's "generator"; `graphs`, the manifest's
    per-graph records (the exporter's form: file, external_data, precision, opset, inputs, outputs, tensorrt_lint,
    ...); `parity`, nxc.export.parity.check_graph's report per graph; `accuracy`, the fp16 / int8 report against
    fp32 (reports/accuracy.json's form, plus "fp16_decoder_check" at fp16), None at fp32."""
    entry: dict
    graphs: dict
    parity: dict
    accuracy: dict | None


def _wrappers(unet, vae) -> dict:
    from nxc.export.generator_graphs import DenoiserGraph, LatentDecoderGraph
    return {names.GRAPH_DENOISER: DenoiserGraph(unet).eval(),
            names.GRAPH_LATENT_DECODER: LatentDecoderGraph(vae).eval()}


def _latent_encoder(vae, out: Path, spec: GraphSpec, opset: int, parity: bool, log) -> tuple[dict, dict | None]:
    """GLIGEN's editing input: the VAE encoder as graph latent_encoder, fp32 at every precision (it runs once an
    edit, and its latents are the picture outside the region)."""
    from nxc.export.generator_graphs import LatentEncoderGraph
    wrapper = LatentEncoderGraph(vae).eval()
    log(f"[nxc-export] {spec.name}: exporting (fp32)")
    record = _export(wrapper, spec, out / "graphs" / f"{spec.name}.onnx", "fp32", opset)
    return record, (_parity(wrapper, out / record["file"], spec, "fp32", log) if parity else None)


def _export(wrapper, spec: GraphSpec, path: Path, precision: str, opset: int) -> dict:
    """One graph to `path` (+ external data beside it), linted; its manifest record (file relative to the build)."""
    from nxc.export.exporter import export_graph
    from nxc.export.graph_files import graph_record
    external = export_graph(wrapper, spec, None, path, ExportOptions(precision=precision, opset=opset))
    if "grounding" in spec.input_names:              # GLIGEN: the fusers run only while grounding is on
        from nxc.export.gligen_graph import gate_fusers
        gate_fusers(path)
    return graph_record(path, spec, precision, opset, external)


def _parity(wrapper, path: Path, spec: GraphSpec, precision: str, log) -> dict:
    """ONNX Runtime vs torch at batch 1 and 2 (nxc.export.parity.SHAPES); a mismatch fails the export."""
    from nxc.export.parity import check_graph
    log(f"[nxc-export] {spec.name}: checking against torch in ONNX Runtime ({precision})")
    report = check_graph(wrapper, path, spec, precision=precision)
    if not report["ok"]:
        raise ExportError(f"graph {spec.name} does not match torch in ONNX Runtime: "
                          f"{json.dumps(report['checks'], default=str)[:600]}")
    return report


def _move(build: Path, record: dict, folder: Path) -> Path:
    """A graph's .onnx and external data (relative locations: they move together) from the build to `folder`."""
    for f in [record["file"], *record["external_data"]]:
        shutil.move(build / f, folder / Path(f).name)
    return folder / Path(record["file"]).name


def _accuracy(ref: Path, test: Path, spec: GraphSpec) -> dict:
    """Cosine and max abs error of `test` against the fp32 graph `ref` at batch 1 and 2, fresh random inputs."""
    from nxc.calib.quantize import compare_graphs
    from nxc.export.parity import random_inputs
    feeds = [random_inputs(spec, {"batch": b}, np.random.default_rng(100 + b)) for b in (1, 2)]
    return compare_graphs(ref, test, feeds)


def fp16_decoder_check(fp32_path: Path, fp16_path: Path, spec: GraphSpec, *, seed: int = 0,
                       tolerance: dict = FP16_DECODER_TOLERANCE) -> dict:
    """The fp16 VAE decoder's known trap, measured: both graphs in ONNX Runtime on random latents [1,C,h,w] of
    standard deviation DECODER_CHECK_SCALES (the sampler ends near 1); ok when every fp16 pixel is finite and the
    pixels are within `tolerance` of fp32's. An activation over 65504 becomes inf in fp16, then NaN in the next
    norm: a black or speckled picture."""
    import onnxruntime as ort
    rng = np.random.default_rng(seed)
    name = spec.input_names[0]
    feeds = [(rng.standard_normal(spec.inputs[0].resolve({"batch": 1})) * s).astype(np.float32)
             for s in DECODER_CHECK_SCALES]
    outs = {}
    for which, path in (("fp32", fp32_path), ("fp16", fp16_path)):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs[which] = [sess.run(None, {name: x})[0].astype(np.float64) for x in feeds]
        del sess
    bad = int(sum((~np.isfinite(y)).sum() for y in outs["fp16"]))
    err = [np.abs(a - b) for a, b in zip(outs["fp32"], outs["fp16"])]
    max_abs = None if bad else float(max(e.max() for e in err))
    mean_abs = None if bad else float(np.mean([e.mean() for e in err]))
    ok = not bad and max_abs <= tolerance["max_abs"] and mean_abs <= tolerance["mean_abs"]
    return {"ok": bool(ok), "non_finite_pixels": bad, "pixels": int(sum(y.size for y in outs["fp16"])),
            "max_abs": max_abs, "mean_abs": mean_abs, "tolerance": dict(tolerance),
            "latent_scales": list(DECODER_CHECK_SCALES)}


def _fp32_reason(check: dict) -> str:
    if check["non_finite_pixels"]:
        return (f"fp16 VAE decoder overflowed: {check['non_finite_pixels']} of {check['pixels']} pixels not finite "
                "on random latents; kept float32")
    return (f"fp16 VAE decoder off by {check['max_abs']:.3g} (max) / {check['mean_abs']:.3g} (mean) from float32 "
            f"on random latents, over {check['tolerance']['max_abs']:.3g} / {check['tolerance']['mean_abs']:.3g}; "
            "kept float32")


def _graphs_fp16(unet, vae, out: Path, scratch: Path, specs: dict, opset: int, parity: bool, log):
    """fp32 references first, then the modules in fp16 (in place), each graph checked; returns (records, parity,
    accuracy)."""
    from nxc.export.fp16 import Float32IO, float32_nodes, to_fp16
    wrappers = _wrappers(unet, vae)
    refs, par = {}, {}
    for g, spec in specs.items():
        log(f"[nxc-export] {g}: fp32 reference for the accuracy report")
        refs[g] = _export(wrappers[g], spec, scratch / f"{g}.onnx", "fp32", opset)
    dec = names.GRAPH_LATENT_DECODER
    if parity:                                     # the fallback's check, while the VAE is still float32
        par[dec] = _parity(wrappers[dec], scratch / f"{dec}.onnx", specs[dec], "fp32", log)
    to_fp16(unet)
    to_fp16(vae)
    records, accuracy = {}, {"precision": "fp16", "reference": "fp32 graphs of the same generator, fresh random "
                                                               "inputs", "graphs": {}}
    half_in = {g: tuple(t.name != "timestep" for t in spec.inputs) for g, spec in specs.items()}  # timestep: f32
    for g, spec in specs.items():
        path = out / "graphs" / f"{g}.onnx"
        log(f"[nxc-export] {g}: exporting (fp16)")
        wrapper = Float32IO(wrappers[g], half_inputs=half_in[g], half_outputs=(False,))
        records[g] = _export(wrapper, spec, path, "fp16", opset)
        if g == dec:
            check = accuracy["fp16_decoder_check"] = fp16_decoder_check(scratch / f"{g}.onnx", path, spec)
            if not check["ok"]:
                reason = _fp32_reason(check)
                log(f"[nxc-export] {g}: {reason}")
                _move(out, records[g], scratch / "rejected")
                for f in [refs[g]["file"], *refs[g]["external_data"]]:
                    shutil.move(scratch / Path(f).name, out / f)
                records[g] = {**refs[g], "fp32_reason": reason}
                continue
            par.pop(g, None)
        if parity:
            par[g] = _parity(wrapper, path, spec, "fp16", log)
        records[g]["fp32_nodes"] = float32_nodes(path)
        accuracy["graphs"][g] = _accuracy(scratch / f"{g}.onnx", path, spec)
    return records, par, accuracy


def _graphs_int8(records: dict, out: Path, scratch: Path, specs: dict, precision: str, log) -> dict:
    """The parity-checked fp32 graphs in `out` quantized for an int8 / int4 build; returns the accuracy report."""
    import onnx

    from nxc.calib.quantize import quantize_weights_int8
    from nxc.export.exporter import EXTERNAL_DATA_BYTES
    from nxc.export.trt_lint import lint
    g = names.GRAPH_DENOISER
    fp32_mb = graph_mb(out, records[g])
    ref = _move(out, records[g], scratch)
    log(f"[nxc-export] {g}: int8 weight-only (DequantizeLinear)")
    dst = out / records[g]["file"]
    data = f"{dst.name}.data" if fp32_mb * 1e6 > EXTERNAL_DATA_BYTES else None    # its convolutions stay float
    n = quantize_weights_int8(ref, dst, external_data=data)
    records[g].update(external_data=[f"graphs/{data}"] if data else [], precision="int8-weight-only", quantization={
        "scheme": "int8 weights per output channel behind DequantizeLinear (MatMul / Gemm; convolutions float32)",
        "weights_quantized": n,
        **({"note": "an int4 build's generator is int8 weight-only"} if precision == "int4" else {})},
        tensorrt_lint=lint(onnx.load(str(out / records[g]["file"]), load_external_data=False)))
    records[g]["quantization"]["graph_mb"] = {"fp32": round(fp32_mb, 2), "int8": round(graph_mb(out, records[g]), 2)}
    records[names.GRAPH_LATENT_DECODER]["fp32_reason"] = KEPT_FP32_AT_INT8
    return {"precision": precision, "reference": "fp32 graphs of the same generator, fresh random inputs",
            "graphs": {g: _accuracy(ref, out / records[g]["file"], specs[g])}}


TOKENIZER_DIR = "generator_tokenizer"


def _text_encoder(folder: Path, out: Path, sizes, opset: int, parity: bool, log) -> tuple[dict, dict | None]:
    """The folder's CLIP text encoder as graph text_encoder (fp32 at every precision: it runs once a picture) and
    its tokenizer's files under generator_tokenizer/ (the runtime's nxc.clip_tokenizer reads them)."""
    import torch
    from transformers import CLIPTextModel

    from nxc.export.generator_graphs import TextEncoderGraph
    from nxc.model.generator import TEXT_ENCODER, TOKENIZER, _quiet
    from nxc.specs import text_encoder_spec
    missing = [f"{TOKENIZER}/{f}" for f in names.CLIP_TOKENIZER_FILES if not (folder / TOKENIZER / f).is_file()]
    if not (folder / TEXT_ENCODER).is_dir() or missing:
        raise ExportError(f"{folder}: a text encoder graph needs the folder's {TEXT_ENCODER}/ and "
                          f"{', '.join(missing) or TOKENIZER + '/'}; this folder ships none (uncond.npy only)")
    with _quiet():
        encoder = CLIPTextModel.from_pretrained(folder / TEXT_ENCODER, local_files_only=True,
                                                torch_dtype=torch.float32).eval()
    spec = text_encoder_spec(sizes)
    wrapper = TextEncoderGraph(encoder).eval()
    log(f"[nxc-export] {spec.name}: exporting (fp32)")
    record = _export(wrapper, spec, out / "graphs" / f"{spec.name}.onnx", "fp32", opset)
    report = _parity(wrapper, out / record["file"], spec, "fp32", log) if parity else None
    (out / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
    for f in names.CLIP_TOKENIZER_FILES:
        shutil.copyfile(folder / TOKENIZER / f, out / TOKENIZER_DIR / f)
    return record, report


def export_generator(folder: str | Path, out_dir: str | Path, *, precision: str = "fp32", opset: int = 17,
                     parity: bool = True, default_scheduler: str = "ddim", default_steps: int = 50,
                     default_guidance: float = 7.5, text_encoder: bool = False, log=_log) -> GeneratorExport:
    """Export the generator in diffusers folder `folder` into the build directory `out_dir` (normally the
    exporter's partial directory): graphs/denoiser.onnx, graphs/latent_decoder.onnx (+ external data when large),
    uncond.npy; with `text_encoder`, graphs/text_encoder.onnx and generator_tokenizer/ (a VITRON-style build
    turns an instruction into conditioning at run time). `precision` is the build's (fp32 | fp16 | int8 | int4). Raises GeneratorError (the folder) or
    ExportError (a graph that does not match torch); scratch files are removed either way."""
    from nxc.model.generator import load_generator, unconditional_conditioning
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r} is not available; choose one of {PRECISIONS}")
    if default_scheduler not in names.GENERATOR_SCHEDULERS:
        raise ExportError(f"default scheduler {default_scheduler!r}: nxc's samplers are "
                          f"{', '.join(names.GENERATOR_SCHEDULERS)}")
    out = Path(out_dir)
    log(f"[nxc-export] generator: loading {folder}")
    unet, vae, scheduler, sizes = load_generator(folder)
    if not 1 <= default_steps <= scheduler["num_train_timesteps"] or default_guidance < 0:
        raise ExportError(f"default steps {default_steps} and guidance {default_guidance}: expected 1 to "
                          f"{scheduler['num_train_timesteps']} steps and a guidance >= 0")
    uncond = unconditional_conditioning(folder)
    (out / "graphs").mkdir(parents=True, exist_ok=True)
    np.save(out / UNCOND_FILE, uncond)
    specs = generator_specs(sizes)
    encoder_spec = specs.pop(names.GRAPH_LATENT_ENCODER, None)
    if sizes.grounded and not text_encoder:
        log("[nxc-export] generator: a GLIGEN UNet embeds its phrases at run time: exporting its text encoder too")
        text_encoder = True
    scratch = out / ".generator-fp32"
    (scratch / "rejected").mkdir(parents=True, exist_ok=True)
    records, par = {}, {}
    if encoder_spec is not None:                     # before the fp16 step turns the VAE to half
        records[encoder_spec.name], report = _latent_encoder(vae, out, encoder_spec, opset, parity, log)
        if precision != "fp32":
            records[encoder_spec.name]["fp32_reason"] = KEPT_ENCODER_FP32
        if report is not None:
            par[encoder_spec.name] = report
    try:
        if precision == "fp16":
            main, main_par, accuracy = _graphs_fp16(unet, vae, out, scratch, specs, opset, parity, log)
            records.update(main)
            par.update(main_par)
        else:
            accuracy = None
            for g, wrapper in _wrappers(unet, vae).items():
                log(f"[nxc-export] {g}: exporting")
                records[g] = _export(wrapper, specs[g], out / "graphs" / f"{g}.onnx", "fp32", opset)
                if parity:
                    par[g] = _parity(wrapper, out / records[g]["file"], specs[g], "fp32", log)
            if precision in ("int8", "int4"):
                accuracy = _graphs_int8(records, out, scratch, specs, precision, log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if text_encoder:
        records[names.GRAPH_TEXT_ENCODER], report = _text_encoder(Path(folder), out, sizes, opset, parity, log)
        if report is not None:
            par[names.GRAPH_TEXT_ENCODER] = report
    for g, rec in records.items():
        log(f"[nxc-export] {g}: {rec['precision']}, {graph_mb(out, rec):.1f} MB, {lint_summary(rec['tensorrt_lint'])}")
    entry = {"sizes": sizes.to_dict(), "denoiser": names.GRAPH_DENOISER, "decoder": names.GRAPH_LATENT_DECODER,
             "scheduler": scheduler, "default_scheduler": default_scheduler, "default_steps": default_steps,
             "default_guidance": float(default_guidance), "uncond_file": UNCOND_FILE, "pixel_format": PIXEL_FORMAT,
             **({"text_encoder": names.GRAPH_TEXT_ENCODER, "tokenizer": TOKENIZER_DIR} if text_encoder else {}),
             **({"encoder": names.GRAPH_LATENT_ENCODER, "grounding_beta": GROUNDING_BETA} if sizes.grounded else {})}
    return GeneratorExport(entry=entry, graphs=records, parity=par, accuracy=accuracy)
