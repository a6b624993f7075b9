"""The class-agnostic proposal detector (nxc.model.proposals), its numpy filter (nxc.proposal_filter) and its
trainer (nxc.shapes.train_proposals)."""
import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from nxc.model.proposals import ProposalNet, ProposalSizes
from nxc.proposal_filter import box_iou_matrix, filter_proposals, proposal_recall

SMALL = ProposalSizes(image_size=64, widths=(8, 8, 16, 16), neck_width=8, num_proposals=8)


def _spread_net(sizes: ProposalSizes | None = None, seed: int = 0) -> ProposalNet:
    """A random net in eval mode whose objectness logits spread over several units: at initialisation they sit
    within ~1e-3 of the prior, so float32 near-ties would make the top-k order a coin toss between backends."""
    torch.manual_seed(seed)
    net = ProposalNet(sizes or ProposalSizes()).eval()
    with torch.no_grad():
        torch.nn.init.normal_(net.heat_head[-1].weight, std=1.0)
        net.heat_head[-1].bias.zero_()
        torch.nn.init.normal_(net.box_head[-1].weight, std=0.5)
    return net


def _pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- the network -----------------------------------------------------------------------------------------------

def test_forward_shapes_and_valid_boxes():
    net = _spread_net()
    with torch.no_grad():
        boxes, scores = net(_pixels(3, 128))
    k = net.sizes.num_proposals
    assert boxes.shape == (3, k, 4) and scores.shape == (3, k)
    assert boxes.dtype == scores.dtype == torch.float32
    assert (boxes >= 0).all() and (boxes <= 1).all()
    assert (boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all()
    assert (scores >= 0).all() and (scores <= 1).all()
    assert (scores[:, :-1] >= scores[:, 1:]).all(), "scores must come sorted, highest first"
    assert (scores[:, 0] > 0.5).all(), "a spread net has confident peaks"


def test_only_local_peaks_score():
    """A cell next to a higher one is no proposal: at most one scored proposal per 3x3 neighbourhood."""
    net = _spread_net()
    with torch.no_grad():
        logits, ltrb = net.dense(_pixels(1, 128))
        logits = torch.full_like(logits, -10.0)
        logits[0, 5, 5], logits[0, 5, 6], logits[0, 20, 20] = 3.0, 2.0, 1.0   # (5,6) touches the higher (5,5)
        boxes, scores = net.decode(logits, ltrb)
    assert scores[0, 0] == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
    assert scores[0, 1] == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())
    assert scores[0, 2] < 1e-3
    g = net.sizes.grid
    centre = torch.tensor([(5 + 0.5) / g, (5 + 0.5) / g])
    b = boxes[0, 0]
    assert b[0] <= centre[0] <= b[2] and b[1] <= centre[1] <= b[3], "the top box is around its cell"


def test_sizes_round_trip_and_validate():
    s = ProposalSizes(widths=(8, 16, 24, 32), num_proposals=10)
    d = s.to_dict()
    assert d["widths"] == [8, 16, 24, 32]
    assert ProposalSizes.from_dict(d) == s
    with pytest.raises(ValueError, match="unknown"):
        ProposalSizes.from_dict({**d, "depth": 3})
    with pytest.raises(ValueError, match="widths"):
        ProposalSizes(widths=(8, 16))


def test_onnx_export_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net = _spread_net()
    path = tmp_path / "proposals.onnx"
    x = _pixels(2, 128, seed=1)
    torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, input_names=["pixels"],
                      output_names=["boxes", "scores"], dynamic_axes={"pixels": {0: "batch"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed, n in ((2, 2), (3, 1)):
        x = _pixels(n, 128, seed=seed)
        with torch.no_grad():
            boxes, scores = net(x)
        ob, osc = sess.run(None, {"pixels": x.numpy()})
        assert ob.shape == (n, net.sizes.num_proposals, 4)
        np.testing.assert_allclose(ob, boxes.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(osc, scores.numpy(), atol=1e-4, rtol=0)


# --- the filter ------------------------------------------------------------------------------------------------

def test_box_iou_matrix():
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1]], np.float32)
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 5, 6]], np.float32)
    m = box_iou_matrix(a, b)
    assert m.shape == (2, 3)
    np.testing.assert_allclose(m, [[1 / 7, 1, 0], [0, 0.25, 0]], atol=1e-6)
    assert box_iou_matrix(np.zeros((0, 4)), b).shape == (0, 3)


def test_filter_drops_scores_below_threshold():
    boxes = np.array([[0, 0, .1, .1], [.5, .5, .6, .6], [.2, .2, .3, .3]], np.float32)
    kb, ks = filter_proposals(boxes, np.array([0.9, 0.29, 0.3], np.float32))
    np.testing.assert_array_equal(kb, boxes[[0, 2]])
    np.testing.assert_allclose(ks, [0.9, 0.3])
    assert kb.dtype == ks.dtype == np.float32


def test_filter_nms_drops_a_duplicate_keeps_disjoint_and_sorts():
    boxes = np.array([[0, 0, .4, .4], [.6, .6, 1, 1], [.01, .01, .41, .41], [.5, 0, .9, .3]], np.float32)
    scores = np.array([0.8, 0.95, 0.9, 0.5], np.float32)
    kb, ks = filter_proposals(boxes, scores)
    np.testing.assert_array_equal(kb, boxes[[1, 2, 3]])     # box 0 overlaps the higher box 2: dropped
    np.testing.assert_allclose(ks, [0.95, 0.9, 0.5])
    kb, _ = filter_proposals(boxes, scores, iou_threshold=0.99)
    assert len(kb) == 4


def test_filter_ties_keep_the_lower_index_first():
    boxes = np.array([[0, 0, .2, .2], [.5, .5, .7, .7], [0, 0, .2, .2]], np.float32)
    kb, _ = filter_proposals(boxes, np.array([0.5, 0.7, 0.5], np.float32), iou_threshold=1.0)
    np.testing.assert_array_equal(kb, boxes[[1, 0, 2]])
    kb, _ = filter_proposals(boxes, np.array([0.5, 0.7, 0.5], np.float32))
    np.testing.assert_array_equal(kb, boxes[[1, 0]])
    many = np.array([[i / 50, 0, i / 50 + 0.01, 0.01] for i in range(40)], np.float32)   # disjoint
    scores = np.where(np.arange(40) % 3 == 0, 0.9, 0.6).astype(np.float32)
    kb, _ = filter_proposals(many, scores, max_out=40)
    order = [i for i in range(40) if i % 3 == 0] + [i for i in range(40) if i % 3]
    np.testing.assert_array_equal(kb, many[order])


def test_filter_max_out():
    boxes = np.array([[i / 10, 0, i / 10 + .05, .05] for i in range(10)], np.float32)
    scores = np.linspace(0.9, 0.5, 10).astype(np.float32)
    kb, ks = filter_proposals(boxes, scores, max_out=3)
    np.testing.assert_array_equal(kb, boxes[:3])
    assert len(ks) == 3


def test_filter_empty_input_and_nothing_kept():
    kb, ks = filter_proposals(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32))
    assert kb.shape == (0, 4) and ks.shape == (0,)
    assert kb.dtype == ks.dtype == np.float32
    kb, ks = filter_proposals(np.array([[0, 0, 1, 1]], np.float32), np.array([0.1], np.float32))
    assert kb.shape == (0, 4) and ks.shape == (0,)
    with pytest.raises(ValueError, match="scores"):
        filter_proposals(np.zeros((2, 4), np.float32), np.zeros(3, np.float32))


def test_proposal_recall_by_hand():
    gt = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), np.array([[0, 0, 4, 4]], np.float32)]
    pred = [np.array([[0, 0, 10, 12], [50, 50, 60, 60]], np.float32),     # IoU 10/12 with the first, none for 2nd
            np.array([[0, 0, 4, 8]], np.float32)]                         # IoU exactly 0.5
    assert proposal_recall(pred, gt) == pytest.approx(2 / 3)
    assert proposal_recall(pred, gt, iou=0.6) == pytest.approx(1 / 3)
    assert proposal_recall([np.zeros((0, 4))] * 2, gt) == 0.0
    assert proposal_recall(gt, gt) == 1.0
    assert np.isnan(proposal_recall([np.zeros((0, 4))], [np.zeros((0, 4))]))
    with pytest.raises(ValueError):
        proposal_recall(pred[:1], gt)


def test_proposal_filter_is_torch_free():
    import nxc.proposal_filter as pf
    tree = ast.parse(Path(pf.__file__).read_text(encoding="utf-8"))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names <= {"__future__", "numpy"}, names


# --- training --------------------------------------------------------------------------------------------------

def test_targets_mark_each_centre():
    from nxc.shapes.train_proposals import make_targets
    heat, box, weight = make_targets([np.array([[0.1, 0.1, 0.3, 0.5]], np.float32), np.zeros((0, 4))], grid=16)
    assert heat.shape == (2, 16, 16) and box.shape == (2, 16, 16, 4)
    assert (heat[0] == 1).sum() == 1 and heat[0, 4, 3] == 1          # centre (0.2, 0.3) -> cell x=3, y=4
    assert weight[0, 4, 3] == 1 and torch.equal(box[0, 4, 3], torch.tensor([0.1, 0.1, 0.3, 0.5]))
    assert heat[1].sum() == 0 and weight[1].sum() == 0


def test_a_few_steps_on_a_fixed_batch_lower_the_loss():
    from nxc.shapes.data import make_scene
    from nxc.shapes.train_proposals import make_targets, proposal_loss, scene_inputs
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(5)
    pixels, boxes = scene_inputs([make_scene(rng) for _ in range(4)], SMALL.image_size)
    targets = make_targets(boxes, SMALL.grid)
    net = ProposalNet(SMALL).train()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, parts = proposal_loss(net, pixels, targets)
        assert set(parts) == {"focal", "giou", "l1"}
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0], losses


def test_train_writes_a_loadable_model(tmp_path):
    from nxc.shapes.train_proposals import evaluate_recall, load_proposal_net, train
    info = train(tmp_path, steps=2, batch_size=2, sizes=SMALL, eval_scenes=4, command="test")
    assert (tmp_path / "proposals.safetensors").exists()
    t = info["training"]
    assert t["steps"] == 2 and t["command"] == "test" and 0 <= t["recall@0.5"] <= 1
    assert t["max_proposals_per_image"] <= 16
    net = load_proposal_net(tmp_path)
    assert net.sizes == SMALL and not net.training
    again = evaluate_recall(net, n=4)
    assert again["recall@0.5"] == t["recall@0.5"]
    assert again["mean_proposals_per_image"] == t["mean_proposals_per_image"]
