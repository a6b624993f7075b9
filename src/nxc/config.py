"""Model sizes as frozen dataclasses, with a registry of named sizes. Torch-free.

Every size the kit uses comes from here (and, in a build, from the manifest): nothing else
assumes 7B, 336 px or SAM ViT-H. `NextChatConfig` is what `config.json` of a NExT-Chat
checkpoint plus its CLIP directory plus its SAM weights describe together.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Fields that mark a config.json as NExT-Chat's (reference §6.1). Without them the file is a
# plain LLaMA config and loading it as NExT-Chat would silently build the wrong model.
NEXTCHAT_FIELDS = ("use_mm_proj", "mm_hidden_size", "mm_depth", "mm_vision_select_layer", "mm_use_im_start_end")
LLAMA_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


class ConfigError(ValueError):
    """A config.json (or a size) is not what nxc can build: the message says which field and what to do."""


@dataclass(frozen=True)
class LlamaSizes:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class VisionSizes:
    """CLIP vision tower (from the CLIP directory's config)."""
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class SamSizes:
    """SAM image encoder, prompt encoder and mask decoder."""
    image_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 1280
    encoder_depth: int = 32
    encoder_num_heads: int = 16
    encoder_global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    iou_head_depth: int = 3

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for SAM at 1024 px)."""
        return self.image_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Side of the low-resolution mask logits (4x the grid: 256 for SAM at 1024 px)."""
        return 4 * self.embedding_size


@dataclass(frozen=True)
class ObjectSizes:
    """The retrieval family's own parts (nxc.model.retrieval; config.json "objects"): the square frame the proposal
    detector and the object encoder read, the encoder's levels, and the proposals kept."""
    image_size: int = 128                       # side of the square frame (white pad, centred, as CLIP's)
    channels: tuple[int, ...] = (32, 64, 96)    # object encoder levels, strides 4, 8, 16
    roi_size: int = 7                           # RoI-align bins, mean-pooled
    box_frequencies: int = 16                   # sine embedding of the box: 4 coordinates x (sin, cos) x this
    max_proposals: int = 16                     # the proposals graph's fixed K (top-k inside the graph)
    score_threshold: float = 0.3                # applied after the graph (nxc.proposal_filter), with NMS
    nms_iou: float = 0.5
    proposals: dict = field(default_factory=dict, compare=False, hash=False)   # the detector's sizes

    @property
    def feature_size(self) -> int:
        """Side of the object encoder's feature map (stride 4)."""
        return self.image_size // 4

    @property
    def feature_channels(self) -> int:
        return sum(self.channels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ObjectSizes":
        return cls(**{**d, "channels": tuple(d["channels"])})


@dataclass(frozen=True)
class GeneratorSizes:
    """A latent diffusion generator's sizes (diffusers' UNet2DConditionModel + AutoencoderKL, read by
    nxc.model.generator; a build's manifest "generator.sizes"). The denoiser works on latents
    [latent_channels, latent_height, latent_width] conditioned on [context_length, cross_attention_dim] rows (SD-1.5:
    the text encoder's 77 x 768); the decoder makes pixels [3, image_height, image_width], each side
    vae_scale_factor x the latent's, from raw latents divided by scaling_factor inside the graph."""
    latent_channels: int
    latent_height: int
    latent_width: int
    vae_scale_factor: int
    scaling_factor: float
    context_length: int
    cross_attention_dim: int
    # GLIGEN (UNet2DConditionModel(attention_type="gated")): the denoiser also takes `grounding_objects` slots of
    # boxes and phrase embeddings ([phrase_dim], the text encoder's pooled output); 0 = not a grounded UNet.
    # inpaint_channels: GLIGEN's inpainting UNet takes [masked source latents, mask] beside the latents (5 = 4 + 1)
    grounding_objects: int = 0
    phrase_dim: int = 0
    inpaint_channels: int = 0

    @property
    def grounded(self) -> bool:
        return self.grounding_objects > 0

    @property
    def image_height(self) -> int:
        return self.latent_height * self.vae_scale_factor

    @property
    def image_width(self) -> int:
        return self.latent_width * self.vae_scale_factor

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GeneratorSizes":
        return cls(**d)


GROUNDING_FAMILIES = ("regression", "retrieval", "generation")


@dataclass(frozen=True)
class NextChatConfig:
    """A grounded model's sizes. grounding "regression": NExT-Chat (location heads, SAM); "retrieval": the
    ChatRex-style family (nxc.model.retrieval: `objects` set, no SAM); "generation": the NExT-GPT family
    (nxc.model.nextgpt: `projector` set, no SAM, no objects; ONE image row, the tower's patches mean-pooled)."""
    llm: LlamaSizes
    vision: VisionSizes
    sam: SamSizes | None
    mm_hidden_size: int
    mm_depth: int = 2
    mm_vision_select_layer: int = -2
    mm_use_im_start_end: bool = True
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    objects: ObjectSizes | None = None
    projector: ProjectorSizes | None = None
    region_encoder: bool = False      # VITRON's region extractor (nxc.model.region): user boxes -> its rows

    @property
    def grounding(self) -> str:
        if self.projector is not None:
            return "generation"
        return "retrieval" if self.objects is not None else "regression"

    @property
    def num_image_tokens(self) -> int:
        return 1 if self.projector is not None else self.vision.num_patches

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        if self.objects is None:
            d.pop("objects")
        else:
            d["objects"] = self.objects.to_dict()
        if self.projector is None:
            d.pop("projector")
        if not self.region_encoder:
            d.pop("region_encoder")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NextChatConfig":
        sam = None
        if d.get("sam") is not None:
            sam = dict(d["sam"])
            sam["encoder_global_attn_indexes"] = tuple(sam["encoder_global_attn_indexes"])
            sam = SamSizes(**sam)
        objects = ObjectSizes.from_dict(d["objects"]) if d.get("objects") is not None else None
        projector = ProjectorSizes(**d["projector"]) if d.get("projector") is not None else None
        return cls(llm=LlamaSizes(**d["llm"]), vision=VisionSizes(**d["vision"]), sam=sam,
                   mm_hidden_size=d["mm_hidden_size"], mm_depth=d["mm_depth"],
                   mm_vision_select_layer=d["mm_vision_select_layer"], mm_use_im_start_end=d["mm_use_im_start_end"],
                   objects=objects, projector=projector, region_encoder=bool(d.get("region_encoder", False)))


def llama_sizes_from_config_json(cfg: dict, *, source: str = "config.json") -> LlamaSizes:
    """LLaMA sizes from a NExT-Chat config.json, after checking that it is one."""
    missing = [k for k in NEXTCHAT_FIELDS + LLAMA_FIELDS if k not in cfg]
    if missing:
        raise ConfigError(
            f"{source} is not a NExT-Chat config: missing field(s) {', '.join(missing)}. "
            "Expected a LLaMA config plus the nextchat fields "
            f"({', '.join(NEXTCHAT_FIELDS)}), as written by NExT-Chat's save_pretrained. "
            "Point nxc at the NExT-Chat checkpoint directory, not at a base LLaMA or CLIP directory.")
    if cfg.get("model_type") not in (None, "nextchat"):
        raise ConfigError(f"{source} has model_type {cfg['model_type']!r}; expected 'nextchat'.")
    rope_theta = cfg.get("rope_theta")
    if rope_theta is None:
        rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return LlamaSizes(
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=int(cfg["num_attention_heads"]),
        num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        vocab_size=int(cfg["vocab_size"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=float(rope_theta),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
    )


# Registry of named sizes (segment-anything's sam_model_registry, nanoGPT's presets).
SAM_SIZES = {
    "vit_h": SamSizes(),
    "vit_l": SamSizes(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                      encoder_global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": SamSizes(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                      encoder_global_attn_indexes=(2, 5, 8, 11)),
    # A few-MB SAM for tests: same modules, 128 px input, 8x8 grid.
    "tiny": SamSizes(image_size=128, patch_size=16, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                     encoder_global_attn_indexes=(1,), window_size=4, prompt_embed_dim=32, mask_in_chans=4,
                     decoder_depth=2, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32),
    # The embedded shapes model's SAM: 256 px input, 16x16 grid.
    "shapes": SamSizes(image_size=256, patch_size=16, encoder_embed_dim=64, encoder_depth=4, encoder_num_heads=4,
                       encoder_global_attn_indexes=(1, 3), window_size=4, prompt_embed_dim=64, mask_in_chans=8,
                       decoder_depth=2, decoder_mlp_dim=256, decoder_num_heads=8, iou_head_hidden_dim=64),
}

VISION_SIZES = {
    "clip-vit-l-336": VisionSizes(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                                  image_size=336, patch_size=14),
    # NExT-GPT's encoder, ImageBind-huge's vision trunk: ViT-H/14 at 224 px (32 layers, width 1280, 16 heads, MLP
    # 5120, GELU, LayerNorm eps 1e-6). Deviation, on purpose: it is represented as an HF CLIPVisionModel of those
    # sizes (nxc's vision graph and loaders read that layout); ImageBind's own trunk differs in details (a Conv3d
    # patch stem over the image repeated to 2 frames, nn.MultiheadAttention blocks, and a head after it: LayerNorm,
    # CLS, Linear 1280 -> 1024, L2 normalisation, whose 1024-d vector NExT-GPT's input projector reads; nxc's reads
    # the mean-pooled 1280-d patch features: Linear(1280, H)).
    "imagebind-huge": VisionSizes(hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=16,
                                  image_size=224, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu"),
    "tiny": VisionSizes(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, image_size=32, patch_size=8),
    "shapes": VisionSizes(hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, image_size=96,
                          patch_size=12),
}

LLAMA_SIZES = {
    "vicuna-7b": LlamaSizes(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                            vocab_size=32005),
    "tinyllama-1.1b": LlamaSizes(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                                 num_kv_heads=4, vocab_size=32005, max_position_embeddings=2048),
    # vocab_size is set from the tokenizer when a tiny checkpoint is made.
    "tiny": LlamaSizes(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                       vocab_size=0, max_position_embeddings=512),
}


@dataclass(frozen=True)
class ProjectorSizes:
    """NExT-GPT's output projector (`TextFcLayer`, mode "transformer"; nxc.model.nextgpt_projector): the N signal
    tokens' LLM hiddens [B,N,llm_hidden] -> Linear -> nn.Transformer(d_model) with num_queries learned queries ->
    Linear -> conditioning [B,num_queries,out_dim] (out_dim: the generator's cross-attention width)."""
    llm_hidden: int
    d_model: int
    nhead: int
    encoder_layers: int
    decoder_layers: int
    dim_feedforward: int
    num_queries: int
    out_dim: int
    num_signal_tokens: int = 4


PROJECTOR_SIZES = {
    # NExT-GPT's image projector: Vicuna-7B hiddens -> SD-1.5's 77 x 768 prompt embeddings (about 32 M parameters)
    "nextgpt": ProjectorSizes(llm_hidden=4096, d_model=512, nhead=4, encoder_layers=4, decoder_layers=4,
                              dim_feedforward=2048, num_queries=77, out_dim=768),
    "tiny": ProjectorSizes(llm_hidden=64, d_model=32, nhead=4, encoder_layers=1, decoder_layers=1,
                           dim_feedforward=64, num_queries=77, out_dim=32),
}

GENERATOR_SIZES = {
    # Stable Diffusion 1.5 at 512 x 512: latents [4, 64, 64], CLIP ViT-L/14 text rows [77, 768]
    "sd-1.5": GeneratorSizes(latent_channels=4, latent_height=64, latent_width=64, vae_scale_factor=8,
                             scaling_factor=0.18215, context_length=77, cross_attention_dim=768),
    # nxc.model.generator.make_tiny_generator's defaults: 16 x 16 pixels
    "tiny": GeneratorSizes(latent_channels=4, latent_height=8, latent_width=8, vae_scale_factor=2,
                           scaling_factor=0.18215, context_length=77, cross_attention_dim=32),
}
