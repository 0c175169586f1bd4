"""nuslerp (docs/SPEC.md "NuSLERP"): the row passes against the SPEC oracle, the Triton row
kernels against numba with nuslerp's per-vector coefficients, whole merges (CLI and
mergekit YAML) against the oracle whatever the chunking; M3 multiplies the weights."""

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


def _run_passes(v0, d0, v1, d1, shape, w, flatten, out_dtype):
    """The method's two CPU passes over one chunk holding the whole tensor."""
    rows = shape[0] if len(shape) else 1
    n = int(np.prod(shape)) // rows
    width = max(v0.nbytes, v1.nbytes)
    inputs = np.zeros((2, width), np.uint8)
    inputs[0, : v0.nbytes] = v0.reshape(-1).view(np.uint8)
    inputs[1, : v1.nbytes] = v1.reshape(-1).view(np.uint8)
    out = np.zeros(rows * n * np.dtype(CARRIER[out_dtype]).itemsize, np.uint8)
    acc = ([], {})
    common = dict(dtypes=(d0, d1), model_rows=(0, 1), n_rows=rows, row_len=n, t=0.0,
                  out_dtype=out_dtype, params=(("nuslerp_flatten", flatten),), weights=w,
                  shape=tuple(shape), stats={nuslerp.NUSLERP_DOTS: acc})  # fmt: skip
    nuslerp._dots_cpu(inputs, None, RowArgs(op=nuslerp.NUSLERP_DOTS, counts=acc, **common))
    nuslerp._nuslerp_cpu(inputs, out, RowArgs(op="nuslerp", counts=acc, **common))
    return out


@pytest.mark.parametrize("shape, w", [((7, 2500), (1.0, 3.0)), ((33,), (2.0, -2.0)),
                                      ((6, 3), (0.5, 0.0)), ((3, 4, 5), (1.0, 3.0)),
                                      ((5, 1), (0.3, 0.1))])  # fmt: skip
@pytest.mark.parametrize("dtypes", [("BF16", "BF16", "BF16"), ("F32", "F16", "BF16")])
@pytest.mark.parametrize("flatten", [True, False])
def test_passes_equal_the_spec_oracle(shape, dtypes, flatten, w):
    d0, d1, do = dtypes
    x, y = _vectors(int(np.prod(shape)), shape)
    v0, v1 = _stored(x, d0), _stored(y, d1)
    out = _run_passes(v0, d0, v1, d1, shape, w, flatten, do)
    expected = ref.spec_nuslerp(v0, v1, *w, do, shape, d0, d1, flatten)
    assert out.tobytes() == np.ascontiguousarray(expected).view(np.uint8).tobytes()


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


def _expected(a, b, rec: dict) -> dict[str, bytes]:
    """Every output tensor recomputed with the oracle from the inputs and the record."""
    ta, tb = load_dir(a), load_dir(b)
    out = {}
    for name, x in ta.items():
        if not x.is_floating_point():
            out[name] = as_numpy(x).view(np.uint8).tobytes()
            continue
        d0, d1 = DT[str(x.dtype)], DT[str(tb[name].dtype)]
        p = rec["tensors"][name]
        res = ref.spec_nuslerp(as_numpy(x), as_numpy(tb[name]), *p["w"], d0, tuple(x.shape), d0,
                               d1, p["nuslerp_flatten"])  # fmt: skip
        out[name] = np.ascontiguousarray(res).view(np.uint8).tobytes()
    return out


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
        "parameters:\n  nuslerp_flatten: false\n  nuslerp_row_wise: false\ndtype: bfloat16\n"
    )
    out = tmp_path / "out"
    r = run_cli(["--config", str(cfg), "-o", str(out)])
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "streammerge.json").read_text())
    assert rec["tensors"]["embed.weight"]["nuslerp_flatten"] is False
    assert rec["tensors"]["layers.0.attn.q.weight"]["w"] == [0.4, 0.2]
    assert {n: v.tobytes() for n, v in output_bytes(out).items()} == _expected(a, b, rec)


@pytest.mark.parametrize("yaml_extra, message", [
    ("parameters:\n  nuslerp_row_wise: true\n", "nuslerp_row_wise: true is not supported"),
    ("base_model: BASE\n", "base_model: method nuslerp with a base_model is not supported yet"),
])  # fmt: skip
def test_bad_yaml_recipes_are_one_line(tmp_path, yaml_extra, message):
    base, a, b = make_trio(tmp_path)
    cfg = tmp_path / "bad.yml"
    cfg.write_text(f"merge_method: nuslerp\nmodels:\n  - model: {a}\n  - model: {b}\n"
                   + yaml_extra.replace("BASE", str(base)))
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "out")])
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--t", "0.5"], "--t does not apply to method nuslerp"),
    (["--weights", "1,nan"], "finite"),
    (["--density", "0.5"], "--density does not apply to method nuslerp"),
    (["--base", "BASE"], "method nuslerp with --base is not supported yet"),
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
