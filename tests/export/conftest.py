"""Fixtures of the export tests."""
import shutil

import pytest


@pytest.fixture
def unconvertible_ckpt(tiny_ckpt_export, tmp_path):
    """The tiny checkpoint with a tokenizer.model that sentencepiece loads but tokenizer.json cannot reproduce."""
    from sentencepiece import sentencepiece_model_pb2
    ckpt = tmp_path / "unconvertible"
    shutil.copytree(tiny_ckpt_export, ckpt)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((ckpt / "tokenizer.model").read_bytes())
    proto.normalizer_spec.remove_extra_whitespaces = True
    (ckpt / "tokenizer.model").write_bytes(proto.SerializeToString())
    return ckpt
