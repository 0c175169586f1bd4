"""linear: the weighted mean of the models themselves (Model soups, arXiv 2203.05482;
mergekit ``linear``; docs/SPEC.md "Methods")."""

from streammerge.methods.method import Method
from streammerge.methods.params import NORMALIZE, WEIGHT

METHOD = Method(
    name="linear",
    order=10,
    uses_base=False,
    sparsifier="none",
    consensus="none",
    params=(WEIGHT, NORMALIZE.with_default(True)),
    summary="weighted mean of the models (no base)",
    source="Model soups, arXiv 2203.05482",
)
