"""Prompt construction (reference §3): the vicuna_v1.1 template, the image span, region references.

Torch-free; shared by the PyTorch reference and the runtime so that both build the same text.
Unlike the original (which runs user text through `str.format`), literal braces are kept as they are.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from nxc import names

# A bracket group of non-negative ints, e.g. [0] or [0,1] or [0, 1,] (trailing comma tolerated).
_REGION_REF = re.compile(r"\[\s*\d+\s*(?:,\s*\d+\s*)*,?\s*\]")
SLOT = f"{names.AT} {names.BOXES}"


class PromptError(ValueError):
    """The user text and the boxes given with it do not fit together; the message says how."""


@dataclass(frozen=True)
class Turn:
    user: str
    assistant: str | None = None   # None for the turn being answered


def expand_region_refs(text: str, num_boxes: int) -> tuple[str, list[int]]:
    """Replace each region reference like `[0]` or `[0,1]` with one `<at> <boxes>` per index.

    Returns the expanded text and the referenced box indices in order of appearance.
    Raises PromptError when a reference names a box that was not given.
    """
    order: list[int] = []
    pieces: list[str] = []
    last = 0
    for m in _REGION_REF.finditer(text):
        idx = json.loads(re.sub(r",\s*\]$", "]", m.group(0)))
        bad = [i for i in idx if i >= num_boxes]
        if bad:
            given = (f"only {num_boxes} box(es) were given (valid indices 0..{num_boxes - 1})" if num_boxes
                     else "no boxes were given")
            raise PromptError(
                f"the prompt refers to region {bad[0]} in {m.group(0)!r}, but {given}. Pass one box per referenced "
                "index (nxc-run --box x1,y1,x2,y2; \"boxes\": [[x1, y1, x2, y2]] in an API request).")
        pieces += [text[last:m.start()], " ".join([SLOT] * len(idx))]
        order += idx
        last = m.end()
    pieces.append(text[last:])
    return "".join(pieces), order


def render_reply(raw: str) -> str:
    """Replace the k-th `<at> <boxes>` with `[k]` (the web demo's post-processing, without HTML escaping)."""
    counter = iter(range(1 << 30))
    return re.sub(re.escape(SLOT), lambda _: f"[{next(counter)}]", raw)


def check_all_boxes_used(order: list[int], num_boxes: int) -> None:
    unused = sorted(set(range(num_boxes)) - set(order))
    if unused:
        raise PromptError(
            f"{num_boxes} box(es) were given but the prompt never refers to box {unused[0]}: "
            f"refer to each box in the text as [{unused[0]}] (e.g. 'What is region [{unused[0]}]?'), "
            "or do not pass it.")


def image_span(num_image_tokens: int) -> str:
    return names.IM_START + names.IM_PATCH * num_image_tokens + names.IM_END


def render(turns: list[Turn], num_image_tokens: int) -> str:
    """The full prompt text for a conversation whose last turn awaits the assistant (reference §3.1-3.2).

    `<system> USER: <image span> q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:` -- the image goes into the
    first user message (prefixed as `<image> ` unless the text already holds `<image>`).
    """
    if not turns or turns[-1].assistant is not None:
        raise PromptError("the last turn must be the user's question awaiting an answer")
    messages: list[str] = []
    for i, t in enumerate(turns):
        user = t.user
        if i == 0 and names.IMAGE_PLACEHOLDER not in user:
            user = names.IMAGE_PLACEHOLDER + " " + user
        messages += [user, t.assistant or ""]
    text = names.SYSTEM_PROMPT + names.SEP
    for i, m in enumerate(messages):
        role = names.ROLES[i % 2]
        if m:
            text += role + ": " + m + (names.SEP if i % 2 == 0 else names.SEP2)
        else:
            text += role + ":"
    return text.replace(names.IMAGE_PLACEHOLDER, image_span(num_image_tokens), 1)


def build_prompt(user_text: str, *, num_image_tokens: int, num_boxes: int = 0,
                 history: list[Turn] | None = None) -> tuple[str, list[int]]:
    """One chat turn: returns (prompt text, box indices in `<boxes>` slot order for this turn's text)."""
    if not user_text or not user_text.strip():
        raise PromptError("the prompt is empty: ask a question, e.g. 'Where is the red circle in the image?'")
    expanded, order = expand_region_refs(user_text, num_boxes)
    check_all_boxes_used(order, num_boxes)
    return render(list(history or []) + [Turn(expanded)], num_image_tokens), order
