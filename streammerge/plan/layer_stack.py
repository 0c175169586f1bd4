"""The layer layout of a checkpoint for slices (``streammerge.plan.slices``): its
config.json, its tensors sorted into layers (``model.layers.N.<rest>``) and the tensors
before and after them, and its config's per-layer lists; from headers and config.json
alone (mergekit 0.1.5's architecture definitions, ``_data/architectures/*.json``).

The layer prefix is found by name: every architecture in ``ARCHITECTURES`` (Llama,
Mistral, Qwen 2 / 3, Gemma 2 / 3, Phi-3) keeps its decoder layers under
``model.layers.N.``, the embeddings (``model.embed_tokens.weight``) before them and the
final norm and head (``model.norm.weight``, ``lm_head.weight``) after them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from streammerge.errors import MergeError
from streammerge.io import safejson
from streammerge.io.reader import ModelDir, TensorInfo

#: Architectures (config.json ``architectures[0]``) whose layout slices read: layers under
#: ``model.layers.N.``, ``PRE_WEIGHTS`` before them and ``POST_WEIGHTS`` after them, as
#: mergekit 0.1.5's definitions of the same names (``_data/architectures/*.json``).
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                 "Phi3ForCausalLM")  # fmt: skip
LAYER_PREFIX = "model.layers."
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
PRE_WEIGHTS = ("model.embed_tokens.weight",)
POST_WEIGHTS = ("model.norm.weight", "lm_head.weight")
#: Written only when the last slice's model has it (tied embeddings: it has none).
OPTIONAL = ("lm_head.weight",)
#: config.json key of the layer count (mergekit's ``num_layers_config_key``).
LAYERS_KEY = "num_hidden_layers"
#: Per-layer config lists not named ``*layer*``.
PER_LAYER_KEYS = ("activation_sparsity_pattern",)
MAX_CONFIG_BYTES = 16 * 2**20
#: Output dtype (safetensors) -> config.json's dtype name.
CONFIG_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}



@dataclass
class Stack:
    """One input model read for slicing: its config, its layers (layer j -> the rest of
    each tensor name after ``model.layers.j.`` -> TensorInfo), the tensors outside the
    layers, and its config's per-layer lists."""

    label: str
    model: ModelDir
    config: dict
    layers: list[dict[str, TensorInfo]]
    outside: dict[str, TensorInfo]
    per_layer: dict[str, list]


def read_config(m: ModelDir, label: str) -> dict:
    """``config.json`` of ``m`` as a dict.

    Raises:
        MergeError: missing, unreadable, not a JSON object.
    """
    path = m.path / "config.json"
    todo = f"slices need {label}'s config.json (its architecture and layer count)"
    if not path.is_file():
        raise MergeError("no config.json", m.path, None, todo)
    cfg = safejson.load_file(path, max_depth=64, max_bytes=MAX_CONFIG_BYTES, todo=todo,
                             what="config")  # fmt: skip
    if not isinstance(cfg, dict):
        raise MergeError("config is not a JSON object", path, None, todo)
    return cfg


def architecture_of(cfg: dict) -> str | None:
    """``architectures[0]`` of a config, or None."""
    archs = cfg.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return None


def derived_layer_types(cfg: dict, n: int) -> list[str] | None:
    """``layer_types`` as transformers derives it for a config without one (Gemma 2,
    Gemma 3 text, Qwen 2/3), or None for other model types."""
    kind = cfg.get("model_type")
    if kind == "gemma2":
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if kind == "gemma3_text":
        p = cfg.get("sliding_window_pattern", 6)
        if not isinstance(p, int) or isinstance(p, bool) or p < 1:
            return None
        return ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n)]
    if kind in ("qwen2", "qwen3"):
        window = cfg.get("sliding_window", 4096) if cfg.get("use_sliding_window") else None
        first = cfg.get("max_window_layers", 28)
        return ["sliding_attention" if window is not None and i >= first else "full_attention"
                for i in range(n)]  # fmt: skip
    return None


def per_layer_lists(cfg: dict, n: int) -> dict[str, list]:
    """The config's lists with one entry per layer: keys named ``*layer*`` (or in
    ``PER_LAYER_KEYS``) holding a list of ``n`` entries, plus ``layer_types`` derived when
    absent (``derived_layer_types``)."""
    out = {k: v for k, v in cfg.items()
           if isinstance(v, list) and len(v) == n and ("layer" in k or k in PER_LAYER_KEYS)}  # fmt: skip
    if "layer_types" not in out and (derived := derived_layer_types(cfg, n)) is not None:
        out["layer_types"] = derived
    return out


def read_stack(m: ModelDir, label: str) -> Stack:
    """``m`` read for slicing: its architecture checked, its tensors sorted into layers and
    the tensors before / after them.

    Raises:
        MergeError: an architecture not in ``ARCHITECTURES``, a tensor outside the layers
            that is neither before nor after them in that layout, layers missing between 0
            and the last, a layer count other than config.json's.
    """
    cfg = read_config(m, label)
    arch = architecture_of(cfg)
    if arch not in ARCHITECTURES:
        raise MergeError(f"architecture {arch} of {label} has no known layer layout for slices",
                         m.path, None, f"slices read {', '.join(ARCHITECTURES)} (layers under "
                         f"{LAYER_PREFIX}N.)")  # fmt: skip
    layers: dict[int, dict[str, TensorInfo]] = {}
    outside: dict[str, TensorInfo] = {}
    for name, info in m.tensors.items():
        hit = _LAYER.match(name)
        if hit:
            layers.setdefault(int(hit.group(1)), {})[hit.group(2)] = info
        elif name in PRE_WEIGHTS + POST_WEIGHTS:
            outside[name] = info
        else:
            raise MergeError(f"a tensor outside the layers that the {arch} layout does not "
                             "have (mergekit would not write it)", m.path, name,
                             "remove it from the checkpoint, or merge whole models")  # fmt: skip
    n = max(layers) + 1 if layers else 0
    missing = [j for j in range(n) if j not in layers]
    if missing or cfg.get(LAYERS_KEY) != n:
        raise MergeError(f"{label} has tensors of {len(layers)} layers numbered up to {n - 1} "
                         f"and config.json says {LAYERS_KEY} {cfg.get(LAYERS_KEY)!r}", m.path,
                         None, "fix the checkpoint: its layers must be 0..N-1 as configured")  # fmt: skip
    return Stack(label, m, cfg, [layers[j] for j in range(n)], outside, per_layer_lists(cfg, n))
