"""Helpers of the tests over a build with a modules table (tests/conftest.py `module_build`): the embedded NExT-Chat
was never taught VITRON's tags, so a test makes it say a reply by boosting each next token's logit."""
from contextlib import contextmanager

import numpy as np

from nxc import names

MODULES = {"grammar": "vitron", "region": "pixels",
           "calls": {"B": {"task": "image segmentation", "backend": "segment"},
                     "E": {"task": "video segmentation", "backend": "track"}}}


@contextmanager
def say(pipe, text: str):
    """Within the block, each turn's reply is `text` then </s>: decode step k's logits get +1e4 on token k."""
    ids = pipe.tokenizer.encode(text, add_bos=False) + [pipe.tokens[names.EOS]]
    runner = pipe.runner(names.GRAPH_LLM)
    step = {"k": 0}
    real = runner.run_cached

    def run_cached(embeds, cache):
        out = real(embeds, cache)
        k = step["k"] if embeds.shape[1] == 1 else 0
        step["k"] = k + 1
        logits = out["logits"].copy()
        logits[..., ids[min(k, len(ids) - 1)]] += 1e4
        return {**out, "logits": logits}
    runner.run_cached = run_cached
    try:
        yield
    finally:
        del runner.run_cached


def scene():
    from nxc.shapes.data import make_scene
    return make_scene(np.random.default_rng(3), max_objects=3)


def box_text(box) -> str:
    return "[" + ", ".join(str(int(round(v))) for v in box) + "]"


REPLY_TWO = ("<module>B</module><instruction>segmentation: it</instruction><region>{box}</region> and "
             "<module>Q</module><instruction>x</instruction>")
