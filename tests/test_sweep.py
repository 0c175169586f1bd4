"""``streammerge sweep``: every output equals the single merge its row says repeats it (one
read for all draws), scores from an evaluator, a failing evaluator reported in its row,
the best kept, results written."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
from conftest import load_dir, make_trio, run_cli, write_model

from streammerge.api import Options
import streammerge.jobs.sweep as sw


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.safetensors"))}


def _single_merge(tmp_path: Path, d) -> Path:
    """The output of the single merge draw ``d``'s row names (its repeat command, run)."""
    argv = shlex.split(d.command)[1:]
    single = tmp_path / f"single-{d.name}"
    argv[argv.index("-o") + 1] = str(single)
    res = run_cli([*argv, "--shard-size", "40KB", "--quiet"])
    assert res.returncode == 0, res.stderr
    return single


@pytest.mark.parametrize(
    "n_models, recipe",
    [
        (2, {"method": "ties", "density": 0.4}),
        (2, {}),  # dare_linear, p = 0.5
        (3, {"method": "breadcrumbs_ties", "density": 0.6, "gamma": 0.1}),
    ],
)
def test_each_draw_is_the_single_merge_its_row_names(tmp_path, n_models, recipe):
    base, a, b = make_trio(tmp_path, big=30_000)
    models = [a, b]
    if n_models == 3:
        ts = {n: t for n, t in load_dir(b).items()}
        ts = {n: (t * 1.01 if t.is_floating_point() else t) for n, t in ts.items()}
        models.append(write_model(tmp_path / "c", ts, shards=2))
    out = tmp_path / "sweep"
    r = sw.sweep(models, base, out, draws=3, seed=11, sweep_seed=4, keep="all",
                 options=Options(memory="48MiB", shard_size="40KB"), **recipe)  # fmt: skip
    assert len(r.draws) == 4 and r.draws[-1].name == sw.FIXED
    assert len({d.weights for d in r.draws}) == 4
    for d in r.draws:
        single = _single_merge(tmp_path, d)
        assert _files(single) == _files(d.dir) and len(_files(single)) > 1, d.name
        rec = json.loads((d.dir / "streammerge.json").read_text())
        assert rec["seed"] == 11 and rec["weights"] == pytest.approx(list(d.weights))


def test_sweep_reads_the_inputs_once(tmp_path):
    base, a, b = make_trio(tmp_path, big=50_000)
    r = sw.sweep([a, b], base, tmp_path / "s", draws=4, seed=1, sweep_seed=1, keep="all")
    import streammerge

    single = streammerge.merge([a, b], base, tmp_path / "one", seed=1, lam=0.5)
    assert r.bytes_read == single.bytes_read


def test_scores_failures_keep_best_and_results(tmp_path):
    base, a, b = make_trio(tmp_path)
    script = tmp_path / "score.py"
    # score = λ from the draw's record; the draw with the smallest λ crashes
    script.write_text(
        "import json, sys\n"
        "rec = json.load(open(sys.argv[1] + '/streammerge.json'))\n"
        "lam = rec['lambda']\n"
        "if lam < 0.2: sys.exit('boom')\n"
        "print('loading...')\n"
        "print(json.dumps({'acc': lam, 'loss': 1 - lam}))\n"
    )
    out = tmp_path / "s"
    res = run_cli(["sweep", str(a), str(b), "--base", str(base), "-o", str(out), "--grid",
                   "--draws", "5", "--seed", "2", "--eval",
                   f"{sys.executable} {script} {{out}}", "--eval-select", "acc", "--quiet"])  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads((out / "sweep.json").read_text())
    lams = [d["lambda"] for d in doc["draws"]]
    assert lams == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert doc["draws"][0]["score"] is None and "boom" in doc["draws"][0]["error"]
    assert doc["draws"][3]["scores"] == {"acc": 0.75, "loss": 0.25}
    assert doc["best"] == "draw-05" and doc["fixed"]["score"] == 0.5
    kept = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert kept == ["draw-05", "fixed"]
    assert "draw-05" in res.stdout and "--lambda 1.0" in res.stdout
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "sweep.csv").read_text().count("\n") == 7  # header, 5 draws, the fixed reference


def test_without_evaluator_all_outputs_stay(tmp_path):
    import streammerge

    base, a, b = make_trio(tmp_path)
    r = streammerge.sweep([a, b], base, tmp_path / "s", draws=2, seed=3, sweep_seed=3)
    assert r.best is None and all(d.dir.is_dir() for d in r.draws)


def test_bad_sweep_arguments_write_nothing(tmp_path):
    base, a, b = make_trio(tmp_path)
    for extra, msg in ((["--weights", "1,1"], "draws the weights"),
                       (["--draws", "0"], "--draws must be >= 1"),
                       (["--method", "ties", "--drop", "0.3"], "--drop does not apply")):  # fmt: skip
        res = run_cli(
            ["sweep", str(a), str(b), "--base", str(base), "-o", str(tmp_path / "s"), *extra]
        )
        assert res.returncode == 2 and msg in res.stderr, res.stderr
        assert not (tmp_path / "s").exists()


def test_a_row_method_sweep_is_the_single_merges(tmp_path):
    """slerp's draws share one read's statistics, not its t: each output is its single
    merge (its coefficients were cached once for the first draw's t)."""
    _, a, b = make_trio(tmp_path, big=30_000)
    out = tmp_path / "sweep"
    r = sw.sweep([a, b], None, out, draws=2, seed=3, sweep_seed=5, keep="all", method="slerp",
                 options=Options(memory="48MiB", shard_size="40KB"))  # fmt: skip
    assert len({d.weights for d in r.draws}) == 3
    for d in r.draws:
        assert _files(_single_merge(tmp_path, d)) == _files(d.dir), d.name


@pytest.mark.parametrize("method, base", [("multislerp", True), ("karcher", False)])
def test_methods_with_weighted_statistics_are_refused(tmp_path, method, base):
    """multislerp's and karcher's statistics depend on the weights, which a sweep draws per
    output: refused in one line, nothing written."""
    b0, a, b = make_trio(tmp_path, big=3_000)
    out = tmp_path / "sweep"
    with pytest.raises(ValueError, match=f"a sweep cannot run {method}"):
        sw.sweep([a, b], b0 if base else None, out, draws=2, seed=3, keep="all", method=method)
    assert not out.exists()
    r = run_cli(["sweep", str(a), str(b), "--method", method, "--draws", "2", "-o", str(out)]
                + (["--base", str(b0)] if base else []))  # fmt: skip
    assert r.returncode == 2 and "a sweep cannot run" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
