"""nearswap: move the base toward the other model where the two are already close
(mergekit ``nearswap``, alchemonaut's QuartetAnemoi-70B recipe; docs/SPEC.md "NearSwap").

Two models and no task vectors: mergekit's ``base_model`` is model 0 (``a``), the other
model 1 (``b``); each element becomes ``w * b + (1 - w) * a`` with
``w = clamp(t / max(|a - b|, 1e-6), 0, 1)``, computed op by op in the inputs' dtype as
mergekit does (``kernels/cpu_nearswap.py``). It runs as a row-wise pass (``row_op``) with
no host step: every element is independent. M3 draws ``t`` as for slerp (t = 1 - lam).
"""

from streammerge.methods.method import Method
from streammerge.methods.params import Param

T = Param("t", default=None, per_model=False, m3=True,
          help="nearswap: distance below which an element becomes the other model's (w = "
          "t / |a - b|, clamped to [0, 1]); M3 draws it as 1 - lam")  # fmt: skip

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
    row_op="nearswap",
    row_stats=None,
    base_is_input=True,
)
