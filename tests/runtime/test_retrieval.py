"""The retrieval family (ChatRex-style, issue 19): the shipped retrieval model exported and run by the torch-free
runtime, against its PyTorch reference (nxc.model.retrieval.RetrievalReferenceChat)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nxc import names
from nxc.shapes.data import make_scene
from nxc.shapes.retrieval_tasks import CAPTION_TEMPLATES, REC_TEMPLATES


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(42)
    out = []
    for _ in range(3):
        sc = make_scene(rng)
        o = sc.objects[0]
        out += [(sc, REC_TEMPLATES[0].replace("<expr>", f"the {o.phrase}"), None),
                (sc, CAPTION_TEMPLATES[0], None),
                (sc, f"Is there a {o.phrase} in the image?", None),
                (sc, "What is region [0]?", [o.box])]
    return out


@pytest.fixture(scope="module")
def answers(retrieval_ref, retrieval_pipe, prompts):
    return [(retrieval_ref.chat(sc.image, q, boxes=b, max_new_tokens=48),
             retrieval_pipe.chat(sc.image, q, boxes=b, max_new_tokens=48)) for sc, q, b in prompts]


def same(ref, got, what: str) -> None:
    assert got.prompt_ids == ref.prompt_ids, f"{what}: prompt ids"
    assert got.token_ids == ref.token_ids, f"{what}: greedy ids {got.token_ids} != {ref.token_ids}"
    assert got.text == ref.text and got.finish_reason == ref.finish_reason, what
    assert len(got.detections) == len(ref.detections), what
    for a, b in zip(ref.detections, got.detections):
        np.testing.assert_allclose(b.box, a.box, atol=1e-3, err_msg=what)
        assert b.phrase == a.phrase and b.mask is None, what


def test_the_build_has_the_family_graphs_an_index_head_and_passed_its_parity_check(retrieval_build):
    from nxc.manifest import load_manifest
    m = load_manifest(retrieval_build)
    assert set(m.graphs) == set(names.RETRIEVAL_GRAPHS) and m.sam is None and m.objects.size == 128
    (head,) = m.heads
    assert (head.kind, head.trigger, head.feedback, head.emit, head.graph) == (
        "index", None, None, "<objfeat>", names.GRAPH_OBJECT_FEATURES)
    assert head.inputs["features"] == "proposals:features"
    parity = json.loads((retrieval_build / "reports" / "parity.json").read_text())
    assert {names.GRAPH_PROPOSALS, names.GRAPH_OBJECT_FEATURES, names.GRAPH_VISION} <= set(parity)
    assert all(parity[g]["ok"] for g in parity)


def test_runtime_answers_equal_the_reference(answers, prompts):
    for (ref, got), (_, q, _) in zip(answers, prompts):
        same(ref, got, q)
    grounded = [got for (_, got), (_, q, _) in zip(answers, prompts) if "object indexes" in q]
    assert sum(bool(g.detections) for g in grounded) >= len(grounded) - 1, "the trained model grounds its answers"


def test_proposals_equal_the_reference(retrieval_ref, retrieval_pipe, prompts):
    for sc, _, _ in prompts[::4]:
        want, want_scores = retrieval_ref.proposals(sc.image)
        got, got_scores, _ = retrieval_pipe.conversation(sc.image).state("index").objects()
        np.testing.assert_allclose(got, want, atol=1e-4)
        np.testing.assert_allclose(got_scores, want_scores, atol=1e-4)
        assert len(got) >= 1


def test_a_box_is_streamed_when_objects_closes_with_its_phrase(retrieval_pipe, prompts):
    from nxc.runtime.pipeline import Box, Done, Token
    sc, q, _ = prompts[0]
    events = list(retrieval_pipe.conversation(sc.image).stream(q, max_new_tokens=48))
    tokens = [e for e in events if isinstance(e, Token)]
    closes = retrieval_pipe.manifest.token_id("</objects>")
    for k, e in enumerate(events):
        if isinstance(e, Box):
            assert isinstance(events[k - 1], Token) and events[k - 1].id == closes
            assert e.detection.phrase.startswith("a ") and e.detection.mask is None, e.detection.phrase
    done = events[-1]
    assert isinstance(done, Done) and tokens and any(isinstance(e, Box) for e in events)


def test_a_region_box_joins_the_object_list_after_the_proposals(retrieval_pipe, prompts):
    sc, q, boxes = prompts[3]
    conv = retrieval_pipe.conversation(sc.image)
    r = conv.ask(q, boxes=boxes, max_new_tokens=24)
    n = len(conv.state("index").objects()[0])
    feat = retrieval_pipe.manifest.token_id("<objfeat>")
    assert r.prompt_ids.count(feat) == n + 1
    assert r.prompt_ids.count(retrieval_pipe.manifest.token_id(f"<obj{n}>")) == 1
    assert r.text.startswith("It is a"), r.text


def test_a_follow_up_turn_equals_the_reference_given_the_history(retrieval_ref, retrieval_pipe, prompts):
    from nxc.prompt import Turn
    sc, q, _ = prompts[4]
    conv = retrieval_pipe.conversation(sc.image)
    first = conv.ask(q, max_new_tokens=48)
    follow = "What is region [0]?"
    got = conv.ask(follow, boxes=[sc.objects[-1].box], max_new_tokens=24)
    ref = retrieval_ref.chat(sc.image, follow, boxes=[sc.objects[-1].box], max_new_tokens=24,
                             history=[Turn(q, first.raw_text)])
    same(ref, got, "follow-up")


# ---- the index head's one-line behaviours, through a real conversation's watcher ------------------------------
def watch_tokens(pipe, image, text: str) -> tuple[list, object]:
    """Feed the reply `text` (tags and indices as tokens) to the index head's watcher of a conversation on
    `image`: -> (detections, watcher)."""
    from nxc.runtime.turn import Reply
    conv = pipe.conversation(image)
    conv._format()                                # the object list: proposals first
    head = pipe.dispatch.head_of_kind("index")
    watch = head.kind.watch(conv, Reply())
    ids = pipe.tokenizer.encode(text)[1:]
    found = [d for t in ids for d in watch.feed(t)]
    return found, watch


def test_index_head_maps_an_index_to_its_proposal(retrieval_pipe, prompts):
    sc = prompts[0][0]
    boxes = retrieval_pipe.conversation(sc.image).state("index").objects()[0]
    (d,), _ = watch_tokens(retrieval_pipe, sc.image, "<ground>a thing</ground><objects><obj0></objects>")
    np.testing.assert_allclose(d.box_norm, boxes[0]) and d.phrase == "a thing"


def test_index_head_drops_an_index_past_the_object_list(retrieval_pipe, prompts):
    sc = prompts[0][0]
    n = len(retrieval_pipe.conversation(sc.image).state("index").objects()[0])
    found, watch = watch_tokens(retrieval_pipe, sc.image, f"<ground>a thing</ground><objects><obj{n}></objects>")
    assert found == [] and watch.groundings[0].dropped == [n]


def test_index_head_gives_nothing_for_an_unclosed_grounding(retrieval_pipe, prompts):
    found, watch = watch_tokens(retrieval_pipe, prompts[0][0].image, "<ground>a thing</ground><objects><obj0>")
    assert found == [] and watch.groundings == []


def test_an_index_typed_by_the_user_stays_text(retrieval_pipe, prompts):
    sc = prompts[0][0]
    conv = retrieval_pipe.conversation(sc.image)
    r = conv.ask("What is <obj0> and <ground>x</ground>?", max_new_tokens=4)
    obj0 = retrieval_pipe.manifest.token_id("<obj0>")
    assert r.prompt_ids.count(obj0) == 1, "only the object list's <obj0> is a token"
    assert retrieval_pipe.manifest.token_id("<ground>") not in r.prompt_ids


def test_an_image_without_proposals_lists_no_objects_and_drops_every_index(retrieval_pipe):
    blank = Image.fromarray(np.full((80, 120, 3), 230, np.uint8))
    conv = retrieval_pipe.conversation(blank)
    assert len(conv.state("index").objects()[0]) == 0
    r = conv.ask(REC_TEMPLATES[0].replace("<expr>", "the red circle"), max_new_tokens=24)
    assert r.prompt_ids.count(retrieval_pipe.manifest.token_id("<objfeat>")) == 0 and r.detections == []
    found, watch = watch_tokens(retrieval_pipe, blank, "<ground>a thing</ground><objects><obj0></objects>")
    assert found == [] and watch.groundings[0].dropped == [0]


def test_runtime_runs_the_retrieval_build_without_torch(retrieval_build):
    code = f"""
import sys
for mod in ("torch", "transformers", "onnx", "torchvision", "sentencepiece", "segment_anything"):
    sys.modules[mod] = None
from nxc.runtime.pipeline import Pipeline
from nxc.shapes.data import make_scene
import numpy as np
sc = make_scene(np.random.default_rng(3))
r = Pipeline.load({str(retrieval_build)!r}).chat(sc.image, "Please detect the {{}} in this image. Answer the question with object indexes.".format(sc.objects[0].phrase), max_new_tokens=24)
assert r.detections, r
print("ok", r.text)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")


def test_nxc_run_answers_with_boxes_on_a_retrieval_build(retrieval_build, tmp_path, capsys):
    from nxc.runtime.cli import main
    sc = make_scene(np.random.default_rng(8))
    img = tmp_path / "scene.png"
    sc.image.save(img)
    q = REC_TEMPLATES[0].replace("<expr>", f"the {sc.objects[0].phrase}")
    assert main([str(retrieval_build), "--image", str(img), "--prompt", q, "--out", str(tmp_path / "out.png")]) == 0
    out = capsys.readouterr().out
    assert sc.objects[0].phrase in out and (tmp_path / "out.png").is_file()


def test_an_index_can_name_this_turns_region_box(retrieval_pipe, prompts):
    """A region box joins the object list after the proposals; a reply naming its index gets that box (the
    watcher reads the object list of the turn being answered, as the reference's)."""
    from nxc.runtime.turn import Reply
    sc, q, boxes = prompts[3]
    conv = retrieval_pipe.conversation(sc.image)
    ids, region, _ = conv._prompt(q, boxes)
    conv._prefill_rows(ids, region)
    n = len(conv.state("index").objects()[0])
    watch = retrieval_pipe.dispatch.head_of_kind("index").kind.watch(conv, Reply())
    text = f"<ground>a thing</ground><objects><obj{n}></objects>"
    (d,) = [d for t in retrieval_pipe.tokenizer.encode(text)[1:] for d in watch.feed(t)]
    np.testing.assert_allclose(d.box, boxes[0], atol=0.5)


def test_nxc_profile_and_nxc_demo_run_a_retrieval_build(retrieval_build, tmp_path, capsys):
    from nxc.demo import main as demo
    from nxc.profile.cli import main as profile
    assert profile([str(retrieval_build), "--runs", "1", "--warmup", "0", "--max-new-tokens", "8",
                    "--json", str(tmp_path / "p.json")]) == 0
    report = json.loads((tmp_path / "p.json").read_text())
    stages = report["builds"][0]["stages"]
    assert stages["proposals"]["median_ms"] > 0 and stages["sam_encoder"]["median_ms"] == 0
    assert demo(["--build", str(retrieval_build), "--out", str(tmp_path / "demo.png")]) == 0
    out = capsys.readouterr().out
    assert "proposals:" in out and "IoU with the drawn" in out and (tmp_path / "demo.png").is_file()
