"""nxc-serve on the continuous-batching scheduler: n completions, beams, 503 under pressure, disconnects that free
their row, SIGTERM draining, and the batch metrics."""
import signal
import threading
import time

import httpx
import numpy as np
import pytest

from nxc.shapes.data import make_scene
from serve_helpers import LiveServer, free_port, start_nxc_serve
from test_api import join_stream, sse, user


@pytest.fixture(scope="module")
def small(embedded_build, embedded_pipe):
    """A server whose scheduler has 2 rows and room for 1 waiting turn."""
    from nxc.serve.app import create_app
    app = create_app(embedded_build, pipeline=embedded_pipe, max_batch=2, max_queue=1)
    with LiveServer(app) as srv:
        yield srv, app.state.server


def scene(seed=1):
    return make_scene(np.random.default_rng(seed))


def test_n_completions_and_beams_equal_the_pipeline(small, embedded_pipe):
    live, _ = small
    s = scene(2)
    with httpx.Client(base_url=live.url, timeout=120) as c:
        r = c.post("/v1/chat/completions", json={"messages": [user("Describe the image with locations.", s.image)],
                                                 "n": 2, "temperature": 1.8, "seed": 3, "max_tokens": 24})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [ch["index"] for ch in body["choices"]] == [0, 1]
        for i, ch in enumerate(body["choices"]):
            want = embedded_pipe.chat(s.image, "Describe the image with locations.", max_new_tokens=24,
                                      temperature=1.8, seed=3 + i)
            assert ch["token_ids"] == want.token_ids
        assert body["usage"]["completion_tokens"] == sum(len(ch["token_ids"]) for ch in body["choices"])
        q = "Where is the object in the image?"
        r = c.post("/v1/chat/completions", json={"messages": [user(q, s.image)], "num_beams": 3,
                                                 "early_stopping": True, "max_tokens": 40})
        assert r.status_code == 200, r.text
        want = embedded_pipe.chat(s.image, q, max_new_tokens=40, num_beams=3, early_stopping=True)
        assert r.json()["choices"][0]["token_ids"] == want.token_ids


def test_a_full_queue_answers_503_with_retry_after(small):
    live, srv = small
    s = scene(3)
    body = {"messages": [user("Describe the image.", s.image)], "max_tokens": 48}
    statuses, lock = [], threading.Lock()

    def one():
        with httpx.Client(base_url=live.url, timeout=120) as c:
            r = c.post("/v1/chat/completions", json=body)
            with lock:
                statuses.append((r.status_code, r.headers.get("retry-after"), r.json()))
    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy = [x for x in statuses if x[0] == 503]
    assert busy, f"8 requests at once over 2 rows + 1 waiting: some must be refused, got {[x[0] for x in statuses]}"
    assert all(x[1] == "1" and x[2]["error"]["code"] == "overloaded" for x in busy)
    assert any(x[0] == 200 for x in statuses)


@pytest.fixture
def slow_steps(small, monkeypatch):
    """Each batched step 0.3 s slower (the real step, then a sleep): a reply outlives its client."""
    _, srv = small
    real = srv.batcher.runner.run_rows

    def slow(*args):
        out = real(*args)
        time.sleep(0.3)
        return out
    monkeypatch.setattr(srv.batcher.runner, "run_rows", slow)


def test_a_client_that_goes_away_frees_its_row(small, slow_steps):
    live, srv = small
    s = scene(4)
    before = srv.metrics.cancelled_rows
    with httpx.Client(base_url=live.url, timeout=120) as c:
        with c.stream("POST", "/v1/chat/completions",
                      json={"messages": [user("Describe the image.", s.image)], "max_tokens": 400,
                            "stream": True, "temperature": 1.5, "seed": 1}) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    break                                          # one token, then hang up
    deadline = time.monotonic() + 5                # a step is 0.3 s; the reply could run 400
    while srv.metrics.cancelled_rows == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.metrics.cancelled_rows > before, "the stream's end was seen as a cancellation"
    while srv.batcher.stats()["rows"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.batcher.stats()["rows"] == 0, "the abandoned row is freed"
    # and a non-streamed request whose client times out
    with httpx.Client(base_url=live.url, timeout=1.0) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/chat/completions", json={"messages": [user("Describe the image.", s.image)],
                                                 "max_tokens": 400, "temperature": 1.5, "seed": 2})
    deadline = time.monotonic() + 5
    while srv.metrics.cancelled_rows == before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.metrics.cancelled_rows == before + 2, "the timed-out request was cancelled"
    while srv.batcher.stats()["rows"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.batcher.stats()["rows"] == 0, "the row of the client that timed out is freed"


def test_metrics_show_the_scheduler(small):
    live, _ = small
    with httpx.Client(base_url=live.url, timeout=60) as c:
        c.post("/v1/chat/completions", json={"messages": [user("Describe the image.", scene(5).image)],
                                             "max_tokens": 8})
        text = c.get("/metrics").text
    for name in ("nxc_batch_rows ", "nxc_batch_max_rows 2", "nxc_queue_length ", "nxc_batch_steps_total ",
                 "nxc_batch_rows_per_step ", "nxc_queue_wait_seconds_count ", "nxc_cancelled_total "):
        assert name in text, name
    assert 'nxc_stage_seconds_count{stage="prefill"}' in text


def test_sigterm_finishes_the_running_streams_then_stops(embedded_build, embedded_pipe):
    """uvicorn's SIGTERM handler (handle_exit, with sse-starlette's hook) mid-stream: the server stops listening,
    the running stream and a waiting one are finished, then the scheduler stops."""
    from nxc.serve.app import create_app
    app = create_app(embedded_build, pipeline=embedded_pipe, max_batch=1, max_queue=4)
    srv = app.state.server
    real = srv.batcher.runner.run_rows

    def slow(*args):
        out = real(*args)
        time.sleep(0.05)
        return out
    s, q = scene(6), "Describe the image with locations."
    results = {}

    def stream(k):
        with httpx.Client(base_url=live.url, timeout=120) as c:
            try:
                results[k] = sse(c, {"messages": [user(q, s.image)], "max_tokens": 60})
            except Exception as e:  # noqa: BLE001
                results[k] = e
    live = LiveServer(app).__enter__()
    srv.batcher.runner.run_rows = slow
    try:
        threads = [threading.Thread(target=stream, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while srv.batcher.steps < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        live.server.handle_exit(signal.SIGTERM, None)
        for t in threads:
            t.join(timeout=120)
        live.thread.join(timeout=60)
    finally:
        del srv.batcher.runner.run_rows
    want = embedded_pipe.chat(s.image, q, max_new_tokens=60).token_ids
    for k in range(2):
        assert not isinstance(results[k], Exception), results[k]
        assert join_stream(results[k])[0] == want, f"stream {k} was finished, not cut"
    assert not live.thread.is_alive() and not srv.batcher._thread.is_alive(), "the server and scheduler stopped"
    with pytest.raises(Exception, match="shutting down"):
        srv.batcher.submit(embedded_pipe.conversation(s.image), q)


def test_sigterm_ends_nxc_serve_cleanly(embedded_build):
    proc, _ = start_nxc_serve(embedded_build, free_port())
    try:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        # uvicorn re-raises the signal after its graceful shutdown: the exit status is SIGTERM's
        assert code in (0, -signal.SIGTERM) and "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_without_the_scheduler_turns_run_per_thread(embedded_build, embedded_pipe):
    """--max-batch 0 (and backends that cannot batch): the same answers, n included, one turn per thread."""
    from nxc.serve.app import create_app
    app = create_app(embedded_build, pipeline=embedded_pipe, max_batch=0)
    assert app.state.server.batcher is None
    s, q = scene(7), "Describe the image with locations."
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=120) as c:
        r = c.post("/v1/chat/completions", json={"messages": [user(q, s.image)], "n": 2, "temperature": 1.8,
                                                 "seed": 5, "max_tokens": 24})
        assert r.status_code == 200, r.text
        for i, ch in enumerate(r.json()["choices"]):
            assert ch["token_ids"] == embedded_pipe.chat(s.image, q, max_new_tokens=24, temperature=1.8,
                                                         seed=5 + i).token_ids
        text = c.get("/metrics").text
    assert "nxc_batch_rows" not in text
