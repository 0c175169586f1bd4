"""``streammerge sweep`` hardening: evaluator scores must be finite and sweep.json strict
JSON, the evaluator runs without a shell and within a timeout, the disk must hold every
output at once, errors are one line, ``--plan`` writes nothing, one seed repeats a sweep,
and the command is reachable as ``python -m streammerge``."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
from conftest import make_trio, run_cli


def _run_module(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streammerge", *argv], check=False,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_python_dash_m_and_help_name_the_sweep():
    top = _run_module("--help")
    assert top.returncode == 0, top.stderr
    assert "streammerge sweep --help" in " ".join(top.stdout.split())  # however it wraps
    sub = _run_module("sweep", "--help")
    assert sub.returncode == 0, sub.stderr
    assert sub.stdout.startswith("usage: streammerge sweep") and "--eval-timeout" in sub.stdout
    assert "3 an evaluator ran and no draw was scored" in " ".join(sub.stdout.split())


def _strict_json(text: str):
    """``json.loads`` that refuses NaN / Infinity / -Infinity (strict JSON)."""
    import json

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _sweep_argv(tmp_path, base, a, b, out, *extra: str) -> list[str]:
    return ["sweep", str(a), str(b), "--base", str(base), "-o", str(out), "--quiet", *extra]


def test_a_nan_score_fails_its_draw_and_sweep_json_is_strict(tmp_path):
    base, a, b = make_trio(tmp_path)
    script = tmp_path / "score.py"
    # acc = λ, but NaN for λ = 1 (what json.dumps writes for float("nan")); ppl infinite
    script.write_text(
        "import json, sys\n"
        "lam = json.load(open(sys.argv[1] + '/streammerge.json'))['lambda']\n"
        "if lam == 1.0: print(json.dumps({'acc': float('nan'), 'ppl': 1.0}))\n"
        "else: print(json.dumps({'acc': lam, 'ppl': float('inf')}))\n"
    )
    out = tmp_path / "s"
    res = run_cli(_sweep_argv(tmp_path, base, a, b, out, "--grid", "--draws", "3", "--eval",
                              f"{sys.executable} {script} {{out}}", "--eval-select", "acc"))  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = _strict_json((out / "sweep.json").read_text())
    d1, d2, d3 = doc["draws"]
    assert [d1["lambda"], d2["lambda"], d3["lambda"]] == [0.0, 0.5, 1.0]
    assert d3["score"] is None and "not a finite number" in d3["error"]
    assert '{"acc": NaN, "ppl": 1.0}' in d3["error"]  # the evaluator's last line
    assert doc["best"] == "draw-02" and d2["score"] == 0.5
    assert d1["scores"] == {"acc": 0.0, "ppl": None} and d1["nonfinite_scores"] == {"ppl": "inf"}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["draw-02", "fixed"]


def test_sweep_csv_names_each_column_once(tmp_path):
    import csv

    base, a, b = make_trio(tmp_path)
    for k, (shown, named) in enumerate((("print(0.25)", []),
                                        ("print('{\"score\": 1, \"acc\": 2}')",
                                         ["score:acc", "score:score"]))):  # fmt: skip
        out = tmp_path / f"s{k}"
        res = run_cli(_sweep_argv(tmp_path, base, a, b, out, "--draws", "1", "--seed", "1",
                                  "--eval", f"{sys.executable} -c {shlex.quote(shown)}",
                                  "--eval-select", "acc" if named else "score"))  # fmt: skip
        assert res.returncode == 0, res.stderr
        with open(out / "sweep.csv", newline="") as f:
            header = next(csv.reader(f))
        assert header == ["name", "lambda", "weights", "score", *named, "error", "kept", "command"]


def test_eval_runs_without_a_shell_and_gets_the_exact_path(tmp_path):
    import json

    base, a, b = make_trio(tmp_path)
    log = tmp_path / "argv.log"
    script = tmp_path / "rec.py"
    script.write_text(
        "import json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "print(1)\n"
    )
    out = tmp_path / 'o $(touch PWNED) `touch PWNED2` "q" \'s\''
    # {out} quoted (the old advice), and inside a word: each is exactly one argument
    res = run_cli(_sweep_argv(tmp_path, base, a, b, out, "--draws", "1", "--keep", "all",
                              "--eval", f'{sys.executable} {script} "{{out}}" --model={{out}}'),
                  cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = [json.loads(line) for line in log.read_text().splitlines()]
    assert got == [[str(out / n), f"--model={out / n}"] for n in ("draw-01", "fixed")]
    assert not list(tmp_path.rglob("PWNED*"))


def _dead(pid: int) -> bool:
    """True when ``pid`` is gone or a zombie (killed, not yet reaped by its new parent)."""
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True



@pytest.mark.parametrize("evaluator_hangs", [True, False])
def test_eval_timeout_kills_the_evaluators_process_group(tmp_path, evaluator_hangs):
    import json
    import time

    base, a, b = make_trio(tmp_path)
    pids = tmp_path / "pids"
    script = tmp_path / "slow.py"
    # a child sleeping with the evaluator's stdout; then the evaluator hangs, or prints and exits
    script.write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(pids)!r}, 'a').write(f'{{child.pid}}\\n')\n"
        + ("time.sleep(300)\n" if evaluator_hangs else "print(0.5, flush=True)\n")
    )
    out = tmp_path / "s"
    t0 = time.monotonic()
    res = run_cli(_sweep_argv(tmp_path, base, a, b, out, "--draws", "1", "--keep", "all",
                              "--eval", f"{sys.executable} {script} {{out}}",
                              "--eval-timeout", "2"), timeout=120)  # fmt: skip
    assert time.monotonic() - t0 < 60
    children = [int(x) for x in pids.read_text().split()]
    assert len(children) == 2 and all(_dead(p) for p in children)
    doc = _strict_json((out / "sweep.json").read_text())
    rows = [*doc["draws"], doc["fixed"]]
    if evaluator_hangs:
        assert res.returncode != 0
        assert all(r["score"] is None and r["error"] == "timed out after 2 s" for r in rows)
    else:
        assert res.returncode == 0, res.stderr
        assert all(r["score"] == 0.5 for r in rows), json.dumps(rows)


def test_disk_must_hold_every_output_at_once(tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    from streammerge.api import Options, prepare
    from streammerge.cli import main
    from streammerge.output.files import DISK_MARGIN_BYTES

    base, a, b = make_trio(tmp_path)  # each output: one 9768-byte shard and config.json
    usage = namedtuple("usage", "total used free")
    free = DISK_MARGIN_BYTES + 30_000  # room for one output, not for 4
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - free, free))
    prepare([a, b], base, tmp_path / "one", {"lam": 0.5, "seed": 1}, Options())  # one fits
    out = tmp_path / "s"
    code = main(["sweep", str(a), str(b), "--base", str(base), "-o", str(out), "--draws", "3"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("streammerge: error: not enough free disk space: need 0.07 GB")
    assert not out.exists() and not (tmp_path / "one").exists()


@pytest.mark.parametrize(
    "extra, names",
    [
        ([], "MODEL MODEL"),  # bare `streammerge sweep` (the models are dropped below)
        (["--sweep-seed", "-1"], "--sweep-seed"),
        (["--eval", "no-such-evaluator-xyz {out}"], "no-such-evaluator-xyz"),
        (["--eval", 'python "{out}'], "--eval cannot be split"),
        (["--eval", "true", "--eval-timeout", "0"], "--eval-timeout must be a positive number"),
        (["--resume"], "--resume"),
        (["-o", "missing-parent/s"], "parent directory does not exist"),
    ],
)
def test_sweep_errors_are_one_line_exit_2_nothing_written(tmp_path, extra, names):
    base, a, b = make_trio(tmp_path)
    models = [str(a), str(b), "--base", str(base)] if extra else []
    res = run_cli(["sweep", *models, "-o", str(tmp_path / "s"), *extra], cwd=tmp_path)
    err = res.stderr.splitlines()
    assert res.returncode == 2 and len(err) == 1, res.stderr
    assert err[0].startswith("streammerge: error: ") and names in err[0], err[0]
    assert res.stdout == "" and not (tmp_path / "s").exists()
    assert not (tmp_path / "missing-parent").exists()


def test_plan_prints_the_draws_and_writes_nothing(tmp_path):
    import json

    base, a, b = make_trio(tmp_path)
    out = tmp_path / "s"
    argv = _sweep_argv(tmp_path, base, a, b, out, "--draws", "2", "--sweep-seed", "5",
                       "--method", "ties", "--density", "0.5")  # fmt: skip
    text = run_cli([*argv, "--plan"])
    js = run_cli([*argv, "--plan", "--json"])
    assert text.returncode == 0 and js.returncode == 0, text.stderr + js.stderr
    assert not out.exists()
    d = _strict_json(js.stdout)
    assert [o["name"] for o in d["outputs"]] == ["draw-01", "draw-02", "fixed"]
    assert d["merge"]["memory"]["outputs"] == 3 and d["bytes_written"] == 3 * 9768
    for o in d["outputs"]:
        assert f"{o['name']}: λ {o['lambda']!r}" in text.stdout
    assert "nothing written by --plan" in text.stdout and d["repeat"] in text.stdout
    real = run_cli([*argv, "--keep", "all"])  # the plan's draws are the sweep's
    assert real.returncode == 0, real.stderr
    doc = json.loads((out / "sweep.json").read_text())
    assert [r["lambda"] for r in [*doc["draws"], doc["fixed"]]] == \
        [o["lambda"] for o in d["outputs"]]  # fmt: skip
    assert doc["bytes_read"] == d["bytes_read"] and doc["seed"] == d["seed"]


def test_no_draw_scored_exits_3_keeps_every_output_and_says_why(tmp_path):
    base, a, b = make_trio(tmp_path)
    out = tmp_path / "s"
    script = tmp_path / "bad.py"
    script.write_text("import sys\nsys.exit('no GPU for the evaluator')\n")
    res = run_cli(_sweep_argv(tmp_path, base, a, b, out, "--draws", "2",
                              "--eval", f"{sys.executable} {script} {{out}}"))  # fmt: skip
    assert res.returncode == 3, res.stderr
    assert res.stderr.splitlines() == [
        f"streammerge: error: no draw was scored (draw-01: exit 1: no GPU for the evaluator): "
        f"all 3 outputs are kept in {out}, none could be chosen: fix the evaluator, then score "
        "them or re-run"
    ]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["draw-01", "draw-02", "fixed"]
    doc = _strict_json((out / "sweep.json").read_text())
    assert doc["best"] is None and doc["no_draw_scored"].startswith("draw-01: exit 1")


def test_the_sweep_seed_alone_repeats_the_sweep_byte_for_byte(tmp_path):
    import json

    base, a, b = make_trio(tmp_path, big=20_000)
    runs = []
    for k in range(2):
        out = tmp_path / f"s{k}"
        res = run_cli(_sweep_argv(tmp_path, base, a, b, out, "--draws", "2", "--keep", "all",
                                  "--sweep-seed", "7"))  # dare_linear: random masks  # fmt: skip
        assert res.returncode == 0, res.stderr
        doc = json.loads((out / "sweep.json").read_text())
        assert f"--sweep-seed 7 --seed {doc['seed']}" in doc["repeat"]
        assert f"streammerge: repeat this sweep with: {doc['repeat']}\n" in res.stdout
        runs.append({(d, f.name): f.read_bytes() for d in ("draw-01", "draw-02", "fixed")
                     for f in sorted((out / d).glob("*.safetensors"))})  # fmt: skip
    assert runs[0] == runs[1] and len(runs[0]) == 3


def test_streams_as_the_single_merge_table_on_stderr_closing_on_stdout(tmp_path):
    base, a, b = make_trio(tmp_path)
    out = tmp_path / "s"
    res = run_cli(["sweep", str(a), str(b), "--base", str(base), "-o", str(out), "--draws", "1",
                   "--eval", f"{sys.executable} -c print(0.5)"])  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stderr.endswith("\n") and "streammerge sweep" in res.stderr
    assert "draw-01" in res.stderr and "│" not in res.stdout
    assert res.stdout.endswith("\n")
    assert all(line.startswith("streammerge: ") for line in res.stdout.splitlines())
    assert "streammerge: best draw-01 (score 0.5)" in res.stdout
