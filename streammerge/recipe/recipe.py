"""The recipe: the one input of the engine that decides the merged values.

The CLI flags, the Python API and a mergekit-style YAML recipe all build a ``Recipe``;
the planner resolves it per tensor (``Recipe.tensor_params``) into the numbers the kernels
use, and ``streammerge.json`` records both (docs/SPEC.md "Per-tensor parameters").

Parameter values follow mergekit's conventions (so YAML recipes carry over unchanged):
a value is a number or bool, a *gradient* (a list of numbers interpolated along the depth
of the network), or a list of ``{"filter": substring, "value": v}`` entries where the first
entry whose filter is a substring of the tensor name wins (an entry without a filter
matches every tensor). Per-model parameters take precedence over top-level ones.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from streammerge.methods.method import Method
from streammerge.methods.params import RecipeError
from streammerge.methods.registry import DEFAULT_METHOD, TRIM_SCOPES, all_params, get_method

#: DARE's drop rate when neither drop nor density is given: streammerge v1's default, kept
#: so v1 command lines give the same bytes (mergekit's density default is 1: no drop).
DEFAULT_DROP = 0.5
#: Layer index in the tensor names of common layouts (Llama/Mistral/Qwen ``model.layers.N.``,
#: BERT ``encoder.layer.N.``, GPT-2 ``h.N.``, GPT-NeoX ``layers.N.``, T5 ``block.N.``).
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


__all__ = ["Recipe", "RecipeError", "TensorParams", "build_recipe", "draw_mixup", "evaluate",
           "first_value"]


@dataclass(frozen=True)
class TensorParams:
    """The resolved parameters of one merged tensor (docs/SPEC.md "Per-tensor parameters").

    Attributes:
        w: contribution weight w_j of each fine-tune (float64; M3: m_j * weight_j).
        values: every other parameter the method declares that changes values, by recipe
            name: a tuple of N floats for a per-model one, a float or bool for a shared one
            (``density``, DARE's ``drop``, ``gamma``, ``scale``, ``normalize``, ...).
        compute: the working dtype D of the tensor (docs/SPEC.md "Working dtype (v3)"),
            set by the planner for the task-vector methods; None (float32) otherwise.
    """

    w: tuple[float, ...]
    values: tuple[tuple[str, object], ...] = ()
    compute: str | None = None

    def get(self, name: str, default=None):
        """The resolved value of parameter ``name``, or ``default`` when the method has none."""
        return next((v for k, v in self.values if k == name), default)

    @property
    def density(self) -> tuple[float, ...] | None:
        """rho_j of each fine-tune, or None when the sparsifier has no density."""
        return self.get("density")

    @property
    def drop(self) -> tuple[float, ...] | None:
        """DARE drop rate p_j actually used, or None for non-DARE methods."""
        return self.get("drop")

    @property
    def gamma(self) -> tuple[float, ...] | None:
        """breadcrumbs' gamma_j, or None."""
        return self.get("gamma")

    @property
    def scale(self) -> float:
        """Scaling coefficient s (1 for methods without one)."""
        return self.get("scale", 1.0)

    @property
    def normalize(self) -> bool:
        """Divide by the weights that took part."""
        return self.get("normalize", False)

    def record(self) -> dict:
        """The JSON record (``streammerge.json`` ``tensors`` entry, without thresholds): w,
        the shared values, then the per-model ones."""
        out: dict = {"w": list(self.w)}
        shared = [(k, v) for k, v in self.values if not isinstance(v, tuple)]
        out.update(shared)
        out.update((k, list(v)) for k, v in self.values if isinstance(v, tuple))
        if self.compute is not None:
            out["compute_dtype"] = self.compute
        return out


def first_value(scopes, key: str, name: str, t: float, lines: dict | None = None):
    """(value, where) of ``key`` for ``name`` at depth ``t``: the first of ``scopes`` ((mapping,
    recipe key), innermost first) that evaluates to a value (mergekit's ``ConfigReader``), else
    (None, ``key``); ``lines`` (key -> YAML line) annotate ``where``. Raises RecipeError."""
    for scope, where in scopes:
        if lines and where in lines:
            where = f"{where} (line {lines[where]})"
        if key in scope:
            v = evaluate(scope[key], name, t, where)
            if v is not None:
                return v, where
    return None, key


def evaluate(value, name: str, t: float, key: str):
    """A parameter value for the tensor ``name`` at depth ``t`` (mergekit's rules).

    Args:
        value: number / bool, gradient list of numbers, or list of ``{filter, value}``.
        name: the tensor's name; t: its position in [0, 1] along the layers (0 outside).
        key: the recipe key, for messages.

    Returns:
        float or bool, or None when a filter list matches nothing.

    Raises:
        RecipeError: a value of the wrong type.
    """
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Sequence) and not isinstance(value, str):
        if all(isinstance(v, Mapping) for v in value):
            for entry in value:
                filt = entry.get("filter")
                if filt is None or filt == "*" or str(filt) in name:
                    return evaluate(entry.get("value"), name, t, key)
            return None
        if value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return gradient(value, t)
        if value and all(isinstance(v, bool) for v in value):
            return value[int(t * (len(value) - 1))]  # mergekit: no interpolation of bools
        if not value:
            return None
    raise RecipeError(
        f"{key}: expected a number, a list of numbers (gradient) or a list of "
        f"{{filter, value}} entries, got {value!r}",
        key,
    )


def gradient(values: Sequence[float], t: float) -> float:
    """Linear interpolation of ``values`` (evenly spaced over [0, 1]) at ``t``, as mergekit's
    gradients: position ``t * (L - 1)``, between the two neighbouring values; the last value
    at ``t = 1``. Float64 throughout."""
    if len(values) == 1:
        return float(values[0])
    pos = t * (len(values) - 1)
    i = min(math.floor(pos), len(values) - 2)
    frac = pos - i
    return float(values[i]) * (1 - frac) + float(values[i + 1]) * frac


def layer_positions(names: Iterable[str]) -> dict[str, float]:
    """Depth position t of every tensor (mergekit's gradient coordinate).

    A tensor of layer i of n gets ``t = i / (n - 1)`` (``t = 1`` when n = 1); tensors outside
    the layers (embeddings, final norm, head) get ``t = 0``. n = largest layer index + 1.
    """
    idx = {}
    for name in names:
        m = LAYER_PATTERN.search(name)
        idx[name] = int(m.group(1)) if m else None
    present = [i for i in idx.values() if i is not None]
    n = max(present) + 1 if present else 0
    return {
        name: (0.0 if i is None else (1.0 if n == 1 else i / (n - 1))) for name, i in idx.items()
    }


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the merged values.

    Attributes:
        method: a key of ``streammerge.methods.registry.METHODS``.
        n_models: number of fine-tunes N.
        seed: 0 <= seed < 2**64; keys every DARE mask and the M3 draw.
        mixup: the mixup ratios m (M3 draw or ``--lambda``), or None when the weights are
            used as given; w_j(t) = m_j * weight_j(t).
        alpha: Beta / Dirichlet concentration when m was drawn, else None.
        lam: the fixed λ when ``--lambda`` gave m.
        models: per-model parameters (``weight``, ``density``, ``drop``, ``gamma``), each a
            value as ``evaluate`` accepts.
        params: top-level parameters (the same keys, plus ``scale`` and ``normalize``).
        trim_scope: ``tensor`` (mergekit) or ``model`` (the TIES / M3 papers' global trim).
        dtype: output dtype (safetensors string) of float tensors, or None (the base's).
        compute_dtype: the working dtype D of the task-vector methods (safetensors string,
            a YAML recipe's ``dtype:``), or None: promoted from each tensor's inputs
            (docs/SPEC.md "Working dtype (v3)").
        source: where the recipe came from (``cli``, ``api`` or the YAML path), for the card.
        lines: recipe key -> line of the YAML file it came from (for messages).
        with_base: a base given to a method whose base is optional (``Method.base_optional``).
    """

    method: str
    n_models: int
    seed: int
    mixup: tuple[float, ...] | None
    alpha: float | None
    lam: float | None
    models: tuple[dict, ...]
    params: dict = field(default_factory=dict)
    trim_scope: str = "tensor"
    dtype: str | None = None
    source: str = "api"
    lines: dict = field(default_factory=dict)
    compute_dtype: str | None = None
    with_base: bool = False

    @property
    def row(self) -> Method:
        """The method's row of the table (``Method.with_base`` when a base is given)."""
        return get_method(self.method).with_base(self.with_base)

    def lookup(self, j: int | None, key: str, name: str, t: float) -> tuple[object, str]:
        """``first_value`` of ``key`` for ``name`` at ``t`` (SPEC "Per-tensor parameters"): model
        ``j``'s own value (``j`` None: whole-merge), then the top level (slices: SliceScope)."""
        scopes = ((self.models[j] if j is not None else {}, f"models[{j}].parameters.{key}"),
                  (self.params, f"parameters.{key}"))  # fmt: skip
        return first_value(scopes, key, name, t, self.lines)

    def tensor_params(self, name: str, t: float = 0.0) -> TensorParams:
        """Resolve the parameters of tensor ``name`` at depth ``t`` (docs/SPEC.md): each
        parameter the method declares (``Method.params``), the recipe's value or the
        declared default, checked against the declared range (RecipeError, naming the recipe
        key). DARE's drop rate and density are one setting (``_dare_rates``).
        """
        row = self.row
        per_model: dict[str, list] = {p.name: [] for p in row.per_model if p.name != "weight"}
        w = self._weights(name, t) if row.takes("weight") else []
        for j in range(self.n_models):
            dare = self._dare_rates(j, name, t) if row.sparse.uses_drop else {}
            for key, values in per_model.items():
                if key in dare:
                    values.append(dare[key])
                    continue
                v, where = self.lookup(j, key, name, t)
                values.append(row.param(key).check(row.param(key).default if v is None else v,
                                                   where))  # fmt: skip
        shared = []
        for p in row.shared:
            if not p.affects_values:
                continue
            v, where = self.lookup(None, p.name, name, t)
            if p.m3 and row.m3 == "t" and self.mixup is not None:
                v, where = self.mixup[1], "the M3 draw"  # t = m_1 = 1 - lam (SPEC)
            if v is None and p.default is None:
                raise RecipeError(f"method {row.name} needs {p.key} (--{p.name}, or M3 "
                                  "draws it: --alpha)", p.key)  # fmt: skip
            v = p.check(p.default if v is None else v, where)
            if p.only is None:
                shared.append((p.name, v))
            if p.m3 and row.m3 == "t":
                w = [1.0 - v, v]  # the lerp weights of (model 0, model 1)
        row.check_across({**per_model, "weight": w} if w else per_model, name)
        kept = [(k, tuple(v)) for k, v in per_model.items() if row.param(k).only is None]
        return TensorParams(tuple(w), tuple(kept + shared))

    def _weights(self, name: str, t: float) -> list[float]:
        """w_j = m_j * weight_j(t) (M3), or weight_j(t), of every fine-tune.

        Raises:
            RecipeError: a weight that is not finite, or overflows with the mixup ratio.
        """
        w = []
        for j in range(self.n_models):
            weight, where = self.lookup(j, "weight", name, t)
            weight = self.row.param("weight").check(1.0 if weight is None else weight, where)
            w.append(weight * self.mixup[j] if self.mixup is not None else weight)
            if not math.isfinite(w[-1]):
                raise RecipeError(f"{where}: weight x mixup ratio overflows ({w[-1]})", where)
        return w

    def _dare_rates(self, j: int, name: str, t: float) -> dict[str, float]:
        """DARE's drop rate p_j and density rho_j = 1 - p_j of fine-tune ``j`` (SPEC v1):
        p as given, else 1 - density, else ``DEFAULT_DROP``.

        Raises:
            RecipeError: p outside [0, 1) (density 0 is p = 1), density outside (0, 1].
        """
        d, where = self.lookup(j, "density", name, t)
        p, pwhere = self.lookup(j, "drop", name, t)
        if p is None:
            p = DEFAULT_DROP if d is None else 1.0 - float(d)
            pwhere = where if d is not None else "drop"
        if not 0.0 <= p < 1.0:
            raise RecipeError(
                f"{pwhere}: DARE drop rate p = {p} (density {1 - p}) must satisfy 0 <= p < 1",
                pwhere,
            )
        d = 1.0 - float(p) if d is None else d
        return {"drop": float(p), "density": self.row.param("density").check(d, where)}

    def record(self) -> dict:
        """The recipe part of ``streammerge.json``."""
        return {
            "method": self.method,
            "seed": self.seed,
            "mixup": list(self.mixup) if self.mixup is not None else None,
            "alpha": self.alpha,
            "lambda": self.lam,
            "models": [dict(m) for m in self.models],
            "parameters": dict(self.params),
            "trim_scope": self.trim_scope,
            "dtype": self.dtype,
        } | ({} if self.compute_dtype is None else {"compute_dtype": self.compute_dtype})


def _finite(v, where: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RecipeError(f"{where}: must be a finite number, got {v!r}", where)


def draw_seed() -> int:
    """A fresh seed from the OS, in [0, 2**64)."""
    return secrets.randbits(64)


def draw_mixup(n_models: int, alpha: float, seed: int) -> tuple[float, ...]:
    """M3's mixup ratios (arXiv 2502.15434; docs/SPEC.md "Contribution weights").

    ``rng = numpy.random.default_rng(seed)``; N = 2: λ = ``rng.beta(α, α)``, m = (λ, 1 - λ);
    N > 2: m = ``rng.dirichlet([α] * N)``. One draw per merge.
    """
    rng = np.random.default_rng(seed)
    if n_models == 2:
        lam = float(rng.beta(alpha, alpha))
        return (lam, 1.0 - lam)
    return tuple(float(x) for x in rng.dirichlet([alpha] * n_models))


def _per_model(value, n: int, key: str) -> list:
    """One value for all models, or one per model (a list / ``"0.3,0.6"`` string)."""
    if value is None:
        return [None] * n
    if isinstance(value, str):
        try:
            parts = [float(x) for x in value.split(",")]
        except ValueError:
            raise RecipeError(f"--{key}: expected numbers separated by commas, got {value!r}", key)
        value = parts[0] if len(parts) == 1 else parts
    if isinstance(value, bool):
        raise RecipeError(f"--{key}: expected a number, got {value!r}", key)
    if isinstance(value, (int, float)):
        return [float(value)] * n
    if isinstance(value, Sequence):
        vals = list(value)
        if len(vals) != n:
            raise RecipeError(f"--{key} has {len(vals)} values for {n} models", key)
        for v in vals:
            _finite(v, f"--{key}")
        return [float(v) for v in vals]
    raise RecipeError(f"--{key}: expected a number or one per model, got {value!r}", key)


def build_recipe(
    n_models: int,
    *,
    method: str | None = None,
    seed: int | None = None,
    alpha: float | None = 1.0,
    lam: float | None = None,
    weights=None,
    trim_scope: str = "tensor",
    dtype: str | None = None,
    source: str = "api",
    compute_dtype: str | None = None,
    model_params: Sequence[Mapping] | None = None,
    params: Mapping | None = None,
    lines: Mapping | None = None,
    **values,
) -> Recipe:
    """A recipe from flag-style arguments (the CLI and ``streammerge.merge``).

    Weights: ``lam`` (N = 2) fixes m = (λ, 1 - λ); ``weights`` gives w directly; otherwise
    M3 draws m with ``alpha`` from ``seed`` (``alpha=None``: no draw, the configured weights
    are w, as in a mergekit recipe). ``values``: any parameter a method declares
    (``streammerge.methods``: ``density``, ``drop``, ``gamma``, ``scale``, ``normalize``,
    ...), None meaning not given; a per-model one takes one value for all models or one
    per model (list or ``"0.3,0.6"``). Without ``method`` the method is ``dare_linear``
    (v1: drop 0.5 unless given). ``compute_dtype``: the task-vector methods' working dtype D
    (a safetensors string; None: each tensor's promoted input dtype; docs/SPEC.md "Working
    dtype (v3)"). ``model_params`` / ``params``: per-model and top-level
    parameter values in mergekit's forms (gradients, filter lists; ``scale`` for
    mergekit's ``lambda``), as a YAML recipe gives them; flags given as well override them.

    Raises:
        RecipeError (a ValueError): N < 2 (or fewer than the method needs), an unknown
            method, parameter or trim scope, alpha <= 0, both lam and weights, lam with
            N != 2, lengths that disagree, a value out of range, a parameter the method does
            not use (e.g. ``--gamma`` with ties), a seed outside [0, 2**64).
    """
    if isinstance(n_models, bool) or not isinstance(n_models, int) or n_models < 2:
        raise RecipeError(f"need at least 2 fine-tunes, got {n_models}")
    method = method or DEFAULT_METHOD
    row = get_method(method)
    if n_models < row.min_models or (row.max_models is not None and n_models > row.max_models):
        want = (f"exactly {row.min_models}" if row.max_models == row.min_models
                else f"at least {row.min_models}")  # fmt: skip
        raise RecipeError(f"method {method} merges {want} models, got {n_models}")
    if trim_scope not in TRIM_SCOPES:
        raise RecipeError(f"--trim-scope must be tensor or model, got {trim_scope!r}", "trim_scope")
    seed = _checked_seed(seed)
    if model_params is not None and len(model_params) != n_models:
        raise RecipeError(f"model_params has {len(model_params)} entries for {n_models} models")
    given = {k: v for k, v in values.items() if v is not None}
    if weights is not None:
        given["weight"] = weights
    _check_flags_apply(row, given)
    if row.m3 == "t" and ("t" in given or "t" in (params or {})):
        if lam is not None:
            raise RecipeError("give t or --lambda, not both (M3's t is 1 - lambda)", "lambda")
        alpha = None  # t given: nothing to draw (as --weights for the weighted methods)
    mixup, alpha_used = _mixup_weights(n_models, lam, weights, row.m3_alpha(lam, alpha), seed)
    models = [dict(m) for m in model_params] if model_params else [{} for _ in range(n_models)]
    params: dict = dict(params or {})
    for key, val in given.items():
        if row.param(key).per_model:
            for j, v in enumerate(_per_model(val, n_models, row.param(key).flag[2:])):
                models[j][key] = v
        else:
            params[key] = row.param(key).check(val, row.param(key).flag)
    recipe = Recipe(method, n_models, seed, mixup, alpha_used,
                    None if lam is None else float(lam), tuple(models), params, trim_scope,
                    dtype, source, dict(lines or {}), compute_dtype)  # fmt: skip
    recipe.tensor_params("")  # constant values: every range check before any I/O
    return recipe


def _checked_seed(seed) -> int:
    """The mask seed as an int in [0, 2**64): ``seed`` checked, or drawn from the OS when None.

    Raises:
        RecipeError: not an integer, or out of range.
    """
    if seed is None:
        seed = draw_seed()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise RecipeError(f"--seed must be an integer, got {seed!r}", "seed")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise RecipeError(f"--seed must be in [0, 2**64), got {seed}", "seed")
    return seed


def _check_flags_apply(row: Method, given: Mapping) -> None:
    """Check that each parameter given as a flag is one the method declares.

    Raises:
        RecipeError: an unknown parameter, or one the method does not read (``--gamma``
            with ties; ``--scale`` with linear), naming the flag and the methods that take it.
    """
    known = all_params()
    for key in given:
        if key not in known:
            raise RecipeError(f"unknown parameter {key!r}; methods take "
                              f"{', '.join(sorted(known))}", key)  # fmt: skip
        if not row.takes(key):
            from streammerge.methods.registry import methods_taking

            raise RecipeError(f"{known[key].flag} does not apply to method {row.name} (it is "
                              f"for {', '.join(methods_taking(key))})", key)  # fmt: skip


def _mixup_weights(
    n_models: int, lam, weights, alpha, seed: int
) -> tuple[tuple[float, ...] | None, float | None]:
    """The mixup ratios m and the alpha they were drawn with: (λ, 1 - λ) and None for a
    fixed ``lam``; a draw from Beta / Dirichlet(``alpha``) with ``seed`` and ``alpha``;
    (None, None) with ``weights`` or ``alpha=None`` (the configured weights are w).

    Raises:
        RecipeError: both lam and weights, lam with N != 2, a lam not finite, an alpha
            that is not a number > 0.
    """
    if lam is not None and weights is not None:
        raise RecipeError("give --lambda or --weights, not both", "lambda")
    mixup = alpha_used = None
    if lam is not None:
        if n_models != 2:
            raise RecipeError(f"--lambda needs exactly 2 models, got {n_models}; use --weights")
        _finite(lam, "--lambda")
        mixup = (float(lam), 1.0 - float(lam))
    elif weights is None and alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise RecipeError(f"--alpha must be a number, got {alpha!r}", "alpha")
        if not (alpha > 0 and math.isfinite(alpha)):
            raise RecipeError(f"--alpha must be > 0, got {alpha}", "alpha")
        alpha_used = float(alpha)
        mixup = draw_mixup(n_models, alpha_used, seed)
    return mixup, alpha_used
