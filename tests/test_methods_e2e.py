"""Every method of the table, end to end: each merged tensor is bit-identical to SPEC v2
recomputed independently (tests/spec_reference.py) from the inputs and streammerge.json,
and the recorded thresholds equal the ones recomputed by sorting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    TORCH_DTYPES,
    expected_merge_v2,
    load_dir,
    make_trio,
    merge_argv,
    output_bytes,
    run_cli,
    write_model,
)

import streammerge
from streammerge.methods.registry import METHODS

ALL = [m for m, row in METHODS.items() if row.row_op is None]  # task-vector methods


def _third_model(tmp: Path, base: Path, dtype: str, shards: int = 2, seed: int = 9) -> Path:
    """A third fine-tune of ``base`` (its float tensors plus noise), sharded its own way."""
    g = torch.Generator().manual_seed(seed)
    ts = {}
    for name, t in load_dir(base).items():
        if name == "pooler.weight":
            continue
        if t.is_floating_point():
            t = (t.float() + torch.randn(t.shape, generator=g) * 0.002).to(TORCH_DTYPES[dtype])
        ts[name] = t
    return write_model(tmp / "c", ts, shards=shards)


def _check(out: Path, base: Path | None, models: list[Path]) -> dict:
    want, ths = expected_merge_v2(out, base, models)
    got = output_bytes(out)
    assert set(got) == set(want)
    for name in want:
        if not np.array_equal(got[name], want[name]):
            bad = np.flatnonzero(got[name] != want[name])
            raise AssertionError(f"{name}: {bad.size} bytes differ, first at {bad[:5]}")
    rec = json.loads((out / "streammerge.json").read_text())
    for name, th in ths.items():
        assert rec["tensors"][name]["thresholds"] == th, name
    return rec


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
@pytest.mark.parametrize("n_models", [2, 3])
@pytest.mark.parametrize("weighting", ["given", "m3"])
@pytest.mark.parametrize("method", ALL)
def test_every_method_is_bit_exact(tmp_path, method, weighting, n_models, dtype):
    base, a, b = make_trio(tmp_path, dtype=dtype, shards=(1, 3, 2), seed=n_models)
    models = [a, b] + ([_third_model(tmp_path, base, dtype)] if n_models == 3 else [])
    kw = {"seed": 123}
    if weighting == "given":
        kw["weights"] = [0.7, -0.2, 0.5][:n_models]
    else:
        kw["alpha"] = 0.8
    row = METHODS[method]
    if row.sparse.uses_density:
        kw["density"] = [0.4, 0.05, 1.0][:n_models]
    if row.sparse.uses_gamma:
        kw["gamma"] = 0.1
    s = streammerge.merge(
        models, base if row.uses_base else None, tmp_path / "out", method=method, **kw
    )
    rec = _check(tmp_path / "out", base if row.uses_base else None, models)
    assert rec["method"] == method and s.method == method
    if weighting == "m3":
        assert rec["mixup"] is not None and len(rec["mixup"]) == n_models
        assert rec["tensors"]["embed.weight"]["w"] == pytest.approx(rec["mixup"])


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties", "breadcrumbs"])
def test_large_tensors_read_once_per_pass_and_model_scope(tmp_path, method):
    """A tensor larger than a slot takes the multi-pass route (read per pass) and gives the
    same bytes as when held; trim_scope model computes one population per fine-tune."""
    base, a, b = make_trio(tmp_path, dtype="BF16", shards=(2, 1, 3), big=2_000_000)
    c = _third_model(tmp_path, base, "BF16")
    kw = {"method": method, "seed": 5, "weights": [1.0, 0.6, 0.8], "density": 0.3}
    if METHODS[method].sparse.uses_gamma:
        kw["gamma"] = 0.05
    small = streammerge.merge([a, b, c], base, tmp_path / "small", memory="48MiB", **kw)
    large = streammerge.merge([a, b, c], base, tmp_path / "large", memory="256MiB", **kw)
    assert small.bytes_read > large.bytes_read or not METHODS[method].sparse.stats
    assert output_bytes(tmp_path / "small").keys() == output_bytes(tmp_path / "large").keys()
    for name, v in output_bytes(tmp_path / "small").items():
        assert np.array_equal(v, output_bytes(tmp_path / "large")[name]), name
    _check(tmp_path / "small", base, [a, b, c])
    if METHODS[method].sparse.stats:
        reads = {}
        for d in ("BF16", "F32"):
            s = streammerge.merge([a, b, c], base, tmp_path / f"model-{d}", memory="48MiB",
                                  trim_scope="model", compute_dtype=d, **kw)  # fmt: skip
            rec = _check(tmp_path / f"model-{d}", base, [a, b, c])
            th = {json.dumps(v["thresholds"]) for v in rec["tensors"].values()}
            assert len(th) == 1  # one population: the same thresholds for every tensor
            reads[d] = s.bytes_read
        # bf16 magnitudes: the model is read once for its statistics (no low histograms);
        # float32: twice. Each statistics read reads the merged tensors (M bytes).
        merged = reads["BF16"] - large.bytes_read
        assert merged > 0 and reads["F32"] - reads["BF16"] == merged, reads


def test_cli_methods_flags_and_record(tmp_path):
    base, a, b = make_trio(tmp_path)
    out = tmp_path / "out"
    r = run_cli(
        merge_argv([a, b], base, out, "--method", "ties", "--density", "0.3,0.5",
                   "--weights", "1,0.5", "--seed", "3", "--no-normalize", "--quiet")
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "ties" in r.stdout.splitlines()[-1]
    rec = _check(out, base, [a, b])
    t = rec["tensors"]["layers.0.mlp.up.weight"]
    assert t["density"] == [0.3, 0.5] and t["normalize"] is False and t["w"] == [1.0, 0.5]
    assert all(len(x) == 1 for x in t["thresholds"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "ties", "--drop", "0.3"], "--drop does not apply to method ties"),
        (["--method", "ties", "--density", "1.5"], "density 1.5 must satisfy"),
        (["--method", "breadcrumbs", "--gamma", "1"], "gamma 1.0 must satisfy"),
        (["--method", "dare_ties", "--density", "0"], "drop rate p = 1.0"),
        (["--method", "task_arithmetic", "--gamma", "0.1"], "--gamma does not apply"),
        (["--method", "ties", "--trim-scope", "layer"], "invalid choice"),
    ],
)
def test_bad_method_options_exit_2_before_writing(tmp_path, argv, message):
    base, a, b = make_trio(tmp_path)
    r = run_cli(merge_argv([a, b], base, tmp_path / "out", *argv))
    assert r.returncode == 2
    assert message in r.stderr
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_v1_command_lines_keep_their_bytes(tmp_path):
    """Without --method: dare_linear with p = 0.5, M3 / --lambda / --weights alike (v1)."""
    base, a, b = make_trio(tmp_path)
    for k, extra in enumerate(([], ["--lambda", "0.3"], ["--weights", "0.6,0.9"])):
        out = tmp_path / f"out{k}"
        r = run_cli(merge_argv([a, b], base, out, "--seed", "77", "--quiet", *extra))
        assert r.returncode == 0, r.stderr
        from conftest import expected_merge

        want = expected_merge(out, base, [a, b])  # the v1 reference formula
        got = output_bytes(out)
        for name in want:
            assert np.array_equal(got[name], want[name]), name
        rec = json.loads((out / "streammerge.json").read_text())
        assert rec["method"] == "dare_linear" and rec["drop"] == [0.5, 0.5]


def test_linear_needs_no_base_and_refuses_scale(tmp_path):
    _base, a, b = make_trio(tmp_path)
    r = run_cli([str(a), str(b), "-o", str(tmp_path / "o"), "--method", "linear", "--quiet"])
    assert r.returncode == 0, r.stderr
    _check(tmp_path / "o", None, [a, b])
    r = run_cli([str(a), str(b), "-o", str(tmp_path / "p"), "--method", "ties"])
    assert r.returncode == 2 and "needs a base" in r.stderr
    r = run_cli([str(a), str(b), "-o", str(tmp_path / "q"), "--method", "linear", "--scale", "2"])
    assert r.returncode == 2 and "--scale does not apply" in r.stderr


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_guessed_window_hit_and_miss_are_both_exact(tmp_path, method):
    """A tensor larger than a slot: its thresholds' buckets are guessed from its first chunk.
    Alike chunks: the guess hits (2 reads); a first chunk unlike the rest: it misses and a
    third read counts the low histograms. Both are bit-exact."""
    g = torch.Generator().manual_seed(7)
    n = 1_500_000
    base = torch.randn(n, generator=g) * 0.02
    alike = [base + torch.randn(n, generator=g) * 0.002 for _ in range(2)]
    unlike = []
    for _ in range(2):
        d = torch.randn(n, generator=g) * 0.002
        d[: n // 3] *= 1e-3  # the first chunks' task vectors are 1000x smaller
        unlike.append(base + d)
    reads = {}
    for label, models in (("alike", alike), ("unlike", unlike)):
        root = tmp_path / label
        dirs = [write_model(root / name, {"w.weight": t.to(torch.bfloat16)})
                for name, t in (("base", base), ("a", models[0]), ("b", models[1]))]  # fmt: skip
        kw = {"method": method, "seed": 3, "weights": [1.0, 0.7], "density": 0.3}
        for d in ("F32", "BF16"):  # bf16 magnitudes: no low histograms, nothing to guess
            out = root / f"out-{d}"
            s = streammerge.merge(dirs[1:], dirs[0], out, memory="32MiB", compute_dtype=d, **kw)
            _check(out, dirs[0], dirs[1:])
            reads[label, d] = s.bytes_read
    one = 3 * n * 2  # base + 2 models, bf16
    assert reads["alike", "F32"] == 2 * one and reads["unlike", "F32"] == 3 * one, reads
    assert reads["alike", "BF16"] == reads["unlike", "BF16"] == 2 * one, reads
