"""bench/cpu_cost.py on a tiny trio (one cold-less run of this revision, ``--against``
skipped): the table has every stage, and ``--profile`` prints the CPU line it parses.
No timing assertions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    key = f"bench_{name}"
    if key not in sys.modules:
        if str(BENCH) not in sys.path:
            sys.path.insert(0, str(BENCH))
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def test_parse_profile() -> None:
    cc = _load("cpu_cost")
    line = ("streammerge: CPU seconds per stage: read_cpu_s 0.05, write_cpu_s 0.04, "
            "compute_cpu_s 0.46, stats_cpu_s 0.10 (process 0.93, 15.534 s per input GB)")  # fmt: skip
    assert cc.parse_profile("x\n" + line + "\n") == {
        "read": 0.05, "write": 0.04, "compute": 0.46, "stats": 0.10}  # fmt: skip
    assert cc.parse_profile("streammerge: busy seconds per stage: read_s 1.0") == {}


def test_cpu_cost_smoke(tmp_path: Path, capsys) -> None:
    cc, ms = _load("cpu_cost"), _load("make_synthetic")
    data = tmp_path / "trio"
    ms.make_trio(data, size_gb=0.003, seed=5, quiet=True)
    results = tmp_path / "cpu_cost.md"
    cli = Path(sys.executable).parent / "streammerge"
    rc = cc.main(["--data", str(data), "--methods", "ties", "--repeats", "2", "--no-floor",
                  "--no-warm-up", "--no-drop-caches", "--work", str(tmp_path / "work"),
                  "--streammerge", str(cli), "--results", str(results), "--dtype", "float32"])  # fmt: skip
    assert rc == 0
    assert "dtype: float32" in (tmp_path / "work" / "ties.yml").read_text()
    assert "ties: the outputs of every run are the same bytes" in capsys.readouterr().out
    text = results.read_text()
    assert "| ties | this (" in text and "ratio" not in text
    row = next(r for r in text.splitlines() if r.startswith("| ties |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    total, stages = float(cells[2]), [float(c) for c in cells[3:8]]
    assert total > 0 and all(x >= 0 for x in stages[:4])
    assert abs(sum(stages) - total) < 0.01 * total + 1e-6  # the stages add up to the total


def test_table_ratio_of_a_stage_neither_revision_spends_time_in() -> None:
    cc = _load("cpu_cost")
    s = {"cpu": 2.0, "wall": 8.0, "rss": 400.0, "load": 1.0, "n": 1, "all": [2.0],
         **{st: 0.0 for st in cc.STAGES}}  # fmt: skip
    old = {**s, "cpu": 4.0, "compute": 1.0}
    row = {"method": "della", "gb": 5.9, "floor_s": 4.0, "same": False,
           "this": {**s, "compute": 0.5}, "old": old}  # fmt: skip
    text = cc.table([row], ["this", "old"])
    ratio = next(r for r in text.splitlines() if "**ratio" in r)
    cells = [c.strip() for c in ratio.strip("|").split("|")]
    assert cells[2] == "**0.50**" and "0.50" in cells and "**bytes differ**" in cells
