"""Two runs' answers compared as the parity tests compare the runtime with its reference: greedy ids and text
identical, boxes within 1e-3 (normalised) / 0.5 px, mask scores within 1e-3, masks IoU >= 0.99."""
from __future__ import annotations

import base64

import numpy as np

BOX_NORM_ATOL = 1e-3
BOX_PIXEL_ATOL = 0.5
SCORE_ATOL = 1e-3
MASK_IOU = 0.99


def mask(record: dict | None) -> np.ndarray | None:
    if record is None:
        return None
    h, w = record["shape"]
    bits = np.unpackbits(np.frombuffer(base64.b64decode(record["bits"]), np.uint8))
    return bits[: h * w].reshape(h, w).astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def differences(a: dict, b: dict) -> tuple[list[str], dict]:
    """What differs between answer `a` (x86) and `b` (aarch64), and the measured gaps."""
    why, gaps = [], {"box_norm": 0.0, "box_px": 0.0, "score": 0.0, "mask_iou": 1.0}
    for key in ("prompt_ids", "token_ids", "text", "finish_reason"):
        if a[key] != b[key]:
            why.append(f"{key}: {a[key]!r} != {b[key]!r}")
    if len(a["detections"]) != len(b["detections"]):
        why.append(f"{len(a['detections'])} detections != {len(b['detections'])}")
        return why, gaps
    for k, (da, db) in enumerate(zip(a["detections"], b["detections"])):
        if da["phrase"] != db["phrase"]:
            why.append(f"detection {k}: phrase {da['phrase']!r} != {db['phrase']!r}")
        gaps["box_px"] = max(gaps["box_px"], float(np.abs(np.subtract(da["box"], db["box"])).max()))
        if da["box_norm"] is not None:
            gaps["box_norm"] = max(gaps["box_norm"], float(np.abs(np.subtract(da["box_norm"], db["box_norm"])).max()))
        if da["score"] is not None:
            gaps["score"] = max(gaps["score"], abs(da["score"] - db["score"]))
        ma, mb = mask(da["mask"]), mask(db["mask"])
        if (ma is None) != (mb is None) or (ma is not None and ma.shape != mb.shape):
            why.append(f"detection {k}: masks of different shapes")
        elif ma is not None:
            gaps["mask_iou"] = min(gaps["mask_iou"], iou(ma, mb))
    if gaps["box_norm"] > BOX_NORM_ATOL or gaps["box_px"] > BOX_PIXEL_ATOL:
        why.append(f"boxes differ by {gaps['box_norm']:.2e} (normalised), {gaps['box_px']:.3f} px")
    if gaps["score"] > SCORE_ATOL:
        why.append(f"mask scores differ by {gaps['score']:.2e}")
    if gaps["mask_iou"] < MASK_IOU:
        why.append(f"mask IoU {gaps['mask_iou']:.4f} < {MASK_IOU}")
    return why, gaps


def compare_answers(x86: dict, arm: dict) -> dict:
    """Every model's answers, one by one: counts, the largest gaps, and each mismatch said in a line."""
    out = {"answers": 0, "identical_ids": 0, "detections": 0, "max_box_norm_diff": 0.0, "max_box_px_diff": 0.0,
           "max_score_diff": 0.0, "min_mask_iou": 1.0, "mismatches": []}
    for model in x86:
        if len(x86[model]) != len(arm.get(model, [])):
            out["mismatches"].append(f"{model}: {len(x86[model])} answers on x86, {len(arm.get(model, []))} on arm64")
            continue
        for k, (a, b) in enumerate(zip(x86[model], arm[model])):
            why, gaps = differences(a, b)
            out["answers"] += 1
            out["identical_ids"] += a["token_ids"] == b["token_ids"]
            out["detections"] += len(a["detections"])
            out["max_box_norm_diff"] = max(out["max_box_norm_diff"], gaps["box_norm"])
            out["max_box_px_diff"] = max(out["max_box_px_diff"], gaps["box_px"])
            out["max_score_diff"] = max(out["max_score_diff"], gaps["score"])
            out["min_mask_iou"] = min(out["min_mask_iou"], gaps["mask_iou"])
            out["mismatches"] += [f"{model} {k} ({a['question']!r}): {w}" for w in why]
    return out
