"""ONNX Runtime backend: CPU by default, CUDA / TensorRT execution providers on request.

Inputs are bound over the caller's memory (IO binding): InferenceSession.run would copy every input, which for the
KV cache is a copy of the whole cache per step (measured in nxc.export.llm). The llm graph's past inputs and
present outputs are bound by address into the KV cache (`run_cached`), which lives in host memory for the CPU
provider and in device memory (OrtValues on "cuda") for the CUDA / TensorRT providers: the graph writes the new
rows in place and no step moves the cache.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from nxc import names
from nxc.runtime.backends import BackendError
from nxc.runtime.kv_cache import HostMemory
from nxc.specs import GraphSpec

PROVIDER_FLAGS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def resolve_providers(providers: list[str] | None) -> list[str]:
    """['cuda'] or ['CUDAExecutionProvider'] -> full names, CPU appended last; refuses what is not available."""
    import onnxruntime as ort
    if not providers:
        return ["CPUExecutionProvider"]
    names = [PROVIDER_FLAGS.get(p.lower(), p) for p in providers]
    available = ort.get_available_providers()
    for n in names:
        if n not in available:
            raise BackendError(f"ONNX Runtime provider {n} is not available here (available: {', '.join(available)}); "
                               "install onnxruntime-gpu with CUDA/TensorRT, or use the CPU provider")
    return names + ([] if "CPUExecutionProvider" in names else ["CPUExecutionProvider"])


class DeviceMemory:
    """KV-cache buffers in CUDA device memory, owned by OrtValues (CUDA / TensorRT execution providers)."""
    device = "cuda"

    def allocate(self, shape: tuple[int, ...], dtype) -> tuple[object, int]:
        import onnxruntime as ort
        value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype).type, "cuda", 0)
        return value, value.data_ptr()


class OrtRunner:
    """One graph in one InferenceSession. `run(feeds)` -> {output name: ndarray}; for the llm graph,
    `run_cached(embeds, cache)` -> {"logits", "hidden"} with the cache bound in place."""

    def __init__(self, session, spec: GraphSpec):
        self.session, self.spec = session, spec
        self._ort = __import__("onnxruntime")
        self._dtypes = {t.name: np.dtype(t.dtype) for t in spec.inputs + spec.outputs}
        self._small_outputs = [t for t in spec.outputs if not t.name.startswith("present")]
        # after a prompt's rows (T > 1) the llm session's arena gives back what it took beyond its first chunk:
        # a prefill's activations (about 0.5 GB at 7B with chunks of 256 rows) would otherwise stay reserved
        # through the decode and SAM; one decode step's are kilobytes and stay in the arena
        self._shrink = self._ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        io = self.session.io_binding()
        for t in self.spec.inputs:
            x = feeds[t.name]
            if not x.flags["C_CONTIGUOUS"]:
                x = np.ascontiguousarray(x)
            io.bind_ortvalue_input(t.name, self._ort.OrtValue.ortvalue_from_numpy(x))
        for name in self.spec.output_names:
            io.bind_output(name)
        self.session.run_with_iobinding(io)
        return {n: v.numpy() for n, v in zip(self.spec.output_names, io.get_outputs())}

    def run_cached(self, embeds: np.ndarray, cache) -> dict[str, np.ndarray]:
        """Feed [1,T,H] `embeds` after the cached rows: past bound at rows [0,P), present at [P,P+T) of the cache
        buffers, so the graph writes the new rows where they belong. Advances the cache."""
        bind = cache.bindings.get(self)          # one binding per (graph, conversation): rebound, not rebuilt
        if bind is None:
            bind = cache.bindings[self] = _Binding(self.session, cache.device)
        p, t = cache.length, embeds.shape[1]
        feeds = cache.step_inputs(np.ascontiguousarray(embeds, self._dtypes["inputs_embeds"]))
        for name, x in feeds.items():
            bind.input(name, x.dtype.type, x.shape, x.ctypes.data, on_host=True)
        kv = cache.dtype.type
        for past, present in cache.pairs:
            bind.input(past, kv, cache.shape(p), cache.address(past, 0))
            bind.output(present, kv, cache.shape(t), cache.address(past, p))
        out = {}
        for o in self._small_outputs:              # [1, V] logits and [1, H] hidden: last position only
            out[o.name] = x = np.empty(o.resolve({"batch": 1}), o.dtype)
            bind.output(o.name, x.dtype.type, x.shape, x.ctypes.data, on_host=True)
        self.session.run_with_iobinding(bind.io, self._shrink if t > 1 and cache.device == "cpu" else None)
        cache.advance(t)
        return out


    def run_rows(self, embeds: np.ndarray, batch, rows: int) -> dict[str, np.ndarray]:
        """One decode step of rows 0..rows-1 of a BatchCache (embeds [B,1,H]): the past of all rows bound as one
        [B, stride, kv, D] tensor, masked per row; the present rows go to the batch's scratch and then to each
        row's length. -> {"logits" [B,V], "hidden" [B,H]}."""
        bind = batch.bindings.get(self)
        if bind is None:
            bind = batch.bindings[self] = _Binding(self.session, "cpu")
        feeds = batch.step_inputs(rows, np.ascontiguousarray(embeds, self._dtypes["inputs_embeds"]))
        for name, x in feeds.items():
            bind.input(name, x.dtype.type, x.shape, x.ctypes.data, on_host=True)
        kv, shape = batch.dtype.type, (rows, batch.stride, *batch.row_shape)
        for past, present in batch.pairs:
            bind.input(past, kv, shape, batch.address(past, 0, 0))
            bind.output(present, kv, (rows, 1, *batch.row_shape), batch.scratch[past].ctypes.data)
        out = {}
        for o in self._small_outputs:
            out[o.name] = x = np.empty(o.resolve({"batch": rows}), o.dtype)
            bind.output(o.name, x.dtype.type, x.shape, x.ctypes.data, on_host=True)
        self.session.run_with_iobinding(bind.io)
        batch.write_step(rows)
        return out


class _Binding:
    """An IOBinding whose binds by address reuse one device object each for host and cache memory. ORT's Python
    wrapper makes a new OrtDevice per bind call, which was half of a decode step's Python time (21 binds: 51 us);
    where the wrapper's internals differ (another ORT version), its public calls are used instead."""

    def __init__(self, session, device: str):
        import onnxruntime as ort
        self.io, self.device = session.io_binding(), device
        try:
            self._c = self.io._iobinding
            self._host = ort.OrtDevice.make("cpu", 0)._get_c_device()
            self._cache = ort.OrtDevice.make(device, 0)._get_c_device()
        except AttributeError:
            self._c = None

    def input(self, name, element_type, shape, address, *, on_host=False):
        if self._c is None:
            return self.io.bind_input(name, "cpu" if on_host else self.device, 0, element_type, shape, address)
        self._c.bind_input(name, self._host if on_host else self._cache, element_type, shape, address)

    def output(self, name, element_type, shape, address, *, on_host=False):
        if self._c is None:
            return self.io.bind_output(name, "cpu" if on_host else self.device, 0, element_type, shape, address)
        self._c.bind_output(name, self._host if on_host else self._cache, element_type, shape, address)


_ARENA_LOCK = threading.Lock()
_ARENA: list = []


def _requested_arena() -> None:
    """Register, once per process, ONNX Runtime's shared CPU arena that grows by what is requested (sessions opt in
    with "session.use_env_allocators")."""
    import onnxruntime as ort
    with _ARENA_LOCK:
        if not _ARENA:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))   # no cap, kSameAsRequested
            _ARENA.append(info)


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, *, providers: list[str] | None = None, threads: int | None = None):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise BackendError("the onnxruntime backend needs the onnxruntime package: pip install onnxruntime") from None
        self.providers = resolve_providers(providers)
        self.threads = threads
        on_device = {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(self.providers)
        self.kv_memory = DeviceMemory() if on_device else HostMemory()

    def load(self, path: Path, spec: GraphSpec) -> OrtRunner:
        import onnxruntime as ort
        so = ort.SessionOptions()
        # no busy-waiting between calls: the pipeline alternates five sessions with numpy work, and spinning
        # threads of an idle session steal the cores the next step needs
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # errors only: a GLIGEN denoiser's If branches make ORT's initializer de-duplication print a warning per
        # shared weight at every load ("cannot be safely updated ... in one of the subgraphs"), which is harmless
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads = self.threads
        if spec.name == names.GRAPH_DENOISER:
            # run 20+ times a picture: an arena, grown only by what is asked (kSameAsRequested, not ORT's default
            # doubling). GLIGEN denoiser at 512x512, 2 cores, 2026-12-08: without an arena a grounded step took
            # 19.9-28.3 s (its If branches allocate and page-fault GBs each call), peak 6.42 GB; the default arena
            # 9.3-10.8 s, 7.65 GB; this one 7.5-10.6 s, 6.92 GB (plain steps 4.7-5.4 s in all three)
            _requested_arena()
            so.add_session_config_entry("session.use_env_allocators", "1")
        elif spec.name != names.GRAPH_LLM:
            # a graph run once per image or trigger (vision, sam_encoder, ...): without the arena its activations go
            # back to the OS after the run (SAM ViT-H's are GBs) instead of staying reserved next to the llm
            so.enable_cpu_mem_arena = False
        try:
            sess = ort.InferenceSession(str(path), so, providers=self.providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            if "escapes model directory" in str(e):
                raise BackendError(f"{path}: the graph's external data points outside the build directory; a build "
                                   "may only read its own files. Re-export the build") from None
            raise BackendError(f"{path}: ONNX Runtime cannot load this graph ({str(e).splitlines()[0][:300]}); "
                               "re-export the build") from None
        # names, element types, ranks and fixed dims against the manifest: a swapped graph file with matching hashes
        # (a crafted or hand-edited build) is refused here, not by a wrong answer or a shape error mid-reply. A fixed
        # dim of the graph must be the manifest's; a symbolic one ("?") takes any length.
        for kind, args, tensors in (("input", sess.get_inputs(), spec.inputs),
                                    ("output", sess.get_outputs(), spec.outputs)):
            got, want = [a.name for a in args], [t.name for t in tensors]
            if got != want:
                raise BackendError(f"{path}: graph {kind}s {got} differ from the manifest's {want}; "
                                   "the graph does not belong to this build, re-export it")
            for a, t in zip(args, tensors):
                dtype = {"tensor(float)": "float32", "tensor(double)": "float64"}.get(a.type, a.type)
                dtype = dtype[len("tensor("):-1] if dtype.startswith("tensor(") else dtype
                shape = list(a.shape or [])
                if dtype != t.dtype or len(shape) != len(t.shape) or any(
                        isinstance(g, int) and g != w for g, w in zip(shape, t.shape)):
                    dims = ", ".join(str(g) if isinstance(g, int) else "?" for g in shape)
                    raise BackendError(f"{path}: {kind} {a.name!r} is {dtype} [{dims}] but the manifest says {t.dtype} "
                                       f"[{', '.join(str(w) for w in t.shape)}]; the graph does not belong to this "
                                       "build, re-export it")
        return OrtRunner(sess, spec)
