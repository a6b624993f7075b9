"""Can this machine run a build, graph by graph, and if not, why and what fixes it (nxc-doctor BUILD).

    manifest.json ---- schema / nxc version ----------------------------> newer nxc? older build?
         |
         +-- each graph --- file there (size; sha256 with verify) ------> re-export
         |                  ONNX Runtime: providers here (a session with load)
         |                  TensorRT: the export's lint, engines/<gpu>-trt<version>/ for this GPU and TensorRT
         |
         +-- engines/*/engine.json --- TensorRT version, compute capability, graphs' fingerprints vs this build

Pure logic over `facts` (nxc.doctor.machine.machine_facts, or a Jetson's facts in a test): nothing here needs
TensorRT or a GPU. A row says "yes", or "no" with `why` and the command in `fix`.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from nxc import __version__, names
from nxc.engines.trt_build import ENGINE_JSON, engine_folder_name, onnx_fingerprint
from nxc.manifest import MANIFEST, SCHEMA, BuildError, Manifest, load_manifest
from nxc.runtime.backends.ort import PROVIDER_FLAGS
from nxc.runtime.backends.trt import engine_mismatch

# What each graph does (the table's last column); a build that draws has the last three beside its family's
ROLES = {names.GRAPH_VISION: "image encoder, once per image", names.GRAPH_LLM: "language model, every token",
         names.GRAPH_LOC_HEADS: "boxes, per grounded phrase", names.GRAPH_SAM_ENCODER: "masks: image, once per image",
         names.GRAPH_SAM_DECODER: "masks, once per reply", names.GRAPH_PROPOSALS: "object proposals, once per image",
         names.GRAPH_OBJECT_FEATURES: "object rows, once per image",
         names.GRAPH_PROJECTOR: "picture: signal tokens -> conditioning",
         names.GRAPH_DENOISER: "picture: every denoise step",
         names.GRAPH_LATENT_DECODER: "picture: latents -> pixels, once",
         names.GRAPH_TEXT_ENCODER: "picture: a module call's text -> conditioning (and GLIGEN's phrases)",
         names.GRAPH_LATENT_ENCODER: "editing: the picture to edit -> latents, once per edit"}

GPU_ONNXRUNTIME = ("install onnxruntime-gpu built for this machine's CUDA (on a Jetson: the wheel for your JetPack "
                   "from NVIDIA's Jetson AI Lab index), or run on the CPU provider (the default)")


def _schema_number(schema) -> int | None:
    m = re.fullmatch(r"nxc-build/(\d+)", schema) if isinstance(schema, str) else None
    return int(m.group(1)) if m else None


def _manifest_problem(build: Path, error: BuildError) -> tuple[str, str]:
    """(why, fix) for a build this nxc cannot read; a newer nxc's build says so instead of 'damaged'."""
    try:
        data = json.loads((build / MANIFEST).read_text())
        schema, version = data.get("schema"), data.get("nxc_version")
    except (OSError, ValueError, AttributeError):
        schema = version = None
    theirs, ours = _schema_number(schema), _schema_number(SCHEMA)
    if theirs is not None and theirs > ours:
        return (f"written by a newer nxc ({version or 'unknown version'}, schema {schema}); this nxc {__version__} "
                f"reads {SCHEMA}", "pip install -U nxc on this machine, or export the build with nxc " + __version__)
    text = str(error)
    fix = re.search(r"(?:;|\.) ((?:re-export|create|export|copy|run)\b.*)$", text)
    return text, fix.group(1) if fix else f"re-export the build with nxc-export --out {build}"


def _requested_providers(providers: list[str] | None) -> list[str]:
    names = [PROVIDER_FLAGS.get(p.lower(), p) for p in providers or ["cpu"]]
    return names + ([] if "CPUExecutionProvider" in names else ["CPUExecutionProvider"])


def _onnxruntime_row(m: Manifest, graph: str, facts: dict, providers: list[str], load: bool) -> dict:
    ort_facts = facts["onnxruntime"]
    if ort_facts.get("version") is None:
        return {"ok": False, "why": ort_facts.get("problem") or "onnxruntime is not installed",
                "fix": "pip install onnxruntime (the runtime's own dependency)"}
    missing = [p for p in providers if p not in ort_facts["providers"]]
    if missing:
        return {"ok": False, "why": f"{missing[0]} is not in this onnxruntime (it has "
                f"{', '.join(ort_facts['providers'])})", "fix": GPU_ONNXRUNTIME}
    if not load:
        return {"ok": True, "why": None, "fix": None, "providers": providers}
    import onnxruntime as ort
    t0 = time.perf_counter()
    try:
        ort.InferenceSession(str(m.graph_path(graph)), providers=providers)
    except Exception as e:                                   # ORT raises its own Fail / InvalidGraph / RuntimeError
        first = " ".join(str(e).split())[:300]
        return {"ok": False, "why": f"ONNX Runtime {ort_facts['version']} cannot load it: {first}",
                "fix": "pip install -U onnxruntime (a newer opset or operator), or re-export with this nxc"}
    return {"ok": True, "why": None, "fix": None, "providers": providers,
            "load_seconds": round(time.perf_counter() - t0, 2)}


def _tensorrt_unavailable(facts: dict) -> dict | None:
    """Why no engine can run on this machine at all (no TensorRT, no GPU), or None."""
    if facts["tensorrt"].get("version") is None:
        return {"ok": False, "why": f"TensorRT: {facts['tensorrt'].get('problem')}",
                "fix": "install TensorRT (JetPack brings it), or run the build with --backend onnxruntime"}
    if facts.get("gpu") is None:
        return {"ok": False, "why": "no NVIDIA GPU is visible here", "fix": "run with --backend onnxruntime"}
    return None


def _engine_folder_status(build: Path, folder: Path, facts: dict) -> tuple[dict, dict | None]:
    """One engines/<name>/ folder: (what it was built for and whether it runs here, its engine.json)."""
    meta = folder / ENGINE_JSON
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        return {"folder": folder.name, "ok": False, "why": f"{meta}: unreadable ({e})", "fix": f"nxc-build {build}"}, None
    row = {"folder": folder.name, "tensorrt": info.get("tensorrt"), "gpu": info.get("gpu"),
           "compute_capability": info.get("compute_capability"), "precision": info.get("precision"),
           "graphs": sorted(info.get("graphs", {}))}
    unavailable = _tensorrt_unavailable(facts)
    if unavailable:
        return {**row, **unavailable}, info
    trt_version, gpu = facts["tensorrt"]["version"], facts["gpu"]
    if engine_mismatch(info, tensorrt=trt_version, gpu=gpu, meta=meta, build=build):
        return {**row, "ok": False,
                "why": f"built for TensorRT {info.get('tensorrt')} on {info.get('gpu')} (compute capability "
                       f"{info.get('compute_capability')}); this is TensorRT {trt_version} on {gpu['name']} "
                       f"({gpu['compute_capability']})",
                "fix": f"nxc-build {build}"}, info
    return {**row, "ok": True, "why": None, "fix": None}, info


def _tensorrt_row(m: Manifest, graph: str, facts: dict, here: dict | None) -> dict:
    build = m.root
    lint = m.graphs[graph].extra.get("tensorrt_lint", {})
    if lint and not lint.get("ok", True):
        problems = lint.get("problems") or ["?"]
        return {"ok": False, "why": f"TensorRT cannot parse this {m.graphs[graph].precision} graph: {problems[0]}",
                "fix": "run it with --backend onnxruntime, or export at --fp16 for TensorRT"}
    if here is None:
        unavailable = _tensorrt_unavailable(facts)
        if unavailable:
            return unavailable
        trt_version, gpu = facts["tensorrt"]["version"], facts["gpu"]
        return {"ok": False, "why": f"no engines for {gpu['name']} with TensorRT {trt_version} "
                f"(engines/{engine_folder_name(gpu['name'], trt_version)}/ is missing)", "fix": f"nxc-build {build}"}
    if not here["ok"]:
        return {"ok": False, "why": here["why"], "fix": here["fix"]}
    record = here["info"].get("graphs", {}).get(graph)
    folder = build / "engines" / here["folder"]
    if record is None or not (folder / record.get("file", f"{graph}.plan")).is_file():
        return {"ok": False, "why": f"engines/{here['folder']}/ has no engine for {graph}",
                "fix": f"nxc-build {build} --graphs {graph}"}
    if record.get("onnx_sha256") != onnx_fingerprint(m, graph):
        return {"ok": False, "why": "its engine was built from another export of this graph (fingerprint differs)",
                "fix": f"nxc-build {build} --graphs {graph}"}
    return {"ok": True, "why": None, "fix": None}


def check_build(build: Path | str, facts: dict, *, providers: list[str] | None = None, verify: bool = False,
                load: bool = False) -> dict:
    """What of `build` runs on the machine `facts` describes. `verify` re-hashes every file (as nxc-run does);
    `load` makes an ONNX Runtime session of each graph (real, and as slow and large as the graph)."""
    build = Path(build)
    report = {"build": str(build), "readable": False, "runs": False, "why": None, "fix": None, "graphs": [],
              "engines": []}
    try:
        m = load_manifest(build, verify=verify)
    except BuildError as e:
        report["why"], report["fix"] = _manifest_problem(build, e)
        return report
    report.update(readable=True, precision=m.precision, nxc_version=m.nxc_version, created=m.created)
    if m.nxc_version != __version__:
        report["note"] = f"exported by nxc {m.nxc_version}; this is nxc {__version__}"
    folders = sorted(p for p in (build / "engines").glob("*") if p.is_dir() and not p.name.startswith(".")) \
        if (build / "engines").is_dir() else []
    statuses = [_engine_folder_status(build, f, facts) for f in folders]
    report["engines"] = [row for row, _ in statuses]
    here = None
    if _tensorrt_unavailable(facts) is None:
        name = engine_folder_name(facts["gpu"]["name"], facts["tensorrt"]["version"])
        here = next(({**row, "info": info} for row, info in statuses if row["folder"] == name), None)
    elif report["engines"]:
        here = report["engines"][0]                           # the reason no engine runs here is the same for all
    wanted = _requested_providers(providers)
    for graph in m.graphs:
        missing = [rel for rel in (m.graphs[graph].file, *m.graphs[graph].external_data)
                   if not (build / rel).is_file()]
        if missing:
            row_ort = row_trt = {"ok": False, "why": f"{build / missing[0]} is missing",
                                 "fix": f"re-export the build (nxc-export --out {build})"}
        else:
            row_ort = _onnxruntime_row(m, graph, facts, wanted, load)
            row_trt = _tensorrt_row(m, graph, facts, here)
        report["graphs"].append({"graph": graph, "precision": m.graphs[graph].precision,
                                 "role": ROLES.get(graph, "-"), "onnxruntime": row_ort, "tensorrt": row_trt})
    report["runs_with"] = [b for b in ("onnxruntime", "tensorrt") if all(g[b]["ok"] for g in report["graphs"])]
    report["runs"] = bool(report["runs_with"])
    report["draws"] = m.generator is not None            # pictures: its projector, denoiser and latent_decoder
    report["modules"] = ({k: e.backend for k, e in m.modules.calls.items()} if m.modules is not None
                         else None)                          # module calls (VITRON-style): module -> backend
    if not report["runs"]:
        first = next(g for g in report["graphs"] if not g["onnxruntime"]["ok"])
        report["why"] = f"{first['graph']}: {first['onnxruntime']['why']}"
        report["fix"] = first["onnxruntime"]["fix"]
    return report
