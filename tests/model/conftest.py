import pytest


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random NExT-Chat in the official layout (seed 0), shared by the model tests. Read-only."""
    from nxc.model.writer import make_tiny_checkpoint
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "nextchat", seed=0)


@pytest.fixture(scope="session")
def tiny_ref(tiny_ckpt):
    from nxc.model.reference import ReferenceChat
    return ReferenceChat.load(tiny_ckpt)


@pytest.fixture
def image():
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (50, 80, 3), dtype=np.uint8))
