"""breadcrumbs: drop the largest gamma and the smallest magnitudes, keep density in between
(Model Breadcrumbs, arXiv 2312.06795; mergekit ``breadcrumbs``; docs/SPEC.md "Magnitudes
and thresholds")."""

from streammerge.methods.method import Method
from streammerge.methods.params import DENSITY, GAMMA, INT8_MASK, NORMALIZE, SCALE, WEIGHT

METHOD = Method(
    name="breadcrumbs",
    order=60,
    uses_base=True,
    sparsifier="breadcrumbs",
    consensus="none",
    params=(WEIGHT, DENSITY, GAMMA, SCALE, NORMALIZE, INT8_MASK),
    summary="drop outliers and small magnitudes, weighted sum",
    source="Breadcrumbs, arXiv 2312.06795",
)
