"""Train the class-agnostic proposal detector (nxc.model.proposals) on synthetic shapes, on CPU.

Scenes are drawn on the fly from a seeded generator, preprocessed as the runtime does (clip_pixels of the white
square, boxes by normalise_boxes). Loss: CenterNet's focal loss on a Gaussian centre heatmap, GIoU + L1 on the boxes
decoded at cells near each centre. At the end the model is evaluated on held-out scenes (np.random.default_rng(1234))
through nxc.proposal_filter.filter_proposals and written as proposals.safetensors + proposals.json.

    python -m nxc.shapes.train_proposals --out DIR --steps N --seed S [--batch-size B --lr LR]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nxc.model.proposals import ProposalNet, ProposalSizes
from nxc.proposal_filter import filter_proposals, proposal_recall
from nxc.runtime.preprocess import boxes_to_pixels, clip_pixels, normalise_boxes
from nxc.shapes.data import make_scene
from nxc.shapes.train import lr_at

WEIGHTS, CONFIG = "proposals.safetensors", "proposals.json"
EVAL_SEED, EVAL_SCENES, MAX_OBJECTS = 1234, 1000, 4


def scene_inputs(scenes, size: int) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Scenes -> (pixels [B,3,S,S], normalised square-frame boxes [M_i,4] per scene)."""
    pixels = torch.from_numpy(np.concatenate([clip_pixels(s.image, size) for s in scenes]))
    boxes = [normalise_boxes(np.array([o.box for o in s.objects], np.float32).reshape(-1, 4), *s.image.size)
             for s in scenes]
    return pixels, boxes


def make_targets(boxes_list: list[np.ndarray], grid: int, min_sigma: float = 0.7, sigma_scale: float = 0.15,
                 reg_min: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image normalised boxes -> (heat [B,G,G]: a Gaussian per object, exactly 1 at the cell holding its centre;
    box [B,G,G,4]: the box of the object whose Gaussian is highest at a cell; weight [B,G,G]: that Gaussian where it
    is >= reg_min and the cell centre lies inside the box, else 0)."""
    n = len(boxes_list)
    heat = np.zeros((n, grid, grid), np.float32)
    box = np.zeros((n, grid, grid, 4), np.float32)
    weight = np.zeros((n, grid, grid), np.float32)
    c = (np.arange(grid, dtype=np.float32) + 0.5) / grid
    for i, boxes in enumerate(boxes_list):
        for b in np.asarray(boxes, np.float32).reshape(-1, 4):
            w, h = b[2] - b[0], b[3] - b[1]
            if w <= 0 or h <= 0:
                continue
            cx, cy = min(int((b[0] + b[2]) / 2 * grid), grid - 1), min(int((b[1] + b[3]) / 2 * grid), grid - 1)
            sigma = max(min_sigma, sigma_scale * math.sqrt(w * h) * grid)
            ax = np.arange(grid, dtype=np.float32)
            g = np.exp(-((ax[None, :] - cx) ** 2 + (ax[:, None] - cy) ** 2) / (2 * sigma * sigma))
            g[cy, cx] = 1.0
            inside = (c[None, :] > b[0]) & (c[None, :] < b[2]) & (c[:, None] > b[1]) & (c[:, None] < b[3])
            mine = g > heat[i]
            heat[i] = np.where(mine, g, heat[i])
            box[i][mine] = b
            weight[i] = np.where(mine, np.where(inside & (g >= reg_min), g, 0.0), weight[i])
    return torch.from_numpy(heat), torch.from_numpy(box), torch.from_numpy(weight)


def focal_loss(logits: torch.Tensor, heat: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, summed and divided by the number of centres."""
    pos = heat >= 1.0
    p = torch.sigmoid(logits)
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    pos_loss = -((1 - p) ** alpha * log_p)[pos].sum()
    neg_loss = -((1 - heat) ** beta * p ** alpha * log_not_p)[~pos].sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1)


def _area(b: torch.Tensor) -> torch.Tensor:
    return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)


def giou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """GIoU of matching [N,4] xyxy boxes (corners ordered) -> [N]."""
    inter = (torch.minimum(pred[:, 2:], target[:, 2:]) - torch.maximum(pred[:, :2], target[:, :2])).clamp(min=0).prod(1)
    union = _area(pred) + _area(target) - inter
    enclose = (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])).prod(1)
    return inter / union.clamp(min=1e-9) - (enclose - union) / enclose.clamp(min=1e-9)


def proposal_loss(net: ProposalNet, pixels: torch.Tensor, targets, giou_weight: float = 2.0,
                  l1_weight: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Focal (heatmap) + giou_weight * (1 - GIoU) + l1_weight * L1 in grid cells, both weighted by the targets'
    regression weight. Returns (loss, {name: float})."""
    heat, box, weight = targets
    logits, ltrb = net.dense(pixels)
    g = net.sizes.grid
    centres = net.centres.reshape(1, g, g, 2)
    d = ltrb.permute(0, 2, 3, 1)
    pred = torch.cat([centres - d[..., :2], centres + d[..., 2:]], -1)           # [B,G,G,4], unclamped
    sel = weight > 0
    w = weight[sel]
    focal = focal_loss(logits, heat)
    if sel.any():
        gi = ((1 - giou(pred[sel], box[sel])) * w).sum() / w.sum()
        l1 = ((pred[sel] - box[sel]).abs().sum(-1) * g * w).sum() / w.sum()
    else:
        gi = l1 = pred.sum() * 0
    loss = focal + giou_weight * gi + l1_weight * l1
    return loss, {"focal": focal.item(), "giou": gi.item(), "l1": l1.item()}


@torch.no_grad()
def predict(net: ProposalNet, scenes, batch: int = 100, **filter_kw) -> list[tuple[np.ndarray, np.ndarray]]:
    """Scenes -> per scene (boxes [M,4] in original pixels, scores [M]) after filter_proposals."""
    net.eval()
    out = []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i:i + batch]
        pixels, _ = scene_inputs(chunk, net.sizes.image_size)
        boxes, scores = net(pixels)
        for s, b, sc in zip(chunk, boxes.numpy(), scores.numpy(), strict=True):
            kb, ks = filter_proposals(b, sc, **filter_kw)
            out.append((boxes_to_pixels(kb, *s.image.size), ks))
    return out


def evaluate_recall(net: ProposalNet, n: int = EVAL_SCENES, seed: int = EVAL_SEED, iou: float = 0.5,
                    **filter_kw) -> dict:
    """Recall of the filtered proposals on n held-out scenes (make_scene(max_objects=4) from default_rng(seed))."""
    rng = np.random.default_rng(seed)
    scenes = [make_scene(rng, max_objects=MAX_OBJECTS) for _ in range(n)]
    preds = predict(net, scenes, **filter_kw)
    gts = [np.array([o.box for o in s.objects], np.float32) for s in scenes]
    counts = [len(b) for b, _ in preds]
    return {"recall@0.5" if iou == 0.5 else f"recall@{iou}": proposal_recall([b for b, _ in preds], gts, iou),
            "mean_proposals_per_image": float(np.mean(counts)), "max_proposals_per_image": int(max(counts)),
            "mean_objects_per_image": float(np.mean([len(g) for g in gts])), "images": n,
            "objects": int(sum(len(g) for g in gts))}


def load_proposal_net(directory) -> ProposalNet:
    """A trained ProposalNet from DIR/proposals.json + DIR/proposals.safetensors, in eval mode."""
    from safetensors.torch import load_file
    d = Path(directory)
    sizes = ProposalSizes.from_dict(json.loads((d / CONFIG).read_text())["sizes"])
    net = ProposalNet(sizes)
    net.load_state_dict(load_file(str(d / WEIGHTS)))
    return net.eval()


def train(out, steps: int, seed: int = 0, batch_size: int = 32, lr: float = 3e-3, warmup: int = 50,
          sizes: ProposalSizes | None = None, threads: int = 1, log_every: int = 50,
          command: str | None = None, eval_scenes: int = EVAL_SCENES) -> dict:
    """Train for `steps` steps, evaluate, write DIR/proposals.safetensors and DIR/proposals.json; returns the json."""
    from safetensors.torch import save_file
    sizes = sizes or ProposalSizes()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 0x5052])       # never the held-out stream default_rng(1234)
    net = ProposalNet(sizes)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"proposal net: {n_params} parameters, {steps} steps of {batch_size}", file=sys.stderr)
    t0 = time.time()
    recent: list[float] = []
    parts: dict = {}
    for step in range(steps):
        net.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        scenes = [make_scene(rng, max_objects=MAX_OBJECTS) for _ in range(batch_size)]
        pixels, boxes = scene_inputs(scenes, sizes.image_size)
        loss, parts = proposal_loss(net, pixels, make_targets(boxes, sizes.grid))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        opt.step()
        recent = (recent + [loss.item()])[-log_every:]
        if (step + 1) % log_every == 0 or step + 1 == steps:
            el = time.time() - t0
            eta = el / (step + 1) * (steps - step - 1)
            print(f"step {step + 1}/{steps} loss {np.mean(recent):.4f} (focal {parts['focal']:.3f} giou "
                  f"{parts['giou']:.3f} l1 {parts['l1']:.3f}) lr {opt.param_groups[0]['lr']:.2e} "
                  f"{el / 60:.1f} min, eta {eta / 60:.1f} min", file=sys.stderr, flush=True)
    minutes = (time.time() - t0) / 60
    metrics = evaluate_recall(net.eval(), n=eval_scenes)
    print(f"held-out: {metrics}", file=sys.stderr)
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / WEIGHTS))
    info = {"sizes": sizes.to_dict(),
            "training": {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "warmup": warmup,
                         "threads": threads, "parameters": n_params, "minutes": round(minutes, 2),
                         "final_loss": float(np.mean(recent)) if recent else None,
                         **metrics, "eval_seed": EVAL_SEED, "command": command}}
    (d / CONFIG).write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m nxc.shapes.train_proposals", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for proposals.safetensors and proposals.json")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    a = ap.parse_args(argv)
    train(a.out, a.steps, seed=a.seed, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup, threads=a.threads,
          command=" ".join(["python -m nxc.shapes.train_proposals", *argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
