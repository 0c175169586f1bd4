"""dare_linear: DARE's random drop at rate p and rescale by 1/(1-p), then a weighted sum
(DARE, arXiv 2311.03099; mergekit ``dare_linear``; docs/SPEC.md "DARE")."""

from streammerge.methods.method import Method
from streammerge.methods.params import DENSITY, DROP, INT8_MASK, NORMALIZE, RESCALE, SCALE, WEIGHT

METHOD = Method(
    name="dare_linear",
    order=30,
    uses_base=True,
    sparsifier="dare",
    consensus="none",
    params=(WEIGHT, DENSITY, DROP, SCALE, NORMALIZE, RESCALE, INT8_MASK),
    summary="random drop (rate p = 1 - density), rescale, weighted sum",
    source="DARE, arXiv 2311.03099",
)
