"""The vector width numba's kernels are compiled for: the whole register on AVX-512 hosts.

LLVM tunes every Intel AVX-512 server core (Skylake-SP .. Emerald Rapids) with
``prefer-256-bit``: its loop vectorizer then fills half of each 512-bit register. Our
kernels are loops over elements with no fast-math (so no reordering: the same bytes at any
width), throughput-bound where it matters, and gain from the full width. Measured on a
2-core Emerald Rapids VM, one process per setting, same bytes: arcee_fusion's k pass
7.3 -> 5.5 ns per element (two threads), multislerp's five passes 17.3 -> 15.6, the bf16
DARE merge 5.4 -> 4.5-5.0, TIES' 3.6 -> 3.5; a 2 GB arcee_fusion merge 12.2-12.5 ->
10.6 s (bench/results/methods.md, fifth stop).

numba reads its target features once, when it is imported, from ``NUMBA_CPU_FEATURES``, so
``prefer_full_vectors`` runs first when ``streammerge`` is imported and sets that variable
(inherited by the processes streammerge starts, so they compile and cache the same code).
"""

from __future__ import annotations

import os
import sys

#: The LLVM tuning flag this module turns off.
PREFER_256 = "prefer-256-bit"
#: Set (to "1") beside ``NUMBA_CPU_FEATURES`` when this module set that variable.
SET_HERE = "STREAMMERGE_SET_NUMBA_CPU_FEATURES"


def prefer_full_vectors(environ: dict | None = None) -> bool:
    """Set ``NUMBA_CPU_FEATURES`` to the host's features with ``-prefer-256-bit`` when the
    host has AVX-512 (``avx512f``).

    Left alone: numba's target chosen by the user (``NUMBA_CPU_FEATURES`` or
    ``NUMBA_CPU_NAME`` set, ``NUMBA_ENABLE_AVX=0``, or a ``.numba_config.yaml`` in the
    working directory, which numba reads), a process that imported numba already (too
    late: it read them), a host without AVX-512, or llvmlite missing. A
    ``NUMBA_CPU_FEATURES`` inherited from a streammerge process (marked ``SET_HERE``) is
    made again from this host's features: a child may run on another CPU.

    The setting is the process's: other numba code compiled in it afterwards gets 512-bit
    vectors too (the same results for code without fast-math).

    Args:
        environ: the environment to set (tests); default ``os.environ``.

    Returns:
        True when it set the variable.
    """
    env = os.environ if environ is None else environ
    if env.get(SET_HERE) == "1":
        env.pop(SET_HERE)
        env.pop("NUMBA_CPU_FEATURES", None)
    if "NUMBA_CPU_FEATURES" in env or "NUMBA_CPU_NAME" in env \
            or env.get("NUMBA_ENABLE_AVX", "1") == "0" or os.path.exists(".numba_config.yaml"):
        return False
    if environ is None and "numba" in sys.modules:
        return False
    try:
        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features()
    except (ImportError, RuntimeError, OSError):
        return False
    if not features.get("avx512f", False):
        return False
    env["NUMBA_CPU_FEATURES"] = f"{features.flatten()},-{PREFER_256}"
    env[SET_HERE] = "1"
    return True


def users_environ(environ: dict | None = None) -> dict:
    """A copy of the environment without the ``NUMBA_CPU_FEATURES`` this module set: what a
    benchmark gives another program or another revision of streammerge (which then makes
    its own choice), so that each runs as it would for the user."""
    env = dict(os.environ if environ is None else environ)
    if env.pop(SET_HERE, None) is not None:
        env.pop("NUMBA_CPU_FEATURES", None)
    return env
