"""``streammerge.merge``: the whole job as one Python call, in three small stages that a
sweep or a distributed runner reuse:

- ``prepare``: recipe + plan from headers alone, output location checked (no weight I/O);
- ``execute``: stream any subset of the output shards (and, for trim_scope model, the
  whole model's thresholds first);
- ``finalize``: index, ``streammerge.json``, side files, then the atomic rename.

The CLI only builds a ``Recipe`` and ``Options`` and calls these.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from streammerge import __version__
from streammerge.api_types import (
    OPTION_KEYS,
    RECIPE_KEYS,
    RECORD_FORMAT,
    MergeSummary,
    Options,
    Prepared,
    Provenance,
)
from streammerge.errors import MergeError, OptionError
from streammerge.exec.choose import make_backend
from streammerge.exec.layout import Layout, analysis_items, make_layout, read_bytes, work_items
from streammerge.exec.pipeline import RunStats, analyze, run
from streammerge.io.inputs import input_record, is_remote, open_input, resolve_output
from streammerge.io.lora import adapter_paths
from streammerge.io.reader import INDEX_FILE, ModelDir
from streammerge.output.outdir import OutputDir
from streammerge.output.side_files import copy_side_files
from streammerge.plan.checks import check_merge_args, check_run_args
from streammerge.plan.plan_types import Plan, ShardPlan
from streammerge.plan.planner import make_plan
from streammerge.plan.slices import plan_slices
from streammerge.recipe.dtypes import normalize_dtype
from streammerge.recipe.recipe import Recipe, RecipeError, build_recipe
from streammerge.recipe.slices import SliceRecipe
from streammerge.sizes import parse_size
from streammerge.sysinfo import peak_rss_bytes


def fingerprint(prep: Prepared) -> str:
    """Hash of everything that decides the output bytes (journal check for --resume).

    It covers the headers (names, dtypes, shapes, offsets), not the weights' bytes: those
    are checked per finished shard by ``OutputDir`` (file identity, and the xxh3 of the
    tensors the shard used, re-read when the identity changed; for an input by URL the
    identity is its size and ETag), so a changed input loses only the shards it fed.
    """
    inputs = ([prep.base] if prep.base is not None else []) + prep.models
    blob = json.dumps(
        {
            "version": __version__,
            "recipe": asdict(prep.recipe),
            "inputs": [m.fingerprint for m in inputs],
            "shard_size_bytes": prep.shard_size_bytes,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def record(prep: Prepared, shards: list[dict], thresholds: dict[str, list]) -> dict:
    """The ``streammerge.json`` content (docs/SPEC.md "What streammerge.json records").

    v1's keys keep their meaning (``weights`` and ``drop`` as resolved for a tensor without
    per-tensor values); ``tensors`` holds every merged tensor's resolved parameters and
    thresholds, so any tensor can be recomputed from the inputs and this file alone.
    """
    r, plan = prep.recipe, prep.plan
    tp0 = r.tensor_params("")
    tensors = {}
    stats = r.row.sparse.stats
    for t in plan.tensors:
        if t.action != "merge":
            continue
        rec = t.params.record()
        rec["thresholds"] = thresholds.get(t.name) if stats else [None] * r.n_models
        tensors[t.name] = rec
    base = prep.base
    return {
        "format": RECORD_FORMAT,
        "spec": "streammerge merge contract v2 (docs/SPEC.md)",
        "version": __version__,
        "method": r.method,
        "trim_scope": r.trim_scope,
        "seed": r.seed,
        "alpha": r.alpha,
        "lambda": r.lam,
        "mixup": list(r.mixup) if r.mixup is not None else None,
        "weights": list(tp0.w),
        "drop": list(tp0.drop) if tp0.drop is not None else [0.0] * r.n_models,
        "scale": tp0.scale,
        "normalize": tp0.normalize,
        "resolved": tp0.record(),
        "dtype": r.dtype,
        "recipe": r.record(),
        "base": None if base is None else input_record(base),
        "models": [input_record(m) for m in prep.models],
        "base_only": list(plan.base_only),
        "vocab_rules": list(plan.vocab_rules),
        "total_size": plan.total_bytes,
        "shards": shards,
        "tensors": tensors,
    }


def model_card_text(prep: Prepared, rec: dict) -> str:
    """The output's README.md (``streammerge.output.model_card``): front matter, what was merged
    and how, the recipe, the drawn λ and seed, and the one command that repeats it."""
    import shlex

    from streammerge.output import model_card

    prov = prep.provenance
    out = model_card.OUT_PLACEHOLDER  # the card must not depend on where the output lies
    labels = list(prov.labels) or None
    command = prov.command
    if command is not None:
        argv = shlex.split(command)
        for i, a in enumerate(argv):
            if a in ("-o", "--output") and i + 1 < len(argv):
                argv[i + 1] = out
            elif a.startswith(("-o=", "--output=")):
                argv[i] = a.split("=", 1)[0] + "=" + out
        command = model_card.publishable(shlex.join(argv), rec, labels)
    else:
        try:
            command = model_card.repeat_command(rec, out, prep.shard_size_bytes)
        except ValueError:  # values only a recipe can express
            command = f"streammerge --config RECIPE.yml -o {out}"
    recipe_yaml = prov.recipe_yaml
    if recipe_yaml is not None:
        recipe_yaml = model_card.publishable(recipe_yaml, rec, labels)
    return model_card.render(rec, command, recipe_yaml=recipe_yaml, labels=labels)


def prepare(
    models: Sequence[str | Path],
    base: str | Path | None,
    out: str | Path,
    recipe: Recipe | dict | None = None,
    options: Options | None = None,
    provenance: Provenance | None = None,
    *,
    preflight: bool = True,
    copy_only: bool = False,
) -> Prepared:
    """Plan a merge from headers alone and check its output location (no weight is read,
    nothing is written).

    Args:
        models: N >= 2 fine-tune directories (model j in this order).
        base: the base model directory (None allowed for ``linear``).
        out: output directory.
        recipe: a Recipe, or ``build_recipe`` keyword arguments (then a resumed merge
            reuses the interrupted run's seed when none is given).
        options: Options (defaults when None).
        preflight: check the output location now (``preflight_output``); False leaves it
            to the caller (a sweep, whose directory holding the outputs is made later).
        copy_only: plan every tensor as a ``copy`` of the base's bytes, the fine-tunes
            contributing none (``apply-lora``: an adapted base written alone).

    Raises:
        MergeError: bad inputs, output location or recipe values (one line each);
        RecipeError (a ValueError): bad recipe arguments.
    """
    options = options or Options()
    slices = recipe.get("slices") if isinstance(recipe, dict) else recipe
    if isinstance(slices, SliceRecipe):  # layer slices: their own plan (plan/slices.py)
        return _prepare_slices(models, base, out, slices, options, provenance, preflight)
    if isinstance(recipe, dict):
        known = ("alpha", "lam", "weights", "drop", "scale", "seed", "dtype")
        checked = {k: recipe[k] for k in known if recipe.get(k) is not None}
    else:
        checked = {}
    # types and ranges of every argument (at least 2 models); base may be None (linear)
    check_merge_args(models, base if base is not None else out, out, **checked,
                     **asdict(options))  # fmt: skip
    kwargs = dict(recipe or {}) if not isinstance(recipe, Recipe) else None
    method = recipe.method if isinstance(recipe, Recipe) else kwargs.get("method")
    base_dir, model_dirs, output = _open_inputs(models, base, out, options)
    shard_size_bytes = parse_size(options.shard_size)
    memory_bytes = parse_size(options.memory)
    if kwargs is not None:
        if kwargs.get("seed") is None:
            kwargs["seed"] = output.journal_seed()
        for k in ("dtype", "compute_dtype"):  # docs/SPEC.md "Working dtype (v3)"
            if kwargs.get(k) is not None:
                kwargs[k] = normalize_dtype(kwargs[k])
        recipe = build_recipe(len(model_dirs), **kwargs)
    elif recipe.n_models != len(model_dirs):
        raise RecipeError(f"the recipe is for {recipe.n_models} models, got {len(model_dirs)}")
    if base_dir is not None and recipe.row.base_optional and not recipe.with_base:
        recipe = replace(recipe, with_base=True)  # nuslerp, multislerp: the task vectors, base added back
    if base_dir is not None and recipe.row.base_unsupported:  # as the CLI's --base
        raise OptionError(f"method {recipe.method} with a base is not supported yet",
                          "leave out the base")  # fmt: skip
    if base_dir is None and recipe.row.uses_base:
        raise OptionError(f"method {method or recipe.method} needs a base model",
                          "pass --base DIR (the model the fine-tunes were tuned from)")  # fmt: skip
    plan_models = [ModelDir(base_dir.path, [], {}, "") for _ in model_dirs] if copy_only \
        else model_dirs  # fmt: skip
    plan = make_plan(base_dir, plan_models, recipe, shard_size_bytes)
    if provenance is not None and provenance.tokenizer_model is not None:
        plan = replace(plan, tokenizer_model=provenance.tokenizer_model)  # tokenizer_source
    prep = Prepared(recipe, plan, base_dir, model_dirs, output, options, shard_size_bytes,
                    memory_bytes, provenance or Provenance())  # fmt: skip
    if preflight:
        preflight_output(prep)
    return prep


def _open_inputs(models, base, out, options: Options) -> tuple[ModelDir | None, list, OutputDir]:
    """The base (or None) and the models opened (headers validated), and the output's
    ``OutputDir`` (nothing checked or written yet)."""
    timeout = float(options.http_timeout)
    base_dir = open_input(base, timeout) if base is not None else None
    model_dirs = [open_input(m, timeout) for m in models]
    inputs = [m.path for m in ([base_dir] if base_dir else []) + model_dirs if not is_remote(m)]
    inputs += adapter_paths(([base_dir] if base_dir else []) + model_dirs)  # LoRA inputs
    output = OutputDir(
        resolve_output(out),
        inputs,
        overwrite=options.overwrite,
        resume=options.resume,
        allow_nonfinite=options.allow_nonfinite,
    )
    return base_dir, model_dirs, output


def _prepare_slices(models, base, out, recipe: SliceRecipe, options: Options,
                    provenance: Provenance | None, preflight: bool) -> Prepared:  # fmt: skip
    """``prepare`` for layer slices (``streammerge.plan.slices``): ``models`` are the
    recipe's distinct models in its order (one is enough); ``base`` (None allowed) only
    gives the config and tokenizer files. No weight is read, nothing is written.

    Raises:
        MergeError: as ``plan_slices``, or bad inputs / output location.
    """
    check_run_args(out, **asdict(options))
    if len(models) != len(recipe.labels):
        raise RecipeError(f"the slices recipe names {len(recipe.labels)} models, got {len(models)}")
    base_dir, model_dirs, output = _open_inputs(models, base, out, options)
    shard_size_bytes = parse_size(options.shard_size)
    plan = plan_slices(recipe, model_dirs, base_dir, shard_size_bytes)
    prep = Prepared(recipe, plan, base_dir, model_dirs, output, options, shard_size_bytes,
                    parse_size(options.memory), provenance or Provenance())  # fmt: skip
    if preflight:
        preflight_output(prep)
    return prep


def side_source(prep: Prepared) -> ModelDir:
    """The model whose config / tokenizer files the output gets: the base, else model 0."""
    return prep.base if prep.base is not None else prep.models[0]


def preflight_output(prep: Prepared) -> None:
    """Check ``prep``'s output location (``OutputDir.preflight``: paths, state, free disk
    space; plans the side files). Writes nothing.

    Raises:
        MergeError: see ``OutputDir``.
    """
    prep.output.preflight(prep.plan, side_source(prep), prep.models, prep.options.copy_files)


def open_output(prep: Prepared) -> dict[str, dict]:
    """Create or reopen the staging directory and its journal; returns the finished shards
    (``--resume``)."""
    if not prep.opened:
        prov = prep.provenance
        prep.output.card_provenance = {"command": prov.command, "labels": list(prov.labels),
                                       "recipe_yaml": prov.recipe_yaml}  # fmt: skip
        prep.done = prep.output.open(fingerprint(prep), prep.recipe.seed)
        prep.opened = True
        card = prep.output.card_provenance  # a resumed merge: the interrupted run's words
        if card is not None and isinstance(card.get("labels"), list):
            prep.provenance = replace(prov, command=card.get("command"),
                                      labels=tuple(card["labels"]),
                                      recipe_yaml=card.get("recipe_yaml"))  # fmt: skip
    return prep.done


def layout_for(prep: Prepared, engine) -> Layout:
    """The buffer layout of ``prep`` on ``engine`` within ``--memory``."""
    return make_layout(
        prep.plan,
        prep.recipe.n_models,  # the merge inputs (a slices recipe: per slice)
        prep.memory_bytes,
        engine.depth,
        getattr(engine, "max_chunk_elems", None),
        prep.options.threads,
    )


def execute(
    prep: Prepared,
    engine,
    shards: Sequence[ShardPlan] | None = None,
    on_start: Callable[[Plan, int], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> RunStats:
    """Stream ``shards`` (default: every shard not finished yet) into the staging directory.

    With trim_scope model the whole model's thresholds are computed first (two extra
    reads of the merged tensors, same buffers).

    Returns:
        RunStats of the run (thresholds of the tensors it merged included).
    """
    layout = layout_for(prep, engine)  # a budget too small fails before staging exists
    open_output(prep)
    todo = list(shards) if shards is not None else prep.todo()
    model_th = pre = None
    analysis = prep.plan.model_scope and bool(todo)
    total = read_bytes(work_items(prep.plan, todo, layout))
    if analysis:
        total += read_bytes(analysis_items(prep.plan, layout))
    if on_start is not None and not prep.output.finished:  # a finished output: nothing starts
        on_start(prep.plan, total)
    if analysis:
        model_th, pre = analyze(prep.plan, layout, engine, on_bytes, prep.options.direct_io)
    stats = run(prep.plan, todo, prep.output, layout, engine, on_bytes=on_bytes,
                direct_io=prep.options.direct_io, model_thresholds=model_th)  # fmt: skip
    if model_th is not None:
        stats.thresholds = prep.plan.per_tensor(model_th)
        stats.bytes_read += pre.bytes_read
        stats.buffer_bytes = max(stats.buffer_bytes, pre.buffer_bytes)
        for k, v in pre.busy_s.items():
            stats.busy_s[k] = stats.busy_s.get(k, 0.0) + v
    return stats


def finalize(prep: Prepared, stats: RunStats) -> MergeSummary:
    """Write the index, ``streammerge.json`` and side files, then rename the staging
    directory into place (the output appears whole or not at all)."""
    plan, output = prep.plan, prep.output
    done = prep.done
    shards = []
    thresholds = dict(stats.thresholds)
    for s in plan.shards:
        if s.filename in stats.shards:
            size, sha = stats.shards[s.filename]
        else:
            size, sha = done[s.filename]["size"], done[s.filename]["sha256"]
            thresholds.update(done[s.filename].get("thresholds", {}))
        shards.append({"file": s.filename, "size_bytes": size, "sha256": sha})
    if plan.model_scope and not stats.thresholds:
        raise MergeError("the model's thresholds were not computed", None, None, "re-run")
    try:
        weight_map = {t.name: s.filename for s in plan.shards for t in s.tensors}
        index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": weight_map}
        output.write_file(INDEX_FILE, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
        if prep.options.copy_files:
            copy_side_files(output, plan, side_source(prep), prep.models)
        rec = record(prep, shards, thresholds)
        rec.update(output.record_extra())
        rec.update(prep.record_extra)
        output.write_file(
            "streammerge.json", (json.dumps(rec, indent=2, sort_keys=True) + "\n").encode()
        )
        card = prep.card(rec) if prep.card is not None else model_card_text(prep, rec)
        output.write_file("README.md", card.encode())
        output.finish()
    finally:
        output.close()
    seconds = time.perf_counter() - prep.t0
    r = prep.recipe
    tp0 = r.tensor_params("")
    return MergeSummary(
        out=output.out,
        seed=r.seed,
        method=r.method,
        alpha=r.alpha,
        weights=tp0.w,
        drop=tp0.drop or (),
        scale=tp0.scale,
        bytes_read=stats.bytes_read,
        bytes_written=stats.bytes_written,
        seconds=seconds,
        gb_per_s=stats.bytes_read / seconds / 1e9 if seconds > 0 else 0.0,
        peak_rss_bytes=peak_rss_bytes(),
        mixup=r.mixup,
        buffer_bytes=stats.buffer_bytes,
        memory_bytes=prep.memory_bytes,
        shards=shards,
        resumed_shards=len(done),
        base_only=plan.base_only,
        vocab_rules=plan.vocab_rules,
        stage_seconds=stats.busy_s,
        already_complete=output.finished,
    )


def merge(
    models: Sequence[str | Path],
    base: str | Path | None,
    out: str | Path,
    *,
    recipe: Recipe | None = None,
    options: Options | None = None,
    on_start: Callable[[Plan, int], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    provenance: Provenance | None = None,
    **kwargs,
) -> MergeSummary:
    """Merge fine-tunes ``models`` of ``base`` into ``out`` (docs/SPEC.md): prepare ->
    execute -> finalize.

    The recipe is ``recipe``, or built from keyword arguments (``streammerge.recipe.recipe.
    build_recipe``): method (``dare_linear`` by default, as v1), seed, alpha (M3's Beta /
    Dirichlet concentration), lam (fixed λ), weights, density, drop, gamma (one value or
    one per model, or a ``"0.3,0.6"`` string), scale, normalize, trim_scope, dtype. The
    options are ``options``, or keyword arguments of ``Options`` (shard_size, memory,
    threads, backend, device, vram, overwrite, resume, copy_files, direct_io).

    Example: ``merge(["a/", "b/"], "c/", "out/", method="ties", density=0.2, alpha=1.0)``.

    Args:
        on_start: called with (plan, bytes to read) before streaming starts.
        on_bytes: called with input bytes done, as the work progresses.

    Returns:
        MergeSummary.

    Raises:
        MergeError: bad input or output location (before any byte is written where it can
            be known then); RecipeError (a ValueError): bad recipe or option arguments.
    """
    for name, fn in (("on_start", on_start), ("on_bytes", on_bytes)):
        if fn is not None and not callable(fn):
            raise OptionError(f"{name} must be callable or None, got {type(fn).__name__}")
    unknown = set(kwargs) - set(RECIPE_KEYS) - set(OPTION_KEYS)
    if unknown:
        raise RecipeError(f"merge() got unknown arguments {sorted(unknown)}")
    if recipe is not None and set(kwargs) & set(RECIPE_KEYS):
        raise RecipeError("give a recipe or recipe arguments, not both")
    if options is None:
        options = Options(**{k: v for k, v in kwargs.items() if k in OPTION_KEYS})
    spec = recipe if recipe is not None else {k: v for k, v in kwargs.items() if k in RECIPE_KEYS}
    prep = prepare(models, base, out, spec, options, provenance)  # writes nothing
    try:  # a GPU that cannot run (--vram above the free memory, no compiler): nothing written
        kernels = any(t.action != "copy" for t in prep.plan.tensors)  # else numba never loads
        engine = make_backend(options.backend, options.device, options.threads, options.vram,
                              preload=kernels)  # fmt: skip
    except BaseException:
        prep.output.close()
        raise
    try:
        stats = execute(prep, engine, on_start=on_start, on_bytes=on_bytes)
    except BaseException:
        prep.output.close()  # the lock goes; finished shards stay journaled for --resume
        raise
    return finalize(prep, stats)
