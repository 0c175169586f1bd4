"""The Triton kernel through the whole streaming pipeline, under the interpreter: output
files byte-identical to the numba backend's (issue 3, "Proof without a GPU")."""

from __future__ import annotations

import os

import pytest
from conftest import make_trio, merge_argv, run_cli

pytest.importorskip("triton")


@pytest.mark.parametrize("dtype,model_dtypes", [("BF16", None), ("F16", ("BF16", "F32"))])
def test_triton_backend_files_equal_numba(tmp_path, dtype, model_dtypes):
    base, a, b = make_trio(tmp_path, dtype=dtype, model_dtypes=model_dtypes, big=40_001)
    outs = {}
    for backend in ("numba", "triton"):
        out = tmp_path / backend
        extra = ["--seed", "99", "--drop", "0.3,0.8", "--backend", backend, "--device", "cpu"]
        extra += ["--memory", "2MiB", "--shard-size", "30KB", "--quiet"]
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = run_cli(merge_argv([a, b], base, out, *extra), timeout=600, env=env)
        assert r.returncode == 0, r.stderr
        outs[backend] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert len([n for n in outs["numba"] if n.endswith(".safetensors")]) > 1
    assert outs["triton"] == outs["numba"]


@pytest.mark.parametrize(
    "method, extra",
    [
        ("ties", ["--density", "0.3,0.6", "--weights", "1,0.7"]),
        ("dare_ties", ["--density", "0.5,0.8", "--alpha", "0.7"]),
        ("breadcrumbs_ties", ["--density", "0.5", "--gamma", "0.05", "--weights", "0.9,0.4"]),
    ],
)
def test_triton_backend_equals_numba_for_ties_family(tmp_path, method, extra):
    """Both statistics routes (held tensors, and a tensor larger than a slot read once per
    pass) through the Triton histogram and merge kernels, on a multi-shard trio."""
    base, a, b = make_trio(tmp_path, shards=(2, 3, 1), big=700_001)
    outs = {}
    for backend in ("numba", "triton"):
        out = tmp_path / backend
        argv = ["--method", method, "--seed", "7", "--backend", backend, "--device", "cpu",
                "--memory", "24MiB", "--shard-size", "40KB", "--quiet", *extra]  # fmt: skip
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = run_cli(merge_argv([a, b], base, out, *argv), timeout=900, env=env)
        assert r.returncode == 0, r.stderr
        outs[backend] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert len([n for n in outs["numba"] if n.endswith(".safetensors")]) > 1
    assert outs["triton"].keys() == outs["numba"].keys()
    for name in outs["numba"]:
        assert outs["triton"][name] == outs["numba"][name], name


def test_triton_backend_without_interpreter_or_gpu_is_a_clear_error(tmp_path):
    base, a, b = make_trio(tmp_path)
    env = dict(os.environ, TRITON_INTERPRET="0")
    extra = ["--backend", "triton", "--device", "cpu"]
    r = run_cli(merge_argv([a, b], base, tmp_path / "o", *extra), env=env)
    assert r.returncode == 2 and "TRITON_INTERPRET=1" in r.stderr
    assert not (tmp_path / "o").exists()
