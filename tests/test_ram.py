"""ram and ramplus_tl (docs/SPEC.md "RAM (ram, ramplus_tl)"): the numba kernels against the
SPEC oracle over dtypes, model counts and odd sizes, against mergekit's torch expression,
Triton against numba byte for byte, whole merges (CLI, mergekit YAML) against the oracle
whatever the chunking, and the one-line refusals (M3 has nothing to draw)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import spec_reference as ref
from conftest import as_numpy, load_dir, make_trio, output_bytes, run_cli
from streammerge.kernels import cpu_ram

ITEM = {"F32": 4, "F16": 2, "BF16": 2}
DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}


def _slot(n: int, n_models: int, dtypes: list[str], seed: int):
    """A slot (uint8 [1 + N, bytes]) and the stored rows: a base and N fine-tunes that
    change a random subset of elements, with a NaN, an infinity, signed zeros and values
    equal to the base."""
    rng = np.random.default_rng(seed)
    xb = (rng.standard_normal(n) * 0.02).astype(np.float32)
    rows = [ref.from_float32(xb, dtypes[0])]
    for j in range(n_models):
        keep = rng.random(n) < 0.3 + 0.15 * j
        x = (xb + rng.standard_normal(n) * 0.005 * keep).astype(np.float32)
        if n > 12 and j == 0:
            x[5], x[7] = np.nan, -0.0
        if n > 12 and j == 1:
            x[9] = np.inf
        rows.append(ref.from_float32(x, dtypes[1 + j]))
    if n > 12:
        rows[0] = rows[0].copy()
        rows[0][7] = ref.from_float32(np.array([-0.0], np.float32), dtypes[0])[0]
    width = n * 4 + 64
    slot = np.zeros((1 + n_models, width), np.uint8)
    for r, x in enumerate(rows):
        b = np.ascontiguousarray(x).view(np.uint8)
        slot[r, : b.size] = b
    return slot, rows


def _numba(slot, dtypes, n, eps, do, lam=None):
    out = np.zeros(n * ITEM[do], np.uint8)
    cpu_ram.ram_chunk(slot, dtypes, 0, list(range(1, slot.shape[0])), n, eps, out, do, lam)
    return out


def _as_bytes(x) -> bytes:
    return np.ascontiguousarray(x).view(np.uint8).tobytes()


CASES = [(["BF16"] * 3, "BF16"), (["F16"] * 4, "F16"), (["F32"] * 2, "F32"),
         (["BF16", "BF16", "F16"], "BF16"), (["BF16"] * 5, "F32"), (["F32", "BF16", "BF16"], "F16")]  # fmt: skip


@pytest.mark.parametrize("n", [1, 13, 4097, 9001])
@pytest.mark.parametrize("dtypes, do", CASES)
@pytest.mark.parametrize("eps", [1e-5, 0.005, 0.0])
def test_ram_kernel_equals_the_spec_oracle(n, dtypes, do, eps):
    slot, rows = _slot(n, len(dtypes) - 1, dtypes, n)
    want = ref.spec_ram(rows[0], rows[1:], dtypes, eps, do)
    assert _numba(slot, dtypes, n, eps, do).tobytes() == _as_bytes(want)


@pytest.mark.parametrize("n", [13, 9001])
@pytest.mark.parametrize("dtypes, do", CASES)
@pytest.mark.parametrize("eps, r, alpha", [(1e-5, 0.1, 0.2), (0.005, 0.5, 0.3), (0.0, 0.37, 10.0)])
def test_ramplus_tl_kernels_equal_the_spec_oracle(n, dtypes, do, eps, r, alpha):
    slot, rows = _slot(n, len(dtypes) - 1, dtypes, n + 1)
    shared = np.zeros(len(dtypes) - 1, np.int64)
    unique = np.zeros_like(shared)
    for lo in range(0, n, 4000):  # in chunks: the counts add up
        m = min(4000, n - lo)
        part = np.ascontiguousarray(np.stack([_shift(slot[r], lo, ITEM[d]) for r, d in enumerate(dtypes)]))
        cpu_ram.ram_counts(part, dtypes, 0, list(range(1, len(dtypes))), m, eps, shared, unique)
    want_s, want_u = ref.spec_ram_counts(rows[0], rows[1:], dtypes, eps)
    assert shared.tolist() == want_s.tolist() and unique.tolist() == want_u.tolist()
    lam = cpu_ram.ram_lambdas(shared, unique, eps, r, alpha)
    want_lam = ref.spec_ram_lambdas(want_s, want_u, eps, r, alpha)
    assert lam.tobytes() == want_lam.tobytes()
    want = ref.spec_ram(rows[0], rows[1:], dtypes, eps, do, want_lam)
    assert _numba(slot, dtypes, n, eps, do, lam).tobytes() == _as_bytes(want)


def _shift(row: np.ndarray, lo: int, item: int) -> np.ndarray:
    out = np.zeros_like(row)
    out[: row.size - lo * item] = row[lo * item :]
    return out


def test_kernels_equal_mergekits_torch_expression():
    """SPEC's op sequence is torch's: mergekit's ram.py evaluated by torch."""
    torch = pytest.importorskip("torch")
    tdt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    for dt, tdt_dt in tdt.items():
        for n_models, eps in ((2, 1e-5), (3, 0.005), (4, 0.0)):
            dtypes = [dt] * (n_models + 1)
            slot, rows = _slot(5000, n_models, dtypes, n_models)
            ts = [torch.from_numpy(np.ascontiguousarray(x).copy()).view(tdt_dt) for x in rows]
            base, xs = ts[0], ts[1:]
            tv = torch.stack([x - base for x in xs]).view(n_models, -1)
            nz = tv.abs() > eps
            cnt = nz.sum(dim=0, keepdim=True)
            ovl, uniq = cnt > 1, cnt == 1
            tz = tv * nz
            sh, un = (nz & ovl).sum(dim=1), (nz & uniq).sum(dim=1)
            lam_t = 1 + 0.4 * (sh / un.clamp(min=eps)).clamp(min=0, max=0.3)
            plain = base + ((tz * uniq) + (tz * ovl / cnt.clamp(min=1))).sum(dim=0, keepdim=True).reshape_as(base)
            plus = base + ((tz * uniq * lam_t.unsqueeze(-1)) + (tz * ovl / cnt.clamp(min=1))).sum(0, keepdim=True).reshape_as(base)
            lam = cpu_ram.ram_lambdas(sh.numpy(), un.numpy(), eps, 0.4, 0.3)
            assert lam.tobytes() == lam_t.numpy().tobytes()
            for want, got in ((plain, _numba(slot, dtypes, 5000, eps, dt)),
                              (plus, _numba(slot, dtypes, 5000, eps, "F32", lam))):  # fmt: skip
                w = want.float().numpy()
                g = ref.to_float32(got.view({"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[str(
                    {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[want.dtype])]),
                    {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[want.dtype])  # fmt: skip
                same = (w.view(np.uint32) == g.view(np.uint32)) | (np.isnan(w) & np.isnan(g))
                assert same.all(), (dt, n_models, eps, np.flatnonzero(~same)[:5])


def test_triton_kernels_equal_numba():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU run")
    torch = pytest.importorskip("torch")
    from streammerge.kernels import triton_ram

    tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for n, dtypes, do, eps in [(2100, ["BF16"] * 4, "BF16", 0.005), (37, ["F16"] * 3, "F16", 1e-5),
                               (1030, ["F32", "BF16", "BF16"], "BF16", 0.0), (5, ["BF16"] * 3, "F32", 0.005)]:  # fmt: skip
        slot, rows = _slot(n, len(dtypes) - 1, dtypes, 3)
        ts = [torch.from_numpy(np.ascontiguousarray(x).copy()).view(tdt[d]) for x, d in zip(rows, dtypes)]
        out = torch.zeros(n, dtype=tdt[do])
        triton_ram.ram_triton(ts[0], ts[1:], n, eps, out)
        assert out.view(torch.uint8).numpy().tobytes() == _numba(slot, dtypes, n, eps, do).tobytes()
        sh = torch.zeros(len(ts) - 1, dtype=torch.int64)
        un = torch.zeros_like(sh)
        triton_ram.ram_counts_triton(ts[0], ts[1:], n, eps, sh, un)
        s2, u2 = np.zeros(len(ts) - 1, np.int64), np.zeros(len(ts) - 1, np.int64)
        cpu_ram.ram_counts(slot, dtypes, 0, list(range(1, len(dtypes))), n, eps, s2, u2)
        assert sh.tolist() == s2.tolist() and un.tolist() == u2.tolist()
        lam = cpu_ram.ram_lambdas(s2, u2, eps, 0.5, 0.3)
        out = torch.zeros(n, dtype=tdt[do])
        triton_ram.ram_triton(ts[0], ts[1:], n, eps, out, lam)
        assert out.view(torch.uint8).numpy().tobytes() == _numba(slot, dtypes, n, eps, do, lam).tobytes()


def _expected(base, models, rec: dict, method: str) -> dict[str, bytes]:
    """Every output tensor recomputed with the oracle from the inputs and the record."""
    tb, tms = load_dir(base), [load_dir(m) for m in models]
    out = {}
    for name, x in tb.items():
        dt = DTYPES.get(str(x.dtype)) if rec.get("dtype") in (None, "") else rec["dtype"]
        if not x.is_floating_point():
            out[name] = as_numpy(x).view(np.uint8).tobytes()
            continue
        if name not in tms[0]:  # only the base has it: copied, in the output dtype
            out[name] = _as_bytes(ref.from_float32(ref.to_float32(as_numpy(x), DTYPES[str(x.dtype)]), dt))
            continue
        p = rec["tensors"][name]
        dts = [DTYPES[str(x.dtype)]] + [DTYPES[str(m[name].dtype)] for m in tms]
        rows = [as_numpy(x)] + [as_numpy(m[name]) for m in tms]
        lam = None
        if method == "ramplus_tl":
            sh, un = ref.spec_ram_counts(rows[0], rows[1:], dts, p["epsilon"])
            lam = ref.spec_ram_lambdas(sh, un, p["epsilon"], p["r"], p["ram_alpha"])
        out[name] = _as_bytes(ref.spec_ram(rows[0], rows[1:], dts, p["epsilon"], dt, lam))
    return out


def _bytes(out) -> dict[str, bytes]:
    return {k: _as_bytes(v) for k, v in output_bytes(out).items()}


@pytest.mark.parametrize("method, extra", [
    ("ram", ["--epsilon", "0.002"]),
    ("ramplus_tl", ["--epsilon", "0.002", "--r", "0.5", "--ram-alpha", "0.3"]),
    ("ramplus_tl", ["--epsilon", "0.0025", "--dtype", "fp32"]),
])  # fmt: skip
def test_cli_is_exact_and_independent_of_the_chunking(tmp_path, method, extra):
    base, a, b = make_trio(tmp_path, big=300_000)
    outs = []
    for k, more in enumerate(([], ["--memory", "8MB", "--threads", "1", "--shard-size", "300KB"])):
        out = tmp_path / f"out{k}"
        r = run_cli([str(a), str(b), "--base", str(base), "--method", method, *extra,
                     "-o", str(out), *more])  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs.append(_bytes(out))
    assert outs[0] == outs[1]
    rec = json.loads((tmp_path / "out0" / "streammerge.json").read_text())
    assert outs[0] == _expected(base, [a, b], rec, method)


def test_mergekit_recipe_with_a_gradient(tmp_path):
    base, a, b = make_trio(tmp_path)
    cfg = tmp_path / "ram.yml"
    cfg.write_text(f"merge_method: ram\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n"
                   "parameters:\n  epsilon: [0.0005, 0.003]\ndtype: bfloat16\n")  # fmt: skip
    out = tmp_path / "out"
    r = run_cli(["--config", str(cfg), "-o", str(out)])
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "streammerge.json").read_text())
    assert len({v.get("epsilon") for v in rec["tensors"].values()} - {None}) > 1
    assert _bytes(out) == _expected(base, [a, b], rec, "ram")


@pytest.mark.parametrize("argv, message", [
    (["--alpha", "0.5"], "nothing for M3 to draw"),
    (["--lambda", "0.5"], "nothing for M3 to draw"),
    (["--weights", "1,1"], "--weights does not apply"),
    (["--epsilon", "nan"], "epsilon: must be a finite number"),
])  # fmt: skip
def test_bad_recipes_are_one_line(tmp_path, argv, message):
    base, a, b = make_trio(tmp_path)
    r = run_cli([str(a), str(b), "--base", str(base), "--method", "ram", *argv,
                 "-o", str(tmp_path / "o")])  # fmt: skip
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_triton_backend_merge_equals_numba(tmp_path, method):
    """The whole merge through the Triton backend (interpreter): the same bytes."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU run")
    base, a, b = make_trio(tmp_path)
    outs = []
    for backend in ("numba", "triton"):
        out = tmp_path / backend
        r = run_cli([str(a), str(b), "--base", str(base), "--method", method, "--epsilon", "0.002",
                     "--backend", backend, "-o", str(out)])  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs.append(_bytes(out))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("dtypes, work, do", [(["BF16"] * 3, "F32", "F32"), (["F32"] * 4, "BF16", "BF16")])
def test_a_working_dtype_rounds_the_inputs_first(dtypes, work, do):
    """mergekit's dtype: (the recipe's W): every input rounded to W, every op in W."""
    n = 5000
    slot, rows = _slot(n, len(dtypes) - 1, dtypes, 9)
    rows_m = list(range(1, len(dtypes)))
    sh, un = np.zeros(len(rows_m), np.int64), np.zeros(len(rows_m), np.int64)
    cpu_ram.ram_counts(slot, dtypes, 0, rows_m, n, 0.003, sh, un, work)
    ws, wu = ref.spec_ram_counts(rows[0], rows[1:], dtypes, 0.003, work)
    assert sh.tolist() == ws.tolist() and un.tolist() == wu.tolist()
    lam = cpu_ram.ram_lambdas(sh, un, 0.003, 0.5, 0.3)
    for lm in (None, lam):
        out = np.zeros(n * ITEM[do], np.uint8)
        cpu_ram.ram_chunk(slot, dtypes, 0, rows_m, n, 0.003, out, do, lm, work)
        assert out.tobytes() == _as_bytes(ref.spec_ram(rows[0], rows[1:], dtypes, 0.003, do, lm, work))


def test_mergekit_dtype_is_the_working_dtype(tmp_path):
    base, a, b = make_trio(tmp_path)
    cfg = tmp_path / "rp.yml"
    cfg.write_text(f"merge_method: ramplus_tl\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                   f"  - model: {b}\nparameters:\n  epsilon: 0.002\ndtype: float32\n")  # fmt: skip
    out = tmp_path / "out"
    r = run_cli(["--config", str(cfg), "-o", str(out)])
    assert r.returncode == 0, r.stderr
    tb, tms, got = load_dir(base), [load_dir(a), load_dir(b)], _bytes(out)
    for name, x in tb.items():
        if name in tms[0] and x.is_floating_point():
            rows = [as_numpy(x)] + [as_numpy(m[name]) for m in tms]
            sh, un = ref.spec_ram_counts(rows[0], rows[1:], ["BF16"] * 3, 0.002, "F32")
            lam = ref.spec_ram_lambdas(sh, un, 0.002, 0.1, 0.2)
            want = ref.spec_ram(rows[0], rows[1:], ["BF16"] * 3, 0.002, "F32", lam, "F32")
            assert got[name] == _as_bytes(want), name
