"""``streammerge.kernels`` in a source checkout: the repository's top-level ``kernels/``.

Importing this module mounts it (``_mount_source_kernels``, whose docstring says why
``kernels/`` is not a package of its own). ``streammerge/__init__.py`` imports it first,
before anything imports ``streammerge.kernels``; it is a module of its own because
``__init__.py`` holds no logic.
"""

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
    spec = _machinery.ModuleSpec(f"{__package__}.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(source)]
    _sys.modules[spec.name] = _util.module_from_spec(spec)


_mount_source_kernels()
