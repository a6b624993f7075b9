"""The embedded NExT-GPT's training code at tiny sizes (seconds): the turns it teaches, the signal hiddens it projects,
its loss falling on a fixed batch, and a short run whose checkpoint loads and draws through the reference."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from nxc import names  # noqa: E402
from nxc.shapes.train_generator import GeneratorTrainConfig  # noqa: E402
from nxc.shapes.train_generator import train as train_generator  # noqa: E402
from nxc.shapes.train_nextgpt import (CaptionConditioning, Encoder, NextGptTrainConfig, draw_turn,  # noqa: E402
                                      initial_model, loss_of, sample_batch, train)

TINY = NextGptTrainConfig(steps=4, batch_size=4, warmup=1, d_model=32, layers=1)


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    train_generator(out, GeneratorTrainConfig(arch="test", vae_steps=2, unet_steps=2, batch_size=2, warmup=1,
                                              sample_steps=1, threads=1), command="test")
    return out


@pytest.fixture(scope="module")
def trained(generator, tmp_path_factory):
    out = tmp_path_factory.mktemp("ngpt") / "ckpt"
    train(out, generator, TINY, command="test")
    return out


def test_draw_turns_ask_and_answer_the_same_caption():
    rng = np.random.default_rng(0)
    for _ in range(20):
        request, answer, caption = draw_turn(rng)
        assert caption in request and answer == f"Sure, {caption}.{''.join(names.SIGNAL_TOKENS)}"
        assert 1 <= caption.count(" a ") + caption.startswith("a ") <= 3


def test_signal_hiddens_reach_the_projector_and_the_loss_falls(generator, trained):
    """A fixed batch: cross-entropy on the answers and the L2 of the projected signal hiddens to the generator's
    caption conditioning, both falling; the L2 takes its gradient through the LLM (NExT-GPT's signal tokens)."""
    from nxc.model.sp_tokenizer import SentencePieceOracle
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = replace(TINY, draw_share=1.0, batch_size=6)
    model = initial_model(generator, cfg, None).train()
    model.vision_tower.requires_grad_(False)
    enc = Encoder(SentencePieceOracle.from_dir(trained))
    target = CaptionConditioning(generator, model.config.projector.num_queries)
    batch = sample_batch(model, enc, np.random.default_rng(1), cfg)
    ids = batch[0]
    assert all((ids[r] == s).sum() == 1 for r in range(len(ids)) for s in enc.signals)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    stats = []
    for _ in range(12):
        loss, info = loss_of(model, enc, target, batch, cfg)
        opt.zero_grad()
        loss.backward()
        if not stats:
            assert model.llm.model.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0
            assert model.output_projector.query_embs.grad.abs().sum() > 0
        opt.step()
        stats.append(info)
    assert stats[-1]["ce"] < 0.5 * stats[0]["ce"] and stats[-1]["l2"] < 0.8 * stats[0]["l2"], stats


def test_short_run_writes_a_checkpoint_that_loads_and_draws(trained, generator):
    from PIL import Image

    from nxc.model.nextgpt import load_nextgpt
    from nxc.model.nextgpt_reference import NextGptReferenceChat
    model, tok = load_nextgpt(trained)
    assert model.config.projector.num_queries == 16 and model.config.projector.out_dim == 16   # from the generator
    assert model.draw_defaults["default_steps"] == TINY.default_steps
    rec = json.loads((trained / "training.json").read_text())
    assert rec["command"] == "test" and len(rec["log"]) == 1 and np.isfinite(rec["log"][0]["loss"])
    assert rec["generator"]["commands"] == ["test"]            # the generator's own record travels with it
    assert not (trained / "partial").exists()
    chat = NextGptReferenceChat(model=model, tokenizer=tok)
    forced = chat.signals[0]

    def say_img0(logits, n):
        logits = logits.clone()
        if n == 0:
            logits[0, forced] = 1e4
        return logits
    r = chat.chat(Image.new("RGB", (64, 64), "white"), "Draw a red circle.", max_new_tokens=6, steps=2,
                  logits_processor=say_img0)
    assert r.token_ids[:4] == chat.signals and len(r.images) == 1 and r.images[0].shape == (16, 16, 3)


def test_init_continues_an_earlier_run_tower_included(trained, generator):
    """--init: the earlier run's vision tower (saved in clip/, beside model.safetensors) and every matching tensor;
    a second stage that started from the embedded NExT-Chat's tower instead lost the first stage's POPE."""
    from nxc.model.nextgpt import load_nextgpt
    earlier, _ = load_nextgpt(trained)
    model = initial_model(generator, TINY, trained)
    for name, part in (("vision_tower", model.vision_tower), ("mm_projector", model.mm_projector),
                       ("llm", model.llm), ("output_projector", model.output_projector)):
        want = getattr(earlier, name).state_dict()
        assert all(torch.equal(v, want[k]) for k, v in part.state_dict().items()), name
