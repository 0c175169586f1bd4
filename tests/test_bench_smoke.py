"""Smoke test of the benchmark tools in bench/: the synthetic Llama trio, the naive merge,
and the bench_merge harness (floor, naive and streammerge rows; no timing assertions)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors import safe_open

BENCH = Path(__file__).resolve().parent.parent / "bench"
ROLES = ("base", "a", "b")


def _load(name: str):
    """Import ``bench/<name>.py`` (bench/ is not a package)."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules[key]


def _read_model(d: Path) -> tuple[dict, dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    """(index, name -> (dtype, shape)) of an HF directory, opening every shard."""
    index = json.loads((d / "model.safetensors.index.json").read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(d / fname), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for k in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                t = f.get_tensor(k)
                assert index["weight_map"][k] == fname
                out[k] = (t.dtype, tuple(t.shape))
    return index, out


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> Path:
    ms = _load("make_synthetic")
    out = tmp_path_factory.mktemp("trio")
    ms.make_trio(out, size_gb=0.005, seed=3, quiet=True)
    return out


def test_make_synthetic_llama_trio(trio: Path) -> None:
    cfg = json.loads((trio / "base" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    assert kv < h  # grouped key/value heads
    expect = {
        "model.embed_tokens.weight": (cfg["vocab_size"], h),
        "model.norm.weight": (h,),
        "lm_head.weight": (cfg["vocab_size"], h),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        expect |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    layouts = []
    for role in ROLES:
        index, tensors = _read_model(trio / role)
        assert {k: s for k, (_, s) in tensors.items()} == expect
        assert {d for d, _ in tensors.values()} == {torch.bfloat16}
        nbytes = sum(torch.Size(s).numel() * 2 for s in expect.values())
        assert index["metadata"]["total_size"] == nbytes
        shards = set(index["weight_map"].values())
        assert len(shards) >= 2
        layouts.append(tuple(sorted(index["weight_map"].items())))
    assert len(set(layouts)) == 3  # sharded differently

    # fine-tune-like: small deltas, norms near 1; deterministic given the seed
    def get(role: str, name: str) -> torch.Tensor:
        index = json.loads((trio / role / "model.safetensors.index.json").read_text())
        with safe_open(str(trio / role / index["weight_map"][name]), "pt") as f:
            return f.get_tensor(name).float()

    name = "model.layers.0.mlp.up_proj.weight"
    base, a = get("base", name), get("a", name)
    assert 0.015 < base.std().item() < 0.025
    assert 0.0015 < (a - base).std().item() < 0.0025
    assert abs(get("base", "model.norm.weight").mean().item() - 1) < 0.01


def test_make_synthetic_deterministic(trio: Path, tmp_path: Path) -> None:
    ms = _load("make_synthetic")
    ms.make_trio(tmp_path, size_gb=0.005, seed=3, quiet=True)
    for role in ROLES:
        for f in sorted((trio / role).glob("model-*.safetensors")):
            assert (tmp_path / role / f.name).read_bytes() == f.read_bytes()


def _tensor(d: Path, name: str) -> torch.Tensor:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    with safe_open(str(d / index["weight_map"][name]), "pt") as f:
        return f.get_tensor(name)


@pytest.fixture
def one_thread():
    """One torch thread: spin-waiting OpenMP threads crawl when another job holds a core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_naive_merge(trio: Path, tmp_path: Path, one_thread) -> None:
    nm = _load("naive_merge")
    argv = [str(trio / "a"), str(trio / "b"), "--base", str(trio / "base")]
    out = tmp_path / "out"
    assert nm.main([*argv, "-o", str(out), "--lam", "0.6", "--drop", "0.5",
                    "--max-shard-gb", "0.002"]) == 0  # fmt: skip
    _, want = _read_model(trio / "base")
    index, got = _read_model(out)
    assert got == want  # every tensor, same dtypes and shapes
    assert len(set(index["weight_map"].values())) >= 2
    assert (out / "config.json").exists()
    name = "model.layers.0.mlp.up_proj.weight"
    base, a, b = (_tensor(trio / r, name).float() for r in ROLES)
    # DARE at p = 0.5 leaves the base where both models' deltas were dropped (~1/4)
    zero = (_tensor(out, name).float() == base).float().mean().item()
    assert 0.15 < zero < 0.4

    # without drops it is exactly base + 0.6 (a - base) + 0.4 (b - base), float32 math
    out0 = tmp_path / "out0"
    assert nm.main([*argv, "-o", str(out0), "--lam", "0.6", "--drop", "0"]) == 0
    assert (out0 / "model.safetensors").exists()  # one shard by default at this size
    want0 = (base + (0.6 * (a - base) + 0.4 * (b - base))).to(torch.bfloat16)
    assert torch.equal(_tensor(out0, name), want0)


def test_bench_merge_smoke(tmp_path: Path) -> None:
    results = tmp_path / "results"
    cli = Path(sys.executable).parent / "streammerge"
    cmd = [sys.executable, str(BENCH / "bench_merge.py"), "--smoke", "--only", "floor,naive,streammerge",
           "--data", str(tmp_path / "trio"), "--results", str(results), "--streammerge-bin", str(cli),
           "--no-drop-caches", "--settle", "0"]  # fmt: skip
    # PASSIVE: OpenMP threads that spin-wait crawl when another job holds the other core
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    with open(results / "bench_merge.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["contender"] for r in rows] == [
        "floor-buffered",
        "floor-direct",
        "naive",
        "streammerge",
    ]
    assert rows[0]["status"] == "ok", rows
    # O_DIRECT may be refused where the temporary directory is a tmpfs
    assert rows[1]["status"] == "ok" or rows[1]["status"].startswith("O_DIRECT refused"), rows
    assert rows[2]["status"] == "ok", rows
    naive, ours = rows[2], rows[3]
    assert ours["status"] == "ok" and ours["output_check"] == "ok", rows
    assert float(ours["peak_rss_mib"]) > 0 and float(naive["streammerge_ratio"]) > 0
    assert naive["output_check"] == "ok"
    assert float(naive["peak_rss_mib"]) > 0 and float(naive["wall_s"]) > 0
    assert "| naive |" in (results / "README.md").read_text()
    assert not (tmp_path / "trio" / "out-naive").exists()  # outputs are deleted
    assert not (tmp_path / "trio" / "out-streammerge").exists()
    shutil.rmtree(tmp_path / "trio")  # 150 MB; pytest keeps the last few tmp dirs
