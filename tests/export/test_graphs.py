"""Every graph against the PyTorch reference (not only against its own wrapper), fp32, rtol 1e-4."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import DynamicCache

from nxc import names
from nxc.export.exporter import ExportOptions, export_graph, wrapper_for
from nxc.specs import graph_specs

RTOL = ATOL = 1e-4


def close(a, b, what):
    a, b = (np.asarray(x.detach().numpy() if torch.is_tensor(x) else x, np.float64) for x in (a, b))
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    assert np.allclose(a, b, rtol=RTOL, atol=ATOL), f"{what}: max abs error {np.abs(a - b).max():.3g}"


@pytest.fixture(scope="module")
def sessions(tiny_model, tmp_path_factory):
    model, _ = tiny_model
    out = tmp_path_factory.mktemp("graphs")
    specs = graph_specs(model.config)
    sess = {}
    for g in names.GRAPHS:
        path = out / f"{g}.onnx"
        export_graph(wrapper_for(model, g, ExportOptions()), specs[g], model.config, path, ExportOptions())
        sess[g] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess


def hf_step(model, embeds, cache):
    with torch.no_grad():
        out = model.llm.model(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
    hidden = out.last_hidden_state[:, -1]
    return model.llm.lm_head(hidden), hidden


def cache_rows(cache, layer, start, end):
    """HF DynamicCache layer -> our layout [B, P, kv, D] for positions [start, end)."""
    k, v = cache.layers[layer].keys, cache.layers[layer].values            # [B, kv, S, D]
    return (k[:, :, start:end].permute(0, 2, 1, 3).numpy(), v[:, :, start:end].permute(0, 2, 1, 3).numpy())


@pytest.mark.parametrize("past,new", [(0, 1), (0, 6), (1, 1), (1, 4), (37, 1), (37, 3)])
def test_llm_matches_hf_llama_with_cache(tiny_model, sessions, past, new):
    model, _ = tiny_model
    cfg = model.config.llm
    g = torch.Generator().manual_seed(past * 10 + new)
    prefix = torch.randn(1, past, cfg.hidden_size, generator=g)
    step = torch.randn(1, new, cfg.hidden_size, generator=g)
    cache = DynamicCache()
    if past:
        hf_step(model, prefix, cache)
    logits, hidden = hf_step(model, step, cache)
    feeds = {"inputs_embeds": step.numpy(), "attention_mask": np.ones((1, past + new), np.int64),
             "position_ids": np.arange(past, past + new, dtype=np.int64)[None]}
    for i in range(cfg.num_layers):
        k, v = cache_rows(cache, i, 0, past) if past else (np.zeros((1, 0, cfg.num_kv_heads, cfg.head_dim), np.float32),) * 2
        feeds[names.past_key(i)], feeds[names.past_value(i)] = k, v
    spec = graph_specs(model.config)[names.GRAPH_LLM]
    got = dict(zip(spec.output_names, sessions[names.GRAPH_LLM].run(spec.output_names, feeds)))
    close(got["logits"], logits, "logits")
    close(got["hidden"], hidden, "hidden")
    for i in range(cfg.num_layers):
        k, v = cache_rows(cache, i, past, past + new)
        close(got[names.present_key(i)], k, f"present.{i}.key")
        close(got[names.present_value(i)], v, f"present.{i}.value")


def test_llm_batch_with_left_padding_matches_unpadded_rows(tiny_model, sessions):
    """attention_mask zeros exclude positions: a padded row gives the same last logits as the row alone."""
    model, _ = tiny_model
    cfg = model.config.llm
    spec = graph_specs(model.config)[names.GRAPH_LLM]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, cfg.hidden_size)).astype(np.float32)
    empty = {n: np.zeros((1, 0, cfg.num_kv_heads, cfg.head_dim), np.float32) for n in spec.input_names[3:]}
    alone = sessions["llm"].run(["logits"], {"inputs_embeds": x, "attention_mask": np.ones((1, 4), np.int64),
                                             "position_ids": np.arange(4)[None], **empty})[0]
    padded = np.concatenate([rng.standard_normal((1, 2, cfg.hidden_size)).astype(np.float32), x], 1)
    got = sessions["llm"].run(["logits"], {"inputs_embeds": padded,
                                           "attention_mask": np.array([[0, 0, 1, 1, 1, 1]], np.int64),
                                           "position_ids": np.array([[0, 0, 0, 1, 2, 3]]), **empty})[0]
    close(got, alone, "logits with left padding")


@pytest.mark.parametrize("batch", [1, 2])
def test_vision_matches_reference(tiny_model, sessions, batch):
    model, _ = tiny_model
    r = model.config.vision.image_size
    x = np.random.default_rng(batch).standard_normal((batch, 3, r, r)).astype(np.float32)
    with torch.no_grad():
        ref = model.encode_image(torch.from_numpy(x)).numpy()
    close(sessions["vision"].run(None, {"pixel_values": x})[0], ref, "image_embeds")


@pytest.mark.parametrize("k,m", [(1, 1), (3, 2)])
def test_loc_heads_match_reference(tiny_model, sessions, k, m):
    model, _ = tiny_model
    rng = np.random.default_rng(k)
    h = rng.standard_normal((k, model.config.llm.hidden_size)).astype(np.float32)
    boxes = rng.uniform(0, 1, (m, 4)).astype(np.float32)
    box, feedback, seg, loc = sessions["loc_heads"].run(None, {"hidden": h, "boxes": boxes})
    with torch.no_grad():
        rbox, rfeed = model.loc_feedback(torch.from_numpy(h))
        close(box, rbox, "box")
        close(feedback, rfeed, "feedback")
        close(seg, model.seg_prompt(torch.from_numpy(h)), "seg_prompt")
        close(loc, model.loc_encoder(torch.from_numpy(boxes)), "loc_embeds")


def test_sam_encoder_and_decoder_match_reference(tiny_model, sessions):
    model, _ = tiny_model
    s = model.config.sam.image_size
    rng = np.random.default_rng(0)
    img = rng.standard_normal((1, 3, s, s)).astype(np.float32)
    emb = sessions["sam_encoder"].run(None, {"image": img})[0]
    with torch.no_grad():
        ref_emb = model.sam_image_embedding(torch.from_numpy(img))
    close(emb, ref_emb, "image_embedding")
    for k in (1, 3):
        h = torch.from_numpy(rng.standard_normal((k, model.config.llm.hidden_size)).astype(np.float32))
        boxes = torch.from_numpy(np.sort(rng.uniform(0, 1, (k, 2, 2)), 1).reshape(k, 4).astype(np.float32))
        with torch.no_grad():
            low, iou, _ = model.sam_masks(ref_emb, boxes, h)
            seg = model.seg_prompt(h).numpy()
        got_low, got_iou = sessions["sam_decoder"].run(None, {"image_embedding": emb, "boxes": (boxes * s).numpy(),
                                                              "seg_prompt": seg})
        close(got_low, low, f"low_res_masks (K={k})")
        close(got_iou, iou, f"iou (K={k})")


@pytest.mark.parametrize("tokens", [1, 5, 10_000])
def test_sam_encoder_global_attention_in_chunks_is_sams(tiny_model, monkeypatch, tokens):
    """SamEncoderGraph takes a global-attention block's queries in chunks of image rows (SAM ViT-H's scores would
    hold 3.2 GB at once); the embedding is segment_anything's own, for chunks of one row, a few rows, and all."""
    import torch
    from nxc.export import wrappers
    model, _ = tiny_model
    enc = model.sam.image_encoder
    assert any(b.window_size == 0 for b in enc.blocks) and any(b.attn.use_rel_pos for b in enc.blocks)
    monkeypatch.setattr(wrappers, "GLOBAL_ATTENTION_TOKENS", tokens)
    size = enc.img_size
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = enc(image), wrappers.SamEncoderGraph(model)(image)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
