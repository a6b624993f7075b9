"""The bad-input table: every case gives its exact, one-line error (or a defined result), never a crash."""
import io
import re

import numpy as np
import pytest
from PIL import Image

from nxc.runtime.images import ImageError, load_image
from nxc.prompt import PromptError


def png_bytes(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


RGB = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_bytes(b""), "the file is empty (0 bytes)"),
    (lambda p: p.write_bytes(png_bytes(RGB)[:60]), "the image data is damaged or truncated"),
    (lambda p: p.write_text("hello, I am text"), "is not an image Pillow can read"),
    (lambda p: p.write_bytes(png_bytes(Image.new("1", (20000, 20000)))), "is over 80 M pixels"),
])
def test_bad_image_files(tmp_path, make, message):
    path = tmp_path / "img.png"
    make(path)
    with pytest.raises(ImageError, match=re.escape(message)):
        load_image(path)


def test_missing_file():
    with pytest.raises(ImageError, match="no such file"):
        load_image("/nonexistent/x.png")


@pytest.mark.parametrize("img,size", [
    (Image.new("RGB", (1, 1), (10, 20, 30)), (1, 1)),
    (Image.new("RGB", (20000, 100), (200, 10, 10)), (20000, 100)),
    (Image.fromarray((np.arange(40 * 60, dtype=np.uint16) * 20).reshape(40, 60)), (60, 40)),   # 16-bit
    (RGB.convert("CMYK"), (60, 40)),
    (RGB.convert("RGBA"), (60, 40)),
    (RGB.convert("P"), (60, 40)),
])
def test_unusual_images_load_as_rgb(tmp_path, img, size):
    fmt = "JPEG" if img.mode == "CMYK" else "PNG"
    out = load_image(png_bytes(img, fmt))
    assert out.mode == "RGB" and out.size == size


def test_exif_rotation_is_honoured():
    exif = Image.Exif()
    exif[0x0112] = 6                                   # orientation: rotate 90 CW to display
    data = png_bytes(RGB, "JPEG", exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).size == (60, 40)
    assert load_image(data).size == (40, 60)


@pytest.mark.parametrize("size", [(1, 1), (20000, 100), (100, 20000)])
def test_extreme_sizes_run_through_the_pipeline(embedded_pipe, size):
    r = embedded_pipe.chat(Image.new("RGB", size, (200, 30, 30)), "Where is the red circle in the image?",
                           max_new_tokens=12)
    assert r.token_ids and all(d.mask.shape == (size[1], size[0]) for d in r.detections)


@pytest.mark.parametrize("text,boxes,message", [
    ("", None, "the prompt is empty"),
    ("   \n", None, "the prompt is empty"),
    ("What is region [1]?", [[1, 2, 30, 20]], r"refers to region 1 in '\[1\]', but only 1 box\(es\) were given"),
    ("What is in the image?", [[1, 2, 30, 20]], "the prompt never refers to box 0"),
    ("What is [0]?", [[1, 2, 30, 20], [3, 4, 10, 12]], "never refers to box 1"),
    ("What is [0]?", [[30, 2, 10, 20]], r"box \[0\] .* is empty or reversed"),
    ("What is [0]?", [[1, float("nan"), 30, 20]], r"box \[0\] .* has a non-finite coordinate"),
    ("What is [0]?", [[100, 100, 200, 200]], r"box \[0\] .* lies outside the 60x40 image"),
    ("What is [0]?", [[1, 2, 3]], r"4 numbers each"),
    ("What is [0]?", "abc", "boxes must be numbers"),
])
def test_bad_prompts_and_boxes(embedded_pipe, text, boxes, message):
    with pytest.raises(PromptError, match=message):
        embedded_pipe.chat(RGB, text, boxes=boxes, max_new_tokens=4)


def test_box_reaching_past_the_edge_is_clamped(embedded_pipe):
    r = embedded_pipe.chat(RGB, "What is region [0]?", boxes=[[-10, -5, 30, 80]], max_new_tokens=8)
    assert r.token_ids


def test_literal_braces_are_kept(embedded_pipe):
    r = embedded_pipe.chat(RGB, "What is {this} {0} {}?", max_new_tokens=4)
    assert "{this} {0} {}" in embedded_pipe.tokenizer.decode(r.prompt_ids)


def test_prompt_longer_than_the_context_gives_both_lengths(embedded_pipe):
    text = "describe " * 2000
    with pytest.raises(PromptError, match=r"the prompt is \d+ tokens .* but the build's context is 1024"):
        embedded_pipe.chat(RGB, text)


def test_max_new_tokens_beyond_the_context_ends_with_length(embedded_pipe, tmp_path):
    from nxc.export.exporter import ExportOptions, export_build
    from nxc.runtime.pipeline import Pipeline
    question = "Can you describe the image and include object locations?"
    n_prompt = len(embedded_pipe.chat(RGB, question, max_new_tokens=1).prompt_ids)
    build = export_build(None, tmp_path / "short", options=ExportOptions(max_context=n_prompt + 4, parity=False))
    r = Pipeline.load(build).chat(RGB, question, max_new_tokens=5000)
    assert r.finish_reason == "length"
    assert len(r.token_ids) <= 5
