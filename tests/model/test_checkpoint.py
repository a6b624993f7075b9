import json
import os
import shutil

import pytest
import torch

from nxc.config import ConfigError
from nxc.model import processing
from nxc.model.checkpoint import CheckpointError, load_nextchat, read_clip_preprocess
from nxc.model.reference import ReferenceChat
from nxc.model.writer import make_tiny_checkpoint, official_state_dict, save_nextchat
from nxc.runtime.tokenizer import TokenizerError


def _outputs(ref: ReferenceChat, image):
    at = ref.token_ids.at
    force = lambda s, lg: (lg.__setitem__(at, 1e9) or lg) if s == 2 else lg  # noqa: E731
    r = ref.chat(image, "What is region [0]?", boxes=[[5, 5, 40, 30]], max_new_tokens=6,
                 keep_logits=True, logits_processor=force)
    g = r.generation
    return r.token_ids, g.step_logits, g.boxes, g.mask_logits, g.iou


def test_tiny_checkpoint_is_small_and_reproducible(tmp_path, tiny_ckpt):
    size = sum(f.stat().st_size for f in tiny_ckpt.rglob("*") if f.is_file())
    assert size < 8e6
    again = make_tiny_checkpoint(tmp_path / "again", seed=0)
    a, _ = load_nextchat(tiny_ckpt)
    b, _ = load_nextchat(again)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k


@pytest.mark.parametrize("safetensors,shard", [(True, None), (False, 200_000), (True, 200_000)])
def test_write_read_round_trip_bit_identical(tmp_path, tiny_ckpt, tiny_ref, image, safetensors, shard):
    out = save_nextchat(tiny_ref.model, tmp_path / "copy", tokenizer_model=tiny_ckpt / "tokenizer.model",
                        safetensors=safetensors, shard_bytes=shard)
    if shard:
        assert len(list(out.glob("*-of-*"))) > 1 and list(out.glob("*.index.json"))
    again = ReferenceChat.load(out)
    a, b = _outputs(tiny_ref, image), _outputs(again, image)
    assert a[0] == b[0] and len(a[0]) >= 3
    for x, y in zip(a[1], b[1]):
        assert (x == y).all()
    for x, y in zip(a[2:], b[2:]):
        assert torch.equal(x, y)


def test_sam_from_a_separate_file(tmp_path, tiny_ckpt, tiny_ref, image):
    sd = official_state_dict(tiny_ref.model)
    sam = {k[len("sam.model."):]: v for k, v in sd.items() if k.startswith("sam.model.")}
    ckpt = tmp_path / "nosam"
    shutil.copytree(tiny_ckpt, ckpt)
    torch.save({k: v for k, v in sd.items() if not k.startswith("sam.model.")}, ckpt / "pytorch_model.bin")
    torch.save(sam, tmp_path / "sam.pth")
    with pytest.raises(CheckpointError, match="no SAM weights"):
        load_nextchat(ckpt)
    again = ReferenceChat.load(ckpt, sam_file=tmp_path / "sam.pth")
    a, b = _outputs(tiny_ref, image), _outputs(again, image)
    assert torch.equal(a[3], b[3])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _break(kind, ckpt):
    sd = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    if kind == "missing_shard":
        (ckpt / "pytorch_model.bin").unlink()
        (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"weight_map": {k: ("a.bin" if i % 2 else "b.bin") for i, k in enumerate(sd)}}))
        torch.save({k: v for i, (k, v) in enumerate(sd.items()) if i % 2 == 0}, ckpt / "b.bin")
    elif kind == "missing_key":
        sd.pop("loc_decoder.2.weight")
        torch.save(sd, ckpt / "pytorch_model.bin")
    elif kind == "wrong_shape":
        sd["loc_encoder.0.weight"] = torch.zeros(3, 4)
        torch.save(sd, ckpt / "pytorch_model.bin")
    elif kind == "no_nextchat_fields":
        cfg = json.loads((ckpt / "config.json").read_text())
        del cfg["mm_depth"], cfg["use_mm_proj"]
        (ckpt / "config.json").write_text(json.dumps(cfg))
    elif kind == "no_added_tokens":
        (ckpt / "added_tokens.json").unlink()
    elif kind == "pickle_with_code":
        torch.save({"x": _Evil()}, ckpt / "pytorch_model.bin")
    elif kind == "truncated":
        data = (ckpt / "pytorch_model.bin").read_bytes()
        (ckpt / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    elif kind == "no_weights":
        (ckpt / "pytorch_model.bin").unlink()


@pytest.mark.parametrize("kind,error,message", [
    ("missing_shard", CheckpointError, r"lists shard a\.bin but .* does not exist"),
    ("missing_key", CheckpointError, r"weight loc_decoder\.2\.weight is missing"),
    ("wrong_shape", CheckpointError, r"loc_encoder\.0\.weight has shape \(3, 4\), the config implies \(32, 4\)"),
    ("no_nextchat_fields", ConfigError, r"not a NExT-Chat config: missing field\(s\) use_mm_proj, mm_depth"),
    ("no_added_tokens", TokenizerError, r"added_tokens\.json"),
    ("pickle_with_code", CheckpointError, r"refused: it is a pickle that holds more than tensors"),
    ("truncated", CheckpointError, r"not a readable PyTorch weight file"),
    ("no_weights", CheckpointError, r"no weights in"),
])
def test_load_errors_name_the_problem(tmp_path, tiny_ckpt, kind, error, message):
    ckpt = tmp_path / kind
    shutil.copytree(tiny_ckpt, ckpt)
    _break(kind, ckpt)
    with pytest.raises(error, match=message):
        load_nextchat(ckpt)


def test_missing_added_tokens_message_explains_the_danger(tmp_path, tiny_ckpt):
    ckpt = tmp_path / "c"
    shutil.copytree(tiny_ckpt, ckpt)
    (ckpt / "added_tokens.json").unlink()
    with pytest.raises(TokenizerError) as e:
        load_nextchat(ckpt)
    assert "mean" in str(e.value) or "overwrite" in str(e.value)


def test_missing_clip_dir(tmp_path, tiny_ckpt):
    ckpt = tmp_path / "c"
    shutil.copytree(tiny_ckpt, ckpt)
    shutil.rmtree(ckpt / "clip")
    with pytest.raises(CheckpointError, match="has no config.json: pass --clip"):
        load_nextchat(ckpt)


def _with_preprocessor_config(tiny_ckpt, tmp_path, content):
    ckpt = tmp_path / "pp"
    shutil.copytree(tiny_ckpt, ckpt)
    text = content if isinstance(content, str) else json.dumps(content)
    (ckpt / "clip" / "preprocessor_config.json").write_text(text)
    return ckpt


def test_clip_preprocessor_config_is_read_and_used(tmp_path, tiny_ckpt, image):
    """HF CLIPImageProcessor keys; the reference's pixels follow them."""
    ckpt = _with_preprocessor_config(tiny_ckpt, tmp_path, {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
        "rescale_factor": 0.00392156862745098, "do_normalize": True, "image_mean": [0.5, 0.4, 0.3],
        "image_std": [0.2, 0.25, 0.3], "resample": 2, "do_convert_rgb": True})
    model, _ = load_nextchat(ckpt)
    expected = processing.ClipPreprocess(size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), resample="bilinear")
    assert processing.clip_preprocess_of(model) == expected
    by_hand = processing.clip_pixels(image, 32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), resample="bilinear")
    assert torch.equal(expected.pixels(image), by_hand)
    assert not torch.allclose(expected.pixels(image), processing.clip_pixels(image, 32))


def test_without_preprocessor_config_the_standard_clip_values(tiny_ckpt):
    model, _ = load_nextchat(tiny_ckpt)
    assert processing.clip_preprocess_of(model) == processing.ClipPreprocess(
        size=32, mean=processing.CLIP_MEAN, std=processing.CLIP_STD, resample="bicubic")
    assert read_clip_preprocess(tiny_ckpt / "clip", 32) == processing.ClipPreprocess(size=32)


def test_the_released_clip_preprocessor_config_gives_the_standard_values(tmp_path):
    """openai/clip-vit-large-patch14-336's file (old-style int sizes) is the hard-coded fallback exactly."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336}))
    assert read_clip_preprocess(tmp_path, 336) == processing.ClipPreprocess(size=336)


@pytest.mark.parametrize("content,message", [
    ("{not json", r"preprocessor_config\.json is not valid JSON"),
    ([0.5, 0.5], r"preprocessor_config\.json holds a list, expected a JSON object"),
    ({"image_mean": [0.5, 0.5]}, r"preprocessor_config\.json: image_mean is \[0\.5, 0\.5\]; expected 3 finite numbers"),
    ({"image_mean": ["a", 0.5, 0.5]}, r": image_mean is \['a', 0\.5, 0\.5\]; expected 3 finite numbers"),
    ({"image_std": [0.2, 0, 0.2]}, r": image_std is \[0\.2, 0, 0\.2\]; expected 3 finite numbers > 0"),
    ({"resample": 0}, r": resample is 0; expected a PIL filter code: 1 \(lanczos\), 2 \(bilinear\), 3 \(bicubic\)"),
    ({"resample": "bicubic"}, r": resample is 'bicubic'; expected a PIL filter code"),
    ({"crop_size": {"height": 24, "width": 24}}, r": crop_size is \{'height': 24, 'width': 24\}; expected 32"),
    ({"size": {"shortest_edge": 40}}, r": size is \{'shortest_edge': 40\}; expected 32, the CLIP tower's image_size"),
    ({"size": {"height": 32, "width": 40}}, r": size is \{'height': 32, 'width': 40\}; expected a positive int"),
    ({"do_normalize": False}, r": do_normalize is False; expected true"),
    ({"rescale_factor": 1.0}, r": rescale_factor is 1\.0; expected 1/255"),
])
def test_bad_preprocessor_config_is_one_line_naming_file_and_key(tmp_path, tiny_ckpt, content, message):
    ckpt = _with_preprocessor_config(tiny_ckpt, tmp_path, content)
    with pytest.raises(CheckpointError, match=message) as e:
        load_nextchat(ckpt)
    assert "\n" not in str(e.value) and str(ckpt / "clip" / "preprocessor_config.json") in str(e.value)
