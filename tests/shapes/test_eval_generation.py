"""nxc-eval's generation task (nxc.shapes.eval_generation): the seeded requests, the run on the tiny random NExT-GPT
build, n/a for a build that does not draw, and the shipped judges on hand-drawn shapes pictures."""
import json

import numpy as np
import pytest

from nxc.shapes.data import COLOURS, SHAPES, _shape_mask
from nxc.shapes.eval_generation import (NOT_DRAWING, Judges, evaluate_generation, existence_question, for_judging,
                                        make_requests)
from nxc.shapes.generator_data import caption_of


@pytest.fixture(scope="module")
def judges(embedded_build, retrieval_build):
    return Judges.load(embedded_build, retrieval_build)


def test_requests_are_seeded_and_well_formed():
    a, b = make_requests(7, 40), make_requests(7, 40)
    assert a == b and a != make_requests(8, 40)
    assert {len(r.objects) for r in a} == {1, 2, 3}
    for r in a:
        assert len(set(r.objects)) == len(r.objects)
        assert all(c in COLOURS and s in SHAPES for c, s in r.objects + r.near_misses)
        assert r.text == f"Draw {caption_of(list(r.objects))}." and r.text.startswith("Draw a ")
        assert len(set(r.near_misses)) == len(r.near_misses) and not set(r.near_misses) & set(r.objects)
        assert all(any(c == oc or s == os_ for oc, os_ in r.objects) for c, s in r.near_misses)
    one = next(r for r in a if len(r.objects) == 1)
    (c, s), = one.objects
    assert len(one.near_misses) == 2 and {m[1] == s for m in one.near_misses} == {True, False}
    assert existence_question("red", "circle") == "Is there a red circle in the image?"


def test_small_pictures_are_upscaled_for_the_judges():
    assert for_judging(np.zeros((16, 16, 3), np.uint8)).size == (64, 64)
    assert for_judging(np.zeros((64, 80, 3), np.uint8)).size == (80, 64)


def _picture(side, objects, seed=0):
    """A shapes picture drawn with nxc.shapes.data's shape masks and colours: a plain light background (slight
    noise, as the training scenes), objects [(colour, shape, cx, cy, r)] in fractions of the side."""
    rng = np.random.default_rng(seed)
    img = np.full((side, side, 3), 230, np.float32) + rng.normal(0, 4, (side, side, 3))
    for c, s, cx, cy, r in objects:
        img[_shape_mask(s, side, side, cx * side, cy * side, r * side)] = COLOURS[c]
    return np.clip(img, 0, 255).astype(np.uint8)


def test_the_judges_on_a_hand_drawn_red_circle(judges):
    """64 x 64 (the shapes generator's size; the judges' smallest training scenes). At 16 x 16, upscaled, the
    detector counts blur as objects and the judges are not reliable: the tiny random builds' scores mean nothing
    beyond "the task runs". Near misses in another colour, or a shape far from a circle, are answered no; the
    shipped NExT-Chat can take a large circle for a square (it does so from r = 0.2 of the side), so none is asked."""
    img = for_judging(_picture(64, [("red", "circle", 0.5, 0.5, 0.15)]))
    assert judges.present(img, "red", "circle")
    assert not judges.present(img, "blue", "circle") and not judges.present(img, "yellow", "circle")
    assert not judges.present(img, "red", "triangle") and not judges.present(img, "red", "star")
    assert judges.count(img) == 1
    two = for_judging(_picture(64, [("blue", "square", 0.3, 0.3, 0.15), ("green", "star", 0.7, 0.7, 0.17)]))
    assert judges.present(two, "blue", "square") and judges.present(two, "green", "star")
    assert not judges.present(two, "yellow", "square") and judges.count(two) == 2


def test_true_pictures_hold_exactly_the_requested_objects():
    """picture_of paints the request's objects and nothing else: every requested colour is there, no other."""
    from nxc.shapes.generator_data import picture_of
    rng = np.random.default_rng(0)
    for request in make_requests(5, 12):
        pic = picture_of(rng, list(request.objects), side=64)
        assert pic.shape == (64, 64, 3) and pic.dtype == np.uint8
        near = {c: (np.abs(pic.astype(int) - COLOURS[c]).max(-1) < 30).sum() for c in COLOURS}
        asked = {c for c, _ in request.objects}
        assert all(near[c] >= 20 for c in asked), (request, near)
        assert all(near[c] < 5 for c in COLOURS if c not in asked), (request, near)
    a, b = (picture_of(np.random.default_rng(3), [("red", "star")], side=32) for _ in range(2))
    assert np.array_equal(a, b)


def test_the_judges_ceiling_on_true_pictures(judges):
    """The judges on true pictures of the requests: near what they score on the scenes they were trained on (a
    picture of other objects would fail the recall bound; the judges' precision is their own limit)."""
    from nxc.shapes.eval_generation import judge_ceiling
    c = judge_ceiling(judges, seed=1234, n=24, side=64)
    assert set(c) == {"recall", "precision", "count_accuracy"}
    assert c["recall"] >= 0.85 and c["count_accuracy"] >= 0.9 and 0.6 <= c["precision"] <= 1.0, c


def test_a_build_that_does_not_draw_is_not_applicable(embedded_pipe):
    def no_judges():
        raise AssertionError("the judges are not loaded for a build that does not draw")
    assert evaluate_generation(embedded_pipe, judges_factory=no_judges, n=2) == {"n/a": NOT_DRAWING}


def test_the_tiny_random_nextgpt_build_end_to_end(nextgpt_build, judges):
    from nxc.runtime.pipeline import Pipeline
    m = evaluate_generation(Pipeline.load(nextgpt_build), judges, seed=3, n=3, steps=2, guidance=2.0,
                            progress=False)
    assert (m["meta"]["steps"], m["meta"]["guidance"]) == (2, 2.0)
    assert set(m) == {"recall", "precision", "count_accuracy", "seconds_per_picture", "drawn", "n", "pictures", "meta",
                      "ceiling_recall", "ceiling_precision", "ceiling_count_accuracy"}
    assert m["n"] == 3 and m["pictures"] >= 1
    for k in ("recall", "precision", "count_accuracy", "drawn", "ceiling_recall", "ceiling_precision",
              "ceiling_count_accuracy"):
        assert 0.0 <= m[k] <= 1.0 and np.isfinite(m[k]), k
    assert np.isfinite(m["seconds_per_picture"]) and m["seconds_per_picture"] > 0


def test_nxc_eval_cli_reports_n_a_for_a_build_that_does_not_draw(embedded_build, tmp_path, capsys):
    from nxc.shapes.evaluate import main
    out = tmp_path / "m.json"
    assert main([str(embedded_build), "--tasks", "generation", "--n-per-task", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["generation"] == {"n/a": NOT_DRAWING}
    assert f"generation (fp32): {NOT_DRAWING}" in capsys.readouterr().out


def test_the_table_shows_generation_side_by_side():
    from nxc.shapes.evaluate import format_table
    a = {"generation": {"recall": 0.5, "precision": 1.0, "count_accuracy": 0.25, "seconds_per_picture": 0.1, "n": 4}}
    b = {"generation": {"n/a": NOT_DRAWING}, "meta": {"target": "/x/text-only"}}
    table = format_table(a, b, names=["draws", "text-only"])
    assert "generation object recall" in table and "generation requests" in table
    row = next(line for line in table.splitlines() if line.startswith("generation requests"))
    assert row.split()[-2:] == ["4", "-"]
    assert table.splitlines()[-1] == f"generation (text-only): {NOT_DRAWING}"
