"""Soak: 500 chats on the embedded model through the runtime; prints JSON with RSS at start and end and the
latency percentiles per window of 50 chats (goal: RSS growth under 5%).

    python benchmarks/soak.py [--chats 500] [--build build/fp32]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chats", type=int, default=500)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--build", default="build/fp32")
    a = ap.parse_args(argv)
    from nxc.export.exporter import ExportOptions, export_build
    from nxc.manifest import BuildError, load_manifest
    from nxc.runtime.pipeline import Pipeline
    from nxc.shapes.data import TASKS, make_sample, make_scene
    try:
        load_manifest(a.build)
    except BuildError:
        export_build(None, a.build, options=ExportOptions())
    pipe = Pipeline.load(a.build)
    rng = np.random.default_rng(0)

    def one():
        scene = make_scene(rng)
        s = make_sample(rng, TASKS[int(rng.integers(len(TASKS)))], scene)
        t0 = time.perf_counter()
        pipe.chat(s.image, s.question, boxes=s.boxes_in or None, max_new_tokens=48)
        return time.perf_counter() - t0

    for _ in range(20):            # warm-up: sessions, allocator pools
        one()
    start = rss_mb()
    lat, windows = [], []
    for i in range(a.chats):
        lat.append(one())
        if (i + 1) % a.window == 0:
            w = np.array(lat[-a.window:]) * 1000
            windows.append({"chats": i + 1, "p50_ms": float(np.median(w)), "p90_ms": float(np.percentile(w, 90)),
                            "p99_ms": float(np.percentile(w, 99)), "rss_mb": rss_mb()})
            print(f"[soak] {i + 1}/{a.chats} p50 {windows[-1]['p50_ms']:.1f} ms, RSS {windows[-1]['rss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
    end = rss_mb()
    allv = np.array(lat) * 1000
    print(json.dumps({"chats": a.chats, "rss_start_mb": start, "rss_end_mb": end,
                      "rss_growth_pct": 100 * (end - start) / start, "goal_growth_pct": 5.0,
                      "latency_ms": {"p50": float(np.median(allv)), "p90": float(np.percentile(allv, 90)),
                                     "p99": float(np.percentile(allv, 99)), "max": float(allv.max())},
                      "windows": windows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
