"""nxc-make-checkpoint --family nextgpt written one tensor at a time (nxc.model.maker_nextgpt's streamed path, the one
NExT-GPT-7B takes), here at the tiny sizes, and load_nextgpt(llm=False): the LLaMA checked from the files' headers,
never built or read."""
import json
import shutil
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch", reason="the NExT-GPT maker needs the export extra (torch)")
pytest.importorskip("diffusers", reason="the NExT-GPT generator needs the export extra (diffusers)")

from nxc.model.maker_base import MakerError  # noqa: E402

SHARD = 2_000_000          # the tiny LLaMA's embed_tokens and lm_head (8.2 MB in fp32) each get a shard of their own
LLM_PREFIXES = ("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny NExT-GPT written by the streamed path (fp32 safetensors shards with an index) and its progress lines."""
    from nxc.model.maker_nextgpt import make_nextgpt_checkpoint
    lines = []
    out = make_nextgpt_checkpoint(tmp_path_factory.mktemp("streamed") / "ckpt", dtype="fp32", fmt="safetensors",
                                  shard_bytes=SHARD, seed=1, log=lines.append)
    return out, lines


def test_the_streamed_layout_is_the_plan_in_shards(made):
    from nxc.model.lazy import LazyCheckpoint
    from nxc.model.maker_nextgpt import nextgpt_maker_config, nextgpt_plan
    out, lines = made
    specs, clip_specs = nextgpt_plan(nextgpt_maker_config("tiny", "tiny", "tiny"))
    src = LazyCheckpoint(out)
    assert {k: src.shape(k) for k in src.keys()} == {s.name: s.shape for s in specs}
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 2
    assert {"model.mm_projector.0.weight", "gen_text_hidden_fcs.0.query_embs", "lm_head.weight"} <= set(src.keys())
    assert {s.name for s in clip_specs} == set(LazyCheckpoint(out / "clip").keys())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["grounding"] == "generation" and cfg["vocab_size"] == 32009 and cfg["torch_dtype"] == "float32"
    record = cfg["nxc_maker"]
    assert (record["dtype"], record["format"], record["shard_bytes"]) == ("fp32", "safetensors", SHARD)
    assert record["names"] == {"llm": "tiny", "vision": "tiny", "projector": "tiny", "generator": "tiny"}
    added = json.loads((out / "added_tokens.json").read_text())
    assert list(added)[-4:] == ["[IMG0]", "[IMG1]", "[IMG2]", "[IMG3]"] and max(added.values()) == 32008
    assert (out / "generator" / "uncond.npy").is_file() and not (out / "generator" / "text_encoder").exists()
    assert any("model.layers.1: 9 tensors" in m for m in lines) and lines[-1].startswith("[nxc-make-checkpoint] wrote")


def test_llm_false_builds_and_reads_no_llama_weight(made, monkeypatch):
    """The LLaMA (and, until a graph needs them, the vision tower and input projector) on the meta device; no
    LLaMA tensor is read, only the headers; the output projector is real and equals the checkpoint's."""
    from nxc.model.lazy import LazyCheckpoint
    from nxc.model.nextgpt import load_nextgpt
    out, _ = made
    read = []
    get = LazyCheckpoint.get
    monkeypatch.setattr(LazyCheckpoint, "get", lambda self, k: read.append(k) or get(self, k))
    model, tok = load_nextgpt(out, llm=False)
    assert read and not [k for k in read if k.startswith(LLM_PREFIXES)]
    assert all(p.device.type == "meta" for p in model.llm.parameters())
    assert all(p.device.type == "meta" for m in (model.vision_tower, model.mm_projector) for p in m.parameters())
    real = [p for p in model.parameters() if p.device.type != "meta"]
    assert sum(p.numel() for p in real) == sum(p.numel() for p in model.output_projector.parameters())
    src = LazyCheckpoint(out)
    torch.testing.assert_close(model.output_projector.query_embs, src.get("gen_text_hidden_fcs.0.query_embs"))
    model.parts.load("vision")                        # made real from the checkpoint when the vision graph needs it
    full, _ = load_nextgpt(out)
    torch.testing.assert_close(model.mm_projector[0].weight, full.mm_projector[0].weight)
    for a, b in zip(model.vision_tower.parameters(), full.vision_tower.parameters()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(full.llm.lm_head.weight, src.get("lm_head.weight"))
    assert tok.added_token_ids["[IMG3]"] == 32008


@pytest.mark.parametrize("llm", [False, True])
def test_a_llama_tensor_of_the_wrong_shape_is_one_line(made, tmp_path, llm):
    from safetensors.torch import load_file, save_file

    from nxc.model.checkpoint import CheckpointError
    from nxc.model.nextgpt import load_nextgpt
    ckpt = tmp_path / "ckpt"
    shutil.copytree(made[0], ckpt)
    name = "model.layers.1.mlp.up_proj.weight"
    shard = ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]
    sd = load_file(str(shard))
    sd[name] = sd[name].T.contiguous()
    save_file(sd, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"weight {name} has shape \(64, 128\), config.json implies "
                                              r"\(128, 64\); the weights do not match") as e:
        load_nextgpt(ckpt, llm=llm)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(llm="vicuna-7b", draw_prompt="Draw a cat."),
     "--draw-prompt plants the reply in a model held in float32 memory (at most 2 B parameters, float32 "
     "safetensors); --llm vicuna-7b is about 6.7 B parameters, written one tensor at a time: make it without "
     "--draw-prompt"),
    (dict(dtype="fp16", draw_prompt="Draw a cat."), "--dtype / --format / --shard-size write it one tensor at a time"),
    (dict(generator="sd-1.5"), "--generator sd-1.5 takes conditioning [77, 768], --projector tiny makes [77, 32]; "
                               "use --projector nextgpt."),
    (dict(generator="sd-2"), "unknown --generator 'sd-2'; choose one of tiny, sd-1.5."),
    (dict(vision="imagebind", dtype="fp16"), "unknown --vision size 'imagebind'; registered: clip-vit-l-336, "
                                             "imagebind-huge, tiny, shapes."),
    (dict(dtype="int8"), "--dtype 'int8' is not one of fp16, bf16, fp32."),
])
def test_refusals_before_anything_is_written(tmp_path, kwargs, message):
    from nxc.model.maker_nextgpt import make_nextgpt_checkpoint
    with pytest.raises(MakerError) as e:
        make_nextgpt_checkpoint(tmp_path / "c", log=lambda m: None, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_the_7b_plan_is_nextgpt_7b_without_allocating():
    """NExT-GPT-7B's layout as the maker plans it (meta device): Vicuna-7B with 32009 rows, a Linear(1280, 4096)
    input projector from the ImageBind-huge-sized tower, NExT-GPT's 77 x 768 output projector."""
    import math

    from nxc.model.maker_nextgpt import llm_params, nextgpt_maker_config, nextgpt_plan
    config = nextgpt_maker_config("vicuna-7b", "imagebind-huge", "nextgpt")
    specs, clip_specs = nextgpt_plan(config)
    shapes = {s.name: s.shape for s in specs}
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (32009, 4096)
    assert shapes["model.mm_projector.0.weight"] == (4096, 1280)
    assert shapes["gen_text_hidden_fcs.0.fc.weight"] == (512, 4096)
    assert shapes["gen_text_hidden_fcs.0.query_embs"] == (1, 77, 512)
    assert shapes["gen_text_hidden_fcs.0.model.weight"] == (768, 512)
    llama = sum(math.prod(s.shape) for s in specs if s.name.startswith(LLM_PREFIXES))
    assert llama == llm_params(config) + 65 * 4096                 # + the 2 x 32 + 1 RMSNorm weights
    tower = sum(math.prod(s.shape) for s in clip_specs)
    assert 0.62e9 < tower < 0.64e9 and len([s for s in clip_specs if s.name.endswith("fc1.weight")]) == 32


def test_cli_sd15_generator_at_a_scaled_down_size(tmp_path, monkeypatch, capfd):
    """--generator sd-1.5 through the CLI, the UNet's and VAE's channels scaled down (the real folder is 3.4 GB): the
    generator's sizes as read are SD-1.5's, and the checkpoint loads."""
    import nxc.model.generator as generator
    from nxc.config import GENERATOR_SIZES
    from nxc.model.maker_cli import main
    from nxc.model.nextgpt import load_nextgpt
    monkeypatch.setattr(generator, "SD15_UNET", dict(generator.SD15_UNET, block_out_channels=(32, 32, 32, 32),
                                                     layers_per_block=1))
    monkeypatch.setattr(generator, "SD15_VAE", dict(generator.SD15_VAE, block_out_channels=(32, 32, 32, 32),
                                                    layers_per_block=1))
    out = tmp_path / "c"
    assert main([str(out), "--family", "nextgpt", "--llm", "tiny", "--vision", "tiny", "--projector", "nextgpt",
                 "--generator", "sd-1.5", "--dtype", "fp16", "--format", "bin"]) == 0
    assert "generator/unet (UNet2DConditionModel), one module at a time" in capfd.readouterr().err
    _, _, _, sizes = generator.inspect_generator(out / "generator")
    assert sizes == GENERATOR_SIZES["sd-1.5"]
    assert (out / "pytorch_model.bin").is_file() and json.loads((out / "config.json").read_text())["projector"][
        "num_queries"] == 77
    model, _ = load_nextgpt(out, llm=False)
    assert model.output_projector.query_embs.dtype == torch.float32
    unet, _, _, _ = generator.load_generator(out / "generator")
    assert unet.config.cross_attention_dim == 768 and unet.config.block_out_channels == [32, 32, 32, 32]


_RSS_CHILD = textwrap.dedent("""
    import json, resource, sys
    from nxc.config import LLAMA_SIZES, LlamaSizes
    from nxc.model.maker_nextgpt import make_nextgpt_checkpoint, nextgpt_maker_config, nextgpt_plan
    LLAMA_SIZES["mid"] = LlamaSizes(hidden_size=1024, intermediate_size=2816, num_layers=16, num_heads=8,
                                    num_kv_heads=8, vocab_size=0)
    nextgpt_plan(nextgpt_maker_config("mid", "tiny", "tiny"))     # baseline: torch, transformers, modules built
    import diffusers                                               # (the generator's writer imports it)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    make_nextgpt_checkpoint(sys.argv[1], llm="mid", dtype="fp16", shard_bytes=50_000_000, log=lambda m: None)
    print(json.dumps({"base": base * 1024, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""")


def test_memory_is_one_shard_not_the_model(tmp_path):
    """A 0.53 GB NExT-GPT in 50 MB shards (its largest tensor, embed_tokens, 66 MB), written and loaded back with
    llm=False: the maker grows by a fraction of the checkpoint over its baseline, as the NExT-Chat maker does."""
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(out)], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    rss = json.loads(r.stdout.strip().splitlines()[-1])
    ckpt_bytes = sum(f.stat().st_size for f in out.glob("pytorch_model-*.bin"))
    assert ckpt_bytes > 500e6 and len(list(out.glob("pytorch_model-*.bin"))) > 8
    assert rss["peak"] - rss["base"] < ckpt_bytes / 3, (rss, ckpt_bytes)
