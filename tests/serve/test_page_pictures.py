"""The web page's picture code (static/pictures.js) under node, on what nxc.serve.protocol sends: a streamed
picture chunk and an answered message become one <img> each, its src the picture's data URL. Without a browser:
test_browser.py needs chromium, this only node (skipped, saying so, where there is none)."""
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nxc.runtime.events import ChatResult, Image
from nxc.serve import protocol as proto

STATIC = Path(proto.__file__).parent / "static"
NODE = shutil.which("node") or shutil.which("nodejs")

RUN = """
const {picturesOf, showPictures} = require(process.argv[process.argv.length - 1]);
const input = JSON.parse(require("fs").readFileSync(0, "utf8"));
const made = [];
const doc = {createElement: tag => ({tag, dataset: {}})};
const container = {append: el => made.push(el)};
const out = input.map(src => picturesOf(src));
out.forEach(pics => showPictures(container, pics, doc));
console.log(JSON.stringify({pictures: out, made}));
"""


def picture(k: int, seed: int) -> Image:
    px = np.random.default_rng(seed).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    return Image(index=k, pixels=px, seed=seed, steps=4, guidance=3.0, scheduler="ddim")


def node(inputs: list) -> dict:
    if NODE is None:
        pytest.skip("node is not installed: the page's picture code is checked by test_browser.py instead")
    done = subprocess.run([NODE, "-e", RUN, str(STATIC / "pictures.js")], input=json.dumps(inputs),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_streamed_and_answered_pictures_become_img_tags():
    ims = [picture(0, 1), picture(1, 2)]
    r = ChatResult(text="Here it is.", raw_text="Here it is.", token_ids=[1], prompt_ids=[1], finish_reason="stop",
                   images=ims)
    streamed = {"images": [proto.picture_part(ims[1])]}
    answered = proto.message(r)
    out = node([streamed, answered, {"content": "no pictures"}, {"content": "x", "grounding": []}])
    (one,), two, none, also_none = out["pictures"]
    assert none == [] and also_none == []
    assert one["index"] == 1 and one["url"] == proto.picture_png(ims[1].pixels)
    assert one["alt"] == "Picture 1 the model drew (4 steps, ddim, guidance 3, seed 2)"
    assert [p["url"] for p in two] == [proto.picture_png(im.pixels) for im in ims]
    assert [p["index"] for p in two] == [0, 1] and "seed 1" in two[0]["alt"]
    assert [(e["tag"], e["className"], e["src"], e["dataset"]["index"]) for e in out["made"]] == [
        ("img", "picture", p["url"], str(p["index"])) for p in [one, *two]]


def test_only_base64_image_data_is_shown():
    out = node([{"images": [{"type": "image_url", "image_url": {"url": "javascript:alert(1)"}},
                            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])
    assert [p["url"] for p in out["pictures"][0]] == ["data:image/png;base64,iVBORw0KGgo="]


def test_the_page_loads_and_calls_the_picture_code(client):
    page = client.get("/").text
    assert '<script src="/static/pictures.js"></script>' in page
    assert "showPictures(pictures, picturesOf(delta), document)" in page
    js = client.get("/static/pictures.js")
    assert js.status_code == 200 and "function picturesOf" in js.text
