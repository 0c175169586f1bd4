"""Write a synthetic Llama-shaped trio (base, fine-tune a, fine-tune b) in Hugging Face layout.

    python bench/make_synthetic.py OUT --size-gb 2 [--layers N] [--dtype bf16] [--seed 0]

writes ``OUT/base``, ``OUT/a``, ``OUT/b``, each a directory with ``config.json`` (a
``LlamaForCausalLM`` config transformers can load), ``model.safetensors.index.json`` and
``model-0000i-of-0000K.safetensors`` shards named and shaped as a real Llama checkpoint
(``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`` with
grouped key/value heads, ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``, the two
RMSNorms per layer, ``model.norm.weight``, ``lm_head.weight``).

Values look like a fine-tune: base weights ~ N(0, 0.02) (norm weights ~ 1 + N(0, 0.02)),
each fine-tune = base (as stored) + N(0, 0.002), rounded to the dtype. The three models
are sharded differently (maximum shard sizes in the ratio 1 : 0.7 : 1.3, scaled with the
model so even a small model has several shards), as real fine-tunes saved by different
scripts are.

Memory stays bounded: tensors are generated in chunks of at most ``CHUNK_ELEMS`` elements
and streamed straight into the three models' shard files (the headers are known up front),
so no model, shard or even whole tensor is ever held in memory. Every chunk's values come
from its own ``numpy.random.default_rng([seed, tensor_index, chunk, role])``, so the
output is deterministic given ``--seed`` (and independent of sharding).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Model shapes, largest first. The first is a real small Llama (TinyLlama-1.1B's hidden,
#: intermediate and vocabulary sizes, 32 heads, 8 key/value heads); the smaller ones keep
#: the Llama layout with shrunk dimensions, for fractional ``--size-gb`` (smoke tests).
SHAPES: list[dict[str, int]] = [
    {"hidden": 2048, "intermediate": 5632, "heads": 32, "kv_heads": 8, "vocab": 32000},
    {"hidden": 512, "intermediate": 1408, "heads": 8, "kv_heads": 2, "vocab": 32000},
    {"hidden": 256, "intermediate": 704, "heads": 4, "kv_heads": 2, "vocab": 8000},
    {"hidden": 128, "intermediate": 352, "heads": 4, "kv_heads": 2, "vocab": 2048},
]
#: dtype name -> (safetensors dtype, bytes per element, torch dtype name for config.json)
DTYPES: dict[str, tuple[str, int, str]] = {
    "bf16": ("BF16", 2, "bfloat16"),
    "f16": ("F16", 2, "float16"),
    "f32": ("F32", 4, "float32"),
}
ROLES = ("base", "a", "b")
#: Nominal maximum shard sizes (bytes) of base, a, b for a >= 4 GB model; scaled down
#: linearly with the model below that, so every model has several shards.
NOMINAL_SHARD_BYTES = {"base": 1_000_000_000, "a": 700_000_000, "b": 1_300_000_000}
SCALE_REF_BYTES = 4_000_000_000
#: Largest number of elements generated at once (64 MiB of float32).
CHUNK_ELEMS = 16 * 2**20
BASE_STD = 0.02
DELTA_STD = 0.002
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model, in checkpoint order."""

    name: str
    shape: tuple[int, ...]
    is_norm: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def layer_tensors(i: int, s: dict[str, int]) -> list[TensorSpec]:
    """The tensors of decoder layer ``i`` in the order ``LlamaDecoderLayer`` registers them."""
    h, inter = s["hidden"], s["intermediate"]
    head_dim = h // s["heads"]
    kv = s["kv_heads"] * head_dim
    p = f"model.layers.{i}."
    return [
        TensorSpec(p + "self_attn.q_proj.weight", (h, h), False),
        TensorSpec(p + "self_attn.k_proj.weight", (kv, h), False),
        TensorSpec(p + "self_attn.v_proj.weight", (kv, h), False),
        TensorSpec(p + "self_attn.o_proj.weight", (h, h), False),
        TensorSpec(p + "mlp.gate_proj.weight", (inter, h), False),
        TensorSpec(p + "mlp.up_proj.weight", (inter, h), False),
        TensorSpec(p + "mlp.down_proj.weight", (h, inter), False),
        TensorSpec(p + "input_layernorm.weight", (h,), True),
        TensorSpec(p + "post_attention_layernorm.weight", (h,), True),
    ]


def model_tensors(layers: int, s: dict[str, int]) -> list[TensorSpec]:
    """Every tensor of a ``LlamaForCausalLM`` (untied embeddings), in state-dict order."""
    out = [TensorSpec("model.embed_tokens.weight", (s["vocab"], s["hidden"]), False)]
    for i in range(layers):
        out += layer_tensors(i, s)
    out.append(TensorSpec("model.norm.weight", (s["hidden"],), True))
    out.append(TensorSpec("lm_head.weight", (s["vocab"], s["hidden"]), False))
    return out


def _fixed_and_layer_numel(s: dict[str, int]) -> tuple[int, int]:
    fixed = 2 * s["vocab"] * s["hidden"] + s["hidden"]
    per_layer = sum(t.numel for t in layer_tensors(0, s))
    return fixed, per_layer


def choose_shape(size_gb: float | None, layers: int | None, itemsize: int) -> tuple[dict, int]:
    """Pick (shape, layer count) for a model of about ``size_gb`` GB (1e9 bytes) per model.

    The real-Llama shape is used whenever it fits at least two layers; smaller targets
    shrink the dimensions. ``layers`` overrides the layer count (with the real shape when
    no size is given).
    """
    if size_gb is None:
        return SHAPES[0], layers if layers is not None else 8
    target = size_gb * 1e9
    if target <= 0:
        raise ValueError("--size-gb must be positive")
    shape = SHAPES[-1]
    for s in SHAPES:
        fixed, per_layer = _fixed_and_layer_numel(s)
        if (fixed + 2 * per_layer) * itemsize <= target:
            shape = s
            break
    if layers is None:
        fixed, per_layer = _fixed_and_layer_numel(shape)
        layers = max(1, round((target / itemsize - fixed) / per_layer))
    return shape, layers


def llama_config(shape: dict[str, int], layers: int, torch_dtype: str) -> dict:
    """A ``LlamaForCausalLM`` config.json for ``shape`` (TinyLlama-like defaults)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": shape["hidden"] // shape["heads"],
        "hidden_act": "silu",
        "hidden_size": shape["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": shape["intermediate"],
        "max_position_embeddings": 2048,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": shape["heads"],
        "num_hidden_layers": layers,
        "num_key_value_heads": shape["kv_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "vocab_size": shape["vocab"],
    }


def plan_shards(tensors: list[TensorSpec], itemsize: int, max_bytes: int) -> list[list[int]]:
    """Greedy sharding as ``save_pretrained`` does it: tensors in order, a new shard when
    the next tensor would overflow ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[int]] = [[]]
    fill = 0
    for k, t in enumerate(tensors):
        nbytes = t.numel * itemsize
        if shards[-1] and fill + nbytes > max_bytes:
            shards.append([])
            fill = 0
        shards[-1].append(k)
        fill += nbytes
    return shards


def shard_header(tensors: list[TensorSpec], idx: list[int], st_dtype: str, itemsize: int) -> bytes:
    """The safetensors header of a shard holding ``idx`` in order (8-byte aligned)."""
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    off = 0
    for k in idx:
        t = tensors[k]
        n = t.numel * itemsize
        meta[t.name] = {"dtype": st_dtype, "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    js = json.dumps(meta, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return len(js).to_bytes(8, "little") + js


def shard_name(i: int, k: int) -> str:
    return f"model-{i + 1:05d}-of-{k:05d}.safetensors"


def to_dtype_bytes(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(stored value as float32, its bytes) of float32 ``x`` rounded to ``dtype`` (RNE)."""
    if dtype == "f32":
        return x, x
    if dtype == "f16":
        h = x.astype(np.float16)
        return h.astype(np.float32), h
    u = x.view(np.uint32)
    # round to nearest even on the upper 16 bits (no NaNs here)
    r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(
        np.uint16
    )
    back = (r.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return back, r


def _chunks(t: TensorSpec) -> list[tuple[int, int]]:
    """Element ranges [start, stop) of ``t``'s generation chunks (whole rows)."""
    row = t.shape[-1] if len(t.shape) > 1 else t.numel
    rows_per = max(1, CHUNK_ELEMS // row)
    step = rows_per * row
    return [(s, min(s + step, t.numel)) for s in range(0, t.numel, step)]


def make_trio(
    out: str | Path,
    size_gb: float | None = None,
    layers: int | None = None,
    dtype: str = "bf16",
    seed: int = 0,
    quiet: bool = False,
) -> dict:
    """Write ``out/base``, ``out/a``, ``out/b``; returns a summary (also ``out/synthetic.json``)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}")
    st_dtype, itemsize, torch_dtype = DTYPES[dtype]
    shape, layers = choose_shape(size_gb, layers, itemsize)
    tensors = model_tensors(layers, shape)
    model_bytes = sum(t.numel for t in tensors) * itemsize
    scale = min(1.0, model_bytes / SCALE_REF_BYTES)
    out = Path(out)
    t0 = time.perf_counter()

    config = llama_config(shape, layers, torch_dtype)
    plans: dict[str, list[list[int]]] = {}
    where: dict[str, list[int]] = {}  # role -> shard number of each tensor
    for role in ROLES:
        d = out / role
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("model*.safetensors"):
            old.unlink()
        max_bytes = max(1, int(NOMINAL_SHARD_BYTES[role] * scale))
        plans[role] = plan_shards(tensors, itemsize, max_bytes)
        where[role] = [0] * len(tensors)
        k = len(plans[role])
        weight_map = {}
        for si, idx in enumerate(plans[role]):
            for ti in idx:
                where[role][ti] = si
                weight_map[tensors[ti].name] = shard_name(si, k)
        (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        index = {"metadata": {"total_size": model_bytes}, "weight_map": weight_map}
        (d / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    open_files: dict[str, tuple[int, object]] = {}  # role -> (shard number, file)

    def file_for(role: str, ti: int):
        si = where[role][ti]
        cur = open_files.get(role)
        if cur is not None and cur[0] == si:
            return cur[1]
        if cur is not None:
            _close(cur[1])
        k = len(plans[role])
        f = open(out / role / shard_name(si, k), "wb")  # noqa: SIM115 (closed in _close)
        f.write(shard_header(tensors, plans[role][si], st_dtype, itemsize))
        open_files[role] = (si, f)
        return f

    def _close(f) -> None:
        f.flush()
        os.fsync(f.fileno())
        f.close()

    try:
        for ti, t in enumerate(tensors):
            for ci, (a, b) in enumerate(_chunks(t)):
                n = b - a
                rng = np.random.default_rng([seed, ti, ci, 0])
                x = rng.standard_normal(n, dtype=np.float32)
                x *= np.float32(BASE_STD)
                if t.is_norm:
                    x += np.float32(1.0)
                base_f32, base_bytes = to_dtype_bytes(x, dtype)
                file_for("base", ti).write(base_bytes.tobytes())
                for r, role in enumerate(ROLES[1:], start=1):
                    rng = np.random.default_rng([seed, ti, ci, r])
                    d = rng.standard_normal(n, dtype=np.float32)
                    d *= np.float32(DELTA_STD)
                    d += base_f32
                    _, ft_bytes = to_dtype_bytes(d, dtype)
                    file_for(role, ti).write(ft_bytes.tobytes())
    finally:
        for _, f in open_files.values():
            _close(f)
    seconds = time.perf_counter() - t0

    summary = {
        "generator": "bench/make_synthetic.py",
        "seed": seed,
        "dtype": dtype,
        "size_gb_requested": size_gb,
        "layers": layers,
        "shape": shape,
        "tensors": len(tensors),
        "params": model_bytes // itemsize,
        "model_bytes": model_bytes,
        "models": {},
        "seconds": round(seconds, 3),
    }
    for role in ROLES:
        files = sorted((out / role).glob("model-*.safetensors"))
        summary["models"][role] = {
            "path": str(out / role),
            "shards": len(files),
            "file_bytes": sum(f.stat().st_size for f in files),
            "max_shard_bytes": max(f.stat().st_size for f in files),
        }
    (out / "synthetic.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if not quiet:
        print(
            f"wrote {out}: Llama hidden={shape['hidden']} intermediate={shape['intermediate']} "
            f"heads={shape['heads']}/{shape['kv_heads']}kv vocab={shape['vocab']} "
            f"layers={layers}, {len(tensors)} tensors, {summary['params'] / 1e6:.1f}M params, "
            f"{dtype}, seed {seed}"
        )
        total = 0
        for role, m in summary["models"].items():
            total += m["file_bytes"]
            print(
                f"  {role:4s} {m['file_bytes'] / 1e9:7.3f} GB in {m['shards']} shards "
                f"(largest {m['max_shard_bytes'] / 1e6:.1f} MB)  {m['path']}"
            )
        print(f"  {total / 1e9:.3f} GB in {seconds:.1f} s ({total / 1e9 / seconds:.2f} GB/s)")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Write a synthetic Llama-shaped base + two fine-tunes (HF layout).",
    )
    ap.add_argument("out", type=Path, help="output directory (gets base/, a/, b/)")
    ap.add_argument(
        "--size-gb",
        type=float,
        default=None,
        help="approximate size of each model in GB (1e9 bytes): 1, 2, 4, 8, 16 use the real "
        "Llama shape and pick the layer count; fractions (e.g. 0.05) shrink the dimensions",
    )
    ap.add_argument("--layers", type=int, default=None, help="number of decoder layers")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.size_gb is None and args.layers is None:
        args.size_gb = 1.0
    if args.layers is not None and args.layers < 1:
        ap.error("--layers must be >= 1")
    make_trio(args.out, args.size_gb, args.layers, args.dtype, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
