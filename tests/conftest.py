"""Shared fixtures: tiny tokenizers and checkpoints made in the session, the embedded model and its fp32 build.

With NXC_TEST_PREBUILT=DIR the builds and the tiny tokenizer.json come from DIR (`embedded/`, `retrieval/`,
`tiny_tokenizer.json`, exported on another machine: `make test-aarch64` exports them on x86 and runs the runtime's
tests under aarch64 emulation), and what needs the export extra (torch, sentencepiece: the PyTorch references, the
exporter) skips with that reason when it is not installed.
"""
import importlib.util
import os
from pathlib import Path

import pytest

PREBUILT = Path(os.environ["NXC_TEST_PREBUILT"]) if os.environ.get("NXC_TEST_PREBUILT") else None


def require_export_extra(what: str) -> None:
    """Skip, saying why, where the export extra is missing (a runtime-only environment such as the aarch64 run)."""
    missing = [m for m in ("torch", "sentencepiece", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{what} needs the export extra ({', '.join(missing)} not installed): this environment has the "
                    "runtime only; `make test-aarch64` compares its answers with the x86 run instead")


def prebuilt(name: str) -> Path | None:
    if PREBUILT is None:
        return None
    path = PREBUILT / name
    if not path.exists():
        raise FileNotFoundError(f"NXC_TEST_PREBUILT={PREBUILT} has no {name}: export it there first "
                                "(tests/aarch64/harness.py does)")
    return path


@pytest.fixture
def export_extra():
    """For a test that runs the exporter or a PyTorch reference itself."""
    require_export_extra("this test")


@pytest.fixture(scope="session")
def tiny_sp_dir(tmp_path_factory):
    """A directory with the official tokenizer files (tokenizer.model seed 0, added_tokens.json, configs)."""
    require_export_extra("the tiny sentencepiece tokenizer")
    from nxc.model.sp_files import train_tiny_sentencepiece, write_tokenizer_files
    d = tmp_path_factory.mktemp("tiny_sp")
    return write_tokenizer_files(d, train_tiny_sentencepiece(d, seed=0))


@pytest.fixture(scope="session")
def tiny_oracle(tiny_sp_dir):
    from nxc.model.sp_tokenizer import SentencePieceOracle
    return SentencePieceOracle.from_dir(tiny_sp_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer_json(request, tmp_path_factory):
    """Path of the tokenizer.json converted from `tiny_sp_dir`."""
    if PREBUILT is not None:
        return prebuilt("tiny_tokenizer.json")
    from nxc.export.tokenizer_json import write_tokenizer_json
    return write_tokenizer_json(request.getfixturevalue("tiny_sp_dir"), tmp_path_factory.mktemp("tiny_tok") / "tokenizer.json")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_json):
    """The runtime Tokenizer loaded from `tiny_tokenizer_json`."""
    from nxc.runtime.tokenizer import Tokenizer
    return Tokenizer.from_file(tiny_tokenizer_json)
@pytest.fixture(scope="session")
def tiny_ckpt_export(tmp_path_factory):
    """A tiny random NExT-Chat (seed 1: GQA with 4 heads over 2 KV heads), official layout. Read-only."""
    require_export_extra("the tiny checkpoint")
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


@pytest.fixture(scope="session")
def embedded_ref():
    """The PyTorch reference on the shipped shapes checkpoint."""
    require_export_extra("the PyTorch reference")
    from nxc.assets import embedded_checkpoint
    from nxc.model.reference import ReferenceChat
    return ReferenceChat.load(embedded_checkpoint())


@pytest.fixture(scope="session")
def embedded_build(tmp_path_factory):
    """The shipped shapes checkpoint exported fp32 (with the exporter's parity check)."""
    if PREBUILT is not None:
        return prebuilt("embedded")
    from nxc.export.exporter import ExportOptions, export_build
    return export_build(None, tmp_path_factory.mktemp("embedded") / "fp32", options=ExportOptions())


@pytest.fixture(scope="session")
def embedded_pipe(embedded_build):
    from nxc.runtime.pipeline import Pipeline
    return Pipeline.load(embedded_build)


@pytest.fixture(scope="session")
def retrieval_ref():
    """The PyTorch reference on the shipped retrieval (ChatRex-style) checkpoint."""
    require_export_extra("the PyTorch reference")
    from nxc.assets import retrieval_checkpoint
    from nxc.model.retrieval import RetrievalReferenceChat
    return RetrievalReferenceChat.load(retrieval_checkpoint())


@pytest.fixture(scope="session")
def retrieval_build(tmp_path_factory):
    """The shipped retrieval checkpoint exported fp32 (with the exporter's parity check)."""
    if PREBUILT is not None:
        return prebuilt("retrieval")
    from nxc.assets import retrieval_checkpoint
    from nxc.export.exporter import ExportOptions, export_build
    return export_build(retrieval_checkpoint(), tmp_path_factory.mktemp("retrieval") / "fp32", options=ExportOptions())


@pytest.fixture(scope="session")
def retrieval_pipe(retrieval_build):
    from nxc.runtime.pipeline import Pipeline
    return Pipeline.load(retrieval_build)
