"""``--plan`` dry run (streammerge.dryrun): its byte counts equal the real run's, it writes
nothing, and its text names every tensor group and the method."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_trio, write_model

import streammerge
from streammerge import dryrun
from streammerge.api import Options, layout_for, prepare
from streammerge.names import natural_key
from streammerge.recipe.recipe import Recipe

#: The CPU backends' geometry (NumbaBackend.depth == 0, no device chunk limit), without
#: starting numba.
CPU = SimpleNamespace(depth=0)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


CASES = [
    ("dare_linear", "tensor", {}),
    ("ties", "tensor", {"density": 0.3}),
    ("ties", "model", {"density": 0.3}),
]


@pytest.mark.parametrize(("method", "scope", "extra"), CASES)
def test_plan_bytes_equal_the_real_run_and_nothing_is_written(tmp_path, method, scope, extra):
    base, a, b = make_trio(tmp_path, big=1_500_001)  # more than a 24 MiB slot holds
    out = tmp_path / "out"
    recipe = {"method": method, "seed": 11, "trim_scope": scope, **extra}
    options = Options(memory="24MiB", threads=2, backend="numba", device="cpu")
    before = _tree(tmp_path)
    prep = prepare([a, b], base, out, recipe, options)
    d = dryrun.describe(prep, layout_for(prep, CPU))
    json.dumps(d)  # serializable
    assert _tree(tmp_path) == before  # no output, no staging, nothing else
    assert not out.exists() and not prep.output.staging.exists()

    passes = {k for g in d["groups"] for k in g["passes"]}
    if method == "ties" and scope == "tensor":
        assert any(k.startswith("multi-pass") for k in passes), passes  # the big tensor
        assert any(k.startswith("held") for k in passes), passes
    if scope == "model":
        assert d["analysis"] is not None and d["bytes_read_analysis"] > 0
    assert sum(g["read_bytes"] for g in d["groups"]) + d["bytes_read_analysis"] == d["bytes_read"]
    assert sum(g["tensors"] for g in d["groups"]) == sum(s["tensors"] for s in d["shards"])
    assert d["memory"]["buffer_bytes"] <= d["memory"]["budget_bytes"] == 24 * 2**20

    text = dryrun.format_plan(d)
    assert f"method {method}" in text and f"trim_scope {scope}" in text
    for g in d["groups"]:
        assert f"  {g['group']}:" in text, g["group"]
    assert {g["group"] for g in d["groups"]} == {
        "embedding/other", "layer 0", "layer 1", "layer 2", "layer 10", "head/final",
    }  # fmt: skip
    assert str(d["bytes_read"]) in text and str(d["bytes_written"]) in text

    s = streammerge.merge([a, b], base, out, options=options, **recipe)
    assert s.bytes_read == d["bytes_read"]
    files = {p.name: p.stat().st_size for p in out.glob("*.safetensors")}
    assert files == {sh["file"]: sh["size_bytes"] for sh in d["shards"]}
    assert d["bytes_written"] == sum(files.values()) == s.bytes_written
    assert s.buffer_bytes <= d["memory"]["buffer_bytes"]


def test_plan_params_per_distinct_set(tmp_path):
    """Tensors that resolve differently (a filter list) are shown per parameter set."""
    base, a, b = make_trio(tmp_path)
    recipe = Recipe(
        method="ties", n_models=2, seed=1, mixup=None, alpha=None, lam=None,
        models=({"weight": 0.6}, {"weight": 0.4}),
        params={"density": [{"filter": "mlp", "value": 0.5}, {"value": 0.9}]},
    )  # fmt: skip
    prep = prepare([a, b], base, tmp_path / "out", recipe, Options(threads=2))
    d = dryrun.describe(prep, layout_for(prep, CPU), measure_read=False)
    layer0 = next(g for g in d["groups"] if g["group"] == "layer 0")
    dens = sorted((tuple(p["density"]), p["count"]) for p in layer0["params"])
    assert dens == [((0.5, 0.5), 1), ((0.9, 0.9), 2)]
    text = dryrun.format_plan(d)
    assert "layers.0.mlp.up.weight" in text and "disk speed: not measured" in text
    assert d["disk"] is None and d["expected_seconds"] is None


def test_identical_layers_print_once(tmp_path):
    g = torch.Generator().manual_seed(0)
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    names += [f"model.layers.{i}.mlp.weight" for i in range(4)]
    roots = []
    for k, who in enumerate(("base", "a", "b")):
        ts = {n: torch.randn(8, 8, generator=g).to(torch.bfloat16) for n in names}
        roots.append(write_model(tmp_path / who, ts))
    prep = prepare(roots[1:], roots[0], tmp_path / "out", {"seed": 2}, Options(threads=2))
    d = dryrun.describe(prep, layout_for(prep, CPU), measure_read=False)
    assert [x["group"] for x in d["groups"]] == [
        "embedding/other", "layer 0", "layer 1", "layer 2", "layer 3", "head/final",
    ]  # fmt: skip
    head = next(x for x in d["groups"] if x["group"] == "head/final")
    assert sorted(head["params"][0]["tensors"]) == ["lm_head.weight", "model.norm.weight"]
    text = dryrun.format_plan(d)
    assert "  layers 0-3 (each): 1 tensor(s)" in text and "  layer 1:" not in text


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("model.embed_tokens.weight", "embedding/other"),
        ("lm_head.weight", "head/final"),
        ("model.norm.weight", "head/final"),
        ("model.layers.7.self_attn.q_proj.weight", "layer 7"),
        ("embeddings.word_embeddings.weight", "embedding/other"),
        ("encoder.layer.3.output.dense.weight", "layer 3"),
        ("pooler.dense.weight", "head/final"),
        ("transformer.h.11.mlp.c_fc.weight", "layer 11"),
        ("transformer.wte.weight", "embedding/other"),
        ("transformer.ln_f.weight", "head/final"),
        ("gpt_neox.embed_out.weight", "head/final"),
    ],
)
def test_group_of(name, group):
    first = {
        "model": ("model.layers.", 0, ".self_attn.q_proj.weight"),
        "embeddings": ("encoder.layer.", 0, ".x"),
        "encoder": ("encoder.layer.", 0, ".x"),
        "pooler": ("encoder.layer.", 0, ".x"),
        "transformer": ("transformer.h.", 0, ".x"),
        "gpt_neox": ("gpt_neox.layers.", 0, ".x"),
        "lm_head": ("model.layers.", 0, ".x"),
    }[name.split(".")[0]]
    assert dryrun.group_of(name, natural_key("".join(map(str, first)))) == group


def test_measure_read_speed(tmp_path):
    from streammerge.io import measure

    assert measure.measure_read_speed([]) is None
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(9 * 2**20 + 123))
    r = measure.measure_read_speed([small, big], max_bytes=8 * 2**20)
    assert r["file"] == str(big)
    assert 8 * 2**20 <= r["bytes"] <= big.stat().st_size
    assert r["bytes_per_s"] > 0 and r["how"] in ("O_DIRECT", "buffered after fadvise DONTNEED")
    empty = tmp_path / "e.bin"
    empty.write_bytes(b"")
    assert measure.measure_read_speed([empty])["bytes_per_s"] is None


def test_plan_of_a_resume_counts_only_unfinished_shards(tmp_path):
    from streammerge.api import execute
    from streammerge.errors import MergeError
    from streammerge.exec.choose import make_backend

    base, a, b = make_trio(tmp_path)
    out = tmp_path / "out"
    recipe = {"method": "dare_linear", "seed": 5}
    options = Options(shard_size=4000, threads=2, backend="numba", device="cpu")
    prep = prepare([a, b], base, out, recipe, options)
    assert len(prep.plan.shards) >= 3
    execute(prep, make_backend("numba", "cpu", 2), shards=prep.plan.shards[:1])
    prep.output.close()  # interrupted after the first shard

    resume = Options(shard_size=4000, threads=2, backend="numba", device="cpu", resume=True)
    prep = prepare([a, b], base, out, recipe, resume)
    before = _tree(tmp_path)
    d = dryrun.describe(prep, layout_for(prep, CPU), measure_read=False)
    assert _tree(tmp_path) == before
    first = prep.plan.shards[0]
    assert d["resumed_shards"] == [first.filename]
    assert d["bytes_written"] == prep.plan.output_bytes - first.size_bytes
    assert "already finished (--resume)" in dryrun.format_plan(d)

    other = prepare([a, b], base, out, {**recipe, "seed": 6}, resume)
    with pytest.raises(MergeError, match="changed since the interrupted merge"):
        dryrun.describe(other, layout_for(other, CPU), measure_read=False)

    s = streammerge.merge([a, b], base, out, options=resume, **recipe)
    assert s.resumed_shards == 1
    assert s.bytes_read == d["bytes_read"] and s.bytes_written == d["bytes_written"]


def test_plan_states_a_maximum_the_run_never_exceeds_when_the_window_guess_misses(tmp_path):
    """Issue 21.10: a TIES tensor larger than a slot whose first chunk is not like the
    rest (tiny deltas there, large ones after): the threshold window guessed from the
    first chunk misses and the run reads it a third time. --plan's ``bytes_read`` is the
    hit case and ``bytes_read_max`` bounds the run; the text states the maximum."""
    g = torch.Generator().manual_seed(0)
    n = 6_000_000  # 12 MB in bf16 per model: more than a 16 MiB budget's slot
    base = torch.randn(n, generator=g) * 0.02
    dirs = [write_model(tmp_path / "base", {"w": base.to(torch.bfloat16)})]
    for name in ("a", "b"):
        delta = torch.randn(n, generator=g)
        delta[: n // 20] *= 1e-4  # the first chunk: tiny task-vector magnitudes
        dirs.append(write_model(tmp_path / name, {"w": (base + delta).to(torch.bfloat16)}))
    out = tmp_path / "out"
    # float32 magnitudes (bf16 ones need no low histograms, so no guess: the next test)
    recipe = {"method": "ties", "seed": 3, "density": 0.3, "compute_dtype": "F32"}
    options = Options(memory="16MiB", threads=2, backend="numba", device="cpu")
    prep = prepare(dirs[1:], dirs[0], out, recipe, options)
    d = dryrun.describe(prep, layout_for(prep, CPU))
    assert d["bytes_read_max"] > d["bytes_read"]
    assert f"at most {d['bytes_read_max']}" in dryrun.format_plan(d)
    s = streammerge.merge(dirs[1:], dirs[0], out, options=options, **recipe)
    assert d["bytes_read"] < s.bytes_read <= d["bytes_read_max"]  # the guess missed here


def test_kernels_compiled_reads_numbas_cache(tmp_path):
    """An empty NUMBA_CACHE_DIR: the kernels are not compiled (importing them compiles
    nothing); the project's own cache after a warm-up: they are."""
    import subprocess
    import sys

    code = "from streammerge.exec.backends import kernels_compiled; print(kernels_compiled())"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cold")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, check=True)  # fmt: skip
    assert r.stdout.strip() == "False"
    from streammerge.exec.backends import kernels_compiled
    from streammerge.kernels import cpu_merge, cpu_stats

    cpu_merge.warmup()
    cpu_stats.warmup()
    if os.environ.get("NUMBA_CACHE_DIR") is None:
        assert kernels_compiled()


def test_cold_cache_is_announced_and_in_the_plans_estimate(tmp_path, monkeypatch):
    """Issue 21.9: with numba's cache cold, the backend says it is compiling (one notice
    before the first pass) and --plan adds the compile time to its estimate."""
    import time

    from streammerge import notices
    from streammerge.exec import backends
    from streammerge.kernels import cpu_merge

    monkeypatch.setattr(backends, "kernels_compiled", lambda: False)
    warm = cpu_merge.warmup

    def slow_warmup():  # as a cold compile: the first pass must wait for the loader
        time.sleep(0.5)
        warm()

    monkeypatch.setattr(cpu_merge, "warmup", slow_warmup)
    lines: list[str] = []
    monkeypatch.setattr(notices, "sink", lines.append)
    unused = backends.NumbaBackend(1)  # a run refused before its first pass: no notice
    unused._loader.join()
    assert not lines
    backends.NumbaBackend(1)._modules()
    assert any("compiling the CPU kernels" in x and str(backends.COMPILE_S) in x for x in lines)
    base, a, b = make_trio(tmp_path)
    prep = prepare([a, b], base, tmp_path / "out", {"method": "ties", "seed": 1}, Options())
    d = dryrun.describe(prep, layout_for(prep, CPU))
    assert d["compile_seconds"] == backends.COMPILE_S
    assert d["expected_seconds"] is None or d["expected_seconds"] >= backends.COMPILE_S
    assert "to compile the CPU kernels" in d["expected_note"]
