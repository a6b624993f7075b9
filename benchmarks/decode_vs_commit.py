"""Decode per token through the runtime, this checkout vs an earlier commit, side by side in one run: prints JSON.

Each side exports the embedded model with its own exporter and decodes with its own runtime, in its own process
(the earlier commit from a git worktree); the parent alternates rounds between them so both see the same machine
load. A round: prefill 64 random token rows, then `--steps` greedy single-token steps; ms per token is the median
over rounds.

    python benchmarks/decode_vs_commit.py [--base 515c25e] [--rounds 9] [--steps 200]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# Runs inside each side's process, with that side's src/ first on sys.path. Speaks one line per round.
DRIVER = r'''
import sys, time, numpy as np
from nxc.export.exporter import ExportOptions, export_build
from nxc.runtime.pipeline import Pipeline
build = export_build(None, sys.argv[1], options=ExportOptions())
pipe = Pipeline.load(build)
table, rng = pipe.embeddings, np.random.default_rng(0)

if hasattr(pipe, "llm_step"):                           # the in-place, address-bound cache
    def session(n):
        cache = pipe.new_cache(n)
        return lambda ids: pipe.llm_step(np.asarray(table[ids], np.float32)[None], cache)[0]
else:                                                   # earlier runtimes: feeds / append
    from nxc.runtime.kv_cache import KVCache
    llm = pipe.config["llm"]
    def session(n):
        cache = KVCache(num_layers=llm["num_layers"], num_kv_heads=llm["num_kv_heads"],
                        head_dim=llm["hidden_size"] // llm["num_heads"], capacity=n, dtype=pipe.kv_dtype)
        def step(ids):
            res = pipe.run("llm", **cache.feeds(np.asarray(table[ids], np.float32)[None]))
            cache.append(res)
            return res["logits"][0]
        return step

def round_ms(steps):
    step = session(64 + steps + 1)
    logits = step(rng.integers(3, table.shape[0], 64))
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = step([int(np.argmax(logits))])
    return 1000 * (time.perf_counter() - t0) / steps

round_ms(50)
print("ready", flush=True)
for line in sys.stdin:
    print(round_ms(int(line)), flush=True)
'''


def start(src: Path, build: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(build)], cwd=src.parent, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit(f"the driver for {src} failed to start (run it by hand to see why)")
    return proc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="515c25e", help="the earlier commit (default: before the in-place binding)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args(argv)
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="nxc-base-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), a.base], check=True,
                       capture_output=True)
        try:
            print(f"[decode-vs-commit] exporting and warming up {a.base} and this checkout", file=sys.stderr)
            sides = {"base": start(tree / "src", Path(tmp) / "base-build"),
                     "current": start(repo / "src", Path(tmp) / "current-build")}
            times = {k: [] for k in sides}
            for r in range(a.rounds):
                for name, proc in sides.items():
                    proc.stdin.write(f"{a.steps}\n")
                    proc.stdin.flush()
                    times[name].append(float(proc.stdout.readline()))
                print(f"[decode-vs-commit] round {r + 1}/{a.rounds}: base {times['base'][-1]:.3f} ms, "
                      f"current {times['current'][-1]:.3f} ms", file=sys.stderr)
            for proc in sides.values():
                proc.stdin.close()
                proc.wait(timeout=60)
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], capture_output=True)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(json.dumps({"model": "embedded", "base": a.base, "steps_per_round": a.steps, "rounds": a.rounds,
                      "ms_per_token": {k: round(v, 4) for k, v in med.items()},
                      "tokens_per_s": {k: round(1000 / v, 1) for k, v in med.items()},
                      "speedup": round(med["base"] / med["current"], 3),
                      "all_rounds_ms": {k: [round(x, 4) for x in v] for k, v in times.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
