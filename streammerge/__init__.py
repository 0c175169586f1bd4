"""streammerge: memory-streaming merge engine for huge language models (task arithmetic,
DARE, TIES, breadcrumbs, linear, each with Mixup Model Merge weights).

``streammerge.merge(...)`` is the whole job (see ``streammerge.api.merge``);
``streammerge.sweep(...)`` merges K mixup draws from one read and keeps the best
(``streammerge.sweep``); the command ``streammerge`` wraps both (``streammerge.cli``).
"""

__version__ = "0.1.0"

import importlib.machinery as _machinery
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path


def _mount_source_kernels() -> None:
    """Make ``streammerge.kernels`` the repository's top-level ``kernels/`` directory.

    ``kernels/`` has no ``__init__.py`` on purpose: from the repository root a regular
    package named ``kernels`` would shadow the third-party ``kernels`` that transformers
    imports (issue 16). A wheel ships it as ``streammerge/kernels/`` (a namespace
    subpackage, found normally); a source checkout or an editable install has no such
    folder, so it is mounted here as a namespace package on ``kernels/``.
    """
    here = _Path(__file__).resolve().parent
    source = here.parent / "kernels"
    if (here / "kernels").is_dir() or not source.is_dir():
        return
    spec = _machinery.ModuleSpec(f"{__name__}.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(source)]
    _sys.modules[spec.name] = _util.module_from_spec(spec)


_mount_source_kernels()

from streammerge import sweep
from streammerge.api import MergeSummary, merge

__all__ = ["MergeSummary", "__version__", "merge", "sweep"]
