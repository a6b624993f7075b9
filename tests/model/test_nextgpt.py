"""The NExT-GPT family's model, checkpoint layout, maker and reference chat (nxc.model.nextgpt, maker_nextgpt,
nextgpt_reference), on a tiny random checkpoint made in the session."""
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the NExT-GPT reference needs the export extra (torch)")
pytest.importorskip("diffusers", reason="the NExT-GPT generator needs the export extra (diffusers)")

from nxc import names  # noqa: E402
from tests.conftest import NEXTGPT_PROMPT  # noqa: E402


def _image(color="red"):
    from PIL import Image
    return Image.new("RGB", (40, 30), color)


def test_the_checkpoint_round_trips(nextgpt_ckpt, tmp_path):
    from nxc.model.nextgpt import load_nextgpt, save_nextgpt
    model, tok = load_nextgpt(nextgpt_ckpt)
    c = model.config
    assert c.grounding == "generation" and c.num_image_tokens == 1 and c.sam is None and c.objects is None
    base = tok.vocab_size - len(names.ADDED_TOKENS) - len(names.SIGNAL_TOKENS)
    assert [tok.added_token_ids[t] for t in names.SIGNAL_TOKENS] == [base + 5 + i for i in range(4)]
    from safetensors import safe_open
    with safe_open(str(nextgpt_ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "gen_text_hidden_fcs.0.query_embs" in keys and "model.mm_projector.0.weight" in keys
    assert "gen_text_hidden_fcs.0.tfm.encoder.layers.0.self_attn.in_proj_weight" in keys
    save_nextgpt(model, tmp_path / "again", tokenizer_model=nextgpt_ckpt / "tokenizer.model",
                 generator_dir=model.generator_dir, draw_defaults=model.draw_defaults)
    again, tok2 = load_nextgpt(tmp_path / "again")
    assert again.config == c and tok2.added_token_ids == tok.added_token_ids
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.draw_defaults == {"default_steps": 20, "default_guidance": 3.0, "default_scheduler": "ddim"}


def test_one_image_is_one_row(nextgpt_ckpt):
    from nxc.model import processing
    from nxc.model.nextgpt import load_nextgpt
    model, _ = load_nextgpt(nextgpt_ckpt)
    px = processing.clip_preprocess_of(model).pixels(_image())
    with torch.no_grad():
        rows = model.encode_image(torch.cat([px, px]))
    assert rows.shape == (2, 1, model.config.llm.hidden_size)


def test_the_planted_reply_draws_one_picture(nextgpt_ckpt):
    from nxc.model.nextgpt_reference import NextGptReferenceChat
    chat = NextGptReferenceChat.load(nextgpt_ckpt)
    r = chat.chat(_image("blue"), NEXTGPT_PROMPT, steps=3, seed=1)
    assert r.token_ids == chat.signals + [chat.eos] and r.finish_reason == "stop"
    s = chat.generator()[3]
    assert len(r.images) == 1 and r.images[0].shape == (s.image_height, s.image_width, 3)
    assert r.images[0].dtype == np.uint8 and r.conditioning[0].shape == (1, s.context_length, s.cross_attention_dim)
    cfg = json.loads((nextgpt_ckpt / "config.json").read_text())
    assert cfg["grounding"] == "generation" and cfg["nxc_maker"]["draw"]["reply"] == "[IMG0][IMG1][IMG2][IMG3]</s>"


def test_the_token_limit_does_not_cut_a_group(nextgpt_ckpt):
    """[IMG0] at the limit still gets [IMG1..3] (a trigger at the limit gets its head's token, nxc.decode), so the
    picture is made; the reply then ends without its </s>."""
    from nxc.model.nextgpt_reference import NextGptReferenceChat
    chat = NextGptReferenceChat.load(nextgpt_ckpt)
    r = chat.chat(_image(), NEXTGPT_PROMPT, max_new_tokens=1, steps=2)
    assert r.token_ids == chat.signals and len(r.images) == 1 and r.finish_reason == "length"


def _break(ckpt, how):
    if how == "no generator":
        shutil.rmtree(ckpt / "generator")
    elif how == "generator of another width":
        cfg = json.loads((ckpt / "generator/unet/config.json").read_text())
        cfg["cross_attention_dim"] = 16
        (ckpt / "generator/unet/config.json").write_text(json.dumps(cfg))
        shutil.rmtree(ckpt / "generator/text_encoder")
        shutil.rmtree(ckpt / "generator/tokenizer")
        np.save(ckpt / "generator/uncond.npy", np.zeros((1, 77, 16), np.float32))
    elif how in ("no projector weight", "projector of another size"):
        from safetensors.torch import load_file, save_file
        sd = load_file(str(ckpt / "model.safetensors"))
        if how == "no projector weight":
            del sd["gen_text_hidden_fcs.0.query_embs"]
        else:
            sd["gen_text_hidden_fcs.0.query_embs"] = torch.zeros(1, 77, 8)
        save_file(sd, str(ckpt / "model.safetensors"))
    else:
        cfg = json.loads((ckpt / "config.json").read_text())
        if how == "no generator entry":
            del cfg["generator"]
        else:
            del cfg["projector"]
        (ckpt / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("how, error, message", [
    ("no generator", "GeneratorError", r"generator: no such folder; expected a diffusers folder"),
    ("generator of another width", "CheckpointError", r"the generator takes conditioning \[77, 16\], the projector "
                                                      r"makes \[77, 32\]; the generator is not this model's"),
    ("no projector weight", "CheckpointError", r"weight gen_text_hidden_fcs.0.query_embs is missing \(1 in all\)"),
    ("projector of another size", "CheckpointError", r"weight gen_text_hidden_fcs.0.query_embs has shape \(1, 77, 8\), "
                                                     r"config.json implies \(1, 77, 32\)"),
    ("no generator entry", "CheckpointError", r"a generation model needs \"generator\""),
    ("no projector sizes", "CheckpointError", r"says grounding 'generation' but has no 'projector' sizes"),
])
def test_a_broken_part_is_one_line(nextgpt_ckpt, tmp_path, how, error, message):
    from nxc.model import checkpoint, generator
    from nxc.model.nextgpt import load_nextgpt
    ckpt = tmp_path / "ckpt"
    shutil.copytree(nextgpt_ckpt, ckpt)
    _break(ckpt, how)
    cls = {"GeneratorError": generator.GeneratorError, "CheckpointError": checkpoint.CheckpointError}[error]
    with pytest.raises(cls, match=message) as e:
        load_nextgpt(ckpt)
    assert "\n" not in str(e.value)


def test_the_maker_cli(tmp_path, capfd):
    from nxc.model.maker_cli import main
    assert main([str(tmp_path / "m"), "--family", "nextgpt", "--llm", "tiny", "--vision", "tiny", "--seed", "2"]) == 0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["grounding"] == "generation" and cfg["nxc_maker"]["draw"] is None
    assert (tmp_path / "m" / "generator" / "unet" / "config.json").is_file()
    assert main([str(tmp_path / "n"), "--family", "nextgpt", "--llm", "tiny", "--vision", "tiny", "--sam", "tiny"]) == 2
    assert "--family nextgpt takes --llm, --vision, --projector" in capfd.readouterr().err
    assert main([str(tmp_path / "n"), "--family", "nextgpt", "--llm", "tiny", "--vision", "tiny",
                 "--projector", "huge"]) == 2
    assert "unknown --projector size 'huge'" in capfd.readouterr().err
    assert main([str(tmp_path / "n"), "--family", "nextgpt", "--llm", "vicuna-7b", "--vision", "tiny",
                 "--draw-prompt", "Draw a cat."]) == 2                 # 7B is written one tensor at a time
    assert "--draw-prompt plants the reply in a model held in float32 memory" in capfd.readouterr().err
    assert main([str(tmp_path / "n"), "--llm", "tiny", "--vision", "tiny"]) == 2       # NExT-Chat needs --sam
    assert not (tmp_path / "n").exists()
