"""A build directory -> a Triton model repository: one model per graph, plus the decoupled chat model `nxc_chat`.

    repo/
      vision/config.pbtxt   vision/1/model.onnx            variant "ngc", onnxruntime: Triton's ONNX Runtime backend
                            vision/1/model.plan            variant "ngc", tensorrt: from an nxc-build engine folder
                            vision/1/model.py + model.onnx variant "python": nxc.triton.graph_model, ONNX Runtime CPU
      llm/ loc_heads/ sam_encoder/ sam_decoder/            the same, one per graph of the manifest
      nxc_chat/config.pbtxt nxc_chat/1/model.py            nxc.triton.chat_model (decoupled, Python backend)
                            nxc_chat/1/build/              the build itself (hard links): the repository stands alone

Every tensor's name, dtype and dims come from the manifest's graph specs (dynamic axes as -1, max_batch_size 0).
Files are hard-linked where the file system allows (copied otherwise). The repository is written into a temporary
folder beside `repo` and renamed into place last: an interrupted run never leaves a half-written repository.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from nxc import names
from nxc.manifest import load_manifest
from nxc.specs import GraphSpec, TensorSpec
from nxc.triton.chat import CHAT_INPUTS, CHAT_MODEL, EVENT

VARIANTS = ("ngc", "python")
GRAPH_BACKENDS = ("onnxruntime", "tensorrt")
NGC_IMAGE = "nvcr.io/nvidia/tritonserver:25.01-py3"     # the release whose TensorRT built the engines, for tensorrt

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                 "int8": "TYPE_INT8", "bool": "TYPE_BOOL"}
NUMPY_DTYPES = {v: k for k, v in TRITON_DTYPES.items()}
_PACKAGE = Path(__file__).parent


class RepoError(ValueError):
    """The repository cannot be written as asked: the message says what was found and what to do."""


# -- config.pbtxt ------------------------------------------------------------------------------------------------
def _tensors(entries: list[tuple[str, str, tuple]], optional: frozenset = frozenset()) -> str:
    lines = []
    for name, dtype, dims in entries:
        dims_text = ", ".join(str(d) if isinstance(d, int) else "-1" for d in dims)
        opt = " optional: true" if name in optional else ""
        lines.append(f'  {{ name: "{name}" data_type: {dtype} dims: [ {dims_text} ]{opt} }}')
    return ",\n".join(lines)


def _io(inputs, outputs, optional=frozenset()) -> str:
    return f"input [\n{_tensors(inputs, optional)}\n]\noutput [\n{_tensors(outputs)}\n]\n"


def _spec_entries(tensors: tuple[TensorSpec, ...]) -> list[tuple[str, str, tuple]]:
    return [(t.name, TRITON_DTYPES[t.dtype], t.shape) for t in tensors]


def _parameters(params: dict[str, str]) -> str:
    return "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in params.items())


def graph_config(spec: GraphSpec, *, variant: str, backend: str = "onnxruntime", instances: int = 1) -> str:
    """config.pbtxt of one graph model."""
    if variant == "python":
        head, kind = 'backend: "python"', "KIND_CPU"
    elif backend == "tensorrt":
        head, kind = 'platform: "tensorrt_plan"', "KIND_GPU"
    else:
        head, kind = 'platform: "onnxruntime_onnx"', "KIND_GPU"
    return (f'name: "{spec.name}"\n{head}\nmax_batch_size: 0\n'
            + _io(_spec_entries(spec.inputs), _spec_entries(spec.outputs))
            + f"instance_group [ {{ kind: {kind} count: {instances} }} ]\n")


def chat_config(*, variant: str, params: dict[str, str], instances: int = 1) -> str:
    """config.pbtxt of nxc_chat: decoupled (one request, many responses), inputs CHAT_INPUTS, one STRING output."""
    kind = "KIND_CPU" if variant == "python" else "KIND_GPU"
    inputs = [(name, dtype, (1,)) for name, dtype, _ in CHAT_INPUTS]
    optional = frozenset(name for name, _, opt in CHAT_INPUTS if opt)
    return (f'name: "{CHAT_MODEL}"\nbackend: "python"\nmax_batch_size: 0\n'
            + _io(inputs, [(EVENT, "TYPE_STRING", (1,))], optional)
            + "model_transaction_policy { decoupled: true }\n"
            + f"instance_group [ {{ kind: {kind} count: {instances} }} ]\n"
            + _parameters(params))


def spec_from_config(config: dict) -> GraphSpec:
    """The GraphSpec of a graph model from its configuration as Triton hands it to a Python model (JSON: "input" /
    "output" lists of {"name", "data_type", "dims"}); dims of -1 stay -1 (no runner reads them)."""
    def tensors(key):
        return tuple(TensorSpec(name=t["name"], dtype=NUMPY_DTYPES[t["data_type"]],
                                shape=tuple(int(d) for d in t["dims"])) for t in config.get(key, []))
    return GraphSpec(name=config["name"], inputs=tensors("input"), outputs=tensors("output"))


# -- files -------------------------------------------------------------------------------------------------------
def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:                                # another file system, or links not allowed
        shutil.copy2(src, dst)


def _link_tree(src: Path, dst: Path) -> None:
    for p in sorted(src.rglob("*")):
        if p.is_file():
            _link(p, dst / p.relative_to(src))


def engine_folder(build: Path, engines: str | Path | None) -> Path:
    """The nxc-build engine folder the tensorrt graph models take their model.plan from."""
    found = sorted(p.name for p in (build / "engines").glob("*") if (p / "engine.json").is_file())
    if engines is None:
        raise RepoError(f"--backend tensorrt needs --engines DIR, one of {build}/engines/<gpu>-trt<version> "
                        f"(found: {', '.join(found) or 'none'}); build them with `nxc-build {build}` inside the "
                        f"Triton container, whose TensorRT version must be the engines' ({NGC_IMAGE})")
    folder = Path(engines)
    if not (folder / "engine.json").is_file():
        raise RepoError(f"{folder}: not an nxc-build engine folder (no engine.json); expected "
                        f"{build}/engines/<gpu>-trt<version>, found: {', '.join(found) or 'none'}")
    return folder


def _chat_params(variant: str, backend: str, engines: Path | None) -> dict[str, str]:
    """nxc_chat's parameters (read by nxc.triton.chat_model): which graphs run inside its own process, with which
    runtime backend; every other graph is reached through BLS."""
    batch = {"max_batch": "8", "max_queue": "32"}     # the scheduler, where the llm's backend allows it
    if variant == "python":
        return {"in_process": names.GRAPH_LLM, "backend": "onnxruntime", "providers": "cpu", "engines": "", **batch}
    if backend == "tensorrt":
        return {"in_process": names.GRAPH_LLM, "backend": "tensorrt", "providers": "", "engines": engines.name,
                **batch}
    return {"in_process": names.GRAPH_LLM, "backend": "onnxruntime", "providers": "cuda", "engines": "", **batch}


def _write(tmp: Path, build: Path, *, variant: str, backend: str, engines: Path | None, instances: int) -> None:
    m = load_manifest(build)
    if m.config.objects is not None:
        raise RepoError(f"{build}: a retrieval (ChatRex-style) build; nxc-triton writes NExT-Chat's repository only. "
                        "Serve it with nxc-serve")
    if m.generator is not None or any(h.kind == "signal" for h in m.heads):
        raise RepoError(f"{build}: a build that draws (signal tokens and a generator, NExT-GPT-style); nxc-triton "
                        "writes NExT-Chat's repository only. Serve it with nxc-serve")
    if m.modules is not None:
        raise RepoError(f"{build}: a build whose replies call modules (VITRON-style: "
                        f"{', '.join(sorted(m.modules.calls))}); nxc-triton writes NExT-Chat's repository only. "
                        "Serve it with nxc-serve")
    missing = [g for g in names.GRAPHS if g not in m.graphs]
    if missing:
        raise RepoError(f"{build}: the build has no {', '.join(missing)} graph; nxc_chat needs all of "
                        f"{', '.join(names.GRAPHS)}: re-export it without --graphs")
    for g in names.GRAPHS:
        spec, version = m.graph_spec(g), tmp / g / "1"
        (tmp / g).mkdir(parents=True)
        (tmp / g / "config.pbtxt").write_text(graph_config(spec, variant=variant, backend=backend,
                                                           instances=instances))
        if variant == "ngc" and backend == "tensorrt":
            plan = engines / f"{g}.plan"
            if not plan.is_file():
                raise RepoError(f"{plan}: missing; build it with `nxc-build {build} --graphs {g}`")
            _link(plan, version / "model.plan")
            continue
        _link(m.graph_path(g), version / "model.onnx")
        for rel in m.graphs[g].external_data:       # ONNX finds its data by name, beside the graph
            _link(m.path(rel), version / Path(rel).name)
        if variant == "python":
            shutil.copyfile(_PACKAGE / "graph_model.py", version / "model.py")
    chat = tmp / CHAT_MODEL
    (chat / "1").mkdir(parents=True)
    (chat / "config.pbtxt").write_text(chat_config(variant=variant, params=_chat_params(variant, backend, engines),
                                                   instances=instances))
    shutil.copyfile(_PACKAGE / "chat_model.py", chat / "1" / "model.py")
    _link_tree(build, chat / "1" / "build")
    if engines is not None and not engines.resolve().is_relative_to(build.resolve()):
        _link_tree(engines, chat / "1" / "build" / "engines" / engines.name)


def write_repository(build: str | Path, repo: str | Path, *, variant: str = "ngc", backend: str = "onnxruntime",
                     engines: str | Path | None = None, instances: int = 1, force: bool = False) -> Path:
    """Write the Triton model repository of `build` to `repo` and return its path.
    variant: "ngc" (Triton's onnxruntime / tensorrt backends, GPU instances, for the NGC container) or "python"
    (every graph in a Python-backend model running ONNX Runtime on the CPU: a tritonserver with only the Python
    backend, as pytriton's). engines: the nxc-build folder (build/engines/<gpu>-trt<version>) for backend tensorrt.
    Refuses a non-empty `repo` unless force; raises RepoError or BuildError (an unusable build)."""
    build, repo = Path(build), Path(repo)
    if variant not in VARIANTS:
        raise RepoError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if backend not in GRAPH_BACKENDS:
        raise RepoError(f"unknown backend {backend!r}; choose one of {', '.join(GRAPH_BACKENDS)}")
    if variant == "python" and backend != "onnxruntime":
        raise RepoError("the python variant runs every graph in ONNX Runtime; --backend tensorrt is for --variant ngc")
    if engines is not None and backend != "tensorrt":
        raise RepoError("--engines is for --backend tensorrt; the onnxruntime graph models run the build's .onnx")
    if instances < 1:
        raise RepoError(f"instances must be at least 1, got {instances}")
    if repo.exists() and not repo.is_dir():
        raise RepoError(f"{repo}: exists and is not a directory")
    if repo.is_dir() and any(repo.iterdir()) and not force:
        raise RepoError(f"{repo}: not empty; choose another folder or pass --force to replace it")
    folder = engine_folder(build, engines) if variant == "ngc" and backend == "tensorrt" else None
    repo.parent.mkdir(parents=True, exist_ok=True)
    tmp = repo.with_name(f".{repo.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, build, variant=variant, backend=backend, engines=folder, instances=instances)
        old = repo.with_name(f".{repo.name}.old-{os.getpid()}")
        if repo.exists():
            repo.rename(old)
        tmp.rename(repo)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return repo


def models(repo: str | Path) -> list[str]:
    """The model names of a repository (its folders with a config.pbtxt)."""
    return sorted(p.parent.name for p in Path(repo).glob("*/config.pbtxt"))


def serve_command(repo: str | Path, backend: str = "onnxruntime") -> str:
    """The docker command that serves an "ngc" repository. The in-process graphs' models are not loaded (their
    weights already live in nxc_chat). nxc_chat imports nxc, so the container installs it first, with what runs
    its llm on the GPU: onnxruntime-gpu in place of onnxruntime, or TensorRT's Python package for backend
    tensorrt (the container's TensorRT version, the one that built the engines)."""
    repo = Path(repo).resolve()
    loads = " ".join(f"--load-model={g}" for g in [*names.GRAPHS, CHAT_MODEL] if g != names.GRAPH_LLM)
    install = ("pip install '/src/nxc[trt]'" if backend == "tensorrt" else
               "pip install /src/nxc && pip uninstall -y onnxruntime && pip install onnxruntime-gpu")
    return (f"docker run --gpus all --rm --shm-size=1g -p 8000:8000 -p 8001:8001 -p 8002:8002 -v {repo}:/models "
            f"-v <nxc checkout>:/src/nxc {NGC_IMAGE} bash -c \"{install} && tritonserver "
            f"--model-repository=/models --model-control-mode=explicit {loads}\"")
