"""What a merge method is: one ``Method`` object that declares itself (docs/SPEC.md "Methods").

A method module (``streammerge/methods/<name>.py``) holds one ``METHOD = Method(...)``: its
parameters (``streammerge.methods.params.Param``), whether it needs the base, how M3 plugs
in, and the shape of its execution: a **sparsifier** (how each task vector is thinned; one
with ``stats`` gets the histogram passes before the elementwise pass) and a **consensus**
(how the thinned task vectors are combined). The planner turns that shape into the passes
of each tensor (``Method.passes``); ``streammerge.exec.ops`` into kernel arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from streammerge.methods.params import Param, RecipeError


@dataclass(frozen=True)
class Sparsifier:
    """How a task vector is thinned (SPEC v2 "Magnitudes and thresholds").

    Attributes:
        name: ``none``, ``dare``, ``magnitude`` or ``breadcrumbs``.
        stats: True when thresholds come from a statistics pass (histograms of magnitudes).
        uses_density: the rule reads ``density`` (rho_j); uses_gamma: it reads ``gamma_j``.
        uses_drop: DARE's random drop with rate p_j (= 1 - rho_j unless given directly).
    """

    name: str
    stats: bool
    uses_density: bool
    uses_gamma: bool
    uses_drop: bool


SPARSIFIERS: dict[str, Sparsifier] = {
    s.name: s
    for s in (
        Sparsifier("none", False, False, False, False),
        Sparsifier("dare", False, True, False, True),
        Sparsifier("magnitude", True, True, False, False),
        Sparsifier("breadcrumbs", True, True, True, False),
    )
}

#: The statistics pass of a row-wise method: each row's sums, added over the tensor before
#: the method's own pass (docs/SPEC.md "SLERP (v3)" "Tensor statistics").
ROW_DOTS = "row_dots"


@dataclass(frozen=True)
class RowPass:
    """One pass of a row-wise method over each chunk of whole rows of a tensor (the kernel
    table a backend looks a row-wise pass up in: ``registry.row_pass``).

    Attributes:
        name: the pass name, unique across methods (``row_dots``, ``slerp``, ...).
        cpu: ``cpu(inputs, out, a)``: the numba kernels on the slot. ``inputs``: numpy
            uint8 [rows, bytes] (row ``a.base_row`` the base, ``a.model_rows`` the
            models); ``out``: numpy uint8, the chunk's output bytes (``a.out_dtype``);
            ``a``: ``streammerge.exec.ops.RowArgs``.
        triton: ``triton(launch, inputs, out, a)``: the same with torch uint8 tensors and
            ``launch`` a ``streammerge.exec.triton_launcher.TritonLauncher``
            (``launch.typed``); None: ``cpu`` runs on the host under the Triton backends.
        accumulators: a statistics pass: ``accumulators(n_models) -> tuple`` of the zeroed
            arrays it adds into (``RowArgs.counts``; the same totals whatever the
            chunking), nothing written; None for the writing pass (the method's last).
        needed: a statistics pass that some tensors do not need: ``needed(params)`` (the
            tensor's ``TensorParams``) False skips it for that tensor, so a tensor that
            spans several chunks is not read for it; None: always run.
        live: a statistics pass that the statistics before it may make idle (karcher's
            rounds after they stop): ``live(a)`` (the pass's ``RowArgs``, with the sums so
            far) False once it would compute nothing. The compute stage decides it after
            the pass before it, and the reader, waiting for that, does not read an idle
            pass of a tensor that spans several chunks. None: always read.
    """

    name: str
    cpu: Callable
    triton: Callable | None = None
    accumulators: Callable | None = None
    needed: Callable | None = None
    live: Callable | None = None

    @property
    def is_stats(self) -> bool:
        """A statistics pass (it adds into accumulators and writes nothing)."""
        return self.accumulators is not None


def whole_tensor(a) -> bool:
    """Whether the chunk of ``a`` (``exec.ops.RowArgs``) is its whole tensor: the one-chunk
    tensors whose passes all run on one slot, which may hold values between them."""
    return a.start == 0 and a.count == math.prod(a.shape)


def held_units(inputs, a, work: str, stage: int, store_stage: int, marks: dict) -> int:
    """The ``held`` of a multi-pass row-wise kernel's pass (``kernels.common.checked_held``:
    multislerp, karcher). Only a tensor in one chunk, whose passes all run on the same slot
    one after the other, holds its unit vectors, and only where they fit over the model rows
    (``held_units_fit``): the pass ``store_stage`` stores them over the model rows and
    records the slot's address in ``marks`` (the tensor's, made afresh for each tensor);
    the passes after it read them when they run on that slot. Nothing else reads the rows
    again: a sweep, whose outputs would, refuses these methods (``Method.weighted_stats``).
    """
    from streammerge.kernels.common import HELD_UNITS, NO_HELD, STORE_UNITS, held_units_fit

    if stage < store_stage or not whole_tensor(a) \
            or not held_units_fit(work, a.dtypes, a.model_rows):  # fmt: skip
        return NO_HELD
    if stage == store_stage:
        marks[HELD_MARK] = inputs.ctypes.data
        return STORE_UNITS
    return HELD_UNITS if marks.get(HELD_MARK) == inputs.ctypes.data else NO_HELD


#: ``held_units``' key in its ``marks``: the address of the slot holding the unit vectors.
HELD_MARK = "held_units"

#: ``Method.with_base()`` of each optional-base method, by name (made once).
_WITH_BASE: dict = {}

#: How M3 plugs into a method: its mixup ratios multiply the weights (``weights``), the
#: mixup ratio m_1 is the interpolation factor ``t`` (two models), or the method has
#: nothing for M3 to draw (``none``).
M3_MODES = ("weights", "t", "none")


@dataclass(frozen=True)
class Method:
    """One merge method.

    Attributes:
        name: the method's name (mergekit's name for the same method).
        order: its place in tables and listings (smaller first).
        uses_base: False for methods that mix the models themselves (``linear``).
        sparsifier: a key of ``SPARSIFIERS``; consensus: ``none`` (sum) or ``sign`` (TIES
            sign election).
        params: the parameters it reads, each declared once (``Param``); the recipe
            accepts exactly these (and mergekit's other keys with a notice).
        m3: a key of ``M3_MODES``.
        summary: one line for ``--help`` and the docs table; source: the paper.
        min_models, max_models: fewest and most models it merges (None: no limit).
        row_passes: a row-wise method's passes over chunks of whole rows (``RowPass``):
            its statistics passes, each over the whole tensor, then its writing pass
            (docs/ARCHITECTURE.md "Adding a method"); () for the elementwise task-vector
            passes.
        row_block: elements per chunk unit of a row-wise method whose unit is a fixed
            block, not a row (model_stock: its statistics blocks), or None.
        row_unit: ``row_unit(shape, params) -> elements | None``: the chunk unit of one
            tensor from its resolved parameters (``TensorParams``), overriding
            ``row_block`` / the rows when not None (model_stock's ``filter_wise``: rows of
            the last dimension).
        last_dim_rows: a row-wise method whose rows are the last dimension (arcee_fusion:
            mergekit's softmax over ``dim=-1``; a 1-D tensor is one row), not ``shape[0]``.
        base_is_input: mergekit's ``base_model`` is one of the merged models (model 0, as
            slerp's ``v0``), not the origin of task vectors.
        working_dtype: ``float32`` (slerp) or ``inputs``: mergekit's op sequence in the
            working dtype (nearswap, ram, ramplus_tl, model_stock: a recipe's ``dtype:``,
            else the inputs' promoted dtype), resolved per tensor by the plan as for the
            task-vector methods (docs/SPEC.md "Working dtype (v3)").
        base_unsupported: mergekit takes a ``base_model`` that streammerge does not
            support (karcher: mergekit merges it as one more model): a recipe or ``--base``
            with one is refused instead of ignored.
        base_optional: mergekit takes an optional ``base_model`` that streammerge supports
            (nuslerp, multislerp: with one, the task vectors are merged and the base added
            back): the method is declared without a base (``uses_base`` False), and a
            recipe given a base runs ``with_base()`` (``Recipe.with_base``): the base read
            as slot row ``BASE_ROW``, ``RowArgs.base_row`` >= 0.
        slices_only: a method only a mergekit ``slices:`` recipe names (``passthrough``:
            layers stacked, nothing merged): not a ``--method`` choice nor a ``models:``
            recipe's method, and its parameters are no flags (``registry.METHODS`` leaves
            it out; ``registry.get_method`` finds it).
        vector_row: a 1-D tensor is one row of all its elements (della: mergekit's
            ``della_magprune`` ranks a vector as one row), not rows of one element.
        check_params: ``check_params(per_model) -> message | None``: a check across the
            per-model values of one tensor (name -> list of N; ``weight``: the w_j, M3
            applied), after each is checked against its own range (della: density +/-
            epsilon inside (0, 1); karcher: weights with a positive sum).
        plan_note: one line ``--plan`` prints under the method (karcher: how its rounds
            read the tensors), or "".
        weighted_stats: its statistics passes depend on the weights (multislerp's mean,
            karcher's rounds), so a sweep, whose draws share one read's statistics, cannot
            run it (``streammerge sweep`` refuses it in one line).
    """

    name: str
    order: int
    uses_base: bool
    sparsifier: str
    consensus: str
    params: tuple[Param, ...]
    summary: str
    source: str
    m3: str = "weights"
    min_models: int = 2
    max_models: int | None = None
    row_passes: tuple[RowPass, ...] = ()
    row_block: int | None = None
    row_unit: Callable | None = None
    last_dim_rows: bool = False
    base_is_input: bool = False
    slices_only: bool = False
    base_unsupported: bool = False
    base_optional: bool = False
    working_dtype: str = "float32"
    vector_row: bool = False
    check_params: Callable | None = None
    plan_note: str = ""
    weighted_stats: bool = False

    def __post_init__(self) -> None:
        if self.sparsifier not in SPARSIFIERS or self.consensus not in ("none", "sign"):
            raise ValueError(f"method {self.name}: unknown sparsifier or consensus")
        if self.m3 not in M3_MODES:
            raise ValueError(f"method {self.name}: m3 must be one of {M3_MODES}")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"method {self.name}: a parameter declared twice")
        if self.row_passes and (self.row_passes[-1].is_stats
                                or any(not p.is_stats for p in self.row_passes[:-1])):
            raise ValueError(f"method {self.name}: row passes are statistics passes, then "
                             "one writing pass")  # fmt: skip

    def with_base(self, given: bool = True) -> Method:
        """The method as it runs when a base is ``given``: for an optional base
        (``base_optional``) ``uses_base`` True, so the plan reads the base (and copies
        tensors only it has), the same object every call; else the method itself."""
        if not (given and self.base_optional):
            return self
        if self.name not in _WITH_BASE:
            _WITH_BASE[self.name] = replace(self, uses_base=True)
        return _WITH_BASE[self.name]

    @property
    def row_op(self) -> str | None:
        """A row-wise method's writing pass (its last ``RowPass``), or None."""
        return self.row_passes[-1].name if self.row_passes else None

    @property
    def row_stats(self) -> str | None:
        """A row-wise method's first statistics pass, or None (one pass)."""
        return self.row_passes[0].name if len(self.row_passes) > 1 else None

    @property
    def sparse(self) -> Sparsifier:
        """The sparsifier row."""
        return SPARSIFIERS[self.sparsifier]

    @property
    def normalize(self) -> bool:
        """The default of ``normalize`` (False when the method has no such parameter)."""
        p = self.param("normalize")
        return bool(p.default) if p is not None else False

    def check_across(self, per_model: dict, tensor: str) -> None:
        """``check_params`` on one tensor's per-model values.

        Raises:
            RecipeError: the check's message, naming the tensor.
        """
        if self.check_params is not None and (msg := self.check_params(per_model)):
            raise RecipeError(f"tensor {tensor}: {msg}", "parameters")

    def param(self, name: str) -> Param | None:
        """The declared parameter ``name`` (recipe name), or None."""
        return next((p for p in self.params if p.name == name), None)

    def takes(self, name: str) -> bool:
        """Whether the method reads the parameter ``name``."""
        return self.param(name) is not None

    @property
    def per_model(self) -> tuple[Param, ...]:
        """Its per-fine-tune parameters, in declaration order."""
        return tuple(p for p in self.params if p.per_model)

    @property
    def shared(self) -> tuple[Param, ...]:
        """Its whole-merge parameters, in declaration order."""
        return tuple(p for p in self.params if not p.per_model)

    def m3_alpha(self, lam, alpha):
        """M3's ``alpha`` for this method: as given, or None for a method with nothing for
        M3 to draw (``m3="none"``: ram, ramplus_tl; no mixup).

        Raises:
            RecipeError: such a method with ``--lambda`` or an ``--alpha`` other than its
                default (1.0).
        """
        if self.m3 != "none":
            return alpha
        if lam is not None or alpha not in (None, 1.0):
            raise RecipeError(f"method {self.name} has nothing for M3 to draw (no weights, "
                              f"no t): drop --{'lambda' if lam is not None else 'alpha'}",
                              "alpha")  # fmt: skip
        return None

    def pass_needed(self, name: str, params) -> bool:
        """Whether a tensor with these ``TensorParams`` needs the pass ``name`` (a row pass's
        ``needed``; every other pass: yes)."""
        for p in self.row_passes:
            if p.name == name and p.needed is not None:
                return bool(p.needed(params))
        return True

    def passes(self, trim_scope: str) -> tuple[str, ...]:
        """The passes over each merged tensor (``streammerge.exec.ops``): a row-wise
        method's ``row_passes`` (a tensor that fits one chunk is read once for all of them:
        ``streammerge.exec.layout.tensor_items``); else the statistics passes when
        thresholds are per tensor, then the elementwise ``merge``."""
        if self.row_passes:
            return tuple(p.name for p in self.row_passes)
        if self.sparse.stats and trim_scope == "tensor":
            return ("hist_high", "hist_low", "merge")
        return ("merge",)

