"""GPU path: the VRAM budget on a 70B-shaped plan (headers only, runs on the CPU), and the
CUDA streaming backend (skips without a GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from streammerge.gpu import GPU_DEPTH, cuda_available, device_bytes_in_flight, vram_chunk_elems
from streammerge.pipeline import Item, make_layout, work_items
from streammerge.plan import make_plan
from streammerge.reader import ModelDir, TensorInfo
from streammerge.recipe import build_recipe


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


@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU (none on this machine)")
def test_cuda_backend_equals_numba(tmp_path):
    from conftest import make_trio, output_bytes

    import streammerge

    base, a, b = make_trio(tmp_path, big=3_000_001)
    streammerge.merge(
        [a, b], base, tmp_path / "gpu", seed=5, device="cuda", vram="64MB", memory="64MiB"
    )
    streammerge.merge([a, b], base, tmp_path / "cpu", seed=5, device="cpu", backend="numba")
    assert sorted((tmp_path / "gpu").iterdir()) and all(
        (tmp_path / "gpu" / p.name).read_bytes() == p.read_bytes()
        for p in (tmp_path / "cpu").glob("*.safetensors")
    )
    got, want = output_bytes(tmp_path / "gpu"), output_bytes(tmp_path / "cpu")
    assert all((got[k] == want[k]).all() for k in want)


@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU (none on this machine)")
def test_cuda_backend_uses_pinned_memory():
    from streammerge.gpu import CudaBackend

    be = CudaBackend(vram_bytes=2**26)
    import torch

    buf = be.alloc((4, 1024))
    assert torch.from_numpy(buf).is_pinned()


@pytest.mark.parametrize("memory", [2**21, 256 * 2**20, 2**30])
def test_host_buffers_fit_the_memory_budget_whatever_the_model(memory):
    base, a, b = (_llama70b(r) for r in ("/c", "/a", "/b"))
    plan = make_plan(base, [a, b], build_recipe(2, seed=0), 5 * 10**9)
    for depth in (0, GPU_DEPTH):
        layout = make_layout(plan, 2, memory, depth)
        assert layout.buffer_bytes <= memory
        assert layout.cap_in_bytes >= layout.chunk_elems * 2  # one bf16 chunk per input row
