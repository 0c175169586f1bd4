"""nearswap (docs/SPEC.md "NearSwap"): the numba kernel against the SPEC oracle over dtypes
and odd sizes, Triton against numba byte for byte, whole merges (CLI with --base, mergekit
YAML) against the oracle whatever the chunking, M3 drawing t, one-line errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import spec_reference as ref
from conftest import as_numpy, load_dir, make_trio, output_bytes, run_cli
from streammerge.kernels import cpu_nearswap

CARRIER = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}


def _pair(n: int, seed: int, da: str, db: str) -> tuple[np.ndarray, np.ndarray]:
    """Stored a, b with the edges: equal elements, tiny and large differences, zeros,
    opposite signs, a NaN and infinities."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 0.02).astype(np.float32)
    y = (x + rng.standard_normal(n) * rng.random(n) * 0.01).astype(np.float32)
    k = min(n, 8)
    y[: k // 2] = x[: k // 2]
    if n > 12:
        x[8], y[9], x[10], y[11] = np.nan, np.inf, 0.0, -x[12]
    return ref.from_float32(x, da), ref.from_float32(y, db)


def _numba(a, da, b, db, t, do) -> np.ndarray:
    out = np.zeros(a.size * np.dtype(CARRIER[do]).itemsize, np.uint8)
    cpu_nearswap.nearswap_chunk(a.view(np.uint8), da, b.view(np.uint8), db, a.size, t, out, do)
    return out


@pytest.mark.parametrize("n", [1, 7, 8193, 20011])
@pytest.mark.parametrize("dtypes", [("BF16", "BF16", "BF16"), ("F16", "F16", "F16"),
                                    ("F32", "F32", "F32"), ("BF16", "F16", "BF16"),
                                    ("F16", "BF16", "F32")])  # fmt: skip
@pytest.mark.parametrize("t", [0.001, 1e-4, 0.5, 0.0, -0.3, 1e-7])
def test_kernel_equals_the_spec_oracle(n, dtypes, t):
    da, db, do = dtypes
    a, b = _pair(n, n, da, db)
    want = ref.spec_nearswap(a, b, t, da, db, do)
    assert _numba(a, da, b, db, t, do).tobytes() == np.ascontiguousarray(want).view(np.uint8).tobytes()


def test_kernel_equals_torch_op_by_op():
    """The SPEC's op sequence is torch's: mergekit's expression evaluated by torch."""
    torch = pytest.importorskip("torch")
    for dt, tdt in (("BF16", torch.bfloat16), ("F16", torch.float16), ("F32", torch.float32)):
        a, b = _pair(5000, 3, dt, dt)
        ta = torch.from_numpy(a.copy()).view(tdt)
        tb = torch.from_numpy(b.copy()).view(tdt)
        for t in (0.001, 0.3, 2e-6):
            w = (t / torch.abs(ta - tb).clamp(min=1e-6)).clamp(min=0, max=1)
            want = (w * tb + (1 - w) * ta).float().numpy()
            got = ref.to_float32(_numba(a, dt, b, dt, t, dt).view(CARRIER[dt]), dt)
            same = (want.view(np.uint32) == got.view(np.uint32)) | (np.isnan(want) & np.isnan(got))
            assert same.all(), (dt, t, np.flatnonzero(~same)[:5])


def test_triton_kernel_equals_numba():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU run")
    torch = pytest.importorskip("torch")
    from streammerge.kernels import triton_nearswap

    tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for n, (da, db, do), t in [(2100, ("BF16", "BF16", "BF16"), 0.001), (37, ("F16", "F16", "F16"), 0.5),
                               (1030, ("F32", "F32", "BF16"), 1e-4), (5, ("BF16", "F16", "F32"), 0.01)]:  # fmt: skip
        a, b = _pair(n, 7, da, db)
        out = _numba(a, da, b, db, t, do)
        tout = torch.zeros(n, dtype=tdt[do])
        triton_nearswap.nearswap_triton(torch.from_numpy(a.copy()).view(tdt[da]),
                                        torch.from_numpy(b.copy()).view(tdt[db]), n, t, tout)  # fmt: skip
        assert tout.view(torch.uint8).numpy().tobytes() == out.tobytes(), (n, da, db, do)


def _expected(a, b, rec: dict) -> dict[str, bytes]:
    """Every output tensor recomputed with the oracle from the inputs and the record (a is
    the base, model 0)."""
    ta, tb = load_dir(a), load_dir(b)
    out = {}
    for name, x in ta.items():
        if name not in tb or not x.is_floating_point():
            out[name] = as_numpy(x).view(np.uint8).tobytes()
            continue
        da, db = DTYPES[str(x.dtype)], DTYPES[str(tb[name].dtype)]
        res = ref.spec_nearswap(as_numpy(x), as_numpy(tb[name]), rec["tensors"][name]["t"], da, db, da)
        out[name] = np.ascontiguousarray(res).view(np.uint8).tobytes()
    return out


def _bytes(out) -> dict[str, bytes]:
    return {k: np.ascontiguousarray(v).view(np.uint8).tobytes() for k, v in output_bytes(out).items()}


def test_cli_with_base_is_exact_and_independent_of_the_chunking(tmp_path):
    base, a, _ = make_trio(tmp_path, big=300_000)
    outs = []
    for k, extra in enumerate(([], ["--memory", "8MB", "--threads", "1", "--shard-size", "300KB"])):
        out = tmp_path / f"out{k}"
        r = run_cli([str(a), "--base", str(base), "--method", "nearswap", "--t", "0.001",
                     "-o", str(out), *extra])  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs.append(_bytes(out))
    assert outs[0] == outs[1]
    rec = json.loads((tmp_path / "out0" / "streammerge.json").read_text())
    assert outs[0] == _expected(base, a, rec)


def test_m3_draws_t(tmp_path):
    base, a, _ = make_trio(tmp_path)
    out = tmp_path / "out"
    r = run_cli([str(base), str(a), "--method", "nearswap", "--alpha", "0.5", "--seed", "7",
                 "-o", str(out)])  # fmt: skip
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "streammerge.json").read_text())
    ts = {v["t"] for v in rec["tensors"].values() if "t" in v}
    assert len(ts) == 1 and 0.0 < ts.pop() < 1.0
    assert _bytes(out) == _expected(base, a, rec)


def test_mergekit_recipe_with_a_gradient(tmp_path):
    base, a, _ = make_trio(tmp_path)
    cfg = tmp_path / "nearswap.yml"
    cfg.write_text(f"merge_method: nearswap\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                   "parameters:\n  t: [0.0001, 0.01]\ndtype: bfloat16\n")  # fmt: skip
    out = tmp_path / "out"
    r = run_cli(["--config", str(cfg), "-o", str(out)])
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "streammerge.json").read_text())
    assert len({v.get("t") for v in rec["tensors"].values()} - {None}) > 1
    assert _bytes(out) == _expected(base, a, rec)


@pytest.mark.parametrize("argv, message", [
    (["--method", "nearswap", "--t", "0.1", "--weights", "1,1"], "--weights does not apply"),
    (["--method", "nearswap", "--t", "inf"], "t: must be a finite number"),
])  # fmt: skip
def test_bad_recipes_are_one_line(tmp_path, argv, message):
    base, a, _ = make_trio(tmp_path)
    r = run_cli([str(base), str(a), *argv, "-o", str(tmp_path / "o")])
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_recipe_without_t_is_one_line(tmp_path):
    """mergekit's t is required: a YAML recipe (no M3 unless its streammerge block asks)
    without it stops before writing."""
    base, a, _ = make_trio(tmp_path)
    cfg = tmp_path / "ns.yml"
    cfg.write_text(f"merge_method: nearswap\nbase_model: {base}\nmodels:\n  - model: {a}\n")
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "o")])
    assert r.returncode == 2 and "needs t" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_nearswap_merges_exactly_two_models(tmp_path):
    base, a, b = make_trio(tmp_path)
    r = run_cli([str(a), str(b), "--base", str(base), "--method", "nearswap", "--t", "0.1",
                 "-o", str(tmp_path / "o")])  # fmt: skip
    assert r.returncode == 2 and "exactly 2 models" in r.stderr, r.stderr
    cfg = tmp_path / "ns.yml"
    cfg.write_text(f"merge_method: nearswap\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                   f"  - model: {b}\nparameters:\n  t: 0.1\n")  # fmt: skip
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "o2")])
    assert r.returncode == 2 and "exactly 2" in r.stderr, r.stderr


def test_triton_backend_merge_equals_numba(tmp_path):
    """The whole merge through the Triton backend (interpreter): the same bytes."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU run")
    base, a, _ = make_trio(tmp_path)
    outs = []
    for backend in ("numba", "triton"):
        out = tmp_path / backend
        r = run_cli([str(a), "--base", str(base), "--method", "nearswap", "--t", "0.002",
                     "--backend", backend, "-o", str(out)])  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs.append(_bytes(out))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("da, work, do", [("BF16", "F32", "F32"), ("F32", "BF16", "BF16"),
                                          ("BF16", "F16", "BF16")])  # fmt: skip
def test_a_working_dtype_rounds_the_inputs_first(da, work, do):
    """mergekit's dtype: (the recipe's W): every input rounded to W, every op in W."""
    a, b = _pair(3001, 5, da, da)
    out = np.zeros(a.size * np.dtype(CARRIER[do]).itemsize, np.uint8)
    cpu_nearswap.nearswap_chunk(a.view(np.uint8), da, b.view(np.uint8), da, a.size, 0.003, out, do, work)
    want = ref.spec_nearswap(a, b, 0.003, da, da, do, work)
    assert out.tobytes() == np.ascontiguousarray(want).view(np.uint8).tobytes()
    if os.environ.get("TRITON_INTERPRET") == "1":
        torch = pytest.importorskip("torch")
        from streammerge.kernels import triton_nearswap

        tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        tout = torch.zeros(a.size, dtype=tdt[do])
        triton_nearswap.nearswap_triton(torch.from_numpy(a.copy()).view(tdt[da]),
                                        torch.from_numpy(b.copy()).view(tdt[da]), a.size, 0.003,
                                        tout, work)  # fmt: skip
        assert tout.view(torch.uint8).numpy().tobytes() == out.tobytes()


def test_mergekit_dtype_is_the_working_dtype(tmp_path):
    """A recipe's dtype: float32 on bf16 models: computed in float32 (mergekit's casts at
    load), stored as float32."""
    base, a, _ = make_trio(tmp_path)
    cfg = tmp_path / "ns.yml"
    cfg.write_text(f"merge_method: nearswap\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                   "parameters:\n  t: 0.001\ndtype: float32\n")  # fmt: skip
    out = tmp_path / "out"
    r = run_cli(["--config", str(cfg), "-o", str(out)])
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "streammerge.json").read_text())
    ta, tb, got = load_dir(base), load_dir(a), _bytes(out)
    for name, x in ta.items():
        if name in tb and x.is_floating_point():
            want = ref.spec_nearswap(as_numpy(x), as_numpy(tb[name]), rec["tensors"][name]["t"],
                                     "BF16", "BF16", "F32", "F32")  # fmt: skip
            assert got[name] == np.ascontiguousarray(want).view(np.uint8).tobytes(), name
