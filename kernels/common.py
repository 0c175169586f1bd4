"""Host-side constants of the merge contract shared by every kernel (docs/SPEC.md).

Both the numba CPU kernel and the Triton GPU kernel take their per-model constants from
here, so the two can only differ in the elementwise pass itself.

Conventions on the CPU side: a tensor is a 1-D numpy array in its stored dtype, with
bfloat16 carried as ``np.uint16`` bit patterns (numpy has no bfloat16). The safetensors
dtype strings ``"F32"``, ``"F16"``, ``"BF16"`` name the float dtypes the kernels accept.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

#: Float dtypes the kernels read and write, as safetensors dtype strings, with their codes.
FLOAT_CODES: dict[str, int] = {"F32": 0, "F16": 1, "BF16": 2}
#: Bytes per element of each float dtype.
FLOAT_ITEMSIZE: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2}
#: numpy dtype that carries each float dtype on the CPU (bf16 as raw uint16 bits).
NUMPY_CARRIER: dict[str, np.dtype] = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),
}

#: ``held`` of a multi-pass row-wise kernel (multislerp, karcher) on a tensor in one chunk:
#: the model rows hold the inputs as read (NO_HELD); the pass stores the unit vectors u_j
#: over them, as the working dtype W (STORE_UNITS); or they hold u_j (HELD_UNITS).
NO_HELD, STORE_UNITS, HELD_UNITS = 0, 1, 2


def held_units_fit(work: str, dtypes, model_rows) -> bool:
    """Whether unit vectors in W fit over the model rows in place: each element of W over
    an element of the row's own dtype (the same itemsize; else a block's writes would land
    on elements another thread has not read yet)."""
    return all(FLOAT_ITEMSIZE[dtypes[r]] == FLOAT_ITEMSIZE[work] for r in model_rows)


def checked_held(held: int, stage: int, store_stage: int, work: str, dtypes,
                 model_rows) -> int:  # fmt: skip
    """``held`` of a pass checked: STORE_UNITS only in the pass ``store_stage`` that
    computes the unit vectors, HELD_UNITS only in the passes after it, and the units must
    fit over the model rows (``held_units_fit``).

    Raises:
        ValueError: ``held`` at another stage, or model rows without W's itemsize.
    """
    if held == NO_HELD:
        return held
    if not ((held == STORE_UNITS and stage == store_stage)
            or (held == HELD_UNITS and stage > store_stage)):  # fmt: skip
        raise ValueError(f"held {held} does not go with stage {stage}: pass {store_stage} "
                         "stores the unit vectors, the passes after it read them")
    if not held_units_fit(work, dtypes, model_rows):
        raise ValueError("held unit vectors need model rows with the working dtype's itemsize")
    return held


def low_bits_vary(work: str | None) -> bool:
    """Whether the 32-bit order keys of values in the working dtype ``work`` (TIES'
    magnitudes, sce's variances, arcee_fusion's importances) can differ in their low 16
    bits, so a threshold needs the low-bits histogram pass. Not for ``BF16``: a bf16 value
    is the high half of its float32 bits, so a high-16-bit bucket holds one key (low bits
    all 0, or all 1 for a negative value's flipped key) and the high histogram gives the
    exact thresholds (docs/SPEC.md "Magnitudes and thresholds", "SCE", "Arcee Fusion").
    ``None`` (not known yet) counts as yes."""
    return work != "BF16"


def tensor_key(seed: int, name: str) -> int:
    """Per-tensor Philox key ``key_t`` (SPEC "Per-tensor key").

    Args:
        seed: merge seed, 0 <= seed < 2**64.
        name: tensor name as stored, e.g. ``model.layers.0.mlp.up_proj.weight``.

    Returns:
        int in [0, 2**63): blake2b-64 of the UTF-8 name keyed by the seed's 8 little-endian
        bytes, read little-endian, top bit cleared (so it fits a signed int64 argument).

    Raises:
        ValueError: seed outside [0, 2**64).
    """
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    digest = hashlib.blake2b(
        name.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little")
    ).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def drop_threshold(p: float) -> int:
    """DARE keep threshold ``floor(p * 2**32)`` as an int in [0, 2**32) (SPEC "masks").

    Element i of model j is kept when its Philox word r satisfies ``r >= threshold``.

    Raises:
        ValueError: p outside [0, 1).
    """
    if not (0.0 <= p < 1.0) or math.isnan(p):
        raise ValueError(f"drop rate p must satisfy 0 <= p < 1, got {p}")
    return math.floor(float(p) * 2**32)


def drop_rescale(p: float) -> np.float32:
    """DARE rescale ``float32(1 / (1 - p))``: the quotient in float64, then rounded to float32.

    Source: DARE (arXiv 2311.03099) eq. 2; rounding as in SPEC "The merged value".

    Raises:
        ValueError: p outside [0, 1).
    """
    drop_threshold(p)  # validates p
    return np.float32(1.0 / (1.0 - float(p)))


def round_host(x: float, dtype: str) -> np.float32:
    """rd on the host (docs/SPEC.md "Working dtype (v3)"): ``x`` rounded to float32, then
    to ``dtype`` ("F32", "F16", "BF16"; round to nearest even, overflow to inf) and widened
    back to float32. For the weights w'_j = rd(float32(w_j)) and the weight sums."""
    x32 = np.float32(x)
    if dtype == "F32":
        return x32
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return np.float32(np.float16(x32))
    if dtype != "BF16":
        raise ValueError(f"unknown working dtype {dtype!r}")
    u = int(np.array([x32]).view(np.uint32)[0])
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return x32
    r = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16) & 0xFFFFFFFF
    return np.array([r], np.uint32).view(np.float32)[0]
