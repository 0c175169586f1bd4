"""passthrough: layers stacked as a ``slices:`` recipe lists them, nothing merged
(mergekit ``passthrough``; docs/SPEC.md "Layer slices").

Every output tensor is one input tensor, copied, or cast once to the output dtype
(``streammerge.plan.slices``). It has no kernel: the plan's tensors are ``copy`` and
``convert`` actions. mergekit multiplies a tensor by its ``scale`` (``tensor * scale`` in
the load dtype); streammerge copies a tensor whose scale resolves to 1 (or none) and
converts any other with ``round(float32(x) * float32(scale))`` (``cpu_merge.convert_chunk``),
mergekit's bytes.
"""

from streammerge.methods.method import Method
from streammerge.methods.params import Param

#: mergekit's ``scale`` (``PerInput[Optional[float]]``, default none): resolved per
#: source, filtered on the source tensor's name, spread over the slice's layers.
SCALE = Param("scale", default=None, per_model=True, yaml="scale",
              help="passthrough: multiply the tensor by it (mergekit's x * scale)")  # fmt: skip

METHOD = Method(
    name="passthrough",
    order=1000,
    uses_base=False,
    sparsifier="none",
    consensus="none",
    params=(SCALE,),
    summary="layers of the inputs stacked as given (mergekit passthrough slices)",
    source="mergekit passthrough",
    m3="none",
    min_models=1,
    max_models=1,
    slices_only=True,
)
