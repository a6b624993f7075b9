"""What this machine is and has, for nxc-doctor: platform, the runtime's packages, ONNX Runtime providers, TensorRT
and cuda-python, the GPU, the Jetson release (L4T / JetPack) and memory.

Every probe reads files under `root` ("/" on a real machine, a folder of fakes in the tests) or asks an installed
package; none raises: what cannot be found is None with the reason beside it. Nothing here imports torch, and
TensorRT / cuda-python are imported only to read their versions and the GPU.
"""
from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

# the runtime's own packages, then the optional GPU ones (distribution names, as pip knows them)
RUNTIME_PACKAGES = ("nxc", "numpy", "onnxruntime", "onnxruntime-gpu", "tokenizers", "Pillow")
GPU_PACKAGES = ("tensorrt", "cuda-python", "cuda-bindings")

# `# R36 (release), REVISION: 4.3, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ...`: the first line of
# /etc/nv_tegra_release on every Jetson
L4T_LINE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)")
# Exact L4T releases -> JetPack (NVIDIA's JetPack archive, as jetson-stats tabulates it); others are named by major
JETPACK_FOR_L4T = {
    "36.4.4": "6.2.1", "36.4.3": "6.2", "36.4.0": "6.1", "36.3.0": "6.0", "36.2.0": "6.0 DP",
    "35.6.1": "5.1.5", "35.6.0": "5.1.4", "35.5.0": "5.1.3", "35.4.1": "5.1.2", "35.3.1": "5.1.1", "35.2.1": "5.1",
    "35.1.0": "5.0.2",
}
JETPACK_MAJOR = {"32": "4.x", "34": "5.0 DP", "35": "5.x", "36": "6.x", "38": "7.x"}
# the Jetson module in /proc/device-tree/model -> its GPU's compute capability (CUDA's table for Tegra)
JETSON_COMPUTE = (("Thor", "11.0"), ("Orin", "8.7"), ("Xavier", "7.2"), ("TX2", "6.2"), ("Nano", "5.3"),
                  ("TX1", "5.3"))


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return None


def package_versions(names=RUNTIME_PACKAGES + GPU_PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions by pip name; None where not installed."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def platform_facts(root: Path) -> dict:
    os_release = dict(re.findall(r'^(\w+)="?([^"\n]*)"?$', _read(root / "etc/os-release") or "", re.M))
    return {"system": platform.system(), "machine": platform.machine(),
            "os": os_release.get("PRETTY_NAME"), "glibc": platform.libc_ver()[1] or None,
            "python": platform.python_version(), "implementation": platform.python_implementation(),
            "cpus": os.cpu_count()}


def jetson_facts(root: Path) -> dict | None:
    """{"l4t", "jetpack", "model", "compute_capability"} from /etc/nv_tegra_release and the device tree; None off a
    Jetson."""
    release = _read(root / "etc/nv_tegra_release")
    model = _read(root / "proc/device-tree/model")
    if release is None:
        return None
    m = L4T_LINE.search(release)
    if m is None:
        return {"l4t": None, "jetpack": None, "model": model, "compute_capability": None,
                "problem": f"{root / 'etc/nv_tegra_release'}: first line not understood: {release.splitlines()[0][:80]!r}"}
    major, revision = m.groups()
    l4t = f"{major}.{revision}" + (".0" if revision.count(".") == 0 else "")
    jetpack = JETPACK_FOR_L4T.get(l4t) or (f"{JETPACK_MAJOR[major]} (L4T {l4t} is newer than this nxc's table)"
                                           if major in JETPACK_MAJOR else None)
    compute = next((cc for key, cc in JETSON_COMPUTE if model and key.lower() in model.lower()), None)
    return {"l4t": l4t, "jetpack": jetpack, "model": model, "compute_capability": compute}


def memory_facts(root: Path) -> dict:
    """Total and available memory in GB (/proc/meminfo); on a Jetson the GPU shares it."""
    info = dict(re.findall(r"^(\w+):\s+(\d+) kB", _read(root / "proc/meminfo") or "", re.M))
    gb = lambda key: round(int(info[key]) * 1024 / 1e9, 2) if key in info else None   # noqa: E731
    return {"total_gb": gb("MemTotal"), "available_gb": gb("MemAvailable")}


def onnxruntime_facts() -> dict:
    try:
        ort = importlib.import_module("onnxruntime")
    except Exception as e:                                   # ImportError, or a wheel for another CPU
        return {"version": None, "providers": [], "problem": f"onnxruntime does not import: {e}"}
    return {"version": ort.__version__, "providers": list(ort.get_available_providers()), "problem": None}


def tensorrt_facts(root: Path) -> dict:
    """TensorRT's Python bindings: version, or why not. JetPack installs them for the system Python
    (/usr/lib/python3*/dist-packages), which a venv sees only when made with --system-site-packages."""
    try:
        trt = importlib.import_module("tensorrt")
        return {"version": trt.__version__, "problem": None}
    except ImportError:
        pass
    except Exception as e:                                   # the bindings are there but their libraries are not
        return {"version": None, "problem": f"tensorrt does not load: {' '.join(str(e).split())[:200]}"}
    system = sorted((root / "usr/lib").glob("python3*/dist-packages/tensorrt"))
    if system and sys.prefix != sys.base_prefix:
        return {"version": None, "problem": f"TensorRT is installed for the system Python ({system[0]}) but this "
                "virtual environment does not see it: recreate it with `python3 -m venv --system-site-packages`"}
    return {"version": None, "problem": "not installed; on a Jetson JetPack's python3-libnvinfer brings it, "
                                        "elsewhere pip install 'nxc[trt]'"}


def gpu_facts(jetson: dict | None) -> dict | None:
    """{"name", "compute_capability", "source"} of GPU 0: from CUDA (cuda-python), else nvidia-smi, else the
    Jetson board; None when there is no sign of one."""
    try:
        from nxc.runtime.backends import BackendError
        from nxc.runtime.backends.trt import gpu_identity
        try:
            return {**gpu_identity(), "source": "the CUDA runtime via cuda-python"}
        except BackendError:
            pass
    except Exception:                                        # cuda-python present but its driver library is not
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20)
            first = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
            if "," in first:
                name, cc = (v.strip() for v in first.rsplit(",", 1))
                return {"name": name, "compute_capability": cc, "source": "nvidia-smi"}
        except (OSError, subprocess.SubprocessError):
            pass
    if jetson and jetson.get("compute_capability"):
        return {"name": jetson["model"], "compute_capability": jetson["compute_capability"],
                "source": "the Jetson board model"}
    return None


def machine_facts(root: Path | str = "/") -> dict:
    """Everything nxc-doctor reports about this machine, as plain JSON-able data."""
    root = Path(root)
    jetson = jetson_facts(root)
    return {"platform": platform_facts(root), "packages": package_versions(), "onnxruntime": onnxruntime_facts(),
            "tensorrt": tensorrt_facts(root), "gpu": gpu_facts(jetson), "jetson": jetson,
            "memory": memory_facts(root)}
