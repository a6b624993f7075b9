"""A checkpoint as NExT-Chat's own code saves it (transformers 4.31: every LLaMA layer's
`self_attn.rotary_emb.inv_freq` buffer in the checkpoint, in the weights' dtype) exports; a buffer that disagrees
with the RoPE the graph computes is refused in one line naming it, by the export and by the llm graph writer."""
import json

import pytest
import torch

from nxc.export.cli import main
from transformers_4_31 import INV_FREQ, saved_by_4_31

def _export(ckpt, out):
    return main([str(ckpt), "--clip", str(ckpt / "clip"), "--fp32", "--out", str(out), "--graphs", "llm",
                 "--max-context", "64"])


@pytest.mark.parametrize("dtype, safetensors", [(torch.float32, False), (torch.float16, True)])
def test_a_checkpoint_saved_by_transformers_4_31_exports(tiny_ckpt_export, tmp_path, capsys, dtype, safetensors):
    ckpt = saved_by_4_31(tiny_ckpt_export, tmp_path / "ckpt", dtype=dtype, safetensors=safetensors, torch_dtype=True)
    assert _export(ckpt, tmp_path / "fp32") == 0, capsys.readouterr().err[-3000:]
    parity = json.loads((tmp_path / "fp32" / "reports" / "parity.json").read_text())["llm"]
    assert parity["ok"] and [c["run"] for c in parity["checks"]] == ["prefill", "decode"]


def test_a_wrong_rope_buffer_is_refused_in_one_line(tiny_ckpt_export, tmp_path, capsys):
    ckpt = saved_by_4_31(tiny_ckpt_export, tmp_path / "ckpt", dtype=torch.float16, safetensors=False,
                         theta=1_000_000.0, torch_dtype=True)
    assert _export(ckpt, tmp_path / "fp32") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("nxc-export:")]
    assert len(line) == 1 and f"{INV_FREQ.format(0)} " in line[0] and "rope_theta 10000" in line[0], err
    assert not (tmp_path / "fp32").exists()


def test_the_llm_writer_checks_the_rope_buffers(tiny_ckpt_export, tmp_path):
    """The writer reads the checkpoint itself (any caller, not only the export after the reference loaded)."""
    from nxc.config import llama_sizes_from_config_json
    from nxc.export.llm_writer import write_llm_graph
    from nxc.model.checkpoint import CheckpointError, load_nextchat
    from nxc.model.lazy import LazyCheckpoint
    from nxc.specs import graph_specs

    good = saved_by_4_31(tiny_ckpt_export, tmp_path / "good", dtype=torch.float16, safetensors=True, torch_dtype=True)
    bad = saved_by_4_31(tiny_ckpt_export, tmp_path / "bad", dtype=torch.float16, safetensors=True, theta=20000.0,
                        torch_dtype=True)
    sizes = llama_sizes_from_config_json(json.loads((good / "config.json").read_text()))
    model, _ = load_nextchat(good, llm=False)
    spec = graph_specs(model.config)["llm"]
    write_llm_graph(LazyCheckpoint(good), sizes, tmp_path / "good.onnx", spec)
    with pytest.raises(CheckpointError) as e:
        write_llm_graph(LazyCheckpoint(bad), sizes, tmp_path / "bad.onnx", spec)
    assert "\n" not in str(e.value) and f"{INV_FREQ.format(0)} " in str(e.value), str(e.value)
