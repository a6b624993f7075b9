"""Latency profiler: per-stage timing, the decode bandwidth roofline, side-by-side builds (nxc-profile)."""
