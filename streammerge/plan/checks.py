"""Every argument of ``streammerge.merge`` checked for type and range before anything is
opened: one ``OptionError`` (a ValueError and a one-line MergeError) naming the option.

The CLI passes strings and numbers argparse already typed; the API can be handed anything
(a string where a list of models is expected, ``seed=1.7``, ``threads=0``), and must refuse
it the same way, before a staging directory exists.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import numpy as np

from streammerge.errors import OptionError
from streammerge.notices import notice
from streammerge.sizes import format_bytes, parse_size
from streammerge.sysinfo import total_memory_bytes

#: Smallest --memory accepted (the layout needs ~0.8 MiB for 2 models; more models need
#: more, which make_layout checks exactly).
MIN_MEMORY_BYTES = 2**20
#: Largest float32: weights and scale are applied in float32 (SPEC), so a larger value is
#: infinite there and every merged value with it.
FLOAT32_MAX = float(np.finfo(np.float32).max)
BACKENDS = ("auto", "numba", "triton")
DEVICES = ("auto", "cpu", "cuda")
FLAGS = ("overwrite", "resume", "copy_files", "direct_io", "allow_nonfinite")


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _path(value, what: str) -> None:
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, (str, os.PathLike)):
        raise OptionError(f"{what} must be a path (str or os.PathLike), got {type(value).__name__}")
    if str(os.fspath(value)).strip() == "":
        raise OptionError(f"{what} is an empty path")
    if "\0" in str(os.fspath(value)):
        raise OptionError(f"{what} contains a NUL character")


def _number(value, what: str, *, lo: float | None = None, lo_open: bool = False) -> float:
    if not _is_real(value):
        raise OptionError(f"{what} must be a number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise OptionError(f"{what} must be finite, got {value!r}")
    if lo is not None and (x < lo or (lo_open and x == lo)):
        raise OptionError(f"{what} must be {'>' if lo_open else '>='} {lo:g}, got {value!r}")
    if abs(x) > FLOAT32_MAX:
        raise OptionError(f"{what} {value!r} overflows float32 (the merge computes in float32)")
    return x


def _numbers(value, what: str) -> list[float]:
    """One number, a comma-separated string, or a sequence of numbers -> list of floats."""
    if isinstance(value, str):
        try:
            items = [float(x) for x in value.split(",") if x.strip()]
        except ValueError:
            raise OptionError(f"{what}: not a list of numbers: {value!r}") from None
        if not items:
            raise OptionError(f"{what} is empty")
        return [_number(x, what) for x in items]
    if _is_real(value):
        return [_number(value, what)]
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, (Sequence, np.ndarray)):
        raise OptionError(f"{what} must be numbers, got {type(value).__name__}")
    return [_number(x, what) for x in value]


def check_memory(memory) -> int:
    """``--memory`` in bytes, within [MIN_MEMORY_BYTES, this machine's memory].

    Raises:
        OptionError: not a size, below the floor, or more memory than the machine has.
    """
    n = parse_size(memory, "--memory")
    if n < MIN_MEMORY_BYTES:
        raise OptionError(
            f"--memory {memory} is too small", f"give at least {MIN_MEMORY_BYTES // 2**20}MiB"
        )
    total = total_memory_bytes()
    if n > total:
        raise OptionError(
            f"--memory {memory} is more than this machine's {format_bytes(total)} of memory",
            "give less (the default, 256MiB, is enough for any model size)",
        )
    return n


def check_merge_args(
    models=None,
    base=None,
    out=None,
    *,
    alpha=1.0,
    lam=None,
    weights=None,
    drop=0.5,
    scale=1.0,
    seed=None,
    dtype=None,
    shard_size,
    memory,
    threads,
    backend,
    device,
    vram,
    http_timeout,
    on_start=None,
    on_bytes=None,
    **flags,
) -> None:
    """Check every argument of ``streammerge.merge``: the recipe values given, and every run
    option (``**asdict(options)``: their defaults live in ``Options`` alone).

    Prints a notice for an allowed oddity (λ outside [0, 1]: an extrapolation).

    Raises:
        OptionError (a ValueError): a wrong type or a value out of range, naming the option.
    """
    _check_inputs(models, base, out)
    _check_recipe_values(alpha, lam, weights, drop, scale, seed, dtype)
    _check_run_options(
        shard_size, memory, vram, http_timeout, threads, backend, device, flags, on_start, on_bytes
    )


def check_run_args(
    out,
    *,
    shard_size,
    memory,
    threads,
    backend,
    device,
    vram,
    http_timeout,
    **flags,
) -> None:
    """Check the output path and the run options (every field of ``Options``, passed as
    ``**asdict(options)``: their defaults live there alone) of a merge whose inputs a
    recipe names (layer slices: any number of models).

    Raises:
        OptionError: a wrong type or a value out of range, naming the option.
    """
    _path(out, "out")
    _check_run_options(shard_size, memory, vram, http_timeout, threads, backend, device, flags,
                       None, None)  # fmt: skip


def _check_inputs(models, base, out) -> None:
    """Check the models (a sequence of 2 or more paths), the base and the output path.

    Raises:
        OptionError: not a path, an empty path or one with a NUL, fewer than 2 models.
    """
    if isinstance(models, (str, bytes, bytearray, os.PathLike)) or not isinstance(models, Sequence):
        raise OptionError(
            f"models must be a list of model directories, got {type(models).__name__}",
            "pass a list such as ['a/', 'b/']",
        )
    for m in models:
        _path(m, "each model")
    if len(models) < 2:
        raise OptionError(
            f"need at least 2 fine-tunes, got {len(models)}", "pass two or more model directories"
        )
    _path(base, "base")
    _path(out, "out")


def _check_recipe_values(alpha, lam, weights, drop, scale, seed, dtype) -> None:
    """Check the recipe's values: alpha, λ (a notice outside [0, 1]), weights, drop rates,
    scale, seed and dtype.

    Raises:
        OptionError: a wrong type or a value out of range, naming the option.
    """
    _number(alpha, "--alpha", lo=0.0, lo_open=True)
    if lam is not None:
        x = _number(lam, "--lambda")
        if not 0.0 <= x <= 1.0:
            notice(
                f"--lambda {x:g} is outside [0, 1]: w = ({x:g}, {1 - x:g}) extrapolates "
                "beyond the fine-tunes"
            )
    if weights is not None:
        _numbers(weights, "--weights")
    for p in _numbers(drop, "--drop"):
        if not 0.0 <= p < 1.0:
            raise OptionError(f"--drop: a drop rate p must satisfy 0 <= p < 1, got {p!r}")
    _number(scale, "--scale")
    if seed is not None:
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise OptionError(f"--seed must be an integer, got {seed!r}")
        if not 0 <= int(seed) < 2**64:
            raise OptionError(f"--seed must be in [0, 2**64), got {seed}")
    if dtype is not None and not isinstance(dtype, str):
        raise OptionError(f"--dtype must be a string such as bf16, got {dtype!r}")


def _check_run_options(
    shard_size, memory, vram, http_timeout, threads, backend, device, flags, on_start, on_bytes
) -> None:
    """Check how the merge runs: sizes, the HTTP timeout, threads, backend, device, the
    boolean ``flags`` (``FLAGS``) and the two callbacks.

    Raises:
        OptionError: a wrong type or a value out of range, naming the option.
    """
    parse_size(shard_size, "--shard-size")
    check_memory(memory)
    if vram is not None:
        parse_size(vram, "--vram")
    _number(http_timeout, "--http-timeout", lo=0.0, lo_open=True)
    if threads is not None:
        if not isinstance(threads, numbers.Integral) or isinstance(threads, bool):
            raise OptionError(f"--threads must be an integer, got {threads!r}")
        if threads < 1:
            raise OptionError(f"--threads must be at least 1, got {threads}")
    if backend not in BACKENDS:
        raise OptionError(f"unknown --backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise OptionError(f"unknown --device {device!r}", f"use one of {', '.join(DEVICES)}")
    for name in FLAGS:
        if name in flags and not isinstance(flags[name], (bool, np.bool_)):
            raise OptionError(f"{name} must be True or False, got {flags[name]!r}")
    for name, fn in (("on_start", on_start), ("on_bytes", on_bytes)):
        if fn is not None and not callable(fn):
            raise OptionError(f"{name} must be callable or None, got {type(fn).__name__}")
