"""Every export ends with a check run: each graph in ONNX Runtime against its torch wrapper, on fresh random
inputs at two shapes (one for a graph without dynamic axes, sam_encoder). The result goes to reports/parity.json in
the build; a graph that cannot run fails the export loudly.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np
import torch

from nxc.specs import GraphSpec

# (axis lengths) per check; the two shapes differ in every dynamic axis a graph has
SHAPES = ({"batch": 1, "sequence": 5, "past": 0, "detections": 1, "boxes": 2},
          {"batch": 2, "sequence": 1, "past": 7, "detections": 3, "boxes": 1})
OFFLOAD_BYTES = 256 << 20      # a wrapper with more weights than this waits on disk while ONNX Runtime runs
# |ort - torch| <= atol * max(1, max|torch|) + rtol * |torch|: fp16 rounding is relative to the tensor's scale
TOLERANCE = {"fp32": {"rtol": 1e-4, "atol": 1e-4}, "fp16": {"rtol": 1e-2, "atol": 1e-2}}


def random_inputs(spec: GraphSpec, axes: dict[str, int], rng: np.random.Generator, *,
                  sam_size: int = 1024) -> dict[str, np.ndarray]:
    """Inputs that respect each tensor's meaning: masks of ones, consecutive positions, valid boxes."""
    axes = {**axes, "total": axes.get("past", 0) + axes.get("sequence", 1)}
    feeds = {}
    for t in spec.inputs:
        shape = t.resolve(axes)
        if t.name == "attention_mask":
            x = np.ones(shape, np.int64)
        elif t.name == "indices":                                              # places in an object list
            x = (np.arange(shape[0]) * 7 % 100).astype(np.int64)
        elif t.name == "position_ids":
            x = np.broadcast_to(np.arange(axes["past"], axes["past"] + shape[1], dtype=np.int64), shape).copy()
        elif t.name == "input_ids":                      # a CLIP tokenizer's ids: its 256 byte symbols exist in any
            x = rng.integers(0, 256, shape).astype(np.int64)
        elif t.name == "timestep":                                          # a diffusion step, 0..999
            x = rng.uniform(0, 1000, shape).astype(np.float32)
        elif t.name == "boxes":
            xy = np.sort(rng.uniform(0, 1, (*shape[:-1], 2, 2)), axis=-2)  # [..., corner, (x,y)]: x1<x2, y1<y2
            x = xy.reshape(shape)                                            # x1 y1 x2 y2
            x = (x * (sam_size if spec.name == "sam_decoder" else 1)).astype(np.float32)
        elif t.name == "is_region":                                          # a slot's box is a user region
            x = rng.integers(0, 2, shape).astype(np.int64)
        elif t.name in ("object_mask", "grounding"):                       # GLIGEN: slots in use, fuser on / off
            x = rng.integers(0, 2, shape).astype(np.float32)
        elif t.name == "pixels" and spec.name == "latent_encoder":          # RGB in [0, 1]
            x = rng.uniform(0, 1, shape).astype(np.float32)
        else:
            x = rng.standard_normal(shape).astype(t.dtype)
        feeds[t.name] = x
    return feeds


def compare(torch_out: list[np.ndarray], ort_out: list[np.ndarray], names: list[str], precision: str) -> dict:
    tol = TOLERANCE[precision]
    out, ok = {}, True
    for name, a, b in zip(names, torch_out, ort_out):
        if a.shape != b.shape:
            out[name] = {"ok": False, "error": f"shape {b.shape} from ONNX Runtime, {a.shape} from torch"}
            ok = False
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        err = np.abs(a64 - b64)
        scale = max(1.0, float(np.abs(a64).max())) if a64.size else 1.0
        close = bool(np.all(err <= tol["atol"] * scale + tol["rtol"] * np.abs(a64)))
        ok &= close
        out[name] = {"ok": close, "max_abs": float(err.max()) if err.size else 0.0,
                     "max_rel": float((err / (np.abs(a64) + 1e-6)).max()) if err.size else 0.0}
    return {"ok": ok, "outputs": out, **tol}


def _checked_axes(spec: GraphSpec, axes: dict[str, int]) -> dict[str, int]:
    """The axis lengths a check of `spec` runs at: SAM's graphs and loc_heads take one image / batch 1; only the
    axes the graph's tensors use."""
    if spec.name in ("sam_encoder", "sam_decoder", "loc_heads"):
        axes = {**axes, "batch": 1}
    return {k: v for k, v in axes.items() if any(k in t.shape for t in spec.inputs + spec.outputs)}


@contextlib.contextmanager
def weights_on_disk(module: torch.nn.Module, folder):
    """For the duration, `module`'s parameters and buffers live in files in `folder` and their memory is released;
    they come back bit for bit (same Parameter objects) when the block ends, also on an error. Tensors that share
    or view storage with another are left in memory. SAM ViT-H: 2.5 GB the check's ONNX Runtime half does not hold
    twice."""
    moved, seen = [], set()
    for t in list(module.parameters()) + list(module.buffers()):
        s = t.untyped_storage()
        whole = t.is_contiguous() and t.storage_offset() == 0 and s.nbytes() == t.numel() * t.element_size()
        if not whole or s.data_ptr() in seen or t.numel() == 0:
            seen.add(s.data_ptr())
            continue
        seen.add(s.data_ptr())
        path = Path(folder) / f"{len(moved)}.bin"
        t.detach().reshape(-1).view(torch.uint8).numpy().tofile(path)
        moved.append((t, path, t.dtype, t.shape))
        t.data = torch.empty(0, dtype=t.dtype)
    try:
        yield len(moved)
    finally:
        for t, path, dtype, shape in moved:
            t.data = torch.from_numpy(np.fromfile(path, np.uint8)).view(dtype).reshape(shape)
            path.unlink()


class HalfProductsInFloat(torch.overrides.TorchFunctionMode):
    """Within it, matrix products and convolutions of float16 CPU tensors compute in float32 and round the result to
    float16: what a GPU's fp16 GEMM does (float32 accumulation) and what ONNX Runtime's CPU provider does with an
    fp16 graph (casts around float32 kernels). torch's own fp16 GEMM on an x86 CPU is about 200x slower than float32
    (here 66 s against 0.31 s for a 4096x1280 @ 1280x5120 product): SAM ViT-H's fp16 reference run took 11 minutes
    of the check. Elementwise ops, norms and softmax keep their float16 (or float32) semantics. `hits` counts the
    calls it took over."""

    PRODUCTS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.addmm,
                torch.baddbmm, torch.einsum, torch.nn.functional.linear, torch.nn.functional.conv2d,
                torch.nn.functional.conv_transpose2d, torch.nn.functional.scaled_dot_product_attention)

    def __init__(self):
        super().__init__()
        self.hits = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten, tree_map
        kwargs = kwargs or {}
        if func not in self.PRODUCTS or not any(_half_cpu(t) for t in tree_flatten((args, kwargs))[0]):
            return func(*args, **kwargs)
        self.hits += 1
        args, kwargs = tree_map(lambda t: t.float() if _half_cpu(t) else t, (args, kwargs))
        return tree_map(lambda t: t.half() if torch.is_tensor(t) and t.dtype == torch.float32 else t,
                        func(*args, **kwargs))


def _half_cpu(t) -> bool:
    return torch.is_tensor(t) and t.dtype == torch.float16 and t.device.type == "cpu"


def check_graph(wrapper: torch.nn.Module, onnx_path, spec: GraphSpec, *, precision: str = "fp32",
                seed: int = 0, sam_size: int = 1024, shapes=SHAPES) -> dict:
    """Run `wrapper` (torch) and the graph at `onnx_path` (ONNX Runtime, CPU) on the same random inputs at each of
    `shapes` and compare (TOLERANCE). A shape that resolves to the same axis lengths as an earlier one is skipped
    (sam_encoder has no dynamic axis: its second shape would only repeat a 1024 px ViT-H run).

        shapes ─ random_inputs ─▶ torch wrapper ─▶ reference outputs (every shape first)
        weights to disk (over OFFLOAD_BYTES) ─▶ ONNX Runtime session ─▶ outputs ─ compare ─▶ weights back
    torch and ONNX Runtime never hold their activations, nor a large graph's weights, at the same time: SAM ViT-H's
    fp32 check peaks at 7.7 GB RSS (over 11 when both were held); fp16 at 9.4 GB, as ONNX Runtime's CPU provider
    runs fp16 through fp32 casts. The fp16 torch reference runs its products in float32 (HalfProductsInFloat)."""
    import gc

    import onnxruntime as ort

    from nxc.memory import mmap_large_allocations
    mmap_large_allocations()
    rng = np.random.default_rng(seed)
    runs, seen = [], []
    for axes in shapes:
        checked = _checked_axes(spec, axes)
        if checked in seen:
            continue
        seen.append(checked)
        feeds = random_inputs(spec, {**axes, **checked}, rng, sam_size=sam_size)
        fast_half = HalfProductsInFloat() if precision == "fp16" else contextlib.nullcontext()
        with torch.no_grad(), fast_half:
            ref = wrapper(*[torch.from_numpy(feeds[n]) for n in spec.input_names])
        runs.append((checked, feeds, [r.numpy() for r in (ref if isinstance(ref, (tuple, list)) else (ref,))]))
    gc.collect()
    big = sum(t.numel() * t.element_size() for t in wrapper.parameters()) > OFFLOAD_BYTES
    with contextlib.ExitStack() as stack:
        if big:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix=".torch-weights-",
                                                                     dir=Path(onnx_path).parent))
            stack.enter_context(weights_on_disk(wrapper, folder))
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        report = {"ok": True, "checks": []}
        for checked, feeds, ref in runs:
            got = sess.run(spec.output_names, feeds)
            res = compare(ref, got, spec.output_names, precision)
            res["axes"] = checked
            report["checks"].append(res)
            report["ok"] &= res["ok"]
        del sess
    return report
