"""Build TensorRT engines from a build directory's ONNX graphs (TensorRT 10 Python API).

    build/graphs/<graph>.onnx (+ <graph>.onnx.data)
          |  trt.OnnxParser(network, logger).parse_from_file(path)  (resolves external data beside the .onnx;
          |  parse(bytes) would need the path too, and a graph over 2 GB cannot be read into one protobuf at all)
          v
    INetworkDefinition  +  one IOptimizationProfile    <- manifest["axes"] through profile_shapes()
          |  IBuilderConfig: precision flags, workspace limit, shared timing cache
          v
    builder.build_serialized_network()  ->  serialized plan (IHostMemory)
          |  written into engines/.<folder>.partial-<pid>/, renamed into place last
          v
    build/engines/<gpu>-trt<version>/<graph>.plan + engine.json    (what nxc.runtime.backends.trt loads)

Precision: the build's own (manifest "precision") unless a higher one is asked for.
  fp32  no precision flag and TF32 off: true float32, comparable with ONNX Runtime (the GPU test asks 1e-3)
  fp16  BuilderFlag.FP16: TensorRT may run any layer in float16 (graph inputs/outputs keep their dtypes)
  int8  BuilderFlag.INT8 + FP16. Explicit quantization: an int8 build's graphs carry QuantizeLinear /
        DequantizeLinear pairs with their scales, so there is no calibrator and no calibration data; layers
        outside Q/DQ pairs may run in float16. --int8 on a build without Q/DQ graphs is refused.
  int4  as int8, plus BuilderFlag.INT4 (block-quantized weight-only Q/DQ).
The network is weakly typed (create_network(0): explicit batch is the only mode in TensorRT 10), which is what
these flags act on; TensorRT 11 removes them, and a missing flag is reported rather than skipped.

An interrupted or failed build leaves the previous engine folder as it was: nothing half-written can be loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TextIO

from nxc import __version__
from nxc.manifest import MANIFEST, BuildError, Manifest, load_manifest, sha256_file
from nxc.specs import GraphSpec

PRECISIONS = ("fp32", "fp16", "int8", "int4")           # in increasing order of reduction
ENGINE_JSON = "engine.json"
ENGINE_SCHEMA = "nxc-engines/1"
_FLAGS = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16"), "int4": ("INT8", "FP16", "INT4")}

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]          # input name -> (min shape, opt shape, max shape)


class EngineBuildError(RuntimeError):
    """TensorRT refused a graph (parse, profile or build): the message names the file and TensorRT's first error."""


@dataclass(frozen=True)
class EngineOptions:
    """What `build_engines` builds. precision None: the build's own; workspace_mb None: TensorRT's default limit
    (the device's memory); timing_cache: a file read if present and written back; graphs None: every graph."""
    precision: str | None = None
    workspace_mb: int | None = None
    timing_cache: Path | None = None
    graphs: tuple[str, ...] | None = None
    verbose: bool = False


def engine_folder_name(gpu_name: str, trt_version: str) -> str:
    """'<gpu name with spaces as _>-trt<version>': the folder the tensorrt backend looks for under engines/."""
    return f"{gpu_name.replace(' ', '_')}-trt{trt_version}"


def _ranges(axes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, int, int]]:
    """Checked (min, opt, max) per axis. `past` min is 0 (the prefill); `total` is derived as past + sequence:
    min = 0 + sequence min, max = past max + sequence max clipped to the manifest's total max, and at opt, where
    TensorRT times kernels and requires the shapes to agree, sequence opt is kept and past opt lowered so that
    past + sequence fits in total max."""
    r: dict[str, tuple[int, int, int]] = {}
    for name, v in axes.items():
        if (not isinstance(v, (list, tuple)) or len(v) != 3
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in v) or not 0 <= v[0] <= v[1] <= v[2]):
            raise ValueError(f"axis {name!r} is {v!r}; expected [min, opt, max] with 0 <= min <= opt <= max")
        r[name] = (v[0], v[1], v[2])
    if "past" in r and "sequence" in r:
        (_, p_opt, p_max), (s_min, s_opt, s_max) = r["past"], r["sequence"]
        t_max = min(p_max + s_max, r["total"][2]) if "total" in r else p_max + s_max
        s_opt = min(s_opt, t_max)
        p_opt = min(p_opt, t_max - s_opt)
        r["past"], r["sequence"] = (0, p_opt, p_max), (s_min, s_opt, s_max)
        r["total"] = (s_min, p_opt + s_opt, t_max)
        if t_max < s_min:
            raise ValueError(f"axes sequence {r['sequence']} and total max {t_max} leave no consistent profile")
    return r


def profile_shapes(spec: GraphSpec, axes: Mapping[str, Sequence[int]]) -> Profile:
    """{input name: (min, opt, max)} shapes of one graph's optimisation profile. Fixed dims are the same in all
    three; a named dim takes its axis's (min, opt, max) from `axes` (the manifest's, see `_ranges` for past /
    sequence / total). E.g. llm `attention_mask` [batch, total] -> ((1, 1), (1, po + so), (1, min(pm + sm, tm))).
    ValueError when an input uses an axis `axes` lacks or a range is malformed."""
    r = _ranges(axes)
    out: Profile = {}
    for t in spec.inputs:
        missing = [d for d in t.shape if isinstance(d, str) and d not in r]
        if missing:
            raise ValueError(f"graph {spec.name} input {t.name} uses axis {missing[0]!r}, which the axes lack")
        lo, opt, hi = (tuple(d if isinstance(d, int) else r[d][k] for d in t.shape) for k in range(3))
        out[t.name] = (lo, opt, hi)
    return out


def engine_precision(build_precision: str, requested: str | None) -> str:
    """The engine's precision: the build's, raised to `requested` when that is higher. BuildError for int8/int4
    asked of a build without Q/DQ graphs (explicit quantization needs the exporter's scales)."""
    for p in (build_precision, requested):
        if p is not None and p not in PRECISIONS:
            raise BuildError(f"precision {p!r} is unknown; nxc-build knows {', '.join(PRECISIONS)}")
    if requested in ("int8", "int4") and build_precision not in ("int8", "int4"):
        raise BuildError(f"--{requested} needs a build with quantized (Q/DQ) graphs and this build is "
                         f"{build_precision}; export one with `nxc-export --{requested}`")
    return max(build_precision, requested or build_precision, key=PRECISIONS.index)


def _one_line(text: object, limit: int = 400) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _make_logger(trt, *, verbose: bool, stream: TextIO):
    """A trt.ILogger that keeps errors (for one-line messages) and prints warnings only when verbose."""
    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
            if verbose and severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR, trt.ILogger.WARNING):
                print(f"\n[TensorRT] {msg}", file=stream, end="", flush=True)
    return _Logger()


def _timing_cache(builder, path: Path | None, stream: TextIO):
    """One ITimingCache shared by every graph's config: loaded from `path` if it exists, else empty."""
    if path is None:
        return None
    data = path.read_bytes() if path.is_file() else b""
    probe = builder.create_builder_config()
    cache = probe.create_timing_cache(data)
    if data and (cache is None or not probe.set_timing_cache(cache, ignore_mismatch=False)):
        print(f"[nxc-build] {path}: timing cache from another TensorRT or GPU; starting a new one", file=stream)
        cache = probe.create_timing_cache(b"")
    return cache


def external_data_problem(m: Manifest, graph: str) -> str | None:
    """Why TensorRT would not find a graph's external data, or None. The parser resolves each tensor's location
    relative to the .onnx's folder, so every data file must sit beside it, and the files the export's lint found
    in the graph (tensorrt_lint.external_data.files, plain names) must be the ones the manifest lists."""
    g = m.graphs[graph]
    folder = PurePosixPath(g.file).parent
    away = [e for e in g.external_data if PurePosixPath(e).parent != folder]
    if away:
        return (f"{m.graph_path(graph)}: its external data {away[0]} is not in the graph's folder {folder}/, where "
                "TensorRT looks for it; re-export the build")
    found = (g.extra.get("tensorrt_lint") or {}).get("external_data")
    if found is not None:
        named = {str(folder / f) for f in found.get("files", [])}
        if named != set(g.external_data):
            return (f"{m.graph_path(graph)}: the graph points to external data {sorted(named)} but the manifest lists "
                    f"{sorted(g.external_data)}; re-export the build")
    return None


def _build_one(trt, builder, logger, *, onnx: Path, profile: Profile, precision: str, workspace_mb: int | None,
               cache, out: Path) -> None:
    """Parse `onnx` from its file (so that external data beside it resolves), add its profile, build, write the plan
    to `out`. EngineBuildError naming `onnx` on failure. The parser owns the weights it read: it stays alive until
    the engine is built."""
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):
        first = parser.get_error(0) if parser.num_errors else (logger.errors or ["no error reported"])[0]
        raise EngineBuildError(f"{onnx}: TensorRT could not parse it: {_one_line(first)}")
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    unknown = [n for n in inputs if n not in profile]
    if unknown:
        raise EngineBuildError(f"{onnx}: input {unknown[0]!r} is not in the manifest's spec of this graph; "
                               "the build is inconsistent, re-export it")
    opt_profile = builder.create_optimization_profile()
    for name in inputs:
        lo, opt, hi = profile[name]
        try:
            opt_profile.set_shape(name, lo, opt, hi)
        except RuntimeError as e:
            raise EngineBuildError(f"{onnx}: TensorRT refused the profile of input {name} (min {lo}, opt {opt}, "
                                   f"max {hi}): {_one_line(e)}") from None
    config = builder.create_builder_config()
    for flag_name in _FLAGS[precision]:
        flag = getattr(trt.BuilderFlag, flag_name, None)
        if flag is None:
            raise EngineBuildError(f"TensorRT {trt.__version__} has no BuilderFlag.{flag_name}, which {precision} "
                                   "engines need; build them with TensorRT 10")
        config.set_flag(flag)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if cache is not None:
        config.set_timing_cache(cache, ignore_mismatch=False)
    if config.add_optimization_profile(opt_profile) < 0:
        raise EngineBuildError(f"{onnx}: TensorRT found the optimisation profile invalid: {profile}")
    seen = len(logger.errors)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        first = logger.errors[seen] if len(logger.errors) > seen else "no error reported (try --verbose)"
        raise EngineBuildError(f"{onnx}: TensorRT could not build an engine: {_one_line(first)}")
    with open(out, "wb") as f:
        f.write(plan)


def onnx_fingerprint(m: Manifest, graph: str) -> str:
    """sha256 over the manifest's hashes of a graph's .onnx and its external data (no file is re-read)."""
    g = m.graphs[graph]
    parts = [m.files[rel].sha256 for rel in [g.file, *g.external_data]]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _carry_over(m: Manifest, target: Path, tmp: Path, now: dict, rebuilt: list[str]) -> dict:
    """Engines of graphs not rebuilt this time, kept from the current folder (hard links) when the same TensorRT,
    GPU and precision built them from the same ONNX files."""
    try:
        old = json.loads((target / ENGINE_JSON).read_text())
    except (OSError, ValueError):
        return {}
    if any(old.get(k) != now[k] for k in ("tensorrt", "compute_capability", "precision")):
        return {}
    kept = {}
    for g, rec in old.get("graphs", {}).items():
        src = target / str(rec.get("file", ""))
        if (g in rebuilt or g not in m.graphs or not src.is_file() or src.stat().st_size != rec.get("bytes")
                or rec.get("onnx_sha256") != onnx_fingerprint(m, g)):
            continue
        try:
            os.link(src, tmp / src.name)
        except OSError:
            shutil.copy2(src, tmp / src.name)
        kept[g] = rec
    return kept


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace `target` by `tmp` (two renames; the old folder is removed last)."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def build_engines(build: str | Path, *, options: EngineOptions = EngineOptions(), trt=None, gpu: dict | None = None,
                  stream: TextIO | None = None) -> Path:
    """Build the engines of `build` into build/engines/<gpu>-trt<version>/ and return that folder. `trt` (the
    tensorrt module) and `gpu` ({"name", "compute_capability"}, `gpu_identity()`) are found when not given.
    Progress goes to `stream` (stderr), one line per graph. Raises BuildError (unusable build or options),
    EngineBuildError (TensorRT refused a graph), BackendError (no usable GPU)."""
    stream = stream or sys.stderr
    if trt is None:
        import tensorrt as trt
    if gpu is None:
        from nxc.runtime.backends.trt import gpu_identity
        gpu = gpu_identity()
    m = load_manifest(build)
    build_precision = m.precision
    precision = engine_precision(build_precision, options.precision)
    graphs = list(options.graphs or m.graphs)
    for g in graphs:
        m.graph_path(g)                                          # BuildError naming a graph the build lacks
        lint = m.graphs[g].extra.get("tensorrt_lint", {})
        if lint and not lint.get("ok", True):                    # e.g. an int4 llm's com.microsoft::MatMulNBits
            raise BuildError(f"{m.graph_path(g)}: the export's TensorRT lint found {lint.get('problem_count')} "
                             f"problem(s), first: {lint['problems'][0]}. Build the other graphs (--graphs ...) and "
                             "run this one in ONNX Runtime, or export it at fp16")
        problem = external_data_problem(m, g)
        if problem:
            raise BuildError(problem)
    try:
        profiles = {g: profile_shapes(m.graph_spec(g), m.axes) for g in graphs}
    except ValueError as e:
        raise BuildError(f"{m.root / MANIFEST}: {e}; re-export the build") from None

    engines = m.root / "engines"
    target = engines / engine_folder_name(gpu["name"], trt.__version__)
    tmp = engines / f".{target.name}.partial-{os.getpid()}"
    logger = _make_logger(trt, verbose=options.verbose, stream=stream)
    builder = trt.Builder(logger)
    cache = _timing_cache(builder, options.timing_cache, stream)
    engines.mkdir(exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    print(f"[nxc-build] {len(graphs)} graph(s), {precision} engines for {gpu['name']} (compute capability "
          f"{gpu['compute_capability']}), TensorRT {trt.__version__}", file=stream, flush=True)
    records: dict[str, dict] = {}
    try:
        for i, g in enumerate(graphs, 1):
            print(f"[nxc-build] [{i}/{len(graphs)}] {g}: building ... ", file=stream, end="", flush=True)
            t0, plan = time.perf_counter(), tmp / f"{g}.plan"
            try:
                _build_one(trt, builder, logger, onnx=m.graph_path(g), profile=profiles[g], precision=precision,
                           workspace_mb=options.workspace_mb, cache=cache, out=plan)
            except BaseException:
                print("failed", file=stream, flush=True)
                raise
            seconds, size = time.perf_counter() - t0, plan.stat().st_size
            print(f"{seconds:.1f} s, {size / 1e6:.1f} MB", file=stream, flush=True)
            shapes = {n: dict(zip(("min", "opt", "max"), map(list, s))) for n, s in profiles[g].items()}
            records[g] = {"file": plan.name, "sha256": sha256_file(plan), "bytes": size, "onnx": m.graphs[g].file,
                          "onnx_sha256": onnx_fingerprint(m, g), "profile": shapes, "build_seconds": round(seconds, 1)}
        info = {"schema": ENGINE_SCHEMA, "tensorrt": trt.__version__, "gpu": gpu["name"],
                "compute_capability": gpu["compute_capability"], "precision": precision,
                "build_precision": build_precision, "workspace_mb": options.workspace_mb,
                "built": datetime.now(timezone.utc).isoformat(timespec="seconds"), "nxc_version": __version__}
        records.update(_carry_over(m, target, tmp, info, graphs))
        info["graphs"] = {g: records[g] for g in m.graphs if g in records}
        (tmp / ENGINE_JSON).write_text(json.dumps(info, indent=2) + "\n")
        _swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if cache is not None and options.timing_cache is not None:      # kept even when a graph failed
            partial = options.timing_cache.with_name(options.timing_cache.name + ".partial")
            partial.write_bytes(cache.serialize())
            os.replace(partial, options.timing_cache)
    return target
