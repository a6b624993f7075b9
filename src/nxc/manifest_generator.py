"""The manifest's optional `generator` entry (issue 28), checked for what the runtime relies on. Torch-free.

    "generator": {"sizes": {GeneratorSizes}, "denoiser": "denoiser", "decoder": "latent_decoder",
                  "scheduler": {diffusers' scheduler_config.json as read}, "default_scheduler": "ddim",
                  "default_steps": 50, "default_guidance": 7.5, "uncond_file": "uncond.npy", "pixel_format": "rgb01",
                  optional: "text_encoder": "text_encoder", "tokenizer": "generator_tokenizer"   (text at run time),
                            "encoder": "latent_encoder", "grounding_beta": 0.3                  (GLIGEN: editing,
                                                                                                 scheduled sampling)}

nxc.manifest reads the sizes and the file name (`_sizes`, `_listed`: uncond.npy must be listed under files, so that
verify checks its sha256) and hands them here; `check_uncond` reads the file's .npy header (never its data) when
the build is loaded. A build without the entry loads as before (Manifest.generator is None).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np

from nxc import names
from nxc.config import GeneratorSizes
from nxc.jsonfield import Field
from nxc.manifest_types import PIXEL_FORMATS, BuildError, GeneratorEntry, GraphEntry, Manifest
from nxc.specs import generator_specs, text_encoder_spec

KEYS = ("sizes", "denoiser", "decoder", "scheduler", "default_scheduler", "default_steps", "default_guidance",
        "uncond_file", "pixel_format", "text_encoder", "tokenizer", "encoder", "grounding_beta")
PREDICTION_TYPES = ("epsilon",)             # the denoiser graph's output is the noise


def _graph(f: Field, graphs: Mapping[str, GraphEntry], want) -> str:
    """The entry's graph name: a graph of the build whose inputs and outputs are generator_specs' (`want`)."""
    name = f.choice(tuple(graphs), "a graph of this build")
    got = graphs[name].spec
    if (got.inputs, got.outputs) != (want.inputs, want.outputs):
        shown = [(t.name, t.dtype, list(t.shape)) for t in got.inputs + got.outputs]
        wanted = [(t.name, t.dtype, list(t.shape)) for t in want.inputs + want.outputs]
        raise f.error(f"graph {name}'s tensors {shown} are not the generator sizes' {wanted}")
    return name


def _scheduler(f: Field) -> dict:
    """diffusers' scheduler config, as read; the fields every sampler reads are checked."""
    f.object()
    f["num_train_timesteps"].integer(1)
    prediction = f.optional("prediction_type")
    if prediction is not None:
        prediction.choice(PREDICTION_TYPES, "a prediction type nxc's samplers take")
    if f.optional("trained_betas") is None:
        f["beta_start"].number(positive=True)
        f["beta_end"].number(positive=True)
        f["beta_schedule"].text()
    return copy.deepcopy(f.value)


def _text_encoder(f: Field, graphs: Mapping[str, GraphEntry], sizes: GeneratorSizes, files) -> tuple:
    """(text encoder graph, tokenizer dir) or (None, None): the optional pair that turns text into conditioning at
    run time (a VITRON-style module call); its tokenizer's files must be listed under files (verified)."""
    te, tok = f.optional("text_encoder"), f.optional("tokenizer")
    if te is None and tok is None:
        return None, None
    if te is None or tok is None:
        raise f.error("text_encoder and tokenizer come together (the graph and the CLIP tokenizer that feeds it)")
    d = tok.text().rstrip("/")
    unlisted = [f"{d}/{x}" for x in names.CLIP_TOKENIZER_FILES if f"{d}/{x}" not in files]
    if unlisted:
        raise tok.error(f"{d!r}: {', '.join(unlisted)} not listed under files (a CLIP tokenizer folder)")
    return _graph(te, graphs, text_encoder_spec(sizes)), d


def parse_generator(f: Field, *, sizes: dict, graphs: Mapping[str, GraphEntry], uncond_file: str,
                    axes: Mapping[str, tuple[int, int, int]], files: Mapping = MappingProxyType({})
                    ) -> GeneratorEntry:
    """The entry at `f` (its `sizes` and `uncond_file` already read by nxc.manifest); BuildError naming the field."""
    f.object(known=KEYS)
    sizes = GeneratorSizes.from_dict(sizes)
    specs = generator_specs(sizes)
    scheduler = _scheduler(f["scheduler"])
    batch = axes.get("batch", (1, 1, 1))
    if batch[2] < 2:
        raise f.error(f"the denoiser is called with 2 rows (unconditional, conditional), but axes.batch is "
                      f"{list(batch)}: its max must be 2 or more")
    text_encoder, tokenizer = _text_encoder(f, graphs, sizes, files)
    encoder, beta = f.optional("encoder"), f.optional("grounding_beta")
    if sizes.grounded:
        if text_encoder is None:
            raise f.error("a GLIGEN generator (sizes.grounding_objects > 0) embeds its phrases with its text encoder: "
                          "text_encoder and tokenizer are missing; re-export the build")
        if beta is None:
            raise f.error("a GLIGEN generator needs grounding_beta (the share of steps with grounding, e.g. 0.3)")
    elif encoder is not None or beta is not None:
        raise f.error("encoder and grounding_beta belong to a GLIGEN generator; these sizes have no grounding_objects")
    return GeneratorEntry(
        text_encoder=text_encoder, tokenizer=tokenizer,
        encoder=None if encoder is None else _graph(encoder, graphs, specs[names.GRAPH_LATENT_ENCODER]),
        grounding_beta=None if beta is None else beta.number(0, 1),
        sizes=sizes, denoiser=_graph(f["denoiser"], graphs, specs[names.GRAPH_DENOISER]),
        decoder=_graph(f["decoder"], graphs, specs[names.GRAPH_LATENT_DECODER]),
        scheduler=MappingProxyType(scheduler),
        default_scheduler=f["default_scheduler"].choice(names.GENERATOR_SCHEDULERS, "a sampler nxc has"),
        default_steps=f["default_steps"].integer(1, scheduler["num_train_timesteps"]),
        default_guidance=f["default_guidance"].number(0), uncond_file=uncond_file,
        pixel_format=f["pixel_format"].choice(PIXEL_FORMATS, "a pixel format nxc writes"))


def check_uncond(m: Manifest) -> None:
    """The unconditional conditioning file holds float32 [1, context_length, cross_attention_dim] (header only)."""
    g = m.generator
    if g is None:
        return
    path = m.root / g.uncond_file
    want = (1, g.sizes.context_length, g.sizes.cross_attention_dim)
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BuildError(f"{path}: not a readable .npy ({e}); the build is damaged, re-export it") from None
    if a.dtype != np.float32 or tuple(a.shape) != want:
        raise BuildError(f"{path}: {a.dtype} {list(a.shape)}, but generator.sizes gives float32 {list(want)}; "
                         "the unconditional conditioning is not this generator's, re-export the build")
