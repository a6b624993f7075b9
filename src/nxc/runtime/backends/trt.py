"""Native TensorRT backend: serialized engines (built by `nxc-build`) run with the tensorrt and cuda-python
packages, no torch. Engines live in <build>/engines/<gpu>-trt<version>/<graph>.plan with engine.json beside them
(TensorRT version, GPU name, compute capability); a mismatch is refused with what to rebuild.

TensorRT 10 name-based API: set_input_shape / set_tensor_address per I/O tensor, execute_async_v3 on a stream.
Device buffers grow as needed and are reused across calls. The llm's KV cache is allocated here in device memory
(CudaMemory) and bound by address (run_cached): a decode step moves no cache bytes across the bus.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nxc.runtime.backends import BackendError
from nxc.specs import GraphSpec


JETSON_RELEASE = Path("/etc/nv_tegra_release")


def install_hint(what: str, *, jetson: bool | None = None) -> str:
    """How to install TensorRT's bindings ("tensorrt") or cuda-python ("cuda-python") here. On a Jetson TensorRT
    comes from JetPack (apt), never pip, and a venv sees it only with --system-site-packages."""
    jetson = JETSON_RELEASE.exists() if jetson is None else jetson
    if not jetson:
        return "pip install 'nxc[trt]'"
    if what == "tensorrt":
        return ("on a Jetson: sudo apt install python3-libnvinfer (JetPack), in a venv made with "
                "`python3 -m venv --system-site-packages`")
    return "on a Jetson: pip install 'cuda-python>=12,<13' (JetPack 6's CUDA 12; not nxc[trt], which asks pip for tensorrt)"


def _cudart():
    try:
        from cuda.bindings import runtime as cudart      # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart                          # older cuda-python
        except ImportError:
            raise BackendError(f"the tensorrt backend needs cuda-python: {install_hint('cuda-python')}") from None
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


def gpu_identity() -> dict:
    """{"name", "compute_capability"} of device 0; BackendError when there is no usable GPU."""
    cudart = _cudart()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        raise BackendError("the tensorrt backend needs an NVIDIA GPU; none is visible here (use --backend onnxruntime)")
    props = _check(cudart.cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}"}


def engine_mismatch(info: dict, *, tensorrt: str, gpu: dict, meta: Path, build: Path) -> str | None:
    """Why engines described by `info` (engine.json) cannot run here, or None. Pure logic (no TensorRT needed)."""
    if info.get("tensorrt") != tensorrt or info.get("compute_capability") != gpu["compute_capability"]:
        return (f"{meta}: engines were built for TensorRT {info.get('tensorrt')} on {info.get('gpu', 'a GPU')} "
                f"(compute capability {info.get('compute_capability')}); this is TensorRT {tensorrt} on {gpu['name']} "
                f"({gpu['compute_capability']}). Rebuild them here with `nxc-build {build}`")
    return None


class _DeviceBuffer:
    def __init__(self, cudart):
        self.cudart, self.ptr, self.nbytes = cudart, 0, 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            if self.ptr:
                _check(self.cudart.cudaFree(self.ptr))
            self.ptr, self.nbytes = _check(self.cudart.cudaMalloc(max(nbytes, 1))), max(nbytes, 1)
        return self.ptr

    def __del__(self):
        if self.ptr:
            self.cudart.cudaFree(self.ptr)


class CudaMemory:
    """KV-cache buffers in device memory (cudaMalloc, zeroed), freed with their owner."""
    device = "cuda"

    def __init__(self, cudart):
        self.cudart = cudart

    def allocate(self, shape: tuple[int, ...], dtype) -> tuple[object, int]:
        buf = _DeviceBuffer(self.cudart)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        ptr = buf.ensure(nbytes)
        _check(self.cudart.cudaMemset(ptr, 0, nbytes))
        return buf, ptr


class TrtRunner:
    def __init__(self, engine, spec: GraphSpec, cudart, trt):
        self.engine, self.spec, self.cudart, self.trt = engine, spec, cudart, trt
        self.context = engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        self.buffers = {t.name: _DeviceBuffer(cudart) for t in spec.inputs + spec.outputs}

    def _inputs(self, feeds: dict[str, np.ndarray]) -> None:
        """Host arrays -> this runner's device buffers (async on its stream), shapes and addresses set."""
        cudart, ctx = self.cudart, self.context
        for name, x in feeds.items():
            x = np.ascontiguousarray(x, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))
            ctx.set_input_shape(name, x.shape)
            ptr = self.buffers[name].ensure(x.nbytes)
            if x.nbytes:
                _check(cudart.cudaMemcpyAsync(ptr, x.ctypes.data, x.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
            ctx.set_tensor_address(name, ptr)

    def _execute(self, outputs: list[str]) -> dict[str, np.ndarray]:
        """Run with `outputs` in this runner's buffers, copied back to host arrays."""
        cudart, ctx = self.cudart, self.context
        outs = {}
        for name in outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            out = np.empty(shape, self.trt.nptype(self.engine.get_tensor_dtype(name)))
            ctx.set_tensor_address(name, self.buffers[name].ensure(out.nbytes))
            outs[name] = out
        if not ctx.execute_async_v3(self.stream):
            raise BackendError(f"TensorRT failed to run graph {self.spec.name}")
        for name, out in outs.items():
            if out.nbytes:
                _check(cudart.cudaMemcpyAsync(out.ctypes.data, self.buffers[name].ptr, out.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return outs

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._inputs({t.name: feeds[t.name] for t in self.spec.inputs})
        return self._execute(self.spec.output_names)

    def run_cached(self, embeds: np.ndarray, cache) -> dict[str, np.ndarray]:
        """The llm graph with its past inputs and present outputs at addresses inside the device-resident cache
        (rows [0,P) and [P,P+T)): only the embedding row, mask and positions go up, logits and hidden come down."""
        if cache.device != "cuda":
            raise BackendError("the tensorrt backend needs its KV cache in device memory: create it with "
                               "Pipeline.new_cache (the backend's kv_memory)")
        ctx, p, t = self.context, cache.length, embeds.shape[1]
        self._inputs(cache.step_inputs(embeds))
        for past, present in cache.pairs:
            ctx.set_input_shape(past, cache.shape(p))
            ctx.set_tensor_address(past, cache.address(past, 0))
            ctx.set_tensor_address(present, cache.address(past, p))
        out = self._execute([n for n in self.spec.output_names if not n.startswith("present")])
        cache.advance(t)
        return out


class TrtBackend:
    name = "tensorrt"

    def __init__(self, *, engine_dir: Path | None = None):
        try:
            import tensorrt as trt
        except ImportError:
            raise BackendError(f"the tensorrt backend needs TensorRT's Python package: {install_hint('tensorrt')} "
                               "(or use --backend onnxruntime)") from None
        self.trt, self.cudart = trt, _cudart()
        self.gpu = gpu_identity()
        self.engine_dir = Path(engine_dir) if engine_dir else None
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.kv_memory = CudaMemory(self.cudart)

    def engine_folder(self, build: Path) -> Path:
        """engines/<gpu>-trt<version>/ for this GPU and TensorRT; BackendError naming what to rebuild."""
        folder = self.engine_dir or build / "engines" / f"{self.gpu['name'].replace(' ', '_')}-trt{self.trt.__version__}"
        meta = folder / "engine.json"
        if not meta.is_file():
            have = sorted(p.name for p in (build / "engines").glob("*")) if (build / "engines").is_dir() else []
            raise BackendError(f"{folder}: no TensorRT engines for {self.gpu['name']} with TensorRT {self.trt.__version__}"
                               f" (found: {have or 'none'}); run `nxc-build {build}` on this machine")
        try:
            info = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BackendError(f"{meta}: unreadable ({e}); rebuild the engines with `nxc-build {build}`") from None
        why = engine_mismatch(info, tensorrt=self.trt.__version__, gpu=self.gpu, meta=meta, build=build)
        if why:
            raise BackendError(why)
        return folder

    def load(self, path: Path, spec: GraphSpec) -> TrtRunner:
        """`path` is the graph's .onnx in the build; its engine is engines/<...>/<graph>.plan."""
        build = Path(path).parent.parent
        plan = self.engine_folder(build) / f"{spec.name}.plan"
        if not plan.is_file():
            raise BackendError(f"{plan}: missing; run `nxc-build {build}`")
        engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise BackendError(f"{plan}: TensorRT could not deserialize it; rebuild it with `nxc-build {build}`")
        return TrtRunner(engine, spec, self.cudart, self.trt)
