"""The build directory's manifest: what a build holds, parsed once into frozen dataclasses. Torch-free (the runtime
reads it).

    build/
      manifest.json          this file's content (schema SCHEMA), read by load_manifest into a Manifest
      tokenizer.json         runtime tokenizer
      embeddings.npy         token-embedding table [V,H] (the runtime gathers rows itself)
      graphs/<graph>.onnx    the five graphs (+ <graph>.onnx.data when a graph is over 2 GB)
      reports/parity.json    ONNX Runtime vs torch on fresh inputs, written by the exporter

Every file but the manifest is listed under "files" with its sha256 and size, and every file the manifest names
(graphs, their external data, embeddings, tokenizer) must be listed there, as a plain relative path inside the
build; `verify` checks them all, so a damaged or tampered build is refused with the file's name before anything
runs. Every other field is read through nxc.jsonfield, which knows its key path: a malformed manifest is refused in
one line that names the field ("manifest.json: heads[0].graph: missing; ..."), never with a KeyError.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path, PurePosixPath
from types import MappingProxyType

from nxc import names
from nxc.config import (GeneratorSizes, LlamaSizes, NextChatConfig, ObjectSizes, ProjectorSizes, SamSizes,
                        VisionSizes)
from nxc.jsonfield import Field, shown, too_deep
from nxc.manifest_generator import check_uncond, parse_generator
from nxc.manifest_modules import parse_modules
from nxc.manifest_types import (BATCH_ROWS, EMBEDDING_DTYPES, HEAD_SOURCES, KV_DTYPES, MANIFEST, MAX_BYTES, MAX_CONTEXT,  # noqa: F401
                                MAX_DEPTH, PRECISIONS, REQUIRED_TOKENS, SCHEMA, BuildError, EmbeddingsSpec, FileEntry,
                                Generation, GraphEntry, Head, ImagePreprocess, KVCacheSpec, Manifest, PromptSpec)
from nxc.specs import AXES, DTYPES, GraphSpec, TensorSpec

def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_records(build: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict]:
    """{relative posix path: {"sha256", "bytes"}} of every file under `build`."""
    out = {}
    for p in sorted(build.rglob("*")):
        rel = p.relative_to(build).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def parse_manifest(data, root: str | Path) -> Manifest:
    """Parse and check manifest.json's content (BuildError naming the field); no file is read."""
    return _parse(data, Path(root))


def write_manifest(build: Path, data: dict) -> Path:
    """Record every file's hash and write manifest.json (last, after all other files exist)."""
    data = {"schema": SCHEMA, **data, "files": file_records(build)}
    path = build / MANIFEST
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def _inside(root: Path, rel: str) -> Path:
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()):
        raise BuildError(f"{root / MANIFEST}: file entry {rel!r} points outside the build directory; a build may "
                         "only reference its own files. Re-export the build.")
    return p


def load_manifest(build: str | Path, *, verify: bool = True) -> Manifest:
    """Read and check a build directory's manifest; with `verify`, also every file's size and sha256."""
    root = Path(build)
    path = root / MANIFEST
    if not root.is_dir():
        raise BuildError(f"{root}: no such build directory; create one with `nxc-export --out {root}`")
    if not path.is_file():
        raise BuildError(f"{root}: not a build directory (no {MANIFEST}); create one with `nxc-export --out {root}`")
    if path.stat().st_size > MAX_BYTES:
        raise BuildError(f"{path}: {path.stat().st_size} bytes, more than a manifest's {MAX_BYTES}; the build is "
                         "damaged, re-export it")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BuildError(f"{path}: not valid JSON ({e}); the build is damaged, re-export it") from None
    except RecursionError:
        raise BuildError(f"{path}: JSON nested deeper than a manifest's {MAX_DEPTH} levels; the build is damaged, "
                         "re-export it") from None
    m = _parse(data, root)
    for rel in m.files:                      # no symlink out of the build, even unverified
        _inside(root, rel)
    if verify:
        verify_files(m)
    check_uncond(m)                          # the generator's uncond.npy header (a build with a generator)
    return m


def verify_files(m: Manifest) -> None:
    """Every listed file exists and has its recorded size and sha256 (parsing checked that the manifest's file
    entries are all listed)."""
    for rel, rec in m.files.items():
        p = _inside(m.root, rel)
        if not p.is_file():
            raise BuildError(f"{m.root / rel}: missing (the manifest lists it); the build is incomplete, re-export it")
        size = p.stat().st_size
        if size != rec.bytes:
            raise BuildError(f"{m.root / rel}: {size} bytes, the manifest says {rec.bytes}; the file is truncated "
                             "or replaced, re-export the build")
        digest = sha256_file(p)
        if digest != rec.sha256:
            raise BuildError(f"{m.root / rel}: sha256 {digest[:16]}... does not match the manifest's "
                             f"{rec.sha256[:16]}...; the file was modified, re-export the build")


# -- parsing ---------------------------------------------------------------------------------------------------------

def _relpath(f: Field, rel: str) -> str:
    """`rel` if it is a plain relative path inside the build ("graphs/llm.onnx"), else BuildError at `f`."""
    p = PurePosixPath(rel)
    if ".." in p.parts:
        raise f.error(f"{rel!r} points outside the build directory; a build may only reference its own files")
    if p.is_absolute() or not p.parts or p.as_posix() != rel:
        raise f.error(f"{rel!r} is not a plain path relative to the build directory (like 'graphs/llm.onnx')")
    return rel


_TOP = ("schema", "nxc_version", "created", "source", "precision", "config", "tokens", "prompt", "preprocess",
        "generation", "heads", "max_context", "kv_cache", "axes", "embeddings", "tokenizer", "graphs", "files",
        "generator", "modules")
_GRAPH = ("file", "external_data", "precision", "opset", "inputs", "outputs")


def _parse(data, root: Path) -> Manifest:
    top = Field(data, file=root / MANIFEST, error=BuildError, fix="re-export the build with this nxc-export")
    if not isinstance(data, dict):
        raise top.expected("a JSON object")
    deep = too_deep(data, MAX_DEPTH)
    if deep is not None:
        raise top.at(None, deep).error(f"nested deeper than {MAX_DEPTH} levels")
    _schema(top["schema"])
    top.object(known=_TOP)
    config = _config(top["config"])
    max_context = top["max_context"].integer(1, MAX_CONTEXT)
    if max_context > config.llm.max_position_embeddings:
        raise top["max_context"].error(f"{max_context} is more than config.llm.max_position_embeddings "
                                       f"({config.llm.max_position_embeddings})")
    tokens = {t: f.integer(0, config.llm.vocab_size - 1) for t, f in top["tokens"].items()}
    for t in REQUIRED_TOKENS:
        top["tokens"][t]                                     # "missing" if absent
    files = {rel: _file_entry(top["files"], rel, f) for rel, f in top["files"].items()}
    axes = _axes(top["axes"])
    for g in top["graphs"].object():
        if g not in names.ALL_GRAPHS + names.GENERATOR_GRAPHS + (names.GRAPH_PROJECTOR, names.GRAPH_TEXT_ENCODER):
            raise top["graphs"].error(f"{g!r} is not a graph nxc exports "
                                      f"({', '.join(names.ALL_GRAPHS + names.GENERATOR_GRAPHS)}, "
                                      f"{names.GRAPH_PROJECTOR})")
    graphs = {g: _graph(f, g, axes, files) for g, f in top["graphs"].items()}
    heads = tuple(_head(f, tokens, graphs) for f in top["heads"].elements())
    triggers = [h.trigger for h in heads if h.trigger is not None]
    twice = next((t for t in triggers if triggers.count(t) > 1), None)
    if twice is not None:
        raise top["heads"].error(f"two heads have the trigger {twice!r}")
    pre, tokenizer = top["preprocess"], top["tokenizer"]
    pre.object(known=("clip", "sam", "objects"))
    tokenizer.object(known=("file",))
    return Manifest(
        root=root, schema=SCHEMA, nxc_version=top["nxc_version"].text(), created=top["created"].text(),
        source=MappingProxyType(top["source"].object()), precision=top["precision"].choice(PRECISIONS, "a precision"),
        config=config, tokens=MappingProxyType(tokens), prompt=_prompt(top["prompt"], config, max_context),
        clip=_image(pre["clip"], config.vision.image_size),
        sam=_image(pre["sam"], config.sam.image_size) if config.sam is not None else None,
        objects=_image(pre["objects"], config.objects.image_size) if config.objects is not None else None,
        generation=_generation(top["generation"], tokens), heads=heads, max_context=max_context,
        kv_cache=_kv_cache(top["kv_cache"], graphs.get(names.GRAPH_LLM)), axes=MappingProxyType(axes),
        embeddings=_embeddings(top["embeddings"], config, files), tokenizer_file=_listed(tokenizer["file"], files),
        graphs=MappingProxyType(graphs), files=MappingProxyType(files),
        generator=_generator(top, graphs, files, axes),
        modules=None if top.optional("modules") is None else parse_modules(top["modules"], graphs))


def _generator(top: Field, graphs: Mapping[str, GraphEntry], files: Mapping[str, FileEntry], axes: Mapping):
    """The optional generator entry (nxc.manifest_generator), or None: builds without one load as before."""
    f = top.optional("generator")
    if f is None:
        return None
    return parse_generator(f, sizes=_sizes(f["sizes"], GeneratorSizes), graphs=graphs, axes=axes,
                           uncond_file=_listed(f["uncond_file"], files), files=files)


def _schema(f: Field) -> None:
    schema = f.value
    old = re.fullmatch(r"nxc-build/(\d+)", schema) if isinstance(schema, str) else None
    if old and int(old.group(1)) < int(SCHEMA.split("/")[1]):
        raise BuildError(f"{f.file}: built by an older nxc (schema {schema}); re-export it with this nxc-export")
    if schema != SCHEMA:
        raise f.error(f"{shown(schema)} is not a schema this nxc reads ({SCHEMA})")


def _sizes(f: Field, cls, *, signed: tuple[str, ...] = (), nested: tuple[str, ...] = ()) -> dict:
    """The fields of one of nxc.config's sizes dataclasses, each of its annotated type; numbers are positive
    unless `signed`, and tuples of ints (layer indexes) are >= 0. `nested` fields are left to the caller."""
    read = {"int": lambda g: g.integer(1), "float": lambda g: g.number(positive=True), "str": Field.text,
            "bool": Field.flag, "tuple[int, ...]": lambda g: [e.integer(0) for e in g.elements()]}
    own = [x for x in fields(cls) if x.name != "extra"]
    f.object(known=tuple(x.name for x in own))
    out = {}
    for x in own:
        if x.name in nested:
            continue
        if x.type == "int" and x.default == 0:     # an optional count (GLIGEN's slots), absent = 0 = none
            g = f.optional(x.name)
            if g is not None:
                out[x.name] = g.integer(0)
            continue
        if x.type == "bool" and x.default is False:     # an optional part (the region extractor), absent = none
            g = f.optional(x.name)
            if g is not None:
                out[x.name] = g.flag()
            continue
        out[x.name] = f[x.name].integer(None) if x.name in signed else read.get(x.type, Field.object)(f[x.name])
    return out


def _config(f: Field) -> NextChatConfig:
    d = _sizes(f, NextChatConfig, signed=("mm_vision_select_layer",),
               nested=("llm", "vision", "sam", "objects", "projector"))
    sam, objects, projector = f.optional("sam"), f.optional("objects"), f.optional("projector")
    if [sam, objects, projector].count(None) != 2:
        raise f.error("expected exactly one of `sam` (a regression model, NExT-Chat), `objects` (a retrieval "
                      "model) and `projector` (a generation model, NExT-GPT)")
    d.update(llm=_sizes(f["llm"], LlamaSizes), vision=_sizes(f["vision"], VisionSizes),
             sam=_sizes(sam, SamSizes) if sam is not None else None,
             objects=_sizes(objects, ObjectSizes) if objects is not None else None,
             projector=_sizes(projector, ProjectorSizes) if projector is not None else None)
    llm = d["llm"]
    if llm["hidden_size"] % llm["num_heads"] or llm["num_heads"] % llm["num_kv_heads"]:
        raise f["llm"].error(f"hidden_size {llm['hidden_size']}, num_heads {llm['num_heads']} and num_kv_heads "
                             f"{llm['num_kv_heads']} do not divide (heads of equal size, KV heads shared evenly)")
    return NextChatConfig.from_dict(d)


def _file_entry(files: Field, rel: str, f: Field) -> FileEntry:
    _relpath(files, rel)
    f.object(known=("sha256", "bytes"))
    digest = f["sha256"].text()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise f["sha256"].error(f"{shown(digest)} is not a sha256 (64 lowercase hex digits)")
    return FileEntry(sha256=digest, bytes=f["bytes"].integer(0))


def _listed(f: Field, files: Mapping[str, FileEntry]) -> str:
    """A file the manifest names: a plain relative path, listed under files (so that verify checks its hash)."""
    rel = _relpath(f, f.text())
    if rel not in files:
        raise f.error(f"{rel!r} is not listed under files, so its sha256 cannot be checked")
    return rel


def _axes(f: Field) -> dict[str, tuple[int, int, int]]:
    out = {}
    for name, v in f.items():
        if name not in AXES:
            raise v.error(f"not an axis nxc knows ({', '.join(AXES)})")
        lo, opt, hi = (e.integer(0) for e in v.elements(3))
        if not lo <= opt <= hi:
            raise v.error(f"[min, opt, max] {[lo, opt, hi]} is not ordered min <= opt <= max")
        out[name] = (lo, opt, hi)
    return out


def _tensor(f: Field, axes: Mapping) -> TensorSpec:
    f.object(known=("name", "dtype", "shape"))
    shape = tuple(d.choice(tuple(axes), "an axis of axes") if isinstance(d.value, str) else d.integer(1)
                  for d in f["shape"].elements())
    return TensorSpec(name=f["name"].text(), dtype=f["dtype"].choice(DTYPES, "a tensor dtype"), shape=shape)


def _graph(f: Field, name: str, axes: Mapping, files: Mapping[str, FileEntry]) -> GraphEntry:
    inputs = tuple(_tensor(t, axes) for t in f["inputs"].elements())
    outputs = tuple(_tensor(t, axes) for t in f["outputs"].elements())
    lint = f.optional("tensorrt_lint")                      # kept in extra; nxc-build reads these three
    if lint is not None:
        lint["ok"].flag()
        lint["problems"].elements()
        lint["problem_count"].integer(0)
    seen = [t.name for t in inputs + outputs]
    twice = next((n for n in seen if seen.count(n) > 1), None)
    if twice is not None:
        raise f.error(f"tensor name {twice!r} appears twice among the inputs and outputs")
    return GraphEntry(file=_listed(f["file"], files),
                      external_data=tuple(_listed(e, files) for e in f["external_data"].elements()),
                      precision=f["precision"].text(), opset=f["opset"].integer(1),
                      spec=GraphSpec(name, inputs=inputs, outputs=outputs),
                      extra=MappingProxyType({k: v for k, v in f.object().items() if k not in _GRAPH}))


def _kv_cache(f: Field, llm: GraphEntry | None) -> KVCacheSpec:
    f.object(known=("dtype", "layout", "batch_rows"))
    dtype = f["dtype"].choice(KV_DTYPES, "a KV cache dtype")
    rows = f.optional("batch_rows")           # absent in builds before batched decoding: the same graph contract
    past = [t for t in llm.spec.inputs if t.name.startswith("past_key_values.")] if llm else []
    if any(t.dtype != dtype for t in past):
        raise f["dtype"].error(f"{dtype!r}, but the llm graph's {past[0].name} is {past[0].dtype}")
    return KVCacheSpec(dtype=dtype, layout=f["layout"].text(),
                       batch_rows=BATCH_ROWS if rows is None else rows.choice((BATCH_ROWS,), "a batching contract"))


def _prompt(f: Field, config: NextChatConfig, max_context: int) -> PromptSpec:
    f.object(known=tuple(x.name for x in fields(PromptSpec)))
    n = f["num_image_tokens"].integer(1, max_context - 1)
    if n != config.num_image_tokens:
        raise f["num_image_tokens"].error(f"{n}, but the vision graph gives {config.num_image_tokens} (config)")
    user, assistant = (r.text() for r in f["roles"].elements(2))
    return PromptSpec(template=f["template"].choice(("vicuna_v1.1",), "a template nxc knows"),
                      system=f["system"].text(), roles=(user, assistant), sep=f["sep"].text(), sep2=f["sep2"].text(),
                      image_placeholder=f["image_placeholder"].text(), num_image_tokens=n,
                      use_im_start_end=f["use_im_start_end"].flag())


def _image(f: Field, size: int) -> ImagePreprocess:
    f.object(known=tuple(x.name for x in fields(ImagePreprocess)))
    if f["size"].integer(1) != size:
        raise f["size"].error(f"{f['size'].value}, but the config's image_size is {size}")
    mean = tuple(v.number() for v in f["mean"].elements(3))
    std = tuple(v.number(positive=True) for v in f["std"].elements(3))
    return ImagePreprocess(size=size, mean=mean, std=std, resample=f["resample"].text(), pad=f["pad"].text())


def _generation(f: Field, tokens: Mapping[str, int]) -> Generation:
    f.object(known=tuple(x.name for x in fields(Generation)))
    return Generation(max_new_tokens=f["max_new_tokens"].integer(1), temperature=f["temperature"].number(0),
                      top_p=f["top_p"].number(0, 1, positive=True), top_k=f["top_k"].integer(0),
                      iou_threshold=f["iou_threshold"].number(0, 1), eos=f["eos"].choice(tokens, "a token of tokens"))


def _head(f: Field, tokens: Mapping[str, int], graphs: Mapping[str, GraphEntry]) -> Head:
    f.object(known=tuple(x.name for x in fields(Head)))
    graph = f["graph"].choice(tuple(graphs), "a graph of this build")
    spec = graphs[graph].spec
    ins, outs = tuple(spec.input_names), tuple(spec.output_names)
    inputs = {}
    for name, source in f["inputs"].items():
        if name not in ins:
            raise source.error(f"not an input of graph {graph} ({', '.join(ins)})")
        inputs[name] = _head_source(source, graphs)
    for name in ins:
        f["inputs"][name]                                    # every input is fed: "missing" if absent
    trigger, feedback, finish, enc_in, enc_out = (f.optional(k) for k in ("trigger", "feedback", "finish",
                                                                          "encode_input", "encode_output"))
    signals = f.optional("signals")
    if signals is not None and signals.value:
        return _signal_head(f, tokens, graph, inputs, outs, trigger, (feedback, enc_in))
    if (enc_in is None) != (enc_out is None):
        raise f.error("encode_input and encode_output come together (a region box in, its input row out)")
    if (trigger is None) != (feedback is None):
        raise f.error("trigger and feedback come together (a head fired at decode time feeds its output back); "
                      "a head with neither only encodes its slot's rows")
    if trigger is None and enc_in is None:
        raise f.error("a head without a trigger needs encode_input / encode_output (it exists for its slot rows)")
    if trigger is not None and f["emit"].value == trigger.value:
        raise f["emit"].error(f"{f['emit'].value!r} is the trigger too (the head would fire on its own output)")
    return Head(kind=f["kind"].text(), trigger=None if trigger is None else trigger.choice(tokens, "a token of tokens"),
                emit=f["emit"].choice(tokens, "a token of tokens"), graph=graph, inputs=MappingProxyType(inputs),
                collect=tuple(c.choice(outs, f"an output of graph {graph}") for c in f["collect"].elements()),
                feedback=None if feedback is None else feedback.choice(outs, f"an output of graph {graph}"),
                finish=None if finish is None else finish.text(),
                encode_input=None if enc_in is None else enc_in.choice(ins, f"an input of graph {graph}"),
                encode_output=None if enc_out is None else enc_out.choice(outs, f"an output of graph {graph}"))


def _signal_head(f: Field, tokens: Mapping[str, int], graph: str, inputs: dict, outs: tuple, trigger,
                 others: tuple) -> Head:
    """A head of signal tokens (Head.signals): the first is its trigger, the last its emit; no feedback."""
    signals = tuple(s.choice(tokens, "a token of tokens") for s in f["signals"].elements())
    if len(signals) < 2 or len(set(signals)) != len(signals):
        raise f["signals"].error(f"{list(signals)}: a head's signal tokens are two or more distinct tokens")
    if any(o is not None for o in others):
        raise f.error("a head with signals has no feedback or encode_input (its first signal fires it, each next "
                      "input is the next signal's embedding row)")
    if trigger is not None and trigger.value != signals[0]:
        raise trigger.error(f"{trigger.value!r}, but a head with signals is fired by its first, {signals[0]!r}")
    emit = f.optional("emit")
    if emit is not None and emit.value != signals[-1]:
        raise emit.error(f"{emit.value!r}, but a head with signals emits its last, {signals[-1]!r}")
    finish = f.optional("finish")
    return Head(kind=f["kind"].text(), trigger=signals[0], emit=signals[-1], graph=graph,
                inputs=MappingProxyType(inputs),
                collect=tuple(c.choice(outs, f"an output of graph {graph}") for c in f["collect"].elements()),
                feedback=None, finish=None if finish is None else finish.text(), encode_input=None,
                encode_output=None, signals=signals)


def _head_source(f: Field, graphs: Mapping[str, GraphEntry]) -> str:
    """A head input's source: "hidden", "zeros", or "<graph>:<output>" (an output of a graph run once per image)."""
    if isinstance(f.value, str) and ":" in f.value:
        graph, _, output = f.value.partition(":")
        if graph not in graphs or output not in graphs[graph].spec.output_names:
            raise f.error(f"{f.value!r} names no output of this build's graphs (<graph>:<output>)")
        return f.value
    return f.choice(HEAD_SOURCES, "a head input source")


def _embeddings(f: Field, config: NextChatConfig, files: Mapping[str, FileEntry]) -> EmbeddingsSpec:
    f.object(known=("file", "shape", "dtype"))
    shape = tuple(d.integer(1) for d in f["shape"].elements(2))
    want = (config.llm.vocab_size, config.llm.hidden_size)
    if shape != want:
        raise f["shape"].error(f"{list(shape)}, but config.llm gives [vocab_size, hidden_size] {list(want)}")
    return EmbeddingsSpec(file=_listed(f["file"], files), shape=shape,
                          dtype=f["dtype"].choice(EMBEDDING_DTYPES, "an embeddings dtype"))
