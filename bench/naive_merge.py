"""The naive peer: a full-load torch merge of the streammerge recipe (M3 mixup + DARE).

    python bench/naive_merge.py A B --base C -o OUT --lam 0.6 --drop 0.5 [--seed 0]

Does what the M3 / DARE reference code does: load every shard of A, B and the base C fully
into RAM (``safetensors.torch.load_file``), then per tensor, in float32:

    d_j = model_j - base                                    # task vectors
    d_j = d_j * bernoulli(1 - p) / (1 - p)                  # DARE: drop, rescale
    out = base + lam * d_a + (1 - lam) * d_b                # mixup weights (lam, 1 - lam)

cast back to the base's dtype, and save the whole merged state dict (kept in RAM too) as
safetensors shards with an index. Non-floating tensors are copied from the base. Masks
come from ``torch.bernoulli`` with a seeded generator, so they are *not* the SPEC's Philox
masks: the output is the same recipe, not the same bytes as streammerge. Peak memory is
about 4x the model size (three inputs + the output) plus float32 temporaries.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model directory."""
    index = model_dir / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    single = model_dir / SINGLE_FILE
    if single.exists():
        return [single]
    raise SystemExit(f"error: {model_dir}: no {INDEX_FILE} or {SINGLE_FILE}")


def load_model(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model, loaded fully into memory."""
    state: dict[str, torch.Tensor] = {}
    for f in shard_files(model_dir):
        state.update(load_file(f))
    return state


def merge(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    weights: list[float],
    drop: float,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Merged state dict: base + sum_j w_j * DARE(model_j - base), float32 math."""
    gen = torch.Generator().manual_seed(seed)
    keep_p = 1.0 - drop
    out: dict[str, torch.Tensor] = {}
    for name, tb in base.items():
        if not tb.is_floating_point():
            out[name] = tb.clone()
            continue
        for m in models:
            if name not in m or m[name].shape != tb.shape:
                raise SystemExit(f"error: tensor {name} missing or of another shape in a model")
        xb = tb.float()
        acc = torch.zeros_like(xb)
        for w, m in zip(weights, models, strict=True):
            d = m[name].float() - xb
            if drop > 0:
                keep = torch.bernoulli(torch.full_like(d, keep_p), generator=gen)
                d = d * keep / keep_p
            acc += w * d
        out[name] = (xb + acc).to(tb.dtype)
    return out


def save_sharded(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> list[Path]:
    """Save ``state`` as ``model-0000i-of-0000K.safetensors`` shards plus the index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    fill = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and fill + n > max_shard_bytes:
            shards.append({})
            fill = 0
        shards[-1][name] = t
        fill += n
    k = len(shards)
    weight_map: dict[str, str] = {}
    paths = []
    for i, shard in enumerate(shards):
        fname = SINGLE_FILE if k == 1 else f"model-{i + 1:05d}-of-{k:05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        paths.append(out / fname)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Naive full-load M3 + DARE merge of two fine-tunes (the benchmark's peer)."
    )
    ap.add_argument("a", type=Path, help="fine-tune A (HF directory)")
    ap.add_argument("b", type=Path, help="fine-tune B (HF directory)")
    ap.add_argument("--base", type=Path, required=True, help="base model C (HF directory)")
    ap.add_argument("-o", "--out", type=Path, required=True, help="output directory")
    ap.add_argument(
        "--lam", "--lambda", dest="lam", type=float, default=0.5, help="w = (lam, 1-lam)"
    )
    ap.add_argument("--drop", type=float, default=0.5, help="DARE drop rate p, 0 <= p < 1")
    ap.add_argument("--seed", type=int, default=0, help="torch seed for the DARE masks")
    ap.add_argument(
        "--max-shard-gb", type=float, default=1.0, help="maximum output shard size (GB, 1e9)"
    )
    args = ap.parse_args(argv)
    if not 0 <= args.drop < 1:
        ap.error("--drop must be in [0, 1)")

    t0 = time.perf_counter()
    base = load_model(args.base)
    models = [load_model(args.a), load_model(args.b)]
    t_load = time.perf_counter()
    merged = merge(base, models, [args.lam, 1.0 - args.lam], args.drop, args.seed)
    t_merge = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    paths = save_sharded(merged, args.out, int(args.max_shard_gb * 1e9))
    if (args.base / "config.json").exists():
        shutil.copyfile(args.base / "config.json", args.out / "config.json")
    t_end = time.perf_counter()
    size = sum(p.stat().st_size for p in paths)
    print(
        f"naive merge: {len(merged)} tensors, {size / 1e9:.3f} GB in {len(paths)} shards -> "
        f"{args.out}; load {t_load - t0:.1f} s, merge {t_merge - t_load:.1f} s, "
        f"save {t_end - t_merge:.1f} s, total {t_end - t0:.1f} s "
        f"(lam {args.lam:g}, drop {args.drop:g}, seed {args.seed})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
