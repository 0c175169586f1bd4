"""breadcrumbs_ties: breadcrumbs' magnitude band, then TIES sign election (mergekit
``breadcrumbs_ties``; docs/SPEC.md "Magnitudes and thresholds", "Sign election")."""

from streammerge.methods.method import Method
from streammerge.methods.params import DENSITY, GAMMA, INT8_MASK, NORMALIZE, SCALE, WEIGHT

METHOD = Method(
    name="breadcrumbs_ties",
    order=70,
    uses_base=True,
    sparsifier="breadcrumbs",
    consensus="sign",
    params=(WEIGHT, DENSITY, GAMMA, SCALE, NORMALIZE, INT8_MASK),
    summary="breadcrumbs' magnitude band, sign election",
    source="Breadcrumbs + TIES",
)
