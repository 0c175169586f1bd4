"""nearswap: move the base toward the other model where the two are already close
(mergekit ``nearswap``, alchemonaut's QuartetAnemoi-70B recipe; docs/SPEC.md "NearSwap").

Two models and no task vectors: mergekit's ``base_model`` is model 0 (``a``), the other
model 1 (``b``); each element becomes ``w * b + (1 - w) * a`` with
``w = clamp(t / max(|a - b|, 1e-6), 0, 1)``, computed op by op in the inputs' dtype as
mergekit does (``kernels/cpu_nearswap.py``). It runs as a row-wise pass (``row_op``) with
no host step: every element is independent. M3 draws ``t`` as for slerp (t = 1 - lam).
"""

from streammerge.methods.method import Method, RowPass
from streammerge.methods.params import Param

T = Param("t", default=None, per_model=False, m3=True,
          help="nearswap: distance below which an element becomes the other model's (w = "
          "t / |a - b|, clamped to [0, 1]); M3 draws it as 1 - lam")  # fmt: skip

def _nearswap_cpu(inputs, out, a) -> None:
    """NearSwap (SPEC "NearSwap"): model 0 is the base ``a``, model 1 ``b``."""
    from streammerge.kernels import cpu_nearswap

    (ra, rb), n = a.model_rows, a.n_rows * a.row_len
    cpu_nearswap.nearswap_chunk(inputs[ra], a.dtypes[ra], inputs[rb], a.dtypes[rb], n, a.t, out,
                                a.out_dtype, a.compute_dtype)  # fmt: skip


def _nearswap_triton(launch, inputs, out, a) -> None:
    from streammerge.kernels import triton_nearswap

    n = a.n_rows * a.row_len
    v0, v1 = (launch.typed(inputs[r], a.dtypes[r], n) for r in a.model_rows)
    triton_nearswap.nearswap_triton(v0, v1, n, a.t, launch.typed(out, a.out_dtype, n),
                                    a.compute_dtype)  # fmt: skip


METHOD = Method(
    name="nearswap",
    order=85,
    uses_base=False,
    sparsifier="none",
    consensus="none",
    params=(T,),
    summary="the base moved toward the other model where they are close (t / |a - b|)",
    source="alchemonaut, QuartetAnemoi-70B-t0.0001; mergekit nearswap",
    working_dtype="inputs",
    m3="t",
    min_models=2,
    max_models=2,
    row_passes=(RowPass("nearswap", _nearswap_cpu, _nearswap_triton),),
    base_is_input=True,
)
