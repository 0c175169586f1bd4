"""ties: keep the top-density magnitudes of each task vector, elect a sign per element, sum
the agreeing values (TIES-Merging, arXiv 2306.01708; mergekit ``ties``; docs/SPEC.md
"Magnitudes and thresholds", "Sign election")."""

from streammerge.methods.method import Method
from streammerge.methods.params import DENSITY, INT8_MASK, NORMALIZE, SCALE, WEIGHT

METHOD = Method(
    name="ties",
    order=40,
    uses_base=True,
    sparsifier="magnitude",
    consensus="sign",
    params=(WEIGHT, DENSITY, SCALE, NORMALIZE.with_default(True), INT8_MASK),
    summary="trim to the largest magnitudes, sign election, sum of the agreeing",
    source="TIES-Merging, arXiv 2306.01708",
)
