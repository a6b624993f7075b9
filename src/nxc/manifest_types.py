"""The build manifest's types: frozen dataclasses, limits and BuildError. nxc.manifest reads manifest.json into
them (load_manifest, parse_manifest) and writes it; everything else reads these fields. Torch-free."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nxc import names
from nxc.config import GeneratorSizes, NextChatConfig
from nxc.jsonfield import plain
from nxc.specs import GraphSpec

SCHEMA = "nxc-build/2"
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8", "int4")       # of a whole build (nxc-export --fp32 ...)
KV_DTYPES = ("float32", "float16")
BATCH_ROWS = "masked"          # kv_cache.batch_rows: rows of different lengths decode together by mask
EMBEDDING_DTYPES = ("float32", "float16")
HEAD_SOURCES = ("hidden", "zeros", "slot_index", "slot_is_region", "signal_embeds")                  # what a head's graph inputs are fed from (see Head)
MAX_CONTEXT = 1 << 20
MAX_DEPTH = 32                                      # JSON nesting; the exporter writes 6
MAX_BYTES = 64 << 20                                # manifest.json itself (a 7B build's is under 1 MB)
REQUIRED_TOKENS = (*names.ADDED_TOKENS, names.BOS, names.EOS, names.UNK)


class BuildError(ValueError):
    """A build directory that cannot be used: the message names the file and what to do."""


@dataclass(frozen=True)
class PromptSpec:
    """The chat template (nxc.prompt): `num_image_tokens` image rows, between <im_start> and <im_end> when
    `use_im_start_end`, where the user text has `image_placeholder`."""
    template: str
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str
    image_placeholder: str
    num_image_tokens: int
    use_im_start_end: bool


@dataclass(frozen=True)
class ImagePreprocess:
    """One image input: resized (`resample`) and padded (`pad`) to [3,size,size], then (x - mean) / std per channel
    (CLIP: x in [0,1]; SAM: x in [0,255])."""
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str
    pad: str


@dataclass(frozen=True)
class Generation:
    """A chat call's defaults (top_k 0: no top-k; temperature 0: greedy)."""
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    iou_threshold: float
    eos: str


@dataclass(frozen=True)
class Head:
    """One entry of the decode loop's dispatch table (nxc.runtime.dispatch gives `kind` its meaning):

        fed token == trigger ─▶ graph(inputs) ─▶ `collect` outputs, kept per trigger (for `finish`, once a reply)
                                              ─▶ token `emit`, its input row the `feedback` output [1,H]
        region box (prompt) ─▶ graph(encode_input = box) ─▶ encode_output [1,H]: the input row of an `emit` slot

    `inputs` maps every graph input to its source: "hidden" (the llm's hidden [1,H] of the trigger step),
    "zeros" (zeros of the input's shape, dynamic axes 1), "slot_index" (when encoding slots: each slot's place
    among the prompt's slots), "slot_is_region" (when encoding slots: 1 where the slot's value is a user's region,
    0 where it is the model's own box; VITRON's region extractor encodes the first kind) or "<graph>:<output>" (that output of a graph run once per image, e.g. the retrieval
    family's "proposals:features"). A head with no trigger (and no feedback) never fires
    while decoding: it exists for its slot's rows (the retrieval family's `<objfeat>`, kind "index").

    A head with `signals` (NExT-GPT's [IMG0]..[IMG3], kind "signal") fires when its first signal token is sampled:
    the others are emitted after it, the hidden of each is kept, and once a reply its graph runs on them ("hidden":
    [1,N,H], "signal_embeds": the signal tokens' embedding rows [1,N,H]); trigger is the first signal, emit the last,
    no feedback (each next input is the next signal's embedding row)."""
    kind: str
    trigger: str | None            # None: the head is never fired while decoding (it only encodes slot rows)
    emit: str
    graph: str
    inputs: Mapping[str, str]
    collect: tuple[str, ...]
    feedback: str | None
    finish: str | None
    encode_input: str | None
    encode_output: str | None
    signals: tuple[str, ...] = ()


@dataclass(frozen=True)
class KVCacheSpec:
    """The in-place cache the llm graph is fed: past rows in, only the new rows out (present.{i}.*). batch_rows:
    how rows of different lengths decode together (BATCH_ROWS: per-row attention_mask and position_ids over one
    [batch, stride] past, the graph's only contract so far; docs/DESIGN.md "Batched decoding")."""
    dtype: str
    layout: str
    batch_rows: str = BATCH_ROWS


@dataclass(frozen=True)
class EmbeddingsSpec:
    file: str
    shape: tuple[int, int]     # [vocab_size, hidden_size]
    dtype: str


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class GraphEntry:
    file: str
    external_data: tuple[str, ...]
    precision: str             # "fp32", "fp16", "int8", "int8-weight-only", "int4-weight-only"
    opset: int
    spec: GraphSpec
    extra: Mapping             # all else the exporter recorded (tensorrt_lint, fp32_nodes, quantization), read-only

    def to_dict(self) -> dict:
        return {"file": self.file, "external_data": list(self.external_data), "precision": self.precision,
                "opset": self.opset, **self.spec.to_dict(), **self.extra}


PIXEL_FORMATS = ("rgb01",)          # generator.pixel_format: [B,3,H,W] float RGB in [0, 1] (x255, round: uint8)


@dataclass(frozen=True)
class GeneratorEntry:
    """The build's generator (issue 28; nxc.manifest_generator checks it): graph `denoiser` is called once per
    step on [unconditional, conditional] rows, guided noise = u + default_guidance (c - u), a sampler configured
    from `scheduler` (diffusers' scheduler_config.json as the model ships it) steps the latents
    [B, sizes.latent_channels, sizes.latent_height, sizes.latent_width], and graph `decoder` turns the raw latents
    into pixels in `pixel_format`. `uncond_file`: float32 [1, sizes.context_length, sizes.cross_attention_dim],
    the text encoder's embedding of "" (no text encoder at run time)."""
    sizes: GeneratorSizes
    denoiser: str
    decoder: str
    scheduler: Mapping
    default_scheduler: str          # one of names.GENERATOR_SCHEDULERS
    default_steps: int
    default_guidance: float
    uncond_file: str
    pixel_format: str
    text_encoder: str | None = None     # graph: CLIP ids -> conditioning (a build that draws from text at run time)
    tokenizer: str | None = None        # its CLIP tokenizer's folder in the build
    encoder: str | None = None          # GLIGEN: graph pixels -> latent mean / std (editing a picture)
    grounding_beta: float | None = None     # GLIGEN: the gated attention runs for the first int(beta * steps) steps

    def to_dict(self) -> dict:
        out = {**vars(self), "sizes": self.sizes.to_dict(), "scheduler": plain(self.scheduler)}
        return {k: v for k, v in out.items() if v is not None or k not in OPTIONAL_GENERATOR_KEYS}


OPTIONAL_GENERATOR_KEYS = ("text_encoder", "tokenizer", "encoder", "grounding_beta")


@dataclass(frozen=True)
class ModuleEntry:
    """One module a reply may call (`<module>name</module>`): what it is for, in words, and the runtime backend that
    runs it (nxc.runtime.modules.<backend>)."""
    task: str
    backend: str


@dataclass(frozen=True)
class ModulesEntry:
    """The build's module calls (issue 29, nxc.manifest_modules checks them): the tag grammar the reply is parsed
    with, the frame of a <region>'s numbers, and {module name: ModuleEntry}."""
    grammar: str
    region: str
    calls: Mapping[str, ModuleEntry]

    def to_dict(self) -> dict:
        return {"grammar": self.grammar, "region": self.region,
                "calls": {k: vars(v) for k, v in self.calls.items()}}


@dataclass(frozen=True)
class Manifest:
    root: Path
    schema: str
    nxc_version: str
    created: str
    source: Mapping
    precision: str
    config: NextChatConfig
    tokens: Mapping[str, int]
    prompt: PromptSpec
    clip: ImagePreprocess
    sam: ImagePreprocess | None            # regression (NExT-Chat) builds
    generation: Generation
    heads: tuple[Head, ...]
    max_context: int
    kv_cache: KVCacheSpec
    axes: Mapping[str, tuple[int, int, int]]
    embeddings: EmbeddingsSpec
    tokenizer_file: str
    graphs: Mapping[str, GraphEntry]
    files: Mapping[str, FileEntry]
    objects: ImagePreprocess | None = None  # retrieval builds: the square frame of proposals and object_features
    generator: GeneratorEntry | None = None  # builds that draw (issue 28)
    modules: ModulesEntry | None = None      # builds whose replies call modules (issue 29)

    def to_dict(self) -> dict:
        """The JSON form, as manifest.json holds it."""
        return plain({
            "schema": self.schema, "nxc_version": self.nxc_version, "created": self.created, "source": self.source,
            "precision": self.precision, "config": self.config.to_dict(), "tokens": self.tokens,
            "prompt": vars(self.prompt), "preprocess": {"clip": vars(self.clip),
                                                              **({"sam": vars(self.sam)} if self.sam else {}),
                                                              **({"objects": vars(self.objects)} if self.objects
                                                                 else {})},
            "generation": vars(self.generation),
            "heads": [{k: v for k, v in vars(h).items() if k != "signals" or v} for h in self.heads],
            "max_context": self.max_context, "kv_cache": vars(self.kv_cache), "axes": self.axes,
            "embeddings": vars(self.embeddings), "tokenizer": {"file": self.tokenizer_file},
            "graphs": {g: e.to_dict() for g, e in self.graphs.items()},
            "files": {rel: vars(e) for rel, e in self.files.items()},
            **({"generator": self.generator.to_dict()} if self.generator is not None else {}),
            **({"modules": self.modules.to_dict()} if self.modules is not None else {})})

    def _graph(self, name: str) -> GraphEntry:
        if name not in self.graphs:
            raise BuildError(f"{self.root}: the build has no graph {name!r} (it has {sorted(self.graphs)}); "
                             "re-export it with nxc-export")
        return self.graphs[name]

    def graph_spec(self, name: str) -> GraphSpec:
        return self._graph(name).spec

    def graph_path(self, name: str) -> Path:
        return self.root / self._graph(name).file

    def path(self, rel: str) -> Path:
        return self.root / rel

    def token_id(self, token: str) -> int:
        if token not in self.tokens:
            raise BuildError(f"{self.root / MANIFEST}: tokens: no {token!r} (it has {', '.join(self.tokens)}); "
                             "re-export the build with this nxc-export")
        return self.tokens[token]
