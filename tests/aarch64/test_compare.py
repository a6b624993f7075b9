"""The comparison `make test-aarch64` applies to x86's and arm64's answers catches what it must (run on the host,
on real answers of the embedded build)."""
import copy
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import answers as answers_mod  # noqa: E402
from compare import compare_answers  # noqa: E402


@pytest.fixture(scope="module")
def x86(embedded_build, retrieval_build, tmp_path_factory):
    builds = tmp_path_factory.mktemp("builds")
    (builds / "embedded").symlink_to(embedded_build)
    (builds / "retrieval").symlink_to(retrieval_build)
    out = builds / "answers.json"
    assert answers_mod.main([str(builds), str(out)]) == 0
    return json.loads(out.read_text())


def first_with_mask(data):
    return next(a for a in data["embedded"] if a["detections"] and a["detections"][0]["mask"])


def test_the_same_answers_compare_equal(x86):
    c = compare_answers(x86, copy.deepcopy(x86))
    assert c["mismatches"] == [] and c["answers"] == c["identical_ids"] == 15
    assert c["detections"] > 0 and c["min_mask_iou"] == 1.0


def test_a_changed_id_a_moved_box_and_a_changed_mask_are_each_caught(x86):
    arm = copy.deepcopy(x86)
    arm["retrieval"][1]["token_ids"][-1] += 1
    ans = first_with_mask(arm)
    ans["detections"][0]["box_norm"][0] += 2e-3
    ans["detections"][0]["mask"]["bits"] = "".join("A" if c != "=" else c for c in ans["detections"][0]["mask"]["bits"])
    c = compare_answers(x86, arm)
    assert c["identical_ids"] == c["answers"] - 1
    text = "\n".join(c["mismatches"])
    assert "retrieval 1" in text and "token_ids" in text
    assert "boxes differ by 2.00e-03 (normalised)" in text and "mask IoU 0.0000 < 0.99" in text


def test_a_missing_answer_is_a_mismatch(x86):
    arm = copy.deepcopy(x86)
    arm["embedded"].pop()
    assert compare_answers(x86, arm)["mismatches"] == ["embedded: 11 answers on x86, 10 on arm64"]
