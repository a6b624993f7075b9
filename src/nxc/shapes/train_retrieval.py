"""Train the embedded retrieval model (nxc.model.retrieval) on shapes, on CPU.

    start: the embedded NExT-Chat's CLIP tower, projector and LLaMA (its vocabulary + the 105 object tokens, new
           rows initialised at the mean embedding), a new object encoder, the separately trained proposal detector
           (nxc.shapes.train_proposals; frozen, as ChatRex's UPN)
    each step: conversations of 1-2 turns (ChatRex-phrased tasks, nxc.shapes.retrieval_tasks); every prompt lists
           its objects after the image (`<objN><objfeat>`, rows from the object encoder); token cross-entropy on
           the answers (Yes/No and `<objN>` weighted up). The object lists are the detector's proposals
           (`proposal_share` of the conversations; an object it misses is appended with its true box) or the true
           boxes moved a little, with a false positive or two, in random order.
    two auxiliary losses, as the shapes NExT-Chat's training has (nxc.shapes.train): a linear probe on every
           object row names its object's colour and shape (discarded after training), and two heads of the last
           two layers attend, from `<ground>` to the `<objN>`, to object N's row (`look_weight`). Without them
           the index plateaued at chance: the LLM never matched a phrase to a row.

`python -m nxc.shapes.train_retrieval --out DIR --proposals DIR` writes the retrieval checkpoint layout plus
`training.json` (config, command, losses, minutes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nxc import names
from nxc.config import ObjectSizes
from nxc.object_index import ADDED_TOKENS, MAX_OBJECTS, OBJ_FEAT
from nxc.prompt import PromptFormat, Turn, expand_region_refs, render_segments
from nxc.shapes import retrieval_tasks as rt
from nxc.shapes.batching import object_class
from nxc.shapes.data import make_sample, make_scene
from nxc.shapes.train import add_config_args, config_from_args, lr_at

IGNORE = -100
TASK_WEIGHTS = {"rec": 0.35, "caption": 0.2, "region": 0.15, "pope": 0.3}


@dataclass(frozen=True)
class RetrievalTrainConfig:
    seed: int = 0
    steps: int = 1500
    batch_size: int = 16
    lr: float = 3e-4
    pretrained_lr_scale: float = 0.3     # the NExT-Chat parts learn slower than the new ones
    warmup: int = 50
    max_turns: int = 2
    proposal_share: float = 0.5
    yes_no_weight: float = 5.0
    index_weight: float = 3.0            # cross-entropy weight of the answer's <objN> tokens
    class_weight: float = 1.0            # auxiliary: each object row names its object's colour and shape
    look_weight: float = 0.5             # auxiliary: where an answer names <objN>, two heads of the last two
                                         # layers attend to object N's row (as nxc.shapes.train's look loss)
    train_vision: bool = False           # the CLIP tower stays as NExT-Chat trained it (the projector learns)
    threads: int = 2


def initial_model(proposals_dir: Path):
    """A RetrievalChat from the embedded NExT-Chat's vision, projector and LLaMA, the trained detector, a new
    object encoder. -> (model, tokenizer dir of the NExT-Chat checkpoint)."""
    from safetensors.torch import load_file

    from nxc.assets import embedded_checkpoint
    from nxc.config import NextChatConfig
    from nxc.model.checkpoint import load_nextchat
    from nxc.model.retrieval import RetrievalChat
    src_dir = embedded_checkpoint()
    src, _ = load_nextchat(src_dir)
    meta = json.loads((proposals_dir / "proposals.json").read_text())
    c = src.config
    llm = c.llm.__class__(**{**asdict(c.llm), "vocab_size": c.llm.vocab_size + len(ADDED_TOKENS)})
    config = NextChatConfig(llm=llm, vision=c.vision, sam=None, mm_hidden_size=c.mm_hidden_size, mm_depth=c.mm_depth,
                            mm_vision_select_layer=c.mm_vision_select_layer,
                            mm_use_im_start_end=c.mm_use_im_start_end,
                            objects=ObjectSizes(image_size=meta["sizes"]["image_size"],
                                                max_proposals=meta["sizes"]["num_proposals"],
                                                proposals=meta["sizes"]))
    model = RetrievalChat(config=config)
    model.vision_tower.load_state_dict(src.vision_tower.state_dict())
    model.mm_projector.load_state_dict(src.mm_projector.state_dict())
    sd = src.llm.state_dict()
    with torch.no_grad():
        for k, v in model.llm.state_dict().items():
            w = sd[k]
            if v.shape == w.shape:
                v.copy_(w)
            else:                  # embed_tokens / lm_head: old rows; new rows drawn like the old ones, each its
                v[:w.shape[0]] = w     # own (near-equal rows would make <obj0>..<obj99> hard to tell apart)
                v[w.shape[0]:] = w.mean(0) + w.std(0) * torch.randn(v.shape[0] - w.shape[0], w.shape[1])
    model.proposal_net.load_state_dict(load_file(str(proposals_dir / "proposals.safetensors")))
    return model, src_dir


class Encoder:
    """Conversations -> token ids, labels and object boxes (the prompt format of nxc.prompt.PromptFormat)."""

    def __init__(self, tokenizer, num_image_tokens: int):
        self.tok, self.n_img = tokenizer, num_image_tokens
        ids = tokenizer.added_token_ids
        self.objfeat, self.im_start = ids[OBJ_FEAT], ids[names.IM_START]
        self.obj_index = {ids[f"<obj{i}>"]: i for i in range(MAX_OBJECTS)}
        self.ground = ids["<ground>"]
        self.obj_ids = torch.tensor(sorted(self.obj_index))
        self.yes_no = torch.tensor([tokenizer.encode(w)[-1] for w in ("Yes", "No")])

    def encode(self, samples, objects: np.ndarray, index_of: dict, rng) -> tuple[list[int], list[int], np.ndarray]:
        """One conversation on one scene: (ids, labels, boxes of its <objfeat> rows in order)."""
        image = samples[0].image
        w, h = image.size
        fmt = PromptFormat(objects=len(objects))
        turns: list[Turn] = []
        boxes = [b for b in objects]
        spans, full = [], ""
        for s in samples:
            q = rt.question(s, int(rng.integers(8)))
            _, order = expand_region_refs(q, len(s.boxes_in))
            from nxc.runtime.preprocess import normalise_boxes
            boxes += list(normalise_boxes(np.asarray([s.boxes_in[i] for i in order], np.float32).reshape(-1, 4), w, h))
            a = rt.answer(s, index_of)
            prefix = "".join(x.text for x in render_segments(turns + [Turn(q)], self.n_img, fmt=fmt))
            full = prefix + " " + a + names.EOS
            spans.append((len(self.tok.encode(prefix)), len(self.tok.encode(full))))
            turns.append(Turn(q, a))
        ids = self.tok.encode(full)
        labels = [IGNORE] * len(ids)
        for a, b in spans:
            labels[a:b] = ids[a:b]
        n_feat = sum(t == self.objfeat for t in ids)
        if n_feat != len(boxes):
            raise RuntimeError(f"{n_feat} <objfeat> in the prompt for {len(boxes)} object boxes")
        return ids, labels, np.asarray(boxes, np.float32).reshape(-1, 4)


def sample_batch(model, enc: Encoder, rng, cfg: RetrievalTrainConfig):
    from nxc.model import processing
    from nxc.proposal_filter import filter_proposals
    from nxc.runtime.preprocess import clip_pixels, normalise_boxes
    o = model.config.objects
    scenes = [make_scene(rng, max_objects=4) for _ in range(cfg.batch_size)]
    obj_px = torch.from_numpy(np.concatenate([clip_pixels(s.image, o.image_size) for s in scenes]))
    with torch.no_grad():
        pb, ps = model.proposals(obj_px)
    rows = []
    tasks, p = list(TASK_WEIGHTS), np.asarray(list(TASK_WEIGHTS.values()))
    for b, scene in enumerate(scenes):
        w, h = scene.image.size
        gt = normalise_boxes(np.asarray([ob.box for ob in scene.objects], np.float32), w, h)
        props = None
        if rng.random() < cfg.proposal_share:
            props, _ = filter_proposals(pb[b].numpy(), ps[b].numpy(), score_threshold=o.score_threshold,
                                        iou_threshold=o.nms_iou, max_out=o.max_proposals)
        objects, index_of = rt.object_list(scene.objects, gt, rng, proposals=props)
        classes = np.zeros(len(objects), np.int64)            # 0: no object (a false positive)
        for ob in scene.objects:
            classes[index_of[id(ob)]] = object_class(ob)
        n = int(rng.integers(1, cfg.max_turns + 1))
        samples = [make_sample(rng, str(t), scene) for t in rng.choice(tasks, size=n, p=p / p.sum())]
        ids_, labels_, boxes_ = enc.encode(samples, objects, index_of, rng)
        region = len(boxes_) - len(objects)                   # region boxes: the class of the object they hold
        region_cls = [object_class(s.target) for s in samples if s.boxes_in][:region]
        rows.append((ids_, labels_, boxes_, np.concatenate([classes, np.asarray(region_cls, np.int64)])))
    looks = []                  # (row, position, N's row): every answer position from <ground> to the <objN>
    for r, (x, lab, _, _) in enumerate(rows):
        feats = [p for p, t in enumerate(x) if t == enc.objfeat]
        start = None
        for p, t in enumerate(x):
            if lab[p] == IGNORE:
                continue
            if t == enc.ground:
                start = p
            n = enc.obj_index.get(t)
            if n is not None and start is not None and n < len(feats):
                looks += [(r, q, feats[n]) for q in range(start, p)]
                start = None
    t_max = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), t_max, dtype=torch.long)
    att = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, (x, lab, _, _) in enumerate(rows):
        ids[i, :len(x)], att[i, :len(x)], labels[i, :len(x)] = torch.tensor(x), 1, torch.tensor(lab)
    pixels = torch.cat([processing.clip_pixels(s.image, model.config.vision.image_size) for s in scenes])
    classes = torch.from_numpy(np.concatenate([r[3] for r in rows]))
    return (ids, att, labels, pixels, obj_px, [r[2] for r in rows], classes,
            torch.tensor(looks, dtype=torch.long).reshape(-1, 3))


def batch_embeds(model, enc: Encoder, ids, pixels, obj_px, boxes, rows_out: list | None = None) -> torch.Tensor:
    """[B,T,H]: token rows, image rows after <im_start>, object rows at every <objfeat> (in order; also appended
    to rows_out)."""
    emb = model.embed_tokens(ids).clone()
    feats = model.encode_image(pixels)
    n = feats.shape[1]
    start = (ids == enc.im_start).float().argmax(1)
    r = torch.arange(ids.shape[0])[:, None].expand(-1, n)
    emb[r, start[:, None] + 1 + torch.arange(n)[None]] = feats
    fmap = model.object_encoder.features(obj_px)
    for b, bx in enumerate(boxes):
        pos = (ids[b] == enc.objfeat).nonzero()[:, 0]
        if len(pos):
            rows = model.object_encoder.rows(fmap[b:b + 1], torch.from_numpy(bx), torch.arange(len(bx)))
            emb[b, pos] = rows
            if rows_out is not None:
                rows_out.append(rows)
    return emb


def loss_of(model, enc: Encoder, batch, cfg: RetrievalTrainConfig, classify=None) -> tuple[torch.Tensor, dict]:
    """Token cross-entropy (answers; Yes/No and <objN> weighted up) + `classify`'s auxiliary loss on the object
    rows (a linear head, trained here and discarded: it makes the rows tell colours and shapes apart)."""
    ids, att, labels, pixels, obj_px, boxes, classes, looks = batch
    obj_rows: list = []
    emb = batch_embeds(model, enc, ids, pixels, obj_px, boxes, obj_rows)
    out = model.llm.model(inputs_embeds=emb, attention_mask=att, use_cache=False,
                          output_attentions=cfg.look_weight > 0)
    hidden = out.last_hidden_state
    logits = model.llm.lm_head(hidden[:, :-1])
    lab = labels[:, 1:].reshape(-1)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab, ignore_index=IGNORE, reduction="none")
    weight = (1 + (cfg.yes_no_weight - 1) * torch.isin(lab, enc.yes_no).float()
              + (cfg.index_weight - 1) * torch.isin(lab, enc.obj_ids).float())
    loss = (ce * weight).sum() / (weight * (lab != IGNORE)).sum()
    look = torch.zeros(())
    if cfg.look_weight > 0 and len(looks):
        masses = [att_l[looks[:, 0], :2, looks[:, 1]][torch.arange(len(looks)), :, looks[:, 2]]
                  for att_l in out.attentions[-2:]]                          # [L,2] each
        look = -torch.log(torch.stack(masses) + 1e-4).mean()
        loss = loss + cfg.look_weight * look
    aux = torch.zeros(())
    if classify is not None and obj_rows:
        aux = F.cross_entropy(classify(torch.cat(obj_rows)), classes)
        loss = loss + cfg.class_weight * aux
    with torch.no_grad():
        pred = logits.reshape(-1, logits.shape[-1]).argmax(-1)
        idx = torch.isin(lab, enc.obj_ids)
        acc = (pred[idx] == lab[idx]).float().mean().item() if idx.any() else float("nan")
    return loss, {"loss": loss.item(), "index_acc": acc, "class_ce": aux.item(), "look": look.item()}


def train(out: Path, proposals_dir: Path, cfg: RetrievalTrainConfig, command: str, init: Path | None = None) -> dict:
    from nxc.model.retrieval import save_retrieval
    from nxc.model.sp_tokenizer import SentencePieceOracle
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    model, src_dir = initial_model(proposals_dir)
    earlier = None
    if init is not None:                                              # continue a run (its weights and log)
        from nxc.model.retrieval import load_retrieval
        model, _ = load_retrieval(init)
        earlier = json.loads((init / "training.json").read_text())
    save_retrieval(model, out, tokenizer_dir=src_dir)                 # the tokenizer files first: encode with them
    enc = Encoder(SentencePieceOracle.from_dir(out), model.config.num_image_tokens)
    model.train()
    model.proposal_net.eval()
    frozen = [model.proposal_net] + ([] if cfg.train_vision else [model.vision_tower])
    for part in frozen:
        part.eval()
        for prm in part.parameters():
            prm.requires_grad_(False)
    pretrained = [p for n, p in model.named_parameters()
                  if n.startswith(("vision_tower.", "mm_projector.", "llm.")) and p.requires_grad]
    new = [p for n, p in model.named_parameters() if n.startswith("object_encoder.")]
    # the token tables (embeddings, lm_head) learn at the full rate: their new rows (<objN>, the tags) start cold
    classify = torch.nn.Linear(model.config.llm.hidden_size, 1 + 16)     # background + 4 colours x 4 shapes
    new += list(classify.parameters())
    tables = [model.llm.model.embed_tokens.weight, model.llm.lm_head.weight]
    pretrained = [p for p in pretrained if not any(p is t for t in tables)]
    opt = torch.optim.AdamW([{"params": pretrained, "scale": cfg.pretrained_lr_scale},
                             {"params": new + tables, "scale": 1.0}], lr=cfg.lr, weight_decay=0.0)
    t0, log, recent = time.perf_counter(), [], []
    for step in range(cfg.steps):
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr * g["scale"]
        loss, info = loss_of(model, enc, sample_batch(model, enc, rng, cfg), cfg, classify)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent.append(info)
        if (step + 1) % 25 == 0 or step + 1 == cfg.steps:
            el = time.perf_counter() - t0
            avg = {k: float(np.nanmean([r[k] for r in recent])) for k in recent[0]}
            log.append({"step": step + 1, **avg})
            recent = []
            if (step + 1) % 300 == 0 and step + 1 < cfg.steps:       # a checkpoint to look at while it trains
                save_retrieval(model, out / "partial", tokenizer_dir=src_dir)
            print(f"[train-retrieval] step {step + 1}/{cfg.steps} loss {avg['loss']:.4f} index acc "
                  f"{avg['index_acc']:.3f} class ce {avg['class_ce']:.3f} look {avg['look']:.3f} "
                  f"lr {lr:.2e} | {el:.0f} s, eta {el / (step + 1) * (cfg.steps - step - 1):.0f} s",
                  file=sys.stderr, flush=True)
    model.eval()
    proposals_meta = json.loads((proposals_dir / "proposals.json").read_text())
    training = {"config": asdict(cfg), "command": command, "minutes": (time.perf_counter() - t0) / 60,
                "initialised_from": "the embedded NExT-Chat (vision tower, projector, LLaMA)",
                "proposals": proposals_meta.get("training", {}), "log": log, "continued_from": earlier}
    save_retrieval(model, out, tokenizer_dir=src_dir, training=training)
    return training


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nxc.shapes.train_retrieval", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--proposals", required=True, help="the trained detector (nxc.shapes.train_proposals --out)")
    ap.add_argument("--init", help="continue from this retrieval checkpoint (a previous run's --out)")
    add_config_args(ap, RetrievalTrainConfig())
    a = ap.parse_args(argv)
    cfg = config_from_args(a, RetrievalTrainConfig)
    train(Path(a.out), Path(a.proposals), cfg, "python -m nxc.shapes.train_retrieval " + " ".join(argv or sys.argv[1:]),
          init=Path(a.init) if a.init else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
