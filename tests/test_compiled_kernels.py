"""The kernels as a GPU would run them, checked without a GPU: each launcher
(``merge_chunk_triton``, ``hist_high_triton``, ``hist_low_triton``) is called with its real
arguments on ``meta`` tensors under a stub driver that names the target, and the launch is
turned into a compile (Triton's ``warmup``), so the PTX comes from the launcher's own
signature: for sm_80 and sm_90, for chunks with ``n % 16 != 0``, ``n == 1`` (a constexpr)
and ``n >= 2**31`` (an i64 argument). Every PTX must have no ``fma``, no ``.ftz``, no
``.approx``, ``.rn`` on every float add / sub / mul / div, and 64-bit element offsets (the
block index widened before it is scaled, bounds compared in 64 bits).
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from ptx_stub import compile_in_child, stub_driver_preamble

SIZES = {"odd": 1_000_003, "one": 1, "big": 2**31 + 5}
ARCHS = (80, 90)

_SCRIPT = stub_driver_preamble("int(sys.argv[1])", "meta") + textwrap.dedent(
    """
    outdir = sys.argv[2]
    from streammerge.kernels import triton_merge as tm, triton_stats as ts

    compiled = []
    for kern in (tm._task_vector_kernel, ts._hist_high_kernel, ts._hist_low_kernel):
        def run(*a, _orig=kern.run, **kw):
            kw["warmup"] = True
            compiled.append(_orig(*a, **kw))
        kern.run = run

    def save(name):
        with open(os.path.join(outdir, f"{name}.ptx"), "w") as f:
            f.write(compiled[-1].asm["ptx"])

    for size, n in (("odd", 1_000_003), ("one", 1), ("big", 2**31 + 5)):
        e = lambda dt: torch.empty(n, dtype=dt, device="meta")
        bf, fp = torch.bfloat16, torch.float16
        base, models = e(bf), [e(bf), e(fp)]
        common = dict(key=2**62 + 3, start=2**33 + 7, weights=[0.6, 0.4], scale=1.0)
        tm.merge_chunk_triton(base, models, e(bf), drop=[0.5, 0.3], **common)
        save(f"dare_{size}")
        tm.merge_chunk_triton(base, models, e(bf), drop=[0.0, 0.0], keep_lo=[5, 7],
                              keep_hi=[2**31, 2**31 + 9], consensus="sign", normalize=True,
                              **common)
        save(f"ties_{size}")
        tm.merge_chunk_triton(None, models, e(bf), drop=[0.0, 0.0], normalize=True,
                              linear=True, **common)
        save(f"linear_{size}")
        hist = torch.empty((2, 32768), dtype=torch.int64, device="meta")
        ts.hist_high_triton(base, models, hist)
        save(f"hist_high_{size}")
        buckets = torch.empty((2, 3), dtype=torch.int64, device="meta")
        low = torch.empty((2, 3, 65536), dtype=torch.int64, device="meta")
        ts.hist_low_triton(base, models, buckets, low)
        save(f"hist_low_{size}")
    print("compiled", len(compiled))
    """
)


@pytest.fixture(scope="module")
def ptx(tmp_path_factory) -> dict[tuple[int, str], str]:
    """(arch, "<kernel>_<size>") -> PTX text, compiled in child processes without
    TRITON_INTERPRET."""
    out = {}
    for arch in ARCHS:
        d = tmp_path_factory.mktemp(f"sm{arch}")
        r = compile_in_child(_SCRIPT, str(arch), str(d), cache=d / "cache")
        assert r.stdout.split() == ["compiled", str(5 * len(SIZES))], r.stdout
        for p in Path(d).glob("*.ptx"):
            out[(arch, p.stem)] = p.read_text()
    return out


KERNELS = ("dare", "ties", "linear", "hist_high", "hist_low")
CASES = [(a, k, s) for a in ARCHS for k in KERNELS for s in SIZES]


@pytest.mark.parametrize("arch, kernel, size", CASES)
def test_ptx_is_strict_ieee_with_64bit_offsets(ptx, arch, kernel, size):
    text = ptx[(arch, f"{kernel}_{size}")]
    assert re.search(rf"^\.target sm_{arch}a?$", text, re.MULTILINE), "target"
    assert not re.search(r"\bfma\.", text), "fma: a contracted multiply-add rounds once"
    assert ".ftz" not in text, "ftz: subnormals flushed"
    assert ".approx" not in text, "approximate division or math"
    ops = re.findall(r"\b(?:add|sub|mul|div)\.[a-z.]*f(?:32|64)\b", text)
    assert all(".rn." in op for op in ops), sorted(set(ops))
    if kernel in ("dare", "ties", "linear"):
        assert any(op.startswith("mul.rn.f32") for op in ops)
    # The block index is widened to 64 bits before it is scaled by BLOCK ...
    ctaid = re.search(r"mov\.u32\s+(%r\d+), %ctaid\.x;", text)
    assert ctaid, "no block index"
    r = re.escape(ctaid.group(1))
    assert re.search(rf"(mul\.wide\.[us]32|cvt\.[us]64\.[us]32)\s+%rd\d+, {r}\b", text), (
        "the block offset is computed in 32 bits"
    )
    # ... and element indices are compared with n in 64 bits (n == 1 is a constant: the
    # bound folds into a test of the block and lane indices).
    if size != "one":
        assert re.search(r"setp\.\w+\.s64", text), "bounds compared in 32 bits"
    n_params = re.findall(r"\.param \.(u32|u64) \w+_param_\d+", text)
    if size == "big":
        assert "u32" not in n_params, "an int parameter narrowed to 32 bits for n >= 2**31"
