"""Byte sizes as users write them (``500MB``, ``5GB``, ``2GiB``), as Hugging Face's
``max_shard_size`` reads them: decimal units for KB/MB/GB/TB, binary for KiB/MiB/GiB/TiB."""

from __future__ import annotations

import math
import re

from streammerge.errors import OptionError

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "PIB": 2**50,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d{1,30}(?:\.\d{1,30})?)\s*([A-Za-z]{0,3})\s*$", re.ASCII)
#: Largest size accepted (bytes): 2**60, far beyond any disk or memory, far below int64.
MAX_SIZE_BYTES = 2**60


def parse_size(size: float | str, what: str = "size") -> int:
    """Bytes in ``size``: an int, or a string like ``"500MB"``, ``"5GB"``, ``"1.5GiB"``.

    Raises:
        OptionError (a ValueError): not a size, an unknown unit, not positive, or more than
            MAX_SIZE_BYTES.
    """
    if isinstance(size, bool) or not isinstance(size, (int, float, str)):
        raise OptionError(f"{what} must be a number of bytes or a string like 5GB, got {size!r}")
    if isinstance(size, int):
        value = size
    elif isinstance(size, float):
        if not math.isfinite(size) or size != int(size):
            raise OptionError(f"{what} must be a whole number of bytes, got {size!r}")
        value = int(size)
    else:
        m = _SIZE.match(size)
        if not m or m.group(2).upper() not in _UNITS:
            raise OptionError(f"{what}: not a size: {size!r}", "use e.g. 500MB, 5GB, 2GiB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise OptionError(f"{what} must be positive, got {size!r}")
    if value > MAX_SIZE_BYTES:
        raise OptionError(
            f"{what} {size!r} is too large", f"give at most {format_bytes(MAX_SIZE_BYTES)}"
        )
    return value


def format_bytes(n: float) -> str:
    """``n`` bytes as a short decimal string, e.g. ``'2.15 GB'``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
