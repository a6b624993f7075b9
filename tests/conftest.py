"""Shared fixtures: tiny tokenizers and checkpoints made in the session, the embedded model and its fp32 build."""
import pytest


@pytest.fixture(scope="session")
def tiny_sp_dir(tmp_path_factory):
    """A directory with the official tokenizer files (tokenizer.model seed 0, added_tokens.json, configs)."""
    from nxc.model.sp_files import train_tiny_sentencepiece, write_tokenizer_files
    d = tmp_path_factory.mktemp("tiny_sp")
    return write_tokenizer_files(d, train_tiny_sentencepiece(d, seed=0))


@pytest.fixture(scope="session")
def tiny_oracle(tiny_sp_dir):
    from nxc.model.sp_tokenizer import SentencePieceOracle
    return SentencePieceOracle.from_dir(tiny_sp_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer_json(tiny_sp_dir, tmp_path_factory):
    """Path of the tokenizer.json converted from `tiny_sp_dir`."""
    from nxc.export.tokenizer_json import write_tokenizer_json
    return write_tokenizer_json(tiny_sp_dir, tmp_path_factory.mktemp("tiny_tok") / "tokenizer.json")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_json):
    """The runtime Tokenizer loaded from `tiny_tokenizer_json`."""
    from nxc.runtime.tokenizer import Tokenizer
    return Tokenizer.from_file(tiny_tokenizer_json)
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


@pytest.fixture(scope="session")
def embedded_ref():
    """The PyTorch reference on the shipped shapes checkpoint."""
    from nxc.assets import embedded_checkpoint
    from nxc.model.reference import ReferenceChat
    return ReferenceChat.load(embedded_checkpoint())


@pytest.fixture(scope="session")
def embedded_build(tmp_path_factory):
    """The shipped shapes checkpoint exported fp32 (with the exporter's parity check)."""
    from nxc.export.exporter import ExportOptions, export_build
    return export_build(None, tmp_path_factory.mktemp("embedded") / "fp32", options=ExportOptions())


@pytest.fixture(scope="session")
def embedded_pipe(embedded_build):
    from nxc.runtime.pipeline import Pipeline
    return Pipeline.load(embedded_build)


@pytest.fixture(scope="session")
def retrieval_ref():
    """The PyTorch reference on the shipped retrieval (ChatRex-style) checkpoint."""
    from nxc.assets import retrieval_checkpoint
    from nxc.model.retrieval import RetrievalReferenceChat
    return RetrievalReferenceChat.load(retrieval_checkpoint())


@pytest.fixture(scope="session")
def retrieval_build(tmp_path_factory):
    """The shipped retrieval checkpoint exported fp32 (with the exporter's parity check)."""
    from nxc.assets import retrieval_checkpoint
    from nxc.export.exporter import ExportOptions, export_build
    return export_build(retrieval_checkpoint(), tmp_path_factory.mktemp("retrieval") / "fp32", options=ExportOptions())


@pytest.fixture(scope="session")
def retrieval_pipe(retrieval_build):
    from nxc.runtime.pipeline import Pipeline
    return Pipeline.load(retrieval_build)
