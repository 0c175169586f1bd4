"""streammerge: memory-streaming M3 + DARE merge engine for huge language models.

``streammerge.merge(...)`` is the whole job (see ``streammerge.api.merge``); the command
``streammerge`` wraps it (``streammerge.cli``).
"""

__version__ = "0.1.0"

from streammerge.api import MergeSummary, merge

__all__ = ["MergeSummary", "__version__", "merge"]
