"""What a turn gives: the events `Conversation.stream` yields and the `ChatResult` a turn ends with. A head kind's
records and events are its own (nxc.runtime.heads); the grounding ones both families give live here.

    stream(...) ─▶ Token per generated token, a head's event when it finds something (Box), the pictures a reply's
                   heads made once it ends (Image), then Done(ChatResult)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ChatResult:
    text: str                  # reply with each `<at> <boxes>` rendered as [k]
    raw_text: str              # reply as decoded, with the literal tokens
    token_ids: list[int]       # generated ids (`<boxes>` after every `<at>`)
    prompt_ids: list[int]      # the whole conversation's ids for this turn
    finish_reason: str         # "stop" (</s>) or "length" (max_new_tokens or the build's context)
    detections: list = field(default_factory=list)     # what the heads found, in order (Detection for boxes)
    images: list = field(default_factory=list)         # the pictures the reply made, in order (Image)
    calls: list = field(default_factory=list)          # its module calls, in order (nxc.runtime.modules.CallResult)


@dataclass
class Token:
    id: int
    text: str                  # decoded text this token adds


@dataclass
class Done:
    result: ChatResult


@dataclass
class Detection:
    box: np.ndarray            # [4] xyxy pixels on the original image (not clamped, as the reference)
    box_norm: np.ndarray       # [4] normalised xyxy in the padded square (what loc_decoder gave)
    phrase: str                # the reply text this detection follows, e.g. "a blue circle"
    mask: np.ndarray | None = None    # [H,W] bool (all False when the mask score is under the threshold)
    score: float | None = None        # SAM's IoU prediction for the mask
    seg_prompt: np.ndarray | None = None   # [4,C] for the SAM decoder


@dataclass
class Box:
    index: int
    detection: Detection       # box known now; mask and score come with Done


@dataclass
class Image:
    """A picture a head made (NExT-GPT's signal tokens -> projector -> generator), streamed when it is done."""
    index: int                 # the reply's k-th picture
    pixels: np.ndarray         # [H,W,3] uint8 RGB
    seed: int                  # the initial latents' seed (nxc.diffusion.initial_latents): the same seed, the same picture
    steps: int
    guidance: float
    scheduler: str

    def to_pil(self):
        from PIL import Image as PILImage
        return PILImage.fromarray(self.pixels, "RGB")
