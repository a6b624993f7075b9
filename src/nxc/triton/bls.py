"""A runtime backend for inside a Triton Python model: some graphs in this process, the others through BLS.

    SplitBackend(local=OrtBackend(providers=["cuda"]), pb_utils=pb_utils, in_process={"llm"})
       .load(path, spec) ─┬─ spec.name in in_process ─▶ local.load(path, spec)          (own session, own memory)
                          └─ otherwise ───────────────▶ BlsRunner(spec): pb_utils.InferenceRequest(model_name=graph)
                                                          .exec() on the server's model of that graph

The Pipeline's own decode loop and trigger dispatch run unchanged on top of it. The llm graph stays in process:
its KV cache never leaves nxc_chat's memory, so no decode step moves the cache across a process; the once-per-turn
graphs (vision, sam_encoder, sam_decoder) and the per-trigger loc_heads go to models Triton schedules across
requests and instances.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nxc import names
from nxc.manifest import load_manifest
from nxc.runtime.backends import BackendError, get_backend
from nxc.runtime.pipeline import Pipeline
from nxc.runtime.tokenizer import Tokenizer
from nxc.specs import GraphSpec


class BlsRunner:
    """One graph served by the Triton model of the same name. `run(feeds)` -> {output name: ndarray}."""

    def __init__(self, pb_utils, spec: GraphSpec, model: str | None = None):
        self.pb, self.spec, self.model = pb_utils, spec, model or spec.name

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pb = self.pb
        inputs = [pb.Tensor(t.name, np.ascontiguousarray(feeds[t.name], dtype=t.dtype)) for t in self.spec.inputs]
        response = pb.InferenceRequest(model_name=self.model, requested_output_names=self.spec.output_names,
                                       inputs=inputs).exec()
        if response.has_error():
            raise BackendError(f"Triton model {self.model!r} failed: {response.error().message()}")
        # copies: the response's tensors live in shared memory that is reused once the response is gone
        return {n: np.array(pb.get_output_tensor_by_name(response, n).as_numpy()) for n in self.spec.output_names}


class SplitBackend:
    """Graphs named in `in_process` through `local` (a runtime backend); every other graph through BLS."""
    name = "triton"

    def __init__(self, *, local, pb_utils, in_process=frozenset({names.GRAPH_LLM})):
        unknown = set(in_process) - set(names.GRAPHS)
        if unknown:
            raise BackendError(f"in_process names {sorted(unknown)}, which are not graphs; choose from "
                               f"{', '.join(names.GRAPHS)}")
        self.local, self.pb, self.in_process = local, pb_utils, frozenset(in_process)
        self.kv_memory = local.kv_memory          # the llm and its cache stay in this process

    def load(self, path: Path, spec: GraphSpec):
        if spec.name in self.in_process:
            return self.local.load(path, spec)
        return BlsRunner(self.pb, spec)


def load_pipeline(build: str | Path, *, pb_utils, in_process=frozenset({names.GRAPH_LLM}),
                  backend: str = "onnxruntime", providers: list[str] | None = None,
                  engine_dir: str | Path | None = None) -> Pipeline:
    """A Pipeline over `build` whose in-process graphs run on `backend` here and whose other graphs are BLS calls."""
    manifest = load_manifest(build)
    tokenizer = Tokenizer.from_file(manifest.path(manifest.tokenizer_file))
    local = get_backend(backend, providers=providers, engine_dir=engine_dir)
    return Pipeline(manifest=manifest, tokenizer=tokenizer,
                    backend=SplitBackend(local=local, pb_utils=pb_utils, in_process=in_process))
