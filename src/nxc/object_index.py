"""Answers by proposal index (ChatRex-style retrieval, issue 19): the reply names boxes by their index among the
image's proposals instead of regressing them.

    <ground>the red circle</ground><objects><obj3><obj7></objects>   ─▶  Grounding("the red circle", [3, 7])

`ObjectIndexParser` reads a reply's token ids as they are generated (numpy-free, for the reference and the runtime
alike) and gives a Grounding the moment `</objects>` closes. One-line behaviours, as the official parser
(`<ground>(.*?)</ground><objects>(.*?)</objects>`, each `<objN>` mapped to the N-th input box):
  - an index at or past the number of proposals is dropped (an empty proposal list drops them all; the phrase is
    still reported, with no boxes);
  - an `<objN>` outside `<objects>...</objects>` is text, as is anything but `<objN>` inside it;
  - `<objects>` not right after `</ground>` is text; a `<ground>` phrase not followed by `<objects>` gives nothing;
  - tags still open when the reply ends give nothing (a reply cut by the token limit);
  - a repeated index is kept once, at its first place.
User text never reaches the parser: indices typed by a user stay text (nxc.prompt keeps special-token strings in
user text as plain text).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

GROUND_OPEN, GROUND_CLOSE = "<ground>", "</ground>"
OBJECTS_OPEN, OBJECTS_CLOSE = "<objects>", "</objects>"
OBJ_FEAT = "<objfeat>"
MAX_OBJECTS = 100                 # <obj0> .. <obj99>


def obj_token(i: int) -> str:
    return f"<obj{i}>"


OBJECT_TOKENS = tuple(obj_token(i) for i in range(MAX_OBJECTS))
ADDED_TOKENS = (*OBJECT_TOKENS, OBJ_FEAT, GROUND_OPEN, GROUND_CLOSE, OBJECTS_OPEN, OBJECTS_CLOSE)


@dataclass(frozen=True)
class IndexTokens:
    """The ids of the tags and of each `<objN>` in a vocabulary."""
    ground_open: int
    ground_close: int
    objects_open: int
    objects_close: int
    obj: Mapping[int, int]        # token id -> N

    @classmethod
    def from_vocab(cls, token_id: Callable[[str], int]) -> "IndexTokens":
        return cls(ground_open=token_id(GROUND_OPEN), ground_close=token_id(GROUND_CLOSE),
                   objects_open=token_id(OBJECTS_OPEN), objects_close=token_id(OBJECTS_CLOSE),
                   obj={token_id(obj_token(i)): i for i in range(MAX_OBJECTS)})


@dataclass
class Grounding:
    phrase: str
    indices: list[int]            # proposals named, in order, repeats and out-of-range ones dropped
    dropped: list[int] = field(default_factory=list)     # indices named that are not proposals


class ObjectIndexParser:
    """feed(token id) -> the Grounding its `</objects>` closes, or None. decode(ids) -> text gives the phrase."""

    OUTSIDE, PHRASE, AFTER_PHRASE, OBJECTS = range(4)

    def __init__(self, tokens: IndexTokens, num_proposals: int, decode: Callable[[list[int]], str]):
        if num_proposals < 0:
            raise ValueError(f"num_proposals must be >= 0, got {num_proposals}")
        self.t, self.n, self.decode = tokens, num_proposals, decode
        self.state, self.phrase_ids, self.phrase = self.OUTSIDE, [], ""
        self.indices: list[int] = []
        self.dropped: list[int] = []
        self.groundings: list[Grounding] = []

    def feed(self, token: int) -> Grounding | None:
        t = self.t
        if self.state == self.PHRASE:
            if token == t.ground_close:
                self.phrase, self.state = self.decode(self.phrase_ids).strip(), self.AFTER_PHRASE
            else:
                self.phrase_ids.append(token)
            return None
        if self.state == self.AFTER_PHRASE:
            if token == t.objects_open:
                self.state, self.indices, self.dropped = self.OBJECTS, [], []
                return None
            self.state = self.OUTSIDE              # the phrase is not followed by its objects: nothing
        if self.state == self.OBJECTS:
            if token == t.objects_close:
                g = Grounding(self.phrase, self.indices, self.dropped)
                self.groundings.append(g)
                self.state = self.OUTSIDE
                return g
            i = t.obj.get(token)
            if i is not None:
                if i >= self.n:
                    self.dropped.append(i)
                elif i not in self.indices:
                    self.indices.append(i)
            return None
        if token == t.ground_open:                 # OUTSIDE
            self.state, self.phrase_ids = self.PHRASE, []
        return None

    @property
    def open(self) -> bool:
        """A tag is open: the reply ended inside a grounding, which gives nothing."""
        return self.state in (self.PHRASE, self.OBJECTS)


_GROUNDED = re.compile(r"<ground>\s*(.*?)\s*</ground>\s*<objects>(.*?)</objects>", re.S)
_INDEX = re.compile(r"<obj(\d+)>")


def render(raw: str, num_objects: int) -> str:
    """A reply as shown: each closed `<ground>phrase</ground><objects>...</objects>` becomes `phrase [k, ...]`, k
    numbering the reply's boxes in order (as NExT-Chat's `[k]`): one per valid index (< num_objects, repeats once,
    as ObjectIndexParser); a grounding with no valid index is its phrase. Anything unclosed stays as decoded."""
    counter = iter(range(1 << 30))

    def one(m: re.Match) -> str:
        seen = []
        for i in map(int, _INDEX.findall(m.group(2))):
            if i < num_objects and i not in seen:
                seen.append(i)
        if not seen:
            return m.group(1)
        return f"{m.group(1)} [{', '.join(str(next(counter)) for _ in seen)}]"
    return _GROUNDED.sub(one, raw)


def settled(text: str) -> int:
    """How much of a rendered, still growing reply can be shown: up to an unclosed `<ground>` or a trailing piece
    of a tag (the next tokens may still turn it into `phrase [k]`)."""
    cut = text.rfind("<ground>")
    if cut >= 0 and _GROUNDED.search(text, cut) is None:
        return cut
    lt = text.rfind("<")
    return lt if lt >= 0 and ">" not in text[lt:] else len(text)
