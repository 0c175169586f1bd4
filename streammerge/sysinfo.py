"""Facts about this process and machine: peak resident memory, physical memory, fd limit."""

from __future__ import annotations

import os


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), in KiB; None where there is none."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(field.encode() + b":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_bytes() -> int:
    """This process's own peak resident memory in bytes.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this process's own address
    space. Not ``getrusage`` ``ru_maxrss``: Linux carries that over from the parent across
    fork and exec, so a merge started by a 9 GB process would report 9 GB. Elsewhere: the
    peak working set (Windows) or ``ru_maxrss`` (macOS, bytes there), else the current RSS.
    """
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import psutil

    info = psutil.Process().memory_info()
    peak = getattr(info, "peak_wset", None)
    if peak is not None:
        return int(peak)
    try:
        import resource
        import sys

        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(ru if sys.platform == "darwin" else ru * 1024)
    except ImportError:
        return int(info.rss)


def total_memory_bytes() -> int:
    """Physical memory of this machine (bytes), or of the cgroup when it is smaller."""
    import psutil

    total = int(psutil.virtual_memory().total)
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def available_memory_bytes() -> int:
    """Memory this process could still use without swapping (bytes): ``MemAvailable``
    (free plus reclaimable page cache, psutil), or what the cgroup's ``memory.max`` leaves
    above its ``memory.current`` when that is less."""
    import psutil

    avail = int(psutil.virtual_memory().available)
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
    except (OSError, ValueError):
        return avail
    return min(avail, max(0, int(limit) - used)) if limit.isdigit() else avail


def open_file_limit() -> int:
    """The soft limit on open file descriptors (``ulimit -n``); a large number if unknown."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 1 << 20
    return soft if soft != resource.RLIM_INFINITY and soft > 0 else 1 << 20


def open_fd_count() -> int:
    """Descriptors this process has open now (Linux /proc/self/fd; 0 if unknown)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0
