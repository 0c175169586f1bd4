"""della and della_linear (docs/SPEC.md "DELLA (della, della_linear)"): the numba kernel
against the SPEC oracle and the Triton kernel (interpreter) byte for byte over dtypes, odd
row shapes, model ids and parameters; the expected keep rate; whole merges (CLI, mergekit
YAML) against the oracle whatever the chunking; M3 weights; the one-line refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import spec_reference as ref
from conftest import load_dir, make_trio, output_bytes, run_cli

from streammerge.kernels import cpu_della

ITEM = {"F32": 4, "F16": 2, "BF16": 2}
KEY = 0x1234_5678_9ABC_DEF


def _slot(n: int, dtypes: list[str], seed: int):
    """A slot (uint8 [1 + N, bytes]) and its stored rows: a base and N fine-tunes, with
    repeated magnitudes (rank ties), a NaN, an infinity and values equal to the base."""
    rng = np.random.default_rng(seed)
    xb = (rng.standard_normal(n) * 0.02).astype(np.float32)
    rows = [ref.from_float32(xb, dtypes[0])]
    for j in range(len(dtypes) - 1):
        x = (xb + rng.standard_normal(n) * 0.01 * (rng.random(n) < 0.8)).astype(np.float32)
        if n > 12:
            x[3] = x[8] = xb[3]
            x[4] = xb[4] + 0.0078125
            x[6] = xb[6] - 0.0078125
            if j == 0:
                x[5] = np.nan
            if j == 1:
                x[9] = np.inf
        rows.append(ref.from_float32(x, dtypes[1 + j]))
    slot = np.zeros((len(dtypes), n * 4 + 64), np.uint8)
    for r, x in enumerate(rows):
        b = np.ascontiguousarray(x).view(np.uint8)
        slot[r, : b.size] = b
    return slot, rows


CASES = [  # dtypes, out, shape, weights, density, epsilon, model ids
    (["BF16"] * 4, "BF16", (7, 53), [1.0, 0.6, 0.4], [0.5, 0.3, 0.7], [0.15, 0.2, 0.1], None),
    (["F16"] * 3, "F16", (131,), [1.0, -0.5], [0.4, 1.0], [0.3, 0.15], [0, 5]),
    (["F32"] * 3, "F32", (3, 17, 2), [0.7, 0.3], [0.2, 0.6], [0.1, 0.0], None),
    (["BF16", "BF16", "F16"], "F32", (9, 1), [1.0, 1.0], [0.5, 0.5], [0.4, 0.2], [3, 4]),
    (["BF16"] * 6, "BF16", (2, 300), [1.0, 2.0, 0.5, 1.0, 0.25], [0.5] * 5, [0.2] * 5, None),
]  # fmt: skip


def _numba(slot, dtypes, do, shape, w, rho, eps, ids, sign, rescale=True, scale=0.9):
    numel = int(np.prod(shape))
    L = numel if len(shape) == 1 else numel // shape[0]
    out = np.zeros(numel * ITEM[do], np.uint8)
    cpu_della.della_chunk(slot, dtypes, 0, list(range(1, slot.shape[0])), numel // L, L, 0,
                          KEY, w, rho, eps, rescale, sign, sign, scale, out, do, None,
                          ids)  # fmt: skip
    return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sign, rescale", [(True, True), (False, True), (True, False)])
def test_numba_equals_the_spec_oracle(case, sign, rescale):
    dtypes, do, shape, w, rho, eps, ids = case
    numel = int(np.prod(shape))
    slot, rows = _slot(numel, dtypes, 7)
    want = ref.spec_della(rows[0], rows[1:], dtypes, do, shape, KEY, w, rho, eps, rescale, sign,
                          sign, 0.9, model_ids=ids)  # fmt: skip
    got = _numba(slot, dtypes, do, shape, w, rho, eps, ids, sign, rescale)
    assert got.tobytes() == np.ascontiguousarray(want).view(np.uint8).tobytes()


def test_triton_equals_numba():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU run")
    import torch

    from streammerge.kernels import triton_della

    td = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for k, (dtypes, do, shape, w, rho, eps, ids) in enumerate(CASES):
        sign = k % 2 == 0
        numel = int(np.prod(shape))
        L = numel if len(shape) == 1 else numel // shape[0]
        slot, _ = _slot(numel, dtypes, k)
        want = _numba(slot, dtypes, do, shape, w, rho, eps, ids, sign)
        ts = [torch.from_numpy(slot[r, : numel * ITEM[d]].copy()).view(td[d])
              for r, d in enumerate(dtypes)]  # fmt: skip
        out = torch.zeros(numel, dtype=td[do])
        triton_della.della_triton(ts[0], ts[1:], numel // L, L, 0, KEY,
                                  ids or list(range(len(w))), w, rho, eps, True, sign, sign,
                                  0.9, out)  # fmt: skip
        assert out.view(torch.uint8).numpy().tobytes() == want.tobytes(), (k, dtypes)


@pytest.mark.parametrize("kind", ["bf16", "f16", "f32", "zeros", "ties", "one", "wide"])
def test_ranks_are_the_stable_order_of_the_magnitudes(kind):
    """``_ranks`` (a counting pass, or the radix sort when the magnitudes span too many
    steps) gives every element its place in the order of (magnitude, index)."""
    rng = np.random.default_rng(len(kind))
    n = 1 if kind == "one" else 3000
    x = (rng.standard_normal(n) * 0.002).astype(np.float32)
    x[rng.random(n) < 0.2] = 0.0
    if kind == "bf16":
        x = ref.to_float32(ref.from_float32(x, "BF16"), "BF16")
    elif kind == "f16":
        x = x.astype(np.float16).astype(np.float32)
    elif kind == "zeros":
        x[:] = -0.0
    elif kind == "ties":
        x = rng.choice(np.array([0.0, 0.5, -0.5, 0.25], np.float32), n)
    elif kind == "wide":
        x[7], x[9] = np.inf, 1e-30
    mags = x.view(np.uint32) & np.uint32(0x7FFFFFFF)
    want = np.empty(n, np.int64)
    want[np.lexsort((np.arange(n), mags))] = np.arange(n)
    rank, pos = np.empty(n, np.int32), np.empty(8192, np.int32)  # the kernel's dtypes
    scratch = [np.empty(n, np.int64), np.empty(n, np.int64), np.empty(256, np.int64)]
    cpu_della._ranks(mags, n, rank, pos, *scratch)
    assert np.array_equal(rank, want)


def test_keep_rate_follows_density_and_rank():
    """Kept share = density on average, rising with the magnitude rank (density +/- eps)."""
    n, rho, eps = 20_000, 0.3, 0.2
    rng = np.random.default_rng(1)
    base = np.zeros(n, np.float32)
    x = (rng.standard_normal(n) + 3.0).astype(np.float32)  # no zero task-vector entry
    slot = np.stack([base.view(np.uint8), x.view(np.uint8)])
    out = np.zeros(n * 4, np.uint8)
    cpu_della.della_chunk(slot, ["F32"] * 2, 0, [1], 1, n, 0, KEY, [1.0], [rho], [eps], False,
                          False, False, 1.0, out, "F32")  # fmt: skip
    kept = out.view(np.float32) != 0
    assert abs(kept.mean() - rho) < 0.015
    order = np.argsort(np.abs(x), kind="stable")
    low, high = kept[order[: n // 10]].mean(), kept[order[-n // 10 :]].mean()
    assert abs(low - (rho - 0.9 * eps)) < 0.03 and abs(high - (rho + 0.9 * eps)) < 0.03


def _expected(base, models, rec, method):
    """Every merged tensor from the inputs and streammerge.json by the SPEC oracle."""
    b, ms = load_dir(base), [load_dir(m) for m in models]
    names = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}
    out = {}
    for name, p in rec["tensors"].items():
        t = b[name]
        dts = [names[str(x[name].dtype)] for x in (b, *ms)]
        carrier = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
        arr = [x[name].contiguous().view(-1).view(
            {"F32": __import__("torch").float32, "F16": __import__("torch").float16,
             "BF16": __import__("torch").int16}[d]).numpy().view(carrier[d])
            for x, d in zip((b, *ms), dts)]  # fmt: skip
        shape = tuple(t.shape)
        v = ref.spec_della(arr[0], arr[1:], dts, dts[0], shape, ref.spec_key(rec["seed"], name),
                           p["w"], p["density"], p["epsilon"], p["rescale"],
                           method == "della", p["normalize"], p["scale"],
                           p["compute_dtype"])  # fmt: skip
        out[name] = np.ascontiguousarray(v).view(np.uint8).tobytes()
    return out


def _bytes(out):
    return {k: np.ascontiguousarray(v).view(np.uint8).tobytes()
            for k, v in output_bytes(out).items()}  # fmt: skip


@pytest.mark.parametrize("method, big, runs", [
    ("della", 100_000, ([], ["--memory", "8MB", "--threads", "1", "--shard-size", "300KB"])),
    ("della_linear", 0, ([], ["--backend", "triton"])),
])  # fmt: skip
def test_cli_is_exact_and_independent_of_the_chunking(tmp_path, method, big, runs):
    """The same bytes with small chunks, one thread, small shards (della), through the
    Triton backend (della_linear, under TRITON_INTERPRET=1), equal to the oracle's."""
    if "--backend" in runs[1] and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) or a GPU run")
    base, a, b = make_trio(tmp_path, big=big)
    outs = []
    for k, more in enumerate(runs):
        out = tmp_path / f"out{k}"
        r = run_cli([str(a), str(b), "--base", str(base), "--method", method, "--density", "0.4",
                     "--epsilon", "0.15", "--seed", "11", "-o", str(out), *more])  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs.append(_bytes(out))
    assert outs[0] == outs[1]
    rec = json.loads((tmp_path / "out0" / "streammerge.json").read_text())
    mix = rec["mixup"]  # M3 (no weights given): w_j = m_j
    assert all(np.allclose(p["w"], mix) for p in rec["tensors"].values())
    exp = _expected(base, [a, b], rec, method)
    assert {k: outs[0][k] for k in exp} == exp


def test_mergekit_yaml(tmp_path):
    """mergekit's della recipe (per-model density / epsilon / weight gradients, lambda,
    ``epsilon: 1e-2``, which PyYAML reads as a string) gives the oracle's bytes."""
    base, a, b = make_trio(tmp_path)
    cfg = tmp_path / "della.yml"
    cfg.write_text(f"models:\n  - model: {base}\n  - model: {a}\n    parameters:\n"
                   "      weight: 1.0\n      density: 0.5\n      epsilon: 1e-2\n"
                   f"  - model: {b}\n    parameters:\n      weight: [0.3, 0.7]\n"
                   "      density: 0.4\nmerge_method: della\n"
                   f"base_model: {base}\nparameters:\n  epsilon: 0.1\n  lambda: 0.9\n"
                   "  rescale: false\n  int8_mask: true\ndtype: bfloat16\n")  # fmt: skip
    out = tmp_path / "out"
    r = run_cli(["--config", str(cfg), "-o", str(out), "--seed", "5"])
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "streammerge.json").read_text())
    p = rec["tensors"]["layers.0.mlp.up.weight"]
    assert p["epsilon"] == [0.01, 0.1] and p["scale"] == 0.9 and p["rescale"] is False
    assert p["normalize"] is True
    exp = _expected(base, [a, b], rec, "della")
    assert {k: _bytes(out)[k] for k in exp} == exp


@pytest.mark.parametrize("argv, message", [
    (["--density", "0.5", "--epsilon", "0.6"], "must lie inside (0, 1)"),
    (["--density", "0.9", "--epsilon", "0.1"], "must lie inside (0, 1)"),
    (["--epsilon", "-0.1", "--density", "0.5"], "epsilon"),
    (["--density", "0"], "density"),
])  # fmt: skip
def test_bad_recipes_are_one_line(tmp_path, argv, message):
    base, a, b = make_trio(tmp_path)
    r = run_cli([str(a), str(b), "--base", str(base), "--method", "della", *argv,
                 "-o", str(tmp_path / "o")])  # fmt: skip
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_a_row_the_int32_ranks_cannot_count_is_refused():
    """The ranks and their counters are int32: a row of 2**31 elements is refused, not
    ranked with wrapped counts."""
    s = np.zeros((3, 16), np.uint8)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        cpu_della.della_chunk(s, ["BF16"] * 3, 0, [1, 2], 0, 2**31, 0, 1, [1.0, 1.0],
                              [0.5, 0.5], [0.1, 0.1], True, True, True, 1.0,
                              np.zeros(16, np.uint8), "BF16")  # fmt: skip
