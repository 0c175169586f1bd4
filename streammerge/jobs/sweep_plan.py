"""``streammerge sweep --plan``: every check of a real sweep, the draws and the shared merge's
plan (``streammerge.dryrun``), nothing written."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from streammerge.api_types import Options
from streammerge.io.paths import real
from streammerge.jobs.sweep import plan_sweep, sweep_layout


#: Format tag of ``streammerge sweep --plan --json``.
SWEEP_PLAN_FORMAT = "streammerge-sweep-plan/1"


def describe_sweep(
    models: Sequence[str | Path],
    base: str | Path | None,
    out: str | Path,
    *,
    draws: int = 8,
    grid: bool = False,
    alpha: float = 1.0,
    seed: int | None = None,
    sweep_seed: int | None = None,
    evaluate=None,
    keep: str = "best",
    options: Options | None = None,
    geometry=None,
    device: str = "cpu",
    measure_read: bool = True,
    **recipe_args,
) -> dict:
    """The dry run of a sweep (``streammerge sweep --plan``): every check of a real sweep,
    nothing written (the output directory is not created).

    Args:
        as ``sweep``; geometry: the engine's buffer geometry (``depth``,
        ``max_chunk_elems``; default the CPU's), device: ``cpu`` or ``cuda``;
        measure_read: time a short read of the largest input (``dryrun.describe``).

    Returns:
        A JSON-serializable dict: ``format`` (SWEEP_PLAN_FORMAT), the sweep's ``output``,
        ``draws``, ``grid``, ``alpha``, ``seed``, ``sweep_seed``, ``keep``, ``repeat`` (the
        command that makes this very sweep), ``outputs`` (name, dir, weights, λ, command of
        each of the K + 1), ``bytes_read`` (once, for all), ``bytes_written`` (all outputs),
        ``disk_bytes`` (``peak_disk_bytes``) and ``merge``: ``dryrun.describe`` of the shared
        merge with the sweep's buffer layout (its w is per output, so left out there).

    Raises:
        MergeError / RecipeError / OptionError: as ``sweep``.
    """
    from streammerge import dryrun
    from streammerge.exec.backends import CPU_GEOMETRY
    from streammerge.exec.layout import STAGING_BLOCKS

    options = options or Options()
    pl = plan_sweep(models, base, out, draws, grid, alpha, seed, sweep_seed, keep, evaluate, options,
               recipe_args)  # fmt: skip
    layout = sweep_layout(pl.preps, geometry or CPU_GEOMETRY, options)
    merge = dryrun.describe(pl.preps[0], layout, measure_read, device)
    merge.update(output=str(real(pl.out)), mixup=None, bytes_written=merge["bytes_written"]
                 * len(pl.preps))  # fmt: skip
    merge["lambda"] = None
    merge["resolved"].pop("w", None)
    for g in merge["groups"]:
        for entry in g["params"]:
            entry.pop("w", None)
    merge["memory"].update(outputs=layout.outputs,
                           staging_bytes=layout.outputs * STAGING_BLOCKS * layout.block_bytes)  # fmt: skip
    return {
        "format": SWEEP_PLAN_FORMAT,
        "output": str(real(pl.out)),
        "draws": draws,
        "grid": grid,
        "alpha": None if grid else alpha,
        "seed": pl.seed,
        "sweep_seed": pl.sweep_seed,
        "keep": keep,
        "repeat": pl.command,
        "outputs": [{"name": d.name, "dir": str(d.dir), "weights": list(d.weights),
                     "lambda": d.lam, "command": d.command} for d in pl.rows],  # fmt: skip
        "bytes_read": merge["bytes_read"],
        "bytes_written": merge["bytes_written"],
        "disk_bytes": pl.disk_bytes,
        "merge": merge,
    }


def format_sweep_plan(d: dict) -> str:
    """``describe_sweep``'s dict as plain text: the draws, then the shared merge's plan
    (``dryrun.format_plan``)."""
    from streammerge.dryrun import format_plan
    from streammerge.sizes import format_bytes

    how = "evenly spaced λ" if d["grid"] else f"drawn with α {d['alpha']:g}"
    lines = [
        f"streammerge sweep plan: {d['draws']} draws ({how}) and the fixed reference, sweep "
        f"seed {d['sweep_seed']}, mask seed {d['seed']}, --keep {d['keep']} -> {d['output']} "
        "(nothing written by --plan)"
    ]
    for o in d["outputs"]:
        w = f"λ {o['lambda']!r}" if o["lambda"] is not None else \
            "w (" + ", ".join(f"{x:.6g}" for x in o["weights"]) + ")"  # fmt: skip
        lines.append(f"  {o['name']}: {w}")
    n = len(d["outputs"])
    lines.append(
        f"  one read of {format_bytes(d['bytes_read'])} for all {n} outputs; "
        f"{format_bytes(d['bytes_written'])} written; disk needed at the peak (all {n} "
        f"outputs at once, before --keep best removes any): {format_bytes(d['disk_bytes'])}"
    )
    lines.append(f"  this sweep again: {d['repeat']}")
    lines.append("the shared merge (each output as this, with its own w):")
    return "\n".join(lines) + "\n" + format_plan(d["merge"])
