"""Threading model: one Pipeline shared by threads, one Conversation per thread (README "Limits")."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from nxc.shapes.data import make_sample, make_scene


def ten_prompts():
    rng = np.random.default_rng(31)
    out = []
    for task in ("rec", "caption", "region", "pope", "rec", "caption", "region", "pope", "rec", "caption"):
        scene = make_scene(rng)
        s = make_sample(rng, task, scene)
        out.append((s.image, s.question, s.boxes_in or None))
    return out


def fingerprint(r):
    return (tuple(r.token_ids), r.text, tuple(tuple(np.round(d.box_norm, 6)) for d in r.detections),
            tuple(int(d.mask.sum()) for d in r.detections))


def test_8_threads_x_10_chats_equal_sequential(embedded_pipe):
    prompts = ten_prompts()
    expected = [fingerprint(embedded_pipe.chat(im, q, boxes=b, max_new_tokens=32)) for im, q, b in prompts]

    def worker(offset):
        order = prompts[offset:] + prompts[:offset]          # threads hit different prompts at the same time
        got = [fingerprint(embedded_pipe.chat(im, q, boxes=b, max_new_tokens=32)) for im, q, b in order]
        return got[-offset:] + got[:-offset] if offset else got

    with ThreadPoolExecutor(max_workers=8) as ex:
        results = list(ex.map(worker, range(8)))
    for r in results:
        assert r == expected
