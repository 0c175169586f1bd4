"""dare_ties: DARE's random drop, then TIES sign election (DARE, arXiv 2311.03099 + TIES;
mergekit ``dare_ties``; docs/SPEC.md "DARE", "Sign election")."""

from streammerge.methods.method import Method
from streammerge.methods.params import DENSITY, DROP, INT8_MASK, NORMALIZE, RESCALE, SCALE, WEIGHT

METHOD = Method(
    name="dare_ties",
    order=50,
    uses_base=True,
    sparsifier="dare",
    consensus="sign",
    params=(WEIGHT, DENSITY, DROP, SCALE, NORMALIZE, RESCALE, INT8_MASK),
    summary="random drop and rescale, sign election",
    source="DARE arXiv 2311.03099 + TIES",
)
