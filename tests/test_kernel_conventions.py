"""Conventions every CPU kernel module keeps so that LLVM vectorizes its loops
(``kernels/cpu_loops.py`` says why and what each was worth)."""

from __future__ import annotations

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def _njit_calls(tree: ast.AST):
    """Every ``numba.njit(...)`` call (decorator or not) with its keyword arguments."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "njit":  # fmt: skip
            yield node, {k.arg: k.value for k in node.keywords}


def test_every_compiled_kernel_uses_the_numpy_error_model():
    """A function compiled on its own (``cache=True``; the ``inline="always"`` helpers take
    their caller's model) divides as IEEE does, without the python model's zero test."""
    missing, seen = [], 0
    for path in sorted(KERNELS.glob("cpu_*.py")):
        for call, kw in _njit_calls(ast.parse(path.read_text())):
            if "cache" not in kw:
                continue
            seen += 1
            model = kw.get("error_model")
            if not (isinstance(model, ast.Constant) and model.value == "numpy"):
                missing.append(f"{path.name}:{call.lineno}")
    assert seen > 40 and not missing, missing
