"""nxc-export --modules (issue 29): a module-call table written into the build and, for a generate module, the
generator exported beside it with its CLIP text encoder; a bad table file is refused in one line before anything
is exported."""
import json

import pytest

from nxc.export.cli import main

pytest.importorskip("diffusers", reason="the generator's export needs the export extra (diffusers)")


def table(tmp_path, **extra) -> str:
    from nxc.assets import nextgpt_checkpoint
    data = {"grammar": "vitron", "region": "pixels",
            "calls": {"A": {"task": "image generation", "backend": "generate"},
                      "B": {"task": "image segmentation", "backend": "segment"}},
            "generator": {"path": str(nextgpt_checkpoint() / "generator"), "default_steps": 20,
                          "default_guidance": 4.0}, **extra}
    path = tmp_path / "modules.json"
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    return str(path)


def test_the_embedded_model_exported_with_a_module_table(tmp_path):
    from nxc.manifest import load_manifest
    from nxc.runtime.pipeline import Pipeline
    out = tmp_path / "build"
    assert main(["--out", str(out), "--modules", table(tmp_path)]) == 0
    m = load_manifest(out)
    assert {k: e.backend for k, e in m.modules.calls.items()} == {"A": "generate", "B": "segment"}
    assert (m.generator.text_encoder, m.generator.tokenizer, m.generator.default_steps) == (
        "text_encoder", "generator_tokenizer", 20)
    assert m.axes["batch"][2] >= 2 and "text_encoder" in m.graphs
    assert json.loads((out / "reports" / "parity.json").read_text()) is not None
    pipe = Pipeline.load(out)
    cond = pipe.dispatch.head_of_kind("module").kind.backends["generate"].generator().text_conditioning(
        "a red circle")
    assert cond.shape == (1, m.generator.sizes.context_length, m.generator.sizes.cross_attention_dim)


@pytest.mark.parametrize("extra, message", [
    ({"calls": {"A": {"task": "x", "backend": "paint"}}}, "calls.A.backend 'paint' is not one of segment, track, generate, edit"),
    ({"generator": None}, "a generate module needs \"generator\""),
    ({"generator": {"path": "nowhere"}}, "generator.path 'nowhere' is not a folder"),
    ({"extra": 1}, "expected an object with grammar, region, calls"),
])
def test_a_bad_table_is_refused_before_the_export(tmp_path, capsys, extra, message):
    out = tmp_path / "build"
    assert main(["--out", str(out), "--modules", table(tmp_path, **extra)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and len(err) == 1, err
    assert not out.exists()
