"""Checkpoints saved by NExT-Chat's own code (transformers 4.31) carry each LLaMA layer's RoPE inverse frequencies,
`model.layers.{i}.self_attn.rotary_emb.inv_freq`, in the dtype of the weights. Such a buffer is not a weight: every
reader of the llm's tensors checks it against the RoPE nxc computes and skips it. A wrong one, or an unexpected,
missing or misshapen layer tensor, is one line naming it, never a traceback."""

import pytest
import torch

from nxc.model.checkpoint import CheckpointError, load_nextchat, load_state_dict, read_config
from nxc.model.lazy import LazyCheckpoint
from nxc.model.streamed import llama_hidden
from transformers_4_31 import INV_FREQ, official_inv_freq, saved_by_4_31

class Tensors:
    """A streamed reader's source over a dict (official names)."""

    def __init__(self, sd):
        self.sd = sd

    def keys(self):
        return list(self.sd)

    def __contains__(self, key):
        return key in self.sd

    def get(self, key):
        return self.sd[key]


def _embeds(sizes, t=5):
    return torch.randn(1, t, sizes.hidden_size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype, safetensors", [(torch.float32, False), (torch.float16, True),
                                                (torch.bfloat16, True)])
def test_streamed_layers_skip_the_buffers(tiny_ckpt, tmp_path, dtype, safetensors):
    ckpt = saved_by_4_31(tiny_ckpt, tmp_path / "c", dtype=dtype, safetensors=safetensors)
    src = LazyCheckpoint(ckpt)
    assert INV_FREQ.format(1) in src.keys()
    model, _ = load_nextchat(ckpt)                                       # the whole reader: the buffers agree
    sizes = model.config.llm
    x = _embeds(sizes)
    got = llama_hidden(src, sizes, x).hidden
    plain = {k: src.get(k) for k in src.keys() if not k.endswith(".rotary_emb.inv_freq")}
    assert torch.equal(got, llama_hidden(Tensors(plain), sizes, x).hidden)
    with torch.no_grad():                                                # and equal transformers' own LLaMA
        want = model.llm.model(inputs_embeds=x.to(model.llm.dtype)).last_hidden_state
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)


def _wrong_theta(sd):
    sd[INV_FREQ.format(1)] = official_inv_freq(16, 500000.0)


def _wrong_dim(sd):
    sd[INV_FREQ.format(1)] = official_inv_freq(32)


@pytest.mark.parametrize("reader", ["load_nextchat", "load_nextchat(llm=False)", "llama_hidden"])
@pytest.mark.parametrize("edit, found", [(_wrong_theta, "values"), (_wrong_dim, "shape (16,)")])
def test_a_wrong_rope_buffer_is_refused_in_one_line(tiny_ckpt, tmp_path, reader, edit, found):
    ckpt = saved_by_4_31(tiny_ckpt, tmp_path / "c", edit=edit)
    with pytest.raises(CheckpointError) as e:
        if reader == "llama_hidden":
            from nxc.config import llama_sizes_from_config_json
            sizes = llama_sizes_from_config_json(read_config(ckpt))
            llama_hidden(LazyCheckpoint(ckpt), sizes, _embeds(sizes))
        else:
            load_nextchat(ckpt, llm=reader == "load_nextchat")
    msg = str(e.value)
    assert "\n" not in msg and f"{INV_FREQ.format(1)} " in msg and "rope_theta 10000" in msg, msg
    assert found in msg, msg


def _layer_sd(tiny_ckpt):
    return {k: v for k, v in load_state_dict(tiny_ckpt).items() if k.startswith(("model.layers.", "model.norm."))}


@pytest.mark.parametrize("change, expected", [
    ("unexpected", "unexpected tensor model.layers.1.mlp.extra_proj.weight"),
    ("missing", "model.layers.1.mlp.up_proj.weight is missing"),
    ("shape", "model.layers.1.mlp.up_proj.weight has shape (128, 63)"),
    ("no final norm", "model.norm.weight is missing"),
])
def test_streamed_layer_tensors_are_checked_in_one_line(tiny_ckpt, change, expected):
    sd = _layer_sd(tiny_ckpt)
    up = "model.layers.1.mlp.up_proj.weight"
    if change == "unexpected":
        sd["model.layers.1.mlp.extra_proj.weight"] = sd[up].clone()
    elif change == "missing":
        del sd[up]
    elif change == "shape":
        sd[up] = sd[up][:, :63]
    else:
        del sd["model.norm.weight"]
    model, _ = load_nextchat(tiny_ckpt, llm=False)
    sizes = model.config.llm
    with pytest.raises(CheckpointError) as e:
        llama_hidden(Tensors(sd), sizes, _embeds(sizes))
    assert "\n" not in str(e.value) and expected in str(e.value), str(e.value)


@pytest.mark.parametrize("wrong", [False, True])
def test_a_retrieval_checkpoint_with_the_buffers_loads_and_a_wrong_one_is_refused(tmp_path, wrong):
    """The retrieval family's loader meets the same 4.31 buffers: checked against config.json's RoPE, then skipped."""
    from pathlib import Path

    import nxc
    from nxc.model.retrieval import load_retrieval
    asset = Path(nxc.__file__).parent / "assets" / "shapes-retrieval"
    cfg = read_config(asset)
    dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    theta = float(cfg.get("rope_theta", 10000.0))

    def edit(sd):
        if wrong:
            sd[INV_FREQ.format(0)] = official_inv_freq(dim, theta * 50)
    ckpt = saved_by_4_31(asset, tmp_path / "c", safetensors=True, theta=theta, edit=edit)
    if wrong:
        with pytest.raises(CheckpointError, match=rf"^{INV_FREQ.format(0)} .*rope_theta") as e:
            load_retrieval(ckpt)
        assert "\n" not in str(e.value)
    else:
        model, _ = load_retrieval(ckpt)
        ref, _ = load_retrieval(asset)
        for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
            torch.testing.assert_close(a, b, msg=k)
