"""VITRON's region extractor (nxc.model.region): its pooling mask is VITRON's (F.interpolate of the drawn box mask,
> 0); a checkpoint with region_encoder.* tensors loads as a region-extractor model; the exported build's slot rows and
replies equal the reference's, a user's region taking the extractor's row and the model's own boxes loc_encoder's."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nxc.model.region import RegionEncoder


def _random_boxes(rng, n):
    b = rng.uniform(0, 1, (n, 4))
    b = np.concatenate([np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])], 1)
    b[: n // 10, 2:] = b[: n // 10, :2] + 0.01          # thin boxes: between two sample points or on one
    return torch.tensor(b, dtype=torch.float32)


@pytest.mark.parametrize("pixels,grid", [(336, 24), (224, 16), (64, 8), (30, 7)])
def test_cell_mask_is_vitrons_bilinear_mask_pooling(pixels, grid):
    boxes = _random_boxes(np.random.default_rng(pixels), 300)
    centres = (torch.arange(pixels) + 0.5) / pixels          # the pixels whose centre is in the box
    mx = (centres >= boxes[:, 0:1]) & (centres <= boxes[:, 2:3])
    my = (centres >= boxes[:, 1:2]) & (centres <= boxes[:, 3:4])
    drawn = (my[:, :, None] & mx[:, None, :]).float()[:, None]
    want = (F.interpolate(drawn, size=(grid, grid), mode="bilinear", align_corners=False) > 0).float()
    got = RegionEncoder(8, 16, grid=grid, image_size=pixels).cell_mask(boxes)
    assert torch.equal(got, want.reshape(len(boxes), -1))
    assert 0 < got.sum() < got.numel()


def test_forward_is_the_mean_of_the_covered_patches_then_two_mlps():
    torch.manual_seed(0)
    enc = RegionEncoder(6, 8, grid=4, image_size=8)
    feats = torch.randn(16, 6)
    box = torch.tensor([[0.0, 0.0, 0.5, 0.5]])                 # the top-left 2 x 2 cells
    pooled = feats.reshape(4, 4, 6)[:2, :2].reshape(-1, 6).mean(0, keepdim=True)
    want = enc.feat_linear(pooled) + enc.loc_linear(box)
    torch.testing.assert_close(enc(feats, box), want)


@pytest.fixture(scope="module")
def region_ckpt(tmp_path_factory):
    pytest.importorskip("transformers")
    from nxc.model.writer import make_tiny_checkpoint
    return make_tiny_checkpoint(tmp_path_factory.mktemp("region") / "ckpt", seed=3, region_encoder=True)


@pytest.fixture(scope="module")
def region_build(region_ckpt, tmp_path_factory):
    from nxc.export.exporter import ExportOptions, export_build
    return export_build(region_ckpt, tmp_path_factory.mktemp("region-build") / "fp32",
                        options=ExportOptions(max_context=256))


def test_checkpoint_with_region_tensors_loads_as_a_region_extractor_model(region_ckpt, tiny_ckpt_export):
    from nxc.model.checkpoint import load_nextchat
    from nxc.model.checkpoint import load_state_dict
    model, _ = load_nextchat(region_ckpt)
    assert model.config.region_encoder and model.config.to_dict()["region_encoder"] is True
    keys = [k for k in load_state_dict(region_ckpt) if k.startswith("region_encoder.")]
    assert sorted(keys) == sorted(f"region_encoder.{m}.{i}.{p}" for m in ("feat_linear", "loc_linear")
                                  for i in (0, 2) for p in ("weight", "bias"))
    plain, _ = load_nextchat(tiny_ckpt_export)
    assert not plain.config.region_encoder and "region_encoder" not in plain.config.to_dict()


@torch.no_grad()
def test_build_slot_rows_and_replies_equal_the_reference(region_build, region_ckpt):
    from nxc.model import processing
    from nxc.model.reference import ReferenceChat
    from nxc.runtime.pipeline import Pipeline
    ref = ReferenceChat.load(region_ckpt)
    pipe = Pipeline.load(region_build)
    m = pipe.manifest
    head = pipe.dispatch.slot_head
    assert head.head.inputs["patch_features"] == "vision:patch_features"
    assert "patch_features" in m.graph_spec("vision").output_names

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8))
    boxes_px = np.array([[3, 4, 30, 33], [10, 2, 50, 20]], np.float32)
    norm = processing.normalise_boxes(boxes_px, *image.size)
    px = processing.clip_preprocess_of(ref.model).pixels(image)
    feats, patches = ref.model.encode_image_parts(px)
    # user regions: the extractor's rows; the model's own boxes: loc_encoder's (different rows)
    conv = pipe.conversation(image)
    conv.history_slots = [norm[1].numpy()]            # slot 0: an earlier reply's box, slot 1: this turn's region
    values = np.stack([norm[1].numpy(), norm[0].numpy()])
    got = head.encode(values, conv, [0, 1])
    want = ref.model.slot_rows(torch.from_numpy(values), [False, True], patches[0]).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got[0], ref.model.loc_encoder(norm[1:2])[0].numpy(), atol=1e-5)
    assert np.abs(got[1] - ref.model.loc_encoder(norm[:1])[0].numpy()).max() > 1e-2

    for text, boxes in [("What is [0]?", boxes_px[:1]), ("Compare [0] and [1].", boxes_px), ("hello", None)]:
        r = pipe.chat(image, text, boxes=boxes, max_new_tokens=12)
        q = ref.chat(image, text, boxes=boxes, max_new_tokens=12)
        assert r.token_ids == q.token_ids, (text, r.raw_text, q.raw_text)


def test_a_follow_up_turn_keeps_the_earlier_region_as_a_region(region_build, region_ckpt):
    """Turn 2 re-prefilled from scratch (add_turn, as nxc-serve rebuilds a conversation) equals the reference given
    which history slot was the user's region."""
    from nxc.model import processing
    from nxc.model.reference import ReferenceChat
    from nxc.prompt import Turn
    from nxc.runtime.pipeline import Pipeline
    ref = ReferenceChat.load(region_ckpt)
    pipe = Pipeline.load(region_build)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (36, 36, 3), dtype=np.uint8))
    box = [[2, 3, 20, 25]]
    first = ref.chat(image, "What is [0]?", boxes=box, max_new_tokens=8)
    conv = pipe.conversation(image)
    conv.add_turn("What is [0]?", first.raw_text, boxes=box, reply_boxes=[d.box_norm for d in first.detections])
    assert conv.history_regions == {0}
    r = conv.ask("And then?", max_new_tokens=10)
    hist = list(processing.normalise_boxes(np.asarray(box, np.float32), *image.size).numpy())
    q = ref.chat(image, "And then?", history=[Turn("What is [0]?", first.raw_text)],
                 history_boxes=hist + [d.box_norm for d in first.detections], history_regions=[0], max_new_tokens=10)
    assert r.token_ids == q.token_ids


def test_fp16_and_int8_builds_pass_their_parity_checks(region_ckpt, tmp_path):
    """The region extractor's mask is cut in float32 in an fp16 graph (pixel centres rounded to fp16 would move cells
    across box edges) and pooled in float32 (an empty mask is 0, not 0 / 0): the exporter's own parity checks of
    vision (patch_features) and loc_heads (is_region rows) pass at fp16 and with int8 weight-only loc_heads."""
    from nxc.export.exporter import ExportOptions, export_build
    from nxc.runtime.pipeline import Pipeline
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (33, 47, 3), dtype=np.uint8))
    for precision in ("fp16", "int8"):
        floats = ("vision", "sam_encoder") if precision == "int8" else ()     # no calibration images: weight-only
        build = export_build(region_ckpt, tmp_path / precision, options=ExportOptions(
            precision=precision, max_context=256, float_graphs=floats))
        r = Pipeline.load(build).chat(image, "What is [0]?", boxes=[[1, 2, 30, 20]], max_new_tokens=4)
        assert len(r.token_ids) == 4 or r.finish_reason == "stop"
