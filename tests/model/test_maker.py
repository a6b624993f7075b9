"""nxc-make-checkpoint: random NExT-Chat checkpoints in the official layout, streamed tensor by tensor."""
import json
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from nxc import names
from nxc.model.maker import (VOCAB_SIZE, MakerError, checkpoint_plan, make_checkpoint, maker_config,
                             projector_out_weight, tensor_group)
from nxc.model.maker_cli import main, parse_size

TINY = ("tiny", "tiny", "tiny")
PROMPT = "Where is the dog in the image?"
MB = 1_000_000


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """make(fmt, shard_bytes, seed=0, dtype="fp16") -> a tiny made checkpoint, made once per arguments."""
    root, cache = tmp_path_factory.mktemp("made"), {}

    def make(fmt="bin", shard_bytes=5_000 * MB, seed=0, dtype="fp16"):
        key = (fmt, shard_bytes, seed, dtype)
        if key not in cache:
            cache[key] = make_checkpoint(root / "-".join(map(str, key)), config=maker_config(*TINY), fmt=fmt,
                                         shard_bytes=shard_bytes, seed=seed, dtype=dtype, log=quiet)
        return cache[key]
    return make


def official_shapes(config):
    from nxc.model.nextchat import NextChat
    from nxc.model.writer import official_state_dict
    torch.manual_seed(0)
    return {k: tuple(v.shape) for k, v in official_state_dict(NextChat(config=config)).items()}


def released_shapes(config):
    """official_shapes plus each layer's RoPE buffer, as the release's transformers (4.31) saved the checkpoint."""
    d = config.llm.hidden_size // config.llm.num_heads
    return {**official_shapes(config),
            **{f"model.layers.{i}.self_attn.rotary_emb.inv_freq": (d // 2,) for i in range(config.llm.num_layers)}}


def lazy_shapes(path):
    from nxc.model.lazy import LazyCheckpoint
    src = LazyCheckpoint(path)
    return {k: src.shape(k) for k in src.keys()}


def tensors(path):
    from nxc.model.lazy import LazyCheckpoint
    src = LazyCheckpoint(path)
    return {k: src.get(k).clone() for k in src.keys()}


def test_plan_is_official_state_dict_without_building_the_model():
    config = maker_config(*TINY)
    assert config.llm.vocab_size == VOCAB_SIZE == 32005          # the registry's placeholder 0 is overridden
    specs, clip = checkpoint_plan(config)
    assert {s.name: s.shape for s in specs} == released_shapes(config)
    names_ = [s.name for s in specs]                              # where 4.31's state dict had it: after o_proj
    assert names_.index("model.layers.1.self_attn.rotary_emb.inv_freq") == \
        names_.index("model.layers.1.self_attn.o_proj.weight") + 1
    from transformers import CLIPVisionModel
    from nxc.model.nextchat import clip_config
    hf = CLIPVisionModel(clip_config(config.vision)).state_dict()
    assert {s.name: s.shape for s in clip} == {"vision_model." + k: tuple(v.shape) for k, v in hf.items()}
    assert projector_out_weight(specs) == "model.mm_projector.2.weight"
    by = {s.name: s for s in specs}
    assert by["model.norm.weight"].init == "ones" and by["model.layers.0.input_layernorm.weight"].init == "ones"
    assert by["model.mm_projector.0.bias"].init == "zeros" and by["lm_head.weight"].std == 0.02
    assert by["sam.model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"].std == 1.0
    # the 7B plan is names and shapes only (meta device): instant, no memory
    big, big_clip = checkpoint_plan(maker_config("vicuna-7b", "clip-vit-l-336", "vit_h"))
    n = sum(np.prod(s.shape) for s in big + big_clip)
    assert 7.5e9 < n < 7.8e9


@pytest.mark.parametrize("fmt, shard_bytes, files", [
    ("bin", 5_000 * MB, ["pytorch_model.bin"]),
    ("bin", 2 * MB, ["pytorch_model.bin.index.json", "pytorch_model-00001-of-00005.bin"]),
    ("safetensors", 5_000 * MB, ["model.safetensors"]),
    ("safetensors", 2 * MB, ["model.safetensors.index.json", "model-00005-of-00005.safetensors"]),
])
def test_formats_and_shards_load(made, fmt, shard_bytes, files):
    from nxc.model.checkpoint import load_nextchat, read_config
    ckpt = made(fmt, shard_bytes)
    for f in files + ["config.json", "generation_config.json", "tokenizer.model", "added_tokens.json",
                      "clip/config.json", "clip/preprocessor_config.json", "clip/model.safetensors"]:
        assert (ckpt / f).is_file(), f
    config = maker_config(*TINY)
    assert lazy_shapes(ckpt) == released_shapes(config)
    inv_freq = tensors(ckpt)["model.layers.1.self_attn.rotary_emb.inv_freq"]     # 4.31's values, in fp16
    assert torch.equal(inv_freq, (1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))).half())
    cfg = read_config(ckpt)
    assert cfg["torch_dtype"] == "float16" and cfg["vocab_size"] == 32005
    assert cfg["nxc_maker"]["seed"] == 0 and cfg["nxc_maker"]["sizes"]["llm"]["hidden_size"] == 64
    model, tok = load_nextchat(ckpt)                              # the extra "nxc_maker" field is tolerated
    # SAM's decoder head count is not in the official layout: the loader reads Meta's 8 (tiny has 2; same shapes)
    assert model.config == replace(config, sam=replace(config.sam, decoder_num_heads=8)) and tok.vocab_size == 32005
    stored = tensors(ckpt / "clip")                               # CLIP really loaded from HF's vision_model.* names
    for k, v in model.vision_tower.state_dict().items():
        assert torch.equal(v, stored["vision_model." + k].float()), k
    assert torch.equal(model.llm.lm_head.weight, tensors(ckpt)["lm_head.weight"].float())
    clip_cfg = json.loads((ckpt / "clip/preprocessor_config.json").read_text())
    assert clip_cfg["size"] == clip_cfg["crop_size"] == 32 and clip_cfg["resample"] == 3


def test_same_seed_same_weights_whatever_shards_and_format(made, tmp_path):
    a = tensors(made("bin", 5_000 * MB))
    for other in (made("bin", 2 * MB), made("safetensors", 2 * MB), made("safetensors", 5_000 * MB)):
        b = tensors(other)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = make_checkpoint(tmp_path / "again", config=maker_config(*TINY), log=quiet)
    assert (again / "pytorch_model.bin").read_bytes() == (made("bin") / "pytorch_model.bin").read_bytes()
    assert (again / "clip/model.safetensors").read_bytes() == (made("bin") / "clip/model.safetensors").read_bytes()
    assert (again / "tokenizer.model").read_bytes() == (made("bin") / "tokenizer.model").read_bytes()
    c = tensors(made("bin", seed=1))
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    f32 = tensors(made("bin", dtype="fp32"))                      # --dtype only rounds the same draws
    assert all(torch.equal(f32[k].to(torch.float16), a[k]) for k in a)
    w = a["model.layers.0.mlp.up_proj.weight"].float()
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.all(a["model.norm.weight"] == 1) and torch.all(a["model.mm_projector.0.bias"] == 0)


def test_tokenizer_has_32005_ids_that_all_decode(made, tmp_path):
    from nxc.export.tokenizer_json import write_tokenizer_json
    from nxc.model.sp_tokenizer import SentencePieceOracle
    from nxc.runtime.tokenizer import Tokenizer
    ckpt = made("bin")
    oracle = SentencePieceOracle.from_dir(ckpt)
    sp = oracle.sp
    assert sp.get_piece_size() == 32000 and oracle.vocab_size == 32005
    assert [sp.id_to_piece(i) for i in (0, 1, 2, 3, 258)] == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    assert all(sp.is_byte(i) for i in range(3, 259)) and not sp.is_byte(259)
    assert oracle.added_token_ids == {t: 32000 + i for i, t in enumerate(names.ADDED_TOKENS)}
    rt = Tokenizer.from_file(write_tokenizer_json(ckpt, tmp_path / "tokenizer.json"))
    assert rt.vocab_size == 32005
    for i in range(32005):
        assert isinstance(rt.decode([i], skip_special_tokens=False), str)
        assert isinstance(oracle.decode([i], skip_special_tokens=False), str)
    assert [rt.decode([i]) for i in range(32000, 32005)] == list(names.ADDED_TOKENS)
    for text in ("The quick brown fox jumps over the lazy dog.", "Where is the red circle in the image?",
                 "A man walks his dog; 1234 cats, naïve café — ok!"):
        ids = oracle.encode(text)
        assert rt.encode(text) == ids and oracle.decode(ids) == text == rt.decode(ids)


@pytest.mark.parametrize("fmt, dtype", [("bin", "fp16"), ("safetensors", "bf16")])
def test_trigger_prompt_reply_is_one_detection_for_any_image(tmp_path, fmt, dtype):
    from nxc.model.reference import ReferenceChat
    lines = []
    ckpt = make_checkpoint(tmp_path / "ckpt", config=maker_config(*TINY), fmt=fmt, dtype=dtype, shard_bytes=2 * MB,
                           trigger_prompt=PROMPT, log=lines.append)
    rec = json.loads((ckpt / "config.json").read_text())["nxc_maker"]
    assert rec["trigger_prompt"] == PROMPT and rec["trigger"]["zeroed"] == "model.mm_projector.2.weight"
    lg = rec["trigger"]["logits"]
    assert lg["at"] >= max(lg["max_other_first"] + 10, 2 * lg["max_other_first"])
    assert lg["eos"] >= max(lg["max_other_after_boxes"] + 10, 2 * lg["max_other_after_boxes"])
    assert any("trigger: reply <at> <boxes></s>" in line for line in lines)
    assert any("trigger: pass 2/2, layer 2/2" in line for line in lines)
    assert torch.all(tensors(ckpt)["model.mm_projector.2.weight"] == 0)
    ref = ReferenceChat.load(ckpt)
    tid = ref.token_ids
    boxes = []
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        image = Image.fromarray(rng.integers(0, 255, (40 + 30 * seed, 70, 3), dtype=np.uint8))
        r = ref.chat(image, PROMPT, max_new_tokens=16)
        assert r.token_ids == [tid.at, tid.boxes, tid.eos] and r.raw_text == f"{names.AT} {names.BOXES}"
        assert r.text == "[0]" and r.finish_reason == "stop" and len(r.detections) == 1
        assert r.detections[0].mask.shape == image.size[::-1]
        boxes.append(r.detections[0].box_norm)
    np.testing.assert_allclose(boxes[0], boxes[1], atol=1e-5)      # the reply does not depend on the image


def test_progress_lines(tmp_path):
    lines = []
    make_checkpoint(tmp_path / "c", config=maker_config(*TINY), shard_bytes=2 * MB, log=lines.append)
    groups = [line.split(": ")[0].removeprefix("[nxc-make-checkpoint] ") for line in lines if "ETA" in line]
    assert groups[:4] == ["model.mm_projector", "model.embed_tokens", "model.layers.0", "model.layers.1"]
    assert "sam.model.image_encoder.blocks.1" in groups and "clip/vision_model.encoder.layers.2" in groups
    assert all(line.startswith("[nxc-make-checkpoint] ") for line in lines)
    assert all(" made (" in line and "on disk), " in line and "/s, ETA " in line for line in lines if "ETA" in line)
    assert any("wrote pytorch_model-00001-of-00005.bin" in line for line in lines)
    assert tensor_group("sam.model.mask_decoder.output_hypernetworks_mlps.0.layers.1.weight") == \
        "sam.model.mask_decoder"


def test_cli_writes_a_checkpoint(tmp_path, capfd):
    assert main([str(tmp_path / "c"), "--llm", "tiny", "--vision", "tiny", "--sam", "tiny", "--dtype", "bf16",
                 "--format", "safetensors", "--seed", "3"]) == 0
    cfg = json.loads((tmp_path / "c/config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["nxc_maker"]["names"] == {"llm": "tiny", "vision": "tiny",
                                                                               "sam": "tiny"}
    assert "[nxc-make-checkpoint] wrote" in capfd.readouterr().err


@pytest.mark.parametrize("args, expected", [
    (["--llm", "llama-3"], "unknown --llm size 'llama-3'; registered: vicuna-7b, tinyllama-1.1b, tiny."),
    (["--sam", "vit_x"], "unknown --sam size 'vit_x'; registered: vit_h, vit_l, vit_b, tiny, shapes."),
    (["--shard-size", "5XB"], "--shard-size '5XB' is not a positive size"),
    (["--shard-size", "0"], "--shard-size '0' is not a positive size"),
    (["--shard-size=-1GB"], "--shard-size '-1GB' is not a positive size"),
    (["--dtype", "int8"], "--dtype 'int8' is not one of fp16, bf16, fp32."),
    (["--format", "gguf"], "--format 'gguf' is not one of bin, safetensors."),
    (["--trigger-prompt", "What is region [0]?"], "--trigger-prompt: the prompt refers to region 0"),
    (["--trigger-prompt", "  "], "--trigger-prompt: the prompt is empty"),
])
def test_refusals_in_one_line(tmp_path, capsys, args, expected):
    given = {a.split("=")[0] for a in args}
    base = [x for flag in ("--llm", "--vision", "--sam") if flag not in given for x in (flag, "tiny")]
    assert main([str(tmp_path / "c"), *base, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nxc-make-checkpoint: ") and expected in err
    assert list(tmp_path.iterdir()) == []                         # nothing written, not even a partial directory


def test_refuses_a_non_empty_out_and_a_full_disk(tmp_path, capsys, monkeypatch):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main([str(tmp_path / "full"), "--llm", "tiny", "--vision", "tiny", "--sam", "tiny"]) == 2
    assert "is not empty; choose a new directory" in capsys.readouterr().err
    import nxc.model.maker as maker
    monkeypatch.setattr(maker.shutil, "disk_usage", lambda p: type("U", (), {"free": 10 * MB})())
    full = r"not enough free disk space at .*: the checkpoint needs about 34\.\d\d MB, 10\.00 MB is free"
    with pytest.raises(MakerError, match=full):
        make_checkpoint(tmp_path / "new", config=maker_config(*TINY), dtype="fp32", log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("1.5 GiB") == 3 * 2**29 and parse_size("123") == 123


def test_interrupted_run_leaves_nothing_that_loads(tmp_path, monkeypatch):
    import nxc.model.maker as maker
    stale = tmp_path / ".c.partial-999999999"                    # a killed maker's leftovers (no such pid)
    stale.mkdir()

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(maker, "write_clip_dir", boom)
    with pytest.raises(KeyboardInterrupt):
        make_checkpoint(tmp_path / "c", config=maker_config(*TINY), log=quiet)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "c").mkdir()                                      # an empty OUT is fine
    monkeypatch.undo()
    assert (make_checkpoint(tmp_path / "c", config=maker_config(*TINY), log=quiet) / "config.json").is_file()


_RSS_CHILD = textwrap.dedent("""
    import json, resource, sys
    from nxc.config import SAM_SIZES, VISION_SIZES, LlamaSizes, NextChatConfig
    from nxc.model.maker import VOCAB_SIZE, checkpoint_plan, make_checkpoint
    llm = LlamaSizes(hidden_size=1024, intermediate_size=2816, num_layers=16, num_heads=8, num_kv_heads=8,
                     vocab_size=VOCAB_SIZE)
    config = NextChatConfig(llm=llm, vision=VISION_SIZES["tiny"], sam=SAM_SIZES["tiny"], mm_hidden_size=32)
    checkpoint_plan(config)          # baseline: torch, transformers and segment_anything imported, modules built
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    make_checkpoint(sys.argv[1], config=config, dtype="fp16", shard_bytes=50_000_000, log=lambda m: None)
    print(json.dumps({"base": base * 1024, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""")


def test_memory_is_one_shard_not_the_model(tmp_path):
    """A 0.53 GB checkpoint in 50 MB shards (its largest tensor, embed_tokens, 66 MB): the maker grows by about
    0.1 GB over its baseline (torch + transformers alone are ~0.9 GB RSS here, so the peak itself is no measure)."""
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rss = json.loads(r.stdout.strip().splitlines()[-1])
    ckpt_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert ckpt_bytes > 500 * MB and len(list(out.glob("pytorch_model-*.bin"))) > 8
    assert rss["peak"] - rss["base"] < ckpt_bytes / 3, (rss, ckpt_bytes)


def test_cli_vitron_family_exports_with_its_region_extractor_modules_and_gligen(tmp_path, capfd):
    """--family vitron: NExT-Chat's layout + region_encoder.* + a GLIGEN generator/ + modules.json; nxc-export reads
    all of it (region-extractor box head, the four module calls, the grounded generator), and the trigger prompt's
    reply is one box through the runtime."""
    from PIL import Image

    from nxc.export.exporter import ExportOptions, export_build
    from nxc.model.checkpoint import load_state_dict
    from nxc.runtime.pipeline import Pipeline
    ckpt = tmp_path / "vt"
    assert main([str(ckpt), "--family", "vitron", "--llm", "tiny", "--vision", "tiny", "--sam", "tiny",
                 "--trigger-prompt", "Where is the dog?"]) == 0
    record = json.loads((ckpt / "config.json").read_text())["nxc_maker"]
    assert record["extras"] == {"generator": "tiny", "modules": ["A", "B", "C", "E"], "region_encoder": True}
    assert any(k.startswith("region_encoder.") for k in load_state_dict(ckpt))
    build = export_build(ckpt, tmp_path / "build", options=ExportOptions(max_context=256))
    pipe = Pipeline.load(build)
    m = pipe.manifest
    assert m.config.region_encoder and m.generator.sizes.grounding_objects == 30
    assert sorted(m.modules.calls) == ["A", "B", "C", "E"]
    assert pipe.dispatch.slot_head.head.inputs["is_region"] == "slot_is_region"
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    assert len(pipe.chat(image, "Where is the dog?", max_new_tokens=4).detections) == 1
    pipe.chat(image, "What is [0]?", boxes=[[2, 2, 20, 20]], max_new_tokens=4)       # a region row from its patches
    assert main([str(tmp_path / "bad"), "--family", "vitron", "--llm", "tiny", "--vision", "tiny", "--sam", "tiny",
                 "--generator", "sd-1.5"]) == 2
    assert "--generator tiny or gligen" in capfd.readouterr().err
