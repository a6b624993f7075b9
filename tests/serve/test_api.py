"""nxc-serve over HTTP against Pipeline.chat on the same build: ids, text, boxes, masks (RLE), streaming, region
input, multi-turn, concurrency, and the 4xx errors after which the server keeps serving."""
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from nxc.serve import rle
from nxc.shapes.data import make_sample, make_scene
from serve_helpers import data_uri, free_port, start_nxc_serve


def iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def user(text, image=None, **extra):
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_uri(image)}})
    return {"role": "user", "content": content, **extra}


def assert_matches(choice_ids, text, grounding, r, what=""):
    """An API answer equals the runtime's ChatResult r."""
    assert choice_ids == r.token_ids, f"{what}: {text!r} vs {r.text!r}"
    assert text == r.text
    assert len(grounding) == len(r.detections)
    for k, (g, d) in enumerate(zip(grounding, r.detections)):
        assert g["index"] == k and g["phrase"] == d.phrase
        np.testing.assert_allclose(g["box_norm"], d.box_norm, atol=1e-5, err_msg=what)
        np.testing.assert_allclose(g["box"], d.box, atol=1e-3, err_msg=what)
        assert abs(g["score"] - d.score) < 1e-3
        mask = rle.decode(g["mask"])
        assert mask.shape == d.mask.shape and iou(mask, d.mask) >= 0.99, what


def sse(client, body):
    """POST a streamed request; -> list of JSON chunks (the [DONE] sentinel checked and dropped)."""
    events = []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def join_stream(chunks):
    """Streamed chunks -> (ids, text, final grounding, per-chunk box grounding, the ids seen when boxes came)."""
    ids, text, early, at = [], "", [], []
    final = None
    for c in chunks:
        ch = c["choices"][0]
        ids += ch["token_ids"]
        text += ch["delta"].get("content", "")
        if ch["finish_reason"]:
            final = ch["delta"]["grounding"]
        elif ch["delta"].get("grounding"):
            early += ch["delta"]["grounding"]
            at.append(list(ids))
    return ids, text, final, early, at


def cases(n=2, seed=5):
    rng = np.random.default_rng(seed)
    out = []
    for task in ("rec", "caption", "region", "pope"):
        for _ in range(n):
            s = make_sample(rng, task, make_scene(rng))
            out.append((task, s.image, s.question, [list(map(float, b)) for b in s.boxes_in] or None))
    return out


CASES = cases()


@pytest.mark.parametrize("task,image,question,boxes", CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
def test_chat_completion_equals_pipeline(client, embedded_pipe, task, image, question, boxes):
    r = embedded_pipe.chat(image, question, boxes=boxes)
    resp = client.post("/v1/chat/completions", json={"model": client.get("/v1/models").json()["data"][0]["id"],
                                                     "messages": [user(question, image, boxes=boxes)]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    ch = body["choices"][0]
    assert body["object"] == "chat.completion" and ch["finish_reason"] == r.finish_reason
    assert_matches(ch["token_ids"], ch["message"]["content"], ch["message"]["grounding"], r, question)
    assert body["usage"] == {"prompt_tokens": len(r.prompt_ids), "completion_tokens": len(r.token_ids),
                             "total_tokens": len(r.prompt_ids) + len(r.token_ids)}


@pytest.mark.parametrize("task,image,question,boxes", CASES[::2], ids=[f"{c[0]}{i}" for i, c in enumerate(CASES[::2])])
def test_streamed_chat_equals_pipeline(client, embedded_pipe, task, image, question, boxes):
    r = embedded_pipe.chat(image, question, boxes=boxes)
    chunks = sse(client, {"messages": [user(question, image)], "boxes": boxes})
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    ids, text, final, early, at = join_stream(chunks)
    assert_matches(ids, text, final, r, question)
    # each box arrives in the chunk of its <boxes> token (mask not yet), before the reply ends
    slot = embedded_pipe.tokens["<boxes>"]
    assert len(early) == len(r.detections)
    for k, (g, seen) in enumerate(zip(early, at)):
        assert g["index"] == k and g["mask"] is None and seen[-1] == slot and seen.count(slot) == k + 1
        np.testing.assert_allclose(g["box_norm"], r.detections[k].box_norm, atol=1e-5)


def test_grounded_reply_streams_box_before_the_end(client, embedded_pipe):
    scene = make_scene(np.random.default_rng(7), max_objects=3)
    q = "Can you describe the image and include object locations?"
    chunks = sse(client, {"messages": [user(q, scene.image)], "stream_options": {"include_usage": True}})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    ids, text, final, early, _ = join_stream(chunks[:-1])
    r = embedded_pipe.chat(scene.image, q)
    assert r.detections and len(early) == len(r.detections)
    assert_matches(ids, text, final, r, q)
    first_box = next(i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["delta"].get("grounding"))
    assert first_box < len(chunks) - 3            # boxes come while the reply is still streaming


def test_multi_turn_equals_conversation(client, embedded_pipe):
    rng = np.random.default_rng(21)
    scene = make_scene(rng, max_objects=3)
    box = [float(v) for v in scene.objects[-1].box]
    q1 = f"Where is the {scene.objects[0].phrase} in the image?"
    q2 = "What is the object in [0]?"
    q3 = "Can you describe the image and include object locations?"
    conv = embedded_pipe.conversation(scene.image)
    want = [conv.ask(q1), conv.ask(q2, boxes=[box]), conv.ask(q3)]
    messages = [user(q1, scene.image)]
    for i, (q, r) in enumerate(zip([q1, q2, q3], want)):
        if i:
            messages.append(user(q, boxes=[box]) if q == q2 else user(q))
        resp = client.post("/v1/chat/completions", json={"messages": messages})
        assert resp.status_code == 200, resp.text
        ch = resp.json()["choices"][0]
        assert_matches(ch["token_ids"], ch["message"]["content"], ch["message"]["grounding"], r, f"turn {i + 1}")
        messages.append(ch["message"])            # sent back as returned: content + grounding


def test_ground_endpoint_equals_pipeline(client, embedded_pipe):
    scene = make_scene(np.random.default_rng(3))
    q = f"Where is the {scene.objects[0].phrase} in the image?"
    body = client.post("/v1/ground", json={"image": data_uri(scene.image).split(",", 1)[1], "prompt": q}).json()
    r = embedded_pipe.chat(scene.image, q)
    assert_matches(body["token_ids"], body["text"], body["grounding"], r, q)
    assert body["raw_text"] == r.raw_text and body["finish_reason"] == r.finish_reason


def test_rle_decodes_to_the_runtime_masks_and_reads_in_pycocotools(client, embedded_pipe):
    mask_api = pytest.importorskip("pycocotools.mask", reason="pycocotools (dev extra) cross-checks the RLE")
    scene = make_scene(np.random.default_rng(9), max_objects=3)
    q = "Can you describe the image and include object locations?"
    g = client.post("/v1/ground", json={"image": data_uri(scene.image), "prompt": q}).json()["grounding"]
    r = embedded_pipe.chat(scene.image, q)
    assert g and any(d.mask.any() for d in r.detections)
    for det, d in zip(g, r.detections):
        ours = rle.decode(det["mask"])
        theirs = mask_api.decode({"size": det["mask"]["size"], "counts": det["mask"]["counts"].encode()})
        np.testing.assert_array_equal(ours, theirs.astype(bool))
        assert iou(ours, d.mask) >= 0.99


def test_rle_round_trip_and_pycocotools_agree():
    mask_api = pytest.importorskip("pycocotools.mask", reason="pycocotools (dev extra) cross-checks the RLE")
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = rng.integers(1, 70, 2)
        m = rng.random((h, w)) < rng.random()
        ours = rle.encode(m)
        theirs = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
        assert ours["counts"] == theirs["counts"].decode() and ours["size"] == list(theirs["size"])
        np.testing.assert_array_equal(rle.decode(ours), m)
    with pytest.raises(rle.RleError, match="cover"):
        rle.decode({"size": [4, 4], "counts": [3, 2]})


def test_32_concurrent_streams_are_all_correct(live, embedded_pipe):
    import httpx
    work = [CASES[i % len(CASES)] for i in range(32)]

    def one(i):
        task, image, question, boxes = work[i]
        with httpx.Client(base_url=live.url, timeout=300) as c:
            return join_stream(sse(c, {"messages": [user(question, image)], "boxes": boxes, "max_tokens": 64}))

    r64 = {i: embedded_pipe.chat(work[i][1], work[i][2], boxes=work[i][3], max_new_tokens=64) for i in range(len(CASES))}
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, range(32)))
    for i, (ids, text, final, _, _) in enumerate(got):
        assert_matches(ids, text, final, r64[i % len(CASES)], f"stream {i}")


def big_png(w, h) -> str:
    return data_uri(Image.new("RGB", (w, h), (40, 90, 200)))


@pytest.mark.parametrize("name,send,status,message", [
    ("malformed JSON", lambda s: {"content": b'{"messages": [}'}, 400, "not valid JSON"),
    ("not an object", lambda s: {"json": [1, 2]}, 400, "must be a JSON object"),
    ("bad base64", lambda s: {"json": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}},
     400, "not valid base64"),
    ("not an image", lambda s: {"json": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]}},
     400, "not an image"),
    ("huge image", lambda s: {"json": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": big_png(1200, 1000)}}]}]}},
     413, "over this server's limit of 1.0 M"),
    ("huge body", lambda s: {"content": b'{"messages": "' + b"x" * (3 << 20) + b'"}'}, 413, "over this server's limit"),
    ("unknown model", lambda s: {"json": {"model": "gpt-4o", "messages": [user("hi", s.image)]}}, 404,
     "'gpt-4o' does not exist here"),
    ("too-long prompt", lambda s: {"json": {"messages": [user("where is it " * 400, s.image)]}}, 400,
     "but the build's context is"),
    ("no image", lambda s: {"json": {"messages": [user("hi")]}}, 400, "needs one image content part"),
    ("web image", lambda s: {"json": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}]}},
     400, "does not fetch images"),
    ("local path", lambda s: {"json": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}},
     400, "local image paths are not allowed"),
    ("ends with assistant", lambda s: {"json": {"messages": [user("hi", s.image), {"role": "assistant", "content": "x"}]}},
     400, "last message must be the user's"),
    ("reversed box", lambda s: {"json": {"messages": [user("What is [0]?", s.image)], "boxes": [[50, 50, 10, 10]]}},
     400, "empty or reversed"),
    ("missing box", lambda s: {"json": {"messages": [user("What is [1]?", s.image)], "boxes": [[1, 1, 10, 10]]}},
     400, "refers to region 1"),
    ("bad max_tokens", lambda s: {"json": {"messages": [user("hi", s.image)], "max_tokens": 0}}, 400,
     "max_tokens must be at least 1"),
    ("n=17", lambda s: {"json": {"messages": [user("hi", s.image)], "n": 17}}, 400, "n must be at most 16"),
    ("n=2 streamed", lambda s: {"json": {"messages": [user("hi", s.image)], "n": 2, "stream": True}}, 400,
     "n > 1 is answered whole"),
    ("n with beams", lambda s: {"json": {"messages": [user("hi", s.image)], "n": 2, "num_beams": 2}}, 400,
     "do not combine"),
    ("beams sampled", lambda s: {"json": {"messages": [user("hi", s.image)], "num_beams": 2, "temperature": 0.5}},
     400, "leave temperature at 0"),
    ("penalty without beams", lambda s: {"json": {"messages": [user("hi", s.image)], "length_penalty": 2}}, 400,
     "set num_beams > 1"),
    ("bad early_stopping", lambda s: {"json": {"messages": [user("hi", s.image)], "num_beams": 2,
                                               "early_stopping": "soon"}}, 400, "early_stopping must be"),
    ("lost grounding", lambda s: {"json": {"messages": [user("hi", s.image), {"role": "assistant", "content": "at [0]"},
                                                        user("and?")]}}, 400, "send earlier assistant messages back"),
    ("stream too-long prompt", lambda s: {"json": {"messages": [user("where " * 600, s.image)], "stream": True}},
     400, "but the build's context is"),
])
def test_bad_requests_get_json_errors_and_the_server_keeps_serving(client, embedded_pipe, name, send, status, message):
    scene = make_scene(np.random.default_rng(1))
    resp = client.post("/v1/chat/completions", **send(scene))
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert message in err["message"] and "\n" not in err["message"] and err["type"] == "invalid_request_error"
    ok = client.post("/v1/chat/completions", json={"messages": [user("Describe the image.", scene.image)],
                                                   "max_tokens": 8})
    assert ok.status_code == 200 and ok.json()["choices"][0]["token_ids"] == \
        embedded_pipe.chat(scene.image, "Describe the image.", max_new_tokens=8).token_ids


def test_health_models_metrics_and_unknown_routes(client):
    assert client.get("/healthz").json()["status"] == "ok"
    model = client.get("/v1/models").json()["data"][0]
    assert model["id"].startswith("nxc-") and model["max_context"] > 0
    before = client.get("/metrics").text
    scene = make_scene(np.random.default_rng(4))
    client.post("/v1/chat/completions", json={"messages": [user("Where is the red circle?", scene.image)]})
    text = client.get("/metrics").text
    assert "# TYPE nxc_requests_total counter" in text and 'nxc_stage_seconds_count{stage="prefill"}' in text

    def value(t, key):
        return float(next((ln.split()[-1] for ln in t.splitlines() if ln.startswith(key + " ")), 0))
    key = 'nxc_requests_total{route="/v1/chat/completions",status="200"}'
    assert value(text, key) == value(before, key) + 1
    assert value(text, 'nxc_tokens_total{kind="completion"}') > value(before, 'nxc_tokens_total{kind="completion"}')
    assert client.get("/nope").status_code == 404 and "error" in client.get("/nope").json()
    assert client.get("/v1/chat/completions").status_code == 405


def test_openai_client_talks_to_the_server(live, embedded_pipe):
    openai = pytest.importorskip("openai", reason="the openai client (dev extra) proves wire compatibility")
    c = openai.OpenAI(base_url=live.url + "/v1", api_key="unused")
    scene = make_scene(np.random.default_rng(7), max_objects=3)
    q = f"Where is the {scene.objects[0].phrase} in the image?"
    messages = [user(q, scene.image)]
    model = c.models.list().data[0].id
    r = embedded_pipe.chat(scene.image, q)
    done = c.chat.completions.create(model=model, messages=messages)
    assert done.choices[0].message.content == r.text
    assert len(done.choices[0].message.grounding) == len(r.detections)
    text = "".join(ch.choices[0].delta.content or "" for ch in
                   c.chat.completions.create(model=model, messages=messages, stream=True) if ch.choices)
    assert text == r.text
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=messages)


def test_serve_imports_no_torch(embedded_build):
    code = ("import sys\nfor m in ('torch', 'transformers', 'onnx', 'torchvision', 'sentencepiece'):\n"
            "    sys.modules[m] = None\n"
            f"from nxc.serve.app import create_app\napp = create_app({str(embedded_build)!r})\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_cli_serves_and_refuses_a_bad_build(embedded_build, tmp_path):
    import httpx

    bad = subprocess.run([sys.executable, "-m", "nxc.serve.cli", str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("nxc-serve: ") and "Traceback" not in bad.stderr
    port = free_port()
    proc, health = start_nxc_serve(embedded_build, port)
    try:
        assert health.json() == {"status": "ok", "model": f"nxc-{embedded_build.name}"}
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert page.status_code == 200 and "<html" in page.text.lower()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
