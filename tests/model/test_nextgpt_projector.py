"""NExT-GPT's output projector (nxc.model.nextgpt_projector): shapes, the original's names, the embeddings."""
import pytest
import torch

from nxc.config import PROJECTOR_SIZES
from nxc.model.nextgpt_projector import OutputProjector, load_original, original_state_dict

TINY = PROJECTOR_SIZES["tiny"]


def original_names(encoder_layers: int, decoder_layers: int) -> set[str]:
    """The state-dict names of NExT-GPT's TextFcLayer (mode "transformer"), spelled out as its code builds them:
    self.fc, self.tfm = nn.Transformer(...), self.model, self.query_embs."""
    attn = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    linear = ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")
    names = {"fc.weight", "fc.bias", "model.weight", "model.bias", "query_embs",
             "tfm.encoder.norm.weight", "tfm.encoder.norm.bias", "tfm.decoder.norm.weight", "tfm.decoder.norm.bias"}
    for i in range(encoder_layers):
        p = f"tfm.encoder.layers.{i}."
        names |= {p + "self_attn." + a for a in attn} | {p + n for n in linear}
        names |= {p + f"norm{k}.{w}" for k in (1, 2) for w in ("weight", "bias")}
    for i in range(decoder_layers):
        p = f"tfm.decoder.layers.{i}."
        names |= {p + m + "." + a for m in ("self_attn", "multihead_attn") for a in attn} | {p + n for n in linear}
        names |= {p + f"norm{k}.{w}" for k in (1, 2, 3) for w in ("weight", "bias")}
    return names


@pytest.fixture
def projector():
    torch.manual_seed(0)
    return OutputProjector(TINY).eval()


@pytest.mark.parametrize("batch", [1, 3])
def test_shapes(projector, batch):
    h, e = torch.randn(batch, 4, 64), torch.randn(batch, 4, 64)
    with torch.no_grad():
        out = projector(h, e)
    assert out.shape == (batch, 77, TINY.out_dim)
    assert projector.query_embs.shape == (1, 77, TINY.d_model)


def test_real_sizes_are_about_32m_parameters():
    with torch.device("meta"):
        m = OutputProjector(PROJECTOR_SIZES["nextgpt"])
    assert sum(p.numel() for p in m.parameters()) == 31_958_784          # DESIGN 5: "about 32 M parameters"
    assert set(m.state_dict()) == original_names(4, 4)


def test_queries_start_standard_normal_as_the_originals():
    torch.manual_seed(0)
    q = OutputProjector(PROJECTOR_SIZES["nextgpt"]).query_embs            # torch.randn(1, 77, 512)
    assert abs(float(q.detach().std()) - 1.0) < 0.05 and abs(float(q.detach().mean())) < 0.05


def test_names_are_the_originals(projector):
    assert set(projector.state_dict()) == original_names(TINY.encoder_layers, TINY.decoder_layers)


@pytest.mark.parametrize("prefix,rename", [
    ("gen_text_hidden_fcs.0.", {}),                                            # the original NextGPTModel
    ("model.mm_output_img_projector.", {"fc.": "in_fc.", "model.": "out_fc."}),  # the rewrite (LLaVA-style nesting)
    ("", {}),                                                                  # the projector's own state dict
])
def test_a_checkpoints_projector_loads(projector, prefix, rename):
    ckpt = {"llama_proj.weight": torch.zeros(64, 8), "gen_text_hidden_fcs_video.0.fc.weight": torch.zeros(1)}
    for k, v in projector.state_dict().items():
        for new, old in rename.items():
            k = old + k[len(new):] if k.startswith(new) else k
        ckpt[prefix + k] = v.clone()
    if not prefix:
        ckpt = {k: v for k, v in ckpt.items() if k in projector.state_dict()}
    loaded = load_original(TINY, ckpt)
    h, e = torch.randn(2, 4, 64), torch.randn(2, 4, 64)
    with torch.no_grad():
        assert torch.equal(loaded(h, e), projector(h, e))


@pytest.mark.parametrize("ckpt,error,message", [
    ({"llama_proj.weight": torch.zeros(1)}, KeyError, "no output projector in the state dict"),
    ({"gen_text_hidden_fcs.0.fc.weight": torch.zeros(32, 64)}, KeyError, "no output projector in the state dict"),
    ({"gen_text_hidden_fcs.0.query_embs": torch.zeros(1, 77, 32)}, RuntimeError, "Missing key"),
    ({**{f"gen_text_hidden_fcs.0.{k}": v for k, v in OutputProjector(PROJECTOR_SIZES["tiny"]).state_dict().items()},
      "gen_text_hidden_fcs.0.fc.weight": torch.zeros(32, 4096)}, RuntimeError, "size mismatch for fc.weight"),
])
def test_a_checkpoint_that_does_not_fit_is_refused(ckpt, error, message):
    with pytest.raises(error, match=message):
        load_original(TINY, ckpt)


def test_prefix_found_in_a_checkpoint_keeps_only_the_projector(projector):
    ckpt = {f"gen_text_hidden_fcs.0.{k}": v for k, v in projector.state_dict().items()}
    ckpt["gen_text_hidden_fcs_audio.0.fc.weight"] = torch.zeros(1)
    assert set(original_state_dict(ckpt)) == set(projector.state_dict())


def test_embeds_are_added_to_the_hiddens(projector):
    """x = hidden + embeds (the original adds them; it does not concatenate), and they change the result."""
    h, e = torch.randn(2, 4, 64), torch.randn(2, 4, 64)
    with torch.no_grad():
        out = projector(h, e)
        assert torch.allclose(out, projector(h + e, torch.zeros_like(e)), atol=1e-6)
        assert torch.allclose(out, projector(e, h), atol=1e-6)
        assert (out - projector(h, torch.zeros_like(e))).abs().max() > 1e-2


def test_signal_tokens_are_a_set(projector):
    """No positional encoding (as the original): permuting the N signal tokens, each hidden with its embedding row,
    leaves the conditioning unchanged; order reaches the projector only through what differs per token."""
    h, e = torch.randn(1, 4, 64), torch.randn(1, 4, 64)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        assert torch.allclose(projector(h, e), projector(h[:, perm], e[:, perm]), atol=1e-5)


@pytest.mark.parametrize("hidden,embeds", [
    ((1, 4, 64), (1, 3, 64)),
    ((1, 4, 32), (1, 4, 32)),
])
def test_mismatched_inputs_are_refused(projector, hidden, embeds):
    with pytest.raises(ValueError, match=r"must both be \[batch, signal tokens, 64\]"):
        projector(torch.zeros(hidden), torch.zeros(embeds))
