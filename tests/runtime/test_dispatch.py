"""Dispatch is data: a head kind added through the manifest (and the kind registry) runs in the unchanged decode
loop; an unknown kind is refused at load; the KV cache is bound in place and never copied."""
import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nxc import names
from nxc.manifest import BuildError
from nxc.runtime import dispatch
from nxc.runtime.pipeline import Box, Pipeline
from nxc.shapes.data import make_scene


class Centre(dispatch.HeadKind):
    """A second kind: the same loc_heads graph read as the centre point of the box, no finish stage."""

    def record(self, conv, outputs, text_before):
        det = dispatch.BoxKind.record(self, conv, outputs, text_before)
        x1, y1, x2, y2 = det.box
        return ("centre", (x1 + x2) / 2, (y1 + y2) / 2, det.box_norm)

    def event(self, index, record):
        return ("point", index, record)

    def slot_value(self, record):
        return record[3]


def with_heads(build, tmp_path, heads):
    dst = tmp_path / "build"
    shutil.copytree(build, dst)
    path = dst / "manifest.json"
    data = json.loads(path.read_text())
    data["heads"] = heads
    path.write_text(json.dumps(data))
    return dst


def box_head(build) -> dict:
    return json.loads((build / "manifest.json").read_text())["heads"][0]


def test_a_second_head_kind_through_the_manifest_alone(embedded_build, embedded_pipe, tmp_path, monkeypatch):
    monkeypatch.setitem(dispatch.KINDS, "centre", Centre)
    head = {**box_head(embedded_build), "kind": "centre", "collect": ["box"], "finish": None}
    pipe = Pipeline.load(with_heads(embedded_build, tmp_path, [head]))
    scene = make_scene(np.random.default_rng(3), max_objects=3)
    q = "Can you describe the image and include object locations?"
    want = embedded_pipe.chat(scene.image, q)
    events = list(pipe.stream(scene.image, q))
    got = events[-1].result
    assert want.detections and got.token_ids == want.token_ids
    assert [e for e in events if isinstance(e, tuple)] == [("point", k, r) for k, r in enumerate(got.detections)]
    assert not any(isinstance(e, Box) for e in events)
    for (kind, cx, cy, _), d in zip(got.detections, want.detections):
        assert kind == "centre"
        np.testing.assert_allclose([cx, cy], [(d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2], atol=1e-3)
    assert names.GRAPH_SAM_ENCODER not in pipe._runners          # no finish stage: SAM never ran


CENTRE_MODULE = """
from nxc.runtime.heads import HeadKind, register
from nxc.runtime.heads.box import BoxKind


@register("centre_point")
class CentrePoint(HeadKind):
    def record(self, conv, outputs, text_before):
        det = BoxKind.record(self, conv, outputs, text_before)
        return ((det.box[0] + det.box[2]) / 2, (det.box[1] + det.box[3]) / 2, det.box_norm)

    def event(self, index, record):
        return ("point", index, record[:2])

    def slot_value(self, record):
        return record[2]
"""


def test_a_kind_is_one_new_module_of_nxc_runtime_heads(embedded_build, embedded_pipe, tmp_path, monkeypatch):
    """A build naming kind "centre_point" loads the module nxc.runtime.heads.centre_point the first time: nothing
    else (no registry edit, no import in dispatch or Conversation) is needed to add a kind."""
    import sys
    from nxc.runtime import heads
    (tmp_path / "centre_point.py").write_text(CENTRE_MODULE)
    monkeypatch.setattr(heads, "__path__", [*heads.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "nxc.runtime.heads.centre_point", raising=False)
    monkeypatch.delitem(heads.KINDS, "centre_point", raising=False)
    head = {**box_head(embedded_build), "kind": "centre_point", "collect": ["box"], "finish": None}
    pipe = Pipeline.load(with_heads(embedded_build, tmp_path, [head]))
    try:
        scene = make_scene(np.random.default_rng(3), max_objects=3)
        q = "Can you describe the image and include object locations?"
        want = embedded_pipe.chat(scene.image, q)
        got = list(pipe.stream(scene.image, q))
        points = [e for e in got if isinstance(e, tuple)]
        assert want.detections and got[-1].result.token_ids == want.token_ids
        assert len(points) == len(want.detections)
        for (_, _, (cx, cy)), d in zip(points, want.detections):
            np.testing.assert_allclose([cx, cy], [(d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2], atol=1e-3)
    finally:
        heads.KINDS.pop("centre_point", None)
        sys.modules.pop("nxc.runtime.heads.centre_point", None)


def test_conversation_and_dispatch_name_no_family():
    """Family-specific names live in their kind's module (nxc.runtime.heads.<kind>), not in the conversation, the
    dispatch or the pipeline."""
    import ast
    import inspect
    from nxc.runtime import conversation, dispatch as d, pipeline
    for mod in (conversation, d, pipeline):
        tree = ast.parse(inspect.getsource(mod))
        for node in ast.walk(tree):               # docstrings may give examples; the code may not
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                body[0] = ast.Pass()
        tree.body = [n for n in tree.body
                     if not (isinstance(n, ast.ImportFrom) and n.module.startswith("nxc.runtime.heads"))]
        code = ast.unparse(tree)
        for word in ("sam_", "SAM", "proposals", "objects", "index_head", "'index'", "'box'", "BoxKind", "IndexKind"):
            assert word not in code, f"{mod.__name__} names {word!r}"


def test_an_unknown_head_kind_is_refused_at_load(embedded_build, tmp_path):
    head = {**box_head(embedded_build), "kind": "vitron_call"}
    with pytest.raises(BuildError, match=r"heads\[0\]\.kind 'vitron_call' is not a kind this runtime knows \(box"):
        Pipeline.load(with_heads(embedded_build, tmp_path, [head]))


def test_decode_writes_the_cache_in_place(embedded_pipe):
    """The llm's present rows land in the cache buffers by address: the buffers never move and past rows stay."""
    cache = embedded_pipe.new_cache(capacity=64)
    bases = {n: cache.address(n, 0) for n, _ in cache.pairs}
    h = embedded_pipe.config.llm.hidden_size
    rng = np.random.default_rng(0)
    embedded_pipe.llm_step(rng.standard_normal((1, 5, h)).astype(np.float32), cache)
    first = {n: a.copy() for n, a in cache.arrays().items()}
    assert cache.length == 5 and all(np.abs(a).sum() > 0 for a in first.values())
    embedded_pipe.llm_step(rng.standard_normal((1, 1, h)).astype(np.float32), cache)
    assert cache.length == 6 and {n: cache.address(n, 0) for n, _ in cache.pairs} == bases
    for n, a in cache.arrays().items():
        np.testing.assert_array_equal(a[:, :5], first[n])
        assert np.abs(a[:, 5]).sum() > 0


def test_cache_steps_equal_one_prefill(embedded_pipe):
    """Feeding 6 rows at once or 5 + 1 through the in-place cache gives the same logits and cache rows."""
    h = embedded_pipe.config.llm.hidden_size
    x = np.random.default_rng(1).standard_normal((1, 6, h)).astype(np.float32)
    a, b = embedded_pipe.new_cache(capacity=16), embedded_pipe.new_cache(capacity=16)
    la, _ = embedded_pipe.llm_step(x, a)
    embedded_pipe.llm_step(x[:, :5], b)
    lb, _ = embedded_pipe.llm_step(x[:, 5:], b)
    np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-4)
    for n, arr in a.arrays().items():
        np.testing.assert_allclose(arr, b.arrays()[n], rtol=1e-4, atol=1e-5)


# ---- sampling can never break the dispatch invariant (security review, issue 2) ------------------------------------

def adversarial_pipe(embedded_pipe):
    """A pipeline whose decode steps (not the prefills) return `adversary["logits"](real logits)` when it is set."""
    pipe = Pipeline(manifest=embedded_pipe.manifest, tokenizer=embedded_pipe.tokenizer, backend=embedded_pipe.backend)
    real, adversary = pipe.llm_step, {}

    def llm_step(embeds, cache):
        logits, hidden = real(embeds, cache)
        if embeds.shape[1] == 1 and adversary.get("logits"):
            logits = adversary["logits"](logits)
        return logits, hidden
    pipe.llm_step = llm_step
    return pipe, adversary


@pytest.fixture(scope="module")
def adversarial(embedded_pipe):
    return adversarial_pipe(embedded_pipe)


@settings(max_examples=40, deadline=None, database=None)
@given(seed=st.integers(0, 2**31), boost=st.floats(0, 60), scale=st.sampled_from([1.0, 10.0]),
       temperature=st.sampled_from([0.0, 0.7, 4.0, 100.0]), top_k=st.sampled_from([0, 1, 5]),
       top_p=st.sampled_from([1.0, 0.5]), max_new=st.integers(1, 24))
def test_no_sampled_sequence_breaks_dispatch_or_later_turns(adversarial, seed, boost, scale, temperature, top_k,
                                                          top_p, max_new):
    """Random logits, with the tokens only a head emits (<boxes>), the image span's and the trigger pushed up by
    `boost`, through the runtime's decode loop and pick: no error, every slot right after its trigger, one detection
    per trigger, and the next turn of the same conversation still runs."""
    pipe, adversary = adversarial
    tok = pipe.tokens
    at, slot = tok[names.AT], tok[names.BOXES]
    image_ids = {tok[names.IM_START], tok[names.IM_PATCH], tok[names.IM_END]}
    rng = np.random.default_rng(seed)

    def logits(real):
        lg = rng.standard_normal(real.shape).astype(np.float32) * scale
        lg[[*pipe.dispatch.never_sampled, at]] += boost
        return lg
    conv = pipe.conversation(make_scene(np.random.default_rng(seed % 97), max_objects=3).image)
    adversary["logits"] = logits
    try:
        r = conv.ask("Can you describe the image and include object locations?", max_new_tokens=max_new,
                     temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    finally:
        adversary.clear()
    ids = r.token_ids
    assert not image_ids & set(ids)
    for i, t in enumerate(ids):
        assert (t == slot) == (i > 0 and ids[i - 1] == at), (i, ids)
    assert ids.count(at) == ids.count(slot) == len(r.detections)
    follow = conv.ask("Where is the red circle in the image?", max_new_tokens=4)
    assert follow.prompt_ids.count(slot) == len(r.detections)
