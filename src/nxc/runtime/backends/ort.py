"""ONNX Runtime backend: CPU by default, CUDA / TensorRT execution providers on request.

Inputs are bound as OrtValues over the caller's numpy memory (IO binding): InferenceSession.run would copy every
input, which for the KV cache is a copy of the whole cache per step (measured in nxc.export.llm).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nxc.runtime.backends import BackendError
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


class OrtRunner:
    """One graph in one InferenceSession. `run(feeds)` -> {output name: ndarray}."""

    def __init__(self, session, spec: GraphSpec):
        self.session, self.spec = session, spec
        self._ort = __import__("onnxruntime")

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


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, *, providers: list[str] | None = None, threads: int | None = None):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise BackendError("the onnxruntime backend needs the onnxruntime package: pip install onnxruntime") from None
        self.providers = resolve_providers(providers)
        self.threads = threads

    def load(self, path: Path, spec: GraphSpec) -> OrtRunner:
        import onnxruntime as ort
        so = ort.SessionOptions()
        # no busy-waiting between calls: the pipeline alternates five sessions with numpy work, and spinning
        # threads of an idle session steal the cores the next step needs
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.threads:
            so.intra_op_num_threads = self.threads
        try:
            sess = ort.InferenceSession(str(path), so, providers=self.providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            if "escapes model directory" in str(e):
                raise BackendError(f"{path}: the graph's external data points outside the build directory; a build "
                                   "may only read its own files. Re-export the build") from None
            raise BackendError(f"{path}: ONNX Runtime cannot load this graph ({str(e).splitlines()[0][:300]}); "
                               "re-export the build") from None
        got = [i.name for i in sess.get_inputs()]
        if got != spec.input_names:
            raise BackendError(f"{path}: graph inputs {got} differ from the manifest's {spec.input_names}; "
                               "the graph does not belong to this build, re-export it")
        return OrtRunner(sess, spec)
