"""Smoke tests of bench_merge's method rows and of mergekit_agree's "linear fma" reason:
the mergekit recipe each method gets, the child's own peak RSS (not the bench's), a tiny
``--method`` run (floor-direct and streammerge; mergekit is not needed), and the fused
multiply-add classification against torch's own ``addcmul_``. No timing assertions."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    """Import ``bench/<name>.py`` (bench/ is not a package)."""
    key = f"bench_{name}"
    if key not in sys.modules:
        if str(BENCH) not in sys.path:
            sys.path.insert(0, str(BENCH))
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules[key]


def _args(**kw) -> argparse.Namespace:
    base = {"lam": 0.7, "weights": None, "density": None, "gamma": None, "drop": 0.5}
    return argparse.Namespace(**(base | kw))


def test_mergekit_method_config(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    bm = _load("bench_merge")
    data = tmp_path / "trio"
    for method in ("ties", "dare_ties", "breadcrumbs_ties", "linear", "task_arithmetic"):
        cfg = tmp_path / f"{method}.yml"
        bm.mergekit_method_config(data, method, _args(density=[0.4, 0.6]), cfg)
        y = yaml.safe_load(cfg.read_text())
        assert y["merge_method"] == method
        assert (y["dtype"], y["out_dtype"]) == ("float32", "bfloat16")
        assert ("base_model" in y) == (method != "linear")
        assert [m["model"] for m in y["models"]] == [str(data / "a"), str(data / "b")]
        params = [m["parameters"] for m in y["models"]]
        assert [p["weight"] for p in params] == [0.7, 1.0 - 0.7]  # the M3 draw, bit for bit
        if method in bm.DENSITY_METHODS:
            assert [p["density"] for p in params] == [0.4, 0.6]
        else:
            assert all("density" not in p for p in params)
        assert all(("gamma" in p) == (method in bm.GAMMA_METHODS) for p in params)
    # default density: 1 - drop; given weights win over the draw
    rec = bm.method_recipe("dare_ties", _args(weights=[1.0, 2.0], drop=0.3))
    assert rec == {"weights": [1.0, 2.0], "density": [0.7, 0.7]}


def test_run_child_peak_rss_is_the_childs_own(tmp_path: Path) -> None:
    """A bench holding ~300 MiB must not lend its peak to a ~40 MiB child."""
    bm = _load("bench_merge")
    hog = b"x" * (300 * 2**20)  # touched pages: the bench's own RSS grows by 300 MiB
    cmd = [sys.executable, "-c", "b = b'y' * (30 * 2**20); print(len(b))"]
    rc, wall, rss, _, out, source = bm.run_child(cmd, tmp_path / "child.log", 60)
    assert len(hog) and rc == 0 and out.strip() == str(30 * 2**20) and wall > 0
    assert source in ("time %M", "VmHWM poll")
    assert 30 < rss < 200, (rss, source)


def test_bench_methods_smoke(tmp_path: Path) -> None:
    ms = _load("make_synthetic")
    data = tmp_path / "trio"
    ms.make_trio(data, size_gb=0.003, seed=5, quiet=True)
    results = tmp_path / "results"
    cli = Path(sys.executable).parent / "streammerge"
    cmd = [sys.executable, str(BENCH / "bench_merge.py"), "--data", str(data),
           "--results", str(results), "--streammerge-bin", str(cli), "--only",
           "floor-direct,streammerge", "--method", "ties,linear", "--density", "0.5",
           "--no-drop-caches", "--settle", "0", "--no-prime", "--note", "smoke"]  # fmt: skip
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    with open(results / "bench_merge.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["contender"], r["method"]) for r in rows] == [
        ("floor-direct", ""), ("streammerge", "ties"), ("streammerge", "linear")
    ]  # fmt: skip
    floor, ties, linear = rows
    if floor["status"] != "ok":  # O_DIRECT may be refused on a tmpfs
        assert floor["status"].startswith("O_DIRECT refused"), rows
    for r in (ties, linear):
        assert r["status"] == "ok" and r["output_check"] == "ok", r
        assert float(r["peak_rss_mib"]) > 0 and r["rss_source"] and r["note"] == "smoke"
        assert r["x_faster_than_mergekit"] == ""  # no mergekit row in this run
        assert "RSS" in r["targets"] and r["memory"] == "256MiB"
        if floor["status"] == "ok":
            assert float(r["x_of_floor_direct"]) > 0
    assert "x mergekit >= 10: not measured" in ties["targets"]
    assert ties["density"] == "0.5,0.5" and linear["density"] == ""
    assert "--method ties" in ties["command"] and "--base" not in linear["command"]
    readme = (results / "README.md").read_text()
    assert "## Methods" in readme and "| ties | 0.5,0.5 |" in readme
    assert not (data / "out-streammerge-ties").exists()


def _save_bf16(d: Path, name: str, bits: np.ndarray) -> None:
    """One BF16 tensor (given as uint16 bit patterns) in ``d/model.safetensors``."""
    d.mkdir(parents=True, exist_ok=True)
    data = np.ascontiguousarray(bits, dtype="<u2").tobytes()
    meta = {name: {"dtype": "BF16", "shape": [bits.size], "data_offsets": [0, len(data)]}}
    head = json.dumps(meta, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + data)


def test_agree_linear_fma_against_torch_addcmul(tmp_path: Path) -> None:
    """mergekit's linear (``addcmul_`` on float32, then ``div_``) vs SPEC's unfused sum:
    every difference is recognised as "linear fma" by recomputation."""
    torch = pytest.importorskip("torch")
    ma = _load("mergekit_agree")
    rng = np.random.default_rng(0)
    w = [0.7024679465208304, 0.29753205347916956]
    wt = torch.tensor(w, dtype=torch.float32)

    def mergekit_linear(xs16: list[np.ndarray]) -> np.ndarray:
        xs = [torch.from_numpy((x.astype(np.uint32) << 16).view(np.float32)) for x in xs16]
        acc = torch.zeros(xs[0].numel(), dtype=torch.float32)
        for x, c in zip(xs, wt):
            acc.addcmul_(x, c)
        acc.div_(wt.sum())
        return acc.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)

    def spec_linear(xs16: list[np.ndarray]) -> np.ndarray:
        x32 = [(x.astype(np.uint32) << 16).view(np.float32) for x in xs16]
        return ma._round_stored(ma.linear_values(x32, w, True, fused=False), "BF16")

    # about 1 element in 10^6 differs after the bf16 rounding: pick them from a large pool
    pool = [(rng.standard_normal(1 << 22).astype(np.float32).view(np.uint32) >> 16).astype(
        np.uint16) for _ in range(2)]  # fmt: skip
    hit = np.flatnonzero(mergekit_linear(pool) != spec_linear(pool))
    if hit.size == 0:
        pytest.skip("torch's addcmul_ is not fused on this CPU: nothing to classify")
    keep = np.concatenate([np.arange(4096), hit])
    xs16 = [x[keep] for x in pool]
    n = keep.size
    mk, sm = mergekit_linear(xs16), spec_linear(xs16)
    x32 = [(x.astype(np.uint32) << 16).view(np.float32) for x in xs16]
    assert np.array_equal(ma._round_stored(ma.linear_values(x32, w, True, fused=True), "BF16"), mk)
    base = np.zeros(n, np.uint16)
    for name, arr in (("base", base), ("a", xs16[0]), ("b", xs16[1]), ("mk", mk), ("sm", sm)):
        _save_bf16(tmp_path / name, "t", arr)
    rec = {"method": "linear", "tensors": {"t": {"w": w, "normalize": True}}}
    (tmp_path / "sm" / "streammerge.json").write_text(json.dumps(rec))
    res = ma.compare_dirs(tmp_path / "mk", tmp_path / "sm",
                          explain_inputs=[tmp_path / r for r in ("base", "a", "b")])  # fmt: skip
    s = res["summary"]
    differ = int(np.count_nonzero(mk != sm))
    assert s["numel"] - s["equal"] == differ > 0
    assert s["reasons"] == {"threshold tie": 0, "linear fma": differ,
                            "fma/rounding (1 ulp)": 0, "other": 0}  # fmt: skip


def test_bench_methods_has_a_loading_recipe_for_every_method(tmp_path: Path) -> None:
    """bench/bench_methods.py's table covers every method a user can name, and each row's
    recipe is one streammerge's own YAML reader takes (method and parameters as written)."""
    from streammerge.methods.registry import METHODS
    from streammerge.recipe.mergekit_yaml import load_recipe, yaml_params

    bm = _load("bench_methods")
    assert set(METHODS) <= set(bm.RECIPES)
    for role in ("a", "b", "base"):
        (tmp_path / role).mkdir()
    for method in METHODS:
        cfg = tmp_path / f"{method}.yml"
        cfg.write_text(bm.recipe_yaml(method, tmp_path))
        got = load_recipe(cfg)
        assert got.recipe["method"] == method
        base, models, _, shared = bm.RECIPES[method]
        assert len(got.models) + (got.base is not None) == len(set(models) | {base} - {None})
        for name, value in shared.items():
            assert got.recipe["params"][yaml_params()[name].name] == value, (method, name)
