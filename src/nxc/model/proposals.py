"""A small class-agnostic proposal detector (ChatRex's "UPN" role) for the synthetic shapes, in torch.

CenterNet-style: a 4-stage CNN (strides 2, 4, 8, 16), a light top-down neck back to stride 4, and two dense heads
on the G x G grid (G = image_size / 4): an objectness logit per cell (peaks at object centres) and ltrb distances
from the cell centre to the box sides. Decoding is inside the graph, so an exported graph has fixed outputs:

    logits ─3x3 max-pool peaks─▶ non-peaks pushed down by 1000 ─top-k (K)─▶ scores = sigmoid, boxes = gathered ltrb

Top-k ranks the masked *logits* (a sigmoid saturates to exactly 1.0 in float32, and ties would let torch and
onnxruntime order equal scores differently); a non-peak that lands in the top k scores sigmoid(logit - 1000) = 0.

Inputs are CLIP-normalised pixels of the white-padded square (nxc.runtime.preprocess.clip_pixels); boxes are
normalised xyxy in that square frame, clamped to [0,1], x1 <= x2 and y1 <= y2 by construction (ltrb >= 0).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

STRIDE = 4          # the heads' grid: two stride-2 stages below the input
SUPPRESS = 1000.0   # subtracted from the logit of a cell that is not a local maximum


@dataclass(frozen=True)
class ProposalSizes:
    image_size: int = 128
    widths: tuple[int, ...] = (16, 32, 64, 96)   # channels of the stride 2, 4, 8, 16 stages
    neck_width: int = 32                          # channels of the top-down neck and of the heads
    num_proposals: int = 16                       # K: the top-k kept in the graph
    peak_kernel: int = 3                          # max-pool window that defines a peak (odd)
    box_scale: float = 4.0                        # ltrb = softplus(raw) * box_scale grid cells

    def __post_init__(self):
        if len(self.widths) != 4:
            raise ValueError(f"widths must name 4 stages (strides 2, 4, 8, 16), got {self.widths!r}")
        if self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16, got {self.image_size}")
        if self.peak_kernel % 2 != 1:
            raise ValueError(f"peak_kernel must be odd, got {self.peak_kernel}")
        if not 1 <= self.num_proposals <= self.grid ** 2:
            raise ValueError(f"num_proposals must be in 1..{self.grid ** 2}, got {self.num_proposals}")

    @property
    def grid(self) -> int:
        return self.image_size // STRIDE

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ProposalSizes:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ProposalSizes fields {sorted(unknown)}; expected some of {sorted(known)}")
        d = dict(d)
        if "widths" in d:
            d["widths"] = tuple(int(w) for w in d["widths"])
        return cls(**d)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ProposalNet(nn.Module):
    def __init__(self, sizes: ProposalSizes = ProposalSizes()):
        super().__init__()
        self.sizes = sizes
        w, d = sizes.widths, sizes.neck_width
        cin = 3
        stages = []
        for c in w:
            stages.append(nn.Sequential(_conv(cin, c, 2), _conv(c, c)))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.lateral = nn.ModuleList([nn.Conv2d(c, d, 1) for c in w[1:]])   # strides 4, 8, 16
        self.neck = nn.Sequential(_conv(d, d), _conv(d, d))
        self.heat_head = nn.Sequential(_conv(d, d), nn.Conv2d(d, 1, 1))
        self.box_head = nn.Sequential(_conv(d, d), nn.Conv2d(d, 4, 1))
        nn.init.constant_(self.heat_head[-1].bias, -4.0)   # objectness prior ~ 0.02: few cells are centres
        nn.init.zeros_(self.box_head[-1].bias)
        g = sizes.grid
        c = (torch.arange(g, dtype=torch.float32) + 0.5) / g
        cy, cx = torch.meshgrid(c, c, indexing="ij")
        self.register_buffer("centres", torch.stack([cx, cy], -1).reshape(1, g * g, 2), persistent=False)

    def dense(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [B,3,S,S] -> (objectness logits [B,G,G], ltrb [B,4,G,G] >= 0 in normalised units)."""
        feats = []
        x = pixels
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        p = self.lateral[2](feats[3])
        p = self.lateral[1](feats[2]) + F.interpolate(p, scale_factor=2.0, mode="nearest")
        p = self.lateral[0](feats[1]) + F.interpolate(p, scale_factor=2.0, mode="nearest")
        p = self.neck(p)
        unit = self.sizes.box_scale / self.sizes.grid
        return self.heat_head(p)[:, 0], F.softplus(self.box_head(p)) * unit

    def decode(self, logits: torch.Tensor, ltrb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense outputs -> (boxes [B,K,4], scores [B,K]) sorted by descending score."""
        b, g = logits.shape[0], self.sizes.grid
        k = self.sizes.peak_kernel
        peak = F.max_pool2d(logits[:, None], k, 1, k // 2)[:, 0]
        ranked = torch.where(logits >= peak, logits, logits - SUPPRESS).reshape(b, g * g)
        top, idx = torch.topk(ranked, self.sizes.num_proposals, dim=1)
        d = ltrb.reshape(b, 4, g * g).transpose(1, 2)                        # [B,G*G,4]
        boxes = torch.cat([self.centres - d[..., :2], self.centres + d[..., 2:]], -1).clamp(0.0, 1.0)
        boxes = torch.gather(boxes, 1, idx[..., None].expand(-1, -1, 4))
        return boxes, torch.sigmoid(top)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decode(*self.dense(pixels))
