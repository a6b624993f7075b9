"""Quantize an exported fp32 build's graphs (DESIGN "Precisions").

    calibration images + prompts ─▶ reference model (torch) ─▶ inputs of vision, sam_encoder, loc_heads
                                                                 │ (loc_heads: trigger hiddens of real replies)
    fp32 graph ─ ONNX Runtime calibrator (minmax | entropy | percentile) ─▶ ranges ─▶ calib/<graph>.json
               ─ quantize_static (QDQ, symmetric int8, per-channel weights) ─▶ int8 graph (ORT CPU and TensorRT)
    loc_heads ─ int8 weights behind DequantizeLinear, float activations (see quantize_weights_int8)
    fp32 llm ─ MatMulNBits weight-only (8 or 4 bits, blocks of 32 along K, symmetric) ─▶ int8 / int4 llm
    sam_decoder stays fp32 (small, and its mask logits are thresholded at 0).

Symmetric int8 with zero points of 0 is what TensorRT's explicit quantization takes; the same QDQ graph runs in
ONNX Runtime. The calibration cache is ONNX Runtime's own JSON (quantize_static(calibration_cache_path=...)):
present -> no calibration inference; the exporter keeps it only while graphs, data and method are unchanged.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np

from nxc import names
from nxc.calib.data import CalibrationError

METHODS = ("minmax", "entropy", "percentile")
STATIC_GRAPHS = (names.GRAPH_VISION, names.GRAPH_SAM_ENCODER)      # QDQ with calibrated activation ranges
WEIGHT_ONLY_GRAPHS = (names.GRAPH_LOC_HEADS,)                         # int8 weights, float activations
BLOCK_SIZE = 32


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs advice and per-tensor notes on the root logger; nxc prints its own progress."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def collect_feeds(model, tokenizer, images, prompts, *, log=print, detections: bool = True) -> dict[str, list[dict]]:
    """Graph inputs: pixels for the encoders, and (for loc_heads' accuracy report) the trigger hiddens and boxes
    of the reference's replies, one detection per feed; a prompt without detections adds none."""
    import torch

    from nxc.model import processing
    from nxc.model.reference import ReferenceChat
    from nxc.prompt import PromptError
    from nxc.runtime import preprocess as pp

    cfg = model.config
    clip = processing.clip_preprocess_of(model)       # the CLIP directory's preprocessor config, when it has one
    detections = detections and cfg.sam is not None  # loc_heads' feeds: a regression model's replies
    ref = ReferenceChat(model=model, tokenizer=tokenizer) if detections else None
    feeds: dict[str, list[dict]] = {g: [] for g in STATIC_GRAPHS + WEIGHT_ONLY_GRAPHS}
    for i, im in enumerate(images):
        feeds[names.GRAPH_VISION].append({"pixel_values": pp.clip_pixels(im, clip.size, mean=clip.mean, std=clip.std,
                                                                         resample=clip.resample)})
        if cfg.sam is not None:
            feeds[names.GRAPH_SAM_ENCODER].append({"image": pp.sam_pixels(im, cfg.sam.image_size)})
        if detections:
            prompt = prompts[i % len(prompts)]
            try:
                with torch.no_grad():
                    g = ref.chat(im, prompt, max_new_tokens=32, iou_threshold=None).generation
            except PromptError as e:
                raise CalibrationError(f"calibration prompt {prompt!r}: {e}") from None
            hid = g.trigger_hidden.detach().float().numpy()
            boxes = np.clip(g.boxes.detach().float().numpy(), 0, 1).astype(np.float32)
            for k in range(len(hid)):   # one detection per feed: histogram calibrators stack same-shape arrays
                feeds[names.GRAPH_LOC_HEADS].append({"hidden": hid[k:k + 1], "boxes": boxes[k:k + 1]})
        if (i + 1) % 8 == 0 or i + 1 == len(images):
            log(f"[nxc-export] calibration inputs: {i + 1}/{len(images)} images")
    return feeds


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over a list of feeds; `log(message)` before each one."""

    def __init__(self, feeds: list[dict], log=None):
        self._it, self._n, self._i, self._log = iter(feeds), len(feeds), 0, log

    def get_next(self):
        item = next(self._it, None)
        if item is not None and self._log is not None:
            self._i += 1
            self._log(f"calibration run {self._i}/{self._n}")
        return item

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


INLINE_BYTES = 1 << 30      # an int8 graph whose weights exceed this is written with external data (as the exporter)


def _external_files(path: Path) -> list[str]:
    """Names of the external-data files a graph's .onnx points to (read without the data)."""
    import onnx
    locations = {e.value for t in onnx.load(str(path), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    return sorted(locations)


def _weight_bytes(path: Path) -> int:
    """Bytes of a graph's weights: the .onnx plus its external data files."""
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in _external_files(path))


def _calibrate(src: Path, feeds: list[dict], calib, cache: Path, log=None) -> None:
    """The ranges quantize_static measures itself (same calibrator, operator types and options), measured first and
    written to `cache` in ONNX Runtime's format, so that quantize_static (cache hit) never holds its copy of the
    graph together with the calibration's. Two changes to how the calibrator runs, none to what it computes:

        create_calibrator ─▶ augmented graph (external data when src has it) + session ─ drop its loaded graph
          ─▶ the same session in priority order ─▶ collect_data ─▶ ranges ─▶ cache
    The calibrator's session runs the augmented graph in ONNX Runtime's default order, where the ReduceMin /
    ReduceMax nodes it adds run late and every activation they read stays alive until then (CLIP ViT-L: +4.4 GB,
    SAM ViT-H: over 11 GB); in priority order (the graph's node order: each reduction next to its tensor) an
    activation is freed as in the plain graph. Min and max do not depend on the order."""
    import gc
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    ops = list(set(list(QLinearOpsRegistry.keys()) + list(QDQRegistry.keys())))     # quantize_static's default
    with tempfile.TemporaryDirectory(prefix=".nxc-calib-", dir=cache.parent) as tmp:
        calibrator = create_calibrator(Path(src), ops, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=calib, use_external_data_format=bool(_external_files(src)))
        calibrator.model = None                  # its loaded copy of the graph: only __init__ and augment_graph read it
        calibrator.infer_session = None
        gc.collect()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL       # as the calibrator's own
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        calibrator.infer_session = ort.InferenceSession(calibrator.augmented_model_path, so,
                                                        providers=calibrator.execution_providers)
        calibrator.collect_data(_Reader(feeds, log))
        ranges = calibrator.compute_data()
        del calibrator
        gc.collect()
    save_tensors_data(ranges, cache)


def quantize_static_graph(src: Path, dst: Path, feeds: list[dict] | None, *, method: str, cache: Path,
                          inline_bytes: int = INLINE_BYTES, log=None) -> list[str]:
    """QDQ int8 of `src` into `dst`; ranges from `cache` if it exists, else calibrated on `feeds` and cached.
    Returns the external-data file names written beside `dst` ([] when its weights, about a quarter of src's,
    are under `inline_bytes`; else [dst.name + ".data"]).

        src (+ src.data) ─ _calibrate: augmented graph, session in priority order ─▶ ranges ─▶ cache (freed)
                         ─ quantize_static (cache hit) ─▶ dst (+ dst.data)
    Memory: the larger of the calibration (its session and one run's live activations) and the quantization (the
    graph once plus its int8 weights), never both: SAM ViT-H (2.5 GB) peaks at 7.8 GB, where one quantize_static
    call went over 11. entropy and percentile keep every calibrated activation of every image (ONNX Runtime's
    histogram calibrators): tens of GB at SAM ViT-H, where only minmax fits a machine of this size."""
    import gc

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from nxc.memory import mmap_large_allocations
    mmap_large_allocations()              # what the calibration frees goes back to the OS before quantize_static
    if method not in METHODS:
        raise CalibrationError(f"--calib-method must be one of {', '.join(METHODS)}, got {method!r}")
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    external = _weight_bytes(src) / 4 > inline_bytes
    data = dst.parent / (dst.name + ".data")
    if external and data.exists():
        if data.resolve() in {(src.parent / f).resolve() for f in _external_files(src)}:
            raise CalibrationError(f"{dst}: its external data {data.name} would overwrite {src}'s; write the int8 "
                                   "graph to another folder or name")
        data.unlink()              # onnx appends to an existing data file
    with _quiet():
        if not cache.is_file():
            _calibrate(src, feeds or [], calib, cache, log)
        gc.collect()
        if log is not None:
            log("writing the int8 QDQ graph")
        quantize_static(str(src), str(dst), None, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=calib,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
                        calibration_cache_path=str(cache), use_external_data_format=external)
    return [data.name] if external else []


def quantize_llm_weights(src: Path, dst: Path, *, bits: int, external_data: bool) -> None:
    """Weight-only MatMulNBits (com.microsoft) of every MatMul with a constant weight: blocks of BLOCK_SIZE along
    K, symmetric, activations quantized to int8 inside the kernel (accuracy_level 4, ORT's fast CPU path)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    cfg = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=4, bits=bits)
    with _quiet():
        q = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=cfg)
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=external_data)


def _run_all(path: Path, feeds: list[dict], log=None, what: str = "") -> tuple[list[str], list[list[np.ndarray]]]:
    """(output names, outputs per feed) of one graph in ONNX Runtime; the session is gone when this returns. Each
    graph gets its inputs in the dtype it declares (an fp16 build keeps its KV cache in float16)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_cpu_mem_arena = False           # runs one after another: an arena would grow with each feed's layout
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    types = {i.name: np.float16 if i.type == "tensor(float16)" else None for i in sess.get_inputs()}
    outs = []
    for i, f in enumerate(feeds):
        if log is not None:
            log(f"accuracy check, {what} run {i + 1}/{len(feeds)}")
        outs.append([np.array(o, copy=True)   # a run's arrays keep its session's arena alive; copies do not
                     for o in sess.run(None, {k: v.astype(types[k]) if types.get(k) is not None else v
                                              for k, v in f.items()})])
    return [o.name for o in sess.get_outputs()], outs


def compare_graphs(ref_path: Path, test_path: Path, feeds: list[dict], log=None) -> dict:
    """Per output: cosine similarity and max abs error of `test_path` against `ref_path` over `feeds`. One session
    at a time (the reference's outputs are kept, never two graphs' weights): a 2.5 GB SAM ViT-H encoder against its
    int8 or fp16 version fits where both would not."""
    import gc

    from nxc.memory import mmap_large_allocations
    mmap_large_allocations()
    names_out, ref = _run_all(ref_path, feeds, log, "reference")
    gc.collect()
    _, test = _run_all(test_path, feeds, log, "quantized")
    acc: dict[str, dict] = {n: {"dot": 0.0, "aa": 0.0, "bb": 0.0, "max_abs": 0.0} for n in names_out}
    for xs, ys in zip(ref, test):
        for n, x, y in zip(names_out, xs, ys):
            x, y = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
            s = acc[n]
            s["dot"] += float(x @ y)
            s["aa"] += float(x @ x)
            s["bb"] += float(y @ y)
            s["max_abs"] = max(s["max_abs"], float(np.abs(x - y).max()) if x.size else 0.0)
    # two all-zero outputs are the same output (cosine 1): e.g. a projector whose last weight is zero
    return {n: {"cosine": 1.0 if s["aa"] == s["bb"] == 0 else s["dot"] / max(1e-30, np.sqrt(s["aa"] * s["bb"])),
                "max_abs": s["max_abs"]} for n, s in acc.items()}


def quantize_weights_int8(src: Path, dst: Path, *, external_data: str | None = None) -> int:
    """Weight-only int8 in standard ONNX: every constant 2-D weight of a MatMul / Gemm becomes int8 (symmetric,
    one scale per output channel) behind a DequantizeLinear; activations stay float. Returns the weights changed.

        W float [N,K] ──▶ W_q int8 [N,K] + scale [N] ─ DequantizeLinear(axis 0) ─▶ Gemm(transB=1)

    Used for loc_heads: its input is the LLM's final-norm hidden state, whose few large channels make one
    per-tensor activation scale too coarse for box regression (static int8 cost 3 points of REC mean IoU), and for
    the generator's denoiser. `external_data`: a file name beside `dst` that takes the weights (one file, onnx's
    layout), for a graph whose float weights left beside the int8 ones pass protobuf's 2 GB (an SD-1.5 UNet's
    convolutions stay float32: 2.4 GB)."""
    import onnx
    from onnx import helper, numpy_helper
    model = onnx.load(str(src))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    done: dict[str, str] = {}
    new_nodes = []
    for n in g.node:
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits:
            w_name = n.input[1]
            w = numpy_helper.to_array(inits[w_name])
            if w.ndim == 2 and w.dtype == np.float32:
                if w_name not in done:
                    trans_b = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
                    axis = 0 if trans_b else 1                          # the output-channel axis of B
                    scale = np.abs(w).max(axis=1 - axis) / 127.0
                    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
                    shape = (-1, 1) if axis == 0 else (1, -1)
                    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
                    g.initializer.remove(inits[w_name])
                    g.initializer.extend([numpy_helper.from_array(q, w_name + "_q"),
                                          numpy_helper.from_array(scale, w_name + "_scale"),
                                          numpy_helper.from_array(np.zeros(scale.shape, np.int8), w_name + "_zp")])
                    new_nodes.append(helper.make_node("DequantizeLinear", [w_name + "_q", w_name + "_scale",
                                                                          w_name + "_zp"], [w_name + "_dq"],
                                                      name=w_name + "_DequantizeLinear", axis=axis))
                    done[w_name] = w_name + "_dq"
                n.input[1] = done[w_name]
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    if external_data is None:
        onnx.checker.check_model(model)
        onnx.save_model(model, str(dst))
    else:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external_data, size_threshold=1024)
        onnx.checker.check_model(str(dst))             # by path: the loaded model may pass 2 GB
    return len(done)
