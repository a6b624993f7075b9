import numpy as np
import pytest

from nxc.sampling import SamplingParams, pick_token


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    assert pick_token(logits, SamplingParams(), None) == 1


def test_seeded_sampling_is_reproducible_and_varies():
    rng_logits = np.random.default_rng(0).normal(size=50)
    p = SamplingParams(temperature=1.0, seed=7)
    a = [pick_token(rng_logits, p, r) for r in [p.rng()] for _ in range(20)]
    r2 = p.rng()
    b = [pick_token(rng_logits, p, r2) for _ in range(20)]
    assert a == b
    assert len(set(a)) > 1


def test_top_k_restricts_support():
    logits = np.arange(10, dtype=float)
    p = SamplingParams(temperature=5.0, top_k=3, seed=0)
    rng = p.rng()
    assert {pick_token(logits, p, rng) for _ in range(200)} <= {7, 8, 9}


def test_top_p_keeps_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    p = SamplingParams(temperature=1.0, top_p=0.75, seed=0)
    rng = p.rng()
    assert {pick_token(logits, p, rng) for _ in range(300)} == {0, 1}


@pytest.mark.parametrize("kw,msg", [({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"),
                                    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")])
def test_bad_params(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


# ---- banned ids: tokens only a head may emit, and the image span's, are never chosen (security review, issue 2) ---
@pytest.mark.parametrize("kw", [{}, {"temperature": 4.0}, {"temperature": 4.0, "top_k": 3},
                                {"temperature": 4.0, "top_p": 0.5}, {"temperature": 0.1, "top_k": 1}])
def test_banned_ids_are_never_chosen(kw):
    logits = np.zeros(8)
    logits[[5, 6]] = 50.0                       # the banned tokens are by far the likeliest
    p = SamplingParams(seed=0, **kw)
    rng = p.rng()
    picks = {pick_token(logits, p, rng, banned=(5, 6)) for _ in range(300)}
    assert picks and not picks & {5, 6}


def test_banning_unlikely_ids_keeps_the_draws():
    # Parity: masking tokens that had no chance changes nothing, draw for draw.
    logits = np.random.default_rng(1).normal(size=40)
    logits[[3, 9]] = -1e4
    p = SamplingParams(temperature=1.3, top_p=0.9, top_k=20, seed=5)
    a, b = p.rng(), p.rng()
    assert [pick_token(logits, p, a) for _ in range(50)] == [pick_token(logits, p, b, banned=[3, 9]) for _ in range(50)]


@pytest.mark.parametrize("banned, msg", [((0, 1, 2, 3), "all 4 tokens are banned"),
                                         ((4,), r"banned token ids must be in 0..3 .*got \[4\]"),
                                         ((-1,), r"got \[-1\]")])
def test_bad_banned_ids(banned, msg):
    with pytest.raises(ValueError, match=msg):
        pick_token(np.zeros(4), SamplingParams(), None, banned=banned)
