"""A NExT-GPT-style checkpoint through nxc-export and the runtime (issue 28): the build's graphs, head, generator
entry and reports; the runtime's replies and pictures equal the PyTorch reference's (greedy ids identical, the
picture within 1e-3 before the shared uint8 rounding: at most one level apart)."""
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the NExT-GPT export needs the export extra (torch)")
pytest.importorskip("diffusers", reason="the NExT-GPT export needs the export extra (diffusers)")

from nxc import names  # noqa: E402
from tests.conftest import NEXTGPT_PROMPT  # noqa: E402


@pytest.fixture(scope="module")
def ref(nextgpt_ckpt):
    from nxc.model.nextgpt_reference import NextGptReferenceChat
    return NextGptReferenceChat.load(nextgpt_ckpt)


@pytest.fixture(scope="module")
def pipe(nextgpt_build):
    from nxc.runtime.pipeline import Pipeline
    return Pipeline.load(nextgpt_build)


def _image(seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))


def test_the_build_has_the_family_graphs_a_signal_head_and_a_generator(nextgpt_build):
    m = json.loads((nextgpt_build / "manifest.json").read_text())
    assert set(m["graphs"]) == set(names.GENERATION_GRAPHS)
    assert m["graphs"]["vision"]["outputs"][0]["shape"] == ["batch", 1, m["config"]["llm"]["hidden_size"]]
    assert m["heads"] == [{"kind": "signal", "signals": list(names.SIGNAL_TOKENS), "graph": "projector",
                           "inputs": {"hidden": "hidden", "embeds": "signal_embeds"}, "collect": ["conditioning"],
                           "finish": "generate"}]
    g = m["generator"]
    assert (g["default_steps"], g["default_guidance"], g["default_scheduler"]) == (20, 3.0, "ddim")
    assert m["axes"]["batch"][2] >= 2 and all(t in m["tokens"] for t in names.SIGNAL_TOKENS)
    assert m["prompt"]["num_image_tokens"] == 1 and m["config"]["projector"]["num_queries"] == 77
    parity = json.loads((nextgpt_build / "reports" / "parity.json").read_text())
    assert set(parity) == set(names.GENERATION_GRAPHS) and all(p["ok"] for p in parity.values())


def test_the_runtime_bans_what_the_reference_bans(pipe, ref):
    assert tuple(pipe.dispatch.never_sampled) == ref.never_sampled


@pytest.mark.parametrize("scheduler, guidance", [("ddim", None), ("euler", 1.0), ("lcm", 2.0)])
def test_the_planted_reply_and_its_picture_equal_the_reference(pipe, ref, scheduler, guidance):
    img = _image(1)
    want = ref.chat(img, NEXTGPT_PROMPT, steps=20, seed=4, scheduler=scheduler, guidance=guidance)
    options = {"steps": 20, "seed": 4, "scheduler": scheduler, **({"guidance": guidance} if guidance else {})}
    got = pipe.chat(img, NEXTGPT_PROMPT, head_options={"signal": options})
    assert want.token_ids == ref.signals + [ref.eos] and got.token_ids == want.token_ids
    assert len(got.images) == len(want.images) == 1
    a, b = got.images[0].pixels.astype(int), want.images[0].astype(int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1             # 1e-3 apart, each rounded to uint8
    assert got.images[0].guidance == (3.0 if guidance is None else guidance)


@pytest.mark.parametrize("question, seed", [("What is in the picture?", None), ("Describe it.", 7)])
def test_other_prompts_give_the_same_ids(pipe, ref, question, seed):
    """Greedy, and seeded sampling at temperature 1 (the same pick_token and rng on both sides); a reply that
    says the signals draws the same picture."""
    from nxc.sampling import SamplingParams
    sampling = SamplingParams() if seed is None else SamplingParams(temperature=1.0, seed=seed)
    img = _image(2)
    want = ref.chat(img, question, max_new_tokens=12, sampling=sampling, steps=4)
    got = pipe.chat(img, question, max_new_tokens=12, temperature=sampling.temperature, seed=sampling.seed,
                    head_options={"signal": {"steps": 4}})
    assert got.token_ids == want.token_ids
    assert len(got.images) == len(want.images)
    for a, b in zip(got.images, want.images):
        assert np.abs(a.pixels.astype(int) - b.astype(int)).max() <= 1


def test_nxc_export_cli_and_a_broken_generator_is_one_line(nextgpt_ckpt, tmp_path, capfd):
    from nxc.export.cli import main
    from nxc.runtime.pipeline import Pipeline
    assert main([str(nextgpt_ckpt), "--fp32", "--max-context", "128", "--out", str(tmp_path / "b")]) == 0
    assert Pipeline.load(tmp_path / "b").manifest.generator is not None
    ckpt = tmp_path / "ckpt"
    shutil.copytree(nextgpt_ckpt, ckpt)
    (ckpt / "generator" / "scheduler" / "scheduler_config.json").unlink()
    capfd.readouterr()
    assert main([str(ckpt), "--out", str(tmp_path / "c")]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("nxc-export: ") and "no scheduler/scheduler_config.json" in err[-1]
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("precision, extra", [("fp16", []), ("int8", ["--float-graphs", "vision"])])
def test_fp16_and_int8_builds_draw_the_planted_reply(nextgpt_ckpt, tmp_path, ref, precision, extra):
    """Below fp32 the planted reply (10 logits ahead) is the same and a picture is drawn; each drawing graph's
    accuracy against fp32 is reported (int8: the vision encoder kept float32, no calibration images needed)."""
    from nxc.export.cli import main
    from nxc.runtime.pipeline import Pipeline
    out = tmp_path / precision
    assert main([str(nextgpt_ckpt), f"--{precision}", "--max-context", "128", "--out", str(out), *extra]) == 0
    accuracy = json.loads((out / "reports" / "accuracy.json").read_text())["graphs"]
    assert {"projector", "denoiser"} <= set(accuracy)
    got = Pipeline.load(out).chat(_image(3), NEXTGPT_PROMPT, head_options={"signal": {"steps": 4}})
    assert got.token_ids == ref.signals + [ref.eos] and len(got.images) == 1
    want = ref.chat(_image(3), NEXTGPT_PROMPT, steps=4)
    assert np.abs(got.images[0].pixels.astype(int) - want.images[0].astype(int)).mean() < 8


def test_drawing_graphs_go_together(nextgpt_ckpt, tmp_path, capfd):
    from nxc.export.cli import main
    assert main([str(nextgpt_ckpt), "--graphs", "vision", "llm", "projector", "--out", str(tmp_path / "b")]) == 1
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err == ("nxc-export: --graphs projector: the drawing graphs projector, denoiser, latent_decoder are "
                   "exported together (the signal head needs all three); name all of them or none")


def test_a_streamed_checkpoint_exports_with_parity(tmp_path, capfd):
    """The maker's one-tensor-at-a-time path (NExT-GPT-7B's, here tiny: fp16 .bin shards with an index) through
    nxc-export --fp32: the export loads it with llm=False (the LLaMA streamed from the shards, never built), every
    graph passes its parity check, and the runtime's greedy ids equal the torch reference's."""
    from nxc.export.cli import main
    from nxc.model.maker_nextgpt import make_nextgpt_checkpoint
    from nxc.model.nextgpt_reference import NextGptReferenceChat
    from nxc.runtime.pipeline import Pipeline
    ckpt = make_nextgpt_checkpoint(tmp_path / "ckpt", dtype="fp16", fmt="bin", shard_bytes=3_000_000, seed=4,
                                   log=lambda m: None)
    assert (ckpt / "pytorch_model.bin.index.json").is_file()
    assert main([str(ckpt), "--fp32", "--max-context", "128", "--out", str(tmp_path / "b")]) == 0
    parity = json.loads((tmp_path / "b" / "reports" / "parity.json").read_text())
    assert set(parity) == set(names.GENERATION_GRAPHS) and all(p["ok"] for p in parity.values())
    want = NextGptReferenceChat.load(ckpt).chat(_image(5), "What is in the picture?", max_new_tokens=8, steps=2)
    got = Pipeline.load(tmp_path / "b").chat(_image(5), "What is in the picture?", max_new_tokens=8,
                                             head_options={"signal": {"steps": 2}})
    assert got.token_ids == want.token_ids and len(got.token_ids) == 8
