"""nxc-eval's grounded-generation and editing tasks (nxc.shapes.eval_modules): a GLIGEN build's pictures judged by
NExT-Chat through the runtime, n/a for a build without GLIGEN, and the PSNR outside an edited box."""
import numpy as np
import pytest

pytest.importorskip("diffusers", reason="the GLIGEN build is exported with the export extra")


def test_psnr_outside_ignores_the_box_and_its_latent_cells():
    from nxc.shapes.eval_modules import psnr_outside
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    edited = src.copy()
    edited[16:40, 16:40] = 0                                   # inside box [0.25, 0.25, 0.625, 0.625] (+ a cell)
    assert psnr_outside(edited, src, [0.25, 0.25, 0.625, 0.625], 16) == float("inf")
    edited[0, 0] = 255 - src[0, 0]                             # one pixel outside changed
    assert 30 < psnr_outside(edited, src, [0.25, 0.25, 0.625, 0.625], 16) < 60
    edited[48:] = 0                                            # a quarter of the picture outside changed
    assert psnr_outside(edited, src, [0.25, 0.25, 0.625, 0.625], 16) < 15


def test_a_gligen_build_is_scored_and_a_plain_one_is_not_applicable(gligen_module_build, embedded_pipe,
                                                                    module_draw_pipe):
    from nxc.runtime.pipeline import Pipeline
    from nxc.shapes.eval_modules import NOT_GROUNDED, evaluate_grounded
    pipe = Pipeline.load(gligen_module_build[0])
    m = evaluate_grounded(pipe, embedded_pipe, seed=3, n=2, progress=False)
    g, e = m["grounded_generation"], m["editing"]
    assert g["n"] == e["n"] == 2 and 2 <= g["objects"] <= 6
    for v in (g["box_recall"], g["mean_iou"], g["ceiling_box_recall"], e["edit_accuracy"], e["preserved"], e["both"]):
        assert 0 <= v <= 1
    assert g["seconds_per_picture"] > 0 and np.isfinite(e["psnr_outside"])
    again = evaluate_grounded(pipe, embedded_pipe, seed=3, n=2, progress=False)
    assert {k: v for k, v in again["grounded_generation"].items() if k != "seconds_per_picture"} == \
        {k: v for k, v in g.items() if k != "seconds_per_picture"}               # seeded: the same requests
    plain = evaluate_grounded(module_draw_pipe, embedded_pipe, n=2, progress=False)
    assert plain == {"grounded_generation": {"n/a": NOT_GROUNDED}, "editing": {"n/a": NOT_GROUNDED}}
