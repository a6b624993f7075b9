"""VITRON's module calls, parsed from the reply's text as it streams (issue 29). Torch-free, no numpy.

    "Sure. <module>B</module><instruction>segmentation: the red circle</instruction><region>[10, 12, 40, 44]</region>"
        ─▶ ModuleCall(module "B", tasks ("segmentation",), instructions ("the red circle",), region (10, 12, 40, 44))

The tags are plain text (VITRON adds no tokens): `<module>X</module>`, then one or more `<instruction>task: text
</instruction>` (VITRON's code uses the text after the LAST ':', the task is what stands before it), then an optional
`<region>...</region>` of 4 numbers (any brackets or none; in what frame is the modules table's business), or `[k]`
(the turn's k-th region input: a model can copy the user's box), or NExT-Chat's `<at> <boxes>` (the box its box head
decodes at that trigger: the region comes from the kit's grounding, not from digits). A call is
complete when its region closes, when the next `<module>` opens, when other text follows its last instruction, or
when the reply ends (`close()`); only then is it handed out, so a backend never runs on half a call.

Never an exception for what a model wrote: an unclosed tag at the end, an instruction outside a call, a call without
an instruction or a region that is not 4 numbers give a CallError (the reason in words, where it starts), and the
reply stays text.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from nxc import names

TAGS = ("module", "instruction", "region")
_TAG = re.compile(r"<(/?)(module|instruction|region)>")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_REF = re.compile(r"^\s*\[\s*(\d+)\s*\]\s*$")
AT, SLOT = names.AT, f"{names.AT} {names.BOXES}"     # NExT-Chat's trigger and slot (nxc.prompt.SLOT)


@dataclass(frozen=True)
class ModuleCall:
    """One complete call: module name as written, each instruction's task (before its last ':', "" without one) and
    text (after it, stripped), the region's 4 numbers as written (None: no region), its span in the reply text."""
    module: str
    tasks: tuple[str, ...]
    instructions: tuple[str, ...]
    region: tuple[float, float, float, float] | None
    start: int
    end: int
    region_ref: int | None = None     # <region>[k]</region>: the turn's k-th region input (the user's box [k])
    region_slot: int | None = None    # <region><at> <boxes></region>: the box the reply's n-th trigger decoded

    @property
    def has_region(self) -> bool:
        return self.region is not None or self.region_ref is not None or self.region_slot is not None


@dataclass(frozen=True)
class CallError:
    """What was wrong with a call the reply wrote (the reply stays text): reason in words, where it started."""
    reason: str
    start: int


def split_instruction(body: str) -> tuple[str, str]:
    """"segmentation: the zebra" -> ("segmentation", "the zebra"); no ':' -> ("", the whole text)."""
    task, sep, text = body.rpartition(":")
    return (task.strip(), text.strip()) if sep else ("", body.strip())


def parse_region(body: str):
    """"[10, 12, 40, 44]", "(0.1,0.2,0.5,0.6)", "10 12 40 44" -> 4 floats; "[1]" -> ("ref", 1), the turn's region
    input [1]; "<at> <boxes>" (NExT-Chat's trigger and slot) -> ("slot",), the box decoded there; otherwise the
    reason it is not a box."""
    if (m := _REF.match(body)) is not None:
        return ("ref", int(m.group(1)))
    if AT in body:
        rest = body.replace(SLOT, "", 1).strip()
        if body.count(AT) != 1 or rest:
            return f"a grounded region is one {SLOT!r} and nothing else, got {body.strip()!r}"
        return ("slot",)
    numbers = _NUMBER.findall(body)
    if len(numbers) != 4:
        return f"a region is 4 numbers (x1, y1, x2, y2), got {len(numbers)} in {body.strip()!r}"
    x1, y1, x2, y2 = (float(n) for n in numbers)
    if not (x2 > x1 and y2 > y1):
        return f"a region needs x2 > x1 and y2 > y1, got {body.strip()!r}"
    return x1, y1, x2, y2


class ModuleCallParser:
    """feed(text so far) -> the calls (and errors) completed by the new text; close() at the end of the reply."""

    def __init__(self):
        self.text = ""
        self.pos = 0                  # everything before pos is parsed
        self.open: tuple[str, int, int] | None = None     # (tag, where its body starts, where the tag starts)
        self.call: dict | None = None                      # the call being written (after </module>)

    def feed(self, text: str) -> list[ModuleCall | CallError]:
        """`text`: the whole reply so far (it only grows)."""
        self.text = text
        out: list[ModuleCall | CallError] = []
        while True:
            m = _TAG.search(self.text, self.pos)
            if m is None:
                self._text_between(self.text[self.pos:], out, final=False)
                return out
            self._text_between(self.text[self.pos:m.start()], out, final=True)
            self.pos = m.end()
            self._tag(m.group(1) == "/", m.group(2), m.start(), out)

    def close(self) -> list[ModuleCall | CallError]:
        """The reply ended: a call waiting for more completes; a tag left open is an error."""
        out: list[ModuleCall | CallError] = []
        if self.open is not None:
            tag, _, start = self.open
            out.append(CallError(f"<{tag}> is never closed (the reply ended inside it)", start))
            self.open, self.call = None, None
        self._complete(out)
        return out

    # -- the grammar -----------------------------------------------------------------------------------------------
    def _text_between(self, between: str, out: list, *, final: bool) -> None:
        """Text outside tags after a call's instruction ends it; a partial tag at the end ("<instr") waits."""
        if self.open is not None or self.call is None or not self.call["instructions"]:
            return
        rest = between.strip()
        if not rest:
            return
        if not final and any(f"<{t}>".startswith(rest) or f"</{t}>".startswith(rest) for t in TAGS):
            return
        self._complete(out)

    def _tag(self, closing: bool, tag: str, start: int, out: list) -> None:
        if self.open is not None:
            open_tag, body_start, open_start = self.open
            if closing and tag == open_tag:
                self.open = None
                self._body(tag, self.text[body_start:start], open_start, out)
            else:
                out.append(CallError(f"<{open_tag}> is not closed before <{'/' if closing else ''}{tag}>", open_start))
                self.open, self.call = None, None
                if not closing:
                    self._tag(False, tag, start, out)
            return
        if closing:
            out.append(CallError(f"</{tag}> without <{tag}>", start))
            return
        if tag == "module":
            self._complete(out)
        elif self.call is None:
            out.append(CallError(f"<{tag}> outside a module call (write <module>X</module> first)", start))
        self.open = (tag, start + len(tag) + 2, start)

    def _body(self, tag: str, body: str, start: int, out: list) -> None:
        if tag == "module":
            name = body.strip()
            if not name:
                out.append(CallError("<module></module> names no module", start))
                return
            self.call = {"module": name, "start": start, "tasks": [], "instructions": [], "region": None,
                         "region_ref": None, "region_slot": None}
        elif self.call is None:
            return                                   # reported when it opened
        elif tag == "instruction":
            if self.call["region"] is not None or self.call["region_ref"] is not None or \
                    self.call["region_slot"] is not None:
                out.append(CallError("an <instruction> after the call's <region>", start))
                return
            task, text = split_instruction(body)
            self.call["tasks"].append(task)
            self.call["instructions"].append(text)
        else:
            region = parse_region(body)
            if isinstance(region, str):
                out.append(CallError(region, self.call["start"]))
                self.call = None
                return
            if region == ("slot",):
                self.call["region_slot"] = self.text[:start].count(AT)     # triggers before it: its index
            elif region[0] == "ref":
                self.call["region_ref"] = region[1]
            else:
                self.call["region"] = region
            self._complete(out)

    def _complete(self, out: list) -> None:
        call, self.call = self.call, None
        if call is None:
            return
        if not call["instructions"]:
            out.append(CallError(f"module {call['module']!r} is called without an <instruction>", call["start"]))
            return
        out.append(ModuleCall(call["module"], tuple(call["tasks"]), tuple(call["instructions"]), call["region"],
                              call["start"], self.pos, region_ref=call["region_ref"], region_slot=call["region_slot"]))
