"""VITRON's module calls parsed from streamed reply text (nxc.module_calls): whole text and character by character
give the same calls, each handed out only once complete; what a model can write wrong is a CallError, never a
raise."""
import pytest

from nxc.module_calls import CallError, ModuleCall, ModuleCallParser, parse_region, split_instruction

SEG = ("Sure. <module>B</module><instruction>segmentation: the red circle</instruction>"
       "<region>[10, 12, 40, 44]</region> Done.")


def parse(text: str, *, stream: bool) -> list:
    p = ModuleCallParser()
    out = []
    if stream:
        for i in range(1, len(text) + 1):
            out += p.feed(text[:i])
    else:
        out += p.feed(text)
    return out + p.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_segmentation_call(stream):
    calls = parse(SEG, stream=stream)
    assert calls == [ModuleCall("B", ("segmentation",), ("the red circle",), (10.0, 12.0, 40.0, 44.0),
                                SEG.index("<module>"), SEG.index(" Done."))]


def test_a_call_is_handed_out_when_its_region_closes_not_before():
    p = ModuleCallParser()
    cut = SEG.index("</region>")
    assert p.feed(SEG[:cut]) == [] and p.feed(SEG[:cut + 5]) == []
    assert [c.module for c in p.feed(SEG[:cut + len("</region>")])] == ["B"]
    assert p.feed(SEG) == [] and p.close() == []


@pytest.mark.parametrize("stream", [False, True])
def test_calls_without_region_end_at_text_next_module_or_reply_end(stream):
    text = ("<module>A</module><instruction>generation: a red circle</instruction>"
            "<instruction>generation: a blue star</instruction>"
            "<module>C</module><instruction>editing: make it green</instruction> ok "
            "<module>B</module><instruction>the cat</instruction>")
    calls = parse(text, stream=stream)
    assert [(c.module, c.instructions, c.region) for c in calls] == [
        ("A", ("a red circle", "a blue star"), None), ("C", ("make it green",), None), ("B", ("the cat",), None)]
    assert calls[0].tasks == ("generation", "generation") and calls[2].tasks == ("",)


def test_a_partial_tag_at_the_end_waits():
    p = ModuleCallParser()
    head = "<module>A</module><instruction>x: y</instruction><reg"
    assert p.feed(head) == []
    assert p.feed(head + "ion>(1,2,3,4)</region>")[0].region == (1.0, 2.0, 3.0, 4.0)


@pytest.mark.parametrize("text, reason", [
    ("<module>B</module><instruction>seg: the cat", "<instruction> is never closed"),
    ("<module>B", "<module> is never closed"),
    ("<module>B</module> and nothing else", "called without an <instruction>"),
    ("<module>B</module><instruction>seg: x</instruction><region>[1, 2, 3]</region>", "4 numbers"),
    ("<module>B</module><instruction>seg: x</instruction><region>[5, 2, 3, 4]</region>", "x2 > x1"),
    ("<instruction>seg: x</instruction>", "outside a module call"),
    ("</module>", "</module> without <module>"),
    ("<module>B<instruction>x</instruction>", "<module> is not closed before <instruction>"),
    ("<module></module><instruction>x</instruction>", "names no module"),
])
def test_what_a_model_writes_wrong_is_an_error_not_a_raise(text, reason):
    for stream in (False, True):
        out = parse(text, stream=stream)
        errors = [c for c in out if isinstance(c, CallError)]
        assert errors and reason in errors[0].reason, (stream, out)
        assert not [c for c in out if isinstance(c, ModuleCall)] or "never closed" not in reason


def test_helpers():
    assert split_instruction("segmentation: the zebra: far away") == ("segmentation: the zebra", "far away")
    assert split_instruction("  the zebra ") == ("", "the zebra")
    assert parse_region("(0.1, .2, 0.5, 6e-1)") == (0.1, 0.2, 0.5, 0.6)
    assert "got 0" in parse_region("the left one")


def test_a_region_may_name_a_region_input_or_the_box_a_trigger_decodes():
    from nxc import names
    from nxc.module_calls import AT, SLOT, ModuleCallParser
    from nxc.prompt import SLOT as PROMPT_SLOT
    assert (AT, SLOT) == (names.AT, PROMPT_SLOT)
    text = ("Yes <at> <boxes> . <module>A</module><instruction>a red circle</instruction><region>[1]</region> "
            "<module>B</module><instruction>segmentation: it</instruction><region><at> <boxes></region>")
    p = ModuleCallParser()
    calls = p.feed(text) + p.close()
    assert [(c.module, c.region, c.region_ref, c.region_slot, c.has_region) for c in calls] == [
        ("A", None, 1, None, True), ("B", None, None, 1, True)]
    p = ModuleCallParser()
    bad = p.feed("<module>B</module><instruction>x</instruction><region><at> <boxes> 3</region>") + p.close()
    assert "a grounded region is one '<at> <boxes>' and nothing else" in bad[0].reason
