"""della_linear: DELLA's magnitude-ranked random drop, then a weighted sum (mergekit
``della_linear``; docs/SPEC.md "DELLA (della, della_linear)")."""

from streammerge.methods.della import DELLA_RESCALE, EPSILON, della_check, della_cpu, della_triton
from streammerge.methods.method import Method, RowPass
from streammerge.methods.params import DENSITY, INT8_MASK, NORMALIZE, SCALE, WEIGHT


def della_linear_cpu(inputs, out, a) -> None:
    """della_linear over a chunk of whole rows (no sign election)."""
    della_cpu(inputs, out, a, sign=False)


def della_linear_triton(launch, inputs, out, a) -> None:
    """della_linear with the Triton kernels."""
    della_triton(launch, inputs, out, a, sign=False)


METHOD = Method(
    name="della_linear",
    order=95,
    uses_base=True,
    sparsifier="none",
    consensus="none",
    params=(WEIGHT, DENSITY, EPSILON, SCALE, NORMALIZE, DELLA_RESCALE, INT8_MASK),
    summary="magnitude-ranked random drop (density +/- epsilon), rescale, weighted sum",
    source="DELLA, arXiv 2406.11617; mergekit della_linear",
    working_dtype="inputs",
    row_passes=(RowPass("della_linear", della_linear_cpu, della_linear_triton),),
    vector_row=True,
    check_params=della_check,
)
