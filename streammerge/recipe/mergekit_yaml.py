"""mergekit YAML recipes, read unchanged: ``streammerge --config recipe.yml -o OUT``.

The schema is mergekit 0.1.5's (``MergeConfiguration``) for the methods streammerge has::

    merge_method: ties                # a row of streammerge.methods.registry.METHODS
    base_model: path/or/org/name      # not for linear
    models:
      - model: path/or/org/name       # a directory, or a repo id in the local HF cache
        parameters:
          weight: [0, 0.3, 0.7, 1]    # gradient along the layers
          density:
            - filter: mlp             # substring of the tensor name; first match wins
              value: 0.5
            - value: 0.2
    parameters: {normalize: true, lambda: 1.0}   # top level: every model, lower precedence
    dtype: float32                    # the working dtype of the task-vector methods (SPEC v3)
    out_dtype: bfloat16
    tokenizer_source: base            # or a model of the list
    streammerge:                      # streammerge's own keys, unknown to mergekit
      mixup: {alpha: 1.0}             # M3: w_j = m_j * weight_j, m ~ Beta / Dirichlet
      seed: 7
      trim_scope: model

Resolution per tensor is mergekit's (``streammerge.recipe.recipe.evaluate``): model parameters over
top-level ones; ``normalize``, ``lambda``, ``rescale`` and ``int8_mask`` only at the top
level (mergekit ignores them under a model, and so does streammerge, with a notice);
mergekit's ``lambda`` is the scale s; a base model listed among ``models`` is not a
fine-tune (mergekit skips it too). Anything unsupported stops with one line naming the key
and its line (``modules``, ``tokenizer_source: union``, a method streammerge lacks, ...).
A recipe with ``slices:`` stacks layers or merges each slice (``streammerge.recipe.slices``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from streammerge.errors import MergeError
from streammerge.methods.method import Method
from streammerge.methods.params import Param
from streammerge.methods.registry import METHODS, all_params
from streammerge.recipe.dtypes import normalize_dtype
from streammerge.recipe.yaml_doc import YamlDoc, yaml_number

TOP_KEYS = {
    "merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "streammerge", "name",
}  # fmt: skip
#: mergekit keys streammerge does not do, with what to do instead.
UNSUPPORTED = {
    "modules": "list whole models under models:",
    "tokenizer": "use tokenizer_source: base or a model of the list",
    "chat_template": "copy the chat template into the output's tokenizer_config.json yourself",
}


def yaml_params() -> dict[str, Param]:
    """Every parameter some method declares, by its mergekit YAML key (``lambda`` is
    ``scale``); streammerge's own flags (``drop``) are not YAML keys."""
    return {p.key: p for p in all_params().values() if p.in_yaml}


STREAMMERGE_KEYS = {"mixup", "seed", "trim_scope"}
MIXUP_KEYS = {"alpha", "lambda"}
COMPUTE_DTYPES = {"float32", "bfloat16", "float16"}


@dataclass
class YamlRecipe:
    """A mergekit YAML recipe, resolved to inputs and ``build_recipe`` arguments.

    Attributes:
        path: the YAML file; text: its content (recorded in the model card).
        base: the base directory (None for linear); models: fine-tune directories in order.
        labels: the ``model`` strings as written (repo ids stay names), base first if any.
        recipe: ``build_recipe`` keyword arguments (``streammerge.api.prepare`` takes them).
        tokenizer_model: index of the fine-tune whose tokenizer is copied (None: the base).
        notices: lines to print (settings mergekit ignores and so does streammerge).
    """

    path: Path
    text: str
    base: Path | str | None
    models: list[Path | str]
    labels: list[str]
    recipe: dict
    tokenizer_model: int | None = None
    notices: list[str] = field(default_factory=list)


#: Largest recipe file read (bytes): recipes are a few KB; a bigger file is not one.
MAX_RECIPE_BYTES = 1 << 20


def _split_lora(ref: str, key: str, doc: YamlDoc, base_dir: Path) -> tuple[str, Path] | None:
    """(model reference, adapter folder) of a ``MODEL+ADAPTER`` reference, each part as
    given or relative to the recipe (``streammerge.io.lora.split_reference``); None for a
    directory whose name has a '+'."""
    from streammerge.io.lora import split_reference

    def locate(part: str) -> Path | None:
        for cand in (Path(part).expanduser(), base_dir / part):
            if part and cand.is_dir():
                return cand.resolve()
        return None

    try:
        model, adapter = split_reference(ref, lambda r: locate(r) is not None, locate)
    except MergeError as e:
        doc.fail(key, e.what, e.todo)
    return None if adapter is None else (model, adapter)


def _resolve_model(ref, key: str, doc: YamlDoc, base_dir: Path) -> Path | str:
    """A ``model:`` reference (``streammerge.io.inputs.resolve_input``): a directory (as
    given, or relative to the recipe; also as ``file://``), a URL, or a Hugging Face repo
    id (``org/name`` or ``org/name@revision``) in the local cache."""
    from streammerge.io.inputs import is_repo_id, resolve_input

    if not isinstance(ref, str) or not ref.strip():
        doc.fail(key, f"expected a directory or a Hugging Face repo id, got {ref!r}")
    if "+" in ref:  # MODEL+ADAPTER (docs/SPEC.md "LoRA inputs (v3)")
        lora = _split_lora(ref, key, doc, base_dir)
        if lora is not None:
            return f"{_resolve_model(lora[0], key, doc, base_dir)}+{lora[1]}"
    try:
        resolved = resolve_input(ref)
    except MergeError as e:
        doc.fail(key, e.what, e.todo)
    if resolved.is_remote:
        return resolved.url
    # as given, then relative to the recipe, then the cache snapshot resolve_input found
    plain = (Path(ref).expanduser(), base_dir / ref) if not ref.startswith("file://") else ()
    for cand in (*plain, resolved.path):
        if cand.is_dir():
            return cand
    repo, _, revision = ref.partition("@")
    if not is_repo_id(ref):
        doc.fail(key, f"{ref} is not a directory", "give the model's directory")
    doc.fail(
        key,
        f"{ref} is neither a directory nor in the local Hugging Face cache",
        f"fetch it first: hf download {repo}" + (f" --revision {revision}" if revision else ""),
    )


def _check_value(value, key: str, doc: YamlDoc, allow_gradient: bool, kind: str) -> None:
    """Numbers / bools, gradient lists and {filter, value} lists, recursively."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, entry in enumerate(value):
            sub = f"{key}[{i}]"
            extra = set(entry) - {"filter", "value"}
            if extra:
                doc.fail(f"{sub}.{min(extra)}", "unknown key (a filter entry has filter and value)")
            if "value" not in entry:
                doc.fail(sub, "a filter entry needs a value")
            if "filter" in entry and not isinstance(entry["filter"], str):
                doc.fail(f"{sub}.filter", f"expected a string, got {entry['filter']!r}")
            _check_value(entry["value"], f"{sub}.value", doc, allow_gradient, kind)
        return
    if isinstance(value, list):
        if not allow_gradient:
            doc.fail(key, "a gradient (list) is not allowed here: this setting is not per layer")
        if not value:
            doc.fail(key, "an empty list")
        for i, v in enumerate(value):
            _check_value(v, f"{key}[{i}]", doc, False, kind)
        return
    if kind == "bool":
        if not isinstance(value, bool):
            doc.fail(key, f"expected true or false, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        doc.fail(key, f"expected a number, got {value!r}")


def load_recipe(path: str | Path, notice: Callable[[str], None] | None = None) -> YamlRecipe:
    """Read a mergekit YAML recipe (see the module docstring).

    Raises:
        MergeError: one line naming the key and its line: bad YAML, wrong types, an
            unknown key, an unsupported feature (tokenizer_source union, rescale
            false, LoRA), a method streammerge lacks, a missing base, a model that is
            neither a directory nor in the local Hugging Face cache; slices the
            method cannot take (passthrough: one source each; a merge: 2+ sources of
            equal length, the base among them).
    """
    path = Path(path)
    text = _read_recipe_text(path)
    doc = YamlDoc(path, text)
    cfg = doc.value
    if isinstance(cfg, dict) and "slices" in cfg:
        return _load_slices(path, text, doc, notice)
    _check_top_keys(doc, cfg)
    method = _merge_method(doc, cfg)
    reader = _RecipeReader(doc, path.parent, method, METHODS[method])
    kwargs: dict = {"method": method, "source": str(path), "alpha": None}
    reader.read_streammerge_block(cfg.get("streammerge") or {}, kwargs)
    reader.read_dtypes(cfg, kwargs)
    base_ref = cfg.get("base_model")
    base = reader.base_model(base_ref)
    models, labels, model_params = reader.fine_tunes(cfg.get("models"), base)
    params = reader.top_params(cfg.get("parameters") or {})
    if reader.row.base_is_input:  # mergekit's base_model is model 0 (slerp's v0)
        models, labels, model_params = [base, *models], [str(base_ref), *labels], [{}, *model_params]
        base, base_ref = None, None
    kwargs.update(model_params=model_params, params=params, lines=reader.lines)
    tokenizer_model = reader.tokenizer_model(cfg.get("tokenizer_source"), labels)
    for n in reader.notices:
        if notice is not None:
            notice(n)
    return YamlRecipe(path, text, base, models, ([str(base_ref)] if base_ref else []) + labels,
                      kwargs, tokenizer_model, reader.notices)  # fmt: skip


def _load_slices(path: Path, text: str, doc: YamlDoc, notice) -> YamlRecipe:
    """A recipe with ``slices:`` (``streammerge.recipe.slices``): passthrough stacks the
    layers, another method merges each slice's sources; its ``recipe`` is
    ``{"slices": SliceRecipe}``, its models the distinct slice models."""
    from streammerge.methods.registry import ALL_METHODS
    from streammerge.recipe.slice_reader import SlicesReader

    cfg = doc.value
    method = cfg.get("merge_method")
    if method is None:
        doc.fail("merge_method", "missing", "name a method (passthrough for slices)", line=1)
    if method != "passthrough":
        method = _merge_method(doc, cfg)
    if "models" in cfg:
        doc.fail("models", "give models: or slices:, not both (as mergekit)")
    reader = SlicesReader(doc, path.parent, _resolve_model, _check_value, yaml_params(),
                          ALL_METHODS[method])  # fmt: skip
    recipe = reader.read(cfg)
    base_ref = cfg.get("base_model")
    base = None if base_ref is None else _resolve_model(base_ref, "base_model", doc, path.parent)
    for n in reader.notices:
        if notice is not None:
            notice(n)
    labels = ([str(base_ref)] if base_ref is not None else []) + reader.labels
    return YamlRecipe(path, text, base, reader.models, labels, {"slices": recipe}, None,
                      reader.notices)  # fmt: skip


def _read_recipe_text(path: Path) -> str:
    """The recipe file's text (UTF-8, at most ``MAX_RECIPE_BYTES``).

    Raises:
        MergeError: unreadable, not UTF-8, or larger than ``MAX_RECIPE_BYTES``.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MergeError(f"cannot read the recipe ({e})", path, None, "check the path")
    if len(data) > MAX_RECIPE_BYTES:
        raise MergeError(f"the recipe is larger than {MAX_RECIPE_BYTES // 2**20} MiB", path,
                         None, "give a mergekit YAML recipe (a few KB)")  # fmt: skip
    return text


def _check_top_keys(doc: YamlDoc, cfg) -> None:
    """Check that the recipe is a mapping of known top-level keys (``TOP_KEYS``, or a key
    that only holds anchors used elsewhere), none of them ``UNSUPPORTED``."""
    if not isinstance(cfg, dict):
        doc.fail("(top)", "expected a mapping of recipe keys", line=1)
    for key in cfg:
        if key in UNSUPPORTED:
            doc.fail(str(key), "not supported by streammerge", UNSUPPORTED[key])
        if key not in TOP_KEYS and not doc.anchor_only(key):
            doc.fail(str(key), "unknown key", f"use {', '.join(sorted(TOP_KEYS))}")


def _merge_method(doc: YamlDoc, cfg: dict) -> str:
    """The ``merge_method``, a key of ``METHODS`` (else one line, with the closest name)."""
    method = cfg.get("merge_method")
    if method is None:
        doc.fail("merge_method", "missing", "name a method", line=1)
    if method == "passthrough":
        doc.fail("merge_method", "passthrough needs slices:",
                 "list the layers to stack under slices: (docs/recipes.md)")  # fmt: skip
    if not isinstance(method, str) or method not in METHODS:
        from streammerge.errors import closest

        near = closest(method, METHODS) if isinstance(method, str) else None
        hint = f" (did you mean {near!r}?)" if near else ""
        doc.fail("merge_method", f"streammerge has no method {method!r}{hint}",
                 f"use one of {', '.join(METHODS)}")  # fmt: skip
    return method


@dataclass
class _RecipeReader:
    """The sections of one recipe, read in order once its method is known (each check fails
    with ``doc.fail``: one line naming the key and its line).

    Attributes:
        doc: the parsed YAML; here: the recipe's folder (models may be relative to it).
        method: the ``merge_method``; row: its row of ``METHODS``.
        notices: lines to print (settings mergekit ignores and so does streammerge).
        lines: the YAML line of each parameter kept, by ``build_recipe`` key
            (``models[j].parameters.density``, ``parameters.scale``).
    """

    doc: YamlDoc
    here: Path
    method: str
    row: Method
    notices: list[str] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)

    def read_streammerge_block(self, sm, kwargs: dict) -> None:
        """Read streammerge's own keys (mixup, seed, trim_scope) into ``kwargs``."""
        doc, method = self.doc, self.method
        if not isinstance(sm, dict):
            doc.fail("streammerge", "expected a mapping (mixup, seed, trim_scope)")
        for k in sm:
            if k not in STREAMMERGE_KEYS:
                doc.fail(
                    f"streammerge.{k}", "unknown key", f"use {', '.join(sorted(STREAMMERGE_KEYS))}"
                )
        mix = sm.get("mixup")
        if mix is not None:
            if not isinstance(mix, dict) or not mix or set(mix) - MIXUP_KEYS or len(mix) != 1:
                doc.fail(
                    "streammerge.mixup", f"expected {{alpha: A}} or {{lambda: L}}, got {mix!r}"
                )
            ((mk, mv),) = mix.items()
            if isinstance(mv, bool) or not isinstance(mv, (int, float)):
                doc.fail(f"streammerge.mixup.{mk}", f"expected a number, got {mv!r}")
            kwargs["alpha" if mk == "alpha" else "lam"] = float(mv)
        if "seed" in sm:
            if (
                isinstance(sm["seed"], bool)
                or not isinstance(sm["seed"], int)
                or not 0 <= sm["seed"] < 2**64
            ):
                doc.fail(
                    "streammerge.seed", f"expected an integer in [0, 2**64), got {sm['seed']!r}"
                )
            kwargs["seed"] = sm["seed"]
        if "trim_scope" in sm:
            if sm["trim_scope"] not in ("tensor", "model"):
                doc.fail(
                    "streammerge.trim_scope", f"expected tensor or model, got {sm['trim_scope']!r}"
                )
            if not self.row.sparse.stats:
                doc.fail("streammerge.trim_scope", f"method {method} has no magnitude thresholds")
            kwargs["trim_scope"] = sm["trim_scope"]

    def read_dtypes(self, cfg: dict, kwargs: dict) -> None:
        """Check ``dtype`` and ``out_dtype``; the working dtype (``dtype``, docs/SPEC.md
        "Working dtype (v3)": mergekit casts the inputs to it and computes its task-vector
        methods in it) and the output dtype (``out_dtype``, else ``dtype``) go into
        ``kwargs``. linear and slerp compute in float32 whatever ``dtype`` says (as
        mergekit); float64 is refused with the other unsupported dtypes."""
        doc = self.doc
        for key in ("dtype", "out_dtype"):
            v = cfg.get(key)
            if v is not None:
                name = str(v).removeprefix("torch.")
                if name not in COMPUTE_DTYPES:
                    doc.fail(key, f"unsupported dtype {v!r}", "use float32, bfloat16 or float16")
        compute = cfg.get("dtype")
        if compute is not None:
            kwargs["compute_dtype"] = normalize_dtype(str(compute).removeprefix("torch."))
        out_dtype = cfg.get("out_dtype") or compute
        if out_dtype is not None:
            kwargs["dtype"] = normalize_dtype(str(out_dtype).removeprefix("torch."))

    def base_model(self, base_ref) -> Path | str | None:
        """The resolved ``base_model`` (None when not given; required by every method but
        linear)."""
        if (self.row.uses_base or self.row.base_is_input) and base_ref is None:
            self.doc.fail("base_model", f"method {self.method} needs a base_model",
                          "add base_model:", line=1)  # fmt: skip
        if base_ref is None:
            return None
        if self.row.base_unsupported:
            self.doc.fail("base_model", f"method {self.method} with a base_model is not "
                          "supported yet", "remove base_model:")
        return _resolve_model(base_ref, "base_model", self.doc, self.here)

    def fine_tunes(self, entries, base) -> tuple[list[Path | str], list[str], list[dict]]:
        """The ``models:`` list without the base: (resolved models, their ``model`` strings
        as written, the parameters of each that apply to the method). At least 2."""
        doc = self.doc
        if not isinstance(entries, list) or not entries:
            doc.fail(
                "models",
                "expected a list of {model, parameters} entries",
                line=doc.lines.get("models", 1),
            )
        models: list[Path | str] = []
        labels: list[str] = []
        model_params: list[dict] = []
        for i, e in enumerate(entries):
            key = f"models[{i}]"
            if isinstance(e, str):
                e = {"model": e}
            if not isinstance(e, dict):
                doc.fail(key, f"expected a mapping with model and parameters, got {e!r}")
            for k in e:
                if k not in ("model", "parameters"):
                    doc.fail(f"{key}.{k}", "unknown key", "use model and parameters")
            if "model" not in e:
                doc.fail(key, "missing model:")
            p = _resolve_model(e["model"], f"{key}.model", doc, self.here)
            if (self.row.uses_base or self.row.base_is_input or self.row.base_optional) \
                    and base is not None \
                    and os.path.realpath(p) == os.path.realpath(base):  # fmt: skip
                continue  # the base among the models: not a fine-tune (mergekit skips it too)
            params = e.get("parameters") or {}
            if not isinstance(params, dict):
                doc.fail(f"{key}.parameters", "expected a mapping")
            model_params.append(self.model_params(key, len(models), params))
            models.append(p)
            labels.append(str(e["model"]))
        need = 1 if self.row.base_is_input else 2  # slerp: the base is model 0 (v0)
        if len(models) < need:
            doc.fail("models", f"need at least {need} models besides the base, got {len(models)}",
                     line=doc.lines.get("models"))  # fmt: skip
        return models, labels, model_params

    def model_params(self, key: str, j: int, params: dict) -> dict:
        """The parameters of ``models[i]`` (``key``), fine-tune ``j``, that apply to the
        method; a notice for each ignored one (top-level-only, or unused by the method)."""
        doc, known = self.doc, yaml_params()
        own = {}
        for k, v in params.items():
            pk = f"{key}.parameters.{k}"
            param = self._declared(k, known)
            v = yaml_number(v)
            if param is None:
                per_model = sorted(n for n, p in known.items() if p.per_model)
                doc.fail(pk, "unknown parameter", f"use {', '.join(per_model)}")
            if not param.per_model:
                self.notices.append(
                    f"{pk} (line {doc.lines[pk]}) is ignored: it applies to the whole merge "
                    "only at the top level (as in mergekit)"
                )
                continue
            if self._kept(param, v, pk):
                own[param.name] = v
                self.lines[f"models[{j}].parameters.{param.name}"] = doc.lines[pk]
        return own

    def top_params(self, top) -> dict:
        """The top-level ``parameters:`` that apply to the method, by recipe name
        (mergekit's ``lambda`` as ``scale``)."""
        doc, known = self.doc, yaml_params()
        if not isinstance(top, dict):
            doc.fail("parameters", "expected a mapping")
        params: dict = {}
        for k, v in top.items():
            pk = f"parameters.{k}"
            param = self._declared(k, known)
            v = yaml_number(v)
            if param is None:
                doc.fail(pk, "unknown parameter", f"use {', '.join(sorted(known))}")
            if self._kept(param, v, pk):
                params[param.name] = v
                self.lines[f"parameters.{param.name}"] = doc.lines[pk]
        return params

    def _declared(self, key: str, known: dict[str, Param]) -> Param | None:
        """The method's own declaration of ``key`` (della's epsilon is per model, ram's
        global), else the first method's."""
        own = next((p for p in self.row.params if p.key == key), None)
        return own or known.get(key)

    def _kept(self, param: Param, v, pk: str) -> bool:
        """Check the value of ``param`` at ``pk``; whether it is kept for the recipe (False:
        a notice when the method does not read it; a setting with no effect on the values,
        or the one value streammerge supports)."""
        doc = self.doc
        _check_value(v, pk, doc, param.layered, param.kind)
        if param.only is not None and v != param.only:
            doc.fail(pk, f"{param.key}: {str(v).lower()} is not supported",
                     f"drop it ({param.help})")  # fmt: skip
        if not self.row.takes(param.name):
            self.notices.append(f"{pk} (line {doc.lines[pk]}) does not apply to "
                                f"{self.method}: ignored")  # fmt: skip
            return False
        return param.affects_values and param.only is None

    def tokenizer_model(self, tok, labels: list[str]) -> int | None:
        """The index of the fine-tune whose tokenizer is copied (``tokenizer_source``), None
        for the base (also when not given)."""
        if tok is None:
            return None
        if tok == "union":
            self.doc.fail("tokenizer_source", "union is not supported",
                          "use tokenizer_source: base or a model of the list")  # fmt: skip
        if tok != "base":
            if tok not in labels:
                self.doc.fail("tokenizer_source", f"{tok!r} is not base or a model of the list")
            return labels.index(tok)
        return None
