"""sce (docs/SPEC.md "SCE"): the four passes (variance histograms, energies, merge) against
the SPEC oracle over dtypes, model counts, select_topk and odd sizes, whatever the chunking;
the oracle against mergekit's torch code; whole merges (CLI, mergekit YAML) against the
oracle; the one-line refusals."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import spec_reference as ref
from conftest import as_numpy, load_dir, make_trio, output_bytes, run_cli
from test_ram import ITEM, _as_bytes, _shift, _slot

from streammerge.methods import sce
from streammerge.recipe.recipe import TensorParams

DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}
CASES = [(["BF16"] * 3, "BF16"), (["F16"] * 4, "F16"), (["F32"] * 3, "F32"),
         (["BF16", "BF16", "F16"], "BF16"), (["BF16"] * 5, "F32")]  # fmt: skip


def _finite(n, dtypes, seed):
    """A slot without NaN / infinity (a NaN variance makes every element NaN)."""
    slot, rows = _slot(n, len(dtypes) - 1, dtypes, seed)
    rows = [r.copy() for r in rows]
    if n > 12:
        for r in rows[1:]:
            r[5], r[7], r[9] = rows[0][5], rows[0][7], rows[0][9]
    for k, r in enumerate(rows):
        b = np.ascontiguousarray(r).view(np.uint8)
        slot[k, : b.size] = b
    return slot, rows


def _passes(slot, dtypes, n, topk, chunk, do, work=None):
    """The method's passes over chunks of ``chunk`` elements (a multiple of the block), as
    the engine runs them: each statistics pass over the whole tensor, then the merge."""
    m = sce.METHOD
    stats: dict = {}
    out = bytearray()
    n_models = len(dtypes) - 1
    for p in m.row_passes:
        if p.is_stats:
            stats[p.name] = p.accumulators(n_models)
        for lo in range(0, n, chunk):
            c = min(chunk, n - lo)
            part = np.ascontiguousarray(np.stack([_shift(slot[r], lo, ITEM[d])
                                                  for r, d in enumerate(dtypes)]))  # fmt: skip
            a = types.SimpleNamespace(op=p.name, dtypes=tuple(dtypes), base_row=0,
                                      model_rows=tuple(range(1, len(dtypes))), count=c,
                                      params=(("select_topk", topk), ("int8_mask", False)),
                                      counts=stats.get(p.name), stats=stats,
                                      compute_dtype=work, out_dtype=do)  # fmt: skip
            buf = np.zeros(c * ITEM[do], np.uint8)
            p.cpu(part, buf, a)
            if not p.is_stats:
                out += buf.tobytes()
    return bytes(out)


def _same(a: bytes, b: bytes, dtype: str) -> bool:
    car = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[dtype]
    x = ref.to_float32(np.frombuffer(a, car), dtype)
    y = ref.to_float32(np.frombuffer(b, car), dtype)
    return bool(np.all((x.view(np.uint32) == y.view(np.uint32)) | (np.isnan(x) & np.isnan(y))))


@pytest.mark.parametrize("n", [1, 3000])
@pytest.mark.parametrize("dtypes, do", CASES)
def test_passes_equal_the_spec_oracle_whatever_the_chunking(n, dtypes, do):
    slot, rows = _finite(n, dtypes, n + len(dtypes))
    for topk in (1.0, 0.5, 0.0, 0.999):
        want = _as_bytes(ref.spec_sce(rows[0], rows[1:], dtypes, topk, do))
        for chunk in (1024, 2048):
            assert _passes(slot, dtypes, n, topk, chunk, do) == want, (topk, chunk)
    slot, rows = _slot(n, len(dtypes) - 1, dtypes, 3)  # NaN and infinity: NaN everywhere
    want = _as_bytes(ref.spec_sce(rows[0], rows[1:], dtypes, 0.5, do))
    assert _same(_passes(slot, dtypes, n, 0.5, 2048, do), want, do)


def test_ties_at_the_threshold_are_all_kept():
    """bf16 deltas on a coarse grid: many variances tie; every tie with T is kept."""
    n, dtypes = 4000, ["BF16"] * 4
    rng = np.random.default_rng(7)
    xb = np.zeros(n, np.float32)
    rows = [ref.from_float32(xb, "BF16")]
    rows += [ref.from_float32(rng.integers(-3, 4, n).astype(np.float32) / 8, "BF16")
             for _ in range(3)]  # fmt: skip
    slot = np.zeros((4, n * 4), np.uint8)
    for k, r in enumerate(rows):
        slot[k, : 2 * n] = r.view(np.uint8)
    _, _, tv = ref._spec_sce_vectors(rows[0], rows[1:], dtypes)
    keys = ref.spec_sce_var_keys(tv, "BF16")
    _, T = ref.spec_sce_threshold(keys, 0.3)
    assert np.count_nonzero(keys >= T) > int(np.float32(np.count_nonzero(keys) * np.float32(0.3)))
    want = _as_bytes(ref.spec_sce(rows[0], rows[1:], dtypes, 0.3, "BF16"))
    assert _passes(slot, dtypes, n, 0.3, 1024, "BF16") == want


@pytest.mark.parametrize("w", ["BF16", "F16", "F32"])
def test_bf16_keys_need_no_low_histogram_pass(w):
    """W = bf16: every variance key's low 16 bits are 0, so the threshold is its high
    bucket and the plan reads no ``sce_hist_low`` pass; f16 / f32 keys have low bits.
    select_topk >= 1 or <= 0 reads no histogram pass at all."""
    dtypes = [w] * 4
    _, rows = _finite(5000, dtypes, 11)
    _, _, tv = ref._spec_sce_vectors(rows[0], rows[1:], dtypes)
    low = ref.spec_sce_var_keys(tv, w) & 0xFFFF
    assert (np.count_nonzero(low) == 0) == (w == "BF16")
    needed = sce.METHOD.pass_needed
    for topk, high in ((0.5, True), (1.0, False), (0.0, False), (-2.0, False)):
        tp = TensorParams(w=(), values=(("select_topk", topk),), compute=w)
        assert needed("sce_hist_high", tp) == high
        assert needed("sce_hist_low", tp) == (high and w != "BF16")


@pytest.mark.parametrize("dtypes, work, do", [(["BF16"] * 3, "F32", "F32"), (["F32"] * 4, "BF16", "BF16")])
def test_a_working_dtype_rounds_the_inputs_first(dtypes, work, do):
    n = 3000
    slot, rows = _finite(n, dtypes, 21)
    for topk in (1.0, 0.4):
        want = _as_bytes(ref.spec_sce(rows[0], rows[1:], dtypes, topk, do, work))
        assert _passes(slot, dtypes, n, topk, 2048, do, work) == want


def _mergekit_sce(torch, tensors, base, select_topk):
    """mergekit 0.1.5 ``sce_merge`` (merge_methods/sce.py), its torch ops verbatim."""
    tvs = torch.stack([t - base for t in tensors], dim=0)
    if select_topk < 1:
        if select_topk <= 0:
            mask = torch.zeros_like(tvs[0])
        else:
            var = torch.var(tvs, dim=0, unbiased=False)
            k = int(torch.count_nonzero(var) * select_topk)
            mask = torch.zeros_like(var)
            if k:
                _, idx = torch.topk(var.abs().view(-1), k=k, largest=True)
                mask.view(-1)[idx] = 1
        tvs = tvs * mask.unsqueeze(0)
    sign = tvs.sign()
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    erase = sign == majority
    w = torch.mean(tvs**2, dim=list(range(1, tvs.dim())))
    ws = torch.sum(w).item()
    w = torch.ones_like(w) / w.shape[0] if abs(ws) < 1e-6 else w / ws
    while w.dim() < tvs.dim():
        w = w.unsqueeze(-1)
    ew = w * erase
    merged = (tvs * ew).sum(dim=0) / torch.sum(ew, dim=0).clamp(min=1e-6)
    return base + merged


def test_oracle_follows_mergekits_torch_ops():
    """bf16 / f16 without variance ties at the threshold: mergekit's bytes exactly."""
    torch = pytest.importorskip("torch")
    for dt, tdt in (("BF16", torch.bfloat16), ("F16", torch.float16)):
        for n_models in (2, 3, 5):
            _, rows = _finite(900, [dt] * (n_models + 1), 30 + n_models)
            ts = [torch.from_numpy(np.ascontiguousarray(x)).view(tdt) for x in rows]
            _, _, tv = ref._spec_sce_vectors(rows[0], rows[1:], [dt] * (n_models + 1))
            keys = ref.spec_sce_var_keys(tv, dt)
            tvs = torch.stack([t - ts[0] for t in ts[1:]])
            got_keys = torch.var(tvs, dim=0, unbiased=False).float().numpy().view(np.uint32)
            assert np.array_equal(got_keys & 0x7FFFFFFF, keys)
            for topk in (1.0, 0.0):  # no threshold, so no tie
                want = _mergekit_sce(torch, ts[1:], ts[0], topk).float().numpy()
                got = ref.to_float32(ref.spec_sce(rows[0], rows[1:], [dt] * (n_models + 1), topk, dt), dt)
                assert got.tobytes() == want.tobytes(), (dt, n_models, topk)


def _expected(base, models, rec: dict, topk: float) -> dict[str, bytes]:
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
            out[name] = _as_bytes(ref.spec_sce(rows[0], rows[1:], dts, topk, dt))
    return out


def _bytes(out) -> dict[str, bytes]:
    return {k: _as_bytes(v) for k, v in output_bytes(out).items()}


def test_cli_is_exact_and_independent_of_the_chunking(tmp_path):
    base, a, b = make_trio(tmp_path, big=300_000)
    outs = []
    for k, more in enumerate(([], ["--memory", "8MB", "--threads", "1", "--shard-size", "300KB"])):
        out = tmp_path / f"out{k}"
        r = run_cli([str(a), str(b), "--base", str(base), "--method", "sce", "--select-topk",
                     "0.3", "-o", str(out), *more])  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs.append(_bytes(out))
    assert outs[0] == outs[1]
    rec = json.loads((tmp_path / "out0" / "streammerge.json").read_text())
    assert outs[0] == _expected(base, [a, b], rec, 0.3)


def test_mergekit_recipe(tmp_path):
    base, a, b = make_trio(tmp_path)
    cfg = tmp_path / "sce.yml"
    cfg.write_text(f"merge_method: sce\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                   f"  - model: {b}\nparameters:\n  select_topk: 0.5\n  int8_mask: true\n")  # fmt: skip
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "o")])
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "o" / "streammerge.json").read_text())
    assert _bytes(tmp_path / "o") == _expected(base, [a, b], rec, 0.5)


def test_bad_recipes_are_one_line(tmp_path):
    base, a, b = make_trio(tmp_path)
    for argv, message in ((["--alpha", "0.5"], "nothing for M3 to draw"),
                          (["--weights", "1,1"], "--weights does not apply"),
                          (["--select-topk", "nan"], "--select-topk")):  # fmt: skip
        r = run_cli([str(a), str(b), "--base", str(base), "--method", "sce", *argv,
                     "-o", str(tmp_path / "o")])  # fmt: skip
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_triton_kernels_equal_numba():
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU run")
    torch = pytest.importorskip("torch")
    from streammerge.kernels import cpu_sce, triton_sce

    tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for n, dtypes, do, topk in [(2100, ["BF16"] * 4, "BF16", 0.4), (37, ["F16"] * 3, "F16", 1.0),
                                (1030, ["F32", "BF16", "BF16"], "BF16", 0.0),
                                (3000, ["F32"] * 3, "F32", 0.7)]:  # fmt: skip
        slot, rows = _finite(n, dtypes, 4)
        w_dt = dtypes[0] if len(set(dtypes)) == 1 else "F32"
        keys = ref.spec_sce_var_keys(ref._spec_sce_vectors(rows[0], rows[1:], dtypes)[2], w_dt)
        keep_all, thr = ref.spec_sce_threshold(keys, topk)
        assert keep_all or thr > (1 << 31) or 0 < np.count_nonzero(keys >= thr) < n
        ts = [torch.from_numpy(np.ascontiguousarray(x).copy()).view(tdt[d]) for x, d in zip(rows, dtypes)]
        mr = list(range(1, len(dtypes)))
        got = triton_sce.sce_energy_triton(ts[0], ts[1:], n, keep_all, thr).numpy()
        want = cpu_sce.sce_energy(slot, dtypes, 0, mr, n, keep_all, thr)
        assert np.array_equal(got, want)
        wt = np.array([0.25, 0.5, 0.375][: len(mr)], np.float32)
        out = torch.zeros(n, dtype=tdt[do])
        lo = sce.round_work(np.float32(1e-6), w_dt)
        triton_sce.sce_triton(ts[0], ts[1:], n, keep_all, thr, wt, lo, out)
        cpu = np.zeros(n * ITEM[do], np.uint8)
        cpu_sce.sce_chunk(slot, dtypes, 0, mr, n, keep_all, thr, wt, cpu, do)
        assert out.view(torch.uint8).numpy().tobytes() == cpu.tobytes()
