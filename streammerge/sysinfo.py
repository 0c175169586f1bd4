"""Facts about this process and machine: peak resident memory, physical memory, fd limit."""

from __future__ import annotations

import os
from pathlib import Path


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


#: (limit, usage, memory.stat field of reclaimable file pages) of cgroup v2, then v1.
_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "inactive_file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "total_inactive_file"),
)  # fmt: skip


def total_memory_bytes() -> int:
    """Physical memory of this machine (bytes), or of the cgroup when it is smaller."""
    import psutil

    total = int(psutil.virtual_memory().total)
    for path, _, _ in _CGROUP_FILES:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _cgroup_room(limit_path: str, usage_path: str, inactive: str) -> int | None:
    """Bytes a cgroup's memory limit leaves above its usage, not counting the inactive file
    pages (page cache it reclaims first); None where there is no such limit."""
    try:
        with open(limit_path) as f:
            limit = f.read().strip()
        with open(usage_path) as f:
            used = int(f.read().strip())
        with open(Path(limit_path).parent / "memory.stat") as f:
            stat = dict(line.split() for line in f if len(line.split()) == 2)
    except (OSError, ValueError):
        return None
    if not limit.isdigit() or int(limit) >= 1 << 60:  # "max", or v1's "no limit"
        return None
    return max(0, int(limit) - used + int(stat.get(inactive, 0)))


def available_memory_bytes() -> int:
    """Memory this process could still use without swapping (bytes): ``MemAvailable``
    (free plus reclaimable page cache, psutil), or less where the cgroup's memory limit
    (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) leaves less above its usage."""
    import psutil

    avail = int(psutil.virtual_memory().available)
    for files in _CGROUP_FILES:
        room = _cgroup_room(*files)
        if room is not None:
            return min(avail, room)
    return avail


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
