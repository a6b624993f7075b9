"""llama.cpp, the CPU yardstick (issue 30): built from the tree llama-cpp-python's sdist vendors, the same LLaMA
weights converted to GGUF and quantized, and timed by its own llama-bench. Used by decode_vs.py (1.1B) and
true_size.py (7B); every step returns the reason instead of raising where it cannot run here.

    tree()      LLAMA_CPP_DIR, or the sdist (pip download llama-cpp-python==VERSION --no-binary :all:) unpacked
                under HOME, then cmake -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF, targets llama-bench llama-quantize
                (about 9 minutes on 2 cores; kept in HOME and reused)
    gguf()      a Hugging Face LLaMA folder ─ the tree's convert_hf_to_gguf.py (its own gguf-py) ─▶ f16 GGUF
                ─ llama-quantize ─▶ Q4_0 / Q8_0 (the name starts with "./": llama-quantize reads an output name
                that starts with a digit as a type)
    bench()     llama-bench -t T -p 0 -n N -d DEPTH (decode at a context of DEPTH) and -p P -n 0 (prompt
                processing), JSON output: tokens/s

    python benchmarks/llama_cpp_bench.py --build          # build (or find) it and print where
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"                       # llama-cpp-python's sdist (vendors llama.cpp 0c1e570)
HOME = Path(os.environ.get("NXC_LLAMA_CPP_HOME", Path.home() / ".cache" / "nxc" / "llama.cpp"))
TARGETS = ("llama-bench", "llama-quantize")
QUANTS = {"int4": "Q4_0", "int8": "Q8_0"}   # nxc's precision -> the llama.cpp type it is measured against


class Unavailable(Exception):
    """llama.cpp cannot be built or run here: the message says why (a benchmark records it and goes on)."""


def _run(cmd: list, log, **kw) -> subprocess.CompletedProcess:
    log(" ".join(str(c) for c in cmd))
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise Unavailable(f"{Path(str(cmd[0])).name} failed (rc {res.returncode}): {res.stderr.strip()[-600:]}")
    return res


def tree(log=lambda m: None) -> Path:
    """The llama.cpp source tree with build/bin/llama-bench and llama-quantize, built once."""
    given = os.environ.get("LLAMA_CPP_DIR")
    root = Path(given) if given else HOME / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if all((root / "build" / "bin" / t).is_file() for t in TARGETS):
        return root
    if given and not root.is_dir():
        raise Unavailable(f"LLAMA_CPP_DIR={given} is not a directory")
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise Unavailable(f"no {tool} on PATH: llama.cpp cannot be built here")
    if not root.is_dir():
        HOME.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps", "--no-binary",
              ":all:", "-d", HOME], log)
        with tarfile.open(HOME / f"llama_cpp_python-{VERSION}.tar.gz") as tar:
            tar.extractall(HOME, filter="data")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", root, "-B", root / "build", *gen, "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
          "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release"], log)
    _run(["cmake", "--build", root / "build", "-j", str(os.cpu_count() or 1), "--target", *TARGETS], log)
    return root


def gguf(root: Path, hf: Path, out: Path, precision: str, log=lambda m: None) -> Path:
    """The Hugging Face LLaMA folder `hf` as a GGUF of QUANTS[precision] in `out` (the f16 conversion kept and
    reused)."""
    out.mkdir(parents=True, exist_ok=True)
    f16 = out / "model-f16.gguf"
    if not f16.is_file():
        env = {**os.environ, "PYTHONPATH": str(root / "gguf-py")}
        _run([sys.executable, root / "convert_hf_to_gguf.py", hf, "--outfile", f16, "--outtype", "f16"], log, env=env)
    kind = QUANTS[precision]
    q = out / f"model-{kind.lower()}.gguf"
    if not q.is_file():
        _run([root / "build" / "bin" / "llama-quantize", f16, q, kind], log, cwd=out)
    return q


def bench(root: Path, model: Path, *, threads: int, depth: int, n_gen: int, n_prompt: int,
          log=lambda m: None) -> dict:
    """llama-bench on `model`: decode tokens/s at a context of `depth` (n_gen tokens) and prompt processing tokens/s
    of `n_prompt` tokens, each llama-bench's mean of its repetitions."""
    exe = root / "build" / "bin" / "llama-bench"
    dec = json.loads(_run([exe, "-m", model, "-t", threads, "-p", 0, "-n", n_gen, "-d", depth, "-o", "json"],
                          log).stdout)
    pre = json.loads(_run([exe, "-m", model, "-t", threads, "-p", n_prompt, "-n", 0, "-o", "json"], log).stdout)
    return {"decode_tokens_per_s": float(dec[0]["avg_ts"]), "decode_depth": depth,
            "prefill_tokens_per_s": float(pre[0]["avg_ts"]), "prefill_tokens": n_prompt,
            "file_gb": round(model.stat().st_size / 1e9, 3), "type": model.stem.split("-")[-1].upper(),
            "threads": threads}


if __name__ == "__main__":
    if "--build" in sys.argv:
        try:
            print(tree(log=lambda m: print(f"[llama.cpp] {m}", file=sys.stderr, flush=True)))
        except Unavailable as e:
            print(f"llama.cpp unavailable: {e}", file=sys.stderr)
            sys.exit(1)
