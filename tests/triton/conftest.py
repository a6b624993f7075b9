"""The Triton tests' repositories and live server over the embedded fp32 build (see triton_local)."""
import pytest
from triton_local import LocalTriton, tritonserver_dist

from nxc import names
from nxc.triton.chat import CHAT_MODEL


@pytest.fixture(scope="session")
def python_repo(embedded_build, tmp_path_factory):
    from nxc.triton.repo import write_repository
    return write_repository(embedded_build, tmp_path_factory.mktemp("triton") / "repo", variant="python")


@pytest.fixture(scope="module")
def triton(python_repo, tmp_path_factory):
    """tritonserver over the python variant: the BLS graphs and nxc_chat (llm runs inside nxc_chat, so its own
    model is not loaded)."""
    dist = tritonserver_dist()
    if dist is None:
        pytest.skip("pytriton's tritonserver binary is not installed (make install puts it in .venv/pytriton)")
    load = [g for g in names.GRAPHS if g != names.GRAPH_LLM] + [CHAT_MODEL]
    with LocalTriton(python_repo, dist=dist, work=tmp_path_factory.mktemp("tritonserver"), load=load) as server:
        yield server

