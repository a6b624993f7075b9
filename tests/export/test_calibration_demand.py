"""int8 / int4 exports of a real (not embedded) checkpoint ask for --calib-images only when a graph they export is
calibrated (issue 27, item 3): the weight-only llm and loc_heads need no calibration data; vision and sam_encoder
(static QDQ) do, unless --float-graphs keeps them float32, and then the refusal comes before any graph is exported."""
import pytest

from nxc.export.cli import main
from nxc.manifest import load_manifest

COMMON = ["--max-context", "64", "--skip-parity"]


@pytest.mark.parametrize("graphs, float_graphs, precisions", [
    (["llm", "loc_heads"], [], {"llm": "int4-weight-only", "loc_heads": "int8-weight-only"}),
    (["vision", "loc_heads"], ["vision"], {"vision": "fp32", "loc_heads": "int8-weight-only"}),
])
def test_weight_only_graphs_export_without_calibration_images(graphs, float_graphs, precisions, tiny_ckpt_export,
                                                              tmp_path, capsys):
    out = tmp_path / "int4"
    argv = [str(tiny_ckpt_export), "--int4", "--out", str(out), "--graphs", *graphs, *COMMON]
    if float_graphs:
        argv += ["--float-graphs", *float_graphs]
    assert main(argv) == 0, capsys.readouterr().err
    m = load_manifest(out)
    assert {g: e.precision for g, e in m.graphs.items()} == precisions
    assert not any("calibration:" in x for x in capsys.readouterr().err.splitlines())


@pytest.mark.parametrize("graphs, float_graphs, calibrated", [
    (["vision"], [], "vision"),
    (["llm", "loc_heads", "vision"], [], "vision"),
    (["vision", "sam_encoder"], ["vision"], "sam_encoder"),
])
def test_a_calibrated_graph_still_asks_for_calibration_images_in_one_line(graphs, float_graphs, calibrated,
                                                                          tiny_ckpt_export, tmp_path, capsys):
    out = tmp_path / "int8"
    argv = [str(tiny_ckpt_export), "--int8", "--out", str(out), "--graphs", *graphs, *COMMON]
    if float_graphs:
        argv += ["--float-graphs", *float_graphs]
    assert main(argv) == 1
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("nxc-export:")]
    assert "--calib-images DIR" in line and calibrated in line, line
    assert "exporting" not in err                              # refused before any graph is exported
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []
