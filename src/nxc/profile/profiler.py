"""Stage-by-stage latency of builds, the memory-bandwidth roofline of decoding, and optional PyTorch comparison.

    for run in runs:                       (builds interleaved: machine drift hits every build alike)
        for build in builds:
            Timeline ─▶ pipe.conversation(image).ask(prompt)   (fresh conversation: vision and SAM counted)
    per stage: median / p90 of per-run totals, share of end-to-end; TTFT; decode tokens/s
    a build that draws: its projector, denoiser and latent_decoder graphs as stages too, and the denoiser per step
              (calls per run, median ms per call: one call per step, [unconditional, conditional] rows batched)
    roofline: bytes a decode step must read (llm weights + KV cache at its mean length) / step time,
              against this machine's copy bandwidth measured in the same run
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nxc import names
from nxc.config import NextChatConfig
from nxc.manifest import Manifest
from nxc.runtime.timing import STAGES, Timeline


def measure_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth in GB/s (read + write bytes of np.copyto on arrays far larger than the caches), best of N."""
    n = mb * (1 << 20) // 8
    a, b = np.ones(n), np.empty(n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best / 1e9


def measure_matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """float32 GEMM throughput in GFLOP/s (numpy's BLAS), best of N."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def drawing_stages(manifest: Manifest) -> tuple[str, ...]:
    """The stages a picture adds, in order (its graphs' names: projector, denoiser, latent_decoder); () for a build
    that does not draw."""
    g = manifest.generator
    heads = [h.graph for h in manifest.heads if h.kind == "signal" and h.graph]
    return () if g is None else (*heads, g.denoiser, g.decoder)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vision_flops(config: NextChatConfig) -> float:
    """Multiply-adds x 2 of the vision graph for one image: CLIP layers up to the selected one, plus projector."""
    v, h_llm = config.vision, config.llm.hidden_size
    n = v.num_patches + 1
    d, f = v.hidden_size, v.intermediate_size
    sel = config.mm_vision_select_layer
    layers = sel if sel >= 0 else v.num_layers + 1 + sel
    per_layer = 2 * n * (4 * d * d + 2 * d * f) + 4 * n * n * d
    patch = 2 * (n - 1) * 3 * v.patch_size ** 2 * d
    proj = 2 * (n - 1) * (d * h_llm + h_llm * h_llm * (config.mm_depth - 1))
    return layers * per_layer + patch + proj


def llm_weight_bytes(manifest: Manifest) -> int:
    g = manifest.graphs[names.GRAPH_LLM]
    return sum(manifest.files[f].bytes for f in [g.file, *g.external_data])


def decode_step_bytes(manifest: Manifest, cache_length: float) -> float:
    """Bytes one decode step must read: the llm graph's weights plus the KV cache at `cache_length` positions."""
    llm = manifest.config.llm
    kv_row = 2 * llm.num_layers * llm.num_kv_heads * llm.head_dim * np.dtype(manifest.kv_cache.dtype).itemsize
    return llm_weight_bytes(manifest) + kv_row * cache_length


@dataclass
class BuildProfile:
    build: Path
    runs: list[dict] = field(default_factory=list)          # per run: stage totals, e2e, ttft, tokens, triggers
    trace: Timeline | None = None
    reply: str = ""

    def summary(self, pipe, bandwidth_gbs: float, gflops: float) -> dict:
        m = pipe.manifest
        e2e = np.array([r["e2e"] for r in self.runs])
        stages = {}
        drawing = drawing_stages(m)
        for s in (*STAGES, *drawing):
            v = np.array([r["stages"].get(s, 0.0) for r in self.runs])
            stages[s] = {"median_ms": 1000 * float(np.median(v)), "p90_ms": 1000 * float(np.percentile(v, 90)),
                         "share": float(np.median(v) / np.median(e2e)) if np.median(e2e) else 0.0}
        tokens = int(np.median([r["tokens"] for r in self.runs]))
        decode_s = np.median([r["stages"].get("decode", 0.0) for r in self.runs])
        per_token = decode_s / max(1, tokens)
        stages["decode_per_token"] = {"median_ms": 1000 * float(per_token)}
        if drawing:
            calls = [t for r in self.runs for t in r["calls"][m.generator.denoiser]] or [0.0]
            stages["denoiser_per_step"] = {
                "count": int(np.median([len(r["calls"][m.generator.denoiser]) for r in self.runs])),
                "median_ms": 1000 * float(np.median(calls)), "p90_ms": 1000 * float(np.percentile(calls, 90))}
        step_bytes = decode_step_bytes(m, self.runs[-1]["prompt_tokens"] + tokens / 2)
        achieved = step_bytes / per_token / 1e9 if per_token else 0.0
        vis_s = np.median([r["stages"].get("vision", 0.0) for r in self.runs])
        vis_gflops = vision_flops(m.config) / vis_s / 1e9 if vis_s else 0.0
        return {
            "build": str(self.build), "precision": m.precision, "runs": len(self.runs),
            "stages": stages,
            "end_to_end_ms": {"median": 1000 * float(np.median(e2e)), "p90": 1000 * float(np.percentile(e2e, 90))},
            "stage_sum_ms": 1000 * float(np.median([sum(r["stages"].values()) for r in self.runs])),
            "ttft_ms": 1000 * float(np.median([r["ttft"] for r in self.runs])),
            "tokens": tokens, "triggers": int(np.median([r["triggers"] for r in self.runs])),
            "pictures": int(np.median([r["pictures"] for r in self.runs])),
            "decode_tokens_per_s": 1 / per_token if per_token else 0.0,
            "roofline": {
                "bandwidth_gbs": bandwidth_gbs, "decode_step_bytes": int(step_bytes),
                "decode_achieved_gbs": achieved, "decode_pct_of_roofline": 100 * achieved / bandwidth_gbs,
                "matmul_gflops": gflops, "vision_gflop": vision_flops(m.config) / 1e9,
                "vision_achieved_gflops": vis_gflops, "vision_pct_of_matmul": 100 * vis_gflops / gflops},
        }


def run_once(pipe, image, prompt: str, max_new_tokens: int, *, draw: dict | None = None
             ) -> tuple[dict, Timeline, object]:
    """One fresh turn, timed. draw: the picture options of a build that draws ({"steps", "guidance"})."""
    tl = Timeline()
    result = pipe.conversation(image).ask(prompt, max_new_tokens=max_new_tokens, timeline=tl,
                                          head_options={"signal": draw} if draw else None)
    tl.end = tl.end or time.perf_counter()
    rec = {"stages": tl.totals(), "e2e": tl.end - tl.start,
           "ttft": (tl.first_token or tl.end) - tl.start, "tokens": len(result.token_ids),
           "triggers": len(result.detections), "prompt_tokens": len(result.prompt_ids),
           "pictures": len(result.images),
           "calls": {s: [e.seconds for e in tl.events if e.stage == s] for s in drawing_stages(pipe.manifest)}}
    return rec, tl, result


def profile(builds: list[Path], image, prompt: str, *, runs: int = 5, warmup: int = 1, max_new_tokens: int = 64,
            progress=None, threads: int | None = None, draw: dict | None = None) -> dict:
    from nxc.runtime.pipeline import Pipeline
    pipes = [Pipeline.load(b, threads=threads) for b in builds]
    profiles = [BuildProfile(b) for b in builds]
    total = (warmup + runs) * len(builds)
    done = 0
    for r in range(warmup + runs):
        for i, b in enumerate(builds):                    # interleaved
            rec, tl, result = run_once(pipes[i], image, prompt, max_new_tokens, draw=draw)
            if r >= warmup:
                profiles[i].runs.append(rec)
                profiles[i].trace = tl
                profiles[i].reply = result.text
            done += 1
            if progress:
                progress(done, total, b)
    bw, gf = measure_bandwidth(), measure_matmul_gflops()
    out = {"prompt": prompt, "image_size": list(image.size), "max_new_tokens": max_new_tokens, "warmup": warmup,
           "builds": [], "machine": {"bandwidth_gbs": bw, "matmul_gflops": gf}, "peak_rss_mb": peak_rss_mb()}
    for i, b in enumerate(builds):
        s = profiles[i].summary(pipes[i], bw, gf)
        s["reply"] = profiles[i].reply
        out["builds"].append(s)
    out["_timelines"] = {f"{i}: {b}": profiles[i].trace for i, b in enumerate(builds)}
    return out


def chrome_trace(timelines: dict[str, Timeline]) -> dict:
    """Chrome / Perfetto trace JSON (one process per build, one complete event per stage)."""
    events = []
    for pid, (name, tl) in enumerate(timelines.items(), 1):
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 1, "args": {"name": name}})
        for e in tl.events:
            events.append({"name": e.stage, "cat": "nxc", "ph": "X", "pid": pid, "tid": 1,
                           "ts": round((e.start - tl.start) * 1e6, 3), "dur": round(e.seconds * 1e6, 3)})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def torch_reference_ms(manifest: Manifest, image, prompt: str, *, runs: int, max_new_tokens: int) -> dict:
    """Median end-to-end of the PyTorch reference on the build's source checkpoint (export environment only)."""
    from nxc.assets import resolve_checkpoint
    from nxc.model.nextgpt import is_nextgpt_checkpoint
    from nxc.model.retrieval import is_retrieval_checkpoint
    src = str(manifest.source.get("checkpoint", ""))
    ckpt = resolve_checkpoint(src)
    if not (Path(ckpt) / "config.json").is_file():
        raise FileNotFoundError(f"--vs-torch needs the build's source checkpoint, {src!r}, which is not here")
    if is_nextgpt_checkpoint(ckpt):                   # each family's own reference chat
        from nxc.model.nextgpt_reference import NextGptReferenceChat as Reference
    elif is_retrieval_checkpoint(ckpt):
        from nxc.model.retrieval import RetrievalReferenceChat as Reference
    else:
        from nxc.model.reference import ReferenceChat as Reference
    ref = Reference.load(ckpt)
    ref.chat(image, prompt, max_new_tokens=max_new_tokens)
    times, tokens = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        r = ref.chat(image, prompt, max_new_tokens=max_new_tokens)
        times.append(time.perf_counter() - t0)
        tokens = len(r.token_ids)
    return {"checkpoint": str(ckpt), "end_to_end_ms": 1000 * float(np.median(times)), "tokens": tokens}
