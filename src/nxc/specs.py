"""Graph I/O as data: every graph's tensor names, dtypes and axes, declared once. Torch-free.

Export (dynamic axes, dummy inputs), the manifest, the parity check, the runtime (feeds) and TensorRT
optimisation profiles all read these specs; nothing else spells a tensor name or an axis.

A shape entry is an int (fixed) or the name of a dynamic axis:

    batch       images / sequences per call (the runtime uses 1)
    sequence    new positions fed to `llm` in one call (prefill: the prompt; decode: 1)
    past        positions already in the KV cache
    total       past + sequence (the attention mask)
    detections  trigger hiddens given to `loc_heads` / masks asked of `sam_decoder`
    boxes       input boxes given to `loc_heads` (region references)

KV cache layout: `past_key_values.{i}.key` is [batch, past, kv_heads, head_dim] (sequence-major, so that a
runtime's preallocated [1, capacity, kv_heads, head_dim] buffer sliced to [:, :past] is contiguous and is fed
without a copy), and `present.{i}.key` holds ONLY the `sequence` new rows, which the runtime writes into its
buffer at [past:past+sequence]. See `nxc.export.llm` for why (measured there).
"""
from __future__ import annotations

from dataclasses import dataclass

from nxc import names
from nxc.config import GeneratorSizes, NextChatConfig, ProjectorSizes

DTYPES = ("float32", "float16", "int64", "int32", "int8", "bool")
AXES = ("batch", "sequence", "past", "total", "detections", "boxes")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))

    def dynamic_axes(self) -> dict[int, str]:
        return {i: a for i, a in enumerate(self.shape) if isinstance(a, str)}

    def resolve(self, axes: dict[str, int]) -> tuple[int, ...]:
        """The concrete shape for given axis lengths, e.g. {"batch": 1, "past": 37}."""
        missing = [a for a in self.shape if isinstance(a, str) and a not in axes]
        if missing:
            raise KeyError(f"{self.name}: no length given for axis {missing[0]!r}")
        return tuple(axes[a] if isinstance(a, str) else a for a in self.shape)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor name: {axis index: axis name}} in the form torch.onnx.export takes."""
        return {t.name: t.dynamic_axes() for t in self.inputs + self.outputs if t.dynamic_axes()}

    def to_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "GraphSpec":
        return cls(name=name, inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                   outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]))


def _t(name: str, shape: tuple, dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=shape)


def graph_specs(config: NextChatConfig, *, kv_dtype: str = "float32") -> dict[str, GraphSpec]:
    """The five graphs of DESIGN "the cut", sized from `config`. Graph inputs and outputs are float32 at every
    precision except the KV cache, which is kept in the llm's own precision (`kv_dtype`)."""
    llm, v, sam = config.llm, config.vision, config.sam
    h, kv, d = llm.hidden_size, llm.num_kv_heads, llm.head_dim
    r = v.image_size
    kv_in, kv_out = [], []
    for i in range(llm.num_layers):
        kv_in += [_t(names.past_key(i), ("batch", "past", kv, d), kv_dtype),
                  _t(names.past_value(i), ("batch", "past", kv, d), kv_dtype)]
        kv_out += [_t(names.present_key(i), ("batch", "sequence", kv, d), kv_dtype),
                   _t(names.present_value(i), ("batch", "sequence", kv, d), kv_dtype)]
    common = {
        names.GRAPH_VISION: GraphSpec(
            names.GRAPH_VISION,
            inputs=(_t("pixel_values", ("batch", 3, r, r)),),
            outputs=(_t("image_embeds", ("batch", config.num_image_tokens, h)),
                     # a region extractor's build: the tower's patch features before the projector (what it pools)
                     *((_t("patch_features", ("batch", v.num_patches, config.mm_hidden_size)),)
                       if config.region_encoder else ()))),
        names.GRAPH_LLM: GraphSpec(
            names.GRAPH_LLM,
            inputs=(_t("inputs_embeds", ("batch", "sequence", h)),
                    _t("attention_mask", ("batch", "total"), "int64"),
                    _t("position_ids", ("batch", "sequence"), "int64"), *kv_in),
            outputs=(_t("logits", ("batch", llm.vocab_size)), _t("hidden", ("batch", h)), *kv_out))}
    if config.projector is not None:            # generation (NExT-GPT): the generator's specs are its own sizes
        return {**common, names.GRAPH_PROJECTOR: projector_spec(config.projector)}
    if config.objects is not None:
        o = config.objects
        s, f, k = o.image_size, o.feature_size, o.max_proposals
        return {**common,
                names.GRAPH_PROPOSALS: GraphSpec(
                    names.GRAPH_PROPOSALS,
                    inputs=(_t("pixels", (1, 3, s, s)),),
                    outputs=(_t("boxes", (1, k, 4)), _t("scores", (1, k)),
                             _t("features", (1, o.feature_channels, f, f)))),
                names.GRAPH_OBJECT_FEATURES: GraphSpec(
                    names.GRAPH_OBJECT_FEATURES,
                    inputs=(_t("features", (1, o.feature_channels, f, f)), _t("boxes", ("boxes", 4)),
                            _t("indices", ("boxes",), "int64")),
                    outputs=(_t("rows", ("boxes", h)),))}
    c, g = sam.prompt_embed_dim, sam.embedding_size
    return {
        **common,
        names.GRAPH_LOC_HEADS: GraphSpec(
            names.GRAPH_LOC_HEADS,
            inputs=(_t("hidden", ("detections", h)), _t("boxes", ("boxes", 4)),
                    # a region extractor's build: a user's region (is_region 1) is encoded from the image's patches
                    *((_t("patch_features", (1, v.num_patches, config.mm_hidden_size)),
                       _t("is_region", ("boxes",), "int64")) if config.region_encoder else ())),
            outputs=(_t("box", ("detections", 4)), _t("feedback", ("detections", h)),
                     _t("seg_prompt", ("detections", 4, c)), _t("loc_embeds", ("boxes", h)))),
        names.GRAPH_SAM_ENCODER: GraphSpec(
            names.GRAPH_SAM_ENCODER,
            inputs=(_t("image", (1, 3, sam.image_size, sam.image_size)),),
            outputs=(_t("image_embedding", (1, c, g, g)),)),
        names.GRAPH_SAM_DECODER: GraphSpec(
            names.GRAPH_SAM_DECODER,
            inputs=(_t("image_embedding", (1, c, g, g)), _t("boxes", ("detections", 4)),
                    _t("seg_prompt", ("detections", 4, c))),
            outputs=(_t("low_res_masks", ("detections", 1, sam.low_res_size, sam.low_res_size)),
                     _t("iou", ("detections", 1)))),
    }


def projector_spec(sizes: ProjectorSizes) -> GraphSpec:
    """NExT-GPT's output projector: the N signal tokens' final-norm LLM hiddens and their input embedding rows (both
    [batch, N, H], N = sizes.num_signal_tokens, fixed) -> conditioning [batch, num_queries, out_dim], the generator's
    `encoder_hidden_states` (nxc.model.nextgpt_projector)."""
    n, h = sizes.num_signal_tokens, sizes.llm_hidden
    return GraphSpec(names.GRAPH_PROJECTOR,
                     inputs=(_t("hidden", ("batch", n, h)), _t("embeds", ("batch", n, h))),
                     outputs=(_t("conditioning", ("batch", sizes.num_queries, sizes.out_dim)),))


def generator_specs(sizes: GeneratorSizes) -> dict[str, GraphSpec]:
    """The generator's two graphs (nxc.model.generator), float32 I/O at every precision; `batch` is dynamic (the
    runtime's denoiser call is 2 rows, [unconditional, conditional]), every other axis fixed by `sizes`.

        denoiser        sample [B,C,h,w] (the scheduler's scaled input), timestep [B] (float, 0..num_train - 1),
                        encoder_hidden_states [B,L,D] ─▶ noise [B,C,h,w] (epsilon prediction)
                        GLIGEN (sizes.grounded) also: boxes [B,N,4] (xyxy in [0, 1]), phrase_embeddings [B,N,P],
                        object_mask [B,N] (1 = a phrase), grounding [B] (1 = gated attention on, 0 = off: the
                        pipeline's enable_fuser); sample has C + inpaint_channels channels for the inpainting UNet
        latent_decoder  latents [B,C,h,w] (raw, as the sampler ends) ─▶ pixels [B,3,H,W], RGB in [0, 1]
        latent_encoder  (grounded only: editing) pixels [B,3,H,W] in [0, 1] ─▶ latent_mean, latent_std [B,C,h,w],
                        the VAE posterior's, times scaling_factor (a latent = mean + std * standard normal)"""
    c, h, w = sizes.latent_channels, sizes.latent_height, sizes.latent_width
    latent = ("batch", c, h, w)
    pixels = ("batch", 3, sizes.image_height, sizes.image_width)
    grounding = ()
    if sizes.grounded:
        n = sizes.grounding_objects
        grounding = (_t("boxes", ("batch", n, 4)), _t("phrase_embeddings", ("batch", n, sizes.phrase_dim)),
                     _t("object_mask", ("batch", n)), _t("grounding", ("batch",)))
    specs = {
        names.GRAPH_DENOISER: GraphSpec(
            names.GRAPH_DENOISER,
            inputs=(_t("sample", ("batch", c + sizes.inpaint_channels, h, w)), _t("timestep", ("batch",)),
                    _t("encoder_hidden_states", ("batch", sizes.context_length, sizes.cross_attention_dim)),
                    *grounding),
            outputs=(_t("noise", latent),)),
        names.GRAPH_LATENT_DECODER: GraphSpec(
            names.GRAPH_LATENT_DECODER,
            inputs=(_t("latents", latent),),
            outputs=(_t("pixels", pixels),)),
    }
    if sizes.grounded:
        specs[names.GRAPH_LATENT_ENCODER] = GraphSpec(
            names.GRAPH_LATENT_ENCODER, inputs=(_t("pixels", pixels),),
            outputs=(_t("latent_mean", latent), _t("latent_std", latent)))
    return specs


def text_encoder_spec(sizes: GeneratorSizes) -> GraphSpec:
    """The generator's optional text encoder (a diffusers folder's text_encoder/, transformers' CLIPTextModel):
    input_ids [B,L] int64 (its CLIP tokenizer's ids, padded to L = context_length) ─▶ conditioning [B,L,D], the
    last hidden state the denoiser's encoder_hidden_states take (as StableDiffusionPipeline.encode_prompt), and
    pooled [B,D], its pooler output (the row at the first end-of-text token: GLIGEN's phrase embedding)."""
    return GraphSpec(names.GRAPH_TEXT_ENCODER,
                     inputs=(_t("input_ids", ("batch", sizes.context_length), "int64"),),
                     outputs=(_t("conditioning", ("batch", sizes.context_length, sizes.cross_attention_dim)),
                              _t("pooled", ("batch", sizes.cross_attention_dim))))


def axis_ranges(max_context: int, *, max_batch: int = 1, max_detections: int = 16,
                max_boxes: int = 16, prefill_opt: int = 0) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) per dynamic axis: the optimisation profiles a TensorRT build needs, kept in the manifest.
    `past` may be 0 (the prefill); `sequence` opt is the usual prefill length when given, else 1 (decode)."""
    if max_context < 2:
        raise ValueError(f"max_context must be at least 2, got {max_context}")
    return {"batch": (1, 1, max_batch),
            "sequence": (1, prefill_opt or 1, max_context),
            "past": (0, max_context // 2, max_context - 1),
            "total": (1, max_context // 2 + 1, max_context),
            "detections": (1, 1, max_detections),
            "boxes": (1, 1, max_boxes)}
