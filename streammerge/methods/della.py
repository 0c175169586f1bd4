"""della: DELLA's magnitude-ranked random drop, then TIES sign election (arXiv 2406.11617;
mergekit ``della``; docs/SPEC.md "DELLA (della, della_linear)").

Within each row of each task vector (a 1-D tensor is one row, as mergekit's
``della_magprune``), the elements are ranked by magnitude (ties by index); an element's
keep probability rises linearly with its rank from ``density - epsilon`` to ``density +
epsilon``; the keep decision is SPEC v1's counter-based Philox word, a kept value is
rescaled by 1 / (its keep probability) when ``rescale``. Computed in the working dtype as
mergekit's task-vector methods (``kernels/cpu_della.py``), as a row-wise pass.
"""

from __future__ import annotations

from dataclasses import replace

from streammerge.methods.method import Method, RowPass
from streammerge.methods.params import (DENSITY, INT8_MASK, NORMALIZE, RESCALE, SCALE, WEIGHT,
                                        Param)  # fmt: skip

EPSILON = Param("epsilon", default=0.15, lo=0.0,
                help="della: keep probabilities spread over density +/- epsilon by magnitude "
                "rank (density +/- epsilon must lie in (0, 1))")  # fmt: skip
DELLA_RESCALE = replace(RESCALE, only=None,
                        help="DARE, DELLA: rescale kept values by 1 / keep probability")


def della_cpu(inputs, out, a, sign: bool = True) -> None:
    """DELLA over a chunk of whole rows (SPEC "DELLA")."""
    from streammerge.kernels import cpu_della

    p = dict(a.params)
    ids = a.model_ids
    per = [p["density"], p["epsilon"]]
    density, epsilon = ([float(v[j]) for j in ids] for v in per)
    cpu_della.della_chunk(inputs, list(a.dtypes), a.base_row, list(a.model_rows), a.n_rows,
                          a.row_len, a.start, a.key, list(a.weights), density, epsilon,
                          bool(p["rescale"]), sign, bool(p["normalize"]), float(p["scale"]),
                          out, a.out_dtype, a.compute_dtype, list(ids))  # fmt: skip


def della_triton(launch, inputs, out, a, sign: bool = True) -> None:
    """``della_cpu`` with the Triton kernels."""
    from streammerge.kernels import triton_della

    p = dict(a.params)
    n = a.n_rows * a.row_len
    density, epsilon = ([float(v[j]) for j in a.model_ids] for v in (p["density"], p["epsilon"]))
    base = launch.typed(inputs[a.base_row], a.dtypes[a.base_row], n)
    models = [launch.typed(inputs[r], a.dtypes[r], n) for r in a.model_rows]
    triton_della.della_triton(base, models, a.n_rows, a.row_len, a.start, a.key, a.model_ids,
                              list(a.weights), density, epsilon, bool(p["rescale"]), sign,
                              bool(p["normalize"]), float(p["scale"]),
                              launch.typed(out, a.out_dtype, n), a.compute_dtype)  # fmt: skip


def della_check(values: dict) -> str | None:
    """mergekit's condition: density < 1 needs density +/- epsilon inside (0, 1)."""
    for r, e in zip(values.get("density", ()), values.get("epsilon", ())):
        if r < 1.0 and not (r - e > 0.0 and r + e < 1.0):
            return (f"della: density {r} +/- epsilon {e} must lie inside (0, 1) "
                    "(mergekit's condition)")  # fmt: skip
    return None


METHOD = Method(
    name="della",
    order=94,
    uses_base=True,
    sparsifier="none",
    consensus="sign",
    params=(WEIGHT, DENSITY, EPSILON, SCALE, NORMALIZE.with_default(True), DELLA_RESCALE,
            INT8_MASK),  # fmt: skip
    summary="magnitude-ranked random drop (density +/- epsilon), rescale, sign election",
    source="DELLA, arXiv 2406.11617; mergekit della",
    working_dtype="inputs",
    row_passes=(RowPass("della", della_cpu, della_triton),),
    vector_row=True,
    check_params=della_check,
)
