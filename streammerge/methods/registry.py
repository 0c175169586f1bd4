"""The method registry: every module of ``streammerge.methods`` that defines ``METHOD``.

Adding a method is adding its module (plus its kernel branch, SPEC section and tests):
the registry finds it by listing the package, so the CLI, the YAML reader, the plan, the
record, the card and the docs table see it without further edits.
"""

from __future__ import annotations

import importlib
import pkgutil

import streammerge.methods as _package
from streammerge.methods.method import Method, RowPass
from streammerge.methods.params import Param


def _discover() -> dict[str, Method]:
    """Every ``METHOD`` of the package's modules, by name, in ``Method.order``."""
    found = []
    for info in pkgutil.iter_modules(_package.__path__):
        module = importlib.import_module(f"{_package.__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if isinstance(method, Method):
            found.append(method)
    found.sort(key=lambda m: (m.order, m.name))
    names = [m.name for m in found]
    if len(set(names)) != len(names):
        raise ImportError(f"two method modules declare the same name: {names}")
    return {m.name: m for m in found}


#: Every method module's ``METHOD``, by name (``passthrough`` included).
ALL_METHODS: dict[str, Method] = _discover()
#: The methods of ``--method`` and of a ``models:`` recipe (not the ``slices_only`` ones);
#: their parameters are the flags and YAML keys (``all_params``).
METHODS: dict[str, Method] = {k: m for k, m in ALL_METHODS.items() if not m.slices_only}

def _row_passes() -> dict[str, tuple[Method, RowPass]]:
    """Every row-wise pass by name, with its method."""
    out: dict[str, tuple[Method, RowPass]] = {}
    for m in ALL_METHODS.values():
        for p in m.row_passes:
            if p.name in out and out[p.name][1] is not p:
                raise ImportError(f"two methods declare the row pass {p.name!r}")
            out[p.name] = (m, p)
    return out


#: The kernel table of the row-wise passes: pass name -> (method, ``RowPass``).
ROW_PASSES: dict[str, tuple[Method, RowPass]] = _row_passes()


def row_pass(name: str) -> RowPass:
    """The row-wise pass ``name`` (``RowPass``).

    Raises:
        KeyError: no method declares it.
    """
    return ROW_PASSES[name][1]


def row_method(name: str) -> Method:
    """The method whose row-wise pass is ``name``.

    Raises:
        KeyError: no method declares it.
    """
    return ROW_PASSES[name][0]


#: The method when none is named (SPEC v2: v1's command lines keep their bytes).
DEFAULT_METHOD = "dare_linear"
#: Trim populations (SPEC v2): per tensor (mergekit), or every merged tensor of a fine-tune.
TRIM_SCOPES = ("tensor", "model")


def get_method(name: str) -> Method:
    """The method named ``name`` (``passthrough`` too).

    Raises:
        ValueError: an unknown method (the message lists the methods).
    """
    try:
        return ALL_METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown merge method {name!r}; streammerge has {', '.join(METHODS)}"
        ) from None


def all_params() -> dict[str, Param]:
    """Every parameter some method declares, by recipe name, first declaration first (the
    flags and YAML keys the front doors accept). Defaults differ by method (normalize):
    read a method's own declaration for its default."""
    out: dict[str, Param] = {}
    for m in METHODS.values():
        for p in m.params:
            out.setdefault(p.name, p)
    return out


def methods_taking(name: str) -> list[str]:
    """The methods that read the parameter ``name``."""
    return [m.name for m in METHODS.values() if m.takes(name)]
