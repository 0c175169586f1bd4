"""karcher (docs/SPEC.md "Karcher mean"): mergekit's op chain, one statistics pass per
reduction: the numba kernels against the SPEC oracle over dtypes, working dtypes, model
counts, odd sizes, chunkings, parameters and edges; the oracle against mergekit's own loop
(copied, run by torch in bf16); Triton against numba byte for byte; whole merges (CLI,
mergekit YAML, M3) against the oracle; the one-line refusals; --plan's reads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import spec_reference as ref
from conftest import as_numpy, load_dir, make_trio, output_bytes, run_cli
from streammerge.kernels import cpu_karcher
from streammerge.kernels.common import HELD_UNITS, NO_HELD, STORE_UNITS, held_units_fit

from streammerge.methods.karcher import PASSES, program

ITEM = {"F32": 4, "F16": 2, "BF16": 2}
DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}
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


def _merge(rows, dtypes, n, do, w=None, it=10, tol=1e-5, work=None, chunk=1 << 20,
           backend=None, held=False, sums=False, tangent=None) -> bytes:  # fmt: skip
    """Every pass over the rows in chunks of ``chunk`` elements (whole blocks), as the
    pipeline runs them; ``backend(op, slot, m, prog, stage, out)`` replaces numba.
    ``held``: one chunk, the iterate held in the output bytes between passes (each round's
    dots pass stores it, the later passes continue from it: ``methods.karcher._held``), and
    the unit vectors over the model rows of one slot where they fit (the mean's pass stores
    them, the later passes read them: ``methods.karcher._units``). ``sums``: the statistics
    passes through ``karcher_sums`` (the method's way: a dots pass's block sums taken by the
    kernel, a norm's products in pieces), not ``accumulate(karcher_pass(...))``.
    ``tangent`` (with ``sums``; a tensor in one chunk): each round's tangent pass stores T
    in a spare slot row (first a copy of model 0) and the step pass reads it
    (``karcher_sums``' ``tangent``); ``"spoiled"``: the row is overwritten in between."""
    nm = len(rows)
    w = [1.0] * nm if w is None else w
    work = work or (dtypes[0] if len(set(dtypes)) == 1 else "F32")
    out = np.zeros(n * ITEM[do], np.uint8)
    assert not held or (chunk >= n and ITEM[work] == ITEM[do])
    rounds = -1
    sums = {}
    fit = held and held_units_fit(work, dtypes, range(nm))
    one = _slot(rows) if fit else None
    odt = dtypes
    if tangent is not None:
        one, odt = _slot(rows + [rows[0]]), dtypes + [dtypes[0]]

    def units(stage):
        if not fit or stage < 1:
            return NO_HELD
        return STORE_UNITS if stage == 1 else HELD_UNITS

    for op in PASSES:
        acc = cpu_karcher.zero_accumulators(nm)
        for lo in range(0, n, chunk):
            m = min(chunk, n - lo)
            pr, stage = program(sums, op, w, it, tol, work)
            o = out[lo * ITEM[do] : (lo + m) * ITEM[do]]
            if stage is None:
                continue
            if stage == -1:
                o[...] = 0
            elif backend is not None:
                vals = backend(_slot(rows, lo, m), dtypes, m, pr, stage, o, do)
                if vals is not None:
                    cpu_karcher.accumulate(acc, vals, stage)
            elif stage == 5:
                h = (o, rounds, False) if held and rounds >= 0 else None
                cpu_karcher.karcher_pass(_slot(rows, lo, m) if one is None else one,
                                         dtypes if one is None else odt, list(range(nm)), m,
                                         pr, 5, o, do, h, units(5))  # fmt: skip
            else:
                h = None
                if held and stage >= 2 and (stage in (2, 4) or rounds >= 0):
                    h = (o, rounds, stage in (2, 4))
                slot, sdt = (_slot(rows, lo, m), dtypes) if one is None else (one, odt)
                if sums:
                    cpu_karcher.karcher_sums(slot, sdt, list(range(nm)), m, pr, stage, acc, h,
                                             units(stage),
                                             _tangent(slot, stage, tangent))  # fmt: skip
                else:
                    cpu_karcher.accumulate(acc, cpu_karcher.karcher_pass(
                        slot, sdt, list(range(nm)), m, pr, stage, held=h,
                        units=units(stage)), stage)  # fmt: skip
                if h is not None and stage in (2, 4):  # the held iterate's state
                    rounds = 2 * pr.full + (stage == 4)
        sums[op] = acc
    return out.tobytes()


def _tangent(slot, stage: int, tangent: str | None):
    """``karcher_sums``' ``tangent`` in ``_merge``: the slot's last row."""
    if tangent is None or stage not in (3, 4):
        return None
    if stage == 4 and tangent == "spoiled":
        slot[-1] = 0x40  # every element 3.0 (bf16) or 2.125 (f16)
    return slot[-1], cpu_karcher.T_STORE if stage == 3 else cpu_karcher.T_HELD


CASES = [(["BF16"] * 3, "BF16", None), (["BF16"] * 3, "BF16", "F32"), (["F16"] * 4, "F16", None),
         (["F32"] * 2, "F32", None), (["BF16", "BF16", "F16"], "BF16", "BF16"),
         (["BF16"] * 5, "F32", None)]  # fmt: skip


@pytest.mark.parametrize("n", [1, 2100])
@pytest.mark.parametrize("dtypes, do, work", CASES)
def test_kernels_equal_the_spec_oracle_whatever_the_chunking(n, dtypes, do, work):
    for special in (False, True) if n > 12 else (False,):
        rows = _rows(n, dtypes, n + len(dtypes), special)
        w = [1.0 + 0.5 * j for j in range(len(rows))]
        want = _as_bytes(ref.spec_karcher_chain(rows, dtypes, do, w, work=work))
        held = ITEM[work or dtypes[0]] == ITEM[do]  # the iterate fits the output bytes
        for chunk, h in ((1024, False), (1 << 20, False), (1 << 20, held)):
            got = _merge(rows, dtypes, n, do, w, work=work, chunk=chunk, held=h)
            assert got == want if not special else _same(got, want, do), (chunk, h)


def test_karcher_sums_equal_the_oracle_over_several_pieces():
    """The method's passes (``karcher_sums``: the dots' block sums taken in the kernel, in
    parallel; the norms' products a piece at a time) give the oracle's
    bytes on a tensor of several pieces and a partial last block, chunked or held."""
    n = cpu_karcher.PIECE + 5000
    dtypes = ["BF16"] * 3
    rows = _rows(n, dtypes, 17, False)
    want = _as_bytes(ref.spec_karcher_chain(rows, dtypes, "BF16", [1.0, 2.0, 0.5]))
    for chunk, held in ((1 << 17, False), (1 << 20, True)):
        got = _merge(rows, dtypes, n, "BF16", [1.0, 2.0, 0.5], chunk=chunk, held=held, sums=True)
        assert got == want, (chunk, held)


@pytest.mark.parametrize("dtypes, do, work", [c for c in CASES if ITEM[c[2] or c[0][0]] == 2])
def test_the_step_pass_reads_the_tangent_its_tangent_pass_held(dtypes, do, work):
    """Each round's T stored by its tangent pass in a spare slot row and read by the step
    pass (``karcher_sums``' ``tangent``, the method's way for a tensor in one chunk) gives
    the oracle's bytes; the step pass does read it (overwriting the row in between changes
    the output); a mode in the wrong pass is refused."""
    n = 3000
    rows = _rows(n, dtypes, 5, False)
    w = [1.0 + 0.5 * j for j in range(len(rows))]
    want = _as_bytes(ref.spec_karcher_chain(rows, dtypes, do, w, work=work))
    held = ITEM[work or dtypes[0]] == ITEM[do]
    kw = dict(work=work, held=held, sums=True)
    assert _merge(rows, dtypes, n, do, w, tangent="held", **kw) == want
    assert _merge(rows, dtypes, n, do, w, tangent="spoiled", **kw) != want
    slot = _slot(rows + [rows[0]])
    pr, _ = program({}, PASSES[0], w, 10, 1e-5, work or dtypes[0])
    with pytest.raises(ValueError, match="tangent mode"):
        cpu_karcher.karcher_sums(slot, dtypes + dtypes[:1], list(range(len(rows))), n, pr, 0,
                                 cpu_karcher.zero_accumulators(len(rows)),
                                 tangent=(slot[-1], cpu_karcher.T_HELD))  # fmt: skip


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
def test_passes_equal_the_oracle_on_the_edges(case):
    n = len(EDGES[case])
    for dt in ("F32", "BF16"):
        rows = [ref.from_float32(np.asarray(v, np.float32), dt) for v in EDGES[case]]
        m = len(EDGES[case][0])
        for w, it, tol in (([1.0] * n, 10, 1e-5), ([0.0] + [2.0] * (n - 1), 3, 1e-5),
                           ([1.0] * n, 0, 0.5), ([1.0] * n, 10, 0.3)):  # fmt: skip
            want = _as_bytes(ref.spec_karcher_chain(rows, [dt] * n, dt, w, it, tol))
            for held in (False, True):
                got = _merge(rows, [dt] * n, m, dt, w, it, tol, held=held)
                assert _same(got, want, dt), (dt, w, it, tol, held)
    if case in ("all zero", "below tol"):
        assert not any(_merge(rows, [dt] * n, m, dt))


def _mergekit(tensors, alphas, max_iter=10, tol=1e-5):
    """mergekit 0.1.5's ``karcher_merge_tensors`` as installed (verbatim but for names)."""
    torch = pytest.importorskip("torch")
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for t in tensors:
        norm = torch.linalg.vector_norm(t.to(dtype))
        norms.append(norm)
        units.append(torch.zeros_like(t) if norm.item() == 0.0 else (t / norm).to(t.dtype))
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(t * 0 for t in tensors)
    va = [alphas[i] for i in valid]
    na = [a / sum(va) for a in va]
    vu = [units[i] for i in valid]
    u = torch.zeros_like(vu[0])
    for a, ui in zip(na, vu):
        u += a * ui
    nu = torch.linalg.vector_norm(u.to(dtype))
    u = vu[0].clone() if nu.item() < tol else (u / nu).to(u.dtype)
    for _ in range(max_iter):
        big_t = torch.zeros_like(u)
        for a, ui in zip(na, vu):
            d = torch.clamp(torch.dot(u.flatten(), ui.flatten()), -1.0, 1.0)
            th = torch.arccos(d)
            if th.item() < tol:
                continue
            big_t += a * (th / torch.sin(th)) * (ui - d * u)
        nt = torch.linalg.vector_norm(big_t.to(dtype))
        if nt.item() < tol:
            break
        u = (torch.cos(nt) * u + torch.sin(nt) * (big_t / nt)).to(u.dtype)
        un = torch.linalg.vector_norm(u.to(dtype))
        if un.item() > tol:
            u = (u / un).to(u.dtype)
    return sum(a * n for a, n in zip(alphas, norms)) * u


@pytest.mark.parametrize("n", [7, 1000, 4099, 70001])
def test_norms_are_torchs_float32_norm(n):
    torch = pytest.importorskip("torch")
    x = (np.random.default_rng(n).standard_normal(n) * 0.02).astype(np.float32)
    acc = cpu_karcher.zero_accumulators(1)
    for lo in range(0, n, 2048):
        cpu_karcher.accumulate(acc, (x[None, lo : lo + 2048] ** 2).astype(np.float32), 0)
    assert cpu_karcher.norm_of(acc, 0) == torch.linalg.norm(torch.from_numpy(x)).item()


@pytest.mark.parametrize("n_models, n", [(2, 700), (3, 5000), (3, 65536)])
def test_the_oracle_is_mergekits_chain_in_bf16(n_models, n):
    """The SPEC's chain is mergekit's op for op: on bf16 models in bf16, bit for bit (the
    norms are torch's 8-lane float32 sums; the dots, rounded to bf16, equal torch's)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(n)
    common = rng.standard_normal(n).astype(np.float32) * 0.02
    xs = [common + rng.standard_normal(n).astype(np.float32) * 0.02 * (0.3 + j)
          for j in range(n_models)]  # fmt: skip
    ts = [torch.from_numpy(x).to(torch.bfloat16) for x in xs]
    rows = [t.view(torch.int16).numpy().view(np.uint16) for t in ts]
    want = _mergekit(ts, [1.0 / n_models] * n_models).view(torch.int16).numpy()
    got = ref.spec_karcher_chain(rows, ["BF16"] * n_models, "BF16")
    assert _as_bytes(got) == _as_bytes(want)


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
            out[name] = _as_bytes(ref.spec_karcher_chain(rows, dts, dt, w, it, tol,
                                                         work=rec.get("dtype") or None))
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
                          (["--max-iter", "11"], "max_iter 11.0 must satisfy"),
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
    import streammerge

    with pytest.raises(ValueError, match="with a base is not supported"):  # the API too
        streammerge.merge([a, b], base, tmp_path / "o", method="karcher")
    assert not (tmp_path / "o").exists()


def test_plan_says_how_many_reads(tmp_path):
    _, a, b = make_trio(tmp_path, big=1_500_000)  # larger than a chunk of the 8MB slots
    r = run_cli([str(a), str(b), "--method", "karcher", "--weights", "1,1", "--memory", "8MB",
                 "--plan", "-o", str(tmp_path / "o")])  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "33 reads of each tensor larger than a chunk" in r.stdout, r.stdout
    assert "karcher_norms, then karcher_mean, then karcher_dots1" in r.stdout, r.stdout
    assert "then karcher_step10, then karcher (33 reads)" in r.stdout, r.stdout


def test_idle_rounds_are_not_read(tmp_path):
    """A tensor larger than a chunk is not re-read for the rounds after they stop
    (``RowPass.live``): fewer bytes than the plan's upper bound, the same output bytes as
    a run that holds every tensor in one chunk."""
    import streammerge
    from streammerge.api import Options

    _, a, b = make_trio(tmp_path, big=1_500_000)
    runs = {}
    for memory in ("8MB", "256MB"):
        out = tmp_path / memory
        s = streammerge.merge([a, b], None, out, options=Options(memory=memory),
                              method="karcher", weights=[1.0, 1.0], tol=1e-2)  # fmt: skip
        runs[memory] = (s.bytes_read, _bytes(out))
    r = run_cli([str(a), str(b), "--method", "karcher", "--weights", "1,1", "--tol", "1e-2",
                 "--memory", "8MB", "--plan", "-o", str(tmp_path / "p")])  # fmt: skip
    most = int(r.stdout.split("bytes to read: ")[1].split()[0])
    assert runs["8MB"][0] < most  # idle rounds of the big tensor were not read
    assert runs["8MB"][0] > runs["256MB"][0]  # but it was re-read for the live ones
    assert runs["8MB"][1] == runs["256MB"][1]


def test_a_tensor_larger_than_a_chunk_keeps_its_iterate_in_a_temporary_file(tmp_path,
                                                                            monkeypatch):
    """A tensor spanning chunks keeps its iterate between passes in a temporary file
    (``methods.karcher._spilled``): the oracle's bytes, and the file is made nameless in
    the output's staging directory (not TMPDIR, which may be RAM), written, read back and
    closed once the tensor is written."""
    import streammerge
    from streammerge.api import Options
    from streammerge.methods import karcher

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd (Linux) to see where the file is")
    files, where, make = [], [], karcher._scratch_file

    def counting(scratch):
        files.append(make(scratch))
        where.append(os.readlink(f"/proc/self/fd/{files[-1].fileno()}"))
        return files[-1]

    monkeypatch.setattr(karcher, "_scratch_file", counting)
    _, a, b = make_trio(tmp_path, big=1_500_000)
    out = tmp_path / "o"
    streammerge.merge([a, b], None, out, options=Options(memory="8MB"), method="karcher",
                      weights=[1.0, 2.0], max_iter=3)  # fmt: skip
    rec = json.loads((out / "streammerge.json").read_text())
    assert _bytes(out) == _expected([a, b], rec)
    assert files and all(f.closed for f in files)
    staging = str(tmp_path / ".o.streammerge-partial")
    assert all(w.startswith(staging + "/") and w.endswith("(deleted)") for w in where), where


def test_a_tensor_in_one_chunk_steps_from_its_held_tangent(tmp_path, monkeypatch):
    """In a merge, every step pass of a tensor in one chunk reads the T that its tangent
    pass stored in the slot's free base row (``methods.karcher._held_tangent``), and the
    bytes are the oracle's."""
    import streammerge

    modes, sums = [], cpu_karcher.karcher_sums

    def spy(*args, **kw):
        t = args[9] if len(args) > 9 else kw.get("tangent")
        modes.append((args[5], None if t is None else t[1]))
        return sums(*args, **kw)

    monkeypatch.setattr(cpu_karcher, "karcher_sums", spy)
    _, a, b = make_trio(tmp_path)
    out = tmp_path / "o"
    streammerge.merge([a, b], None, out, method="karcher", weights=[1.0, 2.0], max_iter=3)
    rec = json.loads((out / "streammerge.json").read_text())
    assert _bytes(out) == _expected([a, b], rec)
    steps = [m for stage, m in modes if stage == 4]
    assert steps and all(m == cpu_karcher.T_HELD for m in steps)
    assert all(m == cpu_karcher.T_STORE for stage, m in modes if stage == 3)


def test_the_temporary_iterate_falls_back_to_tmpdir(tmp_path):
    """Where the scratch directory takes no nameless file (here: it does not exist), the
    iterate goes to TMPDIR's ``TemporaryFile``, never to a named file in the output."""
    from streammerge.methods import karcher

    with karcher._scratch_file(str(tmp_path / "missing")) as f:
        f.write(b"x" * 10)
        f.seek(0)
        assert f.read() == b"x" * 10
    assert not (tmp_path / "missing").exists() and list(tmp_path.iterdir()) == []
    with karcher._scratch_file(str(tmp_path)) as f:  # nameless: nothing appears
        f.write(b"y")
        assert list(tmp_path.iterdir()) == []


def test_the_writing_pass_counts_skip_the_temporary_iterate(tmp_path):
    """``RowArgs.counts`` of the writing pass are the last statistics pass's accumulators,
    not karcher's temporary-iterate entry (``SPILL``), which the stats hold after them."""
    from streammerge.api import Options, prepare
    from streammerge.exec.ops import row_args
    from streammerge.methods.karcher import SPILL
    from streammerge.plan.plan_types import Chunk

    _, a, b = make_trio(tmp_path)
    prep = prepare([a, b], None, tmp_path / "o", {"method": "karcher"}, Options())
    t = next(t for t in prep.plan.tensors if t.action == "merge")
    c = Chunk(0, t.numel, t.segments[0])
    last = cpu_karcher.zero_accumulators(2)
    stats = {PASSES[0]: cpu_karcher.zero_accumulators(2), PASSES[1]: last, SPILL: ("file",)}
    args = row_args(prep.plan.recipe.row, t, c, None, stats)
    assert args.op == PASSES[-1] and args.counts is last
    prep.output.close()


def test_triton_kernel_equals_numba():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU run")
    torch = pytest.importorskip("torch")
    from streammerge.kernels import triton_karcher

    tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

    def triton_backend(slot, dtypes, m, pr, stage, o, do):
        ts = [torch.from_numpy(slot[r, : m * ITEM[d]].copy()).view(tdt[d])
              for r, d in enumerate(dtypes)]  # fmt: skip
        if stage != 5:
            return triton_karcher.karcher_pass_triton(ts, m, pr, stage).numpy()
        t = torch.zeros(m, dtype=tdt[do])
        triton_karcher.karcher_pass_triton(ts, m, pr, 5, t)
        o[...] = t.view(torch.uint8).numpy()
        return None

    for n, dtypes, do, it, work in [(1100, ["BF16"] * 3, "BF16", 3, None),
                                    (37, ["F16", "BF16"], "F32", 2, "F32"),
                                    (1030, ["F32"] * 2, "BF16", 2, "BF16")]:  # fmt: skip
        rows = _rows(n, dtypes, 4, special=n == 37)
        w = [1.0 + j for j in range(len(rows))]
        want = _merge(rows, dtypes, n, do, w, it, work=work)
        got = _merge(rows, dtypes, n, do, w, it, work=work, backend=triton_backend)
        assert _same(got, want, do), (n, dtypes)
        assert got == want or n == 37
