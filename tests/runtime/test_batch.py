"""Continuous batching (nxc.runtime.batch): each turn's answer equals Pipeline.chat's however turns interleave."""
import threading
import time

import numpy as np
import pytest

from nxc.runtime.batch import Batcher, Closed, QueueFull
from nxc.runtime.kv_cache import BatchCache
from nxc.runtime.pipeline import Box, Done, Token

from test_pipeline import assert_same, embedded_prompts


@pytest.fixture(scope="module")
def prompts():
    return embedded_prompts(n_per_task=3, seed=5)


@pytest.fixture(scope="module")
def alone(embedded_pipe, prompts):
    """Each prompt answered alone (batch 1)."""
    return [embedded_pipe.chat(img, q, boxes=b, max_new_tokens=40) for _, img, q, b in prompts]


def test_batched_answers_equal_batch_1_with_staggered_arrivals(embedded_pipe, prompts, alone):
    """16 turns, at most 4 rows at once, submitted from 3 threads at different times: triggers fire at different
    steps, rows end early and free their slot for the next."""
    b = Batcher(embedded_pipe, max_batch=4, max_queue=64)
    handles = [None] * len(prompts)

    def submit(ks, delay):
        for k in ks:
            time.sleep(delay)
            _, img, q, boxes = prompts[k]
            handles[k] = b.submit(embedded_pipe.conversation(img), q, boxes=boxes, max_new_tokens=40)
    threads = [threading.Thread(target=submit, args=(range(j, len(prompts), 3), 0.05 * j)) for j in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [h.result() for h in handles]
    b.close()
    for k, (r, q) in enumerate(zip(results, alone)):
        assert_same(r, q, f"prompt {k}: {prompts[k][2]}")
    assert any(r.detections for r in results) and any(not r.detections for r in results)
    assert max(b.rows_per_step) > 1, "rows were decoded together"


def test_stream_events_and_max_new_tokens(embedded_pipe, prompts, alone):
    b = Batcher(embedded_pipe, max_batch=2)
    k = next(i for i, r in enumerate(alone) if r.detections)
    _, img, q, boxes = prompts[k]
    events = list(b.submit(embedded_pipe.conversation(img), q, boxes=boxes, max_new_tokens=40))
    one = list(embedded_pipe.stream(img, q, boxes=boxes, max_new_tokens=40))
    assert [type(e) for e in events] == [type(e) for e in one]
    assert "".join(e.text for e in events if isinstance(e, Token)) == "".join(e.text for e in one if isinstance(e, Token))
    assert [e.index for e in events if isinstance(e, Box)] == [e.index for e in one if isinstance(e, Box)]
    short = b.submit(embedded_pipe.conversation(img), q, max_new_tokens=3).result()
    assert len(short.token_ids) <= 4 and short.finish_reason in ("length", "stop")
    b.close()


def test_a_cancelled_row_frees_its_slot_and_others_are_unchanged(embedded_pipe, prompts, alone):
    import time
    b = Batcher(embedded_pipe, max_batch=2)
    real = b.runner

    class Slowed:                     # 20 ms a step: the cancel below lands long before the reply could end
        def __getattr__(self, name):
            return getattr(real, name)

        def run_rows(self, *args, **kwargs):
            time.sleep(0.02)
            return real.run_rows(*args, **kwargs)
    b.runner = Slowed()
    _, img, q, boxes = prompts[0]
    gone = b.submit(embedded_pipe.conversation(img), "Describe the image.", max_new_tokens=40)
    it = iter(gone)
    next(it)                                       # it is decoding
    gone.cancel()
    keep = [b.submit(embedded_pipe.conversation(prompts[k][1]), prompts[k][2], boxes=prompts[k][3],
                     max_new_tokens=40) for k in (1, 2, 3)]
    assert not any(isinstance(e, Done) for e in it), "a cancelled turn ends without a result"
    for k, h in zip((1, 2, 3), keep):
        assert_same(h.result(), alone[k], f"prompt {k}")
    b.close()
    assert all(v is None for v in b.cache.views), "every slot was given back"


def test_admission_limits_and_draining(embedded_pipe, prompts, alone):
    b = Batcher(embedded_pipe, max_batch=1, max_queue=1)
    _, img, q, boxes = prompts[0]
    first = b.submit(embedded_pipe.conversation(img), q, boxes=boxes, max_new_tokens=40)
    with pytest.raises(QueueFull, match="max_queue 1"):
        for _ in range(5):                          # one waits; the row may or may not have taken the first yet
            b.submit(embedded_pipe.conversation(img), q, boxes=boxes, max_new_tokens=40)
    b.close(drain=True)
    assert_same(first.result(), alone[0], "drained")
    with pytest.raises(Closed):
        b.submit(embedded_pipe.conversation(img), q, max_new_tokens=4)


def test_bad_input_raises_in_the_caller(embedded_pipe, prompts):
    b = Batcher(embedded_pipe, max_batch=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        b.submit(embedded_pipe.conversation(prompts[0][1]), "hi", max_new_tokens=0)
    b.close()


def test_batch_cache_moves_rows_and_grows_its_stride():
    c = BatchCache(num_layers=1, num_kv_heads=2, head_dim=3, slots=3, capacity=300)
    a, b = c.open(0), c.open(1)
    for name, buf in c.buffers.items():
        buf[0, :5] = 1.0
        buf[1, :7] = 2.0
    a.advance(5), b.advance(7)
    c.reserve(200)
    assert c.stride == 256 and all((buf[1, :7] == 2).all() for buf in c.buffers.values())
    c.close(0)
    c.move(1, 0)
    assert b.slot == 0 and b.length == 7 and all((buf[0, :7] == 2).all() for buf in c.buffers.values())
    with pytest.raises(Exception, match="context of 300"):
        c.reserve(301)
    x = c.step_inputs(1, np.zeros((1, 1, 4), np.float32))
    assert x["attention_mask"].shape == (1, 257) and x["attention_mask"][0].sum() == 8
    assert x["position_ids"].tolist() == [[7]]


def test_n_completions_from_one_prefill_equal_seeded_turns(embedded_pipe, prompts):
    """n = 3 sampled completions of one prompt: completion i equals Pipeline.chat with seed + i."""
    b = Batcher(embedded_pipe, max_batch=4)
    img, q = prompts[4][1], "Describe the image with locations."
    kw = dict(max_new_tokens=30, temperature=1.8, seed=7)
    handles = b.submit_n(embedded_pipe.conversation(img), q, 3, **kw)
    got = [h.result() for h in handles]
    b.close()
    for i, r in enumerate(got):
        assert_same(r, embedded_pipe.chat(img, q, **{**kw, "seed": 7 + i}), f"completion {i}")
    assert len({tuple(r.token_ids) for r in got}) > 1, "different seeds sample differently"
    with pytest.raises(ValueError, match="n must be"):
        Batcher(embedded_pipe, max_batch=2).submit_n(embedded_pipe.conversation(img), q, 3)


def test_low_memory_unloads_the_once_per_image_sessions_and_answers_the_same(embedded_build, embedded_pipe, prompts,
                                                                             alone):
    from nxc import names
    from nxc.runtime.pipeline import Pipeline
    lean = Pipeline.load(embedded_build, low_memory=True)
    k = next(i for i, r in enumerate(alone) if r.detections)       # a grounded reply: SAM runs too
    _, img, q, boxes = prompts[k]
    for _ in range(2):                                               # the sessions come back for the next image
        assert_same(lean.chat(img, q, boxes=boxes, max_new_tokens=40), alone[k], "low memory")
        assert names.GRAPH_VISION not in lean._runners and names.GRAPH_SAM_ENCODER not in lean._runners
        assert names.GRAPH_LLM in lean._runners
    assert names.GRAPH_VISION in embedded_pipe._runners, "the default keeps them"
    # a grounded turn gives its KV cache back before SAM runs; the next turn prefills again and answers the same
    convs = [lean.conversation(img), embedded_pipe.conversation(img)]
    seen = []
    sam = lean.run_once_per_image
    lean.run_once_per_image = lambda graph, **f: (seen.append((graph, convs[0].cache.length)), sam(graph, **f))[1]
    first = [c.ask(q, boxes=boxes, max_new_tokens=40) for c in convs]
    assert (names.GRAPH_SAM_ENCODER, 0) in seen, f"SAM ran beside a filled cache: {seen}"
    assert convs[1].cache.length > 0, "the default keeps the cache"
    assert_same(first[0], first[1], "low memory, first turn")
    follow = [c.ask("What else is in the image?", max_new_tokens=20) for c in convs]
    assert_same(follow[0], follow[1], "low memory, next turn")


def test_n_grounded_completions_share_one_sam_encoding(embedded_build, prompts, alone):
    from nxc import names
    from nxc.runtime.pipeline import Pipeline
    pipe = Pipeline.load(embedded_build)
    calls = []
    run = pipe.run
    pipe.run = lambda graph, **feeds: (calls.append(graph), run(graph, **feeds))[1]
    k = next(i for i, r in enumerate(alone) if r.detections)
    _, img, q, boxes = prompts[k]
    b = Batcher(pipe, max_batch=4)
    got = [h.result() for h in b.submit_n(pipe.conversation(img), q, 3, boxes=boxes, max_new_tokens=40)]
    b.close()
    for r in got:                                         # greedy: three copies of the one answer, masks included
        assert_same(r, alone[k], "greedy completion")
    assert calls.count(names.GRAPH_SAM_ENCODER) == 1 and calls.count(names.GRAPH_SAM_DECODER) == 3
