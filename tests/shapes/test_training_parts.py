"""The parts of training that can be checked without training: tokenizer, labels, losses, metrics."""
import numpy as np
import pytest
import torch

from nxc import names
from nxc.shapes import train as T
from nxc.shapes.batching import IGNORE, encode_conversation, sample_conversation
from nxc.shapes.data import make_samples
from nxc.shapes.evaluate import Scores, box_iou


@pytest.fixture(scope="module")
def shapes_tokenizer(tmp_path_factory):
    tok, _ = T.build_tokenizer(tmp_path_factory.mktemp("tok"))
    return tok


def test_training_text_never_tokenizes_to_unk(shapes_tokenizer):
    rng = np.random.default_rng(0)
    at, boxes = shapes_tokenizer.added_token_ids[names.AT], shapes_tokenizer.added_token_ids[names.BOXES]
    for _ in range(300):
        ids, *_ = encode_conversation(sample_conversation(rng), shapes_tokenizer, 16, at, boxes)
        assert 0 not in ids


def test_labels_cover_answers_and_mask_the_slot_after_at(shapes_tokenizer):
    tok = shapes_tokenizer
    at, boxes = tok.added_token_ids[names.AT], tok.added_token_ids[names.BOXES]
    rng = np.random.default_rng(4)
    for _ in range(50):
        conv = sample_conversation(rng)
        ids, labels, slot_boxes, ats, at_boxes, objs, _ = encode_conversation(conv, tok, 16, at, boxes)
        assert len(ats) == len(objs) == len(at_boxes) == sum(len(s.answer_objects) for s in conv.samples)
        for p in ats:
            assert ids[p] == at and ids[p + 1] == boxes and labels[p + 1] == IGNORE and labels[p] == at
        assert len(slot_boxes) == ids.count(boxes)
        assert labels.count(tok.eos_id) == len(conv.samples)        # each answer ends with </s>
        assert all(lab == IGNORE for lab in labels[:ids.index(tok.added_token_ids[names.IM_END]) + 1])
        assert torch.all((slot_boxes >= 0) & (slot_boxes <= 1))


def test_giou_loss():
    b = torch.tensor([[0.1, 0.1, 0.5, 0.5]])
    assert T.giou_loss(b, b).item() == pytest.approx(0.0, abs=1e-6)
    far = torch.tensor([[0.6, 0.6, 0.9, 0.9]])
    assert T.giou_loss(far, b).item() > 1.0
    swapped = torch.tensor([[0.1, 0.5, 0.5, 0.1]])   # y1/y2 swapped: a wrong box, not the same box
    assert T.giou_loss(swapped, b).item() > 0.9


class _Det:
    def __init__(self, box, mask):
        self.box, self.mask = box, mask


class _Reply:
    def __init__(self, text, dets=()):
        self.text, self.detections = text, list(dets)


def _perfect(s):
    if s.task == "rec":
        return _Reply("Answer: [0] .", [_Det(s.target.box, s.target.mask)])
    if s.task == "pope":
        return _Reply("Yes" if s.present else "No")
    if s.task == "region":
        return _Reply(f"It is a {s.target.phrase}.")
    return _Reply(s.answer, [_Det(o.box, o.mask) for o in s.answer_objects])


def _wrong(s):
    if s.task == "rec":
        x1, y1, x2, y2 = s.target.box
        return _Reply("Answer: [0] .", [_Det((x2 + 5, y2 + 5, x2 + 30, y2 + 30), ~s.target.mask)])
    if s.task == "pope":
        return _Reply("No" if s.present else "Yes")
    if s.task == "region":
        return _Reply("It is a purple hexagon.")
    return _Reply("nothing here")


def test_metrics_score_perfect_and_wrong_answers():
    samples = make_samples(9, 12)
    good, bad = Scores(), Scores()
    for s in samples:
        good.add(s, _perfect(s))
        bad.add(s, _wrong(s))
    g, b = good.summary(), bad.summary()
    assert g["rec"]["acc@0.5"] == 1.0 and g["res"]["ciou"] == 1.0 and g["pope"]["accuracy"] == 1.0
    assert g["region"]["accuracy"] == 1.0 and g["caption"]["grounded_f1"] == 1.0
    assert b["rec"]["acc@0.5"] == 0.0 and b["res"]["ciou"] == 0.0 and b["pope"]["accuracy"] == 0.0
    assert b["region"]["accuracy"] == 0.0 and b["caption"]["grounded_f1"] == 0.0


def test_res_counts_two_detections_as_empty():
    s = next(x for x in make_samples(9, 5) if x.task == "rec")
    sc = Scores()
    sc.add(s, _Reply("", [_Det(s.target.box, s.target.mask), _Det(s.target.box, s.target.mask)]))
    assert sc.summary()["res"]["ciou"] == 0.0 and sc.summary()["rec"]["acc@0.5"] == 1.0


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 10, 10, 0), (0, 0, 10, 10)) == 0.0   # swapped corners are not the same box


def test_look_absent_targets_background_for_absent_pope_only(shapes_tokenizer):
    tok = shapes_tokenizer
    at, boxes = tok.added_token_ids[names.AT], tok.added_token_ids[names.BOXES]
    rng = np.random.default_rng(5)
    seen = {True: 0, False: 0}
    for _ in range(60):
        conv = sample_conversation(rng, task_weights={"pope": 1.0})
        *_, plain = encode_conversation(conv, tok, 16, at, boxes)
        *_, with_absent = encode_conversation(conv, tok, 16, at, boxes, look_absent=True)
        absent = sum(not s.present for s in conv.samples)
        extra = [c for c in (x[1] for x in with_absent) if c == 0]
        assert (len(extra) > 0) == (absent > 0) and not [c for _, c in plain if c == 0]
        seen[absent > 0] += 1
    assert seen[True] and seen[False]


def test_pope_near_share_controls_absent_objects():
    from nxc.shapes.data import make_sample, make_scene
    rng = np.random.default_rng(0)
    for _ in range(40):
        scene = make_scene(rng, max_objects=1)
        s = make_sample(rng, "pope", scene, pope_near=1.0)
        o = scene.objects[0]
        assert s.present or (s.target.colour == o.colour) != (s.target.shape == o.shape)


@pytest.mark.parametrize("text,ok", [("rec=0.5,pope=0.5", True), ("rec=1", True), ("rec", False),
                                      ("foo=1", False), ("rec=-1,pope=2", False), ("rec=0", False)])
def test_task_weight_flag(text, ok):
    import argparse

    from nxc.shapes.train_cli import _weights
    if ok:
        assert sum(_weights(text).values()) > 0
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            _weights(text)
