"""The torch-free NExT-Chat pipeline: a build directory in, text + boxes + masks out.

    pipe = Pipeline.load("build/fp32")                      # backend="onnxruntime" | "tensorrt"
    r = pipe.chat(image, "Where is the red circle?")        # r.text "Answer: [0] .", r.detections[0].box / .mask
    conv = pipe.conversation(image)                          # keeps the image features and the KV cache
    conv.ask("Where is the red circle?"); conv.ask("And the blue square?")   # no re-encoding, no re-prefill
    for ev in pipe.stream(image, "Describe the image with locations."): ...  # Token / Box events, then Done

    Pipeline (this module): the build's manifest, tokenizer, graph runners, KV caches, llm steps
      └─ Conversation (nxc.runtime.conversation): a turn = prefill -> the decode loop (nxc.decode) -> finish
           └─ heads (nxc.runtime.dispatch binds the manifest's; nxc.runtime.heads.<kind> say what they mean,
              what they keep per image and their once-per-reply stage, e.g. SAM masks)

Threading: a Pipeline (its sessions) may be shared by threads; a Conversation belongs to one thread at a time.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from nxc import names
from nxc.manifest import Manifest, load_manifest
from nxc.runtime.conversation import Conversation
from nxc.runtime.dispatch import Dispatch
from nxc.runtime.events import Box, ChatResult, Detection, Done, Token
from nxc.runtime.kv_cache import BatchCache, KVCache
from nxc.runtime.tokenizer import Tokenizer

__all__ = ["Box", "ChatResult", "Conversation", "Detection", "Done", "Pipeline", "Token"]

PREFILL_CHUNK = 256     # prompt rows per llm call (Pipeline.llm_step); 1.1B int4, 600 rows: 7.7 s -> 7.2 s, +0.25 -> +0.1 GB


class Pipeline:
    """A loaded build. Graph runners are created on first use (SAM only when a trigger fires)."""

    def __init__(self, *, manifest: Manifest, tokenizer: Tokenizer, backend, low_memory: bool = False):
        self.manifest, self.tokenizer, self.backend = manifest, tokenizer, backend
        # low_memory: the graphs run once per image (vision, sam_encoder) are unloaded after each use and loaded
        # again when the next image needs them: their sessions (7B-336 int4: 0.51 + 0.79 GB) are not held next
        # to the llm's, at the cost of a session load per image; and a conversation gives back its KV cache before
        # a reply's once-per-reply stages (SAM; 7B: 0.5 MB per position) so they never run beside it, at the cost
        # of prefilling the conversation again at its next turn
        self.low_memory = low_memory
        self.config = manifest.config
        self.tokens = manifest.tokens
        self.embeddings = np.load(manifest.path(manifest.embeddings.file), mmap_mode="r")
        self.kv_dtype = np.dtype(manifest.kv_cache.dtype)
        self._runners: dict = {}
        self._lock = threading.Lock()
        self.dispatch = Dispatch(self)

    @classmethod
    def load(cls, build_dir: str | Path, backend: str = "onnxruntime", providers: list[str] | None = None,
             *, threads: int | None = None, verify: bool = True, low_memory: bool = False) -> "Pipeline":
        from nxc.runtime.backends import get_backend
        manifest = load_manifest(build_dir, verify=verify)
        tokenizer = Tokenizer.from_file(manifest.path(manifest.tokenizer_file))
        return cls(manifest=manifest, tokenizer=tokenizer,
                   backend=get_backend(backend, providers=providers, threads=threads), low_memory=low_memory)

    def runner(self, graph: str):
        with self._lock:
            if graph not in self._runners:
                self._runners[graph] = self.backend.load(self.manifest.graph_path(graph), self.manifest.graph_spec(graph))
            return self._runners[graph]

    def run(self, graph: str, **feeds) -> dict[str, np.ndarray]:
        return self.runner(graph).run(feeds)

    def run_once_per_image(self, graph: str, **feeds) -> dict[str, np.ndarray]:
        """run() for vision / sam_encoder; in low_memory mode the graph's session is unloaded afterwards."""
        try:
            return self.run(graph, **feeds)
        finally:
            if self.low_memory:
                with self._lock:
                    self._runners.pop(graph, None)

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """A KV cache in the backend's memory (host for CPU, device for CUDA / TensorRT)."""
        llm = self.config.llm
        return KVCache(num_layers=llm.num_layers, num_kv_heads=llm.num_kv_heads,
                       head_dim=llm.hidden_size // llm.num_heads, capacity=capacity or self.manifest.max_context,
                       dtype=self.kv_dtype, memory=self.backend.kv_memory)

    def batch_rows(self, slots: int, *, what: str, instead: str):
        """(the llm runner, a BatchCache of `slots` rows) for decoding rows together: ONNX Runtime with the KV cache
        in host memory; elsewhere a BackendError naming `what` needs it and what to do `instead`."""
        runner = self.runner(names.GRAPH_LLM)
        device = self.backend.kv_memory.device
        if not hasattr(runner, "run_rows") or device != "cpu":
            from nxc.runtime.backends import BackendError
            raise BackendError(f"{what} runs on the onnxruntime backend with the KV cache in host memory; this "
                               f"pipeline uses {self.backend.name} with its cache on {device}: {instead}")
        llm = self.config.llm
        return runner, BatchCache(num_layers=llm.num_layers, num_kv_heads=llm.num_kv_heads,
                                  head_dim=llm.hidden_size // llm.num_heads, slots=slots,
                                  capacity=self.manifest.max_context, dtype=self.kv_dtype)

    def llm_step(self, embeds: np.ndarray, cache: KVCache) -> tuple[np.ndarray, np.ndarray]:
        """Feed [1,T,H] embeddings after the cache (written in place); -> last logits [V], hidden [1,H].
        A prompt longer than PREFILL_CHUNK rows goes in in chunks, each after the cache the previous one wrote:
        the llm's activations, which ONNX Runtime's arena keeps after the call, then scale with the chunk rather
        than the prompt (7B, 614 rows: docs/DESIGN.md "True size"), at no cost in time."""
        runner = self.runner(names.GRAPH_LLM)
        for start in range(0, max(1, embeds.shape[1]), PREFILL_CHUNK):
            out = runner.run_cached(np.ascontiguousarray(embeds[:, start:start + PREFILL_CHUNK]), cache)
        return out["logits"][0], out["hidden"]

    # -- the public calls ------------------------------------------------------------------------------
    def conversation(self, image: Image.Image) -> Conversation:
        return Conversation(self, image)

    def chat(self, image: Image.Image, text: str, boxes=None, **kwargs) -> ChatResult:
        return self.conversation(image).ask(text, boxes=boxes, **kwargs)

    def stream(self, image: Image.Image, text: str, boxes=None, **kwargs) -> Iterator[Token | Box | Done]:
        return self.conversation(image).stream(text, boxes=boxes, **kwargs)
