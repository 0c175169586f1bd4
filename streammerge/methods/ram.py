"""ram: Reinforced Agent Merging, tensor by tensor (arXiv 2601.13572; mergekit ``ram``;
docs/SPEC.md "RAM (ram, ramplus_tl)").

Each element keeps the one fine-tune's task vector where only it changed the base by more
than ``epsilon``, and the mean of the task vectors where several did; no weights, nothing
for M3 to draw. Computed op by op in the inputs' dtype as mergekit does
(``kernels/cpu_ram.py``), as a row-wise pass (``row_op``) without a host step: every
element is independent.
"""

from streammerge.methods.method import Method, RowPass
from streammerge.methods.params import Param

EPSILON = Param("epsilon", default=1e-5, per_model=False,
                help="ram, ramplus_tl: a task-vector entry counts as a change when its "
                "magnitude exceeds epsilon (compared in the inputs' dtype)")  # fmt: skip

def ram_cpu(inputs, out, a, lam=None) -> None:
    """ram (``lam`` None) or ramplus_tl (``lam``: float32 [N] lambda_j) over the base and
    the fine-tunes of the chunk (SPEC "RAM")."""
    from streammerge.kernels import cpu_ram

    cpu_ram.ram_chunk(inputs, list(a.dtypes), a.base_row, list(a.model_rows), a.count,
                      dict(a.params)["epsilon"], out, a.out_dtype, lam, a.compute_dtype)  # fmt: skip


def ram_triton(launch, inputs, out, a, lam=None) -> None:
    """``ram_cpu`` with the Triton kernel."""
    from streammerge.kernels import triton_ram

    n = a.count
    base = launch.typed(inputs[a.base_row], a.dtypes[a.base_row], n)
    models = [launch.typed(inputs[r], a.dtypes[r], n) for r in a.model_rows]
    triton_ram.ram_triton(base, models, n, dict(a.params)["epsilon"],
                          launch.typed(out, a.out_dtype, n), lam, a.compute_dtype)  # fmt: skip


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
    row_passes=(RowPass("ram", ram_cpu, ram_triton),),
)
