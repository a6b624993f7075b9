"""nxc-serve on a retrieval build (issue 19): the same API, its grounding list from the boxes the reply names by
index (no masks), streamed text equal to the final one, against Pipeline.chat on the same build."""
import httpx
import numpy as np
import pytest
from serve_helpers import LiveServer
from test_api import join_stream, sse, user

from nxc.shapes.data import make_scene
from nxc.shapes.retrieval_tasks import CAPTION_TEMPLATES, REC_TEMPLATES


@pytest.fixture(scope="module")
def client(retrieval_build, retrieval_pipe):
    from nxc.serve.app import create_app
    with LiveServer(create_app(retrieval_build, pipeline=retrieval_pipe)) as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            yield c


def cases():
    rng = np.random.default_rng(11)
    out = []
    for _ in range(2):
        sc = make_scene(rng)
        out += [(sc.image, REC_TEMPLATES[0].replace("<expr>", f"the {sc.objects[-1].phrase}"), None),
                (sc.image, CAPTION_TEMPLATES[0], None),
                (sc.image, "What is region [0]?", [list(map(float, sc.objects[0].box))])]
    return out


def same(ids, text, grounding, r):
    assert ids == r.token_ids and text == r.text
    assert len(grounding) == len(r.detections)
    for k, (g, d) in enumerate(zip(grounding, r.detections)):
        assert g["index"] == k and g["phrase"] == d.phrase and g["mask"] is None
        np.testing.assert_allclose(g["box"], d.box, atol=1e-3)


@pytest.mark.parametrize("image,question,boxes", cases())
def test_completion_equals_pipeline(client, retrieval_pipe, image, question, boxes):
    r = retrieval_pipe.chat(image, question, boxes=boxes)
    resp = client.post("/v1/chat/completions", json={"messages": [user(question, image, boxes=boxes)]})
    assert resp.status_code == 200, resp.text
    ch = resp.json()["choices"][0]
    same(ch["token_ids"], ch["message"]["content"], ch["message"]["grounding"], r)


@pytest.mark.parametrize("image,question,boxes", cases()[:2])
def test_streamed_text_and_boxes_equal_pipeline(client, retrieval_pipe, image, question, boxes):
    r = retrieval_pipe.chat(image, question, boxes=boxes)
    ids, text, final, early, _ = join_stream(sse(client, {"messages": [user(question, image)], "boxes": boxes}))
    same(ids, text, final, r)
    assert len(early) == len(r.detections) >= 1, "each box is streamed when its </objects> closes"
    assert "<ground>" not in text and "<obj" not in text


def test_earlier_turns_are_refused_in_one_line_not_guessed(client):
    image, question, _ = cases()[0]
    resp = client.post("/v1/chat/completions", json={"messages": [
        user(question, image), {"role": "assistant", "content": "It is a red circle."},
        {"role": "user", "content": "What else?"}]})
    assert resp.status_code == 400, resp.text
    assert "answers one turn per request" in resp.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200
