"""Post-processing of a proposal detector's fixed top-k (nxc.model.proposals): score threshold, greedy NMS, and
the recall measure. numpy only: the torch-free runtime uses it."""
from __future__ import annotations

import numpy as np


def _as_boxes(boxes, name: str) -> np.ndarray:
    b = np.asarray(boxes, np.float32)
    if b.size == 0:
        return np.zeros((0, 4), np.float32)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{name} must be [N,4] xyxy boxes, got shape {b.shape}")
    return b


def _area(x: np.ndarray) -> np.ndarray:
    return np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)


def box_iou_matrix(a, b) -> np.ndarray:
    """IoU of xyxy boxes a [N,4] and b [M,4] -> [N,M] float32; a box with no area overlaps nothing (IoU 0)."""
    a, b = _as_boxes(a, "a").astype(np.float64), _as_boxes(b, "b").astype(np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    union = _area(a)[:, None] + _area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0).astype(np.float32)


def filter_proposals(boxes, scores, *, score_threshold: float = 0.3, iou_threshold: float = 0.5,
                     max_out: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Proposals [K,4] + scores [K] -> the kept (boxes [M,4] float32, scores [M] float32), M <= max_out.

    Drops scores below `score_threshold` (and NaN), then greedy NMS in descending score order (ties: lower index
    first): a box whose IoU with an already kept one is above `iou_threshold` is dropped."""
    b = _as_boxes(boxes, "boxes")
    s = np.asarray(scores, np.float32).reshape(-1)
    if len(s) != len(b):
        raise ValueError(f"{len(b)} boxes but {len(s)} scores")
    order = np.argsort(-s, kind="stable")
    order = order[s[order] >= score_threshold]
    iou = box_iou_matrix(b[order], b[order])
    kept: list[int] = []
    for i in range(len(order)):
        if len(kept) >= max_out:
            break
        if not kept or iou[i, kept].max() <= iou_threshold:
            kept.append(i)
    keep = order[kept]
    return b[keep].reshape(-1, 4).astype(np.float32), s[keep].astype(np.float32)


def proposal_recall(pred_boxes_list, gt_boxes_list, iou: float = 0.5) -> float:
    """Fraction of ground-truth boxes (over all images) that some proposal of the same image covers with
    IoU >= `iou`. NaN when there is no ground-truth box at all."""
    if len(pred_boxes_list) != len(gt_boxes_list):
        raise ValueError(f"{len(pred_boxes_list)} images of proposals but {len(gt_boxes_list)} of ground truth")
    found = total = 0
    for pred, gt in zip(pred_boxes_list, gt_boxes_list, strict=True):
        gt = _as_boxes(gt, "ground-truth boxes")
        total += len(gt)
        if len(gt):
            m = box_iou_matrix(gt, pred)
            found += int((m >= iou).any(1).sum()) if m.shape[1] else 0
    return found / total if total else float("nan")
