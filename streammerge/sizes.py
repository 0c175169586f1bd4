"""Byte sizes as users write them (``500MB``, ``5GB``, ``2GiB``), as Hugging Face's
``max_shard_size`` reads them: decimal units for KB/MB/GB/TB, binary for KiB/MiB/GiB/TiB."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like ``"500MB"``, ``"5GB"``, ``"1.5GiB"``.

    Raises:
        ValueError: not a size, an unknown unit, or not positive.
    """
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE.match(str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"not a size: {size!r} (use e.g. 500MB, 5GB, 2GiB)")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def format_bytes(n: float) -> str:
    """``n`` bytes as a short decimal string, e.g. ``'2.15 GB'``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
