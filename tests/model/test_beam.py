"""Beam search (nxc.decode.beam_search) against transformers' own, and with triggers per beam."""
import numpy as np
import pytest
import torch
from transformers import DynamicCache

from nxc.decode import beam_search
from nxc.model.generate import generate


def _hf_and_ours(ref, ids, *, num_beams, max_new, length_penalty, early_stopping, banned):
    model, eos = ref.model, ref.token_ids.eos
    emb = model.embed_tokens(torch.tensor([ids]))
    with torch.no_grad():
        hf = model.llm.generate(inputs_embeds=emb, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                num_beams=num_beams, max_new_tokens=max_new, do_sample=False,
                                length_penalty=length_penalty, early_stopping=early_stopping,
                                suppress_tokens=list(banned), eos_token_id=eos, pad_token_id=0,
                                num_return_sequences=1)[0].tolist()
        cache = DynamicCache()
        logits, hidden = model.llm_step(emb, cache)

        def step(order, tokens, xs):
            cache.reorder_cache(torch.tensor(order))
            lg, hid = model.llm_step(model.embed_tokens(torch.tensor([[t] for t in tokens])), cache)
            return lg.float().numpy(), [hid[i:i + 1] for i in range(len(order))]
        ours = beam_search(logits=logits[0].float().numpy(), hidden=hidden, fed=ids[-1], step=step, heads={},
                           num_beams=num_beams, max_new=max_new, eos=eos, length_penalty=length_penalty,
                           early_stopping=early_stopping, banned=banned)
    if eos in hf:                                   # shorter beams come back padded after their </s>
        hf = hf[:hf.index(eos) + 1]
    return hf, ours.tokens


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping", [
    (2, 1.0, False), (3, 1.0, True), (4, 0.5, False), (3, 2.0, "never"), (5, -1.0, False)])
def test_beam_search_equals_transformers_on_text(tiny_ref, num_beams, length_penalty, early_stopping):
    tok = tiny_ref.token_ids
    banned = tuple(tok.never_sampled) + (tok.at,)          # text only: no trigger in any beam
    for k, text in enumerate(["hello there", "what is in the picture", "a b c d"]):
        ids = tiny_ref.tokenizer.encode(text)
        hf, ours = _hf_and_ours(tiny_ref, ids, num_beams=num_beams, max_new=12 + 3 * k,
                                length_penalty=length_penalty, early_stopping=early_stopping, banned=banned)
        assert ours == hf, f"{text!r}: {ours} vs transformers {hf}"


def test_eos_ends_a_beam_when_it_is_likely(tiny_ref):
    """A model whose </s> is made likely: beams finish early, as in transformers."""
    ref = tiny_ref
    eos = ref.token_ids.eos
    bias = ref.model.llm.lm_head.weight[eos].clone()
    try:
        with torch.no_grad():
            ref.model.llm.lm_head.weight[eos] *= 40
        ids = ref.tokenizer.encode("hello there")
        banned = tuple(ref.token_ids.never_sampled) + (ref.token_ids.at,)
        hf, ours = _hf_and_ours(ref, ids, num_beams=3, max_new=20, length_penalty=1.0, early_stopping=False,
                                banned=banned)
        assert ours == hf and ours[-1] == eos and len(ours) < 20
    finally:
        with torch.no_grad():
            ref.model.llm.lm_head.weight[eos] = bias


def test_each_beam_keeps_its_own_trigger_hiddens(tiny_ref, image):
    """Forced triggers in the beams: the winner's boxes come from the hiddens its own <at> steps gave (recomputed
    here by feeding the winner's tokens alone), not another beam's."""
    from nxc.model.generate import prefill_embeds
    ref, tok = tiny_ref, tiny_ref.token_ids
    ids = ref.tokenizer.encode("where is it")
    features = ref.model.encode_image(torch.zeros(1, 3, ref.model.config.vision.image_size,
                                                  ref.model.config.vision.image_size))
    lm = ref.model.llm.lm_head
    keep = lm.weight[tok.at].clone()
    try:
        with torch.no_grad():
            lm.weight[tok.at] *= 8                # <at> likely enough to appear in some beams
        gen = generate(ref.model, ids, tok, image_features=None, max_new_tokens=10, num_beams=3)
        assert tok.at in gen.token_ids, "the test needs a trigger in the winning beam"
        # the winner's tokens fed alone, batch 1: the hidden at each of its <at>
        cache = DynamicCache()
        with torch.no_grad():
            _, h = ref.model.llm_step(prefill_embeds(ref.model, ids, tok, None, None), cache)
            want, x = [], None
            for t in gen.token_ids[:-1]:
                emb = ref.model.embed_tokens(torch.tensor([[t]])) if x is None else x
                x = None
                _, h = ref.model.llm_step(emb, cache)
                if t == tok.at:
                    want.append(h[0])
                    _, fb = ref.model.loc_feedback(h)
                    x = fb[:, None]
        assert len(want) == len(gen.trigger_hidden)
        torch.testing.assert_close(gen.trigger_hidden, torch.stack(want), atol=1e-4, rtol=1e-4)
        for i, t in enumerate(gen.token_ids[:-1]):
            if t == tok.at:
                assert gen.token_ids[i + 1] == tok.boxes
    finally:
        with torch.no_grad():
            lm.weight[tok.at] = keep
