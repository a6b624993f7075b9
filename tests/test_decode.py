"""nxc.decode: the one decode loop (reference and runtime) with several heads, and the prefill assembly."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nxc.decode import assemble_prefill, decode_loop
from nxc.prompt import PromptError

EOS, V = 2, 12
HEADS = {7: 8, 9: 10}          # trigger -> emitted token


def run(seed: int, max_new: int, capacity: int = 10_000):
    rng = np.random.default_rng(seed)
    fed_log, room = [], [capacity]

    def step(token, x):
        fed_log.append((token, x))
        room[0] -= 1
        return rng.standard_normal(V), f"h{len(fed_log)}"

    def head(trigger):
        return lambda hiddens: [(HEADS[trigger], f"feedback-{trigger}", (trigger, h)) for h in hiddens]

    out = list(decode_loop(logits=rng.standard_normal(V), hidden="h0", fed=0, step=step,
                           pick=lambda lg, n: int(np.argmax(lg)), heads={t: head(t) for t in HEADS},
                           max_new=max_new, eos=EOS, room=lambda: room[0]))
    return out, fed_log


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10_000), max_new=st.integers(1, 40))
def test_every_trigger_is_followed_by_its_head(seed, max_new):
    out, fed = run(seed, max_new)
    tokens = [t for t, _ in out]
    assert 1 <= len(tokens) <= max_new + 1
    assert tokens[-1] == EOS or len(tokens) >= max_new
    for i, t in enumerate(tokens):
        if t in HEADS:                      # a trigger is never the last word: its head emits next
            assert tokens[i + 1] == HEADS[t] and out[i + 1][1][0] == t
        if out[i][1] is not None:
            assert t == HEADS[out[i][1][0]] and tokens[i - 1] == out[i][1][0] if i else True
    # the head's output is what is fed next, and each head saw the hidden of its trigger's step
    for i, (t, found) in enumerate(out):
        if found is not None and i < len(fed):
            assert fed[i] == (t, f"feedback-{found[0]}")
    assert len(fed) == len(tokens) - (1 if tokens[-1] == EOS or len(tokens) >= max_new else 0)


def test_the_context_limit_stops_the_loop():
    out, fed = run(0, max_new=100, capacity=3)
    assert len(fed) == 3 and len(out) <= 4


def test_assemble_prefill_places_image_and_slot_rows():
    ids = [1, 5, 3, 3, 6, 4, 11, 4]           # 5 = image start, 3 image rows, 6 image end, 4 = slot
    rows = np.zeros((len(ids), 2), np.float32)
    feats = np.arange(4, dtype=np.float32).reshape(2, 2) + 1
    emb = assemble_prefill(ids, rows, image_span=(5, 6, 2), image_features=lambda: feats, slot=4, num_slot_values=2,
                           slot_rows=lambda ks: np.full((len(ks), 2), 9.0) + np.asarray(ks)[:, None])
    np.testing.assert_array_equal(emb[2:4], feats)
    np.testing.assert_array_equal(emb[[5, 7]], [[9, 9], [10, 10]])
    later = assemble_prefill(ids, rows, image_span=(5, 6, 2), image_features=lambda: 1 / 0, slot=4,
                             num_slot_values=2, slot_rows=lambda ks: np.full((len(ks), 2), 7.0), first=6)
    assert later.shape == (2, 2) and (later[1] == 7).all()      # the image is not fed again: never computed
    with pytest.raises(PromptError, match="2 <boxes> slots but 1 boxes"):
        assemble_prefill(ids, rows, image_span=(5, 6, 2), image_features=lambda: feats, slot=4, num_slot_values=1,
                         slot_rows=lambda ks: None)
    with pytest.raises(PromptError, match="image span at position 1"):
        assemble_prefill([1, 5, 3, 4], rows[:4], image_span=(5, 6, 2), image_features=lambda: feats, slot=4,
                         num_slot_values=1, slot_rows=lambda ks: np.zeros((1, 2)))


# ---- signal tokens: a chain of emitted tokens whose hiddens are read, the last head emitting None -------------------
SIGNALS = (4, 5, 6)             # 4 is sampled; 5 and 6 are emitted after it; 6's head only reads its hidden


def run_signals(seed: int, max_new: int, *, first_pick: int | None = None):
    rng = np.random.default_rng(seed)
    fed_log = []

    def step(token, x):
        fed_log.append(token)
        return rng.standard_normal(V), f"h-after-{token}-{len(fed_log)}"

    def head(k):
        nxt = SIGNALS[k + 1] if k + 1 < len(SIGNALS) else None
        return lambda hiddens: [(nxt, None, ("signal", k, h)) for h in hiddens]

    def pick(lg, n):
        if first_pick is not None and n == 0:
            return first_pick
        return int(np.argmax(np.where(np.isin(np.arange(V), SIGNALS[1:]), -np.inf, lg)))

    out = list(decode_loop(logits=rng.standard_normal(V), hidden="h0", fed=0, step=step, pick=pick,
                           heads={t: head(k) for k, t in enumerate(SIGNALS)}, max_new=max_new, eos=EOS))
    return out, fed_log


def test_a_signal_chain_reads_each_signal_tokens_hidden_and_sampling_goes_on():
    out, fed = run_signals(0, max_new=12, first_pick=4)
    tokens = [t for t, _ in out]
    assert tokens[:3] == [4, 5, 6]
    found = [f for _, f in out if f is not None]
    assert [f[1] for f in found] == [0, 1, 2]
    # each signal's hidden is the one the step that fed it returned
    assert [f[2] for f in found] == [f"h-after-{t}-{i + 1}" for i, t in enumerate((4, 5, 6))]
    # the last signal's head emitted nothing: the token after it was picked, and carries what the head read
    assert out[3][1] == found[2] and out[3][0] not in SIGNALS and out[3][0] is not None


@pytest.mark.parametrize("max_new", [1, 2, 3])
def test_a_signal_chain_cut_by_the_limit_still_delivers_the_last_hidden(max_new):
    """Emitted signal tokens are a trigger's tokens (they come even at the limit); after the last one only its
    hidden is read: at the limit the loop ends with (None, found), no token made up."""
    out, fed = run_signals(0, max_new=max_new, first_pick=4)
    tokens = [t for t, _ in out]
    assert tokens == [4, 5, 6, None]
    assert [f[1] for _, f in out if f is not None] == [0, 1, 2]
    assert fed == [4, 5, 6]


def test_beam_search_keeps_a_signal_chain_and_its_hiddens_on_the_winning_beam():
    """Beam search with the signal heads: the emitted signals are forced (log p 0), the last head's None emit is
    not, and the winning beam carries the hiddens of its own signals in order."""
    from nxc.decode import beam_search
    rng = np.random.default_rng(3)
    table = rng.standard_normal((V, V)).astype(np.float32)
    table[:, SIGNALS[1:]] = -50.0                  # the emitted signals are never chosen by the logits
    table[0, 4] = 20.0                             # after the prompt (token 0) every beam says signal 4 first

    def heads_for(k):
        nxt = SIGNALS[k + 1] if k + 1 < len(SIGNALS) else None
        return lambda hiddens: [(nxt, None, ("signal", k, h)) for h in hiddens]

    def step(order, tokens, xs):
        return np.stack([table[t] for t in tokens]), [f"h{t}" for t in tokens]

    hyp = beam_search(logits=table[0], hidden="h0", fed=0, step=step,
                      heads={t: heads_for(k) for k, t in enumerate(SIGNALS)}, num_beams=3, max_new=8, eos=EOS)
    assert hyp.tokens[:3] == [4, 5, 6] and hyp.tokens[3] not in SIGNALS
    starts = [i for i, t in enumerate(hyp.tokens) if t == 4]
    assert all(hyp.tokens[i:i + 3] == [4, 5, 6] for i in starts if i + 3 <= len(hyp.tokens))
    assert hyp.found[:3] == [("signal", 0, "h4"), ("signal", 1, "h5"), ("signal", 2, "h6")]
    assert [f[1] for f in hyp.found] == [0, 1, 2] * (len(hyp.found) // 3)
