"""Facts about this process: its peak resident memory."""

from __future__ import annotations


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes: the kernel's high-water mark
    (``getrusage`` ru_maxrss, KiB on Linux) where there is one, else psutil's current RSS."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except ImportError:  # no resource module (Windows): psutil's peak working set / RSS
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
