"""nxc-serve's admission over HTTP: `--max-queue 0` serves while a row is free and answers 503 only when none is;
n completions need n rows, and more than --max-batch are refused (400), never queued."""
import threading
import time

import httpx
import numpy as np
import pytest

from gate import Gate
from nxc.shapes.data import make_scene
from serve_helpers import LiveServer
from test_api import user


@pytest.fixture
def one_row(embedded_build, embedded_pipe):
    """`nxc-serve --max-batch 1 --max-queue 0` with its scheduler held (a Gate, opened at the end)."""
    from nxc.serve.app import create_app
    app = create_app(embedded_build, pipeline=embedded_pipe, max_batch=1, max_queue=0)
    srv = app.state.server
    gate = srv.batcher.runner = Gate(srv.batcher.runner)
    try:
        with LiveServer(app) as live:
            yield live, srv, gate
    finally:
        gate.open()


def chat(url, results=None, **extra):
    body = {"messages": [user("Describe the image.", make_scene(np.random.default_rng(4)).image)], "max_tokens": 8,
            **extra}
    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/v1/chat/completions", json=body)
    if results is not None:
        results.append(r)
    return r


def test_max_queue_0_serves_while_a_row_is_free_and_503s_when_none_is(one_row):
    live, srv, gate = one_row
    first = []
    t = threading.Thread(target=chat, args=(live.url, first))
    t.start()
    deadline = time.monotonic() + 30
    while sum(srv.batcher.stats()[k] for k in ("rows", "waiting")) == 0 and not first:
        assert time.monotonic() < deadline, "the first request never reached the scheduler"
        time.sleep(0.02)
    assert not first, f"the first request was answered at once: {first[0].status_code} {first[0].text}"
    busy = chat(live.url)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1", busy.text
    assert busy.json()["error"]["code"] == "overloaded" and "max_queue 0" in busy.json()["error"]["message"]
    gate.open()
    t.join(timeout=120)
    assert first[0].status_code == 200, first[0].text
    again = chat(live.url)
    assert again.status_code == 200, f"served again once the row freed: {again.text}"


def test_twelve_at_once_then_one_alone(one_row):
    """The issue's report: 12 concurrent chats on --max-batch 1 --max-queue 0, then one more alone."""
    live, _, gate = one_row
    gate.open()
    results = []
    threads = [threading.Thread(target=chat, args=(live.url, results)) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    codes = sorted(r.status_code for r in results)
    assert set(codes) <= {200, 503} and 200 in codes, codes
    assert chat(live.url).status_code == 200


def test_n_over_max_batch_is_refused_not_queued(one_row):
    live, _, gate = one_row
    gate.open()
    r = chat(live.url, n=2, temperature=1.0)
    assert r.status_code == 400, r.text
    assert "--max-batch 1" in r.json()["error"]["message"], r.text
