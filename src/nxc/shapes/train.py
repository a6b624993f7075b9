"""Train the embedded NExT-Chat on synthetic shapes, on CPU, in stages like the paper.

Stage 1: CLIP tower, projector, LLaMA and the location heads, from scratch: token cross-entropy,
         L1 + GIoU on the boxes of answer triggers, and the two cycle losses
         (loc_decoder(loc_encoder(b)) ~ b, loc_encoder(loc_decoder(h)) ~ h).
Stage 2: SAM (image encoder, prompt encoder, mask decoder) and seg_prompt_mlp, the rest frozen: BCE + Dice
         on the masks, prompted like inference (boxes from loc_decoder, prompt tokens from the trigger
         hidden). Deviation from the paper, which freezes SAM's image encoder: ours has no pretrained SAM to
         start from, so stage 2 trains the encoder too.
Writes the official checkpoint layout plus `training.json` (config, seed, losses, timings). CLI: nxc.shapes.train_cli.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nxc import names
from nxc.config import SAM_SIZES, VISION_SIZES, LlamaSizes, NextChatConfig
from nxc.prompt import SLOT

import torch
import torch.nn.functional as F

from nxc.model.nextchat import NextChat
from nxc.model.sam import nextchat_sam_decode
from nxc.shapes.batching import IGNORE, Batch, make_batch, sam_target, sample_conversation, vision_targets

SHAPES_VISION = VISION_SIZES["shapes"]
SHAPES_SAM = SAM_SIZES["shapes"]


def shapes_llm(vocab_size: int) -> LlamaSizes:
    return LlamaSizes(hidden_size=192, intermediate_size=512, num_layers=4, num_heads=6, num_kv_heads=2,
                      vocab_size=vocab_size, max_position_embeddings=1024)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    stage0_steps: int = 1500
    stage1_steps: int = 4500
    stage2_steps: int = 400
    batch_size: int = 16
    lr: float = 1e-3
    sam_lr: float = 1e-3
    warmup: int = 100
    box_l1_weight: float = 5.0
    giou_weight: float = 2.0
    cycle_weight: float = 1.0
    dense_weight: float = 1.0
    look_weight: float = 0.5
    word_weight: float = 0.5
    vision_lr_scale: float = 0.3   # stage 1 keeps the stage-0 vision features mostly as they are
    curriculum: float = 0.3        # stage 1 grows max objects per scene 1 -> 4 over this fraction of its steps
    threads: int = 2
    vocab_size: int = 1200
    iou_weight: float = 1.0        # stage 2: SAM's IoU-score head (0 in the first two runs of the shipped model)
    sorted_giou: bool = False      # the first recipe's GIoU (see sorted_giou_loss)
    init: str | None = None        # start from this checkpoint instead of random weights
    task_weights: dict | None = None   # stage 1 task mix (None: batching.TASK_WEIGHTS)
    pope_near: float = 0.5         # share of absent POPE objects that share a colour or shape with a present one
    look_absent: bool = False      # POPE about an absent object: the look heads attend to the background
    yes_no_weight: float = 1.0     # cross-entropy weight of the "Yes"/"No" answer tokens (POPE)
    box_only_prob: float = 0.0     # stage 2: share of images whose SAM prompt is the box alone (no seg_prompt rows:
                                   # what a module call's segment / track backend gives SAM)
    extra: dict = field(default_factory=dict)


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean (1 - GIoU) of [N,4] xyxy boxes. Corners are NOT sorted: a box with x2 < x1 has no area, so the loss
    agrees with L1 on which corner is which (sorting them made "y1 and y2 swapped" a stable minimum)."""
    area = lambda b: (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)  # noqa: E731
    lt, rb = torch.maximum(pred[:, :2], target[:, :2]), torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    union = area(pred) + area(target) - inter
    iou = inter / union.clamp(min=1e-6)
    elt = torch.minimum(torch.minimum(pred[:, :2], pred[:, 2:]), target[:, :2])
    erb = torch.maximum(torch.maximum(pred[:, :2], pred[:, 2:]), target[:, 2:])
    enclose = (erb - elt).clamp(min=0).prod(1)
    return (1 - (iou - (enclose - union) / enclose.clamp(min=1e-6))).mean()


def sorted_giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The first recipe's GIoU, with the predicted corners sorted. Kept only so that the shipped checkpoint's
    first run reproduces (see training.json); it lets a model settle on swapped y1/y2, so it is off by default."""
    p = torch.stack([torch.minimum(pred[:, 0], pred[:, 2]), torch.minimum(pred[:, 1], pred[:, 3]),
                     torch.maximum(pred[:, 0], pred[:, 2]), torch.maximum(pred[:, 1], pred[:, 3])], 1)
    return giou_loss(p, target)


def add_config_args(ap, config) -> None:
    """One `--field-name` option per field of the dataclass instance `config`, its value the default (booleans
    read 1/true/yes); `config_from_args` builds the dataclass back from the parsed namespace."""
    for f, v in asdict(config).items():
        kind = (lambda x: x.lower() in ("1", "true", "yes")) if isinstance(v, bool) else type(v)
        ap.add_argument(f"--{f.replace('_', '-')}", type=kind, default=v)


def config_from_args(a, cls):
    return cls(**{f: getattr(a, f) for f in asdict(cls())})


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine to 0: the schedule of every shapes trainer (retrieval, proposals, generator,
    NExT-GPT import it)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def batch_embeds(model: NextChat, batch: Batch) -> torch.Tensor:
    """[B,T,H] embeddings: tokens, image rows after <im_start>, loc_encoder rows at <boxes>."""
    emb = model.embed_tokens(batch.ids).clone()
    feats = model.encode_image(batch.pixels)                          # [B,N,H]
    n = feats.shape[1]
    start = (batch.ids == model_ids(model)["im_start"]).float().argmax(1)
    rows = torch.arange(batch.ids.shape[0])[:, None].expand(-1, n)
    cols = start[:, None] + 1 + torch.arange(n)[None]
    emb[rows, cols] = feats
    if len(batch.slot_pos):
        emb[batch.slot_pos[:, 0], batch.slot_pos[:, 1]] = model.loc_encoder(batch.slot_boxes)
    return emb


def model_ids(model: NextChat) -> dict:
    return model._nxc_ids


def forward_hidden(model: NextChat, batch: Batch, attentions: bool = False):
    out = model.llm.model(inputs_embeds=batch_embeds(model, batch), attention_mask=batch.attention, use_cache=False,
                          output_attentions=attentions)
    return (out.last_hidden_state, out.attentions) if attentions else out.last_hidden_state


def look_loss(attentions, batch: Batch, cols: torch.Tensor, heads: int = 2, layers: int = 2) -> torch.Tensor:
    """Attention supervision: at outputs about one object, `heads` heads of the last `layers` layers put their
    mass on that object's image patches (-log of the mass). Teaches the cross-modal look-up directly."""
    if not len(batch.look_pos):
        return attentions[-1].sum() * 0
    rows, pos = batch.look_pos[:, 0], batch.look_pos[:, 1]
    target = (batch.patch_labels[rows] == batch.look_class[:, None]).float()        # [L,N]
    keep = target.sum(1) > 0
    losses = []
    for att in attentions[-layers:]:
        a = att[rows, :heads, pos]                                                    # [L,heads,T]
        a = torch.gather(a, 2, cols[rows][:, None, :].expand(-1, heads, -1))         # [L,heads,N]
        mass = (a * target[:, None]).sum(-1)[keep]
        losses.append(-torch.log(mass + 1e-4).mean())
    return torch.stack(losses).mean()


def stage0_loss(model: NextChat, head: torch.nn.Module, rng, cfg: "TrainConfig") -> tuple[torch.Tensor, dict]:
    """Dense auxiliary pretraining of the CLIP tower (our stand-in for a pretrained CLIP): each patch feature
    of the selected layer predicts which object covers it and that object's box. The head is discarded."""
    from nxc.model import processing
    from nxc.shapes.data import make_scene
    v = model.config.vision
    scenes = [make_scene(rng) for _ in range(cfg.batch_size * 2)]
    pixels = torch.cat([processing.clip_pixels(s.image, v.image_size) for s in scenes])
    targets = [vision_targets(s, v.image_size, v.patch_size) for s in scenes]
    labels = torch.stack([t[0] for t in targets])
    boxes = torch.stack([t[1] for t in targets])
    feats = model.vision_tower(pixels, output_hidden_states=True).hidden_states[model.config.mm_vision_select_layer][:, 1:]
    out = head(feats)                                                # [B,N,17+4]
    ce = F.cross_entropy(out[..., :-4].reshape(-1, out.shape[-1] - 4), labels.reshape(-1))
    obj = labels > 0
    l1 = F.l1_loss(out[..., -4:][obj], boxes[obj])
    return ce + 5 * l1, {"patch_ce": ce.item(), "patch_l1": l1.item()}


def stage1_loss(model: NextChat, batch: Batch, cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    hidden, attentions = forward_hidden(model, batch, attentions=True)
    # dense auxiliary: the LLM's output at every image position decodes (through loc_decoder) to the box of the
    # object under that patch, so that an <at> needs only to attend to the right patch and copy
    n = model.config.num_image_tokens
    start = (batch.ids == model_ids(model)["im_start"]).float().argmax(1)
    cols = start[:, None] + 1 + torch.arange(n)[None]
    patch_h = hidden[torch.arange(hidden.shape[0])[:, None], cols]          # [B,N,H]
    obj = batch.patch_labels > 0
    dense = F.l1_loss(model.loc_decoder(patch_h[obj]), batch.patch_boxes[obj]) if obj.any() else hidden.sum() * 0
    # ... and names it: lm_head at an object patch predicts the object's colour word and shape word
    ids = model_ids(model)
    if obj.any():
        k = batch.patch_labels[obj] - 1
        word_logits = model.llm.lm_head(patch_h[obj])
        words = (F.cross_entropy(word_logits, ids["colour_tok"][k // ids["n_shapes"]])
                 + F.cross_entropy(word_logits, ids["shape_tok"][k % ids["n_shapes"]]))
    else:
        words = hidden.sum() * 0
    logits = model.llm.lm_head(hidden[:, :-1])
    labels = batch.labels[:, 1:].reshape(-1)
    if cfg.yes_no_weight != 1.0:   # one answer token among dozens of template tokens: give it a louder voice
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, ignore_index=IGNORE, reduction="none")
        weight = 1 + (cfg.yes_no_weight - 1) * torch.isin(labels, ids["yes_no"]).float()
        ce = (ce * weight).sum() / (weight * (labels != IGNORE)).sum()
    else:
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, ignore_index=IGNORE)
    h_at = hidden[batch.at_pos[:, 0], batch.at_pos[:, 1]]
    pred = model.loc_decoder(h_at)
    l1 = F.l1_loss(pred, batch.at_boxes)
    giou = (sorted_giou_loss if cfg.sorted_giou else giou_loss)(pred, batch.at_boxes)
    cyc_box = F.l1_loss(model.loc_decoder(model.loc_encoder(batch.at_boxes)), batch.at_boxes)
    # embedding cycle trains loc_encoder only: loc_decoder's job is the box
    cyc_emb = F.mse_loss(model.loc_encoder(pred.detach()), h_at.detach())
    look = look_loss(attentions, batch, cols)
    loss = (ce + cfg.box_l1_weight * (l1 + cfg.dense_weight * dense) + cfg.giou_weight * giou
            + cfg.cycle_weight * (cyc_box + 0.1 * cyc_emb) + cfg.look_weight * look + cfg.word_weight * words)
    return loss, {"ce": ce.item(), "l1": l1.item(), "giou": giou.item(), "dense": dense.item(), "look": look.item(), "words": words.item(),
                  "cyc": cyc_box.item()}


def stage2_loss(model: NextChat, batch: Batch, iou_weight: float = 1.0, box_only_prob: float = 0.0
                ) -> tuple[torch.Tensor, dict]:
    """Masks prompted as at inference: box = loc_decoder(h_at), prompt tokens = seg_prompt_mlp(h_at).
    One SAM image encoding and one decoder call per image, for all its triggers."""
    from nxc.model import processing
    s = model.config.sam.image_size
    with torch.no_grad():
        hidden = forward_hidden(model, batch)
        h_at = hidden[batch.at_pos[:, 0], batch.at_pos[:, 1]]
        boxes = model.loc_decoder(h_at)
    rows = batch.at_pos[:, 0]
    losses = []
    for r in rows.unique().tolist():
        idx = (rows == r).nonzero()[:, 0]
        emb = model.sam.image_encoder(processing.sam_pixels(batch.images[r], s))
        prompt = model.seg_prompt(h_at[idx])
        if box_only_prob and torch.rand(()) < box_only_prob:      # the box alone, as a module call prompts SAM
            prompt = torch.zeros_like(prompt)
        low, iou_pred = nextchat_sam_decode(model.sam, emb, boxes[idx] * s, prompt)
        logits = F.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)[:, 0]
        target = torch.stack([sam_target(batch.at_objects[k][1].mask, s) for k in idx.tolist()])
        prob = logits.sigmoid()
        dice = 1 - (2 * (prob * target).sum((1, 2)) + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2))
        # SAM's IoU-score head learns the IoU its own thresholded mask reaches (as SAM trains it)
        hard = (logits.detach() > 0).float()
        actual = (hard * target).sum((1, 2)) / ((hard + target).clamp(max=1).sum((1, 2))).clamp(min=1)
        losses.append(bce + dice + iou_weight * F.mse_loss(iou_pred[:, 0], actual, reduction="none"))
    loss = torch.cat(losses).mean()
    return loss, {"mask": loss.item()}


class Progress:
    """One line per report: stage, step/total, losses, elapsed and ETA."""

    def __init__(self, stage: str, total: int, every: int = 25):
        self.stage, self.total, self.every, self.t0 = stage, total, every, time.perf_counter()
        self.acc: dict[str, list] = {}

    def update(self, step: int, stats: dict) -> None:
        for k, v in stats.items():
            self.acc.setdefault(k, []).append(v)
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            el = time.perf_counter() - self.t0
            eta = el / (step + 1) * (self.total - step - 1)
            avg = " ".join(f"{k} {np.mean(v):.4f}" for k, v in self.acc.items())
            print(f"[{self.stage}] {step + 1}/{self.total} {avg} | {el / 60:.1f} min, eta {eta / 60:.1f} min",
                  flush=True)
            self.acc = {}


def _run_stage(name, model, params, steps, lr, cfg, rng, tokenizer, loss_fn, text: bool = True) -> list:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    base = [g["lr"] * g.get("lr_scale", 1.0) for g in opt.param_groups]
    prog, history = Progress(name, steps), []
    ids = model_ids(model)
    for step in range(steps):
        for g, b in zip(opt.param_groups, base):
            g["lr"] = lr_at(step, steps, b, cfg.warmup)
        if text:
            ramp = name.startswith("stage1") and not cfg.init
            max_obj = min(4, 1 + int(4 * step / max(1, cfg.curriculum * steps))) if ramp else 4
            convs = [sample_conversation(rng, max_objects=max_obj, task_weights=cfg.task_weights,
                                         pope_near=cfg.pope_near) for _ in range(cfg.batch_size)]
            batch = make_batch(convs, tokenizer, image_size=model.config.vision.image_size,
                               num_image_tokens=model.config.num_image_tokens, at_id=ids["at"],
                               boxes_id=ids["boxes"], look_absent=cfg.look_absent)
        else:
            batch = rng
        loss, stats = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        prog.update(step, stats)
        history.append(stats)
    return history


def build_tokenizer(work: Path):
    from nxc.model.sp_files import train_sentencepiece, write_tokenizer_files
    from nxc.model.sp_tokenizer import SentencePieceOracle
    from nxc.shapes.data import corpus_sentences
    text = corpus_sentences() + [names.SYSTEM_PROMPT, "USER: ASSISTANT:"]
    # 4.31's legacy=False drops the word-start marker of the first word after an added token ("Where" after
    # <im_end>, "and" after <boxes>): the same texts with a quote in those places make such forms pieces too,
    # so that they never become <unk>
    quoted = [t.replace(SLOT + " ", '"') for t in text]
    text = [t.replace(SLOT + " ", "") for t in text] + quoted + ['"' + t for t in quoted]
    sp_path = train_sentencepiece(text, work / "sp", vocab_size=TrainConfig.vocab_size)
    write_tokenizer_files(work / "tok", sp_path)
    return SentencePieceOracle.from_dir(work / "tok"), sp_path


def train(out_dir: str | Path, cfg: TrainConfig = TrainConfig()) -> Path:
    import tempfile

    from nxc.model.writer import save_nextchat

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.init:   # continue from a checkpoint this script wrote (stage 0 is then usually skipped)
            from nxc.model.checkpoint import load_nextchat
            model, tokenizer = load_nextchat(cfg.init)
            model.train()
            config, sp_path = model.config, Path(tmp) / "tokenizer.model"
            sp_path.write_bytes((Path(cfg.init) / "tokenizer.model").read_bytes())
        else:
            tokenizer, sp_path = build_tokenizer(Path(tmp))
            config = NextChatConfig(llm=shapes_llm(tokenizer.vocab_size), vision=SHAPES_VISION, sam=SHAPES_SAM,
                                    mm_hidden_size=SHAPES_VISION.hidden_size)
            model = NextChat(config=config).train()
        added = tokenizer.added_token_ids
        from nxc.shapes.data import COLOURS, SHAPES
        word = lambda w: tokenizer.encode(" " + w)[-1]  # noqa: E731  (the single "▁red"-style piece)
        model._nxc_ids = {"at": added[names.AT], "boxes": added[names.BOXES], "im_start": added[names.IM_START],
                          "colour_tok": torch.tensor([word(c) for c in COLOURS]),
                          "shape_tok": torch.tensor([word(x) for x in SHAPES]), "n_shapes": len(SHAPES),
                          "yes_no": torch.tensor([word("Yes"), word("No")])}
        print(f"shapes NExT-Chat: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
              f"vocab {tokenizer.vocab_size}", flush=True)
        head = torch.nn.Linear(config.vision.hidden_size, 1 + len(COLOURS) * len(SHAPES) + 4)
        h0 = _run_stage("stage0 vision", model, list(model.vision_tower.parameters()) + list(head.parameters()),
                        cfg.stage0_steps, cfg.lr, cfg, rng, None, lambda m, r: stage0_loss(m, head, r, cfg),
                        text=False)
        stage1 = [{"params": [p for n, p in model.named_parameters() if n.startswith("vision_tower.")],
                   "lr_scale": cfg.vision_lr_scale},
                  {"params": [p for n, p in model.named_parameters()
                              if not n.startswith(("sam.", "seg_prompt_mlp.", "vision_tower."))]}]
        h1 = _run_stage("stage1 text+boxes", model, stage1, cfg.stage1_steps, cfg.lr, cfg, rng, tokenizer,
                        lambda m, b: stage1_loss(m, b, cfg))
        t1 = time.perf_counter()
        for p in model.parameters():
            p.requires_grad_(False)
        stage2 = [p for n, p in model.named_parameters() if n.startswith(("sam.", "seg_prompt_mlp."))]
        for p in stage2:
            p.requires_grad_(True)
        model.eval()  # no dropout anywhere; eval() keeps the frozen parts deterministic
        h2 = _run_stage("stage2 masks", model, stage2, cfg.stage2_steps, cfg.sam_lr, cfg, rng, tokenizer,
                        lambda m, b: stage2_loss(m, b, cfg.iou_weight, cfg.box_only_prob))
        del model._nxc_ids
        out = save_nextchat(model.eval(), out_dir, tokenizer_model=sp_path, safetensors=True)
    t2 = time.perf_counter()
    record = {"config": asdict(cfg), "model": config.to_dict(), "minutes": {"stage1": (t1 - t0) / 60,
              "stage2": (t2 - t1) / 60, "total": (t2 - t0) / 60},
              "final": {"stage0": h0[-1] if h0 else {}, "stage1": h1[-1] if h1 else {}, "stage2": h2[-1] if h2 else {}},
              "torch": torch.__version__, "command": "nxc-train-shapes " + " ".join(sys.argv[1:])}
    if cfg.init and (Path(cfg.init) / "training.json").is_file():   # keep the whole recipe reproducible
        record["continued_from"] = json.loads((Path(cfg.init) / "training.json").read_text())
    (out / "training.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {out} in {(t2 - t0) / 60:.1f} min", flush=True)
    return out
