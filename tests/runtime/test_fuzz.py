"""Property-based tests: the prompt parser, region references, box checks and image loading never fail in an
undefined way (only their own one-line errors)."""
import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from nxc.runtime.images import ImageError, load_image
from nxc.runtime.turn import check_boxes
from nxc.prompt import SLOT, PromptError, build_prompt, expand_region_refs

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80) | \
    st.lists(st.sampled_from(["[0]", "[1]", "[0,1]", "[ 2 , 0 ]", "[", "]", "{}", "{0}", " ", "x", "<at>", "ü",
                              "[0,]", "[-1]", "[99999999999]"]), max_size=12).map("".join)


@given(text=TEXT, n=st.integers(0, 4))
def test_region_refs(text, n):
    try:
        expanded, order = expand_region_refs(text, n)
    except PromptError as e:
        assert "refers to region" in str(e)
        return
    assert all(0 <= i < n for i in order)
    assert expanded.count(SLOT) - text.count(SLOT) == len(order)


@given(text=TEXT, n=st.integers(0, 3))
def test_build_prompt(text, n):
    try:
        prompt, order = build_prompt(text, num_image_tokens=4, num_boxes=n)
    except PromptError:
        return
    assert prompt.endswith("ASSISTANT:") and prompt.count("<im_start>") >= 1
    assert sorted(set(order)) == list(range(n))


BOX = st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=0, max_size=9)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60, deadline=None)
@given(values=BOX)
def test_box_checks(embedded_pipe, values):
    conv = embedded_pipe.conversation(Image.new("RGB", (50, 40)))
    try:
        b = check_boxes(values, conv.width, conv.height)
    except PromptError:
        return
    assert b.shape == (len(values) // 4, 4) and np.isfinite(b).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (7, 5), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=300) | st.binary(max_size=60).map(lambda b: _png()[:40] + b)
       | st.integers(0, 120).map(lambda k: _png()[:k]))
def test_image_loading_on_random_bytes(data):
    try:
        img = load_image(data)
    except ImageError as e:
        assert str(e).startswith("<bytes>:")
        return
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1
