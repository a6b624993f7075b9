"""Beam search in the runtime: the same ids, boxes and masks as the PyTorch reference's beam search, triggers included."""
import numpy as np
import pytest

from nxc.runtime.pipeline import Box, Done, Token
from test_pipeline import assert_same, embedded_prompts


@pytest.mark.parametrize("k,num_beams,lp,early", [(0, 3, 1.0, False), (1, 5, 1.0, False), (5, 2, 0.5, True),
                                                   (10, 3, 1.0, "never"), (20, 4, 1.0, False)])
def test_runtime_beams_equal_the_reference(embedded_pipe, embedded_ref, k, num_beams, lp, early):
    task, image, question, boxes = embedded_prompts()[k]
    kw = dict(boxes=boxes, max_new_tokens=40, num_beams=num_beams, length_penalty=lp, early_stopping=early)
    r = embedded_pipe.chat(image, question, **kw)
    q = embedded_ref.chat(image, question, **kw)
    assert_same(r, q, f"{task}, {num_beams} beams: {question}")
    if task == "rec":
        assert r.detections, "the grounding prompt gives boxes with beams too"


def test_beam_stream_events_follow_the_winner(embedded_pipe):
    task, image, question, boxes = embedded_prompts()[0]
    events = list(embedded_pipe.stream(image, question, boxes=boxes, max_new_tokens=40, num_beams=3))
    done = events[-1]
    assert isinstance(done, Done)
    assert [e.id for e in events if isinstance(e, Token)] == done.result.token_ids
    assert len([e for e in events if isinstance(e, Box)]) == len(done.result.detections)


def test_a_follow_up_turn_after_beams_equals_one_rebuilt_from_the_messages(embedded_pipe):
    task, image, question, boxes = embedded_prompts()[0]
    conv = embedded_pipe.conversation(image)
    first = conv.ask(question, boxes=boxes, max_new_tokens=40, num_beams=3)
    again = conv.ask("Describe the image.", max_new_tokens=20)
    fresh = embedded_pipe.conversation(image)
    fresh.add_turn(question, first.raw_text, boxes=boxes, reply_boxes=[d.box_norm for d in first.detections])
    assert fresh.ask("Describe the image.", max_new_tokens=20).token_ids == again.token_ids


def test_beams_are_not_greedy_in_disguise(embedded_pipe):
    """Over the test prompts, 5 beams change some answer (else the beam tests above prove nothing)."""
    differ = 0
    for task, image, question, boxes in embedded_prompts(n_per_task=3, seed=3):
        g = embedded_pipe.chat(image, question, boxes=boxes, max_new_tokens=40)
        b = embedded_pipe.chat(image, question, boxes=boxes, max_new_tokens=40, num_beams=5)
        differ += g.token_ids != b.token_ids
    assert differ > 0


@pytest.mark.parametrize("kw,msg", [({"num_beams": 0}, "num_beams"), ({"num_beams": 2, "temperature": 0.7}, "temperature 0"),
                                    ({"num_beams": 2, "early_stopping": "sometimes"}, "early_stopping")])
def test_bad_beam_arguments(embedded_pipe, kw, msg):
    image = embedded_prompts()[0][1]
    with pytest.raises(ValueError, match=msg):
        embedded_pipe.chat(image, "hi", **kw)
