"""One picture through nxc's generator against diffusers' PyTorch loop on the same weights, latents, scheduler and
guidance (issue 28, item 7): seconds per denoise step, the whole picture, peak RSS, and how far the pictures differ.

    .venv/bin/python benchmarks/generate_vs.py --work /data/gv --keep               # SD-1.5's sizes, 512x512, 20 steps
    .venv/bin/python benchmarks/generate_vs.py --size tiny --steps 4 --threads 1    # a dry run (seconds)
    .venv/bin/python benchmarks/generate_vs.py --gligen --work /data/gl --keep      # GLIGEN (issue 29), 512x512
    .venv/bin/python benchmarks/generate_vs.py --gligen --edit --work /data/gl      # GLIGEN editing (same folder)

--gligen (issue 29): GLIGEN's layout instead (SD-1.4's UNet with attention_type "gated", 1.07 B parameters, and a
random CLIP-L-sized text encoder for the phrases); both sides draw "a red circle" and "a blue square" in two boxes,
the fusers on for the first 30% of the steps (the torch side is StableDiffusionGLIGENPipeline's loop written out);
the JSON adds the grounded and the plain steps' medians and speedups. --edit (with --gligen): an edit instead,
GLIGEN's grounded inpainting of "a red circle" into the first box of a fixed 512x512 picture (`source_picture`):
the picture through the VAE encoder (the posterior drawn from default_rng(seed + 2), as the runtime draws it), its
noised latents put back outside the box at the top of every step (the pipeline's blend; the torch side draws the
same noise); a WORK whose build was exported by an earlier run of the same folder reuses it.

Sizes (--size): sd-1.5, a random-weight SD-1.5-layout diffusers folder (nxc.model.generator.make_sd15_generator, as
nxc-make-checkpoint --generator sd-1.5 makes it: UNet2DConditionModel's default config with SD-1.5's
cross_attention_dim 768 and sample_size 64: 860 M parameters, 3.4 GB fp32; AutoencoderKL with SD's config; SD-1.5's
DDIM scheduler config; a random uncond.npy [1,77,768], no text encoder), its weights written one module at a time
(peak: the largest module); tiny, make_tiny_generator's (a 16x16 picture).
Sides, in this order, each in its own process under true_size.py's peak-RSS wrapper (WORK/logs/<side>.log):
  make     the diffusers folder WORK/generator (kept and reused when complete)
  export   nxc.export.generator.export_generator -> WORK/build (--precision), its parity check on (timed apart)
  nxc      one picture through nxc.runtime.generator.Generator, the build's graphs in ONNX Runtime (torch-free)
  torch    StableDiffusionPipeline's loop written out: diffusers' UNet2DConditionModel + AutoencoderKL in fp32,
           diffusers' DDIMScheduler from the folder's config, torch.no_grad, the same threads
  optimum  optimum's ONNX Runtime pipeline: skipped with the reason when it cannot run here
Both sides start from nxc.diffusion.initial_latents(seed) and condition on WORK/conditioning.npy (a fixed random
[1,L,D]); a denoise step is one UNet / denoiser call on [uncond, cond]. Pictures are compared before the uint8 step
(pixels in [0, 1]). JSON on stdout (and --json FILE); progress on stderr. WORK is deleted at the end unless --keep
or a side failed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# SD-1.5's sizes and the one-module-at-a-time writer live in nxc.model.generator (nxc-make-checkpoint --generator
# sd-1.5 makes the same folder; torch-free at import); the names stay importable from here
from nxc.model.generator import SD15_UNET, SD15_VAE  # noqa: F401

SIZES = ("sd-1.5", "tiny")
PRECISIONS = ("fp32", "fp16")
SIDES = ("make", "export", "nxc", "torch")
RSS_HEADROOM_GB = 1.5           # issue 28: a picture's peak RSS <= the generator's files + 1.5 GB
STEP_SPEEDUP_TARGET = 1.2       # issue 28: denoise step >= 1.2x diffusers' PyTorch fp32
PICTURE_TOLERANCE = 1e-3        # issue 28: the runtime's picture equals the torch reference's within 1e-3 (fp32)
GB = 1e9
GLIGEN_PHRASES = ["a red circle", "a blue square"]             # --gligen: what is grounded where (xyxy in [0, 1])
GLIGEN_BOXES = [[0.1, 0.1, 0.5, 0.6], [0.5, 0.25, 0.875, 0.875]]
GLIGEN_BETA = 0.3                                              # the pipeline's gligen_scheduled_sampling_beta


def grounding_of(a) -> tuple[list[str], list[list[float]]]:
    """--gligen's phrases and boxes: both objects, or the first one for --edit."""
    return (GLIGEN_PHRASES[:1], GLIGEN_BOXES[:1]) if a.edit else (GLIGEN_PHRASES, GLIGEN_BOXES)


def source_picture(height: int, width: int) -> np.ndarray:
    """--edit's picture, [H,W,3] uint8: a fixed smooth colour field with a dark band (no randomness)."""
    y, x = np.mgrid[0:height, 0:width] / np.float32(max(height, width))
    rgb = np.stack([0.5 + 0.4 * np.sin(6 * x), 0.5 + 0.4 * np.cos(5 * y), 0.6 - 0.3 * x * y], axis=-1)
    rgb[(y > 0.7) & (y < 0.8)] *= 0.3
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)

def log(msg: str) -> None:
    print(f"[generate-vs] {msg}", file=sys.stderr, flush=True)


def _true_size():
    """benchmarks/true_size.py's machinery: measured (the peak-RSS wrapper), dir_bytes, machine, gb."""
    spec = importlib.util.spec_from_file_location("true_size", Path(__file__).with_name("true_size.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _result(a, side: str) -> Path:
    return a.work / "results" / f"{side}.json"


# -- make: the diffusers folder -----------------------------------------------------------------------------------
def _write_streamed(model, folder: Path) -> None:
    """nxc.model.generator.write_streamed, float32 (peak memory: the largest module, not the model)."""
    from nxc.model.generator import write_streamed
    write_streamed(model, folder)


def make_sd15(folder: Path, seed: int, gligen: bool = False) -> None:
    """A random-weight SD-1.5-layout diffusers folder (no text encoder: uncond.npy [1,77,768]), or GLIGEN's
    (gated SD-1.4 UNet + a random CLIP-L-sized text encoder): nxc.model.generator.make_sd15_generator."""
    from nxc.model.generator import make_sd15_generator
    make_sd15_generator(folder, seed=seed, gligen=gligen, log=lambda m: log(f"make: {m}"))


def side_make(a) -> dict:
    folder = a.work / "generator"
    if a.size == "tiny":
        from nxc.model.generator import make_tiny_generator
        make_tiny_generator(folder, seed=a.seed, text_encoder=a.gligen, gated=a.gligen)
    else:
        make_sd15(folder, a.seed, a.gligen)
    (folder / ".complete").write_text("made by benchmarks/generate_vs.py\n")
    return {}


# -- export: nxc's graphs ------------------------------------------------------------------------------------------
def side_export(a) -> dict:
    """export_generator into WORK/build; the parity check's seconds from the times of its log lines."""
    from nxc.export.generator import export_generator
    build = a.work / "build"
    shutil.rmtree(build, ignore_errors=True)
    events = []

    def stamped(msg):
        events.append((time.perf_counter(), msg))
        print(msg, file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    gen = export_generator(a.work / "generator", build, precision=a.precision, default_steps=a.steps,
                           default_guidance=a.guidance, log=stamped)
    end = time.perf_counter()
    parity = {}
    for i, (t, msg) in enumerate(events):
        if "checking against torch" in msg:
            graph = msg.split("]", 1)[1].split(":", 1)[0].strip()
            spent = (events[i + 1][0] if i + 1 < len(events) else end) - t
            parity[graph] = round(parity.get(graph, 0.0) + spent, 2)         # fp16: fp32 decoder check too
    (build / "export.json").write_text(json.dumps({"entry": gen.entry, "graphs": gen.graphs,
                                                   "precision": a.precision}))
    files = {g: sum((build / f).stat().st_size for f in [r["file"], *r["external_data"]])
             for g, r in gen.graphs.items()}
    return {"export_seconds": round(end - t0, 2), "parity_seconds": parity,
            "parity_ok": {g: r["ok"] for g, r in gen.parity.items()},
            "graphs": {g: {"precision": r["precision"], "gb": round(files[g] / GB, 3),
                           **({"fp32_reason": r["fp32_reason"]} if "fp32_reason" in r else {})}
                       for g, r in gen.graphs.items()}}


# -- the two pictures ----------------------------------------------------------------------------------------------
def _timings(steps_s: list[float], picture_s: float, load_s: float, pixels: np.ndarray, out: Path,
             gligen: bool = False) -> dict:
    np.save(out, pixels.astype(np.float32))
    grounded = int(GLIGEN_BETA * len(steps_s))        # GLIGEN: the first steps run the fusers (--gligen only)
    split = ({"grounded_step_seconds": statistics.median(steps_s[:grounded]),
              "plain_step_seconds": statistics.median(steps_s[grounded:])} if gligen and grounded else {})
    return {**split, "load_seconds": round(load_s, 3), "denoise_step_seconds": statistics.median(steps_s),
            "denoise_steps": len(steps_s), "denoise_step_seconds_all": [round(s, 4) for s in steps_s],
            "picture_seconds": picture_s, "picture_shape": list(pixels.shape)}


def side_nxc(a) -> dict:
    """One picture through the runtime Generator; the denoiser calls timed by a Timeline (torch-free process)."""
    from nxc.config import GeneratorSizes
    from nxc.manifest_types import GeneratorEntry
    from nxc.runtime.backends import get_backend
    from nxc.runtime.generator import DrawOptions, Generator
    from nxc.runtime.timing import Timeline
    from nxc.specs import generator_specs
    build = a.work / "build"
    exp = json.loads((build / "export.json").read_text())
    e = dict(exp["entry"])
    entry = GeneratorEntry(**{**e, "sizes": GeneratorSizes.from_dict(e["sizes"])})
    specs = generator_specs(entry.sizes)
    graphs = (entry.denoiser, entry.decoder)
    tokenizer = None
    if a.gligen:
        from nxc.clip_tokenizer import ClipTokenizer
        from nxc.specs import text_encoder_spec
        specs[entry.text_encoder] = text_encoder_spec(entry.sizes)
        graphs += (entry.text_encoder,)
        tokenizer = ClipTokenizer.from_folder(build / entry.tokenizer)
    t0 = time.perf_counter()
    backend = get_backend("onnxruntime", threads=a.threads)
    runners = {g: backend.load(build / exp["graphs"][g]["file"], specs[g]) for g in graphs}
    load_s = time.perf_counter() - t0
    decoded = {}

    def run(graph, **feeds):
        out = runners[graph].run(feeds)
        if graph == entry.decoder:
            decoded["pixels"] = out["pixels"][0]               # [3,H,W] in [0, 1], before Generator's uint8 step
        return out
    gen = Generator(entry=entry, uncond=np.load(build / entry.uncond_file), run=run, tokenizer=tokenizer)
    tl = Timeline()
    extra = {"grounding": grounding_of(a)} if a.gligen else {}
    if a.edit:
        s = entry.sizes
        extra["source"] = source_picture(s.image_height, s.image_width)
        graphs += (entry.encoder,)
        runners[entry.encoder] = backend.load(build / exp["graphs"][entry.encoder]["file"], specs[entry.encoder])
    t0 = time.perf_counter()
    picture, used = gen.draw(np.load(a.work / "conditioning.npy"),
                             DrawOptions(steps=a.steps, guidance=a.guidance, seed=a.seed, scheduler="ddim"),
                             timeline=tl, **extra)
    picture_s = time.perf_counter() - t0
    steps_s = [ev.seconds for ev in tl.events if ev.stage == entry.denoiser]
    files = [build / f for g in graphs
             for f in [exp["graphs"][g]["file"], *exp["graphs"][g]["external_data"]]] + [build / entry.uncond_file]
    np.save(a.work / "pictures" / "nxc-uint8.npy", picture)
    return {**_timings(steps_s, picture_s, load_s, decoded["pixels"], a.work / "pictures" / "nxc.npy", a.gligen),
            "decode_seconds": sum(ev.seconds for ev in tl.events if ev.stage == entry.decoder),
            "files_gb": round(sum(f.stat().st_size for f in files) / GB, 3), "precision": a.precision,
            "options": vars(used), "torch_imported": "torch" in sys.modules}


def side_torch(a) -> dict:
    """StableDiffusionPipeline.__call__'s loop written out, on the folder's weights (diffusers' loaders)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from nxc.diffusion import initial_latents
    from nxc.model.generator import unconditional_conditioning
    torch.set_num_threads(a.threads)
    folder = a.work / "generator"
    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval()
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    load_s = time.perf_counter() - t0
    uncond = torch.from_numpy(unconditional_conditioning(folder))
    cond = torch.from_numpy(np.load(a.work / "conditioning.npy"))
    gligen, fusers = None, []
    if a.gligen:      # StableDiffusionGLIGENPipeline's phrase embeddings, slots and enable_fuser, written out
        from diffusers.models.attention import GatedSelfAttentionDense
        from transformers import CLIPTextModel, CLIPTokenizer
        tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        text = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32).eval()
        phrases, where = grounding_of(a)
        with torch.no_grad():
            pooled = text(**tok(phrases, padding=True, return_tensors="pt")).pooler_output
        n = len(phrases)
        boxes, emb, masks = torch.zeros(2, 30, 4), torch.zeros(2, 30, pooled.shape[1]), torch.zeros(2, 30)
        boxes[:, :n], emb[:, :n], masks[1, :n] = torch.tensor(where), pooled, 1
        if a.guidance <= 1:
            boxes, emb, masks = boxes[1:], emb[1:], masks[1:]
        gligen = {"boxes": boxes, "positive_embeddings": emb, "masks": masks}
        fusers = [m for m in unet.modules() if type(m) is GatedSelfAttentionDense]
    shape = (1, unet.config.out_channels, *(2 * [unet.config.sample_size] if isinstance(unet.config.sample_size, int)
                                             else unet.config.sample_size))
    cfg = a.guidance > 1                                    # the pipeline's do_classifier_free_guidance
    embeds = torch.cat([uncond, cond]) if cfg else cond
    steps_s = []
    t0 = time.perf_counter()
    with torch.no_grad():
        scheduler.set_timesteps(a.steps)
        latents = torch.from_numpy(initial_latents(shape, a.seed)) * scheduler.init_noise_sigma
        source = keep = None
        if a.edit:     # the pipeline's gligen_inpaint_image: encoded, then blended back outside the box each step
            from nxc.runtime.generator import outside_boxes
            rng = np.random.default_rng(a.seed + 2)             # the runtime's draws: the posterior, then one a step
            f = 2 ** (len(vae.config.block_out_channels) - 1)      # the VAE's scale: 8 for SD's, 2 for tiny's
            px = source_picture(shape[2] * f, shape[3] * f).astype(np.float32) / 255
            dist = vae.encode(torch.from_numpy(px.transpose(2, 0, 1)[None].copy()) * 2 - 1).latent_dist
            source = (dist.mean + dist.std * torch.from_numpy(rng.standard_normal(
                dist.mean.shape, dtype=np.float32))) * vae.config.scaling_factor
            keep = torch.from_numpy(outside_boxes(grounding_of(a)[1], shape[2], shape[3]))[None, None]
        for i, t in enumerate(scheduler.timesteps):
            for m in fusers:
                m.enabled = i < int(GLIGEN_BETA * len(scheduler.timesteps))
            if source is not None:
                noised = scheduler.add_noise(source, torch.from_numpy(rng.standard_normal(
                    tuple(source.shape), dtype=np.float32)), torch.tensor([t]))
                latents = noised * keep + latents * (1 - keep)
            x = torch.cat([latents] * 2) if cfg else latents
            x = scheduler.scale_model_input(x, t)
            s0 = time.perf_counter()
            noise = unet(x, t, encoder_hidden_states=embeds, return_dict=False,
                         cross_attention_kwargs=None if gligen is None else {"gligen": dict(gligen)})[0]
            steps_s.append(time.perf_counter() - s0)
            if cfg:
                noise_u, noise_c = noise.chunk(2)
                noise = noise_u + a.guidance * (noise_c - noise_u)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        d0 = time.perf_counter()
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        pixels = (image / 2 + 0.5).clamp(0, 1)[0].numpy()
    picture_s = time.perf_counter() - t0
    return {**_timings(steps_s, picture_s, load_s, pixels, a.work / "pictures" / "torch.npy", a.gligen),
            "decode_seconds": time.perf_counter() - d0, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "accelerate": importlib.util.find_spec("accelerate") is not None}


def optimum_entry() -> str:
    try:
        from optimum.onnxruntime import ORTStableDiffusionPipeline  # noqa: F401
    except ImportError as e:
        return f"skipped: optimum with onnxruntime is not importable here ({e}; pip install optimum[onnxruntime])"
    return ("skipped: optimum is importable, but its exporter needs a whole StableDiffusionPipeline folder (text "
            "encoder, tokenizer, model_index.json); this benchmark's folder ships uncond.npy instead")


# -- the parent ----------------------------------------------------------------------------------------------------
def run_side(a, ts, side: str) -> dict:
    """`side` in its own process under the peak-RSS wrapper; its figures merged into the wrapper's record."""
    _result(a, side).unlink(missing_ok=True)
    rec = ts.measured([sys.executable, str(Path(__file__).resolve()), *a.argv, "--work", str(a.work), "--side", side],
                      a.work, side)
    if rec["ok"]:
        rec.update(json.loads(_result(a, side).read_text()))
    return rec


def summary(res: dict) -> dict:
    """Pictures' difference and the issue's targets, from the sides' records."""
    nxc, ref = res.get("nxc", {}), res.get("torch", {})
    out = {}
    if nxc.get("ok") and ref.get("ok"):
        work = Path(res["work"]) / "pictures"
        p, q = np.load(work / "nxc.npy").astype(np.float64), np.load(work / "torch.npy").astype(np.float64)
        diff = float(np.abs(p - q).max())
        levels = int(np.abs(np.load(work / "nxc-uint8.npy").astype(int).transpose(2, 0, 1)
                            - (np.clip(q, 0, 1) * 255).round().astype(int)).max())
        out["pictures"] = {"max_abs_diff": diff, "max_abs_diff_uint8_levels": levels, "tolerance": PICTURE_TOLERANCE,
                           "agree": diff <= PICTURE_TOLERANCE}
        speedup = ref["denoise_step_seconds"] / nxc["denoise_step_seconds"]
        budget = nxc["files_gb"] + RSS_HEADROOM_GB
        out["ratios"] = {
            **({f"{k}_step_speedup_vs_torch": round(ref[f"{k}_step_seconds"] / nxc[f"{k}_step_seconds"], 3)
                for k in ("grounded", "plain")} if "grounded_step_seconds" in nxc else {}),
            "denoise_step_speedup_vs_torch": round(speedup, 3), "denoise_step_target": STEP_SPEEDUP_TARGET,
            "denoise_step_target_met": speedup >= STEP_SPEEDUP_TARGET,
            "picture_speedup_vs_torch": round(ref["picture_seconds"] / nxc["picture_seconds"], 3),
            "nxc_peak_rss_gb": nxc["peak_rss_gb"], "torch_peak_rss_gb": ref["peak_rss_gb"],
            "rss_budget_gb": round(budget, 3), "rss_target_met": nxc["peak_rss_gb"] <= budget}
    return out


def parse_args(argv):
    intro, _, rest = __doc__.partition("\n\n")
    ap = argparse.ArgumentParser(description=intro, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="sd-1.5", help="the generator's sizes (sd-1.5)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps (20)")
    ap.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (7.5)")
    ap.add_argument("--seed", type=int, default=0, help="weights, latents and conditioning seed (0)")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32", help="nxc's build (fp32); torch is fp32")
    ap.add_argument("--work", type=Path, default=None, help="working directory (a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep WORK (folder, build, pictures, logs) at the end")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both sides (all cores)")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    ap.add_argument("--gligen", action="store_true", help="GLIGEN (issue 29): a gated UNet (SD-1.4's for sd-1.5) "
                    "with a text encoder; two phrases in two boxes, grounding for the first 30%% of the steps; "
                    "torch runs StableDiffusionGLIGENPipeline's loop")
    ap.add_argument("--edit", action="store_true", help="with --gligen: an edit (grounded inpainting of a fixed "
                    "picture) instead of a new picture")
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)      # internal: run one side in this process
    a = ap.parse_args(argv)
    if a.edit and not a.gligen:
        ap.error("--edit needs --gligen (editing is GLIGEN's grounded inpainting)")
    if a.steps < 1 or a.guidance < 0 or a.threads < 1:
        ap.error(f"--steps {a.steps}, --guidance {a.guidance}, --threads {a.threads}: expected steps >= 1, "
                 "guidance >= 0, threads >= 1")
    a.argv = list(sys.argv[1:] if argv is None else argv)
    return a


def _forwarded(argv: list[str]) -> list[str]:
    """The parent's arguments minus --work / --json / --keep (each side is given WORK explicitly)."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x in ("--work", "--json"):
            skip = True
        elif not (x == "--keep" or x.startswith(("--work=", "--json="))):
            out.append(x)
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.side:
        a.work = a.work.resolve()
        rec = {"make": side_make, "export": side_export, "nxc": side_nxc, "torch": side_torch}[a.side](a)
        _result(a, a.side).write_text(json.dumps(rec))
        return 0
    ts = _true_size()
    a.work = (a.work or Path(tempfile.mkdtemp(prefix="nxc-generate-vs-"))).resolve()
    a.argv = _forwarded(a.argv)
    for d in ("results", "pictures"):
        (a.work / d).mkdir(parents=True, exist_ok=True)
    res = {"machine": ts.machine(a.work), "threads": a.threads, "size": a.size, "gligen": a.gligen, "edit": a.edit,
           "steps": a.steps,
           "guidance": a.guidance, "seed": a.seed, "precision": a.precision, "scheduler": "ddim", "work": str(a.work)}
    folder = a.work / "generator"
    if (folder / ".complete").is_file():
        res["make"] = {"ok": True, "reused": str(folder)}
        log(f"make: reusing {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
        res["make"] = run_side(a, ts, "make")
    if res["make"]["ok"]:
        res["make"]["folder_gb"] = ts.gb(ts.dir_bytes(folder))
        from nxc.model.generator import inspect_generator
        sizes = inspect_generator(folder)[3]
        np.save(a.work / "conditioning.npy", np.random.default_rng(1000 + a.seed).standard_normal(
            (1, sizes.context_length, sizes.cross_attention_dim), dtype=np.float32))
        res["picture"] = [sizes.image_height, sizes.image_width]
        done = a.work / "build" / "export.json"
        same = done.is_file() and json.loads(done.read_text()).get("precision") == a.precision
        if res["make"].get("reused") and same:
            res["export"] = {"ok": True, "reused": str(a.work / "build")}
            log(f"export: reusing {a.work / 'build'}")
        else:
            res["export"] = run_side(a, ts, "export")
        if res["export"]["ok"]:
            res["nxc"] = run_side(a, ts, "nxc")
        res["torch"] = run_side(a, ts, "torch")
    res["optimum"] = optimum_entry()
    res.update(summary(res))
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text)
    failed = [s for s in SIDES if s in res and not res[s].get("ok")]
    if failed or a.keep:
        log(f"work kept in {a.work}" + (f" (failed: {', '.join(failed)})" if failed else ""))
    else:
        shutil.rmtree(a.work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
