"""Batcher admission: a turn that a free row will start is served whatever max_queue says; max_queue bounds only the
turns that wait for a row. Rows count as taken from the moment they are promised (decoding, prefilling, or waiting
for the prefill behind a turn that fits); a turn of n completions needs n rows."""
import threading

import numpy as np
import pytest

from nxc.runtime.batch import Batcher, Closed, QueueFull
from nxc.shapes.data import make_scene
from gate import Gate


@pytest.fixture
def held(embedded_pipe):
    """Batcher(max_batch, max_queue) with its scheduler held by a Gate; opened and closed after the test."""
    made = []

    def make(max_batch, max_queue):
        b = Batcher(embedded_pipe, max_batch=max_batch, max_queue=max_queue)
        b.runner = Gate(b.runner)
        made.append(b)
        return b
    yield make
    for b in made:
        b.runner.open()
        b.close(drain=False, timeout=30)


@pytest.fixture(scope="module")
def image():
    return make_scene(np.random.default_rng(3)).image


def ask(b, pipe, image, n=1):
    return b.submit_n(pipe.conversation(image), "Describe the image.", n, max_new_tokens=6)


def test_max_queue_0_serves_while_a_row_is_free(held, embedded_pipe, image):
    b = held(max_batch=2, max_queue=0)
    first = ask(b, embedded_pipe, image)
    second = ask(b, embedded_pipe, image)       # the scheduler is held: it waits for the prefill, its row promised
    with pytest.raises(QueueFull, match="max_queue 0"):
        ask(b, embedded_pipe, image)
    b.runner.open()
    assert all(h.result() is not None for h in first + second)
    assert ask(b, embedded_pipe, image)[0].result() is not None, "served again once the rows are free"


def test_max_queue_0_under_concurrent_submits_admits_exactly_the_free_rows(held, embedded_pipe, image):
    """12 turns at once on 2 held rows: 2 are served, 10 refused (no two submitters promised the same row)."""
    b = held(max_batch=2, max_queue=0)
    outcomes, lock, start = [], threading.Lock(), threading.Barrier(12)

    def one():
        start.wait()
        try:
            handles = ask(b, embedded_pipe, image)
        except QueueFull:
            handles = None
        with lock:
            outcomes.append(handles)
    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    served = [h for h in outcomes if h is not None]
    assert len(served) == 2, f"2 free rows, {len(served)} turns served"
    b.runner.open()
    assert all(hs[0].result() is not None for hs in served)
    assert ask(b, embedded_pipe, image)[0].result() is not None, "one more, alone, is served"


def test_a_full_batch_queues_up_to_max_queue(held, embedded_pipe, image):
    b = held(max_batch=2, max_queue=1)
    turns = [ask(b, embedded_pipe, image) for _ in range(3)]  # 2 take the rows, 1 waits for one
    with pytest.raises(QueueFull, match="1 turns wait for a row"):
        ask(b, embedded_pipe, image)
    assert b.stats()["waiting"] + b.stats()["rows"] == 3
    b.runner.open()
    assert all(hs[0].result() is not None for hs in turns)


def test_n_completions_take_n_rows(held, embedded_pipe, image):
    b = held(max_batch=3, max_queue=0)
    pair = ask(b, embedded_pipe, image, n=2)
    with pytest.raises(QueueFull, match="2 needed, 1 of 3 free"):
        ask(b, embedded_pipe, image, n=2)           # 1 row free
    one = ask(b, embedded_pipe, image, n=1)
    with pytest.raises(QueueFull):
        ask(b, embedded_pipe, image, n=1)
    with pytest.raises(ValueError, match="from 1 to the batch's 3 rows, got 4"):
        ask(b, embedded_pipe, image, n=4)           # could never start: refused, not queued forever
    b.runner.open()
    assert all(h.result() is not None for h in pair + one)


def test_turns_start_in_order_so_a_turn_behind_a_waiting_one_waits_too(held, embedded_pipe, image):
    b = held(max_batch=3, max_queue=1)
    first = ask(b, embedded_pipe, image, n=2)       # rows 0-1
    second = ask(b, embedded_pipe, image, n=2)      # waits for a row: 1 free, 2 needed
    with pytest.raises(QueueFull, match="1 turns wait for a row"):
        ask(b, embedded_pipe, image, n=1)           # the free row is not its: the scheduler starts turns in order
    b.runner.open()
    assert all(h.result() is not None for h in first + second)


def test_a_draining_batcher_refuses_as_closed_even_with_rows_free(held, embedded_pipe, image):
    b = held(max_batch=2, max_queue=0)
    running = ask(b, embedded_pipe, image)
    b.close(drain=True, timeout=0)
    with pytest.raises(Closed, match="shutting down"):
        ask(b, embedded_pipe, image)
    b.runner.open()
    assert running[0].result() is not None, "the admitted turn is drained, not dropped"
    b._thread.join(30)
    assert not b._thread.is_alive()
