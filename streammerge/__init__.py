"""streammerge: memory-streaming merge engine for huge language models (task arithmetic,
DARE, TIES, breadcrumbs, linear, each with Mixup Model Merge weights).

``streammerge.merge(...)`` is the whole job (see ``streammerge.api.merge``);
``streammerge.sweep(...)`` merges K mixup draws from one read and keeps the best
(``streammerge.sweep``); the command ``streammerge`` wraps both (``streammerge.cli``).
"""

__version__ = "0.1.0"

from streammerge.vector_width import prefer_full_vectors

prefer_full_vectors()  # before numba is imported: it reads its target features once

# first: its import mounts streammerge.kernels
from streammerge import kernel_source  # noqa: E402, F401
from streammerge.api import MergeSummary, merge  # noqa: E402
from streammerge.jobs import sweep  # noqa: E402

__all__ = ["MergeSummary", "__version__", "merge", "sweep"]
