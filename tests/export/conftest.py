import pytest


@pytest.fixture(scope="session")
def tiny_ckpt_export(tmp_path_factory):
    """A tiny random NExT-Chat (seed 1: GQA with 4 heads over 2 KV heads), official layout. Read-only."""
    from nxc.model.writer import make_tiny_checkpoint
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-export") / "nextchat", seed=1)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt_export):
    from nxc.model.checkpoint import load_nextchat
    model, tokenizer = load_nextchat(tiny_ckpt_export)
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_build(tiny_ckpt_export, tmp_path_factory):
    """The tiny checkpoint exported (fp32, context 256, with the exporter's own parity check)."""
    from nxc.export.exporter import ExportOptions, export_build
    out = tmp_path_factory.mktemp("builds") / "fp32"
    return export_build(tiny_ckpt_export, out, options=ExportOptions(max_context=256))
