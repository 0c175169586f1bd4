"""GPU path: the VRAM budget on a 70B-shaped plan (headers only, runs on the CPU), and the
CUDA streaming backend (skips without a GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from streammerge.exec.gpu import (
    GPU_DEPTH,
    cuda_available,
    device_bytes_in_flight,
    pinned_host_bytes,
    vram_chunk_elems,
)
from streammerge.exec.layout import Item, make_layout, work_items
from streammerge.io.reader import ModelDir, TensorInfo
from streammerge.plan.planner import make_plan
from streammerge.recipe.recipe import build_recipe


def _llama70b(root: str) -> ModelDir:
    """Llama-3-70B tensor names and shapes (bench/make_synthetic.py's Llama layout), bf16, as
    headers only: no file is touched."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from make_synthetic import model_tensors

    dims = {"hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8, "vocab": 128256}
    tensors, off = {}, 0
    for spec in model_tensors(80, dims):
        n = 2 * spec.numel
        tensors[spec.name] = TensorInfo(
            spec.name, "BF16", spec.shape, Path(root) / "model.safetensors", off, n
        )
        off += n
    return ModelDir(Path(root), [Path(root) / "model.safetensors"], tensors, root, off)


def test_vram_budget_bounds_every_chunk_of_a_70b_merge():
    vram = 8 * 10**9
    base, a, b = (_llama70b(r) for r in ("/c", "/a", "/b"))
    assert base.total_bytes > 140e9
    plan = make_plan(base, [a, b], build_recipe(2, seed=0), 5 * 10**9)
    limit = lambda rows, i, o: vram_chunk_elems(rows, i, o, vram)
    layout = make_layout(plan, 2, 2**30, GPU_DEPTH, limit)
    assert device_bytes_in_flight(3, 2, 2, layout.chunk_elems) <= vram
    embed_chunks = 0
    for item in work_items(plan, list(plan.shards), layout):
        if isinstance(item, Item):
            t, c = item.tensor, item.chunk
            in_flight = GPU_DEPTH * c.count * (sum(s.itemsize for s in (t.base, *t.sources)) + 2)
            assert in_flight <= vram, (t.name, c)
            embed_chunks += t.name == "model.embed_tokens.weight"
    assert embed_chunks >= 2  # the 2.1 GB-per-input embedding is streamed in pieces


def test_tiny_vram_is_refused():
    from streammerge.errors import MergeError

    with pytest.raises(MergeError, match="too small"):
        vram_chunk_elems(3, 2, 2, 1000)


_GPU_SCRIPT = """
# The CUDA backend end to end, in a process without TRITON_INTERPRET (the tests' own
# process sets it: there the kernel would run interpreted on copies of the CUDA tensors).
import os, sys
assert "TRITON_INTERPRET" not in os.environ
import torch, streammerge
from streammerge.exec.gpu import cuda_backend
base, a, b, out, method = sys.argv[1:6]
be = cuda_backend(2**26)
assert not be.launcher.interpreted
buf = be.alloc((4, 1024))
assert torch.from_numpy(buf).is_pinned() and buf.ctypes.data % 4096 == 0
be.close()
kw = dict(method=method, density=0.5) if method != "dare_linear" else {}
streammerge.merge([a, b], base, out, seed=5, device="cuda", vram="64MB", memory="64MiB", **kw)
print("ok")
"""


@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("method", ["dare_linear", "ties", "breadcrumbs_ties"])
def test_cuda_backend_equals_numba(tmp_path, method):
    """The compiled kernel through the CUDA backend (pinned slots, three streams) gives
    numba's bytes, DARE and the statistics methods."""
    import os
    import subprocess

    from conftest import make_trio

    import streammerge

    base, a, b = make_trio(tmp_path, big=3_000_001)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", _GPU_SCRIPT, str(base), str(a), str(b), str(tmp_path / "gpu"),
         method], env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.split()[-1] == "ok", r.stderr[-4000:]
    kw = {"method": method, "density": 0.5} if method != "dare_linear" else {}
    streammerge.merge([a, b], base, tmp_path / "cpu", seed=5, device="cpu", backend="numba", **kw)
    for p in (tmp_path / "cpu").glob("*.safetensors"):
        assert (tmp_path / "gpu" / p.name).read_bytes() == p.read_bytes(), p.name


@pytest.mark.parametrize("memory", [2**21, 256 * 2**20, 2**30])
def test_host_buffers_fit_the_memory_budget_whatever_the_model(memory):
    base, a, b = (_llama70b(r) for r in ("/c", "/a", "/b"))
    plan = make_plan(base, [a, b], build_recipe(2, seed=0), 5 * 10**9)
    for depth in (0, GPU_DEPTH):
        layout = make_layout(plan, 2, memory, depth)
        assert layout.buffer_bytes <= memory
        assert layout.cap_in_bytes >= layout.chunk_elems * 2  # one bf16 chunk per input row
    assert pinned_host_bytes(layout) <= memory  # what a GPU run pins (page-rounded)
