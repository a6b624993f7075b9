"""Train the embedded NExT-GPT (nxc.model.nextgpt, `embedded:shapes-nextgpt`) on shapes, on CPU (issue 28 item 5).

    start: the embedded NExT-Chat's CLIP tower (frozen), its input projector (now fed the tower's patches MEAN-
           pooled: one LLM row per image, as NExT-GPT's ImageBind vector) and its LLaMA (vocabulary + [IMG0]..[IMG3],
           new rows drawn like the old ones), a new output projector sized from the generator (nxc.shapes.
           train_generator's folder: num_queries = its context length, out_dim = its cross-attention width)
    each step, one turn per row, `draw_share` of them drawing requests:
      draw  "Draw a red circle and a blue square." (5 phrasings), on a blank grey picture or a shapes scene (the
            reply must not depend on it) -> "Sure, a red circle and a blue square.[IMG0][IMG1][IMG2][IMG3]</s>"
      pope  a shapes scene, "Is there a red circle in the image?" -> "Yes" / "No" (near misses `pope_near`)
    loss: token cross-entropy on the answers (Yes/No weighted up) + l2_weight x NExT-GPT's conditioning loss: the
          output projector of the last layer's hiddens AT [IMG0..3] (after the final norm, as the runtime's signal
          head collects them) plus their embedding rows, MSE to the generator's text encoder on the caption
          (the conditioning the generator was trained with; NExT-GPT's L2 to SD's CLIP text embeddings).

`python -m nxc.shapes.train_nextgpt --out DIR --generator GEN [--init DIR]` writes the generation checkpoint layout
(nxc.model.nextgpt, GEN copied to DIR/generator) plus `training.json` (config, command, losses, minutes).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nxc import names
from nxc.config import ProjectorSizes
from nxc.prompt import Turn, render
from nxc.shapes.data import COLOURS, SHAPES, make_sample, make_scene
from nxc.shapes.generator_data import caption_of
from nxc.shapes.train import add_config_args, config_from_args, lr_at

IGNORE = -100
DRAW_PHRASINGS = ("Draw {}.", "Draw {}.", "Draw me {}.", "Paint {}.", "Make a picture of {}.")


@dataclass(frozen=True)
class NextGptTrainConfig:
    seed: int = 0
    steps: int = 1500
    batch_size: int = 16
    lr: float = 3e-4
    projector_lr: float = 1e-3
    warmup: int = 50
    draw_share: float = 0.5
    max_objects: int = 3         # objects per drawing request (the generator's captions: 1..3)
    pope_near: float = 0.8
    yes_no_weight: float = 5.0
    l2_weight: float = 1.0
    threads: int = 1
    train_vision: bool = True    # NExT-GPT freezes ImageBind; the shapes tower learns to pool for existence
    vision_lr: float = 3e-4
    presence_weight: float = 1.0  # auxiliary: a linear probe on the image row names which of the 16 objects are in
                                  # the picture (discarded after training). Without it POPE stayed at chance: the
                                  # frozen tower's pooled patches are weakly informative (a linear probe's recall
                                  # 0.54) and the LLM did not learn to read them
    d_model: int = 128           # output projector sizes (NExT-GPT's: 512, 4 heads, 4 + 4 layers, 2048)
    nhead: int = 4
    layers: int = 2
    default_steps: int = 20
    default_guidance: float = 4.0


def projector_sizes(generator_dir: Path, llm_hidden: int, cfg: NextGptTrainConfig) -> ProjectorSizes:
    from nxc.model.generator import inspect_generator
    gen = inspect_generator(generator_dir)[3]
    return ProjectorSizes(llm_hidden=llm_hidden, d_model=cfg.d_model, nhead=cfg.nhead, encoder_layers=cfg.layers,
                          decoder_layers=cfg.layers, dim_feedforward=2 * cfg.d_model,
                          num_queries=gen.context_length, out_dim=gen.cross_attention_dim)


def initial_model(generator_dir: Path, cfg: NextGptTrainConfig, init: Path | None):
    """NextGpt from the embedded NExT-Chat (module docstring); `init`: then that earlier run's vision tower and every
    tensor of its model.safetensors whose name and shape match (its output projector only if the generator's sizes
    are the same)."""
    from safetensors.torch import load_file

    from nxc.assets import embedded_checkpoint
    from nxc.config import NextChatConfig
    from nxc.model.checkpoint import internal_key, load_nextchat
    from nxc.model.nextgpt import NextGpt
    src, _ = load_nextchat(embedded_checkpoint())
    c = src.config
    llm = replace(c.llm, vocab_size=c.llm.vocab_size + len(names.SIGNAL_TOKENS))
    config = NextChatConfig(llm=llm, vision=c.vision, sam=None, mm_hidden_size=c.mm_hidden_size, mm_depth=c.mm_depth,
                            mm_vision_select_layer=c.mm_vision_select_layer,
                            mm_use_im_start_end=c.mm_use_im_start_end,
                            projector=projector_sizes(generator_dir, llm.hidden_size, cfg))
    model = NextGpt(config=config)
    model.vision_tower.load_state_dict(src.vision_tower.state_dict())
    model.mm_projector.load_state_dict(src.mm_projector.state_dict())
    sd = src.llm.state_dict()
    with torch.no_grad():
        for k, v in model.llm.state_dict().items():
            w = sd[k]
            if v.shape == w.shape:
                v.copy_(w)
            else:                       # embed_tokens / lm_head: the old rows, then [IMG0..3] drawn like them
                v[:w.shape[0]] = w
                v[w.shape[0]:] = w.mean(0) + w.std(0) * torch.randn(v.shape[0] - w.shape[0], w.shape[1])
        if init is not None:
            own = model.state_dict()
            got = {internal_key(k): t for k, t in load_file(str(init / "model.safetensors")).items()}
            same = {k: t for k, t in got.items() if k in own and own[k].shape == t.shape}
            model.load_state_dict(same, strict=False)
            from transformers import CLIPVisionModel

            from nxc.model.generator import _quiet
            from nxc.model.writer import CLIP_SUBDIR
            with _quiet():                          # the tower is saved beside model.safetensors, in clip/
                tower = CLIPVisionModel.from_pretrained(str(init / CLIP_SUBDIR), local_files_only=True)
            model.vision_tower.load_state_dict(tower.state_dict())
            print(f"[train-nextgpt] --init {init}: {len(same)} of {len(own)} tensors taken", file=sys.stderr)
    return model


class Encoder:
    """Turns -> token ids and labels in the runtime's prompt format (one image row)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        ids = tokenizer.added_token_ids
        self.im_start = ids[names.IM_START]
        self.signals = [ids[t] for t in names.SIGNAL_TOKENS]
        self.yes_no = torch.tensor([tokenizer.encode(w)[-1] for w in ("Yes", "No")])

    def encode(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        prefix = render([Turn(question)], 1)
        ids = self.tok.encode(prefix + " " + answer + names.EOS)
        n = len(self.tok.encode(prefix))
        if self.tok.encode(prefix) != ids[:n]:
            raise RuntimeError(f"the answer {answer!r} changes how its prompt tokenizes")
        return ids, [IGNORE] * n + ids[n:]


def draw_turn(rng) -> tuple[str, str, str]:
    """(request, answer, caption) for 1..3 distinct random objects."""
    k = int(rng.integers(1, 4))
    kinds = rng.choice(len(COLOURS) * len(SHAPES), size=k, replace=False)
    caption = caption_of([(list(COLOURS)[i // len(SHAPES)], SHAPES[i % len(SHAPES)]) for i in kinds])
    request = DRAW_PHRASINGS[int(rng.integers(len(DRAW_PHRASINGS)))].format(caption)
    return request, f"Sure, {caption}.{''.join(names.SIGNAL_TOKENS)}", caption


def sample_batch(model, enc: Encoder, rng, cfg: NextGptTrainConfig):
    from nxc.model import processing
    from nxc.runtime.images import blank_image
    rows, images, captions, draw_rows = [], [], [], []
    present = torch.zeros(cfg.batch_size, len(COLOURS) * len(SHAPES))
    for b in range(cfg.batch_size):
        scene = make_scene(rng, max_objects=4)
        for o in scene.objects:
            present[b, list(COLOURS).index(o.colour) * len(SHAPES) + SHAPES.index(o.shape)] = 1
        if rng.random() < cfg.draw_share:
            q, a, caption = draw_turn(rng)
            if rng.random() < 0.5:
                image = blank_image()
                present[b] = 0
            else:
                image = scene.image
            captions.append(caption)
            draw_rows.append(b)
        else:
            s = make_sample(rng, "pope", scene, pope_near=cfg.pope_near)
            q, a, image = s.question, s.answer, scene.image
        rows.append(enc.encode(q, a))
        images.append(image)
    t_max = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), t_max, dtype=torch.long)
    att = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, (x, lab) in enumerate(rows):
        ids[i, :len(x)], att[i, :len(x)], labels[i, :len(x)] = torch.tensor(x), 1, torch.tensor(lab)
    pixels = torch.cat([processing.clip_pixels(im, model.config.vision.image_size) for im in images])
    return ids, att, labels, pixels, captions, torch.tensor(draw_rows, dtype=torch.long), present


class CaptionConditioning:
    """The generator's text encoder on captions: [B, L, D], the projector's target (no gradient)."""

    def __init__(self, generator_dir: Path, context_length: int):
        from transformers import CLIPTextModel, CLIPTokenizer

        from nxc.model.generator import TEXT_ENCODER, TOKENIZER, _quiet
        with _quiet():
            self.tokenizer = CLIPTokenizer.from_pretrained(generator_dir / TOKENIZER, local_files_only=True)
            self.text = CLIPTextModel.from_pretrained(generator_dir / TEXT_ENCODER, local_files_only=True).eval()
        self.context_length = context_length

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        from nxc.shapes.generator_text import encode_captions
        return encode_captions(self.text, self.tokenizer, captions, self.context_length)


def loss_of(model, enc: Encoder, target: CaptionConditioning, batch, cfg: NextGptTrainConfig, probe=None
            ) -> tuple[torch.Tensor, dict]:
    """Cross-entropy + l2_weight x the conditioning L2 + presence_weight x `probe`'s presence loss (if given)."""
    ids, att, labels, pixels, captions, draw_rows, present = batch
    emb = model.embed_tokens(ids).clone()
    start = (ids == enc.im_start).float().argmax(1)
    row = model.encode_image(pixels)[:, 0]
    emb[torch.arange(len(ids)), start + 1] = row
    hidden = model.llm.model(inputs_embeds=emb, attention_mask=att, use_cache=False).last_hidden_state
    logits = model.llm.lm_head(hidden[:, :-1])
    lab = labels[:, 1:].reshape(-1)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab, ignore_index=IGNORE, reduction="none")
    weight = 1 + (cfg.yes_no_weight - 1) * torch.isin(lab, enc.yes_no).float()
    ce = (ce * weight).sum() / (weight * (lab != IGNORE)).sum()
    loss, info = ce, {"ce": ce.item()}
    if probe is not None:
        presence = F.binary_cross_entropy_with_logits(probe(row), present)
        loss = loss + cfg.presence_weight * presence
        info["presence"] = presence.item()
    if len(draw_rows):
        sig = torch.stack([(ids[r] == s).nonzero()[0, 0] for r in draw_rows.tolist() for s in enc.signals])
        rows = draw_rows.repeat_interleave(len(enc.signals))
        n = len(enc.signals)
        h = hidden[rows, sig].reshape(len(draw_rows), n, -1)
        e = emb[rows, sig].reshape(len(draw_rows), n, -1)
        pred = model.output_projector(h, e)
        tgt = target(captions)
        l2 = F.mse_loss(pred, tgt)
        loss = loss + cfg.l2_weight * l2
        info |= {"l2": l2.item(), "l2_rel": (l2 / tgt.var()).item()}
    with torch.no_grad():
        pred_tok = logits.reshape(-1, logits.shape[-1]).argmax(-1)
        yn = torch.isin(lab, enc.yes_no)
        info["yes_no_acc"] = (pred_tok[yn] == lab[yn]).float().mean().item() if yn.any() else float("nan")
        sg = torch.isin(lab, torch.tensor(enc.signals[:1]))
        info["img0_acc"] = (pred_tok[sg] == lab[sg]).float().mean().item() if sg.any() else float("nan")
    return loss, {"loss": loss.item(), **info}


def train(out: Path, generator_dir: Path, cfg: NextGptTrainConfig, command: str, init: Path | None = None) -> dict:
    from nxc.assets import embedded_checkpoint
    from nxc.model.nextgpt import save_nextgpt
    from nxc.model.sp_tokenizer import SentencePieceOracle
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    model = initial_model(generator_dir, cfg, init)
    tok_model = embedded_checkpoint() / "tokenizer.model"
    draw = {"default_steps": cfg.default_steps, "default_guidance": cfg.default_guidance}
    save_nextgpt(model, out / "partial", tokenizer_model=tok_model, generator_dir=generator_dir, draw_defaults=draw)
    enc = Encoder(SentencePieceOracle.from_dir(out / "partial"))
    target = CaptionConditioning(generator_dir, model.config.projector.num_queries)
    model.train()
    if not cfg.train_vision:
        model.vision_tower.eval().requires_grad_(False)
    probe = torch.nn.Linear(model.config.llm.hidden_size, len(COLOURS) * len(SHAPES)) if cfg.presence_weight else None
    new = list(model.output_projector.parameters()) + (list(probe.parameters()) if probe is not None else [])
    tables = [model.llm.model.embed_tokens.weight, model.llm.lm_head.weight]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(("llm.", "mm_projector."))
            and not any(p is t for t in tables)]
    groups = [{"params": rest, "base": cfg.lr}, {"params": tables, "base": cfg.lr},
              {"params": new, "base": cfg.projector_lr}]
    if cfg.train_vision:
        groups.append({"params": list(model.vision_tower.parameters()), "base": cfg.vision_lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    t0, log, recent = time.perf_counter(), [], []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.steps, g["base"], cfg.warmup)
        loss, info = loss_of(model, enc, target, sample_batch(model, enc, rng, cfg), cfg, probe)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        recent.append(info)
        if (step + 1) % 25 == 0 or step + 1 == cfg.steps:
            el = time.perf_counter() - t0
            avg = {k: float(np.nanmean([r.get(k, np.nan) for r in recent])) for k in recent[-1]}
            log.append({"step": step + 1, **avg})
            recent = []
            print(f"[train-nextgpt] step {step + 1}/{cfg.steps} " + " ".join(f"{k} {v:.4f}" for k, v in avg.items())
                  + f" | {el:.0f} s, eta {el / (step + 1) * (cfg.steps - step - 1):.0f} s", file=sys.stderr,
                  flush=True)
            if (step + 1) % 500 == 0 and step + 1 < cfg.steps:       # a checkpoint to look at while it trains
                save_nextgpt(model, out / "partial", tokenizer_model=tok_model, generator_dir=generator_dir,
                             draw_defaults=draw)
    model.eval()
    earlier = json.loads((init / "training.json").read_text()) if init and (init / "training.json").is_file() else None
    gen_training = generator_dir / "training.json"
    training = {"config": asdict(cfg), "command": command, "minutes": (time.perf_counter() - t0) / 60,
                "initialised_from": "the embedded NExT-Chat (vision tower, input projector, LLaMA)"
                                    + (f", then {init}" if init else ""),
                "log": log, "continued_from": earlier,
                "generator": json.loads(gen_training.read_text()) if gen_training.is_file() else None}
    if out.exists():
        for p in out.iterdir():
            if p.name != "partial":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    save_nextgpt(model, out, tokenizer_model=tok_model, generator_dir=generator_dir, draw_defaults=draw)
    (out / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    shutil.rmtree(out / "partial", ignore_errors=True)
    return training


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nxc.shapes.train_nextgpt", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--generator", required=True, help="the trained shapes generator (nxc-train-shapes-generator --out)")
    ap.add_argument("--init", help="start from this NExT-GPT checkpoint (a previous run's --out) where shapes match")
    add_config_args(ap, NextGptTrainConfig())
    a = ap.parse_args(argv)
    cfg = config_from_args(a, NextGptTrainConfig)
    train(Path(a.out), Path(a.generator), cfg, "python -m nxc.shapes.train_nextgpt " + " ".join(argv or sys.argv[1:]),
          init=Path(a.init) if a.init else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
