"""ram: Reinforced Agent Merging, tensor by tensor (arXiv 2601.13572; mergekit ``ram``;
docs/SPEC.md "RAM (ram, ramplus_tl)").

Each element keeps the one fine-tune's task vector where only it changed the base by more
than ``epsilon``, and the mean of the task vectors where several did; no weights, nothing
for M3 to draw. Computed op by op in the inputs' dtype as mergekit does
(``kernels/cpu_ram.py``), as a row-wise pass (``row_op``) without a host step: every
element is independent.
"""

from streammerge.methods.method import Method
from streammerge.methods.params import Param

EPSILON = Param("epsilon", default=1e-5, per_model=False,
                help="ram, ramplus_tl: a task-vector entry counts as a change when its "
                "magnitude exceeds epsilon (compared in the inputs' dtype)")  # fmt: skip

METHOD = Method(
    name="ram",
    order=90,
    uses_base=True,
    sparsifier="none",
    consensus="none",
    params=(EPSILON,),
    summary="each fine-tune's own changes kept, overlapping changes averaged",
    source="RAM, arXiv 2601.13572; mergekit ram",
    working_dtype="inputs",
    m3="none",
    min_models=2,
    row_op="ram",
    row_stats=None,
)
