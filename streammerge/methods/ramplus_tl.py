"""ramplus_tl: RAM+ with tensor-local overlap rescaling (arXiv 2601.13572; mergekit
``ramplus_tl``; docs/SPEC.md "RAM (ram, ramplus_tl)").

As ``ram``, but each fine-tune's unique changes are scaled by
``lambda_j = 1 + r * clamp(shared_j / unique_j, 0, alpha)``, its counts of shared and
unique changes over the whole tensor: a statistics pass (``row_stats``: ``ram_counts``,
exact integer counts) before the elementwise pass. mergekit writes float32; streammerge
writes the base's dtype unless ``--dtype`` (``--dtype float32``: mergekit's bytes).
mergekit's ``alpha`` is ``--ram-alpha`` on the command line (``--alpha`` is M3's).
"""

import numpy as np

from streammerge.methods.method import Method, RowPass
from streammerge.methods.params import Param
from streammerge.methods.ram import EPSILON, ram_cpu, ram_triton

R = Param("r", default=0.1, per_model=False,
          help="ramplus_tl: strength of the overlap rescaling, lambda = 1 + r * rho")  # fmt: skip
RAM_ALPHA = Param("ram_alpha", default=0.2, per_model=False, yaml="alpha",
                  help="ramplus_tl: upper clamp of the overlap ratio rho (mergekit's alpha)")

def ramplus_lambdas(a) -> np.ndarray:
    """lambda_j (float32 [N]) from the tensor's ``ram_counts`` (SPEC "RAM")."""
    from streammerge.kernels import cpu_ram

    p = dict(a.params)
    return cpu_ram.ram_lambdas(*a.stats["ram_counts"], p["epsilon"], p["r"], p["ram_alpha"])


def _counts_cpu(inputs, out, a) -> None:
    """``ram_counts``: each fine-tune's shared and unique changes, added into ``a.counts``."""
    from streammerge.kernels import cpu_ram

    cpu_ram.ram_counts(inputs, list(a.dtypes), a.base_row, list(a.model_rows), a.count,
                       dict(a.params)["epsilon"], *a.counts, a.compute_dtype)  # fmt: skip


def _counts_triton(launch, inputs, out, a) -> None:
    from streammerge.kernels import triton_ram

    torch, n = launch.torch, a.count
    base = launch.typed(inputs[a.base_row], a.dtypes[a.base_row], n)
    models = [launch.typed(inputs[r], a.dtypes[r], n) for r in a.model_rows]
    got = [torch.zeros(len(models), dtype=torch.int64, device=base.device) for _ in range(2)]
    triton_ram.ram_counts_triton(base, models, n, dict(a.params)["epsilon"], *got,
                                 a.compute_dtype)  # fmt: skip
    for acc, g in zip(a.counts, got):
        acc += g.cpu().numpy()


def _zero_counts(n_models: int) -> tuple:
    """int64 [N] shared and unique counts."""
    return (np.zeros(n_models, np.int64), np.zeros(n_models, np.int64))


COUNTS_PASS = RowPass("ram_counts", _counts_cpu, _counts_triton, accumulators=_zero_counts)
PASS = RowPass("ramplus_tl", lambda i, o, a: ram_cpu(i, o, a, ramplus_lambdas(a)),
               lambda k, i, o, a: ram_triton(k, i, o, a, ramplus_lambdas(a)))  # fmt: skip

METHOD = Method(
    name="ramplus_tl",
    order=91,
    uses_base=True,
    sparsifier="none",
    consensus="none",
    params=(EPSILON, R, RAM_ALPHA),
    summary="ram with each fine-tune's unique changes scaled up by its overlap (per tensor)",
    source="RAM+, arXiv 2601.13572; mergekit ramplus_tl",
    working_dtype="inputs",
    m3="none",
    min_models=2,
    row_passes=(COUNTS_PASS, PASS),
)
