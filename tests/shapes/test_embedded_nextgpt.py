"""The shipped NExT-GPT (embedded:shapes-nextgpt): it loads, draws what it is asked and answers existence questions,
and its build through the runtime equals the PyTorch reference (greedy ids identical, pictures within one uint8
level). Accuracy itself is measured by nxc-eval (its eval.json), not here: the counts below are fixed by their seeds
and sit well under what nxc-eval measured, so a broken or mis-loaded checkpoint fails them and the shipped one does
not."""
import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="the NExT-GPT reference needs the export extra (torch)")
pytest.importorskip("diffusers", reason="the NExT-GPT reference needs the export extra (diffusers)")

from nxc import names  # noqa: E402
from nxc.assets import nextgpt_checkpoint  # noqa: E402
from nxc.shapes.data import make_sample  # noqa: E402
from nxc.shapes.eval_generation import for_judging, make_requests  # noqa: E402

DRAW = "Draw a red circle and a blue square."


def _blank():
    from PIL import Image
    return Image.new("RGB", (64, 64), (210, 210, 210))


def test_the_checkpoint_is_small_and_documented():
    ckpt = nextgpt_checkpoint()
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    assert size < 50e6
    record = json.loads((ckpt / "training.json").read_text())
    assert "train_nextgpt" in record["command"] and record["config"]["l2_weight"] > 0
    assert "nxc-train-shapes-generator" in " ".join(record["generator"]["commands"])
    assert set(json.loads((ckpt / "eval.json").read_text())) >= {"pope", "generation"}


def test_the_reference_draws_what_it_is_asked(shapes_nextgpt_ref):
    r = shapes_nextgpt_ref.chat(_blank(), DRAW, max_new_tokens=32)
    assert r.text.startswith("Sure, a red circle and a blue square.") and r.finish_reason == "stop"
    assert r.token_ids[-5:] == shapes_nextgpt_ref.signals + [shapes_nextgpt_ref.eos]
    assert len(r.images) == 1 and r.images[0].shape == (64, 64, 3)


def test_existence_questions(shapes_nextgpt_ref):
    """One LLM row per image (the pooled tower): 12 seeded POPE questions, at least 8 right (nxc-eval: eval.json)."""
    rng = np.random.default_rng(11)
    right = 0
    for _ in range(12):
        s = make_sample(rng, "pope")
        r = shapes_nextgpt_ref.chat(s.image, s.question, max_new_tokens=4)
        right += ("yes" in r.text.lower()) == bool(s.present)
        assert not r.images
    assert right >= 8


@pytest.mark.parametrize("scheduler", ["ddim", "lcm"])
def test_the_runtime_equals_the_reference(shapes_nextgpt_pipe, shapes_nextgpt_ref, scheduler):
    want = shapes_nextgpt_ref.chat(_blank(), DRAW, max_new_tokens=32, seed=3, scheduler=scheduler, steps=8)
    got = shapes_nextgpt_pipe.chat(_blank(), DRAW, max_new_tokens=32,
                                   head_options={"signal": {"seed": 3, "scheduler": scheduler, "steps": 8}})
    assert got.token_ids == want.token_ids and len(got.images) == len(want.images) == 1
    assert np.abs(got.images[0].pixels.astype(int) - want.images[0].astype(int)).max() <= 1
    assert names.SIGNAL_TOKENS[0] in got.raw_text


def test_its_pictures_hold_what_was_asked(shapes_nextgpt_pipe, embedded_build, retrieval_build):
    """Six seeded held-out requests through the runtime, judged by the shipped NExT-Chat: at least 2/3 of the
    requested objects found (nxc-eval's recall on its held-out set is in eval.json)."""
    from nxc.shapes.eval_generation import Judges
    judges = Judges.load(embedded_build, retrieval_build)
    found = asked = 0
    for req in make_requests(99, 6):
        r = shapes_nextgpt_pipe.chat(_blank(), req.text, max_new_tokens=48)
        assert len(r.images) == 1, r.text
        pic = for_judging(r.images[0].pixels)
        found += sum(judges.present(pic, c, s) for c, s in req.objects)
        asked += len(req.objects)
    assert found >= 2 * asked / 3, (found, asked)
