"""Beam search for one conversation turn, on a BatchCache of num_beams rows (nxc.decode.beam_search has the rules).

    prompt rows (the conversation's cache) ─copy─▶ row 0 ─▶ per step: rows reordered to their beams (one copy of
    the rows that change), one llm call for all beams, heads for the beams fed a trigger (nxc.decode)

The conversation's own cache keeps the prompt: a next turn feeds the reply again, as any turn it did not decode
itself. The events come when the search ends, from the winning beam.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from nxc import names
from nxc.decode import beam_search
from nxc.runtime.turn import Reply, Turn


def beam_reply(conv, logits, hidden, turn: Turn, reply: Reply, *, num_beams: int, length_penalty: float,
               early_stopping) -> Iterator:
    """Search, then give the winning beam's tokens to conv's reply (its Token / head events)."""
    pipe = conv.pipe
    runner, batch = pipe.batch_rows(num_beams, what="beam search", instead="use num_beams=1")
    p = conv.cache.length
    batch.reserve(p + 1)
    for name, rows in conv.cache.arrays().items():
        batch.buffers[name][0, :p] = rows[0]
    batch.lengths[:] = p
    identity = list(range(num_beams))

    def step(order, tokens, xs):
        with conv.timeline.stage("decode"):
            if order != identity:
                n = int(batch.lengths[0])
                moved = [i for i in identity if order[i] != i]
                for buf in batch.buffers.values():
                    buf[moved, :n] = buf[[order[i] for i in moved], :n]
            emb = np.concatenate([np.asarray(pipe.embeddings[[t]], np.float32)[None] if x is None
                                  else np.asarray(x, np.float32).reshape(1, 1, -1) for t, x in zip(tokens, xs)])
            out = runner.run_rows(emb, batch, num_beams)
        return out["logits"], [out["hidden"][i:i + 1] for i in identity]

    hyp = beam_search(logits=logits, hidden=hidden, fed=turn.ids[-1], step=step, heads=pipe.dispatch.triggers,
                      num_beams=num_beams, max_new=turn.max_new, eos=pipe.tokens[names.EOS],
                      length_penalty=length_penalty, early_stopping=early_stopping,
                      banned=pipe.dispatch.never_sampled, room=lambda: batch.capacity - int(batch.lengths[0]))
    found, prev = list(hyp.found), turn.ids[-1]
    for token in hyp.tokens:
        f = found.pop(0) if prev in pipe.dispatch.triggers else None
        yield from conv._on_token(reply, token, f)
        prev = token
