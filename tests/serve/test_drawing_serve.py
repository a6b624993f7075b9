"""nxc-serve on a build that draws (issue 28): a reply's pictures come back as OpenAI image_url content parts (base64
PNG that decodes to the runtime's pixels exactly) with their nxc fields, streamed one chunk per picture after the
text and before the last chunk; the picture fields are checked in one-line 400s and refused by a build that does
not draw. The shapes model is made to say its signal tokens (drawing_helpers.say_signal_at)."""
import base64
import contextlib
import io
import re

import httpx
import numpy as np
import pytest
from drawing_helpers import QUESTION, say_signal_at
from PIL import Image
from serve_helpers import LiveServer
from test_api import sse, user

from nxc.shapes.data import make_scene

OPTIONS = {"image_steps": 4, "image_seed": 5, "image_guidance": 2.5, "image_scheduler": "euler"}
DRAW = {"steps": 4, "seed": 5, "guidance": 2.5, "scheduler": "euler"}


@pytest.fixture(scope="module", params=["batched", "one turn per thread"])
def draw_client(request, drawing_build, drawing_pipe):
    from nxc.serve.app import create_app
    app = create_app(drawing_build[0], pipeline=drawing_pipe, max_batch=8 if request.param == "batched" else 0)
    with LiveServer(app) as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            yield c


@pytest.fixture(scope="module")
def scene():
    return make_scene(np.random.default_rng(3), max_objects=3)


def pixels(url: str) -> np.ndarray:
    head, data = url.split(",", 1)
    assert head == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


@contextlib.contextmanager
def page_at(url: str):
    """(page, page errors) of headless Chromium on the server's page (as test_browser.py; skipped without it)."""
    from test_browser import chromium_executable
    exe = chromium_executable()
    if exe is None:
        pytest.skip("no chromium-headless-shell or chromium executable; `make browser` installs it")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe)
        try:
            page = b.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            yield page, errors
        finally:
            b.close()


def runtime_answer(pipe, scene):
    with say_signal_at(pipe, 2):
        return pipe.chat(scene.image, QUESTION, max_new_tokens=24, head_options={"signal": DRAW})


def test_a_reply_that_draws_returns_image_url_parts(draw_client, drawing_pipe, scene):
    r = runtime_answer(drawing_pipe, scene)
    assert len(r.images) == 1
    with say_signal_at(drawing_pipe, 2):
        resp = draw_client.post("/v1/chat/completions", json={"messages": [user(QUESTION, scene.image)],
                                                              "max_tokens": 24, **OPTIONS})
    assert resp.status_code == 200, resp.text
    ch = resp.json()["choices"][0]
    assert ch["token_ids"] == r.token_ids
    text, picture = ch["message"]["content"]
    assert text == {"type": "text", "text": r.text} and picture["type"] == "image_url"
    np.testing.assert_array_equal(pixels(picture["image_url"]["url"]), r.images[0].pixels)
    h, w = r.images[0].pixels.shape[:2]
    assert ch["message"]["images"] == [{"index": 0, "width": w, "height": h, "seed": 5, "steps": 4, "guidance": 2.5,
                                        "scheduler": "euler"}]


def test_metrics_count_the_pictures_and_time_the_picture_stages(draw_client, drawing_pipe, scene):
    def metric(text, name):
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return None if m is None else float(m.group(1))
    before = draw_client.get("/metrics").text
    with say_signal_at(drawing_pipe, 2):
        assert draw_client.post("/v1/chat/completions", json={"messages": [user(QUESTION, scene.image)],
                                                               "max_tokens": 24, **OPTIONS}).status_code == 200
    after = draw_client.get("/metrics").text
    assert metric(after, "nxc_pictures_total") == (metric(before, "nxc_pictures_total") or 0) + 1
    for stage in ("projector", "denoiser", "latent_decoder"):
        assert metric(after, f'nxc_stage_seconds_sum{{stage="{stage}"}}') > 0, stage


def test_each_picture_is_streamed_after_the_text_and_before_the_last_chunk(draw_client, drawing_pipe, scene):
    r = runtime_answer(drawing_pipe, scene)
    with say_signal_at(drawing_pipe, 2):
        chunks = sse(draw_client, {"messages": [user(QUESTION, scene.image)], "max_tokens": 24, **OPTIONS})
    deltas = [c["choices"][0] for c in chunks]
    at = [i for i, d in enumerate(deltas) if d["delta"].get("images")]
    assert len(at) == 1, "one chunk per picture"
    last_token = max(i for i, d in enumerate(deltas) if d["token_ids"])
    assert last_token < at[0] < len(deltas) - 1 and deltas[-1]["finish_reason"] == r.finish_reason
    (part,) = deltas[at[0]]["delta"]["images"]
    assert part["type"] == "image_url" and (part["index"], part["seed"], part["steps"]) == (0, 5, 4)
    np.testing.assert_array_equal(pixels(part["image_url"]["url"]), r.images[0].pixels)
    assert "".join(d["delta"].get("content", "") for d in deltas) == r.text
    assert sum((d["token_ids"] for d in deltas), []) == r.token_ids


def test_a_reply_without_signal_tokens_keeps_string_content(draw_client, drawing_pipe, scene):
    r = drawing_pipe.chat(scene.image, QUESTION, max_new_tokens=24)
    resp = draw_client.post("/v1/chat/completions", json={"messages": [user(QUESTION, scene.image)],
                                                          "max_tokens": 24, "image_steps": 4})
    assert resp.status_code == 200, resp.text
    msg = resp.json()["choices"][0]["message"]
    assert msg["content"] == r.text and "images" not in msg and not r.images


def test_an_earlier_reply_with_its_picture_parts_can_be_sent_back(draw_client, drawing_pipe, scene):
    with say_signal_at(drawing_pipe, 2):
        first = draw_client.post("/v1/chat/completions", json={"messages": [user(QUESTION, scene.image)],
                                                               "max_tokens": 24, **OPTIONS}).json()
    reply = first["choices"][0]["message"]
    from nxc.serve.protocol import unrender
    raw, boxes = unrender(reply["content"][0]["text"], reply["grounding"], 1)
    want = drawing_pipe.conversation(scene.image)
    want.add_turn(QUESTION, raw, reply_boxes=boxes)
    r = want.ask("Is there a red circle in the image?", max_new_tokens=16)
    resp = draw_client.post("/v1/chat/completions", json={"max_tokens": 16, "messages": [
        user(QUESTION, scene.image), reply, user("Is there a red circle in the image?")]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == r.text


def test_ground_returns_the_pictures_too(draw_client, drawing_pipe, scene):
    r = runtime_answer(drawing_pipe, scene)
    from serve_helpers import data_uri
    with say_signal_at(drawing_pipe, 2):
        resp = draw_client.post("/v1/ground", json={"image": data_uri(scene.image), "prompt": QUESTION,
                                                    "max_tokens": 24, **OPTIONS})
    assert resp.status_code == 200, resp.text
    (part,) = resp.json()["images"]
    np.testing.assert_array_equal(pixels(part["image_url"]["url"]), r.images[0].pixels)


@pytest.mark.parametrize("fields, message", [
    ({"image_steps": 0}, "image_steps must be at least 1, got 0"),
    ({"image_steps": 1001}, "image_steps must be at most 1000, got 1001"),
    ({"image_steps": "4"}, "image_steps must be an integer, got '4'"),
    ({"image_guidance": -1}, r"image_guidance must be a number in \[0.0, 100.0\], got -1"),
    ({"image_seed": -2}, "image_seed must be at least 0, got -2"),
    ({"image_scheduler": "pndm"}, "image_scheduler must be one of ddim, euler, lcm, got 'pndm'"),
])
def test_bad_picture_fields_are_one_line_400s(draw_client, scene, fields, message):
    resp = draw_client.post("/v1/chat/completions", json={"messages": [user(QUESTION, scene.image)], **fields})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]["message"]
    assert re.search(message, err) and "\n" not in err
    assert draw_client.get("/healthz").status_code == 200


@pytest.mark.parametrize("fields", [{"image_steps": 4}, {"image_seed": 1, "image_scheduler": "ddim"}])
def test_a_build_that_does_not_draw_refuses_the_picture_fields(client, scene, fields):
    resp = client.post("/v1/chat/completions", json={"messages": [user(QUESTION, scene.image)], **fields})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]["message"]
    assert err.startswith(", ".join(fields) + ": this build does not draw pictures") and "\n" not in err


@pytest.fixture(scope="module")
def draw_url(drawing_build, drawing_pipe):
    from nxc.serve.app import create_app
    with LiveServer(create_app(drawing_build[0], pipeline=drawing_pipe)) as srv:
        yield srv.url


def test_the_page_shows_the_picture_under_the_reply(draw_url, drawing_pipe, scene, tmp_path):
    """Headless Chromium (as test_browser.py; skipped without it): the streamed picture becomes an <img> that the
    browser decodes, its pixels the runtime's (the build's default steps, guidance and seed)."""
    from test_browser import ask, upload
    with say_signal_at(drawing_pipe, 2):
        r = drawing_pipe.chat(scene.image, QUESTION)
    scene.image.save(tmp_path / "scene.png")
    with page_at(draw_url) as (page, errors):
        upload(page, tmp_path / "scene.png")
        with say_signal_at(drawing_pipe, 2):
            assert ask(page, QUESTION) == "done"
        img = page.locator(".msg.assistant img.picture")
        assert img.count() == 1 and not errors, errors
        page.wait_for_function("document.querySelector('img.picture').complete")
        assert page.evaluate("document.querySelector('img.picture').naturalWidth") == r.images[0].pixels.shape[1]
        np.testing.assert_array_equal(pixels(img.get_attribute("src")), r.images[0].pixels)
        assert "seed 0" in img.get_attribute("alt")


def test_a_request_without_an_image_draws_on_the_blank_picture(draw_client, drawing_pipe):
    """NExT-GPT draws from the text: no image part is a turn on nxc.runtime.images.blank_image() (a build that
    does not draw answers 400: tests/serve/test_api.py "no image")."""
    from nxc.runtime.images import blank_image
    with say_signal_at(drawing_pipe, 2):
        want = drawing_pipe.chat(blank_image(), QUESTION, max_new_tokens=24, head_options={"signal": DRAW})
        resp = draw_client.post("/v1/chat/completions", json={"messages": [user(QUESTION)], "max_tokens": 24,
                                                              **OPTIONS})
    assert resp.status_code == 200, resp.text
    ch = resp.json()["choices"][0]
    assert ch["token_ids"] == want.token_ids and len(want.images) == 1
    np.testing.assert_array_equal(pixels(ch["message"]["content"][1]["image_url"]["url"]), want.images[0].pixels)


def test_the_page_draws_without_an_image_on_a_build_that_draws(draw_url, drawing_pipe, tmp_path):
    """Headless Chromium: no image chosen, a question to a build that draws (GET /v1/models says "draws") is sent
    without an image part and its picture shown: the runtime's on the blank picture."""
    from test_browser import ask

    from nxc.runtime.images import blank_image
    with say_signal_at(drawing_pipe, 2):
        r = drawing_pipe.chat(blank_image(), QUESTION)
    with page_at(draw_url) as (page, errors):
        page.wait_for_function("document.getElementById('model').textContent.length > 0")
        with say_signal_at(drawing_pipe, 2):
            assert ask(page, QUESTION) == "done"
        img = page.locator(".msg.assistant img.picture")
        assert img.count() == 1 and not errors, errors
        np.testing.assert_array_equal(pixels(img.get_attribute("src")), r.images[0].pixels)
