"""slerp (docs/SPEC.md "SLERP (v3)"): the row kernels against the SPEC oracle, Triton
against numba byte for byte, and whole merges (CLI and mergekit YAML) against the oracle,
whatever the chunking; M3 draws t."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import spec_reference as ref
from conftest import as_numpy, load_dir, make_trio, output_bytes, run_cli

from streammerge.methods.slerp import tensor_totals
from streammerge.kernels import cpu_rows
from streammerge.methods import slerp

CARRIER = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def _stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as the stored carrier (bf16 rounded to its bits)."""
    return ref.from_float32(x.astype(np.float32), dtype)


def _rows(seed: int, n_rows: int, row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Two float32 [n_rows, row_len] arrays with the edges: a zero row, a parallel row, an
    antiparallel row, a near-parallel row, random rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, row_len)).astype(np.float32)
    y = rng.standard_normal((n_rows, row_len)).astype(np.float32)
    if n_rows >= 5:
        x[0] = 0.0
        y[1] = 2.0 * x[1]
        y[2] = -x[2]
        y[3] = x[3] + 1e-3 * y[3]
    return x, y


def _tensor_coefficients(stats, t, n_rows):
    """The tensor's coefficients from its rows' sums, one per row (as the backends pass them)."""
    ca, cb = slerp.coefficients(np.asarray([tensor_totals([stats])]), t)
    return np.full(n_rows, ca[0], np.float32), np.full(n_rows, cb[0], np.float32)


def _numba_slerp(v0, d0, v1, d1, n_rows, row_len, t, out_dtype):
    b0, b1 = v0.reshape(-1).view(np.uint8), v1.reshape(-1).view(np.uint8)
    stats = cpu_rows.row_dots(b0, d0, b1, d1, n_rows, row_len)
    ca, cb = _tensor_coefficients(stats, t, n_rows)
    out = np.zeros(n_rows * row_len * np.dtype(CARRIER[out_dtype]).itemsize, np.uint8)
    cpu_rows.rows_combine(b0, d0, b1, d1, n_rows, row_len, ca, cb, out, out_dtype)
    return stats, out


@pytest.mark.parametrize("n_rows, row_len", [(7, 2500), (33, 1), (5, 1024), (6, 3)])
@pytest.mark.parametrize("dtypes", [("BF16", "BF16", "BF16"), ("F32", "F16", "BF16"),
                                    ("F16", "BF16", "F32")])  # fmt: skip
@pytest.mark.parametrize("t", [0.3, 0.0, 1.0, -0.25])
def test_row_kernels_equal_the_spec_oracle(n_rows, row_len, dtypes, t):
    d0, d1, do = dtypes
    x, y = _rows(n_rows * row_len, n_rows, row_len)
    v0, v1 = _stored(x, d0), _stored(y, d1)
    stats, out = _numba_slerp(v0, d0, v1, d1, n_rows, row_len, t, do)
    xs, ys = ref.to_float32(v0, d0), ref.to_float32(v1, d1)
    for r in range(n_rows):
        want = ref.spec_row_sums(xs[r], ys[r])
        assert [abs(v) for v in stats[r]] == [abs(v) for v in want]  # only a zero's sign may vary
    expected = ref.spec_slerp(v0, v1, t, do, (n_rows, row_len), d0, d1)
    assert out.tobytes() == np.ascontiguousarray(expected).view(np.uint8).tobytes()


def test_coefficients_at_the_edges():
    """Zero tensor: theta = pi/2; parallel and antiparallel: lerp (1 - t, t); NaN: NaN."""
    stats = np.array([[0.0, 4.0, 0.0], [1.0, 4.0, 2.0], [1.0, 1.0, -1.0], [np.nan, 1.0, np.nan]])  # a NaN in x: S00 and S01 NaN
    ca, cb = slerp.coefficients(stats, 0.25)
    assert ca[0] == np.float32(np.sin(0.75 * np.pi / 2)) and cb[0] == np.float32(np.sin(0.25 * np.pi / 2))
    assert (ca[1], cb[1]) == (np.float32(0.75), np.float32(0.25))
    assert (ca[2], cb[2]) == (np.float32(0.75), np.float32(0.25))
    assert np.isnan(ca[3]) and np.isnan(cb[3])


def test_triton_row_kernels_equal_numba():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU run")
    torch = pytest.importorskip("torch")
    from streammerge.kernels import triton_rows

    for n_rows, row_len, (d0, d1, do) in [(3, 2100, ("BF16", "F32", "BF16")), (9, 1, ("F16", "F16", "F32")),
                                          (5, 7, ("BF16", "BF16", "F16"))]:  # fmt: skip
        x, y = _rows(row_len, n_rows, row_len)
        v0, v1 = _stored(x, d0), _stored(y, d1)
        stats, out = _numba_slerp(v0, d0, v1, d1, n_rows, row_len, 0.4, do)
        tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        t0 = torch.from_numpy(v0.reshape(-1).copy()).view(tdt[d0])
        t1 = torch.from_numpy(v1.reshape(-1).copy()).view(tdt[d1])
        tstats = triton_rows.row_dots_triton(t0, t1, n_rows, row_len).numpy()
        assert [[abs(v) for v in r] for r in tstats] == [[abs(v) for v in r] for r in stats]
        ca, cb = _tensor_coefficients(tstats, 0.4, n_rows)
        tout = torch.zeros(n_rows * row_len, dtype=tdt[do])
        triton_rows.rows_combine_triton(t0, t1, n_rows, row_len, torch.from_numpy(ca),
                                        torch.from_numpy(cb), tout)  # fmt: skip
        assert tout.view(torch.uint8).numpy().tobytes() == out.tobytes()


def _expected(a, b, rec: dict) -> dict[str, bytes]:
    """Every output tensor recomputed with the oracle from the inputs and the record."""
    ta, tb = load_dir(a), load_dir(b)
    names = {"F32": "F32", "F16": "F16", "BF16": "BF16"}
    dt = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}
    out = {}
    for name, x in ta.items():
        if not x.is_floating_point():
            out[name] = as_numpy(x).view(np.uint8).tobytes()
            continue
        d0, d1 = dt[str(x.dtype)], dt[str(tb[name].dtype)]
        t = rec["tensors"][name]["t"]
        res = ref.spec_slerp(as_numpy(x), as_numpy(tb[name]), t, names[d0], tuple(x.shape), d0, d1)
        out[name] = np.ascontiguousarray(res).view(np.uint8).tobytes()
    return out


@pytest.mark.parametrize("memory", ["2MiB", "256MiB"])
def test_cli_slerp_is_exact_and_independent_of_the_chunking(tmp_path, memory):
    _, a, b = make_trio(tmp_path, big=300_000)
    out = tmp_path / "out"
    r = run_cli([str(a), str(b), "--method", "slerp", "--t", "0.3", "-o", str(out),
                 "--memory", memory, "--seed", "1"])  # fmt: skip
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "streammerge.json").read_text())
    assert rec["mixup"] is None and all(v["t"] == 0.3 for v in rec["tensors"].values())
    got = {n: v.tobytes() for n, v in output_bytes(out).items()}
    assert got == _expected(a, b, rec)


def test_m3_draws_t_as_one_minus_lambda(tmp_path):
    _, a, b = make_trio(tmp_path)
    out = tmp_path / "out"
    r = run_cli([str(a), str(b), "--method", "slerp", "--alpha", "0.5", "--seed", "7", "-o", str(out)])
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "streammerge.json").read_text())
    lam = rec["mixup"][0]
    assert rec["alpha"] == 0.5 and {v["t"] for v in rec["tensors"].values()} == {rec["mixup"][1]}
    assert rec["mixup"][1] == 1.0 - lam
    assert {n: v.tobytes() for n, v in output_bytes(out).items()} == _expected(a, b, rec)


def test_mergekit_slerp_recipe_with_filters_and_gradients(tmp_path):
    """The usual mergekit recipe: base_model is v0, t per filter as a gradient over layers."""
    _, a, b = make_trio(tmp_path)
    cfg = tmp_path / "slerp.yml"
    cfg.write_text(
        f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n"
        "parameters:\n  t:\n    - filter: attn\n      value: [0, 0.5, 1]\n"
        "    - filter: mlp\n      value: [1, 0.5, 0]\n    - value: 0.5\n"
        "dtype: bfloat16\n"
    )
    out = tmp_path / "out"
    r = run_cli(["--config", str(cfg), "-o", str(out)])
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "streammerge.json").read_text())
    t = {n: v["t"] for n, v in rec["tensors"].items()}
    # layers 0..10: layer 0 at depth 0, layer 1 at 0.1 (mergekit's gradient coordinate)
    assert t["layers.0.attn.q.weight"] == 0.0 and t["layers.0.mlp.up.weight"] == 1.0
    assert t["layers.1.mlp.down.weight"] == pytest.approx(0.9)
    assert t["embed.weight"] == 0.5 and t["layers.0.norm.weight"] == 0.5
    assert {n: v.tobytes() for n, v in output_bytes(out).items()} == _expected(a, b, rec)


@pytest.mark.parametrize("argv, message", [
    (["--method", "slerp", "--alpha", "1", "--t", "0.5", "--lambda", "0.5"], "give t or --lambda"),
    (["--method", "slerp", "--weights", "1,1"], "--weights does not apply to method slerp"),
    (["--method", "slerp", "--density", "0.5"], "--density does not apply to method slerp"),
    (["--method", "slerp", "--t", "nan"], "t: must be a finite number"),
])  # fmt: skip
def test_bad_slerp_recipes_are_one_line(tmp_path, argv, message):
    _, a, b = make_trio(tmp_path)
    r = run_cli([str(a), str(b), *argv, "-o", str(tmp_path / "out")])
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_slerp_merges_exactly_two_models(tmp_path):
    base, a, b = make_trio(tmp_path)
    r = run_cli([str(a), str(b), str(base), "--method", "slerp", "--t", "0.5", "-o", str(tmp_path / "o")])
    assert r.returncode == 2 and "merges exactly 2 models, got 3" in r.stderr, r.stderr


def test_a_row_longer_than_the_memory_allows_is_refused_before_writing(tmp_path):
    from conftest import write_model
    import torch

    ts = {"w": torch.zeros(2, 600_000, dtype=torch.bfloat16)}
    a = write_model(tmp_path / "a", ts)
    b = write_model(tmp_path / "b", {"w": torch.ones(2, 600_000, dtype=torch.bfloat16)})
    r = run_cli([str(a), str(b), "--method", "slerp", "--t", "0.5", "--memory", "2MiB",
                 "-o", str(tmp_path / "o")])  # fmt: skip
    assert r.returncode == 2 and "rows of 600000" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_rows_cut_across_many_chunks_give_the_same_bytes(tmp_path):
    """A 2-D tensor of 600 rows x 1500 spans many chunks at 2MiB (whole rows each): the bytes
    equal the oracle's and a one-chunk run's."""
    import torch
    from conftest import write_model

    g = torch.Generator().manual_seed(3)
    w = torch.randn(600, 1500, generator=g)
    a = write_model(tmp_path / "a", {"m.w": w.to(torch.bfloat16)})
    b = write_model(tmp_path / "b", {"m.w": (w + 0.3 * torch.randn(600, 1500, generator=g)).to(torch.bfloat16)})
    outs = []
    for memory in ("2MiB", "256MiB"):
        out = tmp_path / memory
        r = run_cli([str(a), str(b), "--method", "slerp", "--t", "0.6", "--memory", memory,
                     "-o", str(out), "--profile"])  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs.append({n: v.tobytes() for n, v in output_bytes(out).items()})
    rec = json.loads((tmp_path / "2MiB" / "streammerge.json").read_text())
    assert outs[0] == outs[1] == _expected(a, b, rec)


def _wide_pair(tmp_path):
    """Two models whose 2-D tensor spans several chunks at 2MiB, plus a 1-D and a 0-d one."""
    import torch
    from conftest import write_model

    g = torch.Generator().manual_seed(5)
    w = torch.randn(600, 1500, generator=g)
    ts = [{"m.w": w, "m.n": torch.randn(40, generator=g), "m.s": torch.tensor(0.5)}]
    ts.append({k: v + 0.4 * torch.randn(v.shape, generator=g) for k, v in ts[0].items()})
    return [write_model(tmp_path / name, {k: v.to(torch.bfloat16) for k, v in t.items()})
            for name, t in zip("ab", ts)]  # fmt: skip


def test_triton_backend_slerp_equals_numba(tmp_path):
    """The Triton row kernels through the whole pipeline (interpreter), a tensor read twice
    (its sums, then the combine): numba's files byte for byte."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU run")
    pytest.importorskip("triton")
    a, b = _wide_pair(tmp_path)
    outs = {}
    for backend in ("numba", "triton"):
        out = tmp_path / backend
        r = run_cli([str(a), str(b), "--method", "slerp", "--t", "0.35", "--memory", "2MiB",
                     "--backend", backend, "--device", "cpu", "-o", str(out)],
                    timeout=600, env=dict(os.environ, TRITON_INTERPRET="1"))  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs[backend] = {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}
    assert outs["triton"] == outs["numba"]


def test_device_backend_slerp_on_fake_streams_gives_numba_bytes(tmp_path):
    """The device backend hands slerp's passes (row_dots, then the combine) to the host:
    numba's bytes, on fake streams with random delays."""
    import streammerge
    from streammerge.api import Options, execute, finalize, prepare
    from streammerge.exec.gpu import DeviceBackend, device_stats_bytes
    from streammerge.exec.threadqueue import NumbaLauncher, ThreadQueue

    a, b = _wide_pair(tmp_path)
    streammerge.merge([a, b], None, tmp_path / "cpu", method="slerp", t=0.7, memory="2MiB",
                      backend="numba", device="cpu")  # fmt: skip
    q = ThreadQueue(seed=1, max_delay_s=0.0005)
    prep = prepare([a, b], None, tmp_path / "gpu", {"method": "slerp", "t": 0.7},
                   Options(memory="2MiB"))  # fmt: skip
    finalize(prep, execute(prep, DeviceBackend(q, NumbaLauncher(), device_stats_bytes(2) + 2**20)))
    q.shutdown()
    files = [sorted((p.name, p.read_bytes()) for p in (tmp_path / d).glob("*.safetensors"))
             for d in ("cpu", "gpu")]  # fmt: skip
    assert files[0] == files[1] and files[0]
