"""nxc-train-shapes: train the embedded NExT-Chat on synthetic shapes, on CPU (nxc.shapes.train; needs torch)."""
from __future__ import annotations

import argparse
import sys


def _weights(text: str) -> dict:
    from nxc.shapes.data import TASKS as GROUNDING
    from nxc.shapes.module_tasks import MODULE_TASKS
    TASKS = GROUNDING + MODULE_TASKS
    try:
        out = {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected task=weight pairs separated by commas, got {text!r}") from None
    if set(out) - set(TASKS) or min(out.values()) < 0 or sum(out.values()) <= 0:
        raise argparse.ArgumentTypeError(f"tasks must be among {TASKS} with weights >= 0 and a positive sum: {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        from nxc.shapes.train import TrainConfig, train
    except ImportError as e:
        print(f"nxc-train-shapes: needs the export extra ({e.name or 'torch'} is not installed): pip install "
              "'nxc[export]'", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(prog="nxc-train-shapes", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint directory to write (official layout)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage0-steps", type=int, default=TrainConfig.stage0_steps)
    ap.add_argument("--stage1-steps", type=int, default=TrainConfig.stage1_steps)
    ap.add_argument("--stage2-steps", type=int, default=TrainConfig.stage2_steps)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--init", help="continue from a checkpoint written by this script (or embedded:NAME)")
    ap.add_argument("--sorted-giou", action="store_true", help="the first recipe's GIoU (reproduction only)")
    ap.add_argument("--iou-weight", type=float, default=TrainConfig.iou_weight,
                    help="stage-2 weight of SAM's IoU-score loss (0 in the shipped model's first two runs)")
    ap.add_argument("--warmup", type=int, default=TrainConfig.warmup, help="linear warm-up steps of each stage")
    ap.add_argument("--task-weights", type=_weights, help="stage-1 task mix, e.g. rec=0.3,caption=0.1,region=0.1,pope=0.5 "
                    "(and the module-call tasks of nxc.shapes.module_tasks: module_segment, module_track, module_edit, "
                    "module_generate)")
    ap.add_argument("--pope-near", type=float, default=TrainConfig.pope_near,
                    help="share of absent POPE objects that share a colour or shape with a present one")
    ap.add_argument("--yes-no-weight", type=float, default=TrainConfig.yes_no_weight,
                    help="cross-entropy weight of POPE's Yes/No answer token")
    ap.add_argument("--vision-lr-scale", type=float, default=TrainConfig.vision_lr_scale,
                    help="stage-1 learning-rate factor of the CLIP tower")
    ap.add_argument("--look-absent", action="store_true",
                    help="supervise attention onto the background for questions about absent objects")
    ap.add_argument("--box-only-prob", type=float, default=TrainConfig.box_only_prob,
                    help="stage 2: share of images whose SAM prompt is the box alone (a module call's segment / track)")
    a = ap.parse_args(argv)
    if a.init is not None:
        from nxc.assets import resolve_checkpoint
        a.init = str(resolve_checkpoint(a.init))          # embedded:shapes-nextchat names the shipped one
    train(a.out, TrainConfig(seed=a.seed, stage0_steps=a.stage0_steps, stage1_steps=a.stage1_steps,
                             stage2_steps=a.stage2_steps, lr=a.lr, init=a.init, sorted_giou=a.sorted_giou,
                             batch_size=a.batch_size, warmup=a.warmup, task_weights=a.task_weights,
                             pope_near=a.pope_near, look_absent=a.look_absent, yes_no_weight=a.yes_no_weight,
                             vision_lr_scale=a.vision_lr_scale, iou_weight=a.iou_weight,
                             box_only_prob=a.box_only_prob))
    return 0


if __name__ == "__main__":
    sys.exit(main())
