"""ChatRex-style answers by proposal index (nxc.object_index): the parser's one-line behaviours."""
import pytest

from nxc.object_index import ADDED_TOKENS, IndexTokens, ObjectIndexParser, obj_token

VOCAB = {s: 1000 + i for i, s in enumerate(ADDED_TOKENS)}
WORDS = {"the": 1, "red": 2, "circle": 3, "and": 4, "a": 5, "square": 6, ".": 7}
IDS = {**VOCAB, **WORDS}
NAMES = {v: k for k, v in IDS.items()}


def ids(text: str) -> list[int]:
    return [IDS[w] for w in text.split()]


def parse(text: str, n: int):
    p = ObjectIndexParser(IndexTokens.from_vocab(IDS.__getitem__), n, lambda xs: " ".join(NAMES[x] for x in xs))
    events = [g for g in map(p.feed, ids(text)) if g is not None]
    return events, p


def test_a_phrase_and_its_objects():
    (g,), p = parse("<ground> the red circle </ground> <objects> <obj3> <obj1> </objects> .", 5)
    assert (g.phrase, g.indices, g.dropped) == ("the red circle", [3, 1], []) and not p.open


def test_two_groundings_each_when_its_objects_close():
    text = "<ground> the red circle </ground> <objects> <obj0> </objects> and <ground> a square </ground> " \
           "<objects> <obj2> </objects>"
    p = ObjectIndexParser(IndexTokens.from_vocab(IDS.__getitem__), 3, lambda xs: " ".join(NAMES[x] for x in xs))
    seen = []
    for k, t in enumerate(ids(text)):
        g = p.feed(t)
        if g is not None:
            seen.append((k, g.phrase, g.indices))
    assert seen == [(7, "the red circle", [0]), (15, "a square", [2])]


@pytest.mark.parametrize("text,n,want,still_open", [
    # out of range: dropped (an empty proposal list drops all, the phrase stays)
    ("<ground> a square </ground> <objects> <obj1> <obj9> </objects>", 2, [("a square", [1], [9])], False),
    ("<ground> a square </ground> <objects> <obj0> </objects>", 0, [("a square", [], [0])], False),
    # repeats kept once; words inside <objects> ignored
    ("<ground> a square </ground> <objects> <obj1> the <obj1> <obj0> </objects>", 2, [("a square", [1, 0], [])], False),
    # <objN> outside <objects> is text
    ("the <obj1> circle", 3, [], False),
    # <objects> without a phrase right before it is text; a phrase without objects gives nothing
    ("<objects> <obj1> </objects>", 3, [], False),
    ("<ground> a square </ground> the <objects> <obj1> </objects>", 3, [], False),
    # unclosed at the end (the token limit): nothing
    ("<ground> a square </ground> <objects> <obj1>", 3, [], True),
    ("<ground> a square", 3, [], True),
])
def test_one_line_behaviours(text, n, want, still_open):
    events, p = parse(text, n)
    assert [(g.phrase, g.indices, g.dropped) for g in events] == want
    assert p.open == still_open


def test_bad_proposal_count():
    with pytest.raises(ValueError, match="num_proposals"):
        ObjectIndexParser(IndexTokens.from_vocab(IDS.__getitem__), -1, str)


def test_one_hundred_object_tokens():
    assert obj_token(0) == "<obj0>" and obj_token(99) == "<obj99>" and len(ADDED_TOKENS) == 105


def test_render_numbers_the_boxes_and_keeps_a_grounding_without_boxes_as_its_phrase():
    from nxc.object_index import render, settled
    raw = ("<ground> a red circle </ground> <objects> <obj3> </objects> and <ground> a square </ground> <objects> "
           "<obj9> </objects> and <ground> two stars </ground> <objects> <obj0> <obj1> <obj0> </objects> .")
    assert render(raw, 5) == "a red circle [0] and a square and two stars [1, 2] ."
    growing = render("<ground> a red circle </ground> <objects> <obj3> </objects> and <ground> a sq", 5)
    assert growing[:settled(growing)] == "a red circle [0] and "
    assert settled("a red circle [0] and <obj") == len("a red circle [0] and ")


def test_retrieval_prompt_lists_the_objects_after_the_image_and_region_boxes_after_them():
    from nxc.prompt import PromptFormat, Turn, prompt_segments
    fmt = PromptFormat(objects=2)
    segs, order = prompt_segments("What is [0] next to [1]?", num_image_tokens=2, num_boxes=2, fmt=fmt,
                                  history=[Turn("Find the <obj1> please [0]",
                                                "<ground>a red circle</ground><objects><obj1></objects> .")])
    text = "".join(s.text for s in segs)
    span = "<im_start><im_patch><im_patch><im_end>"
    assert text.startswith(f"{names_system()} USER: {span}\n<obj0><objfeat><obj1><objfeat>\nFind the <obj1> please "
                           "<obj2><objfeat> ASSISTANT: <ground>a red circle</ground><objects><obj1></objects> .</s>")
    assert text.endswith("USER: What is <obj3><objfeat> next to <obj4><objfeat>? ASSISTANT:") and order == [0, 1]
    control = [s.text for s in segs if s.control]
    plain = [s.text for s in segs if not s.control]
    assert "Find the <obj1> please " in plain, "an index the user typed stays text"
    assert any(c.endswith("<ground>") for c in control) and "</ground><objects><obj1></objects>" in control, \
        "an earlier reply's tags and indices are tokens"


def names_system():
    from nxc import names
    return names.SYSTEM_PROMPT
