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


@pytest.fixture(scope="session")
def tiny_generator(tmp_path_factory):
    """A tiny random generator in diffusers' layout (nxc.model.generator.make_tiny_generator, seed 0: UNet and VAE
    of blocks 32/64, latents [4, 8, 8], pixels 16 x 16, a CLIP text encoder of width 32). Read-only."""
    require_export_extra("the tiny generator")
    from nxc.model.generator import make_tiny_generator
    return make_tiny_generator(tmp_path_factory.mktemp("generator") / "sd-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_generator_fp32(tiny_generator, tmp_path_factory):
    """(folder, GeneratorExport) of the tiny generator exported fp32 (with its parity check) into a folder."""
    from nxc.export.generator import export_generator
    out = tmp_path_factory.mktemp("generator-fp32")
    return out, export_generator(tiny_generator, out, precision="fp32", log=lambda _m: None)


def _signals(tokenizer) -> list[str]:
    """Four ordinary pieces of the vocabulary, late ids (rarely said by the shapes model)."""
    import json
    vocab = json.loads(tokenizer.read_text())["model"]["vocab"]
    pieces = sorted(((i, p) for p, i in vocab.items() if p.isalpha() and len(p) > 3), reverse=True)
    return [p for _, p in pieces[:4]]


@pytest.fixture(scope="session")
def drawing_build(embedded_build, tmp_path_factory):
    """(build, signal tokens, projector module, generator folder): the embedded NExT-Chat build given four of its
    vocabulary's pieces as signal tokens (a "signal" head), NExT-GPT's output projector (tiny, random, torch seed 0)
    and a tiny random diffusers generator (seed 3), each exported by nxc's own exporters; axes.batch [1, 1, 2]."""
    require_export_extra("a drawing build (NExT-GPT's projector and a diffusers generator)")
    import json
    import shutil

    import torch
    from nxc.config import ProjectorSizes
    from nxc.export.generator import export_generator
    from nxc.export.projector import export_projector
    from nxc.manifest import sha256_file
    from nxc.model.generator import make_tiny_generator
    from nxc.model.nextgpt_projector import OutputProjector

    root = tmp_path_factory.mktemp("drawing")
    build = root / "build"
    shutil.copytree(embedded_build, build)
    folder = make_tiny_generator(root / "generator", seed=3, text_encoder=False)
    gen = export_generator(folder, build, default_steps=20, default_guidance=3.0, log=lambda m: None)
    m = json.loads((build / "manifest.json").read_text())
    sizes = ProjectorSizes(llm_hidden=m["config"]["llm"]["hidden_size"], d_model=32, nhead=4, encoder_layers=1,
                           decoder_layers=1, dim_feedforward=64, num_queries=gen.entry["sizes"]["context_length"],
                           out_dim=gen.entry["sizes"]["cross_attention_dim"], num_signal_tokens=4)
    torch.manual_seed(0)
    projector = OutputProjector(sizes).eval()
    record = export_projector(projector, sizes, build, log=lambda m: None)
    graphs = {**gen.graphs, "projector": record}
    signals = _signals(build / m["tokenizer"]["file"])
    vocab = json.loads((build / m["tokenizer"]["file"]).read_text())["model"]["vocab"]
    m["tokens"].update({s: vocab[s] for s in signals})
    m["heads"].append({"kind": "signal", "signals": signals, "graph": "projector",
                       "inputs": {"hidden": "hidden", "embeds": "signal_embeds"}, "collect": ["conditioning"],
                       "finish": "generate"})
    m["generator"] = gen.entry
    m["axes"]["batch"] = [1, 1, 2]                    # the denoiser's [unconditional, conditional] rows
    for name, rec in graphs.items():
        m["graphs"][name] = {k: v for k, v in rec.items() if k not in ("parity", "accuracy")}
    for rel in ["uncond.npy"] + [r["file"] for r in graphs.values()] + [
            f"graphs/{x}" for r in graphs.values() for x in r.get("external_data", [])]:
        m["files"][rel] = {"sha256": sha256_file(build / rel), "bytes": (build / rel).stat().st_size}
    (build / "manifest.json").write_text(json.dumps(m, indent=1))
    return build, signals, projector, folder


@pytest.fixture(scope="session")
def drawing_pipe(drawing_build):
    from nxc.runtime.pipeline import Pipeline
    return Pipeline.load(drawing_build[0])


NEXTGPT_PROMPT = "Draw a red circle and a blue square."


@pytest.fixture(scope="session")
def nextgpt_ckpt(tmp_path_factory):
    """A tiny random NExT-GPT-style checkpoint (nxc.model.maker_nextgpt, seed 0) whose greedy reply to
    NEXTGPT_PROMPT is [IMG0][IMG1][IMG2][IMG3]</s> for any image. Read-only."""
    require_export_extra("the tiny NExT-GPT checkpoint")
    pytest.importorskip("diffusers", reason="the NExT-GPT checkpoint's generator needs diffusers (export extra)")
    from nxc.model.maker_nextgpt import make_nextgpt_checkpoint
    return make_nextgpt_checkpoint(tmp_path_factory.mktemp("nextgpt") / "ckpt", draw_prompt=NEXTGPT_PROMPT,
                                   log=lambda m: None)


@pytest.fixture(scope="session")
def nextgpt_build(nextgpt_ckpt, tmp_path_factory):
    """`nextgpt_ckpt` exported fp32 (context 256, with the exporter's parity checks)."""
    from nxc.export.exporter import ExportOptions, export_build
    return export_build(nextgpt_ckpt, tmp_path_factory.mktemp("nextgpt-build") / "fp32",
                        options=ExportOptions(max_context=256))


@pytest.fixture(scope="session")
def shapes_nextgpt_ref():
    """The PyTorch reference on the shipped NExT-GPT (embedded:shapes-nextgpt)."""
    require_export_extra("the PyTorch reference")
    pytest.importorskip("diffusers", reason="the NExT-GPT reference's generator needs diffusers (export extra)")
    from nxc.assets import nextgpt_checkpoint
    from nxc.model.nextgpt_reference import NextGptReferenceChat
    return NextGptReferenceChat.load(nextgpt_checkpoint())


@pytest.fixture(scope="session")
def shapes_nextgpt_build(tmp_path_factory):
    """The shipped NExT-GPT exported fp32 (with the exporter's parity checks)."""
    if PREBUILT is not None:
        return prebuilt("shapes-nextgpt")
    require_export_extra("exporting the shipped NExT-GPT")
    pytest.importorskip("diffusers", reason="exporting a generator needs diffusers (export extra)")
    from nxc.assets import nextgpt_checkpoint
    from nxc.export.exporter import ExportOptions, export_build
    return export_build(nextgpt_checkpoint(), tmp_path_factory.mktemp("shapes-nextgpt") / "fp32",
                        options=ExportOptions())


@pytest.fixture(scope="session")
def shapes_nextgpt_pipe(shapes_nextgpt_build):
    from nxc.runtime.pipeline import Pipeline
    return Pipeline.load(shapes_nextgpt_build)


@pytest.fixture(scope="session")
def module_build(embedded_build, tmp_path_factory):
    """The embedded fp32 build with a modules table: module "B" is image segmentation on its SAM graphs (issue 29).
    Read-only."""
    import json

    import shutil

    from module_helpers import MODULES
    build = tmp_path_factory.mktemp("modules") / "build"
    shutil.copytree(embedded_build, build)
    m = json.loads((build / "manifest.json").read_text())
    m["modules"] = MODULES
    (build / "manifest.json").write_text(json.dumps(m, indent=1))
    return build


@pytest.fixture(scope="session")
def module_pipe(module_build):
    from nxc.runtime.pipeline import Pipeline
    return Pipeline.load(module_build)


def _with_generator(build, gen, modules: dict):
    """A copy of the embedded build at `build` (where `gen`, an export_generator result, was written) with the
    generator's entry, graphs and files in its manifest and the modules table `modules`."""
    import json

    from nxc.manifest import sha256_file
    m = json.loads((build / "manifest.json").read_text())
    m["generator"] = gen.entry
    m["axes"]["batch"] = [1, 1, 2]                    # the denoiser's [unconditional, conditional] rows
    m["modules"] = modules
    for name, rec in gen.graphs.items():
        m["graphs"][name] = {k: v for k, v in rec.items() if k not in ("parity", "accuracy")}
    rels = ["uncond.npy", *[f"{gen.entry['tokenizer']}/{f}" for f in ("vocab.json", "merges.txt",
                                                                      "tokenizer_config.json")]]
    rels += [r["file"] for r in gen.graphs.values()] + [f"graphs/{x}" for r in gen.graphs.values()
                                                         for x in r.get("external_data", [])]
    for rel in rels:
        m["files"][rel] = {"sha256": sha256_file(build / rel), "bytes": (build / rel).stat().st_size}
    (build / "manifest.json").write_text(json.dumps(m, indent=1))
    return build


@pytest.fixture(scope="session")
def module_draw_build(embedded_build, tmp_path_factory):
    """The embedded fp32 build with the shipped shapes generator (its CLIP text encoder exported as text_encoder)
    and a modules table: "A" image generation, "B" image segmentation (issue 29). Read-only."""
    require_export_extra("the generator's export")
    import shutil

    from nxc.assets import nextgpt_checkpoint
    from nxc.export.generator import export_generator
    build = tmp_path_factory.mktemp("module-draw") / "build"
    shutil.copytree(embedded_build, build)
    gen = export_generator(nextgpt_checkpoint() / "generator", build, default_steps=20, default_guidance=4.0,
                           text_encoder=True, log=lambda m: None)
    return _with_generator(build, gen, {
        "grammar": "vitron", "region": "pixels",
        "calls": {"A": {"task": "image generation", "backend": "generate"},
                  "B": {"task": "image segmentation", "backend": "segment"}}})


@pytest.fixture(scope="session")
def gligen_module_build(embedded_build, tmp_path_factory):
    """(build, generator folder): the embedded fp32 build with a tiny random GLIGEN generator (gated UNet, 16 x 16
    pictures, 10 DDIM steps, guidance 7.5) and a modules table: "A" image generation, "B" image segmentation, "C"
    image editing (issue 29). Read-only."""
    require_export_extra("the generator's export")
    import shutil

    from nxc.export.generator import export_generator
    from nxc.model.generator import make_tiny_generator
    root = tmp_path_factory.mktemp("module-gligen")
    folder = make_tiny_generator(root / "gen", seed=5, gated=True)
    build = root / "build"
    shutil.copytree(embedded_build, build)
    gen = export_generator(folder, build, default_steps=10, default_guidance=7.5, log=lambda m: None)
    return _with_generator(build, gen, {
        "grammar": "vitron", "region": "pixels",
        "calls": {"A": {"task": "image generation", "backend": "generate"},
                  "B": {"task": "image segmentation", "backend": "segment"},
                  "C": {"task": "image editing", "backend": "edit"}}}), folder


@pytest.fixture(scope="session")
def module_draw_pipe(module_draw_build):
    from nxc.runtime.pipeline import Pipeline
    return Pipeline.load(module_draw_build)


@pytest.fixture(scope="session")
def shapes_vitron_build(tmp_path_factory):
    """The shipped VITRON-style model exported fp32: its modules.json and GLIGEN generator come with it."""
    require_export_extra("exporting the shipped VITRON")
    pytest.importorskip("diffusers", reason="exporting a generator needs diffusers (export extra)")
    from nxc.assets import vitron_checkpoint
    from nxc.export.exporter import ExportOptions, export_build
    return export_build(vitron_checkpoint(), tmp_path_factory.mktemp("shapes-vitron") / "fp32",
                        options=ExportOptions())


@pytest.fixture(scope="session")
def shapes_vitron_pipe(shapes_vitron_build):
    from nxc.runtime.pipeline import Pipeline
    return Pipeline.load(shapes_vitron_build)
