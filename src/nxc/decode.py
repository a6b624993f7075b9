"""The decode loop and the prefill assembly, once, for the PyTorch reference and the runtime alike (numpy only).

    prompt ids ──▶ token rows ──┬─ image rows after <im_start>      (assemble_prefill)
                                └─ slot rows at each emitted-slot token (e.g. <boxes>: loc_encoder(box))

    fed token is a head's trigger? ──yes──▶ head(hidden) ─▶ (emitted token, next input, what it found)
              │ no                                          e.g. <at> ─▶ loc heads ─▶ <boxes>, feedback embed, box
              ▼
    pick(logits) ─▶ token; next input = its embedding row   (stop: eos, max_new tokens, no room in the context)
              ▼
    yield (token, found or None) ─▶ step(token, next input) ─▶ logits, hidden of the fed token

What a head does is the caller's: the runtime's heads are data (nxc.runtime.dispatch, from the build manifest),
the reference's a call into its torch modules. Deviation from the original, as the reference allows: the token
after a trigger is the head's emitted token, not a sampled one, so `</s>` never cuts a detection in half; a
trigger at the token limit still gets its emitted token.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np

from nxc import names
from nxc.prompt import PromptError


def assemble_prefill(ids: list[int], rows: np.ndarray, *, image_span: tuple[int, int, int] | None,
                     image_features: Callable[[], np.ndarray], slot: int, num_slot_values: int,
                     slot_rows: Callable[[list[int]], np.ndarray], first: int = 0) -> np.ndarray:
    """The rows to prefill for ids[first:] (what a cache holding ids[:first] still needs).

    rows: [T,H] token-embedding rows of `ids`. image_span: (start, end, n) token ids and row count: the n rows
    after each `start` become image_features() (called only when such a row is still to be fed). Slot tokens:
    the k-th `slot` of the whole prompt takes slot value k; slot_rows(ks) gives the rows of the values ks still to
    be fed. Raises PromptError when the slots and the values do not pair up."""
    emb = np.array(rows[first:], np.float32, copy=True)
    if image_span is not None:
        start, end, n = image_span
        for p in (i for i, t in enumerate(ids) if t == start):
            if p + n + 1 >= len(ids) or ids[p + n + 1] != end:
                raise PromptError(f"the image span at position {p} is not {n} image tokens followed by its end")
            if p + n >= first:
                lo = max(p + 1, first)
                emb[lo - first:p + 1 + n - first] = image_features()[lo - p - 1:]
    slots = [i for i, t in enumerate(ids) if t == slot]
    if len(slots) != num_slot_values:
        raise PromptError(f"the conversation has {len(slots)} {names.BOXES} slots but {num_slot_values} boxes; "
                          f"a literal '{names.BOXES}' in the text is not allowed")
    todo = [k for k, i in enumerate(slots) if i >= first]
    if todo:
        emb[[slots[k] - first for k in todo]] = slot_rows(todo)
    return emb


def decode_loop(*, logits, hidden, fed: int, step: Callable, pick: Callable[[object, int], int],
                heads: Mapping[int, Callable], max_new: int, eos: int,
                room: Callable[[], int] | None = None) -> Iterator[tuple[int, object]]:
    """Yields (token, what its head found or None) per generated token.

    step(token, next input or None) -> (logits, hidden) after feeding the token (None: its embedding row);
    pick(logits, n generated so far) -> token; heads[trigger](hidden) -> (emitted token, next input, found);
    room() -> positions left in the context (None: unbounded). The reply ended with "stop" iff its last token
    is `eos`."""
    n = 0
    while True:
        head = heads.get(fed)
        if head is not None:
            token, x, found = head(hidden)
        else:
            if n >= max_new or (room is not None and room() == 0):
                return
            token, x, found = pick(logits, n), None, None
        n += 1
        yield token, found
        if token == eos:
            return
        if (n >= max_new and token not in heads) or (room is not None and room() == 0):
            return                       # at the limit: no step for a token nobody reads (a trigger needs its hidden)
        logits, hidden = step(token, x)
        fed = token
