"""VITRON's region extractor (issue 29): a user's box becomes ONE input row from the vision tower's own patch features.

    box [M,4] (xyxy in [0,1] of the tower's square) ─▶ a pixel mask of the box at the tower's R x R
        ─▶ bilinear to the patch grid g x g, > 0 (VITRON's MaskPooling) ─▶ the mean of the patch features it covers
        ─▶ feat_linear (Linear Dv->H, GELU, Linear H->H) ─┐
    box ─▶ loc_linear (Linear 4->H/2, GELU, Linear H/2->H) ┴─▶ + ─▶ region row [M,H]

SkyworkAI/Vitron pools the CLIP patch features (mm_hidden_size wide, before the mm_projector) with the user's mask:
`F.interpolate(mask, size=feature grid, mode="bilinear", align_corners=False)`, `> 0`, mean; then a depth-2 MLP
(Linear, GELU, Linear). Its paper adds a location MLP of the box; both are summed here. The pixel mask of a box is
the pixels whose centre lies in it. The mask is never drawn: bilinear sampling is separable and a box mask is the
outer product of two 1-D masks, so a grid cell is kept when a pixel its sample point reads is inside the box
(`cell_mask`); tests/model/test_region.py checks this against F.interpolate of the drawn mask.

Checkpoint keys: region_encoder.feat_linear.{0,2}.*, region_encoder.loc_linear.{0,2}.* (nxc-make-checkpoint
--region-encoder writes them; a checkpoint without them has no region extractor and takes loc_encoder rows).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _sample_points(grid: int, pixels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per grid cell along one axis, as F.interpolate(mode="bilinear", align_corners=False) reads a `pixels`-long
    axis: (first pixel p0, second pixel p1, weight of p1)."""
    src = np.maximum((np.arange(grid) + 0.5) * pixels / grid - 0.5, 0.0)
    p0 = np.floor(src).astype(np.int64)
    p1 = np.minimum(p0 + 1, pixels - 1)
    return p0, p1, src - p0


class RegionEncoder(nn.Module):
    """patch_features [N,Dv] (N = g*g, row-major), boxes [M,4] -> [M,H]."""

    def __init__(self, feature_dim: int, hidden_size: int, *, grid: int, image_size: int):
        super().__init__()
        self.feat_linear = nn.Sequential(nn.Linear(feature_dim, hidden_size), nn.GELU(),
                                         nn.Linear(hidden_size, hidden_size))
        self.loc_linear = nn.Sequential(nn.Linear(4, hidden_size // 2), nn.GELU(),
                                        nn.Linear(hidden_size // 2, hidden_size))
        p0, p1, w1 = _sample_points(grid, image_size)
        # pixel centres (p + 0.5) / R of each cell's two sample pixels (float32 numpy, not buffers: .half() must not
        # round them across box edges); the second counts only when its weight > 0
        self._centres = ((p0 + 0.5) / image_size).astype(np.float32), ((p1 + 0.5) / image_size).astype(np.float32)
        self._reads1 = w1 > 0

    def _axis(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """[M] box edges (fractions) -> [M,g] bool: the cells whose bilinear sample of the box mask is > 0, compared
        in float32 whatever the module's dtype."""
        lo, hi = lo.float()[:, None], hi.float()[:, None]
        c0, c1 = (torch.from_numpy(c).to(lo.device) for c in self._centres)
        reads1 = torch.from_numpy(self._reads1).to(lo.device)
        return ((c0 >= lo) & (c0 <= hi)) | ((c1 >= lo) & (c1 <= hi) & reads1)

    def cell_mask(self, boxes: torch.Tensor) -> torch.Tensor:
        """boxes [M,4] -> [M,N] float32: VITRON's pooling mask of each box on the patch grid (row-major)."""
        mx = self._axis(boxes[:, 0], boxes[:, 2])
        my = self._axis(boxes[:, 1], boxes[:, 3])
        return (my[:, :, None] & mx[:, None, :]).reshape(boxes.shape[0], -1).float()

    def forward(self, patch_features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        mask = self.cell_mask(boxes)                        # pooled in float32: an empty mask gives 0, not 0 / 0
        pooled = (mask @ patch_features.float()) / (mask.sum(-1, keepdim=True) + 1e-8)
        return self.feat_linear(pooled.to(patch_features.dtype)) + self.loc_linear(boxes)
