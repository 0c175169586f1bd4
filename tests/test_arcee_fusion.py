"""arcee_fusion (docs/SPEC.md "Arcee Fusion"): the numba kernels against the SPEC oracle
over dtypes and odd shapes, exp64/log64 against libm, whole merges (CLI, mergekit YAML)
against the oracle whatever the chunking, M3 refused, one-line errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import spec_reference as ref
import torch
from conftest import as_numpy, load_dir, output_bytes, run_cli, write_model
from streammerge.kernels import cpu_fusion
from streammerge.kernels.common import low_bits_vary

ITEM = {"F32": 4, "F16": 2, "BF16": 2}
DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}
TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _pair(shape, seed: int, da: str, db: str):
    """Stored a, b: b = a plus noise of varying size, some rows equal, some elements equal."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    x = (rng.standard_normal(n) * 0.02).astype(np.float32)
    y = (x + rng.standard_normal(n) * rng.random(n) * 0.01).astype(np.float32)
    y[: min(n, 5)] = x[: min(n, 5)]
    return ref.from_float32(x, da), ref.from_float32(y, db)


def _numba(a, da, b, db, shape, do, work=None):
    """The four passes of one tensor over chunks of ``rows_per_chunk`` rows."""
    C = shape[-1] if len(shape) else 1
    R = a.size // C
    au, bu = a.view(np.uint8), b.view(np.uint8)
    hi = np.zeros(65536, np.int64)
    k = cpu_fusion.fusion_k(au, da, bu, db, R, C, work, high=hi)  # k, then each row's keys
    alone = np.zeros(65536, np.int64)
    cpu_fusion.fusion_hist(au, da, bu, db, R, C, k, alone, None, work)
    assert np.array_equal(hi, alone)

    def low_of(buckets):
        h = np.zeros((3, 65536), np.int64)
        cpu_fusion.fusion_hist(au, da, bu, db, R, C, k, h, buckets, work)
        return h

    w = work or cpu_fusion.work_dtype(da, db)
    thr = cpu_fusion.threshold(cpu_fusion.select(hi, low_of, a.size, w), w)
    out = np.zeros(a.size * ITEM[do], np.uint8)
    cpu_fusion.fusion_write(au, da, bu, db, R, C, k, thr, out, do, work)
    return out, thr


def _b(x) -> bytes:
    return np.ascontiguousarray(x).view(np.uint8).tobytes()


@pytest.mark.parametrize("shape", [(), (1,), (7,), (5, 33), (3, 1500), (2, 3, 5)])
@pytest.mark.parametrize("dtypes", [("BF16", "BF16", "BF16"), ("F16", "F16", "F16"),
                                    ("F32", "F32", "F32"), ("F16", "BF16", "F32")])  # fmt: skip
def test_kernels_equal_the_spec_oracle(shape, dtypes):
    da, db, do = dtypes
    a, b = _pair(shape, 3, da, db)
    got, thr = _numba(a, da, b, db, shape, do)
    want, wthr = ref.spec_arcee_fusion(a, b, shape, da, db, do)
    assert got.tobytes() == _b(want) and _b(np.float32(thr)) == _b(np.float32(wthr))


@pytest.mark.parametrize("da, work, do", [("BF16", "F32", "F32"), ("F32", "BF16", "BF16")])
def test_a_working_dtype_rounds_the_inputs_first(da, work, do):
    a, b = _pair((4, 301), 5, da, da)
    got, _ = _numba(a, da, b, da, (4, 301), do, work)
    want, _ = ref.spec_arcee_fusion(a, b, (4, 301), da, da, do, work)
    assert got.tobytes() == _b(want)


def test_nonfinite_rows_and_ties():
    """A row with a NaN or an infinity has k = NaN (importance NaN: never fused); rows of
    equal values give k = 0; many tied importances keep the rank rule."""
    a, b = _pair((6, 40), 9, "F32", "F32")
    a[3], b[45], a[100] = np.nan, np.inf, -np.inf
    b[200:240] = a[200:240]
    got, _ = _numba(a, "F32", b, "F32", (6, 40), "F32")
    want, _ = ref.spec_arcee_fusion(a, b, (6, 40), "F32", "F32", "F32")
    assert got.tobytes() == _b(want)
    k = cpu_fusion.fusion_k(a.view(np.uint8), "F32", b.view(np.uint8), "F32", 6, 40)
    assert np.isnan(k[:3]).all() and k[5] == 0.0 and (k[3:5] > 0).all()


@pytest.mark.parametrize("dt", ["BF16", "F32"])
def test_row_maxima_signed_zeros_and_negative_rows(dt):
    """The row maxima (integer compares on the bits): rows whose maximum is -0 or +0 (both
    present, either order), all-negative rows, a row of huge magnitudes, against the
    oracle's k."""
    rows = [[-0.0, 0.0, -1.0, -2.5], [0.0, -0.0, -3.0, -0.5], [-0.0, -0.0, -1e-3, -7.0],
            [-1.0, -2.0, -3.0, -4.0], [3e38, -3e38, 1.0, 2.0], [1e-40, -1e-40, 0.0, -0.0]]
    x = np.array(rows, np.float32)
    y = (x[::-1] * np.float32(0.5)).copy()
    a, b = ref.from_float32(x.ravel(), dt), ref.from_float32(y.ravel(), dt)
    k = cpu_fusion.fusion_k(a.view(np.uint8), dt, b.view(np.uint8), dt, len(rows), 4)
    xs = ref.to_float32(a, dt).reshape(x.shape)
    ys = ref.to_float32(b, dt).reshape(x.shape)
    want = np.array([ref.spec_fusion_k(xr, yr, dt) for xr, yr in zip(xs, ys)], np.float32)
    assert _b(k) == _b(want)


def test_exp64_log64_match_libm():
    rng = np.random.default_rng(0)
    r = -rng.random(20000) * 700
    assert np.max(np.abs(ref.spec_exp64(r) / np.exp(r) - 1)) < 1e-15
    v = np.exp(rng.standard_normal(20000) * 8)
    assert np.max(np.abs(ref.spec_log64(v) - np.log(v)) / np.maximum(1, np.abs(np.log(v)))) < 1e-15
    assert ref.spec_exp64(np.array([-800.0]))[0] == 0.0
    assert ref.spec_exp64(np.array([0.0]))[0] == 1.0


def test_bf16_log_table_is_the_specs_log32_rounded():
    """fusion_k's bf16 table: rW(log32(r)) of every one of the 65536 bf16 values r (NaN,
    infinities, zeros and negatives too), bit for bit against the oracle."""
    bits = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)
    with np.errstate(all="ignore"):
        want = ref.spec_round_work(ref.spec_log32(bits), "BF16")
    got = cpu_fusion.bf16_logs()
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), np.flatnonzero(~same)[:5]


def test_k_is_mergekits_kl_divergence():
    """k is mergekit's kl_div (torch ops in bf16) bit for bit on this data, and within
    1 % of it in float32 (its float32 sums and log near 1 cancel)."""
    for dt, tol in (("BF16", 0.0), ("F32", 1e-2)):
        a, b = _pair((8, 257), 4, dt, dt)
        k = cpu_fusion.fusion_k(a.view(np.uint8), dt, b.view(np.uint8), dt, 8, 257)
        x = torch.from_numpy(a.copy()).view(TORCH[dt]).reshape(8, 257)
        y = torch.from_numpy(b.copy()).view(TORCH[dt]).reshape(8, 257)
        p = torch.softmax(y, -1) + 1e-8
        q = torch.softmax(x, -1) + 1e-8
        want = torch.sum(p * torch.log(p / q), -1).float().numpy()
        assert np.allclose(k, want, rtol=tol, atol=0), (dt, k, want)


def test_triton_kernels_equal_numba():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU run")
    from streammerge.kernels import triton_fusion as tf

    cases = [((5, 33), ("BF16", "BF16", "BF16")), ((3, 1500), ("F32", "F32", "F16")),
             ((7,), ("F16", "BF16", "F32")), ((1,), ("BF16", "BF16", "BF16"))]
    for shape, (da, db, do) in cases:
        a, b = _pair(shape, 3, da, db)
        if a.size > 20:
            a[25] = np.float32(np.inf) if da == "F32" else a[25]
        C = shape[-1]
        R = a.size // C
        au, bu = a.view(np.uint8), b.view(np.uint8)
        k = cpu_fusion.fusion_k(au, da, bu, db, R, C)
        ta = torch.from_numpy(a.copy()).view(TORCH[da])
        tb = torch.from_numpy(b.copy()).view(TORCH[db])
        tk = tf.fusion_k_triton(ta, tb, R, C)
        assert _b(k) == tk.numpy().tobytes()
        hi = np.zeros(65536, np.int64)
        cpu_fusion.fusion_hist(au, da, bu, db, R, C, k, hi)
        assert (hi == tf.fusion_hist_triton(ta, tb, R, C, tk)).all()
        bk = np.array([int(np.argmax(hi)), -1, 5], np.int64)
        lo = np.zeros((3, 65536), np.int64)
        cpu_fusion.fusion_hist(au, da, bu, db, R, C, k, lo, bk)
        assert (lo == tf.fusion_hist_triton(ta, tb, R, C, tk, bk)).all()
        out = np.zeros(a.size * ITEM[do], np.uint8)
        thr = np.float32(1e-7)
        cpu_fusion.fusion_write(au, da, bu, db, R, C, k, thr, out, do)
        to = torch.zeros(a.size, dtype=TORCH[do])
        tf.fusion_write_triton(ta, tb, R, C, tk, thr, to)
        assert to.view(torch.uint8).numpy().tobytes() == out.tobytes()


def _models(tmp_path, dtype="BF16", big=True):
    g = torch.Generator().manual_seed(1)
    shapes = {"embed.weight": (37, 24), "layers.0.mlp.up.weight": (61, 24),
              "layers.0.norm.weight": (24,), "layers.1.big.weight": (3000, 100),
              "scalar.weight": ()}  # fmt: skip
    if not big:  # the Triton interpreter runs a program per row: few rows
        shapes = {"embed.weight": (5, 24), "layers.0.norm.weight": (24,), "scalar.weight": ()}
    base = {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}
    a = {n: v.to(TORCH[dtype]) for n, v in base.items()}
    b = {n: (v + torch.randn(v.shape, generator=g) * torch.rand(v.shape, generator=g) * 0.004)
         .to(TORCH[dtype]) for n, v in base.items()}  # fmt: skip
    a["position_ids"] = b["position_ids"] = torch.arange(13).reshape(1, 13)
    a["pooler.weight"] = torch.randn(5, 3, generator=g).to(TORCH[dtype])
    return write_model(tmp_path / "a", a, shards=2), write_model(tmp_path / "b", b, shards=1)


def _expected(a, b, out_dtype=None, work=None) -> dict[str, bytes]:
    ta, tb = load_dir(a), load_dir(b)
    out = {}
    for name, x in ta.items():
        if name not in tb or not x.is_floating_point():
            out[name] = as_numpy(x).view(np.uint8).tobytes()
            continue
        da, db = DTYPES[str(x.dtype)], DTYPES[str(tb[name].dtype)]
        res, _ = ref.spec_arcee_fusion(as_numpy(x), as_numpy(tb[name]), tuple(x.shape), da, db,
                                       out_dtype or da, work)  # fmt: skip
        out[name] = _b(res)
    return out


def _bytes(out) -> dict[str, bytes]:
    return {k: _b(v) for k, v in output_bytes(out).items()}


def test_cli_is_exact_and_independent_of_the_chunking(tmp_path):
    a, b = _models(tmp_path)
    outs = []
    for k, extra in enumerate(([], ["--memory", "8MB", "--threads", "1", "--shard-size", "300KB"])):
        out = tmp_path / f"out{k}"
        r = run_cli([str(b), "--base", str(a), "--method", "arcee_fusion", "-o", str(out), *extra])
        assert r.returncode == 0, r.stderr
        outs.append(_bytes(out))
    assert outs[0] == outs[1]
    assert outs[0] == _expected(a, b)


def test_mergekit_recipe(tmp_path):
    a, b = _models(tmp_path)
    cfg = tmp_path / "fusion.yml"
    cfg.write_text(f"merge_method: arcee_fusion\nbase_model: {a}\nmodels:\n  - model: {b}\n"
                   "dtype: float32\nout_dtype: bfloat16\n")  # fmt: skip
    out = tmp_path / "out"
    r = run_cli(["--config", str(cfg), "-o", str(out)])
    assert r.returncode == 0, r.stderr
    assert _bytes(out) == _expected(a, b, "BF16", "F32")


@pytest.mark.parametrize("argv, message", [
    (["--alpha", "0.5"], "nothing for M3 to draw"),
    (["--lambda", "0.3"], "nothing for M3 to draw"),
    (["--weights", "1,1"], "--weights does not apply"),
])  # fmt: skip
def test_bad_arguments_are_one_line(tmp_path, argv, message):
    a, b = _models(tmp_path)
    r = run_cli([str(a), str(b), "--method", "arcee_fusion", *argv, "-o", str(tmp_path / "o")])
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_exactly_two_models(tmp_path):
    import shutil

    a, b = _models(tmp_path)
    c = shutil.copytree(b, tmp_path / "c")
    cfg = tmp_path / "f.yml"
    cfg.write_text(f"merge_method: arcee_fusion\nbase_model: {a}\nmodels:\n  - model: {b}\n"
                   f"  - model: {c}\n")  # fmt: skip
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "o")])
    assert r.returncode == 2 and "exactly 2" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_triton_backend_merge_equals_numba(tmp_path):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU run")
    a, b = _models(tmp_path, big=False)
    outs = []
    for backend in ("numba", "triton"):
        out = tmp_path / backend
        r = run_cli([str(b), "--base", str(a), "--method", "arcee_fusion", "--backend", backend,
                     "-o", str(out)])  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs.append(_bytes(out))
    assert outs[0] == outs[1]


def _order_keys(v: np.ndarray) -> np.ndarray:
    """SPEC's order keys of float32 values (-0 as +0, every NaN one key), in numpy."""
    b = (v.astype(np.float32) + np.float32(0.0)).view(np.uint32)
    keys = np.where(b & 0x80000000, ~b, b ^ 0x80000000).astype(np.uint32)
    return np.where(np.isnan(v), np.uint32(cpu_fusion.NAN_KEY), keys)


@pytest.mark.parametrize("signs", ["mixed", "negative"])
def test_bf16_quartiles_need_no_low_histogram(signs):
    """W = bf16: each high bucket holds one key (low bits 0 above zero, 0xFFFF below), so
    the quartiles come from the high histogram alone and equal the sorted values'."""
    rng = np.random.default_rng(5)
    v = (rng.standard_normal(20001) * 1e-3).astype(np.float32)
    v = ref.to_float32(ref.from_float32(v, "BF16"), "BF16")
    if signs == "negative":
        v = -np.abs(v)
    v[:7] = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-30, -1e-30]
    v = ref.to_float32(ref.from_float32(v, "BF16"), "BF16")
    high = np.bincount(_order_keys(v) >> 16, minlength=65536).astype(np.int64)
    got = cpu_fusion.select(high, lambda b: pytest.fail("no low pass for bf16"), v.size, "BF16")
    s = np.sort(v + np.float32(0.0))
    n = v.size
    want = (s[(n - 1) // 4], s[(n - 1) // 2], s[(3 * (n - 1)) // 4])
    assert [np.float32(g).view(np.uint32) for g in got] == [w.view(np.uint32) for w in want]
    assert low_bits_vary("F16") and low_bits_vary("F32") and not low_bits_vary("BF16")
