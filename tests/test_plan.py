"""The planner: sharding, copy/merge decisions, mismatch errors, chunks and segments."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_trio, write_model

from streammerge.errors import MergeError
from streammerge.io.reader import open_model
from streammerge.plan.plan_types import iter_chunks
from streammerge.plan.planner import greedy_shards, make_plan, natural_key, shard_names
from streammerge.recipe.recipe import build_recipe


def test_greedy_shards_matches_docstring_example():
    assert greedy_shards([4, 4, 4, 12], 10) == [[0, 1], [2], [3]]
    assert greedy_shards([10, 1], 10) == [[0], [1]]
    assert greedy_shards([], 10) == []


def test_shard_names_follow_hf():
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(3)[1] == "model-00002-of-00003.safetensors"


def test_natural_order():
    names = ["layers.10.x", "layers.2.x", "layers.1.x"]
    assert sorted(names, key=natural_key) == ["layers.1.x", "layers.2.x", "layers.10.x"]


def _plan(base, a, b, shard_size=10**9, **kw):
    return make_plan(
        open_model(base), [open_model(a), open_model(b)], build_recipe(2, seed=1, **kw), shard_size
    )


def test_plan_decides_copy_and_merge(tmp_path):
    base, a, b = make_trio(tmp_path)
    plan = _plan(base, a, b)
    actions = {t.name: t.action for t in plan.tensors}
    assert actions["position_ids"] == "copy"  # integer buffer
    assert actions["pooler.weight"] == "copy"  # only the base has it
    assert plan.base_only == ("pooler.weight",)
    assert actions["layers.0.mlp.up.weight"] == "merge"
    assert len(plan.shards) == 1 and plan.shards[0].filename == "model.safetensors"


def test_plan_headers_are_valid_and_aligned(tmp_path):
    base, a, b = make_trio(tmp_path, dtype="F32", big=5000)
    plan = _plan(base, a, b, shard_size=8000)
    assert len(plan.shards) > 1
    seen = set()
    for shard in plan.shards:
        n = int.from_bytes(shard.header[:8], "little")
        assert (8 + n) % 8 == 0
        header = json.loads(shard.header[8:])
        assert header.pop("__metadata__") == {"format": "pt"}
        ends = 0
        for t in shard.tensors:
            assert header[t.name]["data_offsets"] == [t.offset, t.offset + t.nbytes]
            assert (
                t.offset == ends
                and t.offset % (2 if t.dtype == "BF16" else 4 if t.dtype == "F32" else 8) == 0
            )
            ends += t.nbytes
            seen.add(t.name)
    assert seen == set(open_model(base).tensors)


def test_missing_tensor_is_named(tmp_path):
    base, a, b = make_trio(tmp_path)
    ts = {
        n: t for n, t in __import__("conftest").load_dir(b).items() if n != "layers.0.norm.weight"
    }
    (b / "model-00001-of-00002.safetensors").unlink()
    (b / "model-00002-of-00002.safetensors").unlink()
    (b / "model.safetensors.index.json").unlink()
    write_model(b, ts)
    with pytest.raises(MergeError) as e:
        _plan(base, a, b)
    assert "layers.0.norm.weight" in str(e.value) and str(b) in str(e.value)


def test_shape_mismatch_outside_dim0_is_refused(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = write_model(tmp_path / "base", {"w": torch.randn(4, 6, generator=g)})
    a = write_model(tmp_path / "a", {"w": torch.randn(4, 6, generator=g)})
    b = write_model(tmp_path / "b", {"w": torch.randn(4, 7, generator=g)})
    with pytest.raises(MergeError, match="shape mismatch") as e:
        _plan(base, a, b)
    assert "(" in str(e.value) and "w" in str(e.value)


def test_float_vs_integer_is_refused(tmp_path):
    base = write_model(tmp_path / "base", {"w": torch.zeros(4)})
    a = write_model(tmp_path / "a", {"w": torch.zeros(4)})
    b = write_model(tmp_path / "b", {"w": torch.zeros(4, dtype=torch.int32)})
    with pytest.raises(MergeError, match="float in one model, integer"):
        _plan(base, a, b)


def test_vocab_rule_segments(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = write_model(tmp_path / "base", {"emb": torch.randn(10, 3, generator=g)})
    a = write_model(tmp_path / "a", {"emb": torch.randn(11, 3, generator=g)})
    b = write_model(tmp_path / "b", {"emb": torch.randn(12, 3, generator=g)})
    plan = _plan(base, a, b, lam=0.25)
    (t,) = plan.tensors
    assert t.shape == (12, 3) and plan.vocab_rows == 12 and plan.tokenizer_model == 1
    s0, s1, s2 = t.segments
    assert (s0.start, s0.stop, s0.has_base, s0.models, s0.weights) == (
        0,
        30,
        True,
        (0, 1),
        (0.25, 0.75),
    )
    assert (s1.start, s1.stop, s1.has_base, s1.models) == (30, 33, False, (0, 1))
    assert s1.weights == (0.25, 0.75) and s1.drop == (0.0, 0.0) and s1.scale == 1.0
    assert (s2.start, s2.stop, s2.models, s2.weights) == (33, 36, (1,), (1.0,))
    chunks = list(iter_chunks(t, 7))
    assert sum(c.count for c in chunks) == 36
    for c in chunks:
        assert c.segment.start <= c.start and c.start + c.count <= c.segment.stop
