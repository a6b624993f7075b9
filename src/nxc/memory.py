"""Memory of a process that handles graphs at true size (CLIP ViT-L/336 1.2 GB, SAM ViT-H 2.5 GB): the export's
tracing, parity checks and int8 calibration (nxc.export, nxc.calib). Torch-free: ctypes only.

glibc serves an allocation from the heap unless it exceeds the mmap threshold, which it raises to the largest block
freed so far (up to 32 MB). Tracing SAM ViT-H (torch.onnx.export) frees thousands of 12-84 MB activations between
the small objects the tracer keeps, so their heap pages cannot be returned: the trace ends 3.6 GB above where it
began (a plain forward, 0.4 GB). A fixed threshold keeps large blocks in mappings of their own, returned to the OS
when freed (measured: the export of SAM ViT-H peaks at 6.5 GB RSS instead of 8.6; CLIP ViT-L's int8 calibration
leaves 0.1 GB behind instead of 1.2 GB).
"""
from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3              # glibc's mallopt parameter
LARGE = 4 << 20                    # blocks from this size up get their own mapping


def mmap_large_allocations(threshold: int = LARGE) -> bool:
    """Ask glibc to serve every allocation of `threshold` bytes or more from its own mapping (and to stop adjusting
    the threshold). Process-wide and idempotent; False where the C library has no mallopt (not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
