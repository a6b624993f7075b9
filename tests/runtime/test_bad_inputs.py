"""The bad-input table: every case gives its exact, one-line error (or a defined result), never a crash."""
import io
import json
import os
import re
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from nxc.runtime.images import ImageError, load_image
from nxc.prompt import PromptError


def exactly(message: str) -> str:
    """pytest.raises(match=...) for the whole message, nothing before or after it."""
    return f"^{re.escape(message)}$"


def png_bytes(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


RGB = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_bytes(b""), "{p}: the file is empty (0 bytes); pass a PNG or JPEG"),
    (lambda p: p.write_bytes(png_bytes(RGB)[:60]),
     "{p}: the image data is damaged or truncated (image file is truncated); pass a complete PNG or JPEG"),
    (lambda p: p.write_text("hello, I am text"), "{p}: is not an image Pillow can read; pass a PNG or JPEG"),
    (lambda p: p.write_bytes(png_bytes(Image.new("1", (10000, 8500)))),
     "{p}: 10000x8500 is over 80 M pixels; resize it first"),
    (lambda p: p.write_bytes(png_bytes(Image.new("1", (20000, 20000)))),
     "{p}: is over 80 M pixels (decompression-bomb guard); resize it first"),
    (lambda p: p.mkdir(), "{p}: is a directory; pass an image file"),
])
def test_bad_image_files(tmp_path, make, message):
    path = tmp_path / "img.png"
    make(path)
    with pytest.raises(ImageError, match=exactly(message.format(p=path))):
        load_image(path)


@pytest.mark.parametrize("source,message", [
    ("/nonexistent/x.png", "/nonexistent/x.png: no such file"),
    ("/dev/null", "/dev/null: the file is empty (0 bytes); pass a PNG or JPEG"),       # a device: read, not sized
    ("x\0.png", "'x\\x00.png': is not a file path (it holds a NUL character)"),
])
def test_paths_that_are_no_image_file(source, message):
    with pytest.raises(ImageError, match=exactly(message)):
        load_image(source)


def test_image_from_a_pipe_is_read_whole():
    """/dev/stdin, a FIFO: no size and no seek, so the bytes are read first (nxc-run --image /dev/stdin)."""
    r, w = os.pipe()
    data = png_bytes(RGB)                                   # more than a pipe buffer holds would block a writer
    writer = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    writer.start()
    try:
        img = load_image(f"/dev/fd/{r}")
    finally:
        writer.join()
        os.close(r)
    assert img.size == (60, 40) and np.array_equal(np.asarray(img), np.asarray(RGB))


def test_endless_device_is_read_up_to_a_cap(monkeypatch):
    monkeypatch.setattr("nxc.runtime.images.MAX_STREAM_BYTES", 1 << 20)
    with pytest.raises(ImageError, match=exactly("/dev/zero: more than 1 MB from a pipe or device; save the image to "
                                                 "a file and pass its path")):
        load_image("/dev/zero")


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


REFER = ('Pass one box per referenced index (nxc-run --box x1,y1,x2,y2; "boxes": [[x1, y1, x2, y2]] in an API '
         'request).')


@pytest.mark.parametrize("text,boxes,message", [
    ("", None, "the prompt is empty: ask a question, e.g. 'Where is the red circle in the image?'"),
    ("   \n", None, "the prompt is empty: ask a question, e.g. 'Where is the red circle in the image?'"),
    ("What is region [1]?", [[1, 2, 30, 20]],
     f"the prompt refers to region 1 in '[1]', but only 1 box(es) were given (valid indices 0..0). {REFER}"),
    ("What is in the image?", [[1, 2, 30, 20]],
     "1 box(es) were given but the prompt never refers to box 0: refer to each box in the text as [0] (e.g. 'What "
     "is region [0]?'), or do not pass it."),
    ("What is [0]?", [[1, 2, 30, 20], [3, 4, 10, 12]],
     "2 box(es) were given but the prompt never refers to box 1: refer to each box in the text as [1] (e.g. 'What "
     "is region [1]?'), or do not pass it."),
    ("What is [0]?", [[30, 2, 10, 20]],
     "box [0] [30.0, 2.0, 10.0, 20.0] is empty or reversed: x1 < x2 and y1 < y2 are needed (xyxy pixels)"),
    ("What is [0]?", [[1, float("nan"), 30, 20]], "box [0] [1.0, nan, 30.0, 20.0] has a non-finite coordinate"),
    ("What is [0]?", [[100, 100, 200, 200]], "box [0] [100.0, 100.0, 200.0, 200.0] lies outside the 60x40 image"),
    ("What is [0]?", [[1, 2, 3]], "boxes must be [[x1, y1, x2, y2], ...] (4 numbers each), got shape (1, 3)"),
    ("What is [0]?", "abc", "boxes must be numbers [[x1, y1, x2, y2], ...] in pixels, got 'abc'"),
])
def test_bad_prompts_and_boxes(embedded_pipe, text, boxes, message):
    with pytest.raises(PromptError, match=exactly(message)):
        embedded_pipe.chat(RGB, text, boxes=boxes, max_new_tokens=4)


def test_region_reference_with_leading_zeros_is_that_index(embedded_pipe):
    """[01] is [1], as int("01") reads it (README "Limits"); only ASCII digits make a reference."""
    boxes = [[1, 2, 30, 20], [5, 6, 40, 30]]
    zeros = embedded_pipe.chat(RGB, "What is [01] next to [00]?", boxes=boxes, max_new_tokens=4)
    plain = embedded_pipe.chat(RGB, "What is [1] next to [0]?", boxes=boxes, max_new_tokens=4)
    assert zeros.prompt_ids == plain.prompt_ids
    with pytest.raises(PromptError, match=exactly("1 box(es) were given but the prompt never refers to box 0: refer to "
                                                  "each box in the text as [0] (e.g. 'What is region [0]?'), or do "
                                                  "not pass it.")):
        embedded_pipe.chat(RGB, "What is [\u0660]?", boxes=boxes[:1], max_new_tokens=4)   # Arabic-Indic zero: text


@pytest.mark.parametrize("kwargs,message", [
    ({"top_k": 1.5, "temperature": 1.0}, "top_k must be a whole number >= 0 (0 = off), got 1.5"),
    ({"top_k": True, "temperature": 1.0}, "top_k must be a whole number >= 0 (0 = off), got True"),
    ({"seed": "x", "temperature": 1.0}, "seed must be a whole number >= 0 or None, got 'x'"),
    ({"seed": -1, "temperature": 1.0}, "seed must be a whole number >= 0 or None, got -1"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0 (0 = greedy), got inf"),
    ({"top_p": "0.9"}, "top_p must be a number in (0, 1], got '0.9'"),
    ({"max_new_tokens": float("inf")}, "max_new_tokens must be a whole number >= 1 (None: the build's 512), got inf"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be a whole number >= 1 (None: the build's 512), got 2.5"),
    ({"max_new_tokens": -3}, "max_new_tokens must be a whole number >= 1 (None: the build's 512), got -3"),
])
def test_bad_generation_settings_are_one_value_error(embedded_pipe, kwargs, message):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=exactly(message)):
        embedded_pipe.chat(RGB, "Where is the red circle in the image?", **kwargs)


def test_box_reaching_past_the_edge_is_clamped(embedded_pipe):
    r = embedded_pipe.chat(RGB, "What is region [0]?", boxes=[[-10, -5, 30, 80]], max_new_tokens=8)
    assert r.token_ids


def test_literal_braces_are_kept(embedded_pipe):
    r = embedded_pipe.chat(RGB, "What is {this} {0} {}?", max_new_tokens=4)
    assert "{this} {0} {}" in embedded_pipe.tokenizer.decode(r.prompt_ids)


def test_prompt_longer_than_the_context_gives_both_lengths(embedded_pipe):
    text = "describe " * 2000
    with pytest.raises(PromptError, match=r"^the prompt is \d+ tokens \(image and conversation included\) but the "
                                          r"build's context is 1024; shorten it, start a new conversation, or "
                                          r"re-export with a larger --max-context$"):
        embedded_pipe.chat(RGB, text)


def test_max_new_tokens_beyond_the_context_ends_with_length(embedded_pipe, tmp_path, export_extra):
    from nxc.export.exporter import ExportOptions, export_build
    from nxc.runtime.pipeline import Pipeline
    question = "Can you describe the image and include object locations?"
    n_prompt = len(embedded_pipe.chat(RGB, question, max_new_tokens=1).prompt_ids)
    build = export_build(None, tmp_path / "short", options=ExportOptions(max_context=n_prompt + 4, parity=False))
    r = Pipeline.load(build).chat(RGB, question, max_new_tokens=5000)
    assert r.finish_reason == "length"
    assert len(r.token_ids) <= 5


# -- a build whose graph is not the one its manifest describes -------------------------------------------------------

NOT_THIS_BUILD = "; the graph does not belong to this build, re-export it"


def _hidden_as_float16(model):
    """loc_heads taking `hidden` as float16 (cast to float32 inside): a valid graph of another build's I/O."""
    from onnx import TensorProto, helper
    g = model.graph
    for node in g.node:
        node.input[:] = ["hidden_f32" if n == "hidden" else n for n in node.input]
    next(i for i in g.input if i.name == "hidden").type.tensor_type.elem_type = TensorProto.FLOAT16
    g.node.insert(0, helper.make_node("Cast", ["hidden"], ["hidden_f32"], to=TensorProto.FLOAT))


def test_swapped_graph_with_matching_hashes_is_refused(embedded_build, tmp_path, export_extra):
    """The hashes in the manifest are rewritten to the swapped file's, so only the I/O check can tell."""
    import onnx
    from nxc.manifest import write_manifest
    from nxc.runtime.backends import BackendError
    from nxc.runtime.pipeline import Pipeline
    build = shutil.copytree(embedded_build, tmp_path / "build")
    path = build / "graphs" / "loc_heads.onnx"
    model = onnx.load(str(path))
    _hidden_as_float16(model)
    onnx.save(model, str(path))
    data = json.loads((build / "manifest.json").read_text())
    data.pop("files"), data.pop("schema")
    write_manifest(build, data)
    pipe = Pipeline.load(build)                                # hashes verified: they match the swapped file
    with pytest.raises(BackendError, match=exactly(f"{path}: input 'hidden' is float16 [?, 192] but the manifest says "
                                                   f"float32 [detections, 192]{NOT_THIS_BUILD}")):
        pipe.runner("loc_heads")


def _tensor(data, graph, kind, name):
    return next(t for t in data["graphs"][graph][kind] if t["name"] == name)


@pytest.mark.parametrize("graph,edit,message", [
    ("loc_heads", lambda d: _tensor(d, "loc_heads", "inputs", "boxes").update(dtype="float16"),
     "input 'boxes' is float32 [?, 4] but the manifest says float16 [boxes, 4]"),
    ("loc_heads", lambda d: _tensor(d, "loc_heads", "outputs", "box").update(shape=["detections", 5]),
     "output 'box' is float32 [?, 4] but the manifest says float32 [detections, 5]"),
    ("loc_heads", lambda d: _tensor(d, "loc_heads", "outputs", "seg_prompt").update(shape=["detections", 4, 64, 1]),
     "output 'seg_prompt' is float32 [?, 4, 64] but the manifest says float32 [detections, 4, 64, 1]"),
    ("sam_encoder", lambda d: _tensor(d, "sam_encoder", "inputs", "image").update(shape=["batch", 3, 256, 256]),
     "input 'image' is float32 [1, 3, 256, 256] but the manifest says float32 [batch, 3, 256, 256]"),
    ("sam_decoder", lambda d: _tensor(d, "sam_decoder", "outputs", "iou").update(name="scores"),
     "graph outputs ['low_res_masks', 'iou'] differ from the manifest's ['low_res_masks', 'scores']"),
])
def test_graph_io_other_than_the_manifests_is_refused(embedded_build, tmp_path, graph, edit, message):
    """The same check from the other side: the manifest (not hashed itself) edited to describe another graph."""
    from nxc.runtime.backends import BackendError
    from nxc.runtime.pipeline import Pipeline
    build = shutil.copytree(embedded_build, tmp_path / "build")
    data = json.loads((build / "manifest.json").read_text())
    edit(data)
    (build / "manifest.json").write_text(json.dumps(data))
    pipe = Pipeline.load(build)
    with pytest.raises(BackendError, match=exactly(f"{build / 'graphs' / graph}.onnx: {message}{NOT_THIS_BUILD}")):
        pipe.runner(graph)


# -- one Conversation, two threads -----------------------------------------------------------------------------------

OTHER_THREAD = ("this Conversation is answering in another thread; give each thread its own "
                "(pipe.conversation(image))")
QUESTION = "Where is the red circle in the image?"


def test_a_conversation_answering_in_another_thread_refuses_a_second_turn(embedded_pipe):
    conv = embedded_pipe.conversation(RGB)
    answering, go_on, got = threading.Event(), threading.Event(), {}

    def first_turn():
        events = conv.stream(QUESTION, max_new_tokens=8)
        next(events)                                       # prefill done, one token out: the turn is under way
        answering.set()
        go_on.wait(60)
        got["result"] = [e for e in events if hasattr(e, "result")][0].result

    thread = threading.Thread(target=first_turn)
    thread.start()
    try:
        assert answering.wait(60)
        with pytest.raises(RuntimeError, match=exactly(OTHER_THREAD)):
            conv.ask("And the blue square?", max_new_tokens=4)
        with pytest.raises(RuntimeError, match=exactly(OTHER_THREAD)):
            conv.add_turn("What is this?", "A square.")
    finally:
        go_on.set()
        thread.join()
    alone = embedded_pipe.chat(RGB, QUESTION, max_new_tokens=8)
    assert got["result"].token_ids == alone.token_ids and len(conv.history) == 1     # the first turn was untouched
    assert conv.ask("And the blue square?", max_new_tokens=4).token_ids             # free once the turn ended


def test_an_unfinished_stream_holds_its_conversation_until_closed(embedded_pipe):
    conv = embedded_pipe.conversation(RGB)
    events = conv.stream(QUESTION, max_new_tokens=8)
    next(events)
    with pytest.raises(RuntimeError, match=exactly("this Conversation is still answering: finish the stream it gave "
                                                   "(or close() it) before the next turn")):
        conv.ask("And the blue square?", max_new_tokens=4)
    events.close()
    assert conv.ask("And the blue square?", max_new_tokens=4).token_ids


@pytest.mark.parametrize("text,message", [
    ("where is \udcff it?", r"^the prompt is not valid Unicode text \(surrogates not allowed at character 9\); pass the "
                            r"question as UTF-8 text$"),
    (b"where is it?", r"^the prompt must be text \(str\), got bytes$"),
])
def test_a_prompt_that_is_not_text_is_one_line(embedded_pipe, text, message):
    from PIL import Image

    from nxc.prompt import PromptError
    with pytest.raises(PromptError, match=message):
        embedded_pipe.chat(Image.new("RGB", (32, 32)), text)
