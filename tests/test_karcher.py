"""karcher (docs/SPEC.md "Karcher mean"): the Gram and merge kernels against the SPEC
oracle over dtypes, model counts, odd sizes and chunkings; the host rounds against the
oracle on the edge cases and against mergekit's loop run in float64 on the tensors
themselves; Triton against numba byte for byte; whole merges (CLI, mergekit YAML, M3)
against the oracle; the one-line refusals."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import spec_reference as ref
from conftest import as_numpy, load_dir, make_trio, output_bytes, run_cli
from streammerge.kernels import cpu_karcher

from streammerge.methods.karcher import coefficients

ITEM = {"F32": 4, "F16": 2, "BF16": 2}
DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}
CASES = [(["BF16"] * 3, "BF16"), (["F16"] * 4, "F16"), (["F32"] * 2, "F32"),
         (["BF16", "BF16", "F16"], "BF16"), (["BF16"] * 5, "F32")]  # fmt: skip


def _rows(n: int, dtypes: list[str], seed: int, special: bool = False) -> list[np.ndarray]:
    """Stored rows of N correlated models; ``special`` adds signed zeros, a zero model
    stretch and (model 1) a NaN."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(n).astype(np.float32)
    out = []
    for j, d in enumerate(dtypes):
        x = (common * (1 + 0.3 * j) + rng.standard_normal(n) * (0.4 + 0.2 * j)).astype(np.float32)
        if n > 12:
            x[3], x[4] = -0.0, 0.0
            if special and j == 1:
                x[7] = np.nan
        out.append(ref.from_float32(x, d))
    return out


def _slot(rows: list[np.ndarray], lo: int = 0, m: int | None = None) -> np.ndarray:
    b = [np.ascontiguousarray(r.reshape(-1)[lo : None if m is None else lo + m]).view(np.uint8)
         for r in rows]  # fmt: skip
    slot = np.zeros((len(b), max(x.size for x in b)), np.uint8)
    for r, x in enumerate(b):
        slot[r, : x.size] = x
    return slot


def _as_bytes(x) -> bytes:
    return np.ascontiguousarray(x).view(np.uint8).tobytes()


def _same(a: bytes, b: bytes, dtype: str) -> bool:
    """Equal bits, or both NaN."""
    car = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[dtype]
    x = ref.to_float32(np.frombuffer(a, car), dtype)
    y = ref.to_float32(np.frombuffer(b, car), dtype)
    return bool(np.all((x.view(np.uint32) == y.view(np.uint32)) | (np.isnan(x) & np.isnan(y))))


def _gram(rows, dtypes, n, chunk):
    """The Gram sums in chunks of ``chunk`` elements (a multiple of the block)."""
    total = np.zeros(cpu_karcher.n_stats(len(rows)), np.float64)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        cpu_karcher.add_blocks(total, cpu_karcher.karcher_gram(_slot(rows, lo, m), dtypes,
                                                               list(range(len(rows))), m))
    return total


@pytest.mark.parametrize("n", [1, 1000, 1024, 5000])
@pytest.mark.parametrize("dtypes, do", CASES)
def test_kernels_equal_the_spec_oracle_whatever_the_chunking(n, dtypes, do):
    for special in (False, True):
        rows = _rows(n, dtypes, n + len(dtypes), special)
        want = ref.spec_karcher_gram(rows, dtypes)
        for chunk in (1024, 2048, 8192):
            assert np.array_equal(_gram(rows, dtypes, n, chunk), want, equal_nan=True), chunk
        w = [1.0 + 0.5 * j for j in range(len(rows))]
        k = coefficients(want, w, 10, 1e-5)
        assert _as_bytes(k) == _as_bytes(ref.spec_karcher_k(want, w, 10, 1e-5))
        out = np.zeros(n * ITEM[do], np.uint8)
        cpu_karcher.karcher_chunk(_slot(rows), dtypes, list(range(len(rows))), n, k, out, do)
        expect = _as_bytes(ref.spec_karcher(rows, dtypes, do, w))
        assert out.tobytes() == expect if not special or n <= 12 else _same(out.tobytes(), expect, do)


def _g(vectors) -> np.ndarray:
    x = [np.asarray(v, np.float32) for v in vectors]
    return ref.spec_karcher_gram(x, ["F32"] * len(x))


EDGES = {
    "zero model": [[1, 2, 3, 4], [0, 0, 0, 0], [2, 1, 0, 1]],
    "all zero": [[0, 0, 0], [0, 0, 0]],
    "below tol": [[1e-7, 0, 0], [3e-7, 0, 0]],
    "antiparallel": [[1, -2, 3], [-1, 2, -3]],
    "parallel": [[1, 2, 3], [2, 4, 6]],
    "one valid": [[1, 2, 3], [0, 0, 0], [1e-9, 0, 0]],
    "orthogonal": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
    "NaN": [[1, np.nan, 0], [1, 1, 1]],
    "infinity": [[1, np.inf, 0], [1, 1, 1]],
}


@pytest.mark.parametrize("case", sorted(EDGES))
def test_rounds_equal_the_oracle_on_the_edges(case):
    g = _g(EDGES[case])
    n = len(EDGES[case])
    for w, it, tol in (([1.0] * n, 10, 1e-5), ([0.0] + [2.0] * (n - 1), 3, 1e-5), ([1.0] * n, 0, 0.5)):
        assert _as_bytes(coefficients(g, w, it, tol)) == _as_bytes(ref.spec_karcher_k(g, w, it, tol))
    k = coefficients(g, [1.0] * n, 10, 1e-5)
    if case in ("all zero", "below tol"):
        assert not np.any(k)
    if case == "antiparallel":  # T = f (u_1 + u_0) is exactly 0: s u_0 = x_0
        assert k.tolist() == [1.0, 0.0]
    if case in ("NaN", "infinity"):
        assert np.isnan(k).any() or np.isnan(ref.spec_karcher(
            [np.asarray(v, np.float32) for v in EDGES[case]], ["F32"] * n, "F32")).all()


def _mergekit_f64(tensors, alphas, max_iter=10, tol=1e-5):
    """mergekit 0.1.5's ``karcher_merge_tensors`` run in float64 (its loop, verbatim but
    for the dtype)."""
    torch = pytest.importorskip("torch")
    norms, units = [], []
    for t in tensors:
        n = torch.linalg.norm(t).item()
        norms.append(n)
        units.append(torch.zeros_like(t) if n == 0.0 else t / n)
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    va = [alphas[i] for i in valid]
    na = [a / sum(va) for a in va]
    vu = [units[i] for i in valid]
    u = torch.zeros_like(vu[0])
    for a, ui in zip(na, vu):
        u += a * ui
    nu = torch.linalg.norm(u).item()
    u = vu[0].clone() if nu < tol else u / nu
    for _ in range(max_iter):
        big_t = torch.zeros_like(u)
        for a, ui in zip(na, vu):
            d = torch.clamp(torch.dot(u, ui), -1.0, 1.0)
            th = torch.arccos(d)
            if th.item() < tol:
                continue
            big_t += a * (th / torch.sin(th)) * (ui - d * u)
        nt = torch.linalg.norm(big_t)
        if nt.item() < tol:
            break
        u = torch.cos(nt) * u + torch.sin(nt) * (big_t / nt)
        un = torch.linalg.norm(u)
        if un.item() > tol:
            u = u / un
    return sum(a * n for a, n in zip(alphas, norms)) * u


@pytest.mark.parametrize("n_models, spread", [(2, 0.5), (3, 1.5), (5, 3.0)])
def test_gram_rounds_are_mergekits_loop(n_models, spread):
    """The rounds on the Gram matrix are mergekit's loop on the tensors: in float64 both
    agree to float32 rounding of the coefficients (SPEC "Why no rounds over the tensor")."""
    torch = pytest.importorskip("torch")
    rows = [r.astype(np.float32) for r in _rows(3000, ["F32"] * n_models, 7 * n_models)]
    rows = [r * np.float32(spread ** j) for j, r in enumerate(rows)]
    w = [1.0 + j for j in range(n_models)]
    k = coefficients(ref.spec_karcher_gram(rows, ["F32"] * n_models), w, 10, 1e-5)
    ours = sum(float(kj) * r.astype(np.float64) for kj, r in zip(k, rows))
    want = _mergekit_f64([torch.from_numpy(r).double() for r in rows],
                         [x / sum(w) for x in w]).numpy()  # fmt: skip
    assert np.max(np.abs(ours - want)) <= 1e-6 * np.max(np.abs(want))


def test_triton_kernels_equal_numba():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU run")
    torch = pytest.importorskip("torch")
    from streammerge.kernels import triton_karcher

    tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for n, dtypes, do in [(2100, ["BF16"] * 4, "BF16"), (37, ["F16"] * 3, "F16"),
                          (1030, ["F32", "BF16", "BF16"], "BF16"), (1024, ["F32"] * 2, "F32")]:  # fmt: skip
        rows = _rows(n, dtypes, 4, special=n == 37)
        ts = [torch.from_numpy(np.ascontiguousarray(x).copy()).view(tdt[d]) for x, d in zip(rows, dtypes)]
        blocks = triton_karcher.karcher_gram_triton(ts, n).numpy()
        mr = list(range(len(rows)))
        want = cpu_karcher.karcher_gram(_slot(rows), dtypes, mr, n)
        assert np.array_equal(blocks, want, equal_nan=True)
        total = np.zeros(blocks.shape[1], np.float64)
        cpu_karcher.add_blocks(total, want)
        k = coefficients(total, [1.0] * len(rows), 10, 1e-5)
        out = torch.zeros(n, dtype=tdt[do])
        triton_karcher.karcher_triton(ts, n, torch.from_numpy(k), out)
        cpu = np.zeros(n * ITEM[do], np.uint8)
        cpu_karcher.karcher_chunk(_slot(rows), dtypes, mr, n, k, cpu, do)
        assert _same(out.view(torch.uint8).numpy().tobytes(), cpu.tobytes(), do)


def _expected(models, rec: dict) -> dict[str, bytes]:
    tms = [load_dir(m) for m in models]
    w = [float(x) for x in rec["weights"]] if rec.get("weights") else [1.0] * len(models)
    p = rec.get("resolved", {})
    it, tol = int(p.get("max_iter", 10)), float(p.get("tol", 1e-5))
    out = {}
    for name, x in tms[0].items():
        dt = DTYPES.get(str(x.dtype)) if rec.get("dtype") in (None, "") else rec["dtype"]
        if not x.is_floating_point():
            out[name] = as_numpy(x).view(np.uint8).tobytes()
        else:
            dts = [DTYPES[str(m[name].dtype)] for m in tms]
            rows = [as_numpy(m[name]) for m in tms]
            out[name] = _as_bytes(ref.spec_karcher(rows, dts, dt, w, it, tol))
    return out


def _bytes(out) -> dict[str, bytes]:
    return {k: _as_bytes(v) for k, v in output_bytes(out).items()}


def test_cli_m3_is_exact_and_independent_of_the_chunking(tmp_path):
    _, a, b = make_trio(tmp_path, big=300_000)
    outs = []
    for k, more in enumerate(([], ["--memory", "8MB", "--threads", "1", "--shard-size", "300KB"])):
        out = tmp_path / f"out{k}"
        r = run_cli([str(a), str(b), "--method", "karcher", "--seed", "11", "-o", str(out), *more])
        assert r.returncode == 0, r.stderr
        outs.append(_bytes(out))
    assert outs[0] == outs[1]
    rec = json.loads((tmp_path / "out0" / "streammerge.json").read_text())
    lam = np.random.default_rng(11).beta(1.0, 1.0)  # M3's draw (SPEC): w = (lam, 1 - lam)
    assert [float(x) for x in rec["weights"]] == [lam, 1 - lam]
    assert outs[0] == _expected([a, b], rec)


def test_mergekit_recipe_and_triton_backend(tmp_path):
    _, a, b = make_trio(tmp_path)
    cfg = tmp_path / "k.yml"
    cfg.write_text(f"merge_method: karcher\nmodels:\n  - model: {a}\n  - model: {b}\n"
                   "parameters:\n  max_iter: 4\n  tol: 1.0e-4\ndtype: bfloat16\n")  # fmt: skip
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "o")])
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "o" / "streammerge.json").read_text())
    assert _bytes(tmp_path / "o") == _expected([a, b], rec)
    assert rec["resolved"]["max_iter"] == 4 and rec["resolved"]["tol"] == 1e-4
    if os.environ.get("TRITON_INTERPRET") == "1":
        r = run_cli(["--config", str(cfg), "--backend", "triton", "-o", str(tmp_path / "tri")])
        assert r.returncode == 0, r.stderr
        assert _bytes(tmp_path / "tri") == _bytes(tmp_path / "o")


def test_bad_recipes_are_one_line(tmp_path):
    base, a, b = make_trio(tmp_path)
    for argv, message in ((["--max-iter", "2.5"], "must be a whole number"),
                          (["--max-iter", "-1"], "max_iter -1.0 must satisfy"),
                          (["--tol", "0"], "0 < tol"),
                          (["--weights", "1,-1"], "0 <= weight"),
                          (["--weights", "0,0"], "positive sum"),
                          (["--base", str(base)], "base")):  # fmt: skip
        r = run_cli([str(a), str(b), "--method", "karcher", *argv, "-o", str(tmp_path / "o")])
        assert r.returncode == 2 and message in r.stderr, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    cfg = tmp_path / "k.yml"
    cfg.write_text(f"merge_method: karcher\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                   f"  - model: {b}\n")  # fmt: skip
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "o")])
    assert r.returncode == 2 and "base_model" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
    assert math.isfinite(float(coefficients(_g([[1, 0], [0, 1]]), [1, 1], 10, 1e-5)[0]))


def test_plan_says_one_statistics_pass_and_rounds_on_the_host(tmp_path):
    _, a, b = make_trio(tmp_path, big=300_000)
    r = run_cli([str(a), str(b), "--method", "karcher", "--weights", "1,1", "--memory", "8MB",
                 "--plan", "-o", str(tmp_path / "o")])  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "karcher: 1 statistics pass" in r.stdout and "rounds on the host" in r.stdout
    assert "karcher_gram, then karcher (2 reads)" in r.stdout, r.stdout
