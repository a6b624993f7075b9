"""The web page (static/index.html) with a clip, in headless Chromium against the real app on the modules build: a
GIF goes as a video_url part, a reply's track call becomes a frame slider, and slider position k draws the track's
box k over the clip's sampled frame k (the frames nxc.runtime.video.even_indices picks, decoded in the page).

Chromium is Debian's `chromium-headless-shell`, found and launched as test_browser.py does; the tests skip only when
no such executable exists.
"""
import base64
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from module_helpers import box_text, say, scene
from PIL import Image
from serve_helpers import LiveServer
import test_browser
from test_browser import STATE_DONE, check_box_drawn, hex_rgb

from nxc.runtime.video import MAX_FRAMES, even_indices, load_video
from nxc.shapes.clips import make_clip, save_gif

CLIP_FRAMES = 12        # more than the server's MAX_FRAMES: the page must sample the frames the server samples
NO_IMAGE_DECODER = "delete window.ImageDecoder;"      # a browser without WebCodecs' ImageDecoder
browser = test_browser.browser       # test_browser.py's Chromium fixture (skips with its reason where none exists)


@pytest.fixture(scope="module")
def server(module_build, module_pipe):
    """The real app over the modules build (module "E" tracks), one turn per thread so that `say` steers it."""
    from nxc.serve.app import create_app
    with LiveServer(create_app(module_build, pipeline=module_pipe, max_batch=0)) as srv:
        yield srv


def open_page(browser, server, init_script: str | None = None):
    """A fresh page on the app; `bodies` collects the JSON of every chat request it sends, `errors` its JavaScript
    errors (the fixture fails the test on any)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    if init_script:
        ctx.add_init_script(init_script)
    pg = ctx.new_page()
    tab = SimpleNamespace(page=pg, ctx=ctx, bodies=[], errors=[])
    pg.on("pageerror", lambda e: tab.errors.append(str(e)))
    pg.on("request", lambda r: tab.bodies.append(json.loads(r.post_data))
          if r.url.endswith("/v1/chat/completions") else None)
    pg.goto(server.url + "/")
    return tab


@pytest.fixture
def tab(browser, server):
    t = open_page(browser, server)
    yield t
    t.ctx.close()
    assert not t.errors, f"JavaScript errors on the page: {t.errors}"


@pytest.fixture
def tab_without_decoder(browser, server):
    t = open_page(browser, server, NO_IMAGE_DECODER)
    yield t
    t.ctx.close()
    assert not t.errors, f"JavaScript errors on the page: {t.errors}"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 12-frame GIF of one shape gliding 33 px; its frames as Pillow (the server) decodes them."""
    c = make_clip(np.random.default_rng(6), frames=CLIP_FRAMES, max_objects=1)
    path = tmp_path_factory.mktemp("clip") / "clip.gif"
    save_gif(c, path)
    frames = load_video(path, max_frames=CLIP_FRAMES).frames
    assert len(frames) == CLIP_FRAMES, "Pillow merged frames of the GIF: the clip does not move enough"
    return SimpleNamespace(path=path, frames=[np.asarray(f, np.int32) for f in frames],
                           reply=f"<module>E</module><instruction>it</instruction>"
                                 f"<region>{box_text(c.boxes[0, 0])}</region>")


def upload_and_track(tab, module_pipe, clip) -> list:
    """Upload the GIF, ask, the model (made to) answer with a track call; returns the runtime's track for it."""
    page = tab.page
    page.set_input_files("#file", str(clip.path))
    page.wait_for_function("document.getElementById('view').dataset.imageSize !== undefined")
    with say(module_pipe, clip.reply):
        want = module_pipe.chat(load_video(clip.path), "Track it.", max_new_tokens=80)
        page.fill("#prompt", "Track it.")
        page.click("#ask")
        page.wait_for_function(STATE_DONE, timeout=120_000)
    assert page.evaluate("document.body.dataset.state") == "done", page.text_content("#error")
    call, = want.calls
    assert call.error is None, call.error
    track = [[round(float(v), 2) for v in d.box] for d in call.track]
    assert len(track) == MAX_FRAMES
    assert np.abs(np.subtract(track[-1], track[0])).max() > 20, f"the track does not move: {track}"
    return track


def move_slider(page, k: int) -> None:
    """Keyboard, as a person without a mouse would: Home, then k times the right arrow."""
    page.focus("#frame")
    page.keyboard.press("Home")
    for _ in range(k):
        page.keyboard.press("ArrowRight")


def drawn(page) -> tuple[list, dict]:
    canvas = page.locator("#view")
    return json.loads(canvas.get_attribute("data-boxes")), {
        "frame": canvas.get_attribute("data-frame"), "sample": canvas.get_attribute("data-sample")}


def canvas_shot(page, tmp_path, name: str) -> np.ndarray:
    path = tmp_path / f"{name}.png"
    page.locator("#view").screenshot(path=str(path))
    return np.asarray(Image.open(path).convert("RGB"), np.int32)


def matching_pixels(shot: np.ndarray, frame: np.ndarray, tol: int = 12) -> float:
    """The fraction of the frame's pixels that the canvas shows (sampled at each pixel's centre) within tol."""
    h, w, _ = frame.shape
    sy, sx = shot.shape[0] / h, shot.shape[1] / w
    ys = ((np.arange(h) + 0.5) * sy).astype(int)
    xs = ((np.arange(w) + 0.5) * sx).astype(int)
    seen = shot[ys[:, None], xs[None, :]]
    return float((np.abs(seen - frame).max(axis=-1) <= tol).mean())


def test_page_sends_a_gif_as_video_and_steps_through_its_track(tab, module_pipe, clip, tmp_path):
    page = tab.page
    track = upload_and_track(tab, module_pipe, clip)
    indices = even_indices(CLIP_FRAMES, MAX_FRAMES)

    # (a) the question went with the clip as a video_url part, the file's bytes as they are
    body, = tab.bodies
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "video_url"], parts
    assert parts[1]["video_url"]["url"] == "data:image/gif;base64," + base64.b64encode(clip.path.read_bytes()).decode()
    assert page.locator("#player img#clip").is_visible(), "the clip is not shown playing"

    # (b) a slider of as many positions as the track has boxes, labelled
    assert page.locator("#track").is_visible()
    slider = page.locator("#frame")
    assert (slider.get_attribute("min"), slider.get_attribute("max")) == ("0", str(len(track) - 1))
    assert page.text_content("label[for=frame]") == f"Tracked frame 1 of {len(track)}"
    assert page.text_content("#frame-note") == "", "the frames decoded: no note that they could not be"

    # (c) position k draws the track's box k over the server's sampled frame k; (d) that frame, not frame 0
    shots = {}
    for k in range(len(track)):
        move_slider(page, k)
        boxes, where = drawn(page)
        assert where == {"frame": str(indices[k]), "sample": str(k)}, (k, where)
        assert page.text_content("label[for=frame]") == f"Tracked frame {k + 1} of {len(track)}"
        tracked = [b for b in boxes if b["phrase"] == "it"]
        assert len(tracked) == 1 and np.allclose(tracked[0]["box"], track[k], atol=0.01), (k, boxes, track[k])
        shot = shots[k] = canvas_shot(page, tmp_path, f"k{k}")
        match = [matching_pixels(shot, f) for f in clip.frames]
        assert int(np.argmax(match)) == indices[k] and match[indices[k]] > 0.8, \
            f"slider position {k}: the canvas shows frame {int(np.argmax(match))} of the clip (pixels matching " \
            f"{np.round(match, 3).tolist()}), expected the server's sampled frame {indices[k]}"
        if k in (1, len(track) - 1):
            scale = shot.shape[1] / clip.frames[0].shape[1]
            check_box_drawn(shot, np.round(np.asarray(track[k]) * scale), hex_rgb(tracked[0]["colour"]))
    changed = (np.abs(shots[0] - shots[len(track) - 1]).max(axis=-1) > 12).mean()
    assert changed > 0.01, f"the canvas barely changed between the first and last positions ({changed:.2%} of pixels)"
    assert page.locator("#view").get_attribute("aria-label").startswith(f"Tracked frame {len(track)} of")


def test_page_without_image_decoder_draws_the_track_over_the_first_frame_and_says_so(tab_without_decoder,
                                                                                     module_pipe, clip, tmp_path):
    page = tab_without_decoder.page
    track = upload_and_track(tab_without_decoder, module_pipe, clip)
    body, = tab_without_decoder.bodies
    assert [p["type"] for p in body["messages"][0]["content"]] == ["text", "video_url"]
    note = page.text_content("#frame-note")
    assert page.locator("#frame-note").is_visible() and "drawn over the first frame" in note, note
    last = len(track) - 1
    move_slider(page, last)
    boxes, where = drawn(page)
    assert where == {"frame": "0", "sample": str(last)}
    assert np.allclose([b["box"] for b in boxes if b["phrase"] == "it"], [track[last]], atol=0.01), boxes
    match = [matching_pixels(canvas_shot(page, tmp_path, "last"), f) for f in clip.frames]
    assert int(np.argmax(match)) == 0, f"the canvas should show the first frame, matches {np.round(match, 3)}"


def test_page_still_sends_a_png_as_image_url(tab, module_pipe, tmp_path):
    page = tab.page
    s = scene()
    buf = io.BytesIO()
    s.image.save(buf, format="PNG")
    (tmp_path / "scene.png").write_bytes(buf.getvalue())
    page.set_input_files("#file", str(tmp_path / "scene.png"))
    page.wait_for_function("document.getElementById('view').dataset.imageSize !== undefined")
    # a track call on a still image is its one detection: boxes as ever, no slider
    with say(module_pipe, f"<module>E</module><instruction>it</instruction><region>{box_text(s.objects[0].box)}"
                          "</region>"):
        page.fill("#prompt", "Track it.")
        page.click("#ask")
        page.wait_for_function(STATE_DONE, timeout=120_000)
    assert page.evaluate("document.body.dataset.state") == "done", page.text_content("#error")
    body, = tab.bodies
    parts = body["messages"][0]["content"]
    assert parts == [{"type": "text", "text": "Track it."},
                     {"type": "image_url", "image_url": {"url": "data:image/png;base64," +
                                                         base64.b64encode(buf.getvalue()).decode()}}]
    assert page.locator("#player").is_hidden() and page.locator("#track").is_hidden()
    boxes, where = drawn(page)
    assert where == {"frame": None, "sample": None}
    assert len(boxes) == 1 and boxes[0]["mask"] is True
