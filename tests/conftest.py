"""Shared tokenizer fixtures: a tiny sentencepiece model trained in the session (seed 0), no downloads."""
import pytest


@pytest.fixture(scope="session")
def tiny_sp_dir(tmp_path_factory):
    """A directory with the official tokenizer files (tokenizer.model seed 0, added_tokens.json, configs)."""
    from nxc.model.sp_tokenizer import train_tiny_sentencepiece, write_tokenizer_files
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
