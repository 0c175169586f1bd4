"""A method's parameters, declared once (docs/SPEC.md "Per-tensor parameters").

A ``Param`` says everything the front doors need to know about one recipe parameter: its
name in the recipe and the record, its mergekit YAML key, its CLI flag, its type, default
and range, whether it is given per model (mergekit's ``tensor_parameters``) or for the
whole merge (``parameters``), whether it may vary along the layers (gradients and filter
lists), and whether M3 draws it. The CLI, the YAML reader, the recipe checks, ``--plan``,
the record, the model card, the API and docs/methods.md's generated table read these
declarations; a method module lists the ones it uses (``streammerge.methods.method``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from streammerge.errors import OptionError


class RecipeError(OptionError):
    """A recipe value out of range or of the wrong type (a ValueError and a one-line
    MergeError); ``key`` names the recipe key."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message, "check the recipe and the command-line options")
        self.key = key


@dataclass(frozen=True)
class Param:
    """One recipe parameter.

    Attributes:
        name: the recipe and record key (``density``); ``scale`` is mergekit's ``lambda``.
        kind: ``number`` (float64) or ``bool``.
        default: the value when the recipe gives none (None: derived by the method, as
            DARE's drop rate p = 1 - density).
        lo, hi: the closed or open range bounds (None: unbounded); lo_open / hi_open: the
            bound itself is excluded.
        per_model: given per fine-tune (mergekit's ``tensor_parameters``), else one value
            for the whole merge (mergekit's ``parameters``).
        layered: the value may be a gradient or a ``{filter, value}`` list (it varies along
            the layers and by tensor name).
        yaml: the mergekit YAML key (defaults to ``name``).
        m3: M3 draws it: the mixup ratio multiplies it (weights) or replaces it.
        only: the one value streammerge supports (mergekit allows others), or None.
        affects_values: False for a mergekit option with no effect on the values
            (``int8_mask``: a memory layout).
        in_yaml: a mergekit YAML key (False for streammerge's own flags, ``drop``).
        integer: a ``number`` that must be a whole number (karcher's ``max_iter``).
        help: one line for ``--help``, the docs table and the model card.
    """

    name: str
    kind: str = "number"
    default: float | bool | None = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    per_model: bool = True
    layered: bool = True
    yaml: str = ""
    m3: bool = False
    only: bool | None = None
    affects_values: bool = True
    in_yaml: bool = True
    help: str = ""
    integer: bool = False

    @property
    def key(self) -> str:
        """The mergekit YAML key."""
        return self.yaml or self.name

    @property
    def flag(self) -> str:
        """The CLI flag (``--weights`` for the per-model weight, else ``--<name>``)."""
        return "--weights" if self.name == "weight" else "--" + self.name.replace("_", "-")

    def with_default(self, default) -> Param:
        """This parameter with another default (``normalize`` differs by method)."""
        return replace(self, default=default)

    def range_text(self) -> str:
        """``0 < density <= 1``, ``gamma >= 0``, or "" when unbounded."""
        lo = "" if self.lo is None else f"{_num(self.lo)} {'<' if self.lo_open else '<='} "
        hi = "" if self.hi is None else f" {'<' if self.hi_open else '<='} {_num(self.hi)}"
        return f"{lo}{self.name}{hi}" if lo or hi else ""

    def check(self, value, where: str):
        """``value`` (already resolved for one tensor) checked and converted.

        Returns:
            float (``number``) or bool.

        Raises:
            RecipeError: not a finite number / not true or false, out of range, or not the
                one supported value; the message starts with ``where`` (the recipe key).
        """
        if self.kind == "bool":
            if not isinstance(value, bool) and value not in (0.0, 1.0):
                raise RecipeError(f"{where}: {self.name} must be true or false, got {value}",
                                  where)  # fmt: skip
            value = bool(value)
            if self.only is not None and value != self.only:
                raise RecipeError(f"{where}: {self.name}: {str(value).lower()} is not "
                                  "supported", where)  # fmt: skip
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):  # fmt: skip
            raise RecipeError(f"{where}: must be a finite number, got {value!r}", where)
        v = float(value)
        low = self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo)
        high = self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi)
        if low or high:
            raise RecipeError(f"{where}: {self.name} {v} must satisfy {self.range_text()}", where)
        if self.integer and not v.is_integer():
            raise RecipeError(f"{where}: {self.name} must be a whole number, got {v}", where)
        return v


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


# The parameters of mergekit 0.1.5's task-vector methods (merge_methods/generalized_task_
# arithmetic.py), with streammerge's names. A method module takes the ones it uses.
WEIGHT = Param("weight", default=1.0, m3=True,
               help="contribution weight w_j of each fine-tune (M3 multiplies it by the "
               "mixup ratio m_j)")  # fmt: skip
DENSITY = Param("density", default=1.0, lo=0.0, lo_open=True, hi=1.0,
                help="fraction rho of each task vector kept")  # fmt: skip
DROP = Param("drop", default=None, lo=0.0, hi=1.0, hi_open=True, in_yaml=False,
             help="DARE drop rate p (streammerge's; default 1 - density, or 0.5 when neither "
             "is given)")  # fmt: skip
GAMMA = Param("gamma", default=0.01, lo=0.0, hi=1.0, hi_open=True,
              help="breadcrumbs: fraction of the largest magnitudes removed")  # fmt: skip
SCALE = Param("scale", default=1.0, per_model=False, yaml="lambda",
              help="scaling coefficient s of the mixed task vector (mergekit's lambda)")
NORMALIZE = Param("normalize", kind="bool", default=False, per_model=False,
                  help="divide by the sum of the weights that took part")  # fmt: skip
RESCALE = Param("rescale", kind="bool", default=True, per_model=False, layered=False,
                only=True, help="DARE: rescale kept values by 1/(1-p) (only true)")  # fmt: skip
INT8_MASK = Param("int8_mask", kind="bool", default=False, per_model=False, layered=False,
                  affects_values=False, help="mergekit's mask storage (no effect on the "
                  "values)")  # fmt: skip
