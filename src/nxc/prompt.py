"""Prompt construction (reference §3): the vicuna_v1.1 template, the image span, region references.

Torch-free; shared by the PyTorch reference and the runtime so that both build the same text.
Unlike the original (which runs user text through `str.format`), literal braces are kept as they are.

A prompt is rendered as segments (nxc.tokens.Segment): the template's own parts are control text, in which
special-token strings become their ids; what people wrote is plain text, in which `<at>`, `</s>`, `<im_start>`...
are only characters, so a user cannot forge a turn, a slot or an image span:

    control  "<system> USER: "  "<im_start><im_patch>x576<im_end>"  " "   the `<at> <boxes>` of each [k]  ...
    plain    what the user typed (around its [k] references), an earlier reply's words (around its slots)

`special_tokens_in_text=True` marks everything control: the original model's behaviour, for parity with it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from nxc import names
from nxc.tokens import Segment

# A bracket group of non-negative ints, e.g. [0] or [0,1] or [0, 1,] (trailing comma tolerated). ASCII digits only
# (an Arabic-Indic digit is text); leading zeros read as int() reads them: [01] is [1].
_REGION_REF = re.compile(r"\[\s*\d+\s*(?:,\s*\d+\s*)*,?\s*\]", re.ASCII)
SLOT = f"{names.AT} {names.BOXES}"


class PromptError(ValueError):
    """The user text and the boxes given with it do not fit together; the message says how."""


@dataclass(frozen=True)
class PromptFormat:
    """How a family's grounding shows in the prompt (nxc.config.GROUNDING_FAMILIES).

    regression (NExT-Chat, `objects` None): `[k]` becomes `<at> <boxes>`, the image span is followed by a space.
    retrieval (ChatRex-style, `objects` = the number of proposals): the image span is followed by
    `\n<obj0><objfeat>...<obj{n-1}><objfeat>\n`, the k-th region reference of the conversation becomes
    `<obj{n+k}><objfeat>` (region boxes join the object list after the proposals), and the tags and `<objN>` of an
    earlier reply are control (nxc.object_index)."""
    objects: int | None = None

    def slot(self, k: int) -> str:
        """Control text of the conversation's k-th region reference."""
        return SLOT if self.objects is None else f"{_obj(self.objects + k)}{_OBJ_FEAT}"

    def after_image(self) -> str:
        if self.objects is None:
            return " "
        return "\n" + "".join(f"{_obj(i)}{_OBJ_FEAT}" for i in range(self.objects)) + "\n"

    def reply_control(self) -> re.Pattern:
        return _SLOT_RE if self.objects is None else _INDEX_TAGS


def _obj(i: int) -> str:
    return f"<obj{i}>"


_OBJ_FEAT = "<objfeat>"
_SLOT_RE = re.compile(re.escape(SLOT))
_INDEX_TAGS = re.compile(r"</?ground>|</?objects>|<obj\d+>", re.ASCII)
REGRESSION = PromptFormat()


@dataclass(frozen=True)
class Turn:
    user: str                      # as typed: region references like [0] are expanded when rendered
    assistant: str | None = None   # the reply as decoded (`<at> <boxes>` literal); None for the turn being answered


def expand_region_refs(text: str, num_boxes: int) -> tuple[str, list[int]]:
    """Replace each region reference like `[0]` or `[0,1]` with one `<at> <boxes>` per index.

    Returns the expanded text and the referenced box indices in order of appearance.
    Raises PromptError when a reference names a box that was not given.
    """
    order: list[int] = []
    pieces: list[str] = []
    last = 0
    for m in _REGION_REF.finditer(text):
        idx = _ref_indices(m.group(0))
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


def _ref_indices(ref: str) -> list[int]:
    """The box indices of one matched region reference, e.g. `[0, 1,]` -> [0, 1]."""
    return [int(i) for i in re.findall(r"[0-9]+", ref)]


def region_segments(text: str, fmt: PromptFormat = REGRESSION, slots: list[int] | None = None) -> list[Segment]:
    """User text as plain segments, each region reference `[k,...]` as control slots (one per index; `<at> <boxes>`
    for NExT-Chat). `slots` counts the conversation's slots so far (a one-item list, advanced here). The text joined
    is `expand_region_refs`'s; the references are checked there, when the turn is asked."""
    slots = [0] if slots is None else slots
    out: list[Segment] = []
    last = 0
    for m in _REGION_REF.finditer(text):
        n = len(_ref_indices(m.group(0)))
        sep = " " if fmt.objects is None else ""
        out += [Segment(text[last:m.start()], False),
                Segment(sep.join(fmt.slot(slots[0] + i) for i in range(n)), True)]
        slots[0] += n
        last = m.end()
    out.append(Segment(text[last:], False))
    return out


def _user_segments(text: str, image: str | None, fmt: PromptFormat, slots: list[int]) -> list[Segment]:
    """One user message; the first (`image` given) holds the image span where its first `<image>` is, else before
    the text (`<image> ` prefixed, reference §3.2; a retrieval model's object list follows the span)."""
    if image is None:
        return region_segments(text, fmt, slots)
    at = text.find(names.IMAGE_PLACEHOLDER)
    if at < 0:
        return [Segment(image + fmt.after_image(), True)] + region_segments(text, fmt, slots)
    before = region_segments(text[:at], fmt, slots)
    after_image = "" if fmt.objects is None else fmt.after_image()
    return before + [Segment(image + after_image, True)] + region_segments(
        text[at + len(names.IMAGE_PLACEHOLDER):], fmt, slots)


def _reply_segments(text: str, fmt: PromptFormat = REGRESSION) -> list[Segment]:
    """An earlier reply as decoded: its grounding tokens (`<at> <boxes>` slots; a retrieval model's tags and
    `<objN>`) are control, every other character plain text."""
    out: list[Segment] = []
    last = 0
    for m in fmt.reply_control().finditer(text):
        out += [Segment(text[last:m.start()], False), Segment(m.group(0), True)]
        last = m.end()
    out.append(Segment(text[last:], False))
    return out


def _merged(segments: list[Segment]) -> list[Segment]:
    """Drop empty segments and join neighbours of the same kind."""
    out: list[Segment] = []
    for s in segments:
        if not s.text:
            continue
        if out and out[-1].control == s.control:
            out[-1] = Segment(out[-1].text + s.text, s.control)
        else:
            out.append(s)
    return out


def render_segments(turns: list[Turn], num_image_tokens: int, *, special_tokens_in_text: bool = False,
                    fmt: PromptFormat = REGRESSION) -> list[Segment]:
    """The prompt of a conversation whose last turn awaits the assistant (reference §3.1-3.2), as segments.

    Joined: `<system> USER: <image span> q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:` -- the image goes into the
    first user message (prefixed as `<image> ` unless the text already holds `<image>`), region references [k]
    become `<at> <boxes>`. Control: the template's parts, the image span, the slots; plain: everything else the
    user and earlier replies wrote. special_tokens_in_text=True marks every segment control (the original's
    tokenization, where typed special strings become tokens). Returns non-empty segments, kinds alternating.
    """
    if not turns or turns[-1].assistant is not None:
        raise PromptError("the last turn must be the user's question awaiting an answer")
    messages: list[list[Segment]] = []
    slots = [0]
    for i, t in enumerate(turns):
        messages += [_user_segments(t.user, image_span(num_image_tokens) if i == 0 else None, fmt, slots),
                     _reply_segments(t.assistant or "", fmt)]
    out = [Segment(names.SYSTEM_PROMPT + names.SEP, True)]
    for i, m in enumerate(messages):
        role = names.ROLES[i % 2]
        if any(s.text for s in m):
            out += [Segment(role + ": ", True), *m, Segment(names.SEP if i % 2 == 0 else names.SEP2, True)]
        else:
            out.append(Segment(role + ":", True))
    if special_tokens_in_text:
        out = [Segment(s.text, True) for s in out]
    return _merged(out)


def render(turns: list[Turn], num_image_tokens: int) -> str:
    """The prompt text of `render_segments` (the same text in both modes)."""
    return "".join(s.text for s in render_segments(turns, num_image_tokens))


def prompt_segments(user_text: str, *, num_image_tokens: int, num_boxes: int = 0, history: list[Turn] | None = None,
                    special_tokens_in_text: bool = False,
                    fmt: PromptFormat = REGRESSION) -> tuple[list[Segment], list[int]]:
    """One chat turn: (the conversation's segments, box indices in `<boxes>` slot order for this turn's text).
    Raises PromptError when the text is empty or its references and the boxes do not fit together."""
    if not user_text or not user_text.strip():
        raise PromptError("the prompt is empty: ask a question, e.g. 'Where is the red circle in the image?'")
    _, order = expand_region_refs(user_text, num_boxes)
    check_all_boxes_used(order, num_boxes)
    return render_segments(list(history or []) + [Turn(user_text)], num_image_tokens,
                           special_tokens_in_text=special_tokens_in_text, fmt=fmt), order


def build_prompt(user_text: str, *, num_image_tokens: int, num_boxes: int = 0,
                 history: list[Turn] | None = None) -> tuple[str, list[int]]:
    """One chat turn: returns (prompt text, box indices in `<boxes>` slot order for this turn's text)."""
    segments, order = prompt_segments(user_text, num_image_tokens=num_image_tokens, num_boxes=num_boxes,
                                      history=history)
    return "".join(s.text for s in segments), order
