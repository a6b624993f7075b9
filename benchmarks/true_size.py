"""NExT-Chat at its true size on this machine (issue 17, item 7): make a random-weight 7B checkpoint, export it at
fp16 / int8 / int4, answer a grounded prompt with the int4 and int8 builds, and decode against onnxruntime-genai's
int4 build of the same LLaMA weights. Not run in CI: it needs ~60 GB of disk and hours on a laptop-class CPU.

    .venv/bin/python benchmarks/true_size.py --work /data/ts --keep                       # everything, true sizes
    .venv/bin/python benchmarks/true_size.py --work /data/ts --keep --steps run,genai     # again, reusing WORK
    .venv/bin/python benchmarks/true_size.py --llm tiny --vision tiny --sam tiny          # a dry run (a minute)
    .venv/bin/python benchmarks/true_size.py --family nextgpt --work /data/ng --keep     # NExT-GPT-7B: make, export

--family nextgpt: NExT-GPT-7B's layout (nxc-make-checkpoint --family nextgpt --llm vicuna-7b --vision imagebind-huge
--projector nextgpt --generator sd-1.5), steps make and export only (run asks a grounded prompt; genai measures the
same LLaMA as the NExT-Chat rows). A dry run: --family nextgpt --llm tiny --vision tiny --projector tiny
--generator tiny.

Steps (--steps, in this order; each reads what the earlier ones left in WORK):
  make    nxc-make-checkpoint WORK/ckpt (--trigger-prompt: the greedy reply to --prompt is one box and one mask)
  export  nxc-export WORK/ckpt --out WORK/build-{fp16,int8,int4}, calibrated on generated photos (WORK/calib)
  run     per int4 / int8 build: load, one grounded reply on a generated 1280x960 photo, per-stage times, then
          --decode-steps greedy steps continuing the reply's KV cache (decode tokens/s, % of the copy roofline)
  genai   an HF LLaMA folder of the checkpoint's LLaMA (WORK/hf, streamed one tensor at a time), onnxruntime-genai's
          int4 builder on it (WORK/genai-int4), its greedy decode at the context nxc decoded at
  llama   (issue 30) llama.cpp on the same LLaMA: WORK/hf (made again if genai removed it) ─ convert_hf_to_gguf.py
          ─▶ f16 GGUF ─ llama-quantize ─▶ Q4_0 and Q8_0 (WORK/gguf; f16 removed once quantized), llama-bench at the
          same threads: decode at the context nxc's int4 run decoded at, prompt processing of as many tokens as its
          grounded prompt; Q4_0 against nxc int4, Q8_0 against nxc int8 (benchmarks/llama_cpp_bench.py builds
          llama.cpp once; skipped with the reason where it cannot)
Every heavy piece runs in its own process under a small wrapper that reports that process tree's peak RSS
(RUSAGE_CHILDREN of a fresh wrapper: no other child mixes in) and wall time; its output goes to stderr and
WORK/logs/<piece>.log. Results accumulate in WORK/results.json, so a step rerun replaces only its own entries.
The JSON goes to stdout (and --json FILE). WORK is deleted at the end unless --keep or a step failed; without
--keep the fp16 build is deleted once measured and WORK/hf once genai's build is made (disk).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

STEPS = ("make", "export", "run", "genai", "llama")
FAMILY_STEPS = {"nextchat": STEPS, "nextgpt": ("make", "export")}
PRECISIONS = ("fp16", "int8", "int4")
RUN_PRECISIONS = ("int4", "int8")
DEFAULT_PROMPT = "Where is the dog in the image?"
GB = 1e9

# One fresh wrapper per measured process: RUSAGE_CHILDREN's ru_maxrss is the largest peak among the processes it
# waited for, so a wrapper that waits for nothing else reports the peak of exactly this command's process tree.
_MEASURE = r"""
import collections, json, resource, subprocess, sys, time
out, log, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
tail = collections.deque(maxlen=40)
t0 = time.perf_counter()
with open(log, "w") as f:
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    for line in p.stdout:
        sys.stderr.write(line); sys.stderr.flush(); f.write(line); f.flush(); tail.append(line.rstrip())
    rc = p.wait()
json.dump({"rc": rc, "seconds": time.perf_counter() - t0, "tail": list(tail),
           "peak_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, open(out, "w"))
"""


def log(msg: str) -> None:
    print(f"[true-size] {msg}", file=sys.stderr, flush=True)


def gb(n: float) -> float:
    return round(n / GB, 3)


def tool(name: str) -> str:
    """A console script of this environment (next to this python), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.is_file() else (shutil.which(name) or name)


def measured(cmd: list[str], work: Path, name: str) -> dict:
    """Run `cmd` under the peak-RSS wrapper. -> ok, rc, seconds, peak_rss_gb (+ the output's tail if it failed)."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = logs / f"{name}.rss.json"
    out.unlink(missing_ok=True)
    log(f"{name}: {' '.join(cmd)}")
    subprocess.run([sys.executable, "-c", _MEASURE, str(out), str(logs / f"{name}.log"), *cmd])
    r = json.loads(out.read_text())
    rec = {"ok": r["rc"] == 0, "rc": r["rc"], "seconds": round(r["seconds"], 2),
           "peak_rss_gb": gb(r["peak_rss_kb"] * 1024)}
    if r["rc"] != 0:
        rec["error_tail"] = r["tail"][-12:]
        if r["rc"] < 0:
            rec["killed_by_signal"] = -r["rc"]      # 9: most likely the kernel's out-of-memory killer
    log(f"{name}: rc {rec['rc']}, {rec['seconds']} s, peak RSS {rec['peak_rss_gb']} GB")
    return rec


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# -- generated photos ---------------------------------------------------------------------------------------------
def photo(seed: int, width: int = 1280, height: int = 960):
    """A photo-like RGB image: a sky-to-ground gradient, random filled shapes, sensor noise, a slight blur."""
    from PIL import Image, ImageDraw, ImageFilter
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    top, bottom = rng.uniform(60, 255, 3).astype(np.float32), rng.uniform(0, 200, 3).astype(np.float32)
    base = np.broadcast_to(top + (bottom - top) * t, (height, width, 3))
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = rng.uniform(0, width * 0.9), rng.uniform(0, height * 0.9)
        w, h = rng.uniform(0.05, 0.4) * width, rng.uniform(0.05, 0.4) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            draw.polygon([(x0, y0 + h), (x0 + w / 2, y0), (x0 + w, y0 + h)], fill=colour)
    noisy = np.asarray(img, np.float32) + rng.normal(0, 6, (height, width, 3)).astype(np.float32)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0))


def make_calib(folder: Path, n: int, size: tuple[int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        p = folder / f"photo-{i:02d}.jpg"
        if not p.is_file():
            photo(100 + i, *size).save(p, quality=92)


# -- steps --------------------------------------------------------------------------------------------------------
def step_make(a, work: Path) -> dict:
    ckpt = work / "ckpt"
    if ckpt.exists():
        log(f"make: removing the earlier {ckpt}")
        shutil.rmtree(ckpt)
    family = (["--sam", a.sam, "--trigger-prompt", a.prompt] if a.family == "nextchat" else
              ["--family", "nextgpt", "--projector", a.projector, "--generator", a.generator])
    rec = measured([tool("nxc-make-checkpoint"), str(ckpt), "--llm", a.llm, "--vision", a.vision, "--dtype", a.dtype,
                    *family], work, "make")
    if rec["ok"]:
        rec["bytes_on_disk"] = dir_bytes(ckpt)
        rec["gb_on_disk"] = gb(rec["bytes_on_disk"])
    return rec


def build_summary(build: Path) -> dict:
    """Sizes from the manifest (per graph: .onnx + external data), the llm's parity worst relative error and the
    accuracy report's worst cosine / max abs error per graph."""
    from nxc.manifest import load_manifest
    m = load_manifest(build, verify=False)
    graphs = {}
    for g, e in m.graphs.items():
        files = {f: m.files[f].bytes for f in [e.file, *e.external_data]}
        graphs[g] = {"precision": e.precision, "bytes": sum(files.values()), "gb": gb(sum(files.values())),
                     "files": files}
    out = {"build_bytes": dir_bytes(build), "manifest_file_bytes": sum(f.bytes for f in m.files.values()),
           "graphs": graphs}
    out["build_gb"] = gb(out["build_bytes"])
    parity = build / "reports" / "parity.json"
    if parity.is_file():
        rep = json.loads(parity.read_text())
        llm = rep.get("llm") or {}
        if llm.get("checks"):
            out["llm_parity"] = {"ok": llm.get("ok"), "tolerance_rel_l2": llm.get("tolerance_rel_l2"),
                                 "worst_rel_l2": max(c["worst_rel_l2"] for c in llm["checks"]),
                                 "worst_output": max(llm["checks"], key=lambda c: c["worst_rel_l2"])["worst"]}
        out["parity_ok"] = {g: r.get("ok") for g, r in rep.items() if isinstance(r, dict)}
    accuracy = build / "reports" / "accuracy.json"
    if accuracy.is_file():
        rep = json.loads(accuracy.read_text()).get("graphs", {})
        out["accuracy_vs_fp32"] = {g: {"min_cosine": min(v["cosine"] for v in outs.values()),
                                       "max_abs": max(v["max_abs"] for v in outs.values())}
                                   for g, outs in rep.items() if outs}
    return out


def step_export(a, work: Path, precision: str) -> dict:
    ckpt, build = work / "ckpt", work / f"build-{precision}"
    if not (ckpt / "config.json").is_file():
        return {"ok": False, "skipped": f"no checkpoint in {ckpt}: run the make step first"}
    if build.exists():
        log(f"export {precision}: removing the earlier {build}")
        shutil.rmtree(build)
    cmd = [tool("nxc-export"), str(ckpt), "--out", str(build), f"--{precision}"]
    if precision in ("int8", "int4"):
        make_calib(work / "calib", a.calib_images, a.image_size)
        cmd += ["--calib-images", str(work / "calib"), "--calib-samples", str(a.calib_images)]
    if a.max_context:
        cmd += ["--max-context", str(a.max_context)]
    rec = measured(cmd, work, f"export-{precision}")
    if rec["ok"]:
        rec.update(build_summary(build))
    return rec


def step_run(a, work: Path, precision: str) -> dict:
    build = work / f"build-{precision}"
    if not (build / "manifest.json").is_file():
        return {"ok": False, "skipped": f"no build in {build}: run the export step first"}
    out = work / "logs" / f"run-{precision}.result.json"
    out.unlink(missing_ok=True)
    rec = measured([sys.executable, __file__, "_run", str(build), str(out), "--prompt", a.prompt,
                    "--max-new-tokens", str(a.max_new_tokens), "--decode-steps", str(a.decode_steps),
                    "--image-size", f"{a.image_size[0]}x{a.image_size[1]}"]
                   + (["--low-memory"] if a.low_memory else []), work, f"run-{precision}")
    if out.is_file():
        rec.update(json.loads(out.read_text()))
        files = rec["build_file_bytes"]
        rec["peak_minus_files_gb"] = round(rec["peak_rss_gb"] - gb(files), 3)
        rec["peak_within_files_plus_3gb"] = rec["peak_rss_gb"] <= gb(files) + 3
        rec["ok"] = rec["ok"] and rec["grounded"]
    return rec


def _vm() -> dict:
    """This process's resident memory now and its peak so far (VmRSS, VmHWM), in GB."""
    got = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            got["rss" if line.startswith("VmRSS") else "hwm"] = round(int(line.split()[1]) * 1024 / GB, 3)
    return got


def child_run(argv: list[str]) -> int:
    """In its own process: load the build, one grounded reply (profiler's run_once), then continued decode."""
    ap = argparse.ArgumentParser(prog="true_size.py _run")
    ap.add_argument("build", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--decode-steps", type=int, required=True)
    ap.add_argument("--image-size", required=True)
    ap.add_argument("--low-memory", action="store_true")
    a = ap.parse_args(argv)
    from nxc.runtime.pipeline import Pipeline
    from nxc.runtime.timing import Timeline
    w, h = (int(v) for v in a.image_size.split("x"))
    image = photo(7, w, h)
    t0 = time.perf_counter()
    pipe = Pipeline.load(a.build, low_memory=a.low_memory)   # verify=True: sha256 of every file, as a user loads it
    t1 = time.perf_counter()
    loaded = {}
    for g in pipe.manifest.graphs:                    # sessions now, so that no stage below counts a session load
        before = _vm()["rss"]
        pipe.runner(g)
        loaded[g] = round(_vm()["rss"] - before, 3)   # what this graph's session adds (GB)
    t2 = time.perf_counter()
    print(f"[true-size] loaded {a.build.name}: manifest {t1 - t0:.1f} s, sessions {t2 - t1:.1f} s", file=sys.stderr)
    memory = {"after_load": _vm(), "session_rss_gb": loaded}
    samples, sampling = [], threading.Event()

    def sample():                                     # RSS every 20 ms, matched to the reply's stages below
        while not sampling.wait(0.02):
            samples.append((time.perf_counter(), _vm()["rss"]))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    conv = pipe.conversation(image)         # as the profiler's run_once, keeping the conversation (its KV cache)
    tl = Timeline()
    result = conv.ask(a.prompt, max_new_tokens=a.max_new_tokens, timeline=tl)
    tl.end = tl.end or time.perf_counter()
    memory["after_reply"] = _vm()
    sampling.set()
    sampler.join()
    memory["peak_rss_by_stage"] = {}
    for e in tl.events:
        inside = [r for t, r in samples if e.start <= t <= e.end]
        if inside:
            memory["peak_rss_by_stage"][e.stage] = max(memory["peak_rss_by_stage"].get(e.stage, 0), max(inside))
    stages = tl.totals()
    tokens = len(result.token_ids)
    dets = result.detections
    masks = [d for d in dets if getattr(d, "mask", None) is not None]
    m = pipe.manifest
    rec = {"load_manifest_s": round(t1 - t0, 2), "load_sessions_s": round(t2 - t1, 2),
           "image_size": [w, h], "prompt_tokens": len(result.prompt_ids),
           "image_tokens": m.prompt.num_image_tokens,
           "stages_ms": {s: round(1000 * v, 1) for s, v in stages.items()},
           "end_to_end_ms": round(1000 * (tl.end - tl.start), 1),
           "ttft_ms": round(1000 * ((tl.first_token or tl.end) - tl.start), 1),
           "prefill_tokens_per_s": round(len(result.prompt_ids) / stages["prefill"], 1) if stages["prefill"] else None,
           "reply_tokens": tokens, "reply": result.text, "raw_reply": result.raw_text,
           "finish_reason": result.finish_reason,
           "reply_decode_tokens_per_s": round(tokens / stages["decode"], 3) if stages["decode"] else None,
           "boxes": len(dets), "masks": len(masks),
           "mask_pixels": [int(np.count_nonzero(d.mask)) for d in masks],
           "box_px": [[round(float(v), 1) for v in d.box] for d in dets]}
    rec["grounded"] = rec["boxes"] >= 1 and rec["masks"] >= 1
    if not rec["grounded"]:
        rec["grounded_problem"] = (f"the reply {result.raw_text!r} has {rec['boxes']} box(es) and {rec['masks']} "
                                   "mask(s); the checkpoint's --trigger-prompt promises one of each")
    print(f"[true-size] reply {result.raw_text!r}: {rec['boxes']} box(es), {rec['masks']} mask(s)", file=sys.stderr)
    # decode: continue greedily on the conversation's KV cache (the reply is a few tokens, too few to time)
    cache, table = conv.cache, pipe.embeddings
    steps = min(a.decode_steps, cache.room() - 1)
    start = cache.length
    token = int(result.token_ids[-1]) if result.token_ids else int(result.prompt_ids[-1])
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, _ = pipe.llm_step(np.asarray(table[[token]], np.float32)[None], cache)
        token = int(np.argmax(logits))
    dt = time.perf_counter() - t0
    rec["decode"] = {"steps": steps, "context_start": start, "seconds": round(dt, 3),
                     "tokens_per_s": round(steps / dt, 3) if steps else None,
                     "mean_context": start + steps / 2}
    from nxc.profile.profiler import decode_step_bytes
    rec["decode_step_bytes"] = int(decode_step_bytes(m, start + steps / 2))
    rec["build_file_bytes"] = sum(f.bytes for f in m.files.values())
    rec["kv_cache_capacity"] = cache.capacity
    memory["after_decode"] = _vm()
    rec["memory_gb"] = memory              # rss: now; hwm: the process's peak so far (where the peak was reached)
    a.out.write_text(json.dumps(rec, indent=2))
    return 0


# -- onnxruntime-genai --------------------------------------------------------------------------------------------
HF_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                  "hidden_act", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "rope_scaling")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "generation_config.json")


def _llama_keys(keys: list[str]) -> list[str]:
    """The checkpoint's LLaMA tensors (already HF names), in file order: embeddings, layers by index, norm, head."""
    layers = [k for k in keys if k.startswith("model.layers.") and not k.endswith("rotary_emb.inv_freq")]
    layers.sort(key=lambda k: (int(k.split(".")[2]), k))
    return ["model.embed_tokens.weight", *layers, "model.norm.weight", "lm_head.weight"]


def _write_safetensors(path: Path, lazy, keys: list[str], shapes: dict) -> None:
    """A float16 safetensors file written one tensor at a time (header first: every size is known up front)."""
    import torch
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k in keys:
        n = 2 * int(np.prod(shapes[k]))
        header[k] = {"dtype": "F16", "shape": list(shapes[k]), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in keys:
            t = lazy.get(k).to(torch.float16).contiguous()
            f.write(memoryview(t.numpy()).cast("B"))
            del t


def child_hf_view(argv: list[str]) -> int:
    """In its own process: WORK/ckpt's LLaMA as a Hugging Face LlamaForCausalLM folder (fp16 safetensors shards)."""
    ckpt, out, shard_bytes = Path(argv[0]), Path(argv[1]), float(argv[2])
    from nxc.model.lazy import LazyCheckpoint
    cfg = json.loads((ckpt / "config.json").read_text())
    lazy = LazyCheckpoint(ckpt)
    keys = _llama_keys(lazy.keys())
    missing = [k for k in keys if k not in lazy]
    if missing:
        print(f"true_size: {ckpt} has no {missing[0]} (and {len(missing) - 1} more LLaMA tensors)", file=sys.stderr)
        return 1
    shapes = {k: lazy.shape(k) for k in keys}
    shards, cur, size = [], [], 0
    for k in keys:
        n = 2 * int(np.prod(shapes[k]))
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    shards.append(cur)
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, ks in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / name, lazy, ks, shapes)
        weight_map.update({k: name for k in ks})
        print(f"[true-size] hf view: {name}, {len(ks)} tensors", file=sys.stderr, flush=True)
        lazy.close()                                   # drop the mapped pages read so far (RSS), reopen
        lazy = LazyCheckpoint(ckpt)
    total = sum(2 * int(np.prod(s)) for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float16",
          "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "use_cache": True,
          **{k: cfg[k] for k in HF_CONFIG_KEYS if k in cfg}}
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    for f in TOKENIZER_FILES:
        if (ckpt / f).is_file():
            shutil.copy(ckpt / f, out / f)
    return 0


def child_genai_decode(argv: list[str]) -> int:
    """In its own process: onnxruntime-genai greedy decode of `steps` tokens after a `context`-token prompt."""
    path, out, context, steps = Path(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3])
    import onnxruntime_genai as og
    t0 = time.perf_counter()
    model = og.Model(str(path))
    load_s = time.perf_counter() - t0
    cfg = json.loads((path / "genai_config.json").read_text())["model"]
    vocab, longest = cfg["vocab_size"], cfg.get("context_length", context + steps + 2)
    if context + steps + 2 > longest:
        context = max(1, longest - steps - 2)
        print(f"[true-size] genai: prompt shortened to {context} tokens (context_length {longest})", file=sys.stderr)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=context + steps + 2, do_sample=False)
    gen = og.Generator(model, params)
    ids = np.random.default_rng(0).integers(3, min(vocab, 32000), context).astype(np.int32).reshape(1, -1)
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    gen.generate_next_token()
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        gen.generate_next_token()
    dt = time.perf_counter() - t0
    out.write_text(json.dumps({"load_s": round(load_s, 2), "context": context, "steps": steps,
                               "prefill_ms": round(1000 * prefill_s, 1), "seconds": round(dt, 3),
                               "tokens_per_s": round(steps / dt, 3), "onnxruntime_genai": og.__version__}))
    return 0


def step_genai(a, work: Path, results: dict) -> dict:
    ckpt, hf, dst = work / "ckpt", work / "hf", work / "genai-int4"
    rec: dict = {"ok": False}
    if importlib.util.find_spec("onnxruntime_genai") is None:
        rec["skipped"] = f"onnxruntime-genai is not installed: {Path(sys.executable).parent / 'pip'} install " \
                         "onnxruntime-genai"
        return rec
    if not (ckpt / "config.json").is_file():
        rec["skipped"] = f"no checkpoint in {ckpt}: run the make step first"
        return rec
    reuse = a.reuse_hf and (hf / "model.safetensors.index.json").is_file()
    for d in ((dst, work / "genai-cache") if reuse else (hf, dst, work / "genai-cache")):
        shutil.rmtree(d, ignore_errors=True)
    if reuse:
        rec["hf_view"] = {"ok": True, "reused": str(hf)}
    else:
        rec["hf_view"] = measured([sys.executable, __file__, "_hf_view", str(ckpt), str(hf), str(a.hf_shard_bytes)],
                                  work, "genai-hf-view")
    if not rec["hf_view"]["ok"]:
        return rec
    rec["hf_view"]["gb_on_disk"] = gb(dir_bytes(hf))
    rec["builder"] = measured([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(dst),
                               "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache")], work, "genai-builder")
    shutil.rmtree(work / "genai-cache", ignore_errors=True)
    if not a.keep:
        shutil.rmtree(hf, ignore_errors=True)
    if not rec["builder"]["ok"] or not (dst / "genai_config.json").is_file():
        rec["builder"]["ok"] = False
        return rec
    rec["builder"]["gb_on_disk"] = gb(dir_bytes(dst))
    nxc = results.get("run", {}).get("int4", {}).get("decode") or {}
    context = int(nxc.get("context_start") or a.genai_context)
    steps = int(nxc.get("steps") or a.decode_steps)
    out = work / "logs" / "genai-decode.result.json"
    out.unlink(missing_ok=True)
    rec["decode"] = measured([sys.executable, __file__, "_genai_decode", str(dst), str(out), str(context),
                              str(steps)], work, "genai-decode")
    if out.is_file():
        rec["decode"].update(json.loads(out.read_text()))
        rec["ok"] = rec["decode"]["ok"]
    return rec


def step_llama(a, work: Path, results: dict) -> dict:
    """llama.cpp Q4_0 / Q8_0 of the checkpoint's LLaMA against the nxc int4 / int8 runs (decode at their context,
    prefill of their prompt's length), at os.cpu_count() threads as the runs."""
    sys.path.insert(0, str(Path(__file__).parent))
    import llama_cpp_bench as lc
    ckpt, hf = work / "ckpt", work / "hf"
    rec: dict = {"ok": False}
    if not (ckpt / "config.json").is_file():
        rec["skipped"] = f"no checkpoint in {ckpt}: run the make step first"
        return rec
    try:
        root = lc.tree(log=lambda m: log(f"llama.cpp: {m}"))
    except lc.Unavailable as e:
        rec["skipped"] = str(e)
        return rec
    rec["tree"] = str(root)
    if not (hf / "model.safetensors.index.json").is_file():
        shutil.rmtree(hf, ignore_errors=True)
        rec["hf_view"] = measured([sys.executable, __file__, "_hf_view", str(ckpt), str(hf), str(a.hf_shard_bytes)],
                                  work, "llama-hf-view")
        if not rec["hf_view"]["ok"]:
            return rec
    gguf = work / "gguf"
    rec["ok"] = True
    for precision, kind in lc.QUANTS.items():
        run = results.get("run", {}).get(precision) or {}
        decode = run.get("decode") or {}
        context = int(decode.get("context_start") or a.genai_context)
        prompt = int(run.get("prompt_tokens") or a.genai_context)
        try:
            t0 = time.perf_counter()
            q = lc.gguf(root, hf, gguf, precision, log=lambda m: log(f"llama.cpp: {m}"))
            made = time.perf_counter() - t0
            r = lc.bench(root, q, threads=os.cpu_count(), depth=context, n_gen=int(decode.get("steps") or
                                                                                  a.decode_steps),
                         n_prompt=prompt, log=lambda m: log(f"llama.cpp: {m}"))
        except lc.Unavailable as e:
            rec[kind], rec["ok"] = {"ok": False, "error": str(e)}, False
            continue
        rec[kind] = {"ok": True, "convert_and_quantize_seconds": round(made, 1), **r}
        nxc_dec, nxc_pre = decode.get("tokens_per_s"), run.get("prefill_tokens_per_s")
        if nxc_dec:
            rec[kind][f"nxc_{precision}_decode_vs"] = round(nxc_dec / r["decode_tokens_per_s"], 3)
        if nxc_pre:
            rec[kind][f"nxc_{precision}_prefill_vs"] = round(nxc_pre / r["prefill_tokens_per_s"], 3)
    (gguf / "model-f16.gguf").unlink(missing_ok=True)                  # 13.5 GB at 7B; the quantized files stay
    if not a.keep:
        shutil.rmtree(hf, ignore_errors=True)
        shutil.rmtree(gguf, ignore_errors=True)
    return rec


# -- the run ------------------------------------------------------------------------------------------------------
def machine(work: Path) -> dict:
    mem = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, v = line.split(":", 1)
            mem[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    import onnxruntime
    from nxc import __version__
    return {"date": subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
            or datetime.datetime.now().isoformat(),
            "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "ram_gb": gb(mem.get("MemTotal", 0)), "ram_available_gb": gb(mem.get("MemAvailable", 0)),
            "disk_free_gb": gb(shutil.disk_usage(work).free), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "nxc": __version__}


def roofline(results: dict) -> dict:
    from nxc.profile.profiler import measure_bandwidth
    bw = measure_bandwidth()
    out = {"bandwidth_gbs": round(bw, 2)}
    for p, r in results.get("run", {}).items():
        tps = (r.get("decode") or {}).get("tokens_per_s")
        if tps and r.get("decode_step_bytes"):
            out[p] = {"decode_step_bytes": r["decode_step_bytes"], "tokens_per_s": tps,
                      "achieved_gbs": round(tps * r["decode_step_bytes"] / GB, 2),
                      "pct_of_roofline": round(100 * tps * r["decode_step_bytes"] / GB / bw, 1)}
    return out


def save(work: Path, results: dict) -> None:
    tmp = work / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(work / "results.json")


def parse_args(argv):
    intro, _, rest = __doc__.partition("\n\n")
    ap = argparse.ArgumentParser(description=intro, epilog=rest,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("true-size-work"), help="working directory (true-size-work)")
    ap.add_argument("--family", choices=FAMILY_STEPS, default="nextchat",
                    help="nextchat (default) or nextgpt (NExT-GPT-7B's layout: make and export)")
    ap.add_argument("--steps", help=f"comma-separated, of {','.join(STEPS)} (all the family's)")
    ap.add_argument("--keep", action="store_true", help="keep WORK (checkpoint, builds, genai build) at the end")
    ap.add_argument("--llm", default="vicuna-7b", help="nxc-make-checkpoint --llm (vicuna-7b; tiny: a dry run)")
    ap.add_argument("--vision", help="nxc-make-checkpoint --vision (clip-vit-l-336; nextgpt: imagebind-huge)")
    ap.add_argument("--sam", default="vit_h", help="nxc-make-checkpoint --sam (vit_h)")
    ap.add_argument("--projector", default="nextgpt", help="nextgpt: nxc-make-checkpoint --projector (nextgpt)")
    ap.add_argument("--generator", default="sd-1.5", help="nextgpt: nxc-make-checkpoint --generator (sd-1.5)")
    ap.add_argument("--dtype", default="fp16", help="checkpoint weight dtype (fp16)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="exported builds (fp16,int8,int4)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help="the trigger prompt asked of the builds")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--decode-steps", type=int, default=24, help="greedy steps timed after the reply (24)")
    ap.add_argument("--calib-images", type=int, default=4, help="generated calibration photos (4)")
    ap.add_argument("--image-size", default="1280x960", help="generated photos, WxH (1280x960)")
    ap.add_argument("--max-context", type=int, default=None, help="nxc-export --max-context (its default)")
    ap.add_argument("--hf-shard-bytes", type=float, default=2e9, help="shard size of the HF view (2e9)")
    ap.add_argument("--low-memory", action="store_true",
                    help="run: Pipeline.load(low_memory=True), vision and SAM encoder sessions unloaded after use")
    ap.add_argument("--reuse-hf", action="store_true",
                    help="genai: keep WORK/hf if a finished one is there (made by `_hf_view CKPT WORK/hf BYTES`)")
    ap.add_argument("--genai-context", type=int, default=600,
                    help="genai prompt length when no nxc int4 decode result is there (600)")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    a = ap.parse_args(argv)
    a.vision = a.vision or ("clip-vit-l-336" if a.family == "nextchat" else "imagebind-huge")
    a.steps = [s.strip() for s in (a.steps or ",".join(FAMILY_STEPS[a.family])).split(",") if s.strip()]
    a.precisions = [p.strip() for p in a.precisions.split(",") if p.strip()]
    bad = [s for s in a.steps if s not in STEPS] + [p for p in a.precisions if p not in PRECISIONS]
    if bad:
        ap.error(f"unknown step or precision {bad[0]!r}; steps are {STEPS}, precisions {PRECISIONS}")
    if not set(a.steps) <= set(FAMILY_STEPS[a.family]):
        ap.error(f"--family {a.family} has the steps {','.join(FAMILY_STEPS[a.family])}")
    w, _, h = a.image_size.partition("x")
    a.image_size = (int(w), int(h))
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads((work / "results.json").read_text()) if (work / "results.json").is_file() else {}
    results["sizes"] = {"family": a.family, "llm": a.llm, "vision": a.vision, "dtype": a.dtype,
                        **({"sam": a.sam} if a.family == "nextchat" else
                           {"projector": a.projector, "generator": a.generator})}
    results["prompt"] = a.prompt
    results["machine"] = machine(work)
    log(f"work {work}, steps {a.steps}, {results['machine']['disk_free_gb']} GB free")
    if "make" in a.steps:
        results["make"] = step_make(a, work)
        save(work, results)
    if "export" in a.steps:
        for p in a.precisions:
            results.setdefault("export", {})[p] = step_export(a, work, p)
            save(work, results)
            if p not in RUN_PRECISIONS and not a.keep:
                shutil.rmtree(work / f"build-{p}", ignore_errors=True)          # measured; not run (disk)
    if "run" in a.steps:
        for p in RUN_PRECISIONS:
            if p in a.precisions:
                results.setdefault("run", {})[p] = step_run(a, work, p)
                save(work, results)
        results["roofline"] = roofline(results)
        save(work, results)
    if "genai" in a.steps:
        results["genai"] = step_genai(a, work, results)
        save(work, results)
    if "llama" in a.steps:
        results["llama"] = step_llama(a, work, results)
        save(work, results)
    nxc_tps = (results.get("run", {}).get("int4", {}).get("decode") or {}).get("tokens_per_s")
    genai_tps = (results.get("genai", {}).get("decode") or {}).get("tokens_per_s")
    if nxc_tps and genai_tps:
        results["nxc_int4_vs_genai_int4_decode"] = round(nxc_tps / genai_tps, 3)
    failed = [s for s in ("make", "genai", "llama") if s in a.steps and not results[s].get("ok")
              and not results[s].get("skipped")] + \
             [f"{s}.{p}" for s in ("export", "run") if s in a.steps for p, r in results.get(s, {}).items()
              if p in a.precisions and not r.get("ok")]
    results["failed"] = failed
    save(work, results)
    if a.keep or failed:
        log(f"kept {work}" + (f" ({', '.join(failed)} failed: rerun with --work {work} --steps ...)" if failed else ""))
    else:
        shutil.rmtree(work, ignore_errors=True)
        log(f"removed {work}")
    text = json.dumps(results, indent=2)
    if a.json:
        a.json.write_text(text + "\n")
    print(text)
    return 1 if failed else 0


CHILDREN = {"_run": child_run, "_hf_view": child_hf_view, "_genai_decode": child_genai_decode}

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in CHILDREN:
        sys.exit(CHILDREN[sys.argv[1]](sys.argv[2:]))
    sys.exit(main())
