"""ramplus_tl: RAM+ with tensor-local overlap rescaling (arXiv 2601.13572; mergekit
``ramplus_tl``; docs/SPEC.md "RAM (ram, ramplus_tl)").

As ``ram``, but each fine-tune's unique changes are scaled by
``lambda_j = 1 + r * clamp(shared_j / unique_j, 0, alpha)``, its counts of shared and
unique changes over the whole tensor: a statistics pass (``row_stats``: ``ram_counts``,
exact integer counts) before the elementwise pass. mergekit writes float32; streammerge
writes the base's dtype unless ``--dtype`` (``--dtype float32``: mergekit's bytes).
mergekit's ``alpha`` is ``--ram-alpha`` on the command line (``--alpha`` is M3's).
"""

from streammerge.methods.method import Method
from streammerge.methods.params import Param
from streammerge.methods.ram import EPSILON

R = Param("r", default=0.1, per_model=False,
          help="ramplus_tl: strength of the overlap rescaling, lambda = 1 + r * rho")  # fmt: skip
RAM_ALPHA = Param("ram_alpha", default=0.2, per_model=False, yaml="alpha",
                  help="ramplus_tl: upper clamp of the overlap ratio rho (mergekit's alpha)")

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
    row_op="ramplus_tl",
    row_stats="ram_counts",
)
