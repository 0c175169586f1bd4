"""LoRA adapters as inputs: ``MODEL+ADAPTER`` (docs/SPEC.md "LoRA inputs (v3)").

``split_reference`` finds the adapter folder in a reference (mergekit 0.1.5's syntax,
``ModelReference.validate_string``), ``open_adapted`` checks a PEFT adapter against the
opened model, headers only, and returns the model with each adapted tensor's
``TensorInfo`` replaced by an ``AdaptedTensorInfo``, whose bytes the reader turns into
``W + s * (B @ A)`` as they are read (``streammerge.io.lora_delta.adapt_range``).
Nothing of the adapter is held for the run but its header: the A and B matrices of a
tensor are read when its chunks are.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from collections.abc import Callable
from pathlib import Path

from streammerge.errors import MergeError
from streammerge.io import safejson
from streammerge.io.lora_delta import AdaptedTensorInfo, LoraTerm, adapt_range  # noqa: F401
from streammerge.io.model_types import ModelDir, TensorInfo

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Key of the adapter's fingerprint in ``ModelDir.file_fingerprints`` (no file name has '+').
ADAPTER_KEY = "+adapter"
#: PEFT's prefix of every saved LoRA key, then the module's name in the model.
KEY_RE = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
#: Float dtypes an adapter's weights and the adapted tensors may have.
LORA_DTYPES = ("F32", "F16", "BF16")
#: adapter_config.json keys that change what the merge computes, refused when set (PEFT
#: 0.21 ``LoraConfig``: the fields marked ``is_lora_variant``, and what else adds weights).
REFUSED_OPTIONS = (
    "use_dora", "lora_bias", "modules_to_save", "trainable_token_indices",
    "target_parameters", "layer_replication", "alora_invocation_tokens", "use_qalora",
    "use_bdlora", "arrow_config", "velora_config", "monteclora_config", "kasa_config",
)  # fmt: skip
_TODO = "merge this adapter with PEFT's merge_and_unload first, and give that model"


def _local_dir(part: str) -> Path | None:
    p = Path(part).expanduser()
    return p if part and p.is_dir() else None


def split_reference(
    ref: str,
    is_plain: Callable[[str], bool],
    locate: Callable[[str], Path | None] = _local_dir,
) -> tuple[str, Path | None]:
    """(model reference, adapter folder or None) of ``ref`` (SPEC "Which + splits").

    Args:
        is_plain: True when ``ref`` as a whole names an existing local model directory.
        locate: the existing directory a part names (None if none): as given, or (YAML)
            relative to the recipe too.

    Raises:
        MergeError: a local reference with a '+' that is no directory and has no split
            whose right side is a directory.
    """
    if "+" not in ref or is_plain(ref):
        return ref, None
    parts = ref.split("+")
    for i in range(len(parts) - 1, 0, -1):
        model, adapter = "+".join(parts[:i]), locate("+".join(parts[i:]))
        if adapter is not None and model:
            return model, adapter
    if "://" in ref:
        return ref, None
    raise MergeError(
        f"{ref} is no directory, and {parts[-1]!r} after its last '+' is no adapter folder",
        ref,
        None,
        "give MODEL+ADAPTER with ADAPTER a PEFT adapter folder (adapter_config.json, "
        "adapter_model.safetensors)",
    )


def _load_config(folder: Path) -> dict:
    """adapter_config.json, checked: a LoRA adapter with no option streammerge refuses.

    Raises:
        MergeError: a missing file, bad JSON, another PEFT type, a refused option.
    """
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise MergeError(f"the adapter folder has no {name}", folder, None,
                             "give a PEFT LoRA adapter folder (save_pretrained)")  # fmt: skip
    cfg = safejson.load_file(folder / ADAPTER_CONFIG, max_depth=16, max_bytes=1 << 20,
                             todo="fix or re-save the adapter", what="adapter config")  # fmt: skip
    if not isinstance(cfg, dict):
        raise MergeError("adapter_config.json is not a JSON object", folder / ADAPTER_CONFIG)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"peft_type {cfg.get('peft_type')!r} is not LORA",
                         folder / ADAPTER_CONFIG, None, _TODO)  # fmt: skip
    for key in REFUSED_OPTIONS:
        if cfg.get(key):
            raise MergeError(f"adapter option {key}={cfg[key]!r} is not supported",
                             folder / ADAPTER_CONFIG, None, _TODO)  # fmt: skip
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.startswith("mica"):  # PEFT's MiCA variant
        raise MergeError(f"adapter option init_lora_weights={init!r} is not supported",
                         folder / ADAPTER_CONFIG, None, _TODO)  # fmt: skip
    if cfg.get("bias", "none") != "none":
        raise MergeError(f"adapter option bias={cfg['bias']!r} is not supported",
                         folder / ADAPTER_CONFIG, None, _TODO)  # fmt: skip
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if type(v) not in (int, float) or not v > 0 or not math.isfinite(v):
            raise MergeError(f"adapter {key} must be a positive number, got {v!r}",
                             folder / ADAPTER_CONFIG, None, "fix the adapter config")  # fmt: skip
    return cfg


def _pattern(patterns, module: str, default):
    """PEFT's ``get_pattern_key``: the value of the first key k with ``(.*\\.)?(k)$``
    matching the whole module name, else ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def scale_of(cfg: dict, module: str) -> tuple[int, float]:
    """(r, float64 scale) of ``module`` (SPEC "Rank and scale per module": PEFT's
    ``_create_and_replace`` and ``update_layer``)."""
    r = _pattern(cfg.get("rank_pattern"), module, cfg["r"])
    alpha = _pattern(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
    return r, (alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r)


def _pairs(folder: Path, tensors: dict[str, TensorInfo]) -> dict[str, list]:
    """module -> [A info, B info] of the adapter's weights.

    Raises:
        MergeError: a key that is not a LoRA A/B weight, a module with one of the two.
    """
    pairs: dict[str, list] = {}
    for key, info in tensors.items():
        m = KEY_RE.match(key)
        if m is None:
            raise MergeError("adapter weight is not a LoRA A/B matrix (embedding LoRA, DoRA "
                             "magnitude, bias or saved module)", folder / ADAPTER_WEIGHTS, key,
                             _TODO)  # fmt: skip
        pairs.setdefault(m.group(1), [None, None])["AB".index(m.group(2))] = info
    for module, (a, b) in pairs.items():
        if a is None or b is None:
            raise MergeError(
                f"the adapter has lora_{'A' if a is None else 'B'} of this module missing",
                folder / ADAPTER_WEIGHTS,
                module,
                "re-save the adapter",
            )
    return pairs


def _term(folder: Path, cfg: dict, module: str, a: TensorInfo, b: TensorInfo,
          w: TensorInfo | None) -> LoraTerm:  # fmt: skip
    """The checked ``LoraTerm`` of ``module``'s weight ``w``.

    Raises:
        MergeError: no such tensor in the model, dtypes or shapes that do not fit.
    """
    where = folder / ADAPTER_WEIGHTS
    if w is None:
        raise MergeError(
            "the adapter changes this module, which the model lacks",
            where,
            module + ".weight",
            "give the model the adapter was trained on",
        )
    for info in (a, b):
        if info.dtype not in LORA_DTYPES or len(info.shape) != 2:
            raise MergeError(f"adapter weight is {info.dtype}{list(info.shape)}, not a 2-D "
                             "F32/F16/BF16 matrix", where, info.name, _TODO)  # fmt: skip
    if w.dtype not in LORA_DTYPES:
        raise MergeError(f"a LoRA on a {w.dtype} tensor is not supported", where, w.name, _TODO)
    r, scale = scale_of(cfg, module)
    fifo = bool(cfg.get("fan_in_fan_out"))
    (ar, a_in), (b_out, br) = a.shape, b.shape
    want = (a_in, b_out) if fifo else (b_out, a_in)
    if ar != r or br != r or tuple(w.shape) != want:
        raise MergeError(
            f"adapter shapes A{list(a.shape)} B{list(b.shape)} (r={r}) do not fit the model's "
            f"{list(w.shape)}{' (fan_in_fan_out)' if fifo else ''}",
            where, w.name, "give the model the adapter was trained on",
        )  # fmt: skip
    return LoraTerm(a, b, float(scale), fifo, folder)


def adapter_fingerprint(folder: Path) -> str:
    """sha256 (hex) of adapter_config.json's bytes and all of adapter_model.safetensors."""
    digest = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        digest.update(f"{name}\0".encode())
        with open(folder / name, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def open_adapted(model: ModelDir, folder: Path) -> ModelDir:
    """``model`` with the LoRA adapter in ``folder`` applied (headers only, nothing read
    from the weights): adapted tensors become ``AdaptedTensorInfo``; the fingerprint joins
    the adapter's; ``adapter`` is set to ``{"path", "fingerprint"}``.

    Raises:
        MergeError: one line naming the file and key, for anything SPEC "What the adapter
            may be" refuses.
    """
    from streammerge.io.reader import read_header

    cfg = _load_config(folder)
    tensors = read_header(folder / ADAPTER_WEIGHTS)
    pairs = _pairs(folder, tensors)
    if not pairs:
        raise MergeError("the adapter has no LoRA weights", folder / ADAPTER_WEIGHTS, None,
                         "give a PEFT LoRA adapter folder")  # fmt: skip
    adapted = dict(model.tensors)
    for module in sorted(pairs):
        a, b = pairs[module]
        w = model.tensors.get(module + ".weight")
        term = _term(folder, cfg, module, a, b, w)
        adapted[w.name] = AdaptedTensorInfo(w.name, w.dtype, w.shape, w.file, w.start,
                                            w.nbytes, term)  # fmt: skip
    fp = adapter_fingerprint(folder)
    out = copy.copy(model)
    out.tensors = adapted
    out.fingerprint = hashlib.sha256(f"{model.fingerprint}+{fp}".encode()).hexdigest()
    out.file_fingerprints = {**model.file_fingerprints, ADAPTER_KEY: fp}
    out.adapter = {"path": str(folder.resolve()), "fingerprint": fp}
    return out


def adapter_of(m) -> dict | None:
    """``{"path", "fingerprint"}`` of an adapted input, None for a plain one."""
    return getattr(m, "adapter", None)


def adapter_paths(models) -> list[Path]:
    """The adapter folders of the adapted inputs among ``models`` (inputs the output must
    lie apart from)."""
    return [Path(a["path"]) for m in models if (a := adapter_of(m)) is not None]
