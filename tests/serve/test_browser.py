"""The web page (static/index.html) in headless Chromium against the real app on the embedded fp32 build.

Chromium is Debian's `chromium-headless-shell` (`make browser` installs it); Playwright's own download is not used.
The test skips only when no such executable exists.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nxc.shapes.data import make_scene

CHROMIUM = ("/usr/lib/chromium/chromium-headless-shell", "/usr/bin/chromium-headless-shell", "/usr/lib/chromium/chromium",
            "chromium-headless-shell", "chromium")
STATE_DONE = "['done', 'error'].includes(document.body.dataset.state)"


def chromium_executable() -> str | None:
    for name in CHROMIUM:
        path = name if Path(name).is_absolute() else shutil.which(name)
        if path and Path(path).is_file():
            return path
    return None


@pytest.fixture(scope="module")
def server_url(live):
    """The real app in a uvicorn thread on a free port (tests/serve/conftest.py)."""
    return live.url


@pytest.fixture(scope="module")
def browser():
    exe = chromium_executable()
    if exe is None:
        pytest.skip("no chromium-headless-shell or chromium executable (looked for " + ", ".join(CHROMIUM) +
                    "); `make browser` installs Debian's chromium-headless-shell with apt")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe)
        yield b
        b.close()


@pytest.fixture
def page(browser, server_url):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    pg = ctx.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server_url + "/")
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def scene(tmp_path):
    s = make_scene(np.random.default_rng(7))
    s.image.save(tmp_path / "scene.png")
    return s


def upload(page, path: Path) -> None:
    page.set_input_files("#file", str(path))
    page.wait_for_function("document.getElementById('view').dataset.imageSize !== undefined")


def ask(page, question: str) -> str:
    """Type, press Ask, wait for the reply; returns body[data-state] ('done' or 'error')."""
    page.fill("#prompt", question)
    page.click("#ask")
    page.wait_for_function(STATE_DONE, timeout=120_000)
    return page.evaluate("document.body.dataset.state")


def last_reply(page) -> str:
    return page.locator(".msg.assistant .text").last.text_content()


def hex_rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], np.int32)


def near(shot: np.ndarray, x: float, y: float, rgb: np.ndarray, *, reach: int, tol: int = 40) -> bool:
    """Whether a pixel within `reach` of (x, y) (canvas pixels) is within `tol` of rgb on every channel."""
    h, w, _ = shot.shape
    xi, yi = int(round(x)), int(round(y))
    patch = shot[max(yi - reach, 0):min(yi + reach + 1, h), max(xi - reach, 0):min(xi + reach + 1, w)]
    return bool(patch.size) and bool((np.abs(patch.astype(np.int32) - rgb).max(axis=-1) <= tol).any())


def check_box_drawn(shot: np.ndarray, box_canvas, rgb: np.ndarray) -> None:
    """The 3 px frame lies on the box edges (middle half of each), and not 8 px inside or outside of them."""
    x1, y1, x2, y2 = box_canvas
    h, w, _ = shot.shape
    ts = np.linspace(0.25, 0.75, 9)
    edges = {"left": [(x1, y1 + t * (y2 - y1)) for t in ts], "right": [(x2, y1 + t * (y2 - y1)) for t in ts],
             "top": [(x1 + t * (x2 - x1), y1) for t in ts], "bottom": [(x1 + t * (x2 - x1), y2) for t in ts]}
    for name, points in edges.items():
        missing = [(round(x), round(y)) for x, y in points if not near(shot, x, y, rgb, reach=2)]
        assert not missing, f"the {name} edge of the box is not drawn in {rgb.tolist()} at canvas pixels {missing}"
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    probes = {"inside left": (x1 + 8, cy), "inside right": (x2 - 8, cy), "inside top": (cx, y1 + 8),
              "inside bottom": (cx, y2 - 8), "centre": (cx, cy), "outside left": (x1 - 8, cy),
              "outside right": (x2 + 8, cy), "outside top": (cx, y1 - 8), "outside bottom": (cx, y2 + 8)}
    for name, (x, y) in probes.items():
        if 0 <= x < w and 0 <= y < h:
            assert not near(shot, x, y, rgb, reach=0), f"{name} of the box ({x:.0f}, {y:.0f}) has the box colour"


def check_mask_drawn(shot: np.ndarray, image: Image.Image, mask: np.ndarray, scale: float, rgb: np.ndarray) -> None:
    """Pixels well inside the mask moved towards the box colour (a translucent overlay) from the image's own."""
    core = mask.copy()
    for axis in (0, 1):                     # erode by 3 px so that the upscaled samples avoid the mask's edge
        for shift in (-3, 3):
            core &= np.roll(mask, shift, axis=axis)
    ys, xs = np.nonzero(core)
    assert len(ys), "the expected mask has no interior to sample"
    pick = np.linspace(0, len(ys) - 1, 25).astype(int)
    orig = np.asarray(image, np.int32)
    gains = []
    for y, x in zip(ys[pick], xs[pick]):
        px = shot[int((y + 0.5) * scale), int((x + 0.5) * scale)].astype(np.int32)
        gains.append(np.abs(orig[y, x] - rgb).sum() - np.abs(px - rgb).sum())
    assert np.median(gains) > 30, f"the mask is not drawn: pixels inside it moved {np.median(gains)} towards the " \
                                  f"box colour (L1), expected a translucent overlay"


def test_page_streams_reply_and_draws_box_and_mask(page, scene, tmp_path, embedded_pipe):
    question = f"Where is the {scene.objects[0].phrase} in the image?"
    expected = embedded_pipe.chat(scene.image, question)
    assert expected.detections, f"the model grounded nothing for {question!r}: {expected.text!r}"

    upload(page, tmp_path / "scene.png")
    page.evaluate("""() => {            // every text the reply shows while it streams
        window.__texts = [];
        new MutationObserver(() => {
            const t = document.querySelector('.msg.assistant:last-of-type .text');
            if (t) window.__texts.push(t.textContent);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }""")
    state = ask(page, question)
    assert state == "done", page.text_content("#error")

    assert last_reply(page) == expected.text
    texts = [t for t in page.evaluate("window.__texts") if t]
    assert len(set(texts)) > 1, f"the reply did not stream: the page showed only {set(texts)}"
    stats = page.locator(".msg.assistant .stats").last.text_content()
    assert f"{len(expected.token_ids)} tokens" in stats and " s" in stats, stats

    canvas = page.locator("#view")
    boxes = json.loads(canvas.get_attribute("data-boxes"))
    assert [b["index"] for b in boxes] == list(range(len(expected.detections)))
    np.testing.assert_allclose(boxes[0]["box"], expected.detections[0].box, atol=1e-3)
    assert boxes[0]["mask"] is True

    shot_path = tmp_path / "canvas.png"
    canvas.screenshot(path=str(shot_path))
    shot = np.asarray(Image.open(shot_path).convert("RGB"))
    scale = shot.shape[1] / scene.image.width
    assert abs(shot.shape[0] / scene.image.height - scale) < 0.02, "the canvas does not keep the image's aspect"
    assert scale > 1.5, f"a {scene.image.size} image should be scaled up to fit the panel, got {scale:.2f}x"
    rgb = hex_rgb(boxes[0]["colour"])
    box = np.round(np.asarray(expected.detections[0].box) * scale)
    check_box_drawn(shot, box, rgb)
    mask = expected.detections[0].mask
    if mask is not None and mask.any():
        check_mask_drawn(shot, scene.image, mask, scale, rgb)


@pytest.mark.parametrize("name", ["random", "empty", "full", "starts_inside", "large_runs"])
def test_page_decodes_coco_rle_as_rle_py(page, name):
    from nxc.serve import rle
    rng = np.random.default_rng(0)
    mask = {"random": rng.random((37, 53)) < 0.3, "empty": np.zeros((8, 5), bool), "full": np.ones((6, 9), bool),
            "starts_inside": np.pad(np.ones((4, 4), bool), ((0, 3), (0, 2))),
            "large_runs": np.pad(np.ones((700, 900), bool), ((300, 20), (5, 400)))}[name]
    encoded = rle.encode(mask)
    h, w, bits = page.evaluate("r => { const m = rleDecode(r); return [m.h, m.w, m.data.join('')]; }", encoded)
    assert [h, w] == list(mask.shape)
    np.testing.assert_array_equal(np.frombuffer(bits.encode(), np.uint8).reshape(h, w) == ord("1"), rle.decode(encoded))


def test_page_regions_errors_and_multi_turn(page, scene, tmp_path, embedded_pipe):
    upload(page, tmp_path / "scene.png")
    obj = scene.objects[0]
    canvas = page.locator("#view")
    bb = canvas.bounding_box()
    s = bb["width"] / scene.image.width
    x1, y1, x2, y2 = obj.box
    page.mouse.move(bb["x"] + x1 * s, bb["y"] + y1 * s)
    page.mouse.down()
    page.mouse.move(bb["x"] + (x1 + x2) / 2 * s, bb["y"] + (y1 + y2) / 2 * s, steps=3)
    page.mouse.move(bb["x"] + x2 * s, bb["y"] + y2 * s, steps=3)
    page.mouse.up()
    regions = json.loads(canvas.get_attribute("data-regions"))
    assert len(regions) == 1 and np.allclose(regions[0], obj.box, atol=1.5), (regions, obj.box)

    # A region the question never refers to: the server refuses, the page says why and keeps the region.
    assert ask(page, "Where is the thing?") == "error"
    assert "never refers to box 0" in page.text_content("#error")
    assert page.locator(".msg").count() == 0

    conv = embedded_pipe.conversation(scene.image)
    q1, q2 = "What is region [0]?", f"Where is the {obj.phrase} in the image?"
    assert ask(page, q1) == "done", page.text_content("#error")
    assert last_reply(page) == conv.ask(q1, boxes=regions).text
    assert page.text_content("#error") == ""
    assert ask(page, q2) == "done", page.text_content("#error")
    assert last_reply(page) == conv.ask(q2).text
    assert page.locator(".msg.assistant").count() == 2
