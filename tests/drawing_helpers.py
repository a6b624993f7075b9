"""Helpers of the tests over a drawing build (tests/conftest.py `drawing_build`): the embedded shapes model was never
taught to say its signal tokens, so a test makes it "ask for a picture" by boosting the first signal token's logit."""
from contextlib import contextmanager

from nxc import names

QUESTION = "Can you describe the image and include object locations?"


@contextmanager
def say_signal_at(pipe, n: int):
    """Within the block, the n-th decode step of each turn ends with the first signal token's logit boosted by 1e4
    (so it is the next token said), counting steps from the turn's prompt (one turn at a time). The llm runner itself
    is patched: both Conversation.stream (run_cached, one row) and the batch scheduler (run_rows) go through it."""
    first = pipe.dispatch.head_of_kind("signal").signals[0]
    runner = pipe.runner(names.GRAPH_LLM)
    count = {"n": 0}

    def boosted(out):
        count["n"] += 1
        if count["n"] != n:
            return out
        logits = out["logits"].copy()
        logits[..., first] += 1e4
        return {**out, "logits": logits}

    real_cached, real_rows = runner.run_cached, runner.run_rows

    def run_cached(embeds, cache):
        out = real_cached(embeds, cache)
        if embeds.shape[1] == 1:
            return boosted(out)
        count["n"] = 0                                                 # a prompt chunk: a turn begins
        return out

    def run_rows(embeds, batch, rows):
        if rows != 1:
            raise AssertionError("say_signal_at counts the steps of one turn: decode one row at a time")
        return boosted(real_rows(embeds, batch, rows))

    runner.run_cached, runner.run_rows = run_cached, run_rows
    try:
        yield
    finally:
        del runner.run_cached, runner.run_rows                         # the class's methods again
