"""Tensors a row-wise method reads more than once (larger than a chunk) are read through
the page cache, so the later passes read memory, not the disk; their pages are dropped after
the last pass. Everything else is read with O_DIRECT (``Item.cache``), and the reader's
fingerprint of a tensor read again is not recomputed."""

from __future__ import annotations

import xxhash
from test_gpu import _llama70b

from streammerge.exec.layout import Item, make_layout, work_items
from streammerge.io.fingerprints import InputHasher
from streammerge.plan.planner import make_plan
from streammerge.recipe.recipe import build_recipe


def _items(method: str, memory: int) -> list[Item]:
    base, a, b = (_llama70b(r) for r in ("/c", "/a", "/b"))
    plan = make_plan(base, [a, b], build_recipe(2, method=method, alpha=None, weights=[0.5, 0.5]),
                     5 * 10**9)  # fmt: skip
    layout = make_layout(plan, 2, memory)
    return [i for i in work_items(plan, list(plan.shards), layout) if isinstance(i, Item)]


def test_only_tensors_read_again_go_through_the_page_cache():
    items = _items("multislerp", 2**30)
    passes: dict[str, list[Item]] = {}
    for i in items:
        passes.setdefault(i.tensor.name, []).append(i)
    several = [n for n, its in passes.items() if len({i.op for i in its}) > 1]
    assert "model.embed_tokens.weight" in several  # 2.1 GB per input: read per pass
    for name, its in passes.items():
        if name in several:
            last = its[-1].op
            assert all(i.cache == ("drop" if i.op == last else "keep") for i in its), name
        else:
            assert all(i.cache == "" for i in its), name
    assert any(i.cache == "" for i in items)  # held tensors: one O_DIRECT read
    assert all(i.cache == "" for i in _items("linear", 2**30))  # one pass: O_DIRECT


def test_a_tensor_read_again_is_fingerprinted_once(tmp_path):
    from streammerge.io.reader import TensorInfo

    data = bytes(range(256)) * 40
    info = TensorInfo("t", "U8", (len(data),), tmp_path / "x", 0, len(data))
    h = InputHasher()
    for _ in range(2):  # two passes, each in two chunks
        h.update(info, 0, memoryview(data)[:4000])
        h.update(info, 4000, memoryview(data)[4000:])
    assert h.digest(info) == (len(data), xxhash.xxh3_64_hexdigest(data))
    h.update(info, 0, memoryview(b"\0" * 10))  # a later read does not restart it
    assert h.digest(info) == (len(data), xxhash.xxh3_64_hexdigest(data))
