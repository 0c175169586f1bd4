"""model_stock (docs/SPEC.md "Model Stock"): the statistics and merge kernels against the
SPEC oracle over dtypes, model counts and odd sizes, whatever the chunking; t against
mergekit's torch chain; Triton against numba byte for byte; whole merges (CLI, mergekit
YAML) against the oracle; the one-line refusals; ``filter_wise`` (one t per row of the last
dimension) the same ways."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import spec_reference as ref
from conftest import as_numpy, load_dir, make_trio, output_bytes, run_cli
from streammerge.kernels import cpu_stock
from test_ram import ITEM, _as_bytes, _shift, _slot

from streammerge.methods.model_stock import round_work_rows, stock_t, stock_t_rows

DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}
CASES = [(["BF16"] * 3, "BF16"), (["F16"] * 4, "F16"), (["F32"] * 3, "F32"),
         (["BF16", "BF16", "F16"], "BF16"), (["BF16"] * 5, "F32")]  # fmt: skip


def _same(a: bytes, b: bytes, dtype: str) -> bool:
    """Equal bits, or both NaN (a NaN t, from a NaN input, makes every element NaN; the
    sign of a NaN is the CPU's, not the contract's)."""
    car = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[dtype]
    x = ref.to_float32(np.frombuffer(a, car), dtype)
    y = ref.to_float32(np.frombuffer(b, car), dtype)
    return bool(np.all((x.view(np.uint32) == y.view(np.uint32)) | (np.isnan(x) & np.isnan(y))))


def _work(dtypes):
    return dtypes[0] if len(set(dtypes)) == 1 else "F32"


def _sums(slot, dtypes, n, chunk):
    """The statistics in chunks of ``chunk`` elements (a multiple of the block)."""
    total = np.zeros(cpu_stock.n_stats(len(dtypes) - 1), np.float64)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        part = np.ascontiguousarray(np.stack([_shift(slot[r], lo, ITEM[d]) for r, d in enumerate(dtypes)]))
        cpu_stock.add_blocks(total, cpu_stock.stock_dots(part, dtypes, 0, list(range(1, len(dtypes))), m))
    return total


@pytest.mark.parametrize("n", [1, 1000, 1024, 5000])
@pytest.mark.parametrize("dtypes, do", CASES)
def test_kernels_equal_the_spec_oracle_whatever_the_chunking(n, dtypes, do):
    slot, rows = _slot(n, len(dtypes) - 1, dtypes, n)
    want = ref.spec_stock_sums(rows[0], rows[1:], dtypes)
    for chunk in (1024, 2048, 8192):
        got = _sums(slot, dtypes, n, chunk)
        assert np.array_equal(np.abs(got), np.abs(want), equal_nan=True), chunk
    t = stock_t(want, len(dtypes) - 1, _work(dtypes))
    t_ref = ref.spec_stock_t(want, len(dtypes) - 1, _work(dtypes))
    assert np.array([t]).tobytes() == np.array([t_ref]).tobytes()
    out = np.zeros(n * ITEM[do], np.uint8)
    cpu_stock.stock_chunk(slot, dtypes, 0, list(range(1, len(dtypes))), n, t, out, do)
    assert _same(out.tobytes(), _as_bytes(ref.spec_model_stock(rows[0], rows[1:], dtypes, do)), do)
    if n > 12:  # finite inputs: every bit
        for r in rows[1:]:
            r[5], r[9] = rows[0][5], rows[0][9]
        slot, _ = _slot(n, len(dtypes) - 1, dtypes, n)
        for k, r in enumerate(rows):
            b = np.ascontiguousarray(r).view(np.uint8)
            slot[k, : b.size] = b
        sums = _sums(slot, dtypes, n, 2048)
        t = stock_t(sums, len(dtypes) - 1, _work(dtypes))
        assert not np.isnan(t)
        cpu_stock.stock_chunk(slot, dtypes, 0, list(range(1, len(dtypes))), n, t, out, do)
        assert out.tobytes() == _as_bytes(ref.spec_model_stock(rows[0], rows[1:], dtypes, do))


def test_t_and_merge_follow_mergekits_torch_chain():
    """In bf16 / f16 (few elements: torch's float32 sums round to the same W values as
    SPEC's float64 sums) t and the merged value are mergekit's model_stock_merge_method
    bit for bit. (In float32 the sums themselves differ in the last bits: SPEC.)"""
    torch = pytest.importorskip("torch")
    tdt = {"BF16": torch.bfloat16, "F16": torch.float16}
    for dt, tdt_dt in tdt.items():
        for n_models in (2, 3, 4):
            dtypes = [dt] * (n_models + 1)
            _, rows = _slot(700, n_models, dtypes, 10 + n_models)
            rows = [r.copy() for r in rows]
            for r in rows:  # finite values only (torch's NaN handling is not the point here)
                r[5:10] = rows[0][5:10]
            ts = [torch.from_numpy(np.ascontiguousarray(x)).view(tdt_dt) for x in rows]
            w0, ws = ts[0], ts[1:]
            offs = [w - w0 for w in ws]
            cs = []
            for i, a in enumerate(offs):
                for b in offs[i + 1 :]:
                    npr = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
                    cs.append(((a * b).sum(dim=-1) / npr.clamp(min=1e-6)).clamp(-1, 1))
            cos = torch.stack(cs).mean(dim=0).unsqueeze(-1)
            den = 1 + (n_models - 1) * cos
            sing = den.abs() < 1e-6
            t = torch.where(sing, torch.zeros_like(cos), (n_models * cos) / torch.where(sing, torch.ones_like(den), den))
            want = (t * (sum(ws) / n_models) + (1 - t) * w0).float().numpy()
            sums = ref.spec_stock_sums(rows[0], rows[1:], dtypes)
            assert np.float32(stock_t(sums, n_models, dt)) == t.float().item(), (dt, n_models)
            got = ref.to_float32(ref.spec_model_stock(rows[0], rows[1:], dtypes, dt), dt)
            assert got.tobytes() == want.tobytes(), (dt, n_models)


def test_triton_kernels_equal_numba():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU run")
    torch = pytest.importorskip("torch")
    from streammerge.kernels import triton_stock

    from streammerge.methods.model_stock import round_work

    tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for n, dtypes, do in [(2100, ["BF16"] * 4, "BF16"), (37, ["F16"] * 3, "F16"),
                          (1030, ["F32", "BF16", "BF16"], "BF16")]:  # fmt: skip
        slot, rows = _slot(n, len(dtypes) - 1, dtypes, 4)
        ts = [torch.from_numpy(np.ascontiguousarray(x).copy()).view(tdt[d]) for x, d in zip(rows, dtypes)]
        blocks = triton_stock.stock_dots_triton(ts[0], ts[1:], n).numpy()
        want = cpu_stock.stock_dots(slot, dtypes, 0, list(range(1, len(dtypes))), n)
        assert np.array_equal(np.abs(blocks), np.abs(want), equal_nan=True)
        total = np.zeros(blocks.shape[1], np.float64)
        cpu_stock.add_blocks(total, want)
        t = stock_t(total, len(dtypes) - 1, _work(dtypes))
        q = round_work(np.float32(1) - t, _work(dtypes))
        out = torch.zeros(n, dtype=tdt[do])
        triton_stock.stock_triton(ts[0], ts[1:], n, t, q, out)
        cpu = np.zeros(n * ITEM[do], np.uint8)
        cpu_stock.stock_chunk(slot, dtypes, 0, list(range(1, len(dtypes))), n, t, cpu, do)
        assert _same(out.view(torch.uint8).numpy().tobytes(), cpu.tobytes(), do)


def _finite_slot(n, dtypes, seed):
    """``_slot`` with its NaN and infinities replaced by the base's values."""
    _, rows = _slot(n, len(dtypes) - 1, dtypes, seed)
    rows = [r.copy() for r in rows]
    if n > 12:
        for r in rows[1:]:
            r[5], r[7], r[9] = rows[0][5], rows[0][7], rows[0][9]
    width = max(np.ascontiguousarray(r).nbytes for r in rows)
    slot = np.zeros((len(rows), width), np.uint8)
    for k, r in enumerate(rows):
        b = np.ascontiguousarray(r).view(np.uint8)
        slot[k, : b.size] = b
    return slot, rows


@pytest.mark.parametrize("shape", [(7, 1500), (5, 33), (61,), (3, 1, 4)])
@pytest.mark.parametrize("dtypes, do", [CASES[0], CASES[2], CASES[3], CASES[4]])
def test_filter_wise_kernels_equal_the_spec_oracle(shape, dtypes, do):
    n, c = int(np.prod(shape)), shape[-1]
    slot, rows = _finite_slot(n, dtypes, n + len(dtypes))
    models, w = list(range(1, len(dtypes))), _work(dtypes)
    sums = cpu_stock.stock_row_dots(slot, dtypes, 0, models, n // c, c)
    for r in range(n // c):
        sl = slice(r * c, (r + 1) * c)
        want = ref.spec_stock_sums(rows[0][sl], [m[sl] for m in rows[1:]], dtypes)
        assert np.array_equal(np.abs(sums[r]), np.abs(want))
    t = stock_t_rows(sums, len(models), w)
    assert t.tobytes() == np.array([stock_t(row, len(models), w) for row in sums]).tobytes()
    q = round_work_rows(np.float32(1) - t, w)
    out = np.zeros(n * ITEM[do], np.uint8)
    cpu_stock.stock_rows_chunk(slot, dtypes, 0, models, n, c, t, q, out, do)
    want = ref.spec_model_stock_filter_wise(rows[0], rows[1:], dtypes, do, shape)
    assert out.tobytes() == _as_bytes(want)
    if len(shape) == 1:  # one row: filter_wise's t is the tensor's
        assert _as_bytes(want) == _as_bytes(ref.spec_model_stock(rows[0], rows[1:], dtypes, do))


def test_filter_wise_t_handles_nan_and_a_zero_task_vector():
    sums = np.array([[np.nan, 1.0, 0.5], [0.0, 1.0, 0.0], [4.0, 4.0, 4.0]])
    for w in ("F32", "BF16", "F16"):
        t = stock_t_rows(sums, 2, w)
        want = np.array([stock_t(row, 2, w) for row in sums])
        assert np.array_equal(t, want, equal_nan=True) and np.isnan(t[0])


def test_filter_wise_triton_kernels_equal_numba():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU run")
    torch = pytest.importorskip("torch")
    from streammerge.kernels import triton_stock

    tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for k, c, dtypes, do in [(3, 1100, ["BF16"] * 4, "BF16"), (4, 37, ["F32", "BF16", "F16"], "F32")]:
        n = k * c
        slot, rows = _finite_slot(n, dtypes, 8)
        models, w = list(range(1, len(dtypes))), _work(dtypes)
        ts = [torch.from_numpy(np.ascontiguousarray(x).copy()).view(tdt[d]) for x, d in zip(rows, dtypes)]
        want = cpu_stock.stock_row_dots(slot, dtypes, 0, models, k, c)
        got = triton_stock.stock_row_dots_triton(ts[0], ts[1:], k, c).numpy()
        assert np.array_equal(np.abs(got), np.abs(want))
        t = stock_t_rows(want, len(models), w)
        q = round_work_rows(np.float32(1) - t, w)
        out = torch.zeros(n, dtype=tdt[do])
        triton_stock.stock_rows_triton(ts[0], ts[1:], n, c, torch.from_numpy(t), torch.from_numpy(q), out)
        cpu = np.zeros(n * ITEM[do], np.uint8)
        cpu_stock.stock_rows_chunk(slot, dtypes, 0, models, n, c, t, q, cpu, do)
        assert out.view(torch.uint8).numpy().tobytes() == cpu.tobytes()


def _expected(base, models, rec: dict, filter_wise: bool = False) -> dict[str, bytes]:
    tb, tms = load_dir(base), [load_dir(m) for m in models]
    out = {}
    for name, x in tb.items():
        dt = DTYPES.get(str(x.dtype)) if rec.get("dtype") in (None, "") else rec["dtype"]
        if not x.is_floating_point():
            out[name] = as_numpy(x).view(np.uint8).tobytes()
        elif name not in tms[0]:
            out[name] = _as_bytes(ref.from_float32(ref.to_float32(as_numpy(x), DTYPES[str(x.dtype)]), dt))
        else:
            dts = [DTYPES[str(x.dtype)]] + [DTYPES[str(m[name].dtype)] for m in tms]
            rows = [as_numpy(x)] + [as_numpy(m[name]) for m in tms]
            if filter_wise:
                res = ref.spec_model_stock_filter_wise(rows[0], rows[1:], dts, dt, tuple(x.shape))
            else:
                res = ref.spec_model_stock(rows[0], rows[1:], dts, dt)
            out[name] = _as_bytes(res)
    return out


def _bytes(out) -> dict[str, bytes]:
    return {k: _as_bytes(v) for k, v in output_bytes(out).items()}


def test_cli_is_exact_and_independent_of_the_chunking(tmp_path):
    base, a, b = make_trio(tmp_path, big=300_000)
    outs = []
    for k, more in enumerate(([], ["--memory", "8MB", "--threads", "1", "--shard-size", "300KB"])):
        out = tmp_path / f"out{k}"
        r = run_cli([str(a), str(b), "--base", str(base), "--method", "model_stock", "-o", str(out), *more])
        assert r.returncode == 0, r.stderr
        outs.append(_bytes(out))
    assert outs[0] == outs[1]
    rec = json.loads((tmp_path / "out0" / "streammerge.json").read_text())
    assert outs[0] == _expected(base, [a, b], rec)


def test_mergekit_recipe_and_triton_backend(tmp_path):
    base, a, b = make_trio(tmp_path)
    cfg = tmp_path / "ms.yml"
    cfg.write_text(f"merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                   f"  - model: {b}\ndtype: bfloat16\n")  # fmt: skip
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "o")])
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "o" / "streammerge.json").read_text())
    assert _bytes(tmp_path / "o") == _expected(base, [a, b], rec)
    if os.environ.get("TRITON_INTERPRET") == "1":
        r = run_cli([str(a), str(b), "--base", str(base), "--method", "model_stock",
                     "--backend", "triton", "-o", str(tmp_path / "tri")])  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert _bytes(tmp_path / "tri") == _bytes(tmp_path / "o")


def test_bad_recipes_are_one_line(tmp_path):
    base, a, b = make_trio(tmp_path)
    for argv, message in ((["--alpha", "0.5"], "nothing for M3 to draw"),
                          (["--weights", "1,1"], "--weights does not apply")):  # fmt: skip
        r = run_cli([str(a), str(b), "--base", str(base), "--method", "model_stock", *argv,
                     "-o", str(tmp_path / "o")])  # fmt: skip
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    cfg = tmp_path / "ms.yml"
    cfg.write_text(f"merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                   f"  - model: {b}\nparameters:\n  filter_wise: maybe\n")  # fmt: skip
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "o")])
    assert r.returncode == 2 and "filter_wise" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    cfg.write_text(f"merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {a}\n")
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "o")])
    assert r.returncode == 2 and "models" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("dtypes, work, do", [(["BF16"] * 3, "F32", "F32"), (["F32"] * 4, "BF16", "BF16")])
def test_a_working_dtype_rounds_the_inputs_first(dtypes, work, do):
    """mergekit's dtype: (the recipe's W): every input rounded to W, every op in W."""
    n = 3000
    slot, rows = _slot(n, len(dtypes) - 1, dtypes, 21)
    for r in rows[1:]:
        r[5], r[9] = rows[0][5], rows[0][9]
    for k, r in enumerate(rows):
        b = np.ascontiguousarray(r).view(np.uint8)
        slot[k, : b.size] = b
    rows_m = list(range(1, len(dtypes)))
    total = np.zeros(cpu_stock.n_stats(len(rows_m)), np.float64)
    cpu_stock.add_blocks(total, cpu_stock.stock_dots(slot, dtypes, 0, rows_m, n, work))
    want = ref.spec_stock_sums(rows[0], rows[1:], dtypes, work)
    assert np.array_equal(np.abs(total), np.abs(want))
    t = stock_t(total, len(rows_m), work)
    out = np.zeros(n * ITEM[do], np.uint8)
    cpu_stock.stock_chunk(slot, dtypes, 0, rows_m, n, t, out, do, work)
    assert out.tobytes() == _as_bytes(ref.spec_model_stock(rows[0], rows[1:], dtypes, do, work))


def test_filter_wise_cli_and_recipe_are_exact_and_independent_of_the_chunking(tmp_path):
    """filter_wise from the CLI (default and small chunks) and from a mergekit YAML recipe:
    the oracle's bytes (one t per row of the last dimension)."""
    base, a, b = make_trio(tmp_path)
    outs = []
    for k, more in enumerate(([], ["--memory", "8MB", "--threads", "1", "--shard-size", "300KB"])):
        out = tmp_path / f"out{k}"
        r = run_cli([str(a), str(b), "--base", str(base), "--method", "model_stock",
                     "--filter-wise", "-o", str(out), *more])  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs.append(_bytes(out))
    rec = json.loads((tmp_path / "out0" / "streammerge.json").read_text())
    assert rec["tensors"]["embed.weight"]["filter_wise"] is True
    assert outs[0] == outs[1] == _expected(base, [a, b], rec, filter_wise=True)
    cfg = tmp_path / "ms.yml"
    cfg.write_text(f"merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                   f"  - model: {b}\nparameters:\n  filter_wise: true\ndtype: bfloat16\n")  # fmt: skip
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "y")])
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "y" / "streammerge.json").read_text())
    assert _bytes(tmp_path / "y") == _expected(base, [a, b], rec, filter_wise=True)


def test_filter_wise_triton_pass_equals_numba():
    """The method's Triton writing pass (``_stock_triton`` through ``TritonLauncher``) gives
    the numba pass's bytes (the pipeline's glue, without a whole interpreted merge)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU run")
    torch = pytest.importorskip("torch")
    from streammerge.exec.ops import RowArgs
    from streammerge.exec.triton_launcher import TritonLauncher
    from streammerge.methods import model_stock

    for shape, dtypes in (((5, 33), ("BF16",) * 3), ((2, 3, 7), ("F32", "BF16", "BF16", "F16"))):
        n = int(np.prod(shape))
        slot, _ = _finite_slot(n, list(dtypes), 6)
        a = RowArgs(op="model_stock", dtypes=dtypes, model_rows=tuple(range(1, len(dtypes))),
                    n_rows=n // shape[-1], row_len=shape[-1], t=0.0, out_dtype="BF16",
                    base_row=0, params=(("filter_wise", True),), count=n, shape=shape)  # fmt: skip
        out = np.zeros(2 * n, np.uint8)
        model_stock._stock_cpu(slot, out, a)
        tout = torch.zeros(2 * n, dtype=torch.uint8)
        model_stock._stock_triton(TritonLauncher(torch), torch.from_numpy(slot), tout, a)
        assert tout.numpy().tobytes() == out.tobytes()
