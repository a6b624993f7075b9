import pytest

from nxc import names
from nxc.prompt import PromptError, Turn, build_prompt, expand_region_refs, render

SPAN3 = names.IM_START + names.IM_PATCH * 3 + names.IM_END


def test_single_turn_template_exact():
    text, order = build_prompt("Where is the dog in the image?", num_image_tokens=3)
    assert text == (names.SYSTEM_PROMPT + " USER: " + SPAN3 + " Where is the dog in the image? ASSISTANT:")
    assert order == []


def test_image_placeholder_kept_where_the_user_put_it():
    text, _ = build_prompt("Look: <image> what is it?", num_image_tokens=3)
    assert "USER: Look: " + SPAN3 + " what is it? ASSISTANT:" in text


def test_multi_turn_uses_sep2_after_assistant():
    text = render([Turn("q1", "a1 <at> <boxes> ."), Turn("q2")], 3)
    assert text.endswith("USER: " + SPAN3 + " q1 ASSISTANT: a1 <at> <boxes> .</s>USER: q2 ASSISTANT:")
    assert text.count(names.IM_START) == 1


@pytest.mark.parametrize("text,n,expanded,order", [
    ("What is region [0]?", 1, "What is region <at> <boxes>?", [0]),
    ("Compare [0,1] and [1]", 2, "Compare <at> <boxes> <at> <boxes> and <at> <boxes>", [0, 1, 1]),
    ("trailing [1, 0,]", 2, "trailing <at> <boxes> <at> <boxes>", [1, 0]),
    ("no refs [a] [] [-1] {x}", 0, "no refs [a] [] [-1] {x}", []),
])
def test_region_refs(text, n, expanded, order):
    assert expand_region_refs(text, n) == (expanded, order)


@pytest.mark.parametrize("text,n,message", [
    ("What is region [2]?", 1, "refers to region 2"),
    ("What is region [0]?", 2, "never refers to box 1"),
    ("   ", 0, "the prompt is empty"),
])
def test_prompt_errors(text, n, message):
    with pytest.raises(PromptError, match=message):
        build_prompt(text, num_image_tokens=3, num_boxes=n)


def test_literal_braces_survive():
    text, _ = build_prompt("What is {this} {0}?", num_image_tokens=1)
    assert "What is {this} {0}? ASSISTANT:" in text
