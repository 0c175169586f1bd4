"""The output's ``README.md``: a Hugging Face model card for a merge (issue 9 part 4).

``render(record, command)`` writes, from the ``streammerge.json`` record alone
(``api.record``):

1. YAML front matter in the Hugging Face style: ``base_model`` (the inputs, base first:
   Hub repo ids where known), ``base_model_relation: merge``, ``library_name:
   transformers``, ``tags: [merge, streammerge, <method>]``;
2. what was merged and how: the inputs, the method's row (sparsifier, consensus,
   normalize, paper), the weighting (the drawn λ or mixup ratios m, α, the seed), the
   resolved w / density / drop / gamma / scale / normalize, trim scope, dtype, the shards;
3. the recipe as YAML: the one given (``--config``), or the record's recipe in mergekit's
   form (``merge_method``, ``base_model``, ``models`` with ``parameters``, ``parameters``,
   ``dtype`` / ``out_dtype``, and a ``streammerge:`` block with ``seed``, ``mixup`` and
   (methods with magnitude thresholds) ``trim_scope``: the form ``streammerge.recipe.mergekit_yaml`` reads back; ``recipe_to_yaml``);
4. the one command that repeats the merge (``--seed`` appended when the command lacks it).

``repeat_command(record, out)`` builds such a command from the record alone (absolute
paths, every recipe value as a flag) for callers without a command line (the Python API).

Model names (``streammerge.output.model_names``): a path inside a Hugging Face cache
(``.../models--org--name/snapshots/<rev>``) is ``org/name``; else a label the recipe gave (a
repo id as written); else the directory name.
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import yaml

from streammerge.output.model_names import hf_repo_id, hub_id, model_name, model_ref  # noqa: F401
from streammerge.methods.registry import METHODS

#: Output dtype (safetensors string, as streammerge.json records it) -> mergekit's name.
MERGEKIT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
#: The same -> the ``--dtype`` flag value.
FLAG_DTYPES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
#: Where streammerge's contract lives (the card links it).
SPEC = "docs/SPEC.md"
M3_PAPER = "Mixup Model Merge (M3), arXiv 2502.15434"


def _inputs(record: dict, labels) -> list[tuple[str, str | None, str | None, str | None]]:
    """[(role, path or URL, label, _name_or_path)] with the base first when there is one."""
    ins = ([("base", record["base"])] if record.get("base") else []) + [
        (f"model {j}", m) for j, m in enumerate(record.get("models") or [])
    ]
    entries = [(role, m.get("path") or m.get("url"), m.get("label"), m.get("name_or_path"))
               for role, m in ins]  # fmt: skip
    labels = list(labels if labels is not None else record.get("labels") or [])
    if len(labels) == len(entries):
        entries = [(r, p, lab or lab0, n) for (r, p, lab0, n), lab in zip(entries, labels)]
    return entries


def _num(v):
    """A YAML-friendly number: ints stay ints, floats keep their exact repr."""
    if isinstance(v, bool) or not isinstance(v, float):
        return v
    return int(v) if v.is_integer() and abs(v) < 2**53 else v


def _clean(v):
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return _num(v)


def _density_for(p: float) -> float | None:
    """The density whose DARE drop rate ``1 - density`` is exactly ``p`` (float64), if any."""
    d = 1.0 - p
    return d if 1.0 - d == p else None


def recipe_to_yaml(record: dict, labels=None) -> str:
    """The record's recipe in mergekit's YAML form, with streammerge's own keys under
    ``streammerge:`` (``seed``, ``mixup`` as ``{alpha: A}`` or ``{lambda: L}``,
    ``trim_scope`` for methods with magnitude thresholds), followed by comments giving the drawn mixup ratios and the resolved
    weights.

    mergekit's names: the scale s is ``lambda`` under ``parameters``; the output dtype is
    ``out_dtype`` (computation is float32). DARE drop rates p are written as ``density: 1 -
    p`` when that gives every p back exactly (float64), else as streammerge's ``drop``
    (which mergekit does not know); a DARE recipe without either gets streammerge's default
    ``density: 0.5`` written out (mergekit's default would be 1.0), and a model without a
    weight gets the default ``weight: 1`` written out.
    """
    rec = record.get("recipe") or {}
    method = rec.get("method", record.get("method"))
    row = METHODS.get(method)
    entries = _inputs(record, labels)
    base = next(((p, lab, n) for r, p, lab, n in entries if r == "base"), None)
    fine = [(p, lab, n) for r, p, lab, n in entries if r != "base"]
    top = dict(rec.get("parameters") or {})
    uses_drop = row is not None and row.sparse.uses_drop
    given = rec.get("models") or []
    owns = [dict(given[j]) if j < len(given) else {} for j in range(len(fine))]
    drops = [o["drop"] for o in owns if "drop" in o]
    as_density = all(
        isinstance(p, (int, float))
        and not isinstance(p, bool)
        and _density_for(float(p)) is not None
        for p in drops
    ) and not any("density" in o for o in owns if "drop" in o)
    models = []
    for (path, label, name_or_path), own in zip(fine, owns):
        if "drop" in own and as_density:  # mergekit's form, when every p comes back exactly
            own["density"] = _density_for(float(own.pop("drop")))
        if uses_drop and not ({"density", "drop"} & (set(own) | set(top))):
            own["density"] = 0.5  # streammerge's DARE default (p = 0.5), explicit for mergekit
        if "weight" not in own and "weight" not in top:
            own["weight"] = 1.0  # the default weight, explicit (mergekit needs it for some methods)
        entry = {"model": model_ref(path, label, name_or_path)}
        order = [p.name for p in row.per_model] if row is not None else []
        params = {k: own[k] for k in order if k in own}
        params.update({k: v for k, v in own.items() if k not in params})
        if params:
            entry["parameters"] = params
        models.append(entry)
    doc: dict = {"merge_method": method}
    if base is not None:
        doc["base_model"] = model_ref(*base)
    doc["models"] = models
    params = {("lambda" if k == "scale" else k): v for k, v in top.items()}
    if params:
        doc["parameters"] = params
    dtype = rec.get("dtype", record.get("dtype"))
    if dtype is not None:
        doc["dtype"] = "float32"
        doc["out_dtype"] = MERGEKIT_DTYPES.get(dtype, str(dtype).lower())
    sm: dict = {"seed": rec.get("seed", record.get("seed"))}
    if rec.get("lambda") is not None:
        sm["mixup"] = {"lambda": rec["lambda"]}
    elif rec.get("alpha") is not None:
        sm["mixup"] = {"alpha": rec["alpha"]}
    scope = rec.get("trim_scope", record.get("trim_scope", "tensor"))
    if scope != "tensor" or (row is not None and row.sparse.stats):
        sm["trim_scope"] = scope  # only methods with magnitude thresholds have one
    doc["streammerge"] = sm
    text = yaml.safe_dump(_clean(doc), sort_keys=False, allow_unicode=True, width=100)
    notes = []
    mix = rec.get("mixup", record.get("mixup"))
    if mix:
        what = (
            f"λ = {mix[0]!r}" if len(mix) == 2 else "m = [" + ", ".join(repr(x) for x in mix) + "]"
        )
        src = "fixed" if rec.get("lambda") is not None else "drawn from the seed"
        notes.append(f"# M3 mixup ({src}): {what}; each weight is multiplied by its m_j")
    if record.get("weights"):
        notes.append(
            "# resolved weights w = [" + ", ".join(repr(w) for w in record["weights"]) + "]"
        )
    return text + "".join(n + "\n" for n in notes)


#: How the card names the output directory, so the card (and every output byte) does not
#: depend on where the output was written.
OUT_PLACEHOLDER = "OUT"


def repeat_command(record: dict, out: str | Path, shard_size_bytes: int | None = None) -> str:
    """The ``streammerge`` command line that repeats the merge of ``record`` into ``out``:
    inputs as ``model_ref`` names them (no local absolute path) and every recipe value as
    a flag (``--flag=value``, exact float reprs), ``--shard-size`` in bytes when given (the
    shard boundaries depend on it).

    Raises:
        ValueError: a recipe value flags cannot express (a gradient, a filter list, a
            top-level weight, mixup ratios with given weights): use the recipe YAML.
    """
    rec = record.get("recipe") or {}
    method = rec.get("method", record.get("method"))
    n = len(record.get("models") or [])
    entries = _inputs(record, None)
    argv = ["streammerge", *(model_ref(p, lab, nm) for r, p, lab, nm in entries if r != "base")]
    if record.get("base"):
        argv += ["--base", model_ref(*entries[0][1:])]
    argv += [
        "-o",
        str(out) if str(out) == OUT_PLACEHOLDER else str(Path(out).absolute()),
        f"--method={method}",
        f"--seed={rec.get('seed', record.get('seed'))}",
    ]
    models = list(rec.get("models") or [{}] * n)
    top = dict(rec.get("parameters") or {})

    weights = _flag_values(models, "weight")
    if rec.get("lambda") is not None:
        if weights is not None:
            raise ValueError("a fixed λ with given weights cannot be given as flags")
        argv.append(f"--lambda={rec['lambda']!r}")
    elif weights is not None:
        if rec.get("mixup") is not None:
            raise ValueError("M3 mixup with given weights cannot be given as flags")
        argv.append(f"--weights={','.join(repr(float(w)) for w in weights)}")
    elif rec.get("alpha") is not None:
        argv.append(f"--alpha={rec['alpha']!r}")
    argv += _param_flags(METHODS.get(method), models, top, n)
    if rec.get("trim_scope", "tensor") != "tensor":
        argv.append(f"--trim-scope={rec['trim_scope']}")
    dtype = rec.get("dtype", record.get("dtype"))
    if dtype is not None:
        argv.append(f"--dtype={FLAG_DTYPES.get(dtype, str(dtype).lower())}")
    if shard_size_bytes is not None:
        argv.append(f"--shard-size={int(shard_size_bytes)}")
    return shlex.join(argv)


def _flag_values(models: list[dict], key: str) -> list | None:
    """The per-model values of ``key`` as flag values, None when no model has one.

    Raises:
        ValueError: some models lack it, or a value is not a finite number.
    """
    vals = [m.get(key) for m in models]
    if all(v is None for v in vals):
        return None
    if any(v is None for v in vals) or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
        for v in vals
    ):
        raise ValueError(f"models' {key} values {vals} cannot be given as a flag")
    return vals


def _csv(vals: list) -> str:
    vals = [float(v) for v in vals]
    return repr(vals[0]) if len(set(vals)) == 1 else ",".join(repr(v) for v in vals)


def _param_flags(row, models: list[dict], top: dict, n: int) -> list[str]:
    """The flags of the method's declared parameters (``row.params``) but the weight.

    Raises:
        ValueError: a value flags cannot express (a gradient, a filter list).
    """
    argv = []
    per_model = {p.name: p for p in (row.per_model if row else ()) if p.name != "weight"}
    for key, param in per_model.items():
        vals = _flag_values(models, key)
        if key in top:
            v = top[key]
            if vals is not None or isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"parameters.{key} = {v!r} cannot be given as a flag")
            vals = [v] * n
        if vals is not None:
            argv.append(f"{param.flag}={_csv(vals)}")
    for key, v in top.items():
        param = row.param(key) if row else None
        if key in per_model:
            continue
        if param is None or isinstance(v, (list, dict)):
            raise ValueError(f"parameters.{key} = {v!r} cannot be given as a flag")
        if param.kind == "number" and isinstance(v, (int, float)) and not isinstance(v, bool):
            argv.append(f"{param.flag}={float(v)!r}")
        elif param.kind == "bool" and isinstance(v, (bool, int, float)):
            argv.append(param.flag if v else "--no-" + param.flag[2:])
        else:
            raise ValueError(f"parameters.{key} = {v!r} cannot be given as a flag")
    return argv


def _with_seed(command: str, seed) -> str:
    """``command`` with ``--seed`` appended when it gives none (a drawn seed)."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    if seed is None or any(w == "--seed" or w.startswith("--seed=") for w in words):
        return command
    return f"{command} --seed {seed}"


def _fmt(v) -> str:
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def front_matter(record: dict, labels=None) -> dict:
    """The card's YAML metadata (Hugging Face model card keys): ``base_model`` lists the
    inputs' Hub repo ids where known (``hub_id``; a local folder without one is left out,
    the key too when none is known), ``base_model_relation: merge``."""
    names = []
    for _, path, label, name_or_path in _inputs(record, labels):
        name = hub_id(path, label, name_or_path)
        if name is not None and name not in names:
            names.append(name)
    return {
        **({"base_model": names} if names else {}),
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": ["merge", "streammerge", record.get("method") or "merge"],
    }


def _intro_lines(record: dict, entries: list) -> list[str]:
    """The card's title (the method and the fine-tunes' names) and its first paragraph."""
    method = record.get("method")
    n = len(record.get("models") or [])
    base_entry = next(((p, lab, nm) for r, p, lab, nm in entries if r == "base"), None)
    title = f"# {method} merge of " + ", ".join(
        model_name(p, lab, nm) for r, p, lab, nm in entries if r != "base"
    )
    lines = [title, ""]
    if method == "passthrough":  # layer slices (streammerge.plan.slices)
        intro = (f"This model stacks layers of {n} model(s) with streammerge "
                 f"{record.get('version', '')} (mergekit's passthrough slices): every tensor is "
                 "a copy of one input tensor.")  # fmt: skip
        lines += [intro, ""]
        return lines
    of = f" of `{model_name(*base_entry)}`" if base_entry else ""
    lines.append(
        f"This model merges {n} fine-tunes{of} with "
        f"streammerge {record.get('version', '')} using the "
        f"**{method}** method, computed per the {record.get('spec', SPEC)}: the same "
        "recipe and seed give the same bytes on any device."
    )
    lines.append("")
    return lines


def _inputs_lines(entries: list) -> list[str]:
    """The ``## Inputs`` table: each input's role, name and source (a Hub link, or its
    reference marked local)."""
    lines = ["## Inputs", "", "| role | model | source |", "|---|---|---|"]
    for role, path, label, nm in entries:
        known = hub_id(path, label, nm)
        source = (f"[{known}](https://huggingface.co/{known})" if known
                  else f"`{model_ref(path, label, nm)}` (local)")  # fmt: skip
        lines.append(f"| {role} | `{model_name(path, label, nm)}` | {source} |")
    lines.append("")
    return lines


def _weighting_line(record: dict) -> str:
    """The ``- Weighting:`` line: M3 with a fixed λ, a λ drawn from Beta(α, α), ratios m
    drawn from Dirichlet(α), or the weights as given."""
    mix, alpha, lam = record.get("mixup"), record.get("alpha"), record.get("lambda")
    if not mix:
        return "- Weighting: the weights as given (no M3 draw)."
    if lam is not None:
        return f"- Weighting: M3 with a fixed λ = {lam!r}: m = ({mix[0]!r}, {mix[1]!r})."
    if len(mix) == 2:
        return (
            f"- Weighting: M3 ({M3_PAPER}): λ = {mix[0]!r} drawn from Beta(α, α), α = "
            f"{alpha!r}, with the seed: m = ({mix[0]!r}, {mix[1]!r})."
        )
    return (
        f"- Weighting: M3 ({M3_PAPER}): m = ({', '.join(repr(x) for x in mix)}) drawn "
        f"from Dirichlet(α), α = {alpha!r}, with the seed."
    )


def _resolved_line(record: dict, row) -> str:
    """The ``- Resolved:`` line: every value the method resolved (``streammerge.json``
    ``resolved``: w, then each declared parameter, DARE's drop p included), per-model ones
    as the first merged tensor has them."""
    resolved = dict(record.get("resolved") or {"w": record.get("weights"),
                    "scale": record.get("scale"), "normalize": record.get("normalize")})  # fmt: skip
    first = next(iter((record.get("tensors") or {}).values()), None) or {}
    res = []
    for k, v in resolved.items():
        v = first.get(k, v) if isinstance(v, list) else v
        res.append(f"{'drop p' if k == 'drop' else k} {_fmt(v)}")
    return (
        "- Resolved: " + ", ".join(res) + " (a tensor without per-tensor values; every "
        "merged tensor's own values and thresholds are in `streammerge.json`)."
    )


def _how_lines(record: dict) -> list[str]:
    """The ``## How`` section: the method's row, weighting, seed, resolved parameters,
    trim scope, output dtype and shards, tensors copied from the base, vocabulary rules."""
    method = record.get("method")
    row = METHODS.get(method)
    lines = ["## How", ""]
    runs = (record.get("recipe") or {}).get("layer_runs")
    if runs is not None:  # layer slices: the map (passthrough: no weights below)
        lines.append(f"- Layers (output <- model:layer): {'; '.join(runs)}.")
    if row is not None:
        lines.append(
            f"- Method: `{method}`: {row.sparsifier} sparsifier, {row.consensus} consensus, "
            f"normalize {'on' if row.normalize else 'off'} by default ({row.source})."
        )
    if method != "passthrough":
        lines.append(_weighting_line(record))
        lines.append(f"- Seed: {record.get('seed')}")
        lines.append(_resolved_line(record, row))
    if row is not None and row.sparse.stats:
        scope = record.get("trim_scope", "tensor")
        lines.append(
            f"- Trim scope: {scope} ("
            + ("thresholds per tensor, as mergekit" if scope == "tensor"
               else "one threshold per fine-tune over the whole model, as the TIES and M3 papers")
            + ")."
        )  # fmt: skip
    dtype = record.get("dtype")
    lines.append(
        f"- Output dtype: {MERGEKIT_DTYPES.get(dtype, dtype) if dtype else 'the base model’s'}."
    )
    shards = record.get("shards") or []
    if shards:
        total = sum(s.get("size_bytes", 0) for s in shards)
        lines.append(
            f"- Output: {len(shards)} safetensors shard(s), {total} bytes; sha256 in `streammerge.json`."
        )
    if record.get("base_only"):
        lines.append(
            f"- Copied from the base (no fine-tune has them): {', '.join(record['base_only'])}."
        )
    for rule in record.get("vocab_rules") or []:
        lines.append(f"- Vocabulary rule: {rule}")
    lines.append("")
    return lines


def _reproduce_lines(command: str, seed) -> list[str]:
    """The ``## Reproduce`` section: ``command`` (with ``--seed`` when it has none) and
    what the seed fixes."""
    return [
        "## Reproduce",
        "",
        "```bash",
        _with_seed(command, seed),
        "```",
        "",
        (
            f"The seed ({seed}) fixes the M3 draw and every DARE mask; `streammerge.json` holds "
            "the full record (inputs' header fingerprints, per-tensor parameters, shard sha256)."
        ),
        "",
    ]


def render(record: dict, command: str, recipe_yaml: str | None = None, labels=None) -> str:
    """The output's README.md for the merge ``record`` (``streammerge.json``).

    Args:
        record: the ``streammerge.json`` dict (``api.record``); may carry ``labels`` (the
            inputs as a recipe named them, base first) or a ``label`` per input entry.
        command: the shell command that repeats the merge (``--seed`` is appended when it
            has none; ``repeat_command`` builds one from the record).
        recipe_yaml: the YAML recipe the merge was given (``--config``), shown as is;
            None: the record's recipe in mergekit's form (``recipe_to_yaml``).
        labels: like ``record["labels"]``, taking precedence.

    Returns:
        Markdown text with YAML front matter.
    """
    fm = yaml.safe_dump(front_matter(record, labels), sort_keys=False, allow_unicode=True)
    entries = _inputs(record, labels)
    lines = ["---", fm.rstrip("\n"), "---", ""]
    lines += _intro_lines(record, entries)
    lines += _inputs_lines(entries)
    lines += _how_lines(record)
    text = recipe_yaml if recipe_yaml is not None else recipe_to_yaml(record, labels)
    lines += ["## Recipe", "", "```yaml", text.rstrip("\n"), "```", ""]
    if record.get("method") == "passthrough":  # nothing drawn: no seed to give
        lines += ["## Reproduce", "", "```bash", command, "```", ""]
    else:
        lines += _reproduce_lines(command, record.get("seed"))
    return "\n".join(lines)


def publishable(text: str, record: dict, labels=None) -> str:
    """``text`` (a command line or a recipe as the user wrote it) with every input written
    as a local absolute path (or ``file://`` URL) replaced by its ``model_ref``, so the
    card names no local path."""
    for _, path, label, nm in _inputs(record, labels):
        for written in {label, path} - {None}:
            if str(written).startswith(("/", "~", "file://")):
                pattern = r"(?<![\w/.~-])" + re.escape(str(written)) + r"(?![\w/.-])"
                text = re.sub(pattern, lambda _m: model_ref(path, label, nm), text)
    return text
