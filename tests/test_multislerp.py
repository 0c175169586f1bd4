"""multislerp (docs/SPEC.md "Multi-SLERP"): the statistics and merge kernels against the
SPEC oracle over dtypes, model counts, with and without a base, whatever the chunking; the
oracle against mergekit's torch body bit for bit in bf16; Triton against numba byte for
byte; whole merges (CLI, mergekit YAML) against the oracle; M3; the one-line refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import spec_reference as ref
from conftest import as_numpy, load_dir, make_trio, output_bytes, run_cli
from test_ram import ITEM, _as_bytes, _shift, _slot

from streammerge.kernels import cpu_multislerp, cpu_stock
from streammerge.methods.multislerp import scalars

DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}
CASES = [(["BF16"] * 3, "BF16"), (["F16"] * 4, "F16"), (["F32"] * 3, "F32"),
         (["BF16", "BF16", "F16"], "BF16"), (["BF16"] * 5, "F32")]  # fmt: skip


def _same(a: bytes, b: bytes, dtype: str) -> bool:
    """Equal bits, or both NaN (a NaN input makes NaN coefficients, so every element NaN)."""
    car = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[dtype]
    x = ref.to_float32(np.frombuffer(a, car), dtype)
    y = ref.to_float32(np.frombuffer(b, car), dtype)
    return bool(np.all((x.view(np.uint32) == y.view(np.uint32)) | (np.isnan(x) & np.isnan(y))))


def _work(dtypes):
    return dtypes[0] if len(set(dtypes)) == 1 else "F32"


def _merge(slot, dtypes, base_row, n, chunk, weights, normalize, eps, do, held=False,
           with_mh=False):  # fmt: skip
    """The four statistics stages in chunks of ``chunk`` elements (a multiple of the
    block), the host scalars after each, then the merged bytes (one chunk): (bytes, the
    scalars, the stages' totals). ``held``: one chunk on ``slot`` itself, the unit vectors
    held in its model rows (the dots pass stores them, the tangent and writing passes read
    them) and, ``with_mh``, the normalized mean in the output bytes."""
    mr = [r for r in range(len(dtypes)) if r != base_row]
    W = _work(dtypes)
    assert not held or chunk >= n
    out = np.zeros(n * ITEM[do], np.uint8)
    sums = []
    for stage in range(4):
        sc = scalars(sums, weights, normalize, eps, W)
        total = np.zeros(cpu_multislerp.stage_width(stage, len(mr)), np.float64)
        for lo in range(0, n, chunk):
            m = min(chunk, n - lo)
            h, mh, part = cpu_multislerp.NO_HELD, None, slot
            if held:
                h = {2: cpu_multislerp.STORE_UNITS, 3: cpu_multislerp.HELD_UNITS}.get(stage, h)
                mh = out if with_mh and stage >= 2 else None
            else:
                part = np.ascontiguousarray(np.stack([_shift(slot[r], lo, ITEM[d])
                                                      for r, d in enumerate(dtypes)]))  # fmt: skip
            blocks = cpu_multislerp.msl_stats(part, dtypes, base_row, mr, m, stage, sc, held=h,
                                              mh=mh)  # fmt: skip
            cpu_stock.add_blocks(total, blocks)
        sums.append(total)
    sc = scalars(sums, weights, normalize, eps, W)
    cpu_multislerp.msl_chunk(slot, dtypes, base_row, mr, n, sc, out, do,
                             held=cpu_multislerp.HELD_UNITS if held else cpu_multislerp.NO_HELD,
                             mh=out if held and with_mh else None)  # fmt: skip
    return out.tobytes(), sc, sums


def _finite(rows):
    """The rows with the NaN / infinity of ``test_ram._slot`` replaced by row 0's values."""
    rows = [r.copy() for r in rows]
    for r in rows[1:]:
        r[5], r[9] = rows[0][5], rows[0][9]
    return rows


def _fill(slot, rows):
    for k, r in enumerate(rows):
        b = np.ascontiguousarray(r).view(np.uint8)
        slot[k, : b.size] = b


@pytest.mark.parametrize("n", [1, 1000, 3001])
@pytest.mark.parametrize("dtypes, do", CASES)
@pytest.mark.parametrize("with_base", [True, False])
def test_kernels_equal_the_spec_oracle_whatever_the_chunking(n, dtypes, do, with_base):
    """Slot row 0 is the base, or (without one) model 0; the weights differ per model."""
    slot, rows = _slot(n, len(dtypes) - 1, dtypes, n)
    if n > 12 and (n % 2):
        rows = _finite(rows)
        _fill(slot, rows)
    base_row = 0 if with_base else -1
    mr = list(range(1, len(dtypes))) if with_base else list(range(len(dtypes)))
    b, bd = (rows[0], dtypes[0]) if with_base else (None, None)
    ms, mds = (rows[1:], dtypes[1:]) if with_base else (rows, dtypes)
    weights = [0.5 + 0.25 * j for j in range(len(mr))]
    for normalize, eps in ((True, 1e-8), (False, 1e-3)):
        res = _as_bytes(ref.spec_multislerp(ms, mds, weights, do, normalize, eps, b, bd))
        outs = [_merge(slot, dtypes, base_row, n, chunk, weights, normalize, eps, do)[0]
                for chunk in (1024, 3072)]  # fmt: skip
        assert outs[0] == outs[1]
        if n > 12 and (n % 2):
            assert outs[0] == res
        else:
            assert _same(outs[0], res, do)


@pytest.mark.parametrize("dtypes", [["BF16"] * 3, ["F16"] * 4, ["F32"] * 3])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("with_mh", [True, False])
def test_held_unit_vectors_give_the_same_sums_and_bytes(dtypes, with_base, with_mh):
    """A tensor in one chunk: the unit vectors stored over the model rows by the dots pass
    and read back by the later passes give the recomputed passes' sums and bytes (with
    the edge values of ``test_ram._slot``), and the model rows then hold u_j as W."""
    n = 3001
    slot, rows = _slot(n, len(dtypes) - 1, dtypes, n)
    _fill(slot, _finite(rows))  # finite: a NaN would make every element NaN
    base_row = 0 if with_base else -1
    mr = [r for r in range(len(dtypes)) if r != base_row]
    weights = [0.5 + 0.25 * j for j in range(len(mr))]
    want, _, sums_ref = _merge(slot.copy(), dtypes, base_row, n, n, weights, True, 1e-8,
                               dtypes[0])  # fmt: skip
    held_slot = slot.copy()
    got, _, sums = _merge(held_slot, dtypes, base_row, n, n, weights, True, 1e-8, dtypes[0],
                          held=True, with_mh=with_mh)  # fmt: skip
    assert [t.tobytes() for t in sums] == [t.tobytes() for t in sums_ref]
    assert got == want
    assert np.isfinite(ref.to_float32(np.frombuffer(got, {"F32": np.float32, "F16": np.float16,
                                                          "BF16": np.uint16}[dtypes[0]]),
                                      dtypes[0])).all()  # fmt: skip
    assert not np.array_equal(held_slot[mr[0]], slot[mr[0]])  # the rows were rewritten
    if with_base:
        assert np.array_equal(held_slot[0], slot[0])  # the base row is left as read


def test_held_unit_vectors_are_refused_where_they_do_not_fit():
    n = 64
    slot, _ = _slot(n, 2, ["BF16", "BF16", "F16"], n)  # W = F32: 4 bytes over 2-byte rows
    sc = np.zeros(cpu_multislerp.n_scalars(2), np.float32)
    with pytest.raises(ValueError, match="itemsize"):
        cpu_multislerp.msl_stats(slot, ["BF16", "BF16", "F16"], 0, [1, 2], n, 2, sc,
                                 held=cpu_multislerp.STORE_UNITS)  # fmt: skip
    with pytest.raises(ValueError, match="does not go with stage"):
        cpu_multislerp.msl_stats(slot, ["BF16"] * 3, 0, [1, 2], n, 1, sc,
                                 held=cpu_multislerp.STORE_UNITS)  # fmt: skip
    with pytest.raises(ValueError, match="goes with held unit vectors"):
        cpu_multislerp.msl_stats(slot, ["BF16"] * 3, 0, [1, 2], n, 2, sc,
                                 mh=np.zeros(2 * n, np.uint8))  # fmt: skip
    out = np.zeros(2 * n, np.uint8)
    fallback = sc.copy()
    fallback[3 * 2 + 4] = 1.0
    with pytest.raises(ValueError, match="fallback"):
        cpu_multislerp.msl_chunk(slot, ["BF16"] * 3, 0, [1, 2], n, fallback, out, "BF16",
                                 held=cpu_multislerp.HELD_UNITS)  # fmt: skip
    with pytest.raises(ValueError, match="must be out"):
        cpu_multislerp.msl_chunk(slot, ["BF16"] * 3, 0, [1, 2], n, sc, out, "BF16",
                                 held=cpu_multislerp.HELD_UNITS, mh=out.copy())  # fmt: skip


def _mergekit(xs, weights, base=None, normalize=True, eps=1e-8):
    """mergekit 0.1.5's multislerp body (merge_methods/multislerp.py), torch."""
    import torch

    tensors = torch.stack(xs, dim=0)
    if base is not None:
        tensors -= base
    flat = tensors.view(tensors.shape[0], -1)
    w = torch.tensor(weights, dtype=tensors.dtype)
    if normalize:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    unit = flat / (norms + eps)
    mean = (unit * w.view(-1, 1)).sum(0)
    mn = torch.norm(mean)
    if mn < eps:
        res = (tensors[0] * w[0] + tensors[1] * w[1]).view(tensors.shape[1:])
        return res if base is None else res + base
    mean = mean / mn
    dots = (unit * mean).sum(-1, keepdim=True)
    tr = ((unit - dots * mean) * w.view(-1, 1)).sum(0)
    tn = torch.norm(tr) + eps
    res = (mean * torch.cos(tn) + tr * (torch.sin(tn) / tn)) * (norms.squeeze(-1) * w).sum()
    res = res.view(tensors.shape[1:])
    return res if base is None else res + base


def test_the_oracle_is_mergekits_torch_body_bit_for_bit_in_bf16():
    """bf16 fine-tunes (2 and 3, with and without a base, normalized or not): SPEC's chain
    gives mergekit's bytes; the antipodal pair (mean norm 0) its linear fallback."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(3)
    b = torch.randn(20000, generator=g) * 0.02
    xs = [(b + torch.randn(20000, generator=g) * 0.002).bfloat16() for _ in range(3)]
    b = b.bfloat16()
    cases = [(xs, [0.5, 0.3, 0.2], None, True), (xs[:2], [0.6, 0.4], b, True),
             (xs, [1.0, 2.0, 0.5], b, False), (xs[:2], [2.0, 1.0], None, True),
             ([xs[0], -xs[0]], [1.0, 1.0], None, True)]  # fmt: skip
    for ms, w, base, normalize in cases:
        want = _mergekit(ms, w, base, normalize).view(torch.int16).numpy().tobytes()
        bb = None if base is None else base.view(torch.int16).numpy().view(np.uint16)
        got = ref.spec_multislerp([m.view(torch.int16).numpy().view(np.uint16) for m in ms],
                                  ["BF16"] * len(ms), w, "BF16", normalize, 1e-8, bb,
                                  None if base is None else "BF16")  # fmt: skip
        assert _as_bytes(got) == want, (w, base is None)


def test_the_fallback_is_the_weighted_sum_in_kernels_and_oracle():
    """Antipodal models with equal weights (two, and three with a zero model): the mean's
    norm is 0, the kernels write the weighted sum in W, as the oracle (and Triton)."""
    n = 2500
    x = (np.random.default_rng(5).standard_normal(n) * 0.02).astype(np.float32)
    for xs, w in (([x, -x], [1.0, 1.0]), ([x, -x, 0 * x], [1.0, 1.0, 3.0])):
        rows = [ref.from_float32(v, "BF16") for v in xs]
        slot = np.zeros((len(rows), n * 2), np.uint8)
        _fill(slot, rows)
        got, sc, _ = _merge(slot, ["BF16"] * len(rows), -1, n, 1024, w, True, 1e-8, "BF16")
        assert sc[-1] == 1.0
        want = ref.spec_multislerp(rows, ["BF16"] * len(rows), w, "BF16")
        assert got == _as_bytes(want)
        if os.environ.get("TRITON_INTERPRET") == "1":
            torch = pytest.importorskip("torch")
            from streammerge.kernels import triton_multislerp

            ts = [torch.from_numpy(r.copy()).view(torch.bfloat16) for r in rows]
            out = torch.zeros(n, dtype=torch.bfloat16)
            triton_multislerp.msl_triton(None, ts, n, sc, out)
            assert out.view(torch.uint8).numpy().tobytes() == got


def test_triton_kernels_equal_numba():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU run")
    torch = pytest.importorskip("torch")
    from streammerge.kernels import triton_multislerp

    tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for n, dtypes, do, base_row in [(2100, ["BF16"] * 4, "BF16", 0), (37, ["F16"] * 3, "F16", -1),
                                    (1030, ["F32", "BF16", "BF16"], "BF16", 0),
                                    (1500, ["BF16"] * 3, "F32", -1)]:  # fmt: skip
        slot, rows = _slot(n, len(dtypes) - 1, dtypes, 4)
        if n != 2100:
            rows = _finite(rows)
            _fill(slot, rows)
        ts = [torch.from_numpy(np.ascontiguousarray(x).copy()).view(tdt[d]) for x, d in zip(rows, dtypes)]
        mr = list(range(1, len(dtypes))) if base_row == 0 else list(range(len(dtypes)))
        base = ts[0] if base_row == 0 else None
        models = [ts[r] for r in mr]
        weights = [0.2 + j for j in range(len(mr))]
        W = _work(dtypes)
        sums = []
        for stage in range(4):
            sc = scalars(sums, weights, True, 1e-8, W)
            blocks = triton_multislerp.msl_stats_triton(base, models, n, stage, sc).numpy()
            want = cpu_multislerp.msl_stats(slot, dtypes, base_row, mr, n, stage, sc)
            assert np.array_equal(blocks, want, equal_nan=True), stage
            total = np.zeros(blocks.shape[1], np.float64)
            cpu_stock.add_blocks(total, want)
            sums.append(total)
        sc = scalars(sums, weights, True, 1e-8, W)
        out = torch.zeros(n, dtype=tdt[do])
        triton_multislerp.msl_triton(base, models, n, sc, out)
        cpu = np.zeros(n * ITEM[do], np.uint8)
        cpu_multislerp.msl_chunk(slot, dtypes, base_row, mr, n, sc, cpu, do)
        assert _same(out.view(torch.uint8).numpy().tobytes(), cpu.tobytes(), do)
        if n != 2100:
            assert out.view(torch.uint8).numpy().tobytes() == cpu.tobytes()


def _expected(models, rec: dict, base=None) -> dict[str, bytes]:
    tms = [load_dir(m) for m in models]
    tb = load_dir(base) if base is not None else None
    out = {}
    for name, x in (tb or tms[0]).items():
        if not x.is_floating_point():
            out[name] = as_numpy(x).view(np.uint8).tobytes()
            continue
        dt = DTYPES[str(x.dtype)] if rec.get("dtype") in (None, "") else rec["dtype"]
        if name not in tms[0]:  # only the base has it: copied
            out[name] = _as_bytes(ref.from_float32(ref.to_float32(as_numpy(x), DTYPES[str(x.dtype)]), dt))
            continue
        p = rec["tensors"][name]
        dts = [DTYPES[str(m[name].dtype)] for m in tms]
        rows = [as_numpy(m[name]) for m in tms]
        b, bd = (as_numpy(x), DTYPES[str(x.dtype)]) if tb is not None else (None, None)
        res = ref.spec_multislerp(rows, dts, p["w"], dt, p.get("normalize_weights", True),
                                  p.get("eps", 1e-8), b, bd, p.get("compute_dtype"))  # fmt: skip
        out[name] = _as_bytes(res)
    return out


def _bytes(out) -> dict[str, bytes]:
    return {k: _as_bytes(v) for k, v in output_bytes(out).items()}


def _three(tmp_path):
    _, a, b = make_trio(tmp_path, big=300_000)
    _, c, _ = make_trio(tmp_path / "more", seed=1, big=300_000)
    return a, b, c


def test_cli_is_exact_and_independent_of_the_chunking(tmp_path):
    a, b, c = _three(tmp_path)
    outs = []
    for k, more in enumerate(([], ["--memory", "8MB", "--threads", "1", "--shard-size", "300KB"])):
        out = tmp_path / f"out{k}"
        r = run_cli([str(a), str(b), str(c), "--method", "multislerp", "--weights", "0.5,0.3,0.2",
                     "-o", str(out), *more])  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs.append(_bytes(out))
    assert outs[0] == outs[1]
    rec = json.loads((tmp_path / "out0" / "streammerge.json").read_text())
    assert outs[0] == _expected([a, b, c], rec)


def test_mergekit_recipe_m3_and_triton_backend(tmp_path):
    _, a, b = make_trio(tmp_path)
    cfg = tmp_path / "msl.yml"
    cfg.write_text(f"merge_method: multislerp\nmodels:\n  - model: {a}\n    parameters:\n"
                   f"      weight: 0.7\n  - model: {b}\n    parameters:\n      weight: [0.1, 0.9]\n"
                   "parameters:\n  normalize_weights: false\n  eps: 1.0e-6\ndtype: float32\n")  # fmt: skip
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "o")])
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "o" / "streammerge.json").read_text())
    assert _bytes(tmp_path / "o") == _expected([a, b], rec)
    out = tmp_path / "m3"  # M3 draws the weights; the Triton backend where it can run
    tri = ["--backend", "triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []
    r = run_cli([str(a), str(b), "--method", "multislerp", "--alpha", "0.5", "--seed", "7", *tri,
                 "-o", str(out)])  # fmt: skip
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "streammerge.json").read_text())
    assert rec["alpha"] == 0.5 and all(v["w"] == rec["mixup"] for v in rec["tensors"].values())
    assert _bytes(out) == _expected([a, b], rec)


def test_bad_recipes_are_one_line(tmp_path):
    base, a, b = make_trio(tmp_path)
    for argv, message in ((["--eps", "-1"], "eps"), (["--weights", "1,2,3"], "weights")):
        r = run_cli([str(a), str(b), "--method", "multislerp", *argv, "-o", str(tmp_path / "o")])
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    cfg = tmp_path / "msl.yml"
    cfg.write_text(f"merge_method: multislerp\nmodels:\n  - model: {a}\n")
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "o")])
    assert r.returncode == 2 and "models" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    cfg.write_text(f"merge_method: multislerp\nbase_model: {base}\nslices:\n  - sources:\n"
                   f"      - model: {a}\n        layer_range: [0, 2]\n"
                   f"      - model: {b}\n        layer_range: [0, 2]\n")  # fmt: skip
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "o")])
    assert r.returncode == 2 and "in a slices: recipe is not supported" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_with_a_base_the_task_vectors_are_merged(tmp_path):
    """``base_model:`` (listed among the models too: skipped) and ``--base`` give the same
    bytes: SPEC's task-vector form, base added back; the base's own tensors copied."""
    base, a, b = make_trio(tmp_path)
    cfg = tmp_path / "msl.yml"
    cfg.write_text(f"merge_method: multislerp\nbase_model: {base}\nmodels:\n  - model: {base}\n"
                   f"  - model: {a}\n    parameters:\n      weight: 0.6\n  - model: {b}\n"
                   "    parameters:\n      weight: 0.4\ndtype: bfloat16\n")  # fmt: skip
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "o")])
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "o" / "streammerge.json").read_text())
    got = _bytes(tmp_path / "o")
    assert got == _expected([a, b], rec, base)
    r = run_cli([str(a), str(b), "--base", str(base), "--method", "multislerp", "--weights",
                 "0.6,0.4", "-o", str(tmp_path / "cli")])  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert _bytes(tmp_path / "cli") == got
