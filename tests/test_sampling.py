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
