"""Checkpoint -> build directory (DESIGN "the build directory is the contract").

    load (nxc.model) ─▶ per graph: wrapper ─ torch.onnx.export ─▶ graphs/<g>.onnx ─▶ TensorRT lint ─▶ ORT parity
                     ─▶ tokenizer.json, embeddings.npy ─▶ reports/parity.json ─▶ manifest.json (sha256 of all)
    tokenizer.json first (a tokenizer that does not convert fails before any graph is exported), all of it in
    .<out>.partial-<pid>/ under <out>.lock, renamed to <out> last (nxc.export.outdir): an interrupted export
    leaves nothing that loads, and the next one cleans up after it.
Here: one graph's export (wrapper_for, export_graph) and the build's steps in order. Elsewhere in nxc.export: the
options (options), the manifest's body and head table (build_manifest), progress lines and the fp16 accuracy report
(reports), the int8 / int4 step and its calibration data check (quantized), the llm writer and check (llm_writer,
llm_check).
"""
from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from nxc import __version__, names
from nxc.config import NextChatConfig
from nxc.export import outdir
from nxc.export.build_manifest import manifest_body
from nxc.export.options import FLOAT32_GRAPHS, PRECISIONS, ExportOptions, check_options, family_options
from nxc.export.outdir import ExportError
from nxc.export.reports import accuracy_vs_fp32, graph_mb, lint_summary, peak
from nxc.export.reports import log as _log
from nxc.specs import GraphSpec, graph_specs

# the names callers import from here (the options, the manifest body and the error live in their own modules)
__all__ = ["EXTERNAL_DATA_BYTES", "FLOAT32_GRAPHS", "LLM_INLINE_BYTES", "PRECISIONS", "ExportError", "ExportOptions",
           "LlmWeights", "dummy_inputs", "export_build", "export_graph", "export_model", "manifest_body", "wrapper_for"]

EXTERNAL_DATA_BYTES = 1 << 30      # graphs whose weights exceed this are written with ONNX external data (< 2 GB)
# the llm keeps its streamed external-data file above this: inlining it would hold the weights twice in memory
LLM_INLINE_BYTES = 64 << 20


@dataclass(frozen=True)
class LlmWeights:
    """Where the llm graph's weights come from: `source` for the writer (official names, one tensor at a time) and
    `reference(precision)`, the parity check's own reader of the same weights (nxc.export.llm_check)."""
    source: object
    reference: object

    @classmethod
    def of_checkpoint(cls, ckpt: Path) -> "LlmWeights":
        from nxc.export.llm_check import ReferenceWeights
        from nxc.model.lazy import LazyCheckpoint
        return cls(LazyCheckpoint(ckpt), lambda p: ReferenceWeights.from_checkpoint(ckpt, precision=p))

    @classmethod
    def of_module(cls, llm) -> "LlmWeights":
        from nxc.export.llm_check import ReferenceWeights
        from nxc.export.llm_writer import ModelWeights
        return cls(ModelWeights(llm), lambda p: ReferenceWeights.from_module(llm, precision=p))


def wrapper_for(model, graph: str, opts: ExportOptions) -> torch.nn.Module:
    from nxc.export.llm import LlmGraph
    from nxc.export.wrappers import (LocHeadsGraph, ObjectFeaturesGraph, ProposalsGraph, SamDecoderGraph,
                                     SamEncoderGraph, VisionGraph)
    make = {names.GRAPH_VISION: VisionGraph, names.GRAPH_LOC_HEADS: LocHeadsGraph,
            names.GRAPH_SAM_ENCODER: SamEncoderGraph, names.GRAPH_SAM_DECODER: SamDecoderGraph,
            names.GRAPH_LLM: LlmGraph, names.GRAPH_PROPOSALS: ProposalsGraph,
            names.GRAPH_OBJECT_FEATURES: ObjectFeaturesGraph}
    if graph == names.GRAPH_VISION and model.config.projector is not None:     # generation: one pooled row
        from nxc.export.nextgpt import PooledVisionGraph
        make[graph] = PooledVisionGraph
    wrapper = make[graph](model).eval()
    if opts.precision_of(graph) == "fp16" and graph != names.GRAPH_LLM:    # the llm wrapper handles its own dtypes
        from nxc.export.fp16 import Float32IO
        spec = graph_specs(model.config)[graph]
        wrapper = Float32IO(wrapper, half_inputs=(True,) * len(spec.inputs), half_outputs=(False,) * len(spec.outputs))
    return wrapper


def dummy_inputs(spec: GraphSpec, config: NextChatConfig) -> tuple[torch.Tensor, ...]:
    """Trace inputs: every dynamic axis > 1 and distinct, so no length gets baked in as a constant."""
    from nxc.export.parity import random_inputs
    axes = {"batch": 2, "sequence": 3, "past": 4, "detections": 2, "boxes": 3}
    if spec.name in ("sam_encoder", "sam_decoder", "loc_heads"):
        axes["batch"] = 1
    feeds = random_inputs(spec, axes, np.random.default_rng(0), sam_size=_sam_size(config))
    return tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)


def _sam_size(config) -> int:
    sam = getattr(config, "sam", None)          # sizes without SAM (a generator's graphs) have none
    return sam.image_size if sam is not None else 0


def export_graph(wrapper: torch.nn.Module, spec: GraphSpec, config: NextChatConfig, path: Path, opts: ExportOptions) -> list[str]:
    """torch -> ONNX at `path`; returns the external-data file names written beside it (empty if none).

        torch.onnx.export ─▶ .<g>-scratch/<g>.onnx (weights inline under 2 GB, one file per tensor over it)
          ─ structure (onnx.load without external data) ─ graph_files.write_weights ─▶ <g>.onnx (+ <g>.onnx.data
            when the weights exceed EXTERNAL_DATA_BYTES: one tensor at a time, never the whole graph loaded)"""
    import onnx

    from nxc.export.graph_files import weight_bytes, write_weights
    from nxc.memory import mmap_large_allocations
    mmap_large_allocations()                    # the trace's freed activations go back to the OS (nxc.memory)
    scratch = path.parent / f".{path.stem}-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    raw = scratch / path.name
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, dummy_inputs(spec, config), str(raw), dynamo=False, opset_version=opts.opset,
                          input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=spec.dynamic_axes(), do_constant_folding=True)
    model = onnx.load(str(raw), load_external_data=False)
    model.producer_name, model.doc_string = "nxc", f"nxc {__version__} graph {spec.name} ({opts.precision})"
    external = [path.name + ".data"] if weight_bytes(model, scratch) > EXTERNAL_DATA_BYTES else []
    write_weights(model, scratch, path.parent / external[0] if external else None)
    onnx.save_model(model, str(path))
    shutil.rmtree(scratch)
    return external


MODULES_FILE = "modules.json"     # beside a checkpoint: its module-call table (--modules' format), used by default


def export_build(checkpoint: str | Path | None, out: str | Path, *, clip_dir=None, sam_file=None,
                 options: ExportOptions = ExportOptions()) -> Path:
    """Export `checkpoint` (default: the embedded shapes model) into the build directory `out`."""
    from nxc.model.checkpoint import load_nextchat

    from nxc import assets
    check_options(options)
    embedded = checkpoint is None
    if embedded:
        checkpoint = assets.embedded_checkpoint()
    checkpoint = Path(checkpoint)
    embedded = embedded or assets.is_shipped(checkpoint)       # a model of the kit's own: calibrated on generated shapes scenes
    if options.modules is None and (checkpoint / MODULES_FILE).is_file():    # a model that writes module calls
        _log(f"[nxc-export] {checkpoint}: its {MODULES_FILE} names the module calls it writes; exported with them")
        options = replace(options, modules=str(checkpoint / MODULES_FILE))
        check_options(options)

    def load():
        _log(f"[nxc-export] loading {checkpoint}{' (embedded shapes model)' if embedded else ''}")
        from nxc.model.nextgpt import is_nextgpt_checkpoint, load_nextgpt
        from nxc.model.retrieval import is_retrieval_checkpoint, load_retrieval
        if is_retrieval_checkpoint(checkpoint):       # small parts, loaded whole; the llm still streams
            model, tokenizer = load_retrieval(checkpoint, clip_dir=clip_dir)
        elif is_nextgpt_checkpoint(checkpoint):       # as NExT-Chat: LLaMA on the meta device, vision per graph
            model, tokenizer = load_nextgpt(checkpoint, clip_dir=clip_dir, llm=False)
        else:
            model, tokenizer = load_nextchat(checkpoint, clip_dir=clip_dir, sam_file=sam_file, llm=False)
        return model, tokenizer, LlmWeights.of_checkpoint(checkpoint)

    source = {"checkpoint": f"embedded:{checkpoint.name}" if embedded else str(checkpoint.resolve())}
    return _export(load, out, tokenizer_dir=checkpoint, options=options, source=source, embedded=embedded)


def export_model(model, tokenizer, out: str | Path, *, tokenizer_dir: Path, options: ExportOptions = ExportOptions(),
                 source: dict | None = None, embedded: bool = False) -> Path:
    """Export a loaded reference model (+ its tokenizer files in `tokenizer_dir`) into the build directory `out`."""
    return _export(lambda: (model, tokenizer, LlmWeights.of_module(model.llm)), out, tokenizer_dir=Path(tokenizer_dir),
                   options=options, source=source or {}, embedded=embedded)


def _export(load, out: str | Path, *, tokenizer_dir: Path, options: ExportOptions, source: dict,
            embedded: bool) -> Path:
    """Under <out>.lock: clean up after a killed export, convert the tokenizer (before the model is even loaded:
    a tokenizer that does not convert fails in seconds, not after the graphs), load, write, publish."""
    check_options(options)
    out = Path(out)
    t0 = time.perf_counter()
    with outdir.locked(out, log=_log):
        outdir.recover(out, log=_log)
        tmp = outdir.prepare(out)
        try:
            _convert_tokenizer(tokenizer_dir, tmp / "tokenizer.json")
            model, tokenizer, llm_weights = load()
            options = family_options(model.config, options)
            if options.precision in ("int8", "int4"):      # calibration data, when a graph needs it, before graphs
                from nxc.export.quantized import check_calibration_data
                check_calibration_data(options, options.graphs, embedded=embedded)
            _write_build(model, tokenizer, llm_weights, tmp, out, options, source, embedded)
            outdir.publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _log(f"[nxc-export] wrote {out} in {time.perf_counter() - t0:.1f} s{peak()}")
    return out


def _convert_tokenizer(tokenizer_dir: Path, path: Path) -> None:
    from nxc.export.tokenizer_json import write_tokenizer_json
    from nxc.model.sp_tokenizer import TokenizerError
    try:
        write_tokenizer_json(tokenizer_dir, path)
    except TokenizerError as e:
        raise ExportError(f"the tokenizer does not convert to the runtime's tokenizer.json, so nothing was "
                          f"exported: {e}") from None


def _fp32_reference_graphs(model, scratch: Path, options: ExportOptions) -> Path:
    """The requested graphs exported in fp32 to `scratch` (inside the partial build, removed before the manifest is
    written): what an fp16 build is measured against. Not the llm: its accuracy against float32 torch comes from
    its streamed parity check (nxc.export.llm_check), at any size."""
    scratch.mkdir()
    fp32 = ExportOptions(precision="fp32", opset=options.opset)
    specs = graph_specs(model.config)
    parts = getattr(model, "parts", None)
    for i, g in enumerate(options.graphs):
        if g == names.GRAPH_LLM or g in names.DRAWING_GRAPHS:     # drawing graphs: their own fp16 references
            continue
        _log(f"[nxc-export] {g}: fp32 reference for the accuracy report")
        if parts is not None:
            parts.load(g)
        export_graph(wrapper_for(model, g, fp32), specs[g], model.config, scratch / f"{g}.onnx", fp32)
        if parts is not None:
            parts.release(g, keep=options.graphs[i + 1:])
    return scratch


def _export_graphs(model, llm_weights: LlmWeights, tmp: Path, specs: dict, options: ExportOptions,
                   accuracy: dict) -> dict:
    """Per graph: export, TensorRT lint, ONNX Runtime parity against torch, one progress line each; writes
    reports/parity.json and returns the manifest's per-graph records. The llm is written by nxc.export.llm_writer
    in the build's precision and checked by nxc.export.llm_check (its accuracy against float32 goes to
    `accuracy`)."""
    from nxc.export.graph_files import graph_record
    from nxc.export.parity import check_graph

    cfg, n = model.config, len(options.graphs)
    quantized = options.precision in ("int8", "int4")                # linted again once quantized
    (tmp / "graphs").mkdir()
    (tmp / "reports").mkdir()
    graphs, parity = {}, {}
    for i, g in enumerate(options.graphs, 1):
        if g in names.DRAWING_GRAPHS:            # exported after the precision steps (nxc.export.nextgpt)
            continue
        tg = time.perf_counter()
        _log(f"[nxc-export] [{i}/{n}] {g}: exporting")
        if g == names.GRAPH_LLM:
            graphs[g], parity[g] = _write_llm(llm_weights, cfg, tmp, specs[g], options, f"[{i}/{n}]", accuracy)
            _log(f"[nxc-export] [{i}/{n}] {g}: {graph_mb(tmp, graphs[g]):.1f} MB, "
                 f"{lint_summary(graphs[g]['tensorrt_lint'])}, {time.perf_counter() - tg:.1f} s{peak()}")
            continue
        parts = getattr(model, "parts", None)          # modules made real for this graph only (nxc.model.parts)
        if parts is not None:
            parts.load(g)
        wrapper = wrapper_for(model, g, options)
        path = tmp / "graphs" / f"{g}.onnx"
        external = export_graph(wrapper, specs[g], cfg, path, options)
        graphs[g] = graph_record(path, specs[g], options.precision_of(g), options.opset, external)
        if options.parity:
            _log(f"[nxc-export] [{i}/{n}] {g}: checking against torch in ONNX Runtime")
            parity[g] = check_graph(wrapper, path, specs[g], precision=options.precision_of(g),
                                    sam_size=_sam_size(cfg))
            if not parity[g]["ok"]:
                (tmp / "reports" / "parity.json").write_text(json.dumps(parity, indent=2))
                raise ExportError(f"graph {g} does not match torch in ONNX Runtime: "
                                  f"{json.dumps(parity[g]['checks'], default=str)[:600]}")
        del wrapper
        if parts is not None:
            parts.release(g, keep=options.graphs[i:])
        lint_msg = "fp32 before quantization" if quantized else lint_summary(graphs[g]["tensorrt_lint"])
        _log(f"[nxc-export] [{i}/{n}] {g}: {graph_mb(tmp, graphs[g]):.1f} MB, {lint_msg}, "
             f"{time.perf_counter() - tg:.1f} s{peak()}")
    (tmp / "reports" / "parity.json").write_text(json.dumps(parity, indent=2) + "\n")
    return graphs


def _write_llm(llm_weights: LlmWeights, cfg, tmp: Path, spec: GraphSpec, options: ExportOptions, step: str,
               accuracy: dict) -> tuple[dict, dict]:
    """The llm graph written in the build's precision from the checkpoint (one tensor at a time), linted, and
    checked against transformers' layers streamed from the same checkpoint. Returns (manifest record, parity)."""
    from nxc.export.graph_files import graph_record
    from nxc.export.llm_check import check_llm
    from nxc.export.llm_writer import WeightError, write_llm_graph

    path = tmp / "graphs" / "llm.onnx"
    prec = options.precision
    try:
        external = write_llm_graph(
            llm_weights.source, cfg.llm, path, spec, precision=prec, opset=options.opset,
            inline_bytes=LLM_INLINE_BYTES, doc=f"nxc {__version__} graph llm ({prec})", block_size=options.block_size,
            log=lambda i, n, msg: _log(f"[nxc-export] {step} llm: layer {i}/{n}, {msg}"))
    except WeightError as e:
        raise ExportError(f"llm: {e}") from None
    record = graph_record(path, spec, prec, options.opset, external)
    if prec in ("int8", "int4"):
        bits = 8 if prec == "int8" else 4
        record["precision"] = f"int{bits}-weight-only"
        record["quantization"] = {"scheme": f"MatMulNBits, {bits}-bit symmetric, block {options.block_size}, "
                                            "accuracy_level 4"}
    if not options.parity:
        return record, {}
    _log(f"[nxc-export] {step} llm: checking against transformers' layers streamed from the checkpoint")
    kv = np.float16 if spec.inputs[3].dtype == "float16" else np.float32
    reference = llm_weights.reference(prec)
    reference.block_size = options.block_size
    report = check_llm(path, reference, cfg.llm, precision=prec, kv_dtype=kv,
                       accuracy_reference=llm_weights.reference("fp32") if prec != "fp32" else None,
                       log=lambda m: _log(f"[nxc-export] {step} llm: {m}"))
    if prec != "fp32":
        accuracy[names.GRAPH_LLM] = report.pop("accuracy")
    if not report["ok"]:
        bad = {r["run"]: (r["worst"], f"{r['worst_rel_l2']:.3g}") for r in report["checks"] if not r["ok"]}
        tolerance = (f"{report['end_to_end_tolerance_rel_l2']} end to end" if all(
            str(w).startswith("end to end") for w, _ in bad.values()) else report["tolerance_rel_l2"])
        raise ExportError(f"graph llm does not match transformers' LLaMA layers built from the checkpoint "
                          f"(relative L2 error above {tolerance}): {bad}; the weights were mapped "
                          "wrongly or the checkpoint's tensors do not belong together")
    return record, report


def _write_build(model, tokenizer, llm_weights: LlmWeights, tmp: Path, out: Path, options: ExportOptions,
                 source: dict, embedded: bool) -> None:
    """Everything but tokenizer.json into the partial directory `tmp`; the manifest last, checked to load."""
    from nxc.manifest import BuildError, load_manifest, write_manifest

    cfg = model.config
    max_context = options.max_context or min(cfg.llm.max_position_embeddings, 4096)
    if not 2 <= max_context <= cfg.llm.max_position_embeddings:
        raise ExportError(f"--max-context {max_context} must be between 2 and the model's "
                          f"max_position_embeddings ({cfg.llm.max_position_embeddings})")
    specs = graph_specs(cfg, kv_dtype="float16" if options.precision == "fp16" else "float32")
    accuracy = None
    if options.precision == "fp16":
        from nxc.export.fp16 import float32_nodes, to_fp16
        reference = _fp32_reference_graphs(model, tmp / ".fp32ref", options)    # for reports/accuracy.json
        if getattr(model, "parts", None) is not None:
            model.parts.convert = to_fp16              # each module as it is made real
        else:
            kept = {n: getattr(model, n) for n in ("proposal_net", "object_encoder", "gen_text_hidden_fcs")
                    if hasattr(model, n)}          # (the projector: export_projector makes its own fp16 copy)
            for n in kept:                                      # FLOAT32_GRAPHS' modules stay float32
                setattr(model, n, None)
            model = to_fp16(model)
            for n, m in kept.items():
                setattr(model, n, m)
    llm_accuracy: dict = {}
    graphs = _export_graphs(model, llm_weights, tmp, specs, options, llm_accuracy)
    if options.precision == "fp16":
        for g in graphs:
            graphs[g]["fp32_nodes"] = float32_nodes(tmp / graphs[g]["file"])
        accuracy = accuracy_vs_fp32(reference, tmp, graphs, cfg, sam_size=_sam_size(cfg))
        shutil.rmtree(reference)
    if options.precision in ("int8", "int4"):
        from nxc.export.quantized import quantize_build
        accuracy = quantize_build(tmp, out, model, tokenizer, options, graphs, embedded=embedded, log=_log)
        for g, rec in graphs.items():                   # the lint of what ships: the quantized graphs
            _log(f"[nxc-export] {g}: {rec['precision']}, {graph_mb(tmp, rec):.1f} MB, "
                 f"{lint_summary(rec['tensorrt_lint'])}")
    if accuracy is not None and llm_accuracy:
        accuracy["graphs"].update(llm_accuracy)
    drawing = None
    if any(g in names.DRAWING_GRAPHS for g in options.graphs):
        from nxc.export.nextgpt import export_drawing
        drawing = export_drawing(model, tmp, precision=options.precision, parity=options.parity, log=_log)
        graphs.update(drawing.graphs)
        if accuracy is not None:
            accuracy["graphs"].update(drawing.accuracy)
    modules = None
    if options.modules is not None:
        from nxc.export.modules import export_module_generator, read_modules
        modules = read_modules(options.modules)
        if modules["generator"] is not None:
            if drawing is not None:
                raise ExportError("--modules with a generator: this model draws with its own generator already "
                                  "(NExT-GPT); one generator a build")
            drawing = export_module_generator(modules["generator"], tmp, precision=options.precision,
                                              parity=options.parity, log=_log)
            graphs.update(drawing.graphs)
            if accuracy is not None and drawing.accuracy:
                accuracy["graphs"].update(drawing.accuracy.get("graphs", drawing.accuracy))
    if accuracy is not None:
        (tmp / "reports" / "accuracy.json").write_text(json.dumps(accuracy, indent=2) + "\n")
    np.save(tmp / "embeddings.npy", llm_weights.source.numpy("model.embed_tokens.weight", np.float32))
    body = manifest_body(model, tokenizer, options, max_context, source)
    body["graphs"] = graphs
    if drawing is not None:
        body["generator"] = drawing.entry
        lo, opt, hi = body["axes"].get("batch", (1, 1, 1))
        body["axes"]["batch"] = [lo, opt, max(hi, 2)]       # the denoiser's [unconditional, conditional] rows
    if modules is not None:
        body["modules"] = modules["table"]
    write_manifest(tmp, body)
    try:
        load_manifest(tmp, verify=False)            # a build whose manifest would not load is never published
    except BuildError as e:
        raise ExportError(f"the manifest written does not load (a bug in nxc-export): {e}") from None
