"""The generation family (NExT-GPT, issue 28): the LLM answers with text and the signal tokens [IMG0]..[IMG3]; the
hiddens of those tokens go through NExT-GPT's output projector into a diffusion generator's conditioning.

    image ─▶ CLIP tower, hidden layer mm_vision_select_layer, CLS dropped, patches MEAN-pooled ─▶ [B,1,Cv]
          ─▶ mm_projector: Linear(Cv, H) ─▶ ONE LLM row per image (NExT-GPT: ImageBind's one vector, Linear)
    prompt   NExT-Chat's vicuna_v1.1 template with num_image_tokens = 1: <im_start><im_patch><im_end> (nxc.prompt)
    answer   "here it is [IMG0][IMG1][IMG2][IMG3]</s>": [IMG0] sampled, [IMG1..3] emitted after it (nxc.decode)
    picture  hiddens of the steps that FED [IMG0..3] [1,4,H] + their embedding rows ─▶ gen_text_hidden_fcs.0
             (nxc.model.nextgpt_projector.OutputProjector) ─▶ conditioning [1,L,D] ─▶ the generator (diffusers)

Deviations from NExT-GPT, on purpose: the image enters through the kit's CLIP tower (pooled) instead of
ImageBind-huge (at NExT-GPT-7B's sizes a CLIP tower of ImageBind-huge's trunk sizes, nxc.config's "imagebind-huge"),
and in the kit's prompt format (`<im_start><im_patch><im_end>`, vicuna_v1.1) instead of
NExT-GPT's `<Img>..</Img>` / `###` template, so the runtime's prompt and prefill work unchanged.

Checkpoint layout (nxc's own; NExT-GPT's is a code repository plus separate files):

    config.json         the NExT-Chat layout's LLaMA + mm fields (mm_depth 1: one Linear), "grounding":
                        "generation", "projector": ProjectorSizes, "generator": {"path", "default_steps",
                        "default_guidance", "default_scheduler"}
    model.safetensors   model.* / lm_head.* (LLaMA), model.mm_projector.* (input projector),
                        gen_text_hidden_fcs.0.* (NExT-GPT's original names for the image output projector)
    clip/               HF CLIPVisionModel directory
    generator/          diffusers folder (nxc.model.generator): unet/, vae/, scheduler/, text_encoder/ + tokenizer/
                        or uncond.npy
    tokenizer files     LLaMA tokenizer.model; added_tokens.json: the 5 NExT-Chat tokens, then [IMG0]..[IMG3]
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from nxc import names
from nxc.config import NextChatConfig, ProjectorSizes
from nxc.model.llm_steps import LlmSteps

FAMILY = "generation"
GENERATOR_SUBDIR = "generator"
DRAW_DEFAULTS = {"default_steps": 20, "default_guidance": 3.0, "default_scheduler": "ddim"}


class NextGpt(nn.Module, LlmSteps):
    """The NExT-GPT-style model for inference. `config`: NextChatConfig with `projector` set (no SAM, no objects).
    Submodule names are the checkpoint's (nxc.model.checkpoint maps `model.*` to `llm.model.*`; the output
    projector is `gen_text_hidden_fcs.0`, as NExT-GPT's)."""

    def __init__(self, *, config: NextChatConfig, llm_device: str | None = None, parts_device: str | None = None):
        """llm_device="meta": the LLaMA has names and shapes but no storage (the export writes its graph from the
        checkpoint, nxc.export.llm_writer); parts_device="meta": likewise the vision tower and the input projector,
        made real per graph by nxc.model.parts.LazyParts. The output projector is always real (32 M parameters)."""
        super().__init__()
        import contextlib

        from transformers import CLIPVisionModel, LlamaForCausalLM

        from nxc.model.nextchat import build_projector, clip_config, llama_config
        from nxc.model.nextgpt_projector import OutputProjector
        self.config = config
        with torch.device(parts_device) if parts_device else contextlib.nullcontext():
            self.vision_tower = CLIPVisionModel(clip_config(config.vision))
            self.mm_projector = build_projector(config.mm_hidden_size, config.llm.hidden_size, config.mm_depth)
        with torch.device(llm_device) if llm_device else contextlib.nullcontext():
            self.llm = LlamaForCausalLM(llama_config(config.llm))
        self.gen_text_hidden_fcs = nn.ModuleList([OutputProjector(config.projector)])

    @property
    def output_projector(self) -> nn.Module:
        return self.gen_text_hidden_fcs[0]

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B,3,R,R] CLIP-normalised -> [B,1,H]: the selected layer's patch features (CLS dropped), mean-pooled,
        then the input projector."""
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.config.mm_vision_select_layer][:, 1:]
        return self.mm_projector(feats.mean(dim=1, keepdim=True))



# -- checkpoint ----------------------------------------------------------------------------------------------------
def is_nextgpt_checkpoint(ckpt) -> bool:
    try:
        return json.loads((Path(ckpt) / "config.json").read_text()).get("grounding") == FAMILY
    except (OSError, ValueError, AttributeError):
        return False


def nextgpt_config_json(config: NextChatConfig, *, generator: dict) -> dict:
    from dataclasses import asdict

    from nxc.model.writer import CLIP_SUBDIR, nextchat_config_json
    cfg = nextchat_config_json(config, clip_dir=CLIP_SUBDIR)
    cfg.pop("sam_path")
    cfg.update(architectures=["NxcNextGptForCausalLM"], grounding=FAMILY, projector=asdict(config.projector),
               generator=generator)
    return cfg


def _generator_record(ckpt: Path, cfg: dict) -> tuple[Path, dict]:
    """(the generator folder, its defaults) from config.json's "generator", checked."""
    from nxc.model.checkpoint import CheckpointError
    g = cfg.get("generator")
    if not isinstance(g, dict) or not isinstance(g.get("path"), str):
        raise CheckpointError(f"{ckpt / 'config.json'}: a generation model needs \"generator\": {{\"path\": "
                              f"\"{GENERATOR_SUBDIR}\", ...}} naming its diffusers folder; found {g!r}")
    defaults = {k: g.get(k, v) for k, v in DRAW_DEFAULTS.items()}
    path = Path(g["path"]) if Path(g["path"]).is_absolute() else ckpt / g["path"]
    return path, defaults


def load_nextgpt(ckpt, *, clip_dir=None, llm: bool = True) -> tuple[NextGpt, object]:
    """(NextGpt, SentencePieceOracle) from a generation checkpoint (module docstring's layout). The model carries
    `generator_dir`, `draw_defaults` and `clip_preprocess`. CheckpointError (GeneratorError for the generator
    folder), one line, for a missing or mismatched part.

    Weights are read one tensor at a time (nxc.model.lazy); every name and shape is checked against config.json's
    sizes from the files' headers first. llm=False (the export): the LLaMA is built on the meta device and its
    tensors are never read (nxc.export.llm_writer streams them from the checkpoint); the vision tower and the input
    projector are on the meta device too, made real per graph by `model.parts` (nxc.model.parts.LazyParts), as
    load_nextchat(llm=False) does; only the output projector is loaded here."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from nxc.model.checkpoint import (CheckpointError, internal_key, read_clip_preprocess, read_config_and_tokenizer,
                                      resolve_clip_dir)
    from nxc.model.generator import _quiet, inspect_generator
    from nxc.model.layout import check_rope_buffer, is_rope_buffer
    from nxc.model.lazy import LazyCheckpoint
    from nxc.model.nextchat import vision_sizes_from_clip

    ckpt = Path(ckpt)
    cfg, llm_sizes, tokenizer = read_config_and_tokenizer(ckpt)
    if not isinstance(cfg.get("projector"), dict):
        raise CheckpointError(f"{ckpt / 'config.json'} says grounding 'generation' but has no 'projector' sizes")
    missing = [t for t in names.SIGNAL_TOKENS if t not in tokenizer.added_token_ids]
    if missing:
        raise CheckpointError(f"{ckpt / 'added_tokens.json'} lacks the signal tokens {missing}; a generation "
                              "model's tokenizer adds [IMG0]..[IMG3] after the 5 NExT-Chat tokens")
    try:
        projector = ProjectorSizes(**cfg["projector"])
    except TypeError as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: projector {cfg['projector']} ({e})") from None
    if projector.llm_hidden != llm_sizes.hidden_size or projector.num_signal_tokens != len(names.SIGNAL_TOKENS):
        raise CheckpointError(f"{ckpt / 'config.json'}: projector llm_hidden {projector.llm_hidden} / "
                              f"num_signal_tokens {projector.num_signal_tokens}, expected {llm_sizes.hidden_size} / "
                              f"{len(names.SIGNAL_TOKENS)}")
    gen_dir, defaults = _generator_record(ckpt, cfg)
    _, _, _, gen = inspect_generator(gen_dir)                       # GeneratorError, one line
    if (gen.context_length, gen.cross_attention_dim) != (projector.num_queries, projector.out_dim):
        raise CheckpointError(f"{gen_dir}: the generator takes conditioning [{gen.context_length}, "
                              f"{gen.cross_attention_dim}], the projector makes [{projector.num_queries}, "
                              f"{projector.out_dim}]; the generator is not this model's")
    clip_path = resolve_clip_dir(ckpt, cfg, clip_dir)
    with _quiet():
        clip = (CLIPVisionModel.from_pretrained(str(clip_path), local_files_only=True, attn_implementation="eager")
                if llm else None)
        clip_cfg = clip.config if llm else CLIPVisionConfig.from_pretrained(str(clip_path), local_files_only=True)
    config = NextChatConfig(llm=llm_sizes, vision=vision_sizes_from_clip(clip_cfg), sam=None,
                            mm_hidden_size=int(cfg["mm_hidden_size"]), mm_depth=int(cfg["mm_depth"]),
                            mm_vision_select_layer=int(cfg["mm_vision_select_layer"]),
                            mm_use_im_start_end=bool(cfg["mm_use_im_start_end"]), projector=projector)
    lazy = None if llm else "meta"
    model = NextGpt(config=config, llm_device=lazy, parts_device=lazy)
    if llm:
        model.vision_tower.load_state_dict(clip.state_dict())
    del clip
    src = LazyCheckpoint(ckpt)
    for k in [k for k in src.keys() if is_rope_buffer(k)]:           # not weights: checked, then skipped
        check_rope_buffer(k, src.get(k), llm_sizes)
    official = {internal_key(k): k for k in src.keys()}
    official.pop(None, None)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("vision_tower.")}
    _check_weights(ckpt, own, {k: src.shape(o) for k, o in official.items()})
    with torch.no_grad():
        for k, t in own.items():
            if t.device.type != "meta":
                t.copy_(src.get(official[k]).to(t.dtype))
    if not llm:
        from nxc.model.parts import LazyParts
        model.parts = LazyParts(model, {k: (lambda o=o: src.get(o)) for k, o in official.items()
                                        if not k.startswith("llm.")}, clip_path)
    src.close()                                                        # (LazyParts reopens a shard when it reads)
    model.clip_preprocess = read_clip_preprocess(clip_path, int(clip_cfg.image_size))
    model.generator_dir, model.draw_defaults = gen_dir, defaults
    return model.eval(), tokenizer


def _check_weights(ckpt: Path, own: dict, shapes: dict) -> None:
    """Every weight of the model (`own`: internal name -> tensor, meta or real) in the checkpoint (`shapes`: internal
    name -> shape from the files' headers), none unexpected, every shape right; else one CheckpointError line."""
    from nxc.model.checkpoint import CheckpointError, official_key
    absent = [k for k in own if k not in shapes]
    extra = [k for k in shapes if k not in own]
    wrong = [k for k in own if k in shapes and tuple(shapes[k]) != tuple(own[k].shape)]
    if absent or extra or wrong:
        what = (f"weight {official_key(absent[0])} is missing ({len(absent)} in all)" if absent else
                f"unexpected weight {official_key(extra[0])} ({len(extra)} in all)" if extra else
                f"weight {official_key(wrong[0])} has shape {tuple(shapes[wrong[0]])}, config.json implies "
                f"{tuple(own[wrong[0]].shape)}")
        raise CheckpointError(f"{ckpt}: {what}; the weights do not match a generation model of config.json's sizes")


def write_nextgpt_tokenizer(out: Path, tokenizer_model) -> None:
    """The LLaMA tokenizer `tokenizer_model` into `out` with the 5 NExT-Chat tokens, then [IMG0]..[IMG3], added."""
    from nxc.model.sp_files import ADDED_TOKENS_JSON, write_tokenizer_files
    write_tokenizer_files(out, Path(tokenizer_model))
    added = json.loads((out / ADDED_TOKENS_JSON).read_text())
    n0 = min(added.values())
    added = {t: n0 + i for i, t in enumerate(names.ADDED_TOKENS + names.SIGNAL_TOKENS)}
    (out / ADDED_TOKENS_JSON).write_text(json.dumps(added, indent=2) + "\n")


GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}


def save_nextgpt(model: NextGpt, out, *, tokenizer_model, generator_dir, draw_defaults: dict | None = None) -> Path:
    """Write `model` in the generation layout: the LLaMA tokenizer `tokenizer_model` with the 5 NExT-Chat tokens and
    [IMG0]..[IMG3], the diffusers folder `generator_dir` copied to `out`/generator."""
    import shutil

    from safetensors.torch import save_file

    from nxc.model.checkpoint import official_key
    from nxc.model.generator import _quiet
    from nxc.model.writer import CLIP_SUBDIR

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_nextgpt_tokenizer(out, tokenizer_model)
    generator = {"path": GENERATOR_SUBDIR, **DRAW_DEFAULTS, **(draw_defaults or {})}
    (out / "config.json").write_text(json.dumps(nextgpt_config_json(model.config, generator=generator), indent=2)
                                     + "\n")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    sd = {official_key(k): v.detach().contiguous() for k, v in model.state_dict().items()
          if not k.startswith("vision_tower.")}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    with _quiet():
        model.vision_tower.save_pretrained(str(out / CLIP_SUBDIR), safe_serialization=True)
    if Path(generator_dir).resolve() != (out / GENERATOR_SUBDIR).resolve():
        shutil.copytree(generator_dir, out / GENERATOR_SUBDIR, dirs_exist_ok=True)
    return out
