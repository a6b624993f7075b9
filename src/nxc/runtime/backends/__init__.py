"""Backends behind one small interface (DESIGN "Backends"; loaders apart from runners, Polygraphy-style):

    backend = get_backend("onnxruntime", providers=None)
    runner = backend.load(path, spec)          # builds a session / engine for one graph
    outputs = runner.run({name: ndarray})      # -> {name: ndarray}

Heavy imports live inside the backend that needs them; a backend that is not installed or has no device says so
in one line (BackendError) and never silently falls back to another.
"""
from __future__ import annotations

BACKENDS = ("onnxruntime", "tensorrt")


class BackendError(RuntimeError):
    """A backend cannot run here: the message says what is missing and what to do."""


def get_backend(name: str, *, providers: list[str] | None = None, threads: int | None = None, engine_dir=None):
    if name == "onnxruntime":
        from nxc.runtime.backends.ort import OrtBackend
        return OrtBackend(providers=providers, threads=threads)
    if name == "tensorrt":
        from nxc.runtime.backends.trt import TrtBackend
        return TrtBackend(engine_dir=engine_dir)
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
