import numpy as np
import pytest

from nxc.prompt import SLOT
from nxc.shapes import data as D


def _samples(seed, n=40):
    return D.make_samples(seed, n)


def test_boxes_are_the_bounding_boxes_of_the_masks():
    rng = np.random.default_rng(0)
    for _ in range(60):
        scene = D.make_scene(rng)
        assert 1 <= len(scene.objects) <= 4
        assert len({(o.colour, o.shape) for o in scene.objects}) == len(scene.objects)
        union = np.zeros(scene.image.size[::-1], bool)
        for o in scene.objects:
            assert o.mask.shape == (scene.image.height, scene.image.width) and o.mask.any()
            ys, xs = np.nonzero(o.mask)
            assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert not (union & o.mask).any()   # visible masks never overlap
            union |= o.mask
            # the pixels under the mask are the object's colour
            px = np.asarray(scene.image)[o.mask].astype(float).mean(0)
            assert np.abs(px - D.COLOURS[o.colour]).max() < 25


def test_scenes_vary_in_size_aspect_count_and_overlap():
    rng = np.random.default_rng(1)
    scenes = [D.make_scene(rng) for _ in range(150)]
    sizes = {s.image.size for s in scenes}
    assert len(sizes) > 100
    assert any(w > 1.4 * h for w, h in sizes) and any(h > 1.4 * w for w, h in sizes)
    assert {len(s.objects) for s in scenes} == {1, 2, 3, 4}
    overlapping = 0
    for s in scenes:
        boxes = [o.box for o in s.objects]
        overlapping += any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert overlapping >= 10


def _overlap(a, b):
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def test_reproducible():
    a, b = _samples(5, 10), _samples(5, 10)
    for x, y in zip(a, b):
        assert x.question == y.question and x.answer == y.answer and x.boxes_in == y.boxes_in
        assert x.image.tobytes() == y.image.tobytes()
    c = _samples(6, 10)
    assert any(x.image.tobytes() != z.image.tobytes() for x, z in zip(a, c))


def test_tasks_use_the_template_set():
    samples = _samples(2, 60)
    by_task = {t: [s for s in samples if s.task == t] for t in D.TASKS}
    for s in by_task["rec"]:
        expr = f"the {s.target.phrase}"
        assert s.question in [t.replace("<expr>", expr) for t in D.REC_TEMPLATES]
        assert s.answer == D.REC_ANSWER and s.answer_objects == [s.target]
    for s in by_task["caption"]:
        assert s.question in D.CAPTION_TEMPLATES
        assert s.answer.count(SLOT) == len(s.answer_objects) >= 1
        xs = [o.box[0] + o.box[2] for o in s.answer_objects]
        assert xs == sorted(xs)
        assert D.phrases_in(s.answer) == [(o.colour, o.shape) for o in s.answer_objects]
    for s in by_task["region"]:
        assert s.question in D.REGION_TEMPLATES and s.boxes_in == [s.target.box]
        assert s.answer == f"It is a {s.target.phrase}."
    pope = by_task["pope"]
    assert all(s.answer == ("Yes" if s.present else "No") for s in pope)
    assert 0.3 < np.mean([s.present for s in pope]) < 0.7


def test_pope_absent_objects_are_absent():
    rng = np.random.default_rng(3)
    for _ in range(100):
        scene = D.make_scene(rng)
        s = D.make_sample(rng, "pope", scene)
        present = (s.target.colour, s.target.shape) in {(o.colour, o.shape) for o in scene.objects}
        assert present == s.present


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="unknown task 'vqa'"):
        D.make_sample(np.random.default_rng(0), "vqa")
