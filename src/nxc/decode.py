"""The decode loop and the prefill assembly, once, for the PyTorch reference and the runtime alike (numpy only).

    prompt ids ──▶ token rows ──┬─ image rows after <im_start>      (assemble_prefill)
                                └─ slot rows at each emitted-slot token (e.g. <boxes>: loc_encoder(box))

    fed token is a head's trigger? ──yes──▶ head(hidden) ─▶ (emitted token, next input, what it found)
              │ no                                          e.g. <at> ─▶ loc heads ─▶ <boxes>, feedback embed, box
              │                                             a head that emits None only read the hidden (a signal
              │                                             token, [IMG3]): the row then picks as usual
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

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

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


class Row:
    """One sequence's decode state: the logits and hidden of the token it was fed last, and how far it is.
    The caller's `tag` (a request, a beam) travels with it."""

    def __init__(self, *, logits, hidden, fed: int, pick: Callable[[object, int], int], max_new: int,
                 room: Callable[[], int] | None = None, tag=None):
        self.logits, self.hidden, self.fed, self.pick = logits, hidden, fed, pick
        self.max_new, self.room, self.tag = max_new, room, tag
        self.n = 0                  # tokens generated
        self.ended = False          # no step follows: its last token (if any) was the reply's last

    def feed(self, token: int, logits, hidden) -> None:
        """The step that fed `token` gave these."""
        self.fed, self.logits, self.hidden = token, logits, hidden


@dataclass
class Choice:
    row: Row
    token: int
    x: object                   # the next input for the step (None: the token's embedding row)
    found: object               # what the head found, or None


def choose(rows: Sequence[Row], *, heads: Mapping[int, Callable], eos: int) -> list[Choice]:
    """One decode step for every row not ended: the token each row says now. The rules of the loop, once, for
    batch 1 (decode_loop) and batch B (nxc.runtime.batch, beam search):

      fed token is a head's trigger? ──yes──▶ heads[trigger]([hidden of each such row]) ─▶ (emitted token,
              │ no                                next input, found) per row: one call for all of them; an
              │                                   emitted None: the row picks (or ends at its limit) and what the
              │                                   head found goes with that token (a Choice of token None at the end)
              ▼
      context full or max_new reached? ──yes──▶ ended, no token
              │ no
              ▼
      row.pick(logits, n) ─▶ token              (next input: its embedding row)

    A row is marked ended with its token when no step should follow: `eos`, the limit reached (a trigger at the
    limit still gets its head's token), or no room in the context."""
    chosen: dict[int, Choice] = {}
    by_head: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        if r.ended:
            continue
        if r.fed in heads:
            by_head.setdefault(r.fed, []).append(i)
        elif r.n >= r.max_new or (r.room is not None and r.room() == 0):
            r.ended = True
        else:
            chosen[i] = Choice(r, r.pick(r.logits, r.n), None, None)
    for trigger, idx in by_head.items():
        for i, (token, x, found) in zip(idx, heads[trigger]([rows[i].hidden for i in idx])):
            r = rows[i]
            if token is not None:
                chosen[i] = Choice(r, token, x, found)
            elif r.n >= r.max_new or (r.room is not None and r.room() == 0):
                r.ended = True       # a head that only read the hidden, at the limit: what it found, no token
                chosen[i] = Choice(r, None, None, found)
            else:                    # a head that only read the hidden (a signal token): the row picks as usual
                chosen[i] = Choice(r, r.pick(r.logits, r.n), None, found)
    out = [chosen[i] for i in sorted(chosen)]
    for c in out:
        r = c.row
        if c.token is None:
            continue
        r.n += 1
        if c.token == eos or (r.n >= r.max_new and c.token not in heads) or (r.room is not None and r.room() == 0):
            r.ended = True           # at the limit: no step for a token nobody reads (a trigger needs its hidden)
    return out


def decode_loop(*, logits, hidden, fed: int, step: Callable, pick: Callable[[object, int], int],
                heads: Mapping[int, Callable], max_new: int, eos: int,
                room: Callable[[], int] | None = None) -> Iterator[tuple[int, object]]:
    """Batch 1: yields (token, what its head found or None) per generated token (the rules: `choose`).

    step(token, next input or None) -> (logits, hidden) after feeding the token (None: its embedding row);
    pick(logits, n generated so far) -> token; heads[trigger]([hidden]) -> [(emitted token, next input, found)];
    room() -> positions left in the context (None: unbounded). The reply ended with "stop" iff its last token
    is `eos`."""
    row = Row(logits=logits, hidden=hidden, fed=fed, pick=pick, max_new=max_new, room=room)
    while True:
        chosen = choose([row], heads=heads, eos=eos)
        if not chosen:
            return
        c = chosen[0]
        yield c.token, c.found           # token None: the row ended at its limit after a head read its hidden
        if row.ended:
            return
        row.feed(c.token, *step(c.token, c.x))


@dataclass
class Hypothesis:
    """A finished beam: its tokens, what its heads found (in order), its length-penalised score."""
    tokens: list[int]
    found: list
    score: float


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """float32, as transformers' beam search scores."""
    x = np.asarray(x, np.float32)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def beam_search(*, logits, hidden, fed: int, step: Callable, heads: Mapping[int, Callable], num_beams: int,
                max_new: int, eos: int, length_penalty: float = 1.0, early_stopping: bool | str = False,
                banned: Sequence[int] = (), room: Callable[[], int] | None = None) -> Hypothesis:
    """Beam search with Hugging Face's semantics (transformers' `_beam_search`: 2 x num_beams candidates a step,
    finished beams scored sum(log p) / generated_length ** length_penalty, early_stopping True / False / "never"),
    and triggers per beam: a beam fed a head's trigger continues only with the head's emitted token (log p 0),
    and the head's next input and what it found belong to that beam and move with it when beams reorder (the
    original NExT-Chat keeps the trigger hiddens apart from its beams and can decode a box from another beam's).

    logits, hidden: the prompt's last position. step(order, tokens, inputs) -> (logits [num_beams, V], hiddens
    per beam): row i of the cache first takes row order[i]'s contents, then is fed tokens[i] (inputs[i], or its
    embedding row when None). room() -> positions left in the context after the prompt and the fed tokens.
    -> the best finished Hypothesis."""
    nb, neg = num_beams, -1.0e9
    lp = np.asarray(logits, np.float32).reshape(1, -1)
    rows = [hidden] * nb
    lp = np.repeat(lp, nb, axis=0)
    beams = [([], []) for _ in range(nb)]                    # (tokens, found) per running beam
    scores = np.full(nb, neg, np.float32)
    scores[0] = 0.0                                           # the beams start as copies: only the first counts
    feds = [fed] * nb
    finished: list[Hypothesis] = []
    improvable = True
    n = 0
    while True:
        logp = _log_softmax(lp)
        if len(banned):
            logp[:, list(banned)] = -np.inf
        head_out: dict[int, tuple] = {}
        by_head: dict[int, list[int]] = {}
        for i, f in enumerate(feds):
            if f in heads:
                by_head.setdefault(f, []).append(i)
        for trigger, idx in by_head.items():
            for i, out in zip(idx, heads[trigger]([rows[i] for i in idx])):
                head_out[i] = out
                if out[0] is not None:            # None: the head only read the hidden; the beam goes on as usual
                    logp[i] = -np.inf
                    logp[i, out[0]] = 0.0
        acc = (logp + scores[:, None]).reshape(-1)
        k = 2 * nb
        top = np.argsort(-acc, kind="stable")[:k]
        src, tok, cand = top // lp.shape[1], top % lp.shape[1], acc[top]
        left = None if room is None else room()
        hits = np.array([t == eos or (n + 1 >= max_new and t not in heads) or left == 0 for t in tok])
        # the finished: only the first num_beams candidates may finish, scored by their generated length
        norm = cand / np.float32(float(n + 1) ** length_penalty)
        if improvable and not (len(finished) == nb and early_stopping is True):
            for r in range(min(nb, k)):
                if hits[r] and np.isfinite(cand[r]) and cand[r] > neg / 2:
                    toks, found = beams[src[r]]
                    extra = [head_out[src[r]][2]] if src[r] in head_out else []
                    finished.append(Hypothesis(toks + [int(tok[r])], found + extra, float(norm[r])))
            finished = sorted(finished, key=lambda h: -h.score)[:nb]
        # the running: the best num_beams candidates that did not finish
        run = (cand + hits * np.float32(neg)).astype(np.float32)
        nxt = np.argsort(-run, kind="stable")[:nb]
        order = [int(src[j]) for j in nxt]
        beams = [(beams[s][0] + [int(tok[j])], beams[s][1] + ([head_out[s][2]] if s in head_out else []))
                 for s, j in zip(order, nxt)]
        xs = [head_out[s][1] if s in head_out else None for s in order]
        scores = run[nxt].astype(np.float32)
        feds = [int(tok[j]) for j in nxt]
        n += 1
        best_len = max_new if (early_stopping == "never" and length_penalty > 0) else n
        if len(finished) == nb:
            improvable = improvable and scores[0] / float(best_len) ** length_penalty > finished[-1].score
        if not improvable or (len(finished) == nb and early_stopping is True) or hits.all():
            break
        lp, rows = step(order, feds, xs)
        lp = np.asarray(lp, np.float32)
    if not finished:                     # cannot happen: the last step's candidates all hit a limit
        raise RuntimeError("beam search ended without a finished beam")
    return finished[0]
