import numpy as np
import torch

from nxc.model import processing
from nxc.model.generate import generate, prefill_embeds
from nxc.prompt import build_prompt
from nxc.sampling import SamplingParams


def _prompt(ref, text, n_boxes=0):
    prompt, order = build_prompt(text, num_image_tokens=ref.model.config.num_image_tokens, num_boxes=n_boxes)
    return ref.tokenizer.encode(prompt), order


def _features(ref, image):
    with torch.no_grad():
        return ref.model.encode_image(processing.clip_pixels(image, ref.model.config.vision.image_size))


def _force_at(at, steps):
    def proc(step, lg):
        if step in steps:
            lg = lg.copy()
            lg[at] = lg.max() + 100.0
        return lg
    return proc


def test_greedy_is_deterministic_and_matches_uncached_recompute(tiny_ref, image):
    ids, _ = _prompt(tiny_ref, "Where is the red circle in the image?")
    feats = _features(tiny_ref, image)
    a = generate(tiny_ref.model, ids, tiny_ref.token_ids, image_features=feats, max_new_tokens=12)
    b = generate(tiny_ref.model, ids, tiny_ref.token_ids, image_features=feats, max_new_tokens=12)
    assert a.token_ids == b.token_ids and a.finish_reason == "length" and len(a.token_ids) == 12
    # the cached loop picks what a full forward over the whole sequence picks, token by token
    m = tiny_ref.model
    with torch.no_grad():
        emb = prefill_embeds(m, ids, tiny_ref.token_ids, feats, None)
        for t in a.token_ids:
            logits = m.llm(inputs_embeds=emb).logits[0, -1]
            assert int(torch.argmax(logits)) == t
            emb = torch.cat([emb, m.embed_tokens(torch.tensor([[t]]))], dim=1)


def test_forced_triggers_give_one_box_each_and_the_feedback_rule(tiny_ref, image):
    tok = tiny_ref.token_ids
    ids, _ = _prompt(tiny_ref, "Where is the red circle in the image?")
    feats = _features(tiny_ref, image)
    sam_calls = []

    def sam_pixels():
        sam_calls.append(1)
        return processing.sam_pixels(image, tiny_ref.model.config.sam.image_size)

    g = generate(tiny_ref.model, ids, tok, image_features=feats, sam_pixels=sam_pixels, max_new_tokens=10,
                 logits_processor=_force_at(tok.at, {1, 5}))
    at_pos = [i for i, t in enumerate(g.token_ids) if t == tok.at]
    assert at_pos == [1, 5]
    assert all(g.token_ids[i + 1] == tok.boxes for i in at_pos)
    assert g.boxes.shape == (2, 4) and g.trigger_hidden.shape == (2, tiny_ref.model.config.llm.hidden_size)
    assert g.mask_logits.shape == (2, 1, 128, 128) and g.iou.shape == (2, 1)
    assert sam_calls == [1]
    m = tiny_ref.model
    with torch.no_grad():
        torch.testing.assert_close(g.boxes, m.loc_decoder(g.trigger_hidden), rtol=0, atol=0)
        for k in range(2):  # row by row: the loop ran the heads on one hidden at a time
            h = g.trigger_hidden[k:k + 1]
            torch.testing.assert_close(g.feedback_embeds[k:k + 1], m.loc_encoder(m.loc_decoder(h)), rtol=0, atol=0)
        # each trigger hidden is the final-norm hidden of the step whose input was <at>, with the
        # earlier slot's embedding replaced by the feedback (full forward, no cache)
        emb = prefill_embeds(m, ids, tok, feats, None)
        k = 0
        for i, t in enumerate(g.token_ids[:7]):
            row = g.feedback_embeds[k - 1:k] if t == tok.boxes else m.embed_tokens(torch.tensor([t]))
            emb = torch.cat([emb, row[None]], dim=1)
            if t == tok.at:
                h = m.llm.model(inputs_embeds=emb).last_hidden_state[0, -1]
                torch.testing.assert_close(h, g.trigger_hidden[k], rtol=1e-5, atol=1e-5)
                k += 1
    assert k == 2


def test_no_trigger_never_runs_sam(tiny_ref, image):
    ids, _ = _prompt(tiny_ref, "Is there a blue square?")
    calls = []
    g = generate(tiny_ref.model, ids, tiny_ref.token_ids, image_features=_features(tiny_ref, image),
                 sam_pixels=lambda: calls.append(1), max_new_tokens=5,
                 logits_processor=lambda s, lg: np.where(np.arange(lg.size) == tiny_ref.token_ids.at, -1e9, lg))
    assert calls == [] and g.boxes.shape == (0, 4) and g.mask_logits is None


def test_trigger_at_the_token_limit_still_completes_its_slot(tiny_ref, image):
    tok = tiny_ref.token_ids
    ids, _ = _prompt(tiny_ref, "Where?")
    g = generate(tiny_ref.model, ids, tok, image_features=_features(tiny_ref, image), max_new_tokens=3,
                 logits_processor=_force_at(tok.at, {2}))
    assert g.token_ids[2:] == [tok.at, tok.boxes] and g.boxes.shape == (1, 4) and g.finish_reason == "length"


def test_eos_stops(tiny_ref, image):
    tok = tiny_ref.token_ids
    ids, _ = _prompt(tiny_ref, "Where?")
    g = generate(tiny_ref.model, ids, tok, image_features=_features(tiny_ref, image), max_new_tokens=20,
                 logits_processor=_force_at(tok.eos, {3}))
    assert g.token_ids[-1] == tok.eos and len(g.token_ids) == 4 and g.finish_reason == "stop"


def test_region_input_rows_are_loc_encoder_at_slots(tiny_ref, image):
    tok, m = tiny_ref.token_ids, tiny_ref.model
    ids, order = _prompt(tiny_ref, "Compare [1] with [0,1].", n_boxes=2)
    assert order == [1, 0, 1]
    px = np.array([[5, 5, 40, 30], [30, 10, 70, 45]], np.float32)
    region = processing.normalise_boxes(px[order], *image.size)
    feats = _features(tiny_ref, image)
    with torch.no_grad():
        emb = prefill_embeds(m, ids, tok, feats, region)[0]
        plain = m.embed_tokens(torch.tensor(ids))
        expected = m.loc_encoder(region)
    slots = [i for i, t in enumerate(ids) if t == tok.boxes]
    assert len(slots) == 3
    torch.testing.assert_close(emb[slots], expected, rtol=0, atol=0)
    start = ids.index(tok.im_start)
    n = m.config.num_image_tokens
    torch.testing.assert_close(emb[start + 1:start + 1 + n], feats[0], rtol=0, atol=0)
    others = [i for i in range(len(ids)) if i not in slots and not start < i <= start + n]
    torch.testing.assert_close(emb[others], plain[others], rtol=0, atol=0)
    # the <at> before each slot keeps its own token embedding
    assert all(ids[i - 1] == tok.at for i in slots)


def test_region_input_through_chat_uses_the_boxes(tiny_ref, image):
    a = tiny_ref.chat(image, "What is region [0]?", boxes=[[5, 5, 40, 30]], max_new_tokens=4, keep_logits=True)
    b = tiny_ref.chat(image, "What is region [0]?", boxes=[[40, 20, 79, 49]], max_new_tokens=4, keep_logits=True)
    assert not np.array_equal(a.generation.step_logits[0], b.generation.step_logits[0])


def test_seeded_sampling(tiny_ref, image):
    ids, _ = _prompt(tiny_ref, "Describe the image.")
    feats = _features(tiny_ref, image)
    run = lambda seed: generate(tiny_ref.model, ids, tiny_ref.token_ids, image_features=feats,  # noqa: E731
                                max_new_tokens=15, sampling=SamplingParams(temperature=1.5, seed=seed)).token_ids
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_chat_returns_pixel_boxes_and_masks_on_the_original_image(tiny_ref, image):
    at = tiny_ref.token_ids.at
    r = tiny_ref.chat(image, "Where is it?", max_new_tokens=6, iou_threshold=None,
                      logits_processor=_force_at(at, {0}))
    assert r.token_ids[:2] == [at, tiny_ref.token_ids.boxes]
    assert r.text.count("[0]") == 1 and "<at>" not in r.text
    (d,) = r.detections
    assert d.mask.shape == (image.size[1], image.size[0]) and d.mask.dtype == bool
    expected = processing.boxes_to_pixels(torch.as_tensor(d.box_norm)[None], *image.size)[0].numpy()
    np.testing.assert_allclose(d.box, expected)
