"""Checkpoint -> build directory (DESIGN "the build directory is the contract").

    load (nxc.model) ─▶ per graph: wrapper ─ torch.onnx.export ─▶ graphs/<g>.onnx ─▶ TensorRT lint ─▶ ORT parity
                     ─▶ tokenizer.json, embeddings.npy ─▶ reports/parity.json ─▶ manifest.json (sha256 of all)
    tokenizer.json first (a tokenizer that does not convert fails before any graph is exported), all of it in
    .<out>.partial-<pid>/ under <out>.lock, renamed to <out> last (nxc.export.outdir): an interrupted export
    leaves nothing that loads, and the next one cleans up after it.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nxc import __version__, names
from nxc.config import NextChatConfig
from nxc.export import outdir
from nxc.export.outdir import ExportError
from nxc.specs import GraphSpec, axis_ranges, graph_specs

PRECISIONS = ("fp32", "fp16", "int8", "int4")
EXTERNAL_DATA_BYTES = 1 << 30      # graphs whose weights exceed this are written with ONNX external data (< 2 GB)
# the llm keeps its streamed external-data file above this: inlining it would hold the weights twice in memory
LLM_INLINE_BYTES = 64 << 20


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"
    max_context: int | None = None     # default: the model's max_position_embeddings, capped at 4096
    opset: int = 17
    graphs: tuple[str, ...] = ()        # default: every graph of the model's family (names.family_graphs)
    parity: bool = True
    # int8 / int4 (nxc.calib): calibration of vision, sam_encoder and loc_heads
    calib_images: str | None = None    # folder; None: generated shapes scenes (embedded model only)
    calib_prompts: str | None = None   # file, one prompt per line
    calib_method: str = "minmax"
    calib_samples: int = 32
    recalibrate: bool = False          # ignore ranges cached in <out>/calib
    float_graphs: tuple[str, ...] = ()  # int8 / int4: encoders kept float32 (not calibrated), e.g. ("sam_encoder",)

    @property
    def graph_precision(self) -> str:
        """Precision the graphs are exported in before any quantization."""
        return "fp16" if self.precision == "fp16" else "fp32"

    def precision_of(self, graph: str) -> str:
        """A graph's export precision: the retrieval family's small per-image graphs stay float32 in every build
        (a top-k over near-equal fp16 scores and RoI-align in fp16 would change which boxes come out)."""
        return "fp32" if graph in FLOAT32_GRAPHS else self.graph_precision


# graphs kept float32 at every precision (a few hundred thousand weights; see ExportOptions.precision_of)
FLOAT32_GRAPHS = (names.GRAPH_PROPOSALS, names.GRAPH_OBJECT_FEATURES)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
    return config.sam.image_size if config.sam is not None else 0


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


def manifest_body(model, tokenizer, opts: ExportOptions, max_context: int, source: dict) -> dict:
    from nxc.model import processing
    from nxc.model.sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD
    cfg = model.config
    added = tokenizer.added_token_ids
    tokens = {**added, names.BOS: tokenizer.bos_id, names.EOS: tokenizer.eos_id,
              names.UNK: tokenizer.token_to_id(names.UNK)}
    heads = []                                  # the decode loop's dispatch table (nxc.manifest.Head)
    if names.GRAPH_OBJECT_FEATURES in opts.graphs:
        # retrieval: no decode-time graph call (indices are tokens, nxc.runtime.dispatch.IndexKind parses them);
        # its slot `<objfeat>` holds the object rows of the prompt (proposals, then region boxes)
        from nxc.object_index import OBJ_FEAT
        heads.append({"kind": "index", "trigger": None, "emit": OBJ_FEAT, "graph": names.GRAPH_OBJECT_FEATURES,
                      "inputs": {"features": f"{names.GRAPH_PROPOSALS}:features", "boxes": "zeros",
                                 "indices": "slot_index"},
                      "collect": [], "feedback": None, "finish": None,
                      "encode_input": "boxes", "encode_output": "rows"})
    if names.GRAPH_LOC_HEADS in opts.graphs:
        sam = {names.GRAPH_SAM_ENCODER, names.GRAPH_SAM_DECODER} <= set(opts.graphs)
        heads.append({"kind": "box", "trigger": names.AT, "emit": names.BOXES, "graph": names.GRAPH_LOC_HEADS,
                      "inputs": {"hidden": "hidden", "boxes": "zeros"}, "collect": ["box", "seg_prompt"],
                      "feedback": "feedback", "finish": "sam_masks" if sam else None,
                      "encode_input": "boxes", "encode_output": "loc_embeds"})
    return {
        "nxc_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "precision": opts.precision,
        "config": cfg.to_dict(),
        "tokens": tokens,
        "prompt": {"template": "vicuna_v1.1", "system": names.SYSTEM_PROMPT, "roles": list(names.ROLES),
                   "sep": names.SEP, "sep2": names.SEP2, "image_placeholder": names.IMAGE_PLACEHOLDER,
                   "num_image_tokens": cfg.num_image_tokens, "use_im_start_end": cfg.mm_use_im_start_end},
        "preprocess": {
            "clip": {**processing.clip_preprocess_of(model).manifest(), "pad": "white square, centred"},
            **({"sam": {"size": cfg.sam.image_size, "mean": list(SAM_PIXEL_MEAN), "std": list(SAM_PIXEL_STD),
                        "resample": "bilinear", "pad": "longest side to size, zeros, centred"}}
               if cfg.sam is not None else {}),
            **({"objects": {"size": cfg.objects.image_size, "mean": list(processing.CLIP_MEAN),
                            "std": list(processing.CLIP_STD), "resample": "bicubic", "pad": "white square, centred"}}
               if cfg.objects is not None else {})},
        "generation": {"max_new_tokens": 512, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "iou_threshold": 0.3,
                       "eos": names.EOS},
        "heads": heads,
        "max_context": max_context,
        "kv_cache": {"dtype": "float16" if opts.precision == "fp16" else "float32",
                     "layout": "[batch, position, kv_heads, head_dim]",
                     # rows of different lengths decode together by mask (ONNX Runtime; TensorRT engines: batch 1)
                     "batch_rows": "masked"},
        "axes": axis_ranges(max_context, prefill_opt=min(max_context, cfg.num_image_tokens + 64)),
        "embeddings": {"file": "embeddings.npy", "shape": [cfg.llm.vocab_size, cfg.llm.hidden_size],
                       "dtype": "float32"},
        "tokenizer": {"file": "tokenizer.json"},
    }


def export_build(checkpoint: str | Path | None, out: str | Path, *, clip_dir=None, sam_file=None,
                 options: ExportOptions = ExportOptions()) -> Path:
    """Export `checkpoint` (default: the embedded shapes model) into the build directory `out`."""
    from nxc.model.checkpoint import load_nextchat

    from nxc import assets
    _check_options(options)
    embedded = checkpoint is None
    if embedded:
        checkpoint = assets.embedded_checkpoint()
    checkpoint = Path(checkpoint)
    shipped = (checkpoint.resolve().parent == Path(assets.__file__).parent.resolve()
               and checkpoint.name in (assets.EMBEDDED_NAME, assets.RETRIEVAL_NAME))
    embedded = embedded or shipped       # a model of the kit's own: calibrated on generated shapes scenes

    def load():
        _log(f"[nxc-export] loading {checkpoint}{' (embedded shapes model)' if embedded else ''}")
        from nxc.model.retrieval import is_retrieval_checkpoint, load_retrieval
        if is_retrieval_checkpoint(checkpoint):       # small parts, loaded whole; the llm still streams
            model, tokenizer = load_retrieval(checkpoint, clip_dir=clip_dir)
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
    _check_options(options)
    out = Path(out)
    t0 = time.perf_counter()
    with outdir.locked(out, log=_log):
        outdir.recover(out, log=_log)
        tmp = outdir.prepare(out)
        try:
            _convert_tokenizer(tokenizer_dir, tmp / "tokenizer.json")
            model, tokenizer, llm_weights = load()
            options = _family_options(model.config, options)
            _write_build(model, tokenizer, llm_weights, tmp, out, options, source, embedded)
            outdir.publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _log(f"[nxc-export] wrote {out} in {time.perf_counter() - t0:.1f} s{_peak()}")
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
        if g == names.GRAPH_LLM:
            continue
        _log(f"[nxc-export] {g}: fp32 reference for the accuracy report")
        if parts is not None:
            parts.load(g)
        export_graph(wrapper_for(model, g, fp32), specs[g], model.config, scratch / f"{g}.onnx", fp32)
        if parts is not None:
            parts.release(g, keep=options.graphs[i + 1:])
    return scratch


def _accuracy_vs_fp32(reference: Path, tmp: Path, graphs: dict, specs: dict, cfg) -> dict:
    """Per graph: cosine similarity and max abs error of the build's graph against fp32, on fresh random inputs
    at the parity shapes."""
    from nxc.calib.quantize import compare_graphs
    from nxc.export.parity import SHAPES, random_inputs
    report = {"reference": "fp32 graphs of the same model, fresh random inputs", "graphs": {}}
    for g in graphs:
        if not (reference / f"{g}.onnx").is_file():
            continue
        spec = graph_specs(cfg)[g]                                   # float32 feeds; compare_graphs casts per graph
        feeds = [random_inputs(spec, {**a, "batch": 1}, np.random.default_rng(100 + i), sam_size=_sam_size(cfg))
                 for i, a in enumerate(SHAPES)]
        report["graphs"][g] = compare_graphs(reference / f"{g}.onnx", tmp / graphs[g]["file"], feeds)
        worst = min(v["cosine"] for v in report["graphs"][g].values())
        _log(f"[nxc-export] {g}: cosine vs fp32 >= {worst:.5f}")
    return report


def _family_options(config, options: ExportOptions) -> ExportOptions:
    """`options` with its graphs resolved for the model's family: all of them by default; refused when a graph
    named belongs to the other family."""
    from dataclasses import replace
    own = names.family_graphs(config.grounding)
    if not options.graphs:
        return replace(options, graphs=own)
    other = [g for g in options.graphs if g not in own]
    if other:
        raise ExportError(f"graph {other[0]!r} is not part of a {config.grounding} model; its graphs are "
                          f"{', '.join(own)}")
    return options


def _check_options(options: ExportOptions) -> None:
    if options.precision not in PRECISIONS:
        raise ExportError(f"precision {options.precision!r} is not available; choose one of {PRECISIONS}")
    unknown = [g for g in options.graphs if g not in names.ALL_GRAPHS]
    if unknown:
        raise ExportError(f"unknown graph {unknown[0]!r}; the graphs are {', '.join(names.ALL_GRAPHS)}")


def _lint_summary(findings: dict) -> str:
    """A graph's TensorRT lint in its progress line (the manifest records all of it)."""
    if findings["ok"]:
        return "TensorRT lint ok"
    n = findings["problem_count"]
    more = f" (+{n - 1} more in the manifest)" if n > 1 else ""
    return f"TensorRT lint: {n} problem(s): {findings['problems'][0]}{more}"


def _peak() -> str:
    """", peak RSS so far x GB" for a progress line (ru_maxrss of this process: what a machine must have)."""
    import resource
    return f", peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB"


def _graph_mb(tmp: Path, record: dict) -> float:
    return sum((tmp / f).stat().st_size for f in [record["file"], *record["external_data"]]) / 1e6


def _export_graphs(model, llm_weights: LlmWeights, tmp: Path, specs: dict, options: ExportOptions,
                   accuracy: dict) -> dict:
    """Per graph: export, TensorRT lint, ONNX Runtime parity against torch, one progress line each; writes
    reports/parity.json and returns the manifest's per-graph records. The llm is written by nxc.export.llm_writer
    in the build's precision and checked by nxc.export.llm_check (its accuracy against float32 goes to
    `accuracy`)."""
    import onnx

    from nxc.export.parity import check_graph
    from nxc.export.trt_lint import lint

    cfg, n = model.config, len(options.graphs)
    quantized = options.precision in ("int8", "int4")                # linted again once quantized
    (tmp / "graphs").mkdir()
    (tmp / "reports").mkdir()
    graphs, parity = {}, {}
    for i, g in enumerate(options.graphs, 1):
        tg = time.perf_counter()
        _log(f"[nxc-export] [{i}/{n}] {g}: exporting")
        if g == names.GRAPH_LLM:
            graphs[g], parity[g] = _write_llm(llm_weights, cfg, tmp, specs[g], options, f"[{i}/{n}]", accuracy)
            _log(f"[nxc-export] [{i}/{n}] {g}: {_graph_mb(tmp, graphs[g]):.1f} MB, "
                 f"{_lint_summary(graphs[g]['tensorrt_lint'])}, {time.perf_counter() - tg:.1f} s{_peak()}")
            continue
        parts = getattr(model, "parts", None)          # modules made real for this graph only (nxc.model.parts)
        if parts is not None:
            parts.load(g)
        wrapper = wrapper_for(model, g, options)
        path = tmp / "graphs" / f"{g}.onnx"
        external = export_graph(wrapper, specs[g], cfg, path, options)
        findings = lint(onnx.load(str(path), load_external_data=False))
        graphs[g] = {"file": f"graphs/{g}.onnx", "external_data": [f"graphs/{e}" for e in external],
                     "precision": options.precision_of(g), "opset": options.opset, **specs[g].to_dict(),
                     "tensorrt_lint": findings}
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
        lint_msg = "fp32 before quantization" if quantized else _lint_summary(findings)
        _log(f"[nxc-export] [{i}/{n}] {g}: {_graph_mb(tmp, graphs[g]):.1f} MB, {lint_msg}, "
             f"{time.perf_counter() - tg:.1f} s{_peak()}")
    (tmp / "reports" / "parity.json").write_text(json.dumps(parity, indent=2) + "\n")
    return graphs


def _write_llm(llm_weights: LlmWeights, cfg, tmp: Path, spec: GraphSpec, options: ExportOptions, step: str,
               accuracy: dict) -> tuple[dict, dict]:
    """The llm graph written in the build's precision from the checkpoint (one tensor at a time), linted, and
    checked against transformers' layers streamed from the same checkpoint. Returns (manifest record, parity)."""
    import onnx

    from nxc.export.llm_check import check_llm
    from nxc.export.llm_writer import WeightError, write_llm_graph
    from nxc.export.trt_lint import lint

    path = tmp / "graphs" / "llm.onnx"
    prec = options.precision
    try:
        external = write_llm_graph(
            llm_weights.source, cfg.llm, path, spec, precision=prec, opset=options.opset,
            inline_bytes=LLM_INLINE_BYTES, doc=f"nxc {__version__} graph llm ({prec})",
            log=lambda i, n, msg: _log(f"[nxc-export] {step} llm: layer {i}/{n}, {msg}"))
    except WeightError as e:
        raise ExportError(f"llm: {e}") from None
    record = {"file": "graphs/llm.onnx", "external_data": [f"graphs/{e}" for e in external],
              "precision": prec, "opset": options.opset, **spec.to_dict(),
              "tensorrt_lint": lint(onnx.load(str(path), load_external_data=False))}
    if prec in ("int8", "int4"):
        bits = 8 if prec == "int8" else 4
        record["precision"] = f"int{bits}-weight-only"
        record["quantization"] = {"scheme": f"MatMulNBits, {bits}-bit symmetric, block 32, accuracy_level 4"}
    if not options.parity:
        return record, {}
    _log(f"[nxc-export] {step} llm: checking against transformers' layers streamed from the checkpoint")
    kv = np.float16 if spec.inputs[3].dtype == "float16" else np.float32
    report = check_llm(path, llm_weights.reference(prec), cfg.llm, precision=prec, kv_dtype=kv,
                       accuracy_reference=llm_weights.reference("fp32") if prec != "fp32" else None,
                       log=lambda m: _log(f"[nxc-export] {step} llm: {m}"))
    if prec != "fp32":
        accuracy[names.GRAPH_LLM] = report.pop("accuracy")
    if not report["ok"]:
        bad = {r["run"]: (r["worst"], f"{r['worst_rel_l2']:.3g}") for r in report["checks"] if not r["ok"]}
        raise ExportError(f"graph llm does not match transformers' LLaMA layers built from the checkpoint "
                          f"(relative L2 error above {report['tolerance_rel_l2']}): {bad}; the weights were mapped "
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
            kept = {n: getattr(model, n) for n in ("proposal_net", "object_encoder") if hasattr(model, n)}
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
        accuracy = _accuracy_vs_fp32(reference, tmp, graphs, specs, cfg)
        shutil.rmtree(reference)
    if options.precision in ("int8", "int4"):
        from nxc.export.quantized import quantize_build
        accuracy = quantize_build(tmp, out, model, tokenizer, options, graphs, embedded=embedded, log=_log)
        for g, rec in graphs.items():                   # the lint of what ships: the quantized graphs
            _log(f"[nxc-export] {g}: {rec['precision']}, {_graph_mb(tmp, rec):.1f} MB, "
                 f"{_lint_summary(rec['tensorrt_lint'])}")
    if accuracy is not None and llm_accuracy:
        accuracy["graphs"].update(llm_accuracy)
    if accuracy is not None:
        (tmp / "reports" / "accuracy.json").write_text(json.dumps(accuracy, indent=2) + "\n")
    np.save(tmp / "embeddings.npy", llm_weights.source.numpy("model.embed_tokens.weight", np.float32))
    body = manifest_body(model, tokenizer, options, max_context, source)
    body["graphs"] = graphs
    write_manifest(tmp, body)
    try:
        load_manifest(tmp, verify=False)            # a build whose manifest would not load is never published
    except BuildError as e:
        raise ExportError(f"the manifest written does not load (a bug in nxc-export): {e}") from None
