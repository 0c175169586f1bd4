"""Merge methods as rows of one table (docs/SPEC.md "Methods"; mergekit's method table).

A method is a configuration of shared parts: a **sparsifier** (how each task vector is
thinned), a **consensus** (how the thinned task vectors are combined), whether the result
is **normalized** by the weights by default, and whether it needs the **base**. M3 is not a
method: it is the weighting (the mixup ratio λ ~ Beta(α, α), Dirichlet for N > 2) and
plugs into every row. Execution follows the row: a sparsifier with ``stats`` passes gets the
histogram passes before the elementwise pass; its ``window`` kind says how the thresholds
become the kernel's keep window.

| method           | base | sparsifier  | consensus | normalize | source                          |
|------------------|------|-------------|-----------|-----------|---------------------------------|
| linear           | no   | none        | none      | true      | Model soups, arXiv 2203.05482   |
| task_arithmetic  | yes  | none        | none      | false     | Task Arithmetic, arXiv 2212.04089 |
| dare_linear      | yes  | dare        | none      | false     | DARE, arXiv 2311.03099          |
| ties             | yes  | magnitude   | sign      | true      | TIES-Merging, arXiv 2306.01708  |
| dare_ties        | yes  | dare        | sign      | false     | DARE + TIES                     |
| breadcrumbs      | yes  | breadcrumbs | none      | false     | Model Breadcrumbs, arXiv 2312.06795 |
| breadcrumbs_ties | yes  | breadcrumbs | sign      | false     | Breadcrumbs + TIES              |
"""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass(frozen=True)
class Method:
    """One row of the method table.

    Attributes:
        name: the method's name (mergekit's name for the same method).
        uses_base: False only for ``linear`` (a weighted mean of the models themselves).
        sparsifier: a key of SPARSIFIERS.
        consensus: ``none`` (sum) or ``sign`` (TIES sign election).
        normalize: default of ``normalize`` (divide by the sum of the weights that took part).
        source: the paper the rule comes from.
    """

    name: str
    uses_base: bool
    sparsifier: str
    consensus: str
    normalize: bool
    source: str

    @property
    def sparse(self) -> Sparsifier:
        """The sparsifier row."""
        return SPARSIFIERS[self.sparsifier]


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("linear", False, "none", "none", True, "Model soups, arXiv 2203.05482"),
        Method("task_arithmetic", True, "none", "none", False, "Task Arithmetic, arXiv 2212.04089"),
        Method("dare_linear", True, "dare", "none", False, "DARE, arXiv 2311.03099"),
        Method("ties", True, "magnitude", "sign", True, "TIES-Merging, arXiv 2306.01708"),
        Method("dare_ties", True, "dare", "sign", False, "DARE arXiv 2311.03099 + TIES"),
        Method("breadcrumbs", True, "breadcrumbs", "none", False, "Breadcrumbs, arXiv 2312.06795"),
        Method("breadcrumbs_ties", True, "breadcrumbs", "sign", False, "Breadcrumbs + TIES"),
    )
}

#: The method when none is named (SPEC v2: v1's command lines keep their bytes).
DEFAULT_METHOD = "dare_linear"
#: Trim populations (SPEC v2): per tensor (mergekit), or every merged tensor of a fine-tune.
TRIM_SCOPES = ("tensor", "model")


def get_method(name: str) -> Method:
    """The row named ``name``.

    Raises:
        ValueError: an unknown method (the message lists the table).
    """
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown merge method {name!r}; streammerge has {', '.join(METHODS)}"
        ) from None
