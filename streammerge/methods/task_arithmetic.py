"""task_arithmetic: base + s * sum_j w_j * delta_j (Task Arithmetic, arXiv 2212.04089;
mergekit ``task_arithmetic``; docs/SPEC.md "Methods")."""

from streammerge.methods.method import Method
from streammerge.methods.params import INT8_MASK, NORMALIZE, SCALE, WEIGHT

METHOD = Method(
    name="task_arithmetic",
    order=20,
    uses_base=True,
    sparsifier="none",
    consensus="none",
    params=(WEIGHT, SCALE, NORMALIZE, INT8_MASK),
    summary="weighted sum of the task vectors",
    source="Task Arithmetic, arXiv 2212.04089",
)
