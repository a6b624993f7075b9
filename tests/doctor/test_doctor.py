"""nxc-doctor: this machine as it is, a Jetson from its files, and builds it can and cannot run (engines for another
TensorRT or GPU, stale engines, a graph TensorRT cannot parse, a missing provider, a newer or older nxc's build)."""
import hashlib
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from nxc.doctor import machine
from nxc.doctor.build import check_build
from nxc.doctor.cli import main
from nxc.engines.trt_build import onnx_fingerprint
from nxc.manifest import load_manifest

ORIN = "NVIDIA Jetson AGX Orin Developer Kit"
RELEASE = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n"


def fake_root(tmp_path: Path, *, release: str | None = RELEASE, model: str = ORIN) -> Path:
    """The files nxc-doctor reads on a Jetson (JetPack 6.2 on an AGX Orin), under `tmp_path`."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "proc/device-tree").mkdir(parents=True)
    if release is not None:
        (root / "etc/nv_tegra_release").write_text(release)
    (root / "proc/device-tree/model").write_text(model + "\x00")
    (root / "etc/os-release").write_text('NAME="Ubuntu"\nPRETTY_NAME="Ubuntu 22.04.5 LTS"\nVERSION_ID="22.04"\n')
    (root / "proc/meminfo").write_text("MemTotal:       64335836 kB\nMemFree:        50000000 kB\n"
                                       "MemAvailable:   60000000 kB\n")
    return root


def jetson_facts(tmp_path, *, tensorrt="10.3.0", gpu=("Orin", "8.7")) -> dict:
    """A Jetson's facts as machine_facts would give them there: its files read for real, TensorRT and the GPU
    stated (neither exists on this machine)."""
    facts = machine.machine_facts(fake_root(tmp_path))
    facts["tensorrt"] = {"version": tensorrt, "problem": None}
    facts["gpu"] = {"name": gpu[0], "compute_capability": gpu[1], "source": "the CUDA runtime via cuda-python"} if gpu else None
    return facts


@pytest.fixture
def build(embedded_build, tmp_path):
    """A copy of the embedded fp32 build that a test may change."""
    return Path(shutil.copytree(embedded_build, tmp_path / "build"))


def add_engines(build: Path, *, tensorrt: str, gpu: str, cc: str, graphs=None) -> Path:
    """engines/<gpu>-trt<version>/ as nxc-build writes it (engine.json; each .plan a placeholder: nxc-doctor reads
    engine.json and checks the files are there, it never deserializes an engine)."""
    m = load_manifest(build, verify=False)
    folder = build / "engines" / f"{gpu.replace(' ', '_')}-trt{tensorrt}"
    folder.mkdir(parents=True)
    records = {}
    for g in graphs or m.graphs:
        (folder / f"{g}.plan").write_bytes(b"plan")
        records[g] = {"file": f"{g}.plan", "onnx": m.graphs[g].file, "onnx_sha256": onnx_fingerprint(m, g)}
    (folder / "engine.json").write_text(json.dumps({"schema": "nxc-engines/1", "tensorrt": tensorrt, "gpu": gpu,
                                                    "compute_capability": cc, "precision": "fp32",
                                                    "graphs": records}))
    return folder


# -- this machine ------------------------------------------------------------------------------------------------

def test_this_machine_is_reported_as_it_is():
    f = machine.machine_facts()
    assert f["platform"]["machine"] == platform.machine()
    assert f["platform"]["python"] == platform.python_version()
    assert f["packages"]["numpy"] == np.__version__
    assert f["onnxruntime"]["version"] == ort.__version__
    assert f["onnxruntime"]["providers"] == ort.get_available_providers()
    assert 0 < f["memory"]["available_gb"] <= f["memory"]["total_gb"]
    if not Path("/etc/nv_tegra_release").exists():
        assert f["jetson"] is None
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert f["tensorrt"]["version"] is None and "not installed" in f["tensorrt"]["problem"]
    if shutil.which("nvidia-smi") is None and f["jetson"] is None and f["packages"]["cuda-python"] is None:
        assert f["gpu"] is None


def test_cli_prints_the_machine_and_json(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert f"onnxruntime  {ort.__version__}, providers: " in out and "CPUExecutionProvider" in out
    assert main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["machine"]["packages"]["onnxruntime"] == ort.__version__ and data["build"] is None


def test_doctor_runs_without_torch_transformers_onnx(embedded_build):
    code = ("import sys\nfor m in ('torch', 'transformers', 'onnx', 'torchvision', 'sentencepiece'):\n"
            "    sys.modules[m] = None\nfrom nxc.doctor.cli import main\n"
            f"sys.exit(main([{str(embedded_build)!r}, '--load']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "runs here with onnxruntime" in out.stdout


# -- a Jetson, from its files --------------------------------------------------------------------------------------

@pytest.mark.parametrize("release, model, want", [
    (RELEASE, ORIN, ("36.4.3", "6.2", "8.7")),
    ("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, DATE: Mon May  6 2024\n",
     "NVIDIA Jetson Orin Nano Developer Kit", ("36.3.0", "6.0", "8.7")),
    ("# R35 (release), REVISION: 5.0, GCID: 35550185, BOARD: t186ref, EABI: aarch64, DATE: Tue Feb 20 2024\n",
     "NVIDIA Jetson Xavier NX Developer Kit", ("35.5.0", "5.1.3", "7.2")),
    ("# R36 (release), REVISION: 9.1, GCID: 1, BOARD: generic, EABI: aarch64, DATE: 2027\n", ORIN,
     ("36.9.1", "6.x (L4T 36.9.1 is newer than this nxc's table)", "8.7")),
])
def test_jetson_release_and_module_from_its_files(tmp_path, release, model, want):
    j = machine.jetson_facts(fake_root(tmp_path, release=release, model=model))
    assert (j["l4t"], j["jetpack"], j["compute_capability"]) == want and j["model"] == model


def test_a_release_file_not_understood_is_said_so(tmp_path):
    j = machine.jetson_facts(fake_root(tmp_path, release="garbage\n"))
    assert j["l4t"] is None and "first line not understood: 'garbage'" in j["problem"]


def test_no_release_file_is_not_a_jetson(tmp_path):
    assert machine.jetson_facts(fake_root(tmp_path, release=None)) is None


def test_jetson_gpu_from_the_board_when_cuda_is_not_asked(tmp_path):
    j = machine.jetson_facts(fake_root(tmp_path))
    gpu = machine.gpu_facts(j)
    if machine.gpu_facts(None) is None:                     # this machine shows no GPU of its own
        assert gpu == {"name": ORIN, "compute_capability": "8.7", "source": "the Jetson board model"}


def test_cli_table_on_a_jetson(tmp_path, capsys):
    assert main([], root=fake_root(tmp_path)) == 0
    out = capsys.readouterr().out
    assert f"jetson       {ORIN}, L4T 36.4.3, JetPack 6.2" in out
    assert "Linux" in out and "Ubuntu 22.04.5 LTS" in out and "65.88 GB total, 61.44 GB available (shared with the GPU)" in out


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs a virtual environment (the test suite's .venv)")
def test_jetpack_tensorrt_outside_the_venv_names_system_site_packages(tmp_path):
    root = fake_root(tmp_path)
    (root / "usr/lib/python3.10/dist-packages/tensorrt").mkdir(parents=True)
    t = machine.tensorrt_facts(root)
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt imports here")
    except ImportError:
        pass
    assert t["version"] is None and "--system-site-packages" in t["problem"]


# -- builds -------------------------------------------------------------------------------------------------------

def test_a_build_runs_here_with_onnxruntime_and_load_makes_real_sessions(build):
    r = check_build(build, machine.machine_facts(), load=True, verify=True)
    assert r["readable"] and r["runs_with"][0] == "onnxruntime"
    assert [g["graph"] for g in r["graphs"]] == list(load_manifest(build).graphs)
    assert all(g["onnxruntime"]["ok"] and g["onnxruntime"]["load_seconds"] >= 0 for g in r["graphs"])


def test_engines_for_another_tensorrt_and_gpu(build, tmp_path, capsys):
    add_engines(build, tensorrt="10.7.0", gpu="NVIDIA H100 80GB HBM3", cc="9.0")
    r = check_build(build, jetson_facts(tmp_path))
    (engines,) = r["engines"]
    assert not engines["ok"] and engines["fix"] == f"nxc-build {build}"
    assert engines["why"] == ("built for TensorRT 10.7.0 on NVIDIA H100 80GB HBM3 (compute capability 9.0); this is "
                              "TensorRT 10.3.0 on Orin (8.7)")
    assert r["runs_with"] == ["onnxruntime"]
    for g in r["graphs"]:
        assert g["tensorrt"] == {"ok": False, "fix": f"nxc-build {build}",
                                 "why": "no engines for Orin with TensorRT 10.3.0 (engines/Orin-trt10.3.0/ is missing)"}


def test_engines_for_this_gpu_run_and_stale_or_missing_ones_are_named(build, tmp_path):
    facts = jetson_facts(tmp_path)
    folder = add_engines(build, tensorrt="10.3.0", gpu="Orin", cc="8.7")
    r = check_build(build, facts)
    assert r["runs_with"] == ["onnxruntime", "tensorrt"] and r["engines"][0]["ok"]
    info = json.loads((folder / "engine.json").read_text())
    info["graphs"]["llm"]["onnx_sha256"] = hashlib.sha256(b"another export").hexdigest()
    (folder / "engine.json").write_text(json.dumps(info))
    (folder / "sam_decoder.plan").unlink()
    rows = {g["graph"]: g["tensorrt"] for g in check_build(build, facts)["graphs"]}
    assert rows["llm"] == {"ok": False, "fix": f"nxc-build {build} --graphs llm",
                           "why": "its engine was built from another export of this graph (fingerprint differs)"}
    assert rows["sam_decoder"]["why"] == "engines/Orin-trt10.3.0/ has no engine for sam_decoder"
    assert rows["vision"]["ok"]


def test_same_folder_name_other_compute_capability_is_a_mismatch(build, tmp_path):
    add_engines(build, tensorrt="10.3.0", gpu="Orin", cc="7.2")
    r = check_build(build, jetson_facts(tmp_path))
    assert "compute capability 7.2" in r["graphs"][0]["tensorrt"]["why"] and r["runs_with"] == ["onnxruntime"]


def test_engines_without_tensorrt_here(build):
    add_engines(build, tensorrt="10.3.0", gpu="Orin", cc="8.7")
    facts = machine.machine_facts()
    if facts["tensorrt"]["version"]:
        pytest.skip("TensorRT is installed here")
    r = check_build(build, facts)
    assert r["engines"][0]["why"].startswith("TensorRT: not installed")
    assert all(g["tensorrt"]["why"].startswith("TensorRT: not installed") for g in r["graphs"])


def test_a_graph_tensorrt_cannot_parse_points_at_onnxruntime_or_fp16(build, tmp_path):
    m = json.loads((build / "manifest.json").read_text())
    m["graphs"]["llm"]["tensorrt_lint"] = {"ok": False, "problem_count": 1,
                                           "problems": ["node MatMulNBits_0: com.microsoft::MatMulNBits"]}
    (build / "manifest.json").write_text(json.dumps(m))
    add_engines(build, tensorrt="10.3.0", gpu="Orin", cc="8.7", graphs=["vision", "loc_heads"])
    rows = {g["graph"]: g["tensorrt"] for g in check_build(build, jetson_facts(tmp_path))["graphs"]}
    assert rows["llm"]["why"] == "TensorRT cannot parse this fp32 graph: node MatMulNBits_0: com.microsoft::MatMulNBits"
    assert rows["llm"]["fix"] == "run it with --backend onnxruntime, or export at --fp16 for TensorRT"
    assert rows["vision"]["ok"]


def test_a_missing_provider_is_named_with_its_fix(build, capsys):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    r = check_build(build, machine.machine_facts(), providers=["cuda"])
    assert not r["runs"] and r["why"].startswith("vision: CUDAExecutionProvider is not in this onnxruntime (it has ")
    assert "onnxruntime-gpu" in r["fix"]
    assert main([str(build), "--provider", "cuda"]) == 1
    out = capsys.readouterr().out
    assert "does not run here: vision: CUDAExecutionProvider is not in this onnxruntime" in out
    assert "      fix: install onnxruntime-gpu" in out


def test_a_missing_graph_file(build):
    (build / "graphs" / "loc_heads.onnx").unlink()
    rows = {g["graph"]: g for g in check_build(build, machine.machine_facts())["graphs"]}
    assert rows["loc_heads"]["onnxruntime"]["why"] == f"{build / 'graphs/loc_heads.onnx'} is missing"
    assert rows["vision"]["onnxruntime"]["ok"]


@pytest.mark.parametrize("schema, why, fix", [
    ("nxc-build/9", "written by a newer nxc (9.9.9, schema nxc-build/9); this nxc 0.1.0 reads nxc-build/2",
     "pip install -U nxc on this machine, or export the build with nxc 0.1.0"),
    ("nxc-build/1", None, "re-export it with this nxc-export"),
])
def test_a_build_from_another_nxc(build, capsys, schema, why, fix):
    m = json.loads((build / "manifest.json").read_text())
    m.update(schema=schema, nxc_version="9.9.9")
    (build / "manifest.json").write_text(json.dumps(m))
    r = check_build(build, machine.machine_facts())
    assert not r["readable"] and r["fix"] == fix
    if why:
        assert r["why"] == why
    assert main([str(build)]) == 2
    assert f"  fix: {fix}" in capsys.readouterr().out


def test_not_a_build(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    out = capsys.readouterr().out
    assert "no such build directory" in out and f"fix: create one with `nxc-export --out {tmp_path / 'nope'}`" in out


def test_cli_table_and_json_for_a_build(build, capsys):
    assert main([str(build)]) == 0
    out = capsys.readouterr().out
    assert f"build {build} (fp32, nxc 0.1.0): runs here with onnxruntime" in out
    assert "  llm          fp32              yes          no [1]" in out
    assert main([str(build), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["build"]["runs_with"][0] == "onnxruntime" and len(data["build"]["graphs"]) == 5


def test_a_drawing_build_names_its_picture_graphs_and_their_engines(drawing_build, tmp_path, capsys):
    """The projector, denoiser and latent_decoder are graphs like the others: rows with what they are for, engines
    checked per graph, a fix that nxc-build takes (its --graphs knows them)."""
    from nxc.engines.cli import parser as build_parser
    build = Path(shutil.copytree(drawing_build[0], tmp_path / "drawing"))
    assert main([str(build)]) == 0
    out = capsys.readouterr().out
    assert f"build {build} (fp32, nxc 0.1.0, draws pictures): runs here with onnxruntime" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and len(line.split()) > 3}
    assert rows["denoiser"].endswith("picture: every denoise step")
    assert rows["latent_decoder"].endswith("picture: latents -> pixels, once")
    assert rows["projector"].endswith("picture: signal tokens -> conditioning")
    assert rows["llm"].endswith("language model, every token")

    facts = jetson_facts(tmp_path)
    add_engines(build, tensorrt="10.3.0", gpu="Orin", cc="8.7",
                graphs=[g for g in load_manifest(build, verify=False).graphs if g != "denoiser"])
    r = check_build(build, facts)
    assert r["draws"] and r["runs_with"] == ["onnxruntime"]
    by = {g["graph"]: g for g in r["graphs"]}
    assert by["denoiser"]["tensorrt"] == {"ok": False, "why": "engines/Orin-trt10.3.0/ has no engine for denoiser",
                                          "fix": f"nxc-build {build} --graphs denoiser"}
    assert by["latent_decoder"]["tensorrt"]["ok"] and by["projector"]["tensorrt"]["ok"]
    assert build_parser().parse_args([str(build), "--graphs", "denoiser", "latent_decoder", "projector"]).graphs


def test_a_build_that_does_not_draw_says_nothing_of_pictures(build, capsys):
    assert main([str(build), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["build"]
    assert data["draws"] is False and {g["role"] for g in data["graphs"]} >= {"image encoder, once per image"}


def test_a_build_that_calls_modules_names_them_and_its_text_encoder(module_draw_build, capsys):
    """A VITRON-style build: its module table in the head line, the text encoder a graph with its role."""
    from nxc.engines.cli import parser as build_parser
    assert main([str(module_draw_build)]) == 0
    out = capsys.readouterr().out
    assert "draws pictures, module calls A: generate, B: segment): runs here with onnxruntime" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and len(line.split()) > 3}
    assert rows["text_encoder"].endswith("picture: a module call's text -> conditioning (and GLIGEN's phrases)")
    assert build_parser().parse_args([str(module_draw_build), "--graphs", "text_encoder"]).graphs
