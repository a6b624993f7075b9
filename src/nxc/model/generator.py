"""The generator: a latent diffusion decoder in diffusers' own layout (issue 28, DESIGN 5), read as diffusers reads it.

    folder/                                    (a StableDiffusionPipeline's save_pretrained, or the tiny one below)
      unet/config.json + diffusion_pytorch_model.{safetensors,bin}     UNet2DConditionModel, epsilon prediction
      vae/config.json  + diffusion_pytorch_model.{safetensors,bin}     AutoencoderKL (its decoder is used)
      scheduler/scheduler_config.json                                  betas, spacing, prediction_type (as read)
      text_encoder/ + tokenizer/   or   uncond.npy                     the unconditional conditioning's source

`inspect_generator` checks the configs (JSON only: a folder of another architecture is refused before any weight is
read), `load_generator` loads the modules in float32, `unconditional_conditioning` is classifier-free guidance's
unconditional half ([1, L, D]: the text encoder's embedding of "", padded to L = the tokenizer's max length as
diffusers' StableDiffusionPipeline.encode_prompt pads it), so that a build ships it as a file and needs no text
encoder. `make_tiny_generator` writes a sub-MB random one in the same layout for tests; `make_sd15_generator` a
random one at Stable Diffusion 1.5's sizes (3.4 GB in float32), written one module at a time (`write_streamed`).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from nxc.config import GeneratorSizes

UNET, VAE, SCHEDULER_FILE = "unet", "vae", "scheduler/scheduler_config.json"
TEXT_ENCODER, TOKENIZER, UNCOND_FILE = "text_encoder", "tokenizer", "uncond.npy"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
ATTENTION_TYPES = ("default", "gated")
GLIGEN_OBJECTS = 30                # StableDiffusionGLIGENPipeline's max_objs: boxes / phrases slots per picture
GLIGEN_INPAINT_CHANNELS = 5        # GLIGEN's inpainting UNet: + masked source latents (4) + the mask (1)
PREDICTION_TYPES = ("epsilon",)     # the denoiser graph's output is the noise; v / sample prediction are refused
LAYOUT = ("a diffusers folder in Stable Diffusion's layout (unet/ UNet2DConditionModel, vae/ AutoencoderKL, "
          "scheduler/scheduler_config.json), e.g. a StableDiffusionPipeline's save_pretrained")

# Stable Diffusion 1.5's noise schedule, as a DDIMScheduler config (make_tiny_generator writes it)
SD15_DDIM_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                       "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                       "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading"}
# SD-1.5's UNet: UNet2DConditionModel's default config (blocks 320/640/1280/1280, 2 layers, 8 heads) except these two,
# whose defaults in diffusers 0.42 are cross_attention_dim 1280 and sample_size None
SD15_UNET = {"cross_attention_dim": 768, "sample_size": 64}
# SD-1.5's AutoencoderKL (runwayml/stable-diffusion-v1-5 vae/config.json)
SD15_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215}
SD15_CONTEXT_LENGTH = 77           # CLIP ViT-L/14's text rows: uncond.npy is [1, 77, cross_attention_dim]


class GeneratorError(ValueError):
    """A generator folder nxc cannot export: the message names the path, what was found and what to do."""


@contextlib.contextmanager
def _quiet():
    """diffusers' and transformers' loaders and writers print progress bars and advice (install accelerate) on
    every call; nxc prints its own progress. Their settings are put back afterwards."""
    import diffusers.utils.logging as d
    import transformers.utils.logging as t
    saved = [(m, m.get_verbosity(), m.is_progress_bar_enabled()) for m in (d, t)]
    for m, _, _ in saved:
        m.set_verbosity_error()
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, level, bar in saved:
            m.set_verbosity(level)
            if bar:
                m.enable_progress_bar()


def _json(folder: Path, rel: str, what: str) -> dict:
    path = folder / rel
    if not path.is_file():
        raise GeneratorError(f"{folder}: no {rel} ({what} missing); expected {LAYOUT}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GeneratorError(f"{path}: not valid JSON ({e}); copy the folder again") from None


def _part(folder: Path, part: str, cls: str) -> dict:
    """The config of a model part, checked to be `cls` with its weights beside it."""
    cfg = _json(folder, f"{part}/config.json", f"the {part}")
    if cfg.get("_class_name") != cls:
        raise GeneratorError(f"{folder / part}/config.json: a {cfg.get('_class_name')!r}, not {cls}; nxc exports "
                             f"{LAYOUT}")
    if not any((folder / part / w).is_file() for w in WEIGHT_FILES):
        raise GeneratorError(f"{folder / part}: no weights ({' or '.join(WEIGHT_FILES[:2])}); copy them beside "
                             "its config.json")
    return cfg


def _check_unet(folder: Path, unet: dict) -> None:
    where = f"{folder / UNET}/config.json"
    extra = {k: unet.get(k) for k in ("addition_embed_type", "class_embed_type", "encoder_hid_dim_type",
                                      "time_cond_proj_dim") if unet.get(k) is not None}
    if extra:
        raise GeneratorError(f"{where}: {extra} needs conditioning inputs beyond sample, timestep and "
                             "encoder_hidden_states (SDXL's added embeddings, class labels, an LCM guidance "
                             "embedding), which the denoiser graph does not have; use an SD-1.x / SD-2.x-style UNet")
    attention = unet.get("attention_type", "default")
    if attention not in ATTENTION_TYPES:
        raise GeneratorError(f"{where}: attention_type {attention!r}; nxc exports 'default' (text to image) and "
                             "'gated' (GLIGEN: boxes and phrases); 'gated-text-image' (image-grounded GLIGEN) is not "
                             "supported")
    extra = unet.get("in_channels", 0) - unet.get("out_channels", 0)
    if extra and not (attention == "gated" and extra == GLIGEN_INPAINT_CHANNELS):
        raise GeneratorError(f"{where}: in_channels {unet.get('in_channels')} != out_channels "
                             f"{unet.get('out_channels')} (an inpainting or depth UNet); nxc takes a text-to-image "
                             f"UNet, or GLIGEN's inpainting UNet (attention_type 'gated', {GLIGEN_INPAINT_CHANNELS} "
                             "more input channels)")
    dims = unet.get("cross_attention_dim")
    if isinstance(dims, list) and len(set(dims)) == 1:
        dims = dims[0]
    if not isinstance(dims, int):
        raise GeneratorError(f"{where}: cross_attention_dim {dims!r}; expected one width for every block")


def _context_length(folder: Path, width: int) -> int:
    """L of the conditioning [1, L, D]: the tokenizer's max length (text encoder present) or uncond.npy's."""
    if (folder / TEXT_ENCODER).is_dir() and (folder / TOKENIZER).is_dir():
        tok = _json(folder, f"{TOKENIZER}/tokenizer_config.json", "the tokenizer's config")
        enc = _json(folder, f"{TEXT_ENCODER}/config.json", "the text encoder's config")
        if enc.get("hidden_size") != width:
            raise GeneratorError(f"{folder / TEXT_ENCODER}/config.json: hidden_size {enc.get('hidden_size')}, but "
                                 f"the UNet's cross_attention_dim is {width}; the text encoder is not this UNet's")
        n = tok.get("model_max_length")
        return int(n) if isinstance(n, int) and n < 1 << 20 else int(enc["max_position_embeddings"])
    path = folder / UNCOND_FILE
    if not path.is_file():
        raise GeneratorError(f"{folder}: no unconditional conditioning: expected {TEXT_ENCODER}/ + {TOKENIZER}/ "
                             f"(nxc embeds \"\" with them) or {UNCOND_FILE} (float32 [1, L, {width}], the text "
                             "encoder's embedding of \"\"); add one of them")
    a = np.load(path, mmap_mode="r")
    if a.dtype != np.float32 or a.ndim != 3 or a.shape[0] != 1 or a.shape[2] != width:
        raise GeneratorError(f"{path}: {a.dtype} {list(a.shape)}, expected float32 [1, L, {width}] (the "
                             "UNet's cross_attention_dim); write the text encoder's embedding of \"\"")
    return int(a.shape[1])


def inspect_generator(folder: str | Path) -> tuple[dict, dict, dict, GeneratorSizes]:
    """(unet config, vae config, scheduler config, sizes) of a generator folder, read from its JSON files (and
    uncond.npy's header) only; GeneratorError, one line, for a missing part or another architecture."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GeneratorError(f"{folder}: no such folder; expected {LAYOUT}")
    unet = _part(folder, UNET, "UNet2DConditionModel")
    vae = _part(folder, VAE, "AutoencoderKL")
    scheduler = _json(folder, SCHEDULER_FILE, "the scheduler's config")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise GeneratorError(f"{folder / SCHEDULER_FILE}: prediction_type {prediction!r}; nxc's denoiser graph and "
                             f"samplers take {' or '.join(PREDICTION_TYPES)} prediction (e.g. SD-1.5, SD-2-base), not "
                             "v-prediction (SD-2 768 px)")
    _check_unet(folder, unet)
    gated = unet.get("attention_type", "default") == "gated"
    if gated and not (folder / TEXT_ENCODER).is_dir():
        raise GeneratorError(f"{folder}: a GLIGEN UNet (attention_type 'gated') embeds its phrases with the text "
                             f"encoder; the folder has no {TEXT_ENCODER}/ and {TOKENIZER}/")
    if not unet["out_channels"] == vae.get("latent_channels"):
        raise GeneratorError(f"{folder}: the UNet takes {unet['in_channels']} latent channels, the VAE makes "
                             f"{vae.get('latent_channels')}; unet/ and vae/ are not one model's")
    if vae.get("out_channels") != 3:
        raise GeneratorError(f"{folder / VAE}/config.json: out_channels {vae.get('out_channels')}; expected an RGB "
                             "VAE (3)")
    side = unet["sample_size"]
    h, w = (side, side) if isinstance(side, int) else tuple(side)
    width = unet["cross_attention_dim"]
    width = width[0] if isinstance(width, list) else width
    sizes = GeneratorSizes(latent_channels=unet["out_channels"], latent_height=h, latent_width=w,
                           vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
                           scaling_factor=float(vae.get("scaling_factor", 0.18215)),
                           context_length=_context_length(folder, width), cross_attention_dim=width,
                           grounding_objects=GLIGEN_OBJECTS if gated else 0, phrase_dim=width if gated else 0,
                           inpaint_channels=unet["in_channels"] - unet["out_channels"])
    return unet, vae, scheduler, sizes


def load_generator(folder: str | Path):
    """(unet, vae, scheduler config dict as read, sizes): diffusers' UNet2DConditionModel and AutoencoderKL in
    float32, eval mode, from local files only."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    folder = Path(folder)
    _, _, scheduler, sizes = inspect_generator(folder)
    with _quiet():
        unet = UNet2DConditionModel.from_pretrained(folder / UNET, local_files_only=True, torch_dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(folder / VAE, local_files_only=True, torch_dtype=torch.float32)
    return unet.eval(), vae.eval(), scheduler, sizes


def unconditional_conditioning(folder: str | Path) -> np.ndarray:
    """float32 [1, L, D]: transformers' CLIPTextModel's last hidden state of "" tokenized by the folder's
    CLIPTokenizer, padded to its model_max_length (StableDiffusionPipeline.encode_prompt's negative prompt), when
    text_encoder/ and tokenizer/ are there; else the folder's uncond.npy."""
    folder = Path(folder)
    _, _, _, sizes = inspect_generator(folder)             # refuses a folder without a source, or a wrong shape
    if not ((folder / TEXT_ENCODER).is_dir() and (folder / TOKENIZER).is_dir()):
        return np.load(folder / UNCOND_FILE)
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer
    with _quiet():
        tokenizer = CLIPTokenizer.from_pretrained(folder / TOKENIZER, local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(folder / TEXT_ENCODER, local_files_only=True,
                                                torch_dtype=torch.float32).eval()
    ids = tokenizer([""], padding="max_length", max_length=sizes.context_length, truncation=True,
                    return_tensors="pt")
    mask = ids.attention_mask if getattr(encoder.config, "use_attention_mask", False) else None
    with torch.no_grad():
        rows = encoder(ids.input_ids, attention_mask=mask)[0]
    return rows.float().numpy()


def _byte_chars() -> list[str]:
    """GPT-2 / CLIP's byte-to-unicode table: the 256 symbols a byte-level BPE vocabulary starts from."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in bs]
    return [chr(b) for b in bs] + [chr(256 + i) for i in range(len(extra))]


def _write_tiny_text_encoder(out: Path, *, width: int, context_length: int, layers: int = 2) -> None:
    """A CLIPTokenizer with no merges (each byte a token, "</w>" ends a word) and a `layers`-layer CLIPTextModel
    (CLIP ViT-L/14's text tower is 12 x 768, MLP 3072, 12 heads)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab |= {bos: 512, eos: 513}
    (out / TOKENIZER).mkdir(parents=True, exist_ok=True)
    (out / TOKENIZER / "vocab.json").write_text(json.dumps(vocab))
    (out / TOKENIZER / "merges.txt").write_text("#version: 0.2\n")
    (out / TOKENIZER / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "bos_token": bos,
         "eos_token": eos, "pad_token": eos, "unk_token": eos}))
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=(2 if layers <= 2 else 4) * width,
                         num_hidden_layers=layers, num_attention_heads=4 if layers <= 2 else width // 64, max_position_embeddings=context_length, projection_dim=width,
                         bos_token_id=512, eos_token_id=513, pad_token_id=513)
    CLIPTextModel(cfg).save_pretrained(out / TEXT_ENCODER)


def make_tiny_generator(out: str | Path, *, seed: int = 0, context_length: int = 77, cross_attention_dim: int = 32,
                        latent_size: int = 8, text_encoder: bool = True, gated: bool = False,
                        inpainting: bool = False) -> Path:
    """A random-weight generator in diffusers' layout at `out`: UNet2DConditionModel (blocks 32/64, one layer each,
    cross-attention width `cross_attention_dim`, latents [4, latent_size, latent_size]), AutoencoderKL (blocks
    32/64: pixels 2x the latent side), SD-1.5's DDIM schedule, and a tiny CLIP text encoder + tokenizer
    (`text_encoder`) or, without them, a random uncond.npy [1, context_length, cross_attention_dim].
    `gated`: GLIGEN's UNet (attention_type "gated"; its gates alpha_attn / alpha_dense set to random values in
    [0.5, 1.5] rather than GLIGEN's initial 0, so that the grounding changes the noise); `inpainting`: GLIGEN's
    inpainting UNet (9 input channels)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if inpainting and not gated:
        raise ValueError("an inpainting UNet here is GLIGEN's: pass gated=True with inpainting=True")
    with torch.random.fork_rng(), _quiet():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=latent_size, in_channels=4 + (GLIGEN_INPAINT_CHANNELS if inpainting else 0), out_channels=4,
            block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
            attention_type="gated" if gated else "default")
        if gated:
            with torch.no_grad():
                for name, p in unet.named_parameters():
                    if name.endswith(("alpha_attn", "alpha_dense")):
                        p.uniform_(0.5, 1.5)
        unet.save_pretrained(out / UNET)
        AutoencoderKL(
            in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=4, norm_num_groups=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            sample_size=2 * latent_size,
        ).save_pretrained(out / VAE)
        DDIMScheduler(**SD15_DDIM_SCHEDULER).save_config(out / "scheduler")
        if text_encoder:
            _write_tiny_text_encoder(out, width=cross_attention_dim, context_length=context_length)
        else:
            rng = np.random.default_rng(seed)
            np.save(out / UNCOND_FILE, rng.standard_normal((1, context_length, cross_attention_dim)).astype(np.float32))
    return out


# -- a generator at true size, one module at a time ------------------------------------------------------------
_ST_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def write_streamed(model, folder: Path, dtype=None) -> None:
    """`model` (a diffusers ModelMixin built on the meta device) -> folder/config.json +
    diffusion_pytorch_model.safetensors in `dtype` (float32 by default), one module at a time: each module is
    materialised on the CPU, initialised as PyTorch initialises it (reset_parameters; normal(0, 0.02) / zeros where a
    module has none, under the caller's torch seed), written, and dropped. Peak memory: the largest module."""
    import torch
    dtype = dtype or torch.float32
    size = dtype.itemsize
    model.save_config(folder)
    state = model.state_dict(keep_vars=True)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k, t in state.items():
        n = t.numel() * size
        header[k] = {"dtype": _ST_NAMES[str(dtype).removeprefix("torch.")], "shape": list(t.shape),
                     "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    written = 0
    with open(folder / "diffusion_pytorch_model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for prefix, mod in model.named_modules():
            own = dict(mod.named_parameters(recurse=False)) | dict(mod.named_buffers(recurse=False))
            if not own:
                continue
            mod.to_empty(device="cpu", recurse=False)
            with torch.no_grad():
                if hasattr(mod, "reset_parameters"):
                    mod.reset_parameters()
                else:
                    for t in own.values():
                        torch.nn.init.normal_(t, std=0.02) if t.ndim > 1 else torch.nn.init.zeros_(t)
            for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                key = f"{prefix}.{name}" if prefix else name
                if key not in header:
                    continue                                        # a non-persistent buffer
                if header[key]["data_offsets"][0] != written:
                    raise RuntimeError(f"{key}: state_dict order differs from module order; cannot stream")
                f.write(t.detach().to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())   # 0-dim: GLIGEN gates
                written += t.numel() * size
            mod.to_empty(device="meta", recurse=False)
    if written != offset:
        raise RuntimeError(f"wrote {written} bytes of tensors, expected {offset}")


def _sd15_parts(unet: dict | None, vae: dict | None) -> list:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    return [(UNET, UNet2DConditionModel, unet or SD15_UNET), (VAE, AutoencoderKL, vae or SD15_VAE)]


def sd15_numel(*, unet: dict | None = None, vae: dict | None = None) -> int:
    """Elements of the UNet and VAE `make_sd15_generator` writes (built on the meta device: nothing allocated)."""
    import torch
    with torch.device("meta"):
        return sum(sum(t.numel() for t in cls(**cfg).state_dict().values()) for _, cls, cfg in _sd15_parts(unet, vae))


def make_sd15_generator(out: str | Path, *, seed: int = 0, dtype=None, unet: dict | None = None,
                        vae: dict | None = None, gligen: bool = False, log=None) -> Path:
    """A random-weight generator at Stable Diffusion 1.5's sizes in diffusers' layout at `out`: UNet2DConditionModel
    (SD15_UNET, 860 M parameters) and AutoencoderKL (SD15_VAE, 84 M), each built on the meta device and written one
    module at a time (`write_streamed`, in `dtype`, float32 by default), SD-1.5's DDIM schedule and a random
    uncond.npy [1, 77, cross_attention_dim] (no text encoder). `unet` / `vae` replace the configs (a scaled-down
    folder for tests). Same seed, same weights. `gligen`: GLIGEN's layout (gligen-1-4-generation-text-box: SD-1.4's
    UNet with attention_type "gated", 1.07 B parameters) and, as its phrases need one, a random CLIP ViT-L/14-sized
    text encoder (12 layers x 768) with a byte-level tokenizer instead of uncond.npy."""
    import torch
    from diffusers import DDIMScheduler
    out = Path(out)
    if gligen:
        unet = {**(unet or SD15_UNET), "attention_type": "gated"}
    with torch.random.fork_rng(), _quiet():
        torch.manual_seed(seed)
        for part, cls, config in _sd15_parts(unet, vae):
            if log is not None:
                log(f"{part} ({cls.__name__}), one module at a time -> {out / part}")
            (out / part).mkdir(parents=True, exist_ok=True)
            with torch.device("meta"):
                model = cls(**config)
            write_streamed(model, out / part, dtype)
        DDIMScheduler(**SD15_DDIM_SCHEDULER).save_config(out / Path(SCHEDULER_FILE).parent)
    width = (unet or SD15_UNET)["cross_attention_dim"]
    if gligen:
        with torch.random.fork_rng(), _quiet():
            torch.manual_seed(seed + 2)
            _write_tiny_text_encoder(out, width=width, context_length=SD15_CONTEXT_LENGTH,
                                     layers=2 if width < 768 else 12)
        return out
    rows = np.random.default_rng(seed + 1).standard_normal((1, SD15_CONTEXT_LENGTH, width), dtype=np.float32)
    np.save(out / UNCOND_FILE, rows)
    return out
