"""nuslerp (docs/SPEC.md "NuSLERP"): the row passes against the SPEC oracle, the Triton row
kernels against numba with nuslerp's per-vector coefficients, whole merges (CLI and
mergekit YAML) against the oracle whatever the chunking; M3 multiplies the weights. With a
base (task vectors) and with ``nuslerp_row_wise`` (one angle per column) too."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import spec_reference as ref
from conftest import as_numpy, load_dir, make_trio, output_bytes, run_cli

from streammerge.exec.ops import RowArgs
from streammerge.kernels import cpu_rows
from streammerge.methods import nuslerp

CARRIER = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
DT = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}


def _stored(x: np.ndarray, dtype: str) -> np.ndarray:
    return ref.from_float32(x.astype(np.float32), dtype)


def _vectors(seed: int, shape) -> tuple[np.ndarray, np.ndarray]:
    """Two float32 arrays of ``shape``; with 2 axes and >= 5 rows, the edge rows: a zero
    row, a parallel, an antiparallel and a near-parallel one."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.standard_normal(shape).astype(np.float32)
    if len(shape) == 2 and shape[0] >= 5:
        x[0] = 0.0
        y[1] = 2.0 * x[1]
        y[2] = -x[2]
        y[3] = x[3] + 1e-3 * y[3]
    return x, y


def _run_passes(v0, d0, v1, d1, shape, w, flatten, out_dtype, base=None, db=None,
                row_wise=False, cut=None, work=None):
    """The method's three CPU passes over the whole tensor (sums, the chain's unit sums, the
    merge): one chunk, or two chunks of whole rows cut before row ``cut``; ``work``: W as the
    plan resolves it (default: the inputs' common dtype)."""
    rows = shape[0] if len(shape) else 1
    n = int(np.prod(shape)) // rows
    arrays = [v0, v1] + ([base] if base is not None else [])
    width = max(v.nbytes for v in arrays)
    inputs = np.zeros((3, width), np.uint8)
    for k, v in enumerate(arrays):
        inputs[(1, 2, 0)[k], : v.nbytes] = v.reshape(-1).view(np.uint8)
    size = np.dtype(CARRIER[out_dtype]).itemsize
    out = np.zeros(rows * n * size, np.uint8)
    stats = {nuslerp.NUSLERP_DOTS: ([], {}), nuslerp.NUSLERP_UNITS: ([], {})}
    params = (("nuslerp_flatten", flatten), ("nuslerp_row_wise", row_wise))
    dts = (db or d0, d0, d1)
    work = work or ref.spec_nuslerp_work(d0, d1, db if base is not None else None)
    cuts = [(0, rows)] if cut is None else [(0, cut), (cut, rows)]
    for op in (nuslerp.NUSLERP_DOTS, nuslerp.NUSLERP_UNITS, "nuslerp"):
        for lo, hi in cuts:
            chunk = np.zeros((3, width), np.uint8)
            for r, dt in enumerate(dts):
                item = np.dtype(CARRIER[dt]).itemsize
                part = inputs[r, lo * n * item : hi * n * item]
                chunk[r, : part.size] = part
            o = np.zeros((hi - lo) * n * size, np.uint8)
            acc = stats.get(op, stats[nuslerp.NUSLERP_UNITS])
            a = RowArgs(op=op, counts=acc, dtypes=dts, model_rows=(1, 2), n_rows=hi - lo,
                        row_len=n, t=0.0, out_dtype=out_dtype, params=params, weights=w,
                        shape=tuple(shape), stats=stats, compute_dtype=work,
                        base_row=0 if base is not None else -1)  # fmt: skip
            if op == "nuslerp":
                nuslerp._nuslerp_cpu(chunk, o, a)
                out[lo * n * size : hi * n * size] = o
            elif op == nuslerp.NUSLERP_UNITS:
                nuslerp._units_cpu(chunk, None, a)
            else:
                nuslerp._dots_cpu(chunk, None, a)
    return out


@pytest.mark.parametrize("shape, w", [((7, 2500), (1.0, 3.0)), ((33,), (2.0, -2.0)),
                                      ((6, 3), (0.5, 0.0)), ((3, 4, 5), (1.0, 3.0)),
                                      ((5, 1), (0.3, 0.1))])  # fmt: skip
@pytest.mark.parametrize("dtypes", [("BF16", "BF16", "BF16"), ("F32", "F16", "BF16"),
                                    ("F16", "F16", "F32")])  # fmt: skip
@pytest.mark.parametrize("flatten", [True, False])
def test_passes_equal_the_spec_oracle(shape, dtypes, flatten, w):
    d0, d1, do = dtypes
    x, y = _vectors(int(np.prod(shape)), shape)
    v0, v1 = _stored(x, d0), _stored(y, d1)
    out = _run_passes(v0, d0, v1, d1, shape, w, flatten, do)
    expected = ref.spec_nuslerp(v0, v1, *w, do, shape, d0, d1, flatten)
    assert out.tobytes() == np.ascontiguousarray(expected).view(np.uint8).tobytes()


@pytest.mark.parametrize("shape, w", [((7, 2500), (1.0, 3.0)), ((33,), (2.0, -2.0)),
                                      ((3, 4, 5), (1.0, 3.0)), ((9, 3), (0.3, 0.1))])  # fmt: skip
@pytest.mark.parametrize("mode", ["base_flat", "base_vec", "col", "base_col"])
def test_base_and_row_wise_passes_equal_the_spec_oracle(shape, w, mode):
    d0, d1, db, do = ("BF16", "F32", "F16", "BF16") if len(shape) != 2 else ("BF16",) * 4
    x, y = _vectors(int(np.prod(shape)) + 1, shape)
    b = (0.5 * x + 0.5 * y).astype(np.float32)  # near both: task vectors far from parallel
    if len(shape) == 2 and shape[0] >= 5:
        b[4] = x[4]  # a zero task vector (row 4: in every column)
    v0, v1, vb = _stored(x, d0), _stored(y, d1), _stored(b, db)
    base = vb if mode.startswith("base") else None
    flatten, row_wise = mode == "base_flat", mode.endswith("col")
    want = ref.spec_nuslerp(v0, v1, *w, do, shape, d0, d1, flatten, base, db, row_wise)
    want = np.ascontiguousarray(want).view(np.uint8).tobytes()
    for cut in (None, shape[0] // 2) if len(shape) >= 2 else (None,):
        got = _run_passes(v0, d0, v1, d1, shape, w, flatten, do, base, db if base is not None
                          else None, row_wise, cut)  # fmt: skip
        assert got.tobytes() == want, (mode, cut)


@pytest.mark.parametrize("work", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("mode", ["flat", "vec", "base_col"])
def test_a_recipe_dtype_is_the_working_dtype(work, mode):
    """W from the recipe's dtype: (not the inputs'): float32 keeps the float64
    coefficients, bf16 / f16 the chain in W; each equals the oracle given that W."""
    shape, w = (12, 300), (0.3, 0.7)
    x, y = _vectors(int(np.prod(shape)) + 1, shape)
    b = (0.5 * x + 0.5 * y).astype(np.float32)
    v0, v1, vb = _stored(x, "BF16"), _stored(y, "BF16"), _stored(b, "BF16")
    base = vb if mode.startswith("base") else None
    flatten, row_wise = mode == "flat", mode.endswith("col")
    db = "BF16" if base is not None else None
    got = _run_passes(v0, "BF16", v1, "BF16", shape, w, flatten, "BF16", base, db, row_wise,
                      cut=5, work=work)  # fmt: skip
    want = ref.spec_nuslerp(v0, v1, *w, "BF16", shape, "BF16", "BF16", flatten, base, db,
                            row_wise, work=work)  # fmt: skip
    assert got.tobytes() == np.ascontiguousarray(want).view(np.uint8).tobytes()
    chain_vs_f32 = ref.spec_nuslerp(v0, v1, *w, "BF16", shape, "BF16", "BF16", flatten, base,
                                    db, row_wise, work="F32")  # fmt: skip
    assert (want.tobytes() != chain_vs_f32.tobytes()) == (work != "F32")


def test_the_chain_pass_is_read_only_in_a_bf16_or_f16_working_dtype():
    """nuslerp_units (RowPass.needed) is planned for W = bf16 / f16 tensors only: a float32
    tensor is not read for it."""
    from streammerge.recipe.recipe import TensorParams

    m = nuslerp.METHOD
    assert m.passes("tensor") == (nuslerp.NUSLERP_DOTS, nuslerp.NUSLERP_UNITS, "nuslerp")
    for compute, needed in (("F32", False), (None, False), ("BF16", True), ("F16", True)):
        tp = TensorParams(w=(1.0, 1.0), compute=compute)
        assert m.pass_needed(nuslerp.NUSLERP_UNITS, tp) is needed
        assert m.pass_needed(nuslerp.NUSLERP_DOTS, tp) and m.pass_needed("nuslerp", tp)


def test_factor_and_coefficients_at_the_edges():
    assert nuslerp.interpolation_t(1.0, 3.0) == 0.75
    assert nuslerp.interpolation_t(1.0, -1.0) == 0.5 and nuslerp.interpolation_t(0.0, 0.0) == 0.5
    stats = np.array([[0.0, 4.0, 0.0], [1.0, 4.0, 2.0], [1.0, 1.0, -1.0], [np.nan, 1.0, np.nan]])
    ca, cb = nuslerp.coefficients(stats, 0.25)
    assert ca[0] == np.float32(np.sin(0.75 * np.pi / 2)) and cb[0] == np.float32(np.sin(0.25 * np.pi / 2))
    assert (ca[1], cb[1]) == (np.float32(0.75), np.float32(0.25))
    assert (ca[2], cb[2]) == (np.float32(0.75), np.float32(0.25))
    assert np.isnan(ca[3]) and np.isnan(cb[3])
    for s in stats[:3]:
        assert nuslerp.coefficients(s[None], 0.25) == tuple(
            np.array([v]) for v in ref.spec_nuslerp_coefficients(*s, 0.25))


def test_triton_per_vector_kernels_equal_numba():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU run")
    torch = pytest.importorskip("torch")
    from streammerge.kernels import triton_rows

    tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for k, n, (d0, d1, do) in [(4, 1500, ("BF16", "F32", "BF16")), (9, 3, ("F16", "BF16", "F32"))]:
        x, y = _vectors(k + n, (k, n))
        v0, v1 = _stored(x, d0), _stored(y, d1)
        b0, b1 = v0.reshape(-1).view(np.uint8), v1.reshape(-1).view(np.uint8)
        stats = cpu_rows.row_dots(b0, d0, b1, d1, k, n)
        ca, cb = nuslerp.coefficients(stats, 0.3)
        out = np.zeros(k * n * np.dtype(CARRIER[do]).itemsize, np.uint8)
        cpu_rows.rows_combine(b0, d0, b1, d1, k, n, ca, cb, out, do)
        t0 = torch.from_numpy(b0.copy()).view(tdt[d0])
        t1 = torch.from_numpy(b1.copy()).view(tdt[d1])
        tstats = triton_rows.row_dots_triton(t0, t1, k, n).numpy()
        assert [[abs(v) for v in r] for r in tstats] == [[abs(v) for v in r] for r in stats]
        tout = torch.zeros(k * n, dtype=tdt[do])
        triton_rows.rows_combine_triton(t0, t1, k, n, torch.from_numpy(ca), torch.from_numpy(cb), tout)
        assert tout.view(torch.uint8).numpy().tobytes() == out.tobytes()


def test_triton_base_and_column_kernels_equal_numba():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU run")
    torch = pytest.importorskip("torch")
    from streammerge.kernels import cpu_nuslerp, triton_nuslerp

    tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for k, n, (d0, d1, db, do) in [(5, 1100, ("BF16", "F32", "BF16", "BF16")),
                                   (9, 300, ("F16", "BF16", "F32", "F32"))]:  # fmt: skip
        x, y = _vectors(k * n, (k, n))
        b = (0.5 * x + 0.5 * y).astype(np.float32)
        raw = [_stored(v, d).reshape(-1).view(np.uint8) for v, d in ((x, d0), (y, d1), (b, db))]
        tv = [torch.from_numpy(r.copy()).view(tdt[d]) for r, d in zip(raw, (d0, d1, db))]
        for has in (False, True):
            base, tbase = (raw[2], tv[2]) if has else (None, None)
            stats = cpu_nuslerp.tv_row_dots(raw[0], d0, raw[1], d1, base, db, k, n)
            tstats = triton_nuslerp.tv_row_dots_triton(tv[0], tv[1], tbase, k, n).numpy()
            assert np.array_equal(np.abs(tstats), np.abs(stats))
            acc, tacc = np.zeros((n, 3)), torch.zeros((n, 3), dtype=torch.float64)
            for lo, hi in ((0, 2), (2, k)):  # two chunks of whole rows
                part = [r[lo * n * r.nbytes // (k * n): hi * n * r.nbytes // (k * n)].copy()
                        for r in raw]  # fmt: skip
                cpu_nuslerp.col_dots(part[0], d0, part[1], d1, part[2] if has else None, db,
                                     hi - lo, n, acc)  # fmt: skip
                tp = [torch.from_numpy(q).view(tdt[d]) for q, d in zip(part, (d0, d1, db))]
                triton_nuslerp.col_dots_triton(tp[0], tp[1], tp[2] if has else None, hi - lo, n,
                                               tacc)  # fmt: skip
            assert np.array_equal(np.abs(tacc.numpy()), np.abs(acc))
            for per_col, sums in ((False, stats), (True, acc)):
                ca, cb = nuslerp.coefficients(sums, 0.3)
                out = np.zeros(k * n * np.dtype(CARRIER[do]).itemsize, np.uint8)
                cpu_nuslerp.combine(raw[0], d0, raw[1], d1, base, db, k * n, n, per_col, ca, cb,
                                    out, do)  # fmt: skip
                tout = torch.zeros(k * n, dtype=tdt[do])
                triton_nuslerp.combine_triton(tv[0], tv[1], tbase, k * n, n, per_col,
                                              torch.from_numpy(ca), torch.from_numpy(cb), tout)
                assert tout.view(torch.uint8).numpy().tobytes() == out.tobytes(), (has, per_col)


def _expected(a, b, rec: dict, base=None) -> dict[str, bytes]:
    """Every output tensor recomputed with the oracle from the inputs and the record (with
    ``base``: the task vectors; tensors only the base has, and integers, are its own)."""
    ta, tb = load_dir(a), load_dir(b)
    tbase = load_dir(base) if base is not None else {}
    out = {}
    for name, x in (tbase or ta).items():
        if name not in ta or not x.is_floating_point():
            out[name] = as_numpy(x).view(np.uint8).tobytes()
            continue
        x0 = ta[name]
        d0, d1 = DT[str(x0.dtype)], DT[str(tb[name].dtype)]
        p = rec["tensors"][name]
        kw = {}
        if base is not None:
            kw = dict(base=as_numpy(x), dtype_base=DT[str(x.dtype)])
        res = ref.spec_nuslerp(as_numpy(x0), as_numpy(tb[name]), *p["w"], DT[str(x.dtype)],
                               tuple(x0.shape), d0, d1, p["nuslerp_flatten"],
                               row_wise=p.get("nuslerp_row_wise", False), **kw)  # fmt: skip
        out[name] = np.ascontiguousarray(res).view(np.uint8).tobytes()
    return out


def _wide_trio(tmp_path):
    """make_trio plus a 300 x 1500 tensor (several chunks at --memory 8MB) in all three."""
    from conftest import write_model
    import torch

    base, a, b = make_trio(tmp_path)
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(300, 1500, generator=g)
    for m, scale in ((base, 0.0), (a, 1.0), (b, -0.5)):
        m2 = tmp_path / (m.name + "2")
        ts = load_dir(m)
        ts["wide.weight"] = (0.5 * wide + wide * scale
                             + 0.1 * torch.randn(300, 1500, generator=g)).to(torch.bfloat16)
        write_model(m2, ts, shards=2)
    return tmp_path / "base2", tmp_path / "a2", tmp_path / "b2"


@pytest.mark.parametrize("flatten", ["--nuslerp-flatten", "--no-nuslerp-flatten"])
def test_cli_nuslerp_is_exact_and_independent_of_the_chunking(tmp_path, flatten):
    from conftest import write_model
    import torch

    _, a, b = make_trio(tmp_path, big=300_000)
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(300, 1500, generator=g)  # 2-D, several chunks: per-vector angles
    for m, scale in ((a, 1.0), (b, -0.5)):
        m2 = tmp_path / (m.name + "2")
        ts = load_dir(m)
        ts["wide.weight"] = (wide * scale + 0.1 * torch.randn(300, 1500, generator=g)).to(torch.bfloat16)
        write_model(m2, ts, shards=2)
    a, b = tmp_path / "a2", tmp_path / "b2"
    got = []
    chunked = ["--memory", "2MiB", "--threads", "1", "--shard-size", "300KB"]
    # flattened, the default run is slerp's path (tests/test_slerp.py): the chunked run only
    for extra in ([chunked] if flatten == "--nuslerp-flatten" else [[], chunked]):
        out = tmp_path / f"out{len(got)}"
        r = run_cli([str(a), str(b), "--method", "nuslerp", "--weights", "1,3", flatten,
                     "-o", str(out), "--seed", "1", *extra])  # fmt: skip
        assert r.returncode == 0, r.stderr
        got.append({n: v.tobytes() for n, v in output_bytes(out).items()})
    rec = json.loads((out / "streammerge.json").read_text())
    assert all(v["w"] == [1.0, 3.0] for v in rec["tensors"].values())
    assert all(g == _expected(a, b, rec) for g in got)


@pytest.mark.parametrize("argv", [["--base"], ["--base", "--no-nuslerp-flatten", "--nuslerp-row-wise"]])
def test_cli_base_and_row_wise_exact_and_independent_of_the_chunking(tmp_path, argv):
    base, a, b = _wide_trio(tmp_path)
    with_base = "--base" in argv
    argv = [str(base) if v == "--base" else v for v in argv]
    argv = (["--base"] if with_base else []) + argv
    got = []
    for extra in ([], ["--memory", "8MB", "--threads", "1", "--shard-size", "300KB"]):
        out = tmp_path / f"out{len(got)}"
        r = run_cli([str(a), str(b), "--method", "nuslerp", "--weights", "1,3", *argv,
                     "-o", str(out), "--seed", "1", *extra])  # fmt: skip
        assert r.returncode == 0, r.stderr
        got.append({n: v.tobytes() for n, v in output_bytes(out).items()})
    rec = json.loads((out / "streammerge.json").read_text())
    assert rec["tensors"]["wide.weight"]["nuslerp_row_wise"] is ("--nuslerp-row-wise" in argv)
    assert got[0] == got[1] == _expected(a, b, rec, base if with_base else None)


@pytest.mark.parametrize("work", [None, "BF16"])
def test_triton_passes_with_a_base_and_per_column_equal_numba(work):
    """The method's Triton passes (``_dots_triton``, ``_nuslerp_triton`` through
    ``TritonLauncher``) give the numba passes' bytes, two chunks of whole rows (the
    pipeline's glue, without a whole interpreted merge); ``work`` BF16: the chain in W (its
    passes run the numba kernels on the host)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU run")
    torch = pytest.importorskip("torch")
    from streammerge.exec.triton_launcher import TritonLauncher

    k, n, dts = 6, 700, ("F16", "BF16", "F32")  # slot rows: base, model 0, model 1
    x, y = _vectors(3, (k, n))
    b = (0.5 * x + 0.5 * y).astype(np.float32)
    raw = [_stored(v, d).reshape(-1).view(np.uint8) for v, d in zip((b, x, y), dts)]
    launch = TritonLauncher(torch)
    for flatten, row_wise, base_row in ((True, False, 0), (False, True, -1), (False, True, 0),
                                        (False, False, 0)):  # fmt: skip
        outs = []
        for backend in ("cpu", "triton"):
            stats = {nuslerp.NUSLERP_DOTS: ([], {}), nuslerp.NUSLERP_UNITS: ([], {})}
            out = np.zeros(k * n * 2, np.uint8)
            for op in (nuslerp.NUSLERP_DOTS, nuslerp.NUSLERP_UNITS, "nuslerp"):
                acc = stats.get(op, stats[nuslerp.NUSLERP_UNITS])
                for lo, hi in ((0, 2), (2, k)):
                    width = max(r.nbytes for r in raw)
                    slot = np.zeros((3, width), np.uint8)
                    for i, (r, d) in enumerate(zip(raw, dts)):
                        item = np.dtype(CARRIER[d]).itemsize
                        part = r[lo * n * item : hi * n * item]
                        slot[i, : part.size] = part
                    a = RowArgs(op=op, dtypes=dts, model_rows=(1, 2), n_rows=hi - lo, row_len=n,
                                t=0.0, out_dtype="BF16", base_row=base_row, counts=acc,
                                params=(("nuslerp_flatten", flatten), ("nuslerp_row_wise", row_wise)),
                                weights=(1.0, 3.0), shape=(k, n), stats=stats,
                                compute_dtype=work)  # fmt: skip
                    o = np.zeros((hi - lo) * n * 2, np.uint8)
                    cpu = {nuslerp.NUSLERP_DOTS: nuslerp._dots_cpu, "nuslerp": nuslerp._nuslerp_cpu,
                           nuslerp.NUSLERP_UNITS: nuslerp._units_cpu}  # fmt: skip
                    tri = {nuslerp.NUSLERP_DOTS: nuslerp._dots_triton,
                           nuslerp.NUSLERP_UNITS: nuslerp._units_triton,
                           "nuslerp": nuslerp._nuslerp_triton}  # fmt: skip
                    if backend == "cpu":
                        cpu[op](slot, o, a)
                    else:
                        f = tri[op]
                        to = torch.from_numpy(o)
                        f(launch, torch.from_numpy(slot), to, a)
                        o = to.numpy()
                    if op == "nuslerp":
                        out[lo * n * 2 : hi * n * 2] = o
            outs.append(out.tobytes())
        assert outs[0] == outs[1], (flatten, row_wise, base_row)
        if work is not None:  # the chain: the oracle's bytes too
            want = ref.spec_nuslerp(raw[1].view(CARRIER[dts[1]]), raw[2].view(CARRIER[dts[2]]),
                                    1.0, 3.0, "BF16", (k, n), dts[1], dts[2], flatten,
                                    raw[0].view(CARRIER[dts[0]]) if base_row == 0 else None,
                                    dts[0] if base_row == 0 else None, row_wise, work=work)  # fmt: skip
            assert outs[0] == np.ascontiguousarray(want).view(np.uint8).tobytes()


def test_m3_multiplies_the_weights(tmp_path):
    _, a, b = make_trio(tmp_path)
    out = tmp_path / "out"
    r = run_cli([str(a), str(b), "--method", "nuslerp", "--alpha", "0.5", "--seed", "7", "-o", str(out)])
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "streammerge.json").read_text())
    m = rec["mixup"]
    assert rec["alpha"] == 0.5 and all(v["w"] == m for v in rec["tensors"].values())
    assert {n: v.tobytes() for n, v in output_bytes(out).items()} == _expected(a, b, rec)


def test_mergekit_nuslerp_recipe(tmp_path):
    _, a, b = make_trio(tmp_path)
    cfg = tmp_path / "nuslerp.yml"
    cfg.write_text(
        f"merge_method: nuslerp\nmodels:\n  - model: {a}\n    parameters:\n      weight: 0.4\n"
        f"  - model: {b}\n    parameters:\n      weight: [0.2, 0.6]\n"
        "parameters:\n  nuslerp_flatten: false\n  nuslerp_row_wise: true\ndtype: bfloat16\n"
    )
    out = tmp_path / "out"
    r = run_cli(["--config", str(cfg), "-o", str(out)])
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "streammerge.json").read_text())
    assert rec["tensors"]["embed.weight"]["nuslerp_flatten"] is False
    assert rec["tensors"]["embed.weight"]["nuslerp_row_wise"] is True  # one angle per column
    assert rec["tensors"]["layers.0.attn.q.weight"]["w"] == [0.4, 0.2]
    assert {n: v.tobytes() for n, v in output_bytes(out).items()} == _expected(a, b, rec)


@pytest.mark.parametrize("yaml_extra, message", [
    ("parameters:\n  nuslerp_row_wise: maybe\n", "nuslerp_row_wise"),
    ("parameters:\n  nuslerp_flatten: 2\n", "nuslerp_flatten"),
    ("SLICES", "base_model: method nuslerp with a base_model in a slices: recipe is not supported"),
])  # fmt: skip
def test_bad_yaml_recipes_are_one_line(tmp_path, yaml_extra, message):
    base, a, b = make_trio(tmp_path)
    cfg = tmp_path / "bad.yml"
    if yaml_extra == "SLICES":
        cfg.write_text(f"merge_method: nuslerp\nbase_model: {base}\nslices:\n  - sources:\n"
                       f"      - model: {a}\n        layer_range: [0, 1]\n"
                       f"      - model: {b}\n        layer_range: [0, 1]\n")  # fmt: skip
    else:
        cfg.write_text(f"merge_method: nuslerp\nmodels:\n  - model: {a}\n  - model: {b}\n"
                       + yaml_extra.replace("BASE", str(base)))
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "out")])
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_mergekit_recipe_with_a_base_model_and_row_wise(tmp_path):
    """mergekit's nuslerp with base_model (also listed among the models: skipped, as mergekit
    pops it) and nuslerp_row_wise: the task vectors, one angle per column."""
    base, a, b = make_trio(tmp_path)
    cfg = tmp_path / "nuslerp.yml"
    cfg.write_text(
        f"merge_method: nuslerp\nbase_model: {base}\nmodels:\n  - model: {base}\n"
        f"  - model: {a}\n    parameters:\n      weight: 0.4\n"
        f"  - model: {b}\n    parameters:\n      weight: 0.6\n"
        "parameters:\n  nuslerp_flatten: false\n  nuslerp_row_wise: true\ndtype: bfloat16\n"
    )
    out = tmp_path / "out"
    r = run_cli(["--config", str(cfg), "-o", str(out)])
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "streammerge.json").read_text())
    assert rec["tensors"]["embed.weight"]["nuslerp_row_wise"] is True
    assert {n: v.tobytes() for n, v in output_bytes(out).items()} == _expected(a, b, rec, base)


@pytest.mark.parametrize("argv, message", [
    (["--t", "0.5"], "--t does not apply to method nuslerp"),
    (["--weights", "1,nan"], "finite"),
    (["--density", "0.5"], "--density does not apply to method nuslerp"),
    (["--base", "BASE", "--density", "0.5"], "--density does not apply to method nuslerp"),
])  # fmt: skip
def test_bad_flags_are_one_line(tmp_path, argv, message):
    base, a, b = make_trio(tmp_path)
    argv = [str(base) if v == "BASE" else v for v in argv]
    r = run_cli([str(a), str(b), "--method", "nuslerp", *argv, "-o", str(tmp_path / "out")])
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_nuslerp_merges_exactly_two_models(tmp_path):
    base, a, b = make_trio(tmp_path)
    r = run_cli([str(a), str(b), str(base), "--method", "nuslerp", "-o", str(tmp_path / "o")])
    assert r.returncode == 2 and "merges exactly 2 models, got 3" in r.stderr, r.stderr
    r = run_cli([str(a), str(b), str(a), "--base", str(base), "--method", "nuslerp", "-o",
                 str(tmp_path / "o")])  # fmt: skip
    assert r.returncode == 2 and "merges exactly 2 models, got 3" in r.stderr, r.stderr
