"""What a sweep leaves beside its outputs: ``SweepResult``, ``sweep.json`` (strict JSON),
``sweep.csv`` and ``sweep.png``."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from streammerge.jobs.draws import Draw
from streammerge.jobs.evaluate import finite_json


@dataclass
class SweepResult:
    """What a sweep did: the draws (the fixed reference last), the best draw's index, the
    seeds, and bytes/seconds of the one shared read."""

    out: Path
    draws: list[Draw]
    best: int | None
    seed: int
    sweep_seed: int
    bytes_read: int
    seconds: float
    peak_rss_bytes: int
    command: str = ""
    evaluated: bool = False

    @property
    def unscored(self) -> str | None:
        """Why no draw was scored although an evaluator ran (the first failing draw's name
        and error), else None. The CLI then exits with EXIT_NOTHING_SCORED."""
        if not self.evaluated or self.best is not None:
            return None
        failed = [d for d in self.draws[:-1] if d.error]
        return f"{failed[0].name}: {failed[0].error}" if failed else "no draw returned a score"


def write_results(result: SweepResult, n_models: int, method: str, keep: str) -> None:
    """``sweep.csv``, ``sweep.json`` and ``sweep.png`` in the sweep's output directory.

    ``sweep.csv``: one row per output; its columns name, lambda, weights, score, then one
    ``score:<key>`` column per named score (none for an evaluator printing a plain number),
    error, kept, command; a value that is not a finite number is an empty cell.
    ``sweep.json`` is strict JSON (``json.dumps(allow_nan=False)``; see ``Draw.record``).
    """
    out = result.out
    rows = result.draws
    named = [d.scores for d in rows if d.scores and d.scores != {"score": d.score}]
    names = sorted({k for s in named for k in s})
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "lambda", "weights", "score", *(f"score:{k}" for k in names),
                    "error", "kept", "command"])  # fmt: skip
        for d in rows:
            scores = finite_json(d.scores)[0]
            w.writerow([d.name, d.lam, " ".join(f"{x:.6g}" for x in d.weights), d.score,
                        *[scores.get(k) for k in names], d.error or "", d.dir.exists(),
                        d.command])  # fmt: skip
    doc = {
        "method": method,
        "seed": result.seed,
        "sweep_seed": result.sweep_seed,
        "keep": keep,
        "best": rows[result.best].name if result.best is not None else None,
        "best_command": rows[result.best].command if result.best is not None else None,
        "repeat": result.command,
        "no_draw_scored": result.unscored,
        "draws": [d.record() for d in rows[:-1]],
        "fixed": rows[-1].record(),
        "bytes_read": result.bytes_read,
        "seconds": result.seconds,
    }
    (out / "sweep.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    plot(result, n_models, out / "sweep.png")


def plot(result: SweepResult, n_models: int, path: Path) -> None:
    """Score against λ (N = 2, the fixed λ = 0.5 merge marked), or ranked scores (N > 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.draws
    draws, fixed = rows[:-1], rows[-1]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if n_models == 2:
        pts = [(d.lam, d.score) for d in draws if d.score is not None]
        if pts:
            ax.scatter(*zip(*pts), label="draws", color="tab:blue")
        if fixed.score is not None:
            ax.scatter([0.5], [fixed.score], marker="*", s=200, color="tab:orange", label="λ = 0.5")
        if result.best is not None:
            b = rows[result.best]
            ax.scatter([b.lam], [b.score], facecolors="none", edgecolors="red", s=200, label="best")
        ax.set_xlabel("mixup ratio λ (weight of model 0)")
        ax.set_xlim(-0.02, 1.02)
    else:
        ranked = sorted((d for d in draws if d.score is not None), key=lambda d: -d.score)
        ax.bar([d.name for d in ranked], [d.score for d in ranked], color="tab:blue")
        if fixed.score is not None:
            ax.axhline(fixed.score, color="tab:orange", linestyle="--", label="equal weights")
        ax.set_xlabel("draw (ranked)")
        ax.tick_params(axis="x", rotation=60)
    if not any(d.score is not None for d in rows):
        ax.text(0.5, 0.5, "no scores (no evaluator)", ha="center", transform=ax.transAxes)
    ax.set_ylabel("score")
    ax.set_title(f"streammerge sweep: {len(draws)} draws")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
