"""The serve tests' app and live server over the embedded fp32 build (see serve_helpers)."""
import httpx
import pytest
from serve_helpers import LiveServer


@pytest.fixture(scope="session")
def serve_app(embedded_build, embedded_pipe):
    """The app over the shared embedded Pipeline, with small limits so the limit tests need no giant inputs."""
    from nxc.serve.app import create_app
    from nxc.serve.protocol import Limits
    return create_app(embedded_build, pipeline=embedded_pipe,
                      limits=Limits(max_request_bytes=2 * 1024 * 1024, max_image_pixels=1_000_000))


@pytest.fixture(scope="session")
def live(serve_app):
    with LiveServer(serve_app) as srv:
        yield srv


@pytest.fixture
def client(live):
    with httpx.Client(base_url=live.url, timeout=120) as c:
        yield c
