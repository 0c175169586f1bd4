"""LoRA adapters as inputs (docs/SPEC.md "LoRA inputs (v3)"): ``MODEL+ADAPTER`` anywhere a
model is taken, and ``streammerge apply-lora``. Outputs against the SPEC oracle byte for
byte, whatever the chunking; a merge with an adapted input against apply-lora then the same
merge; refusals in one line; resume noticing a changed adapter; PEFT's merge_and_unload
(when peft is installed)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import spec_reference as ref
import torch
from conftest import as_numpy, fail_after, load_dir, output_bytes, run_cli
from safetensors.torch import save_file

import streammerge
from streammerge.api_types import Options
from streammerge.errors import MergeError
from streammerge.io.inputs import open_input
from streammerge.io.lora import split_reference
from streammerge.io.lora_delta import AdaptedTensorInfo, adapt_range
from streammerge.jobs.apply_lora import apply_lora

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
H, I, V, KV, LAYERS = 32, 48, 40, 16, 2
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
          "intermediate_size": I, "num_attention_heads": 4, "num_key_value_heads": 2,
          "num_hidden_layers": LAYERS, "vocab_size": V, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": False, "max_position_embeddings": 64}  # fmt: skip


def llama_shapes(h: int = H, i: int = I) -> dict[str, tuple]:
    """Tensor name -> shape of a tiny Llama (2 layers, GQA)."""
    s = {"model.embed_tokens.weight": (V, h), "model.norm.weight": (h,), "lm_head.weight": (V, h)}
    for k in range(LAYERS):
        p = f"model.layers.{k}."
        s.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (KV, h),
                  p + "self_attn.v_proj.weight": (KV, h), p + "self_attn.o_proj.weight": (h, h),
                  p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                  p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                  p + "post_attention_layernorm.weight": (h,)})  # fmt: skip
    return s


def make_model(root: Path, dtype: str = "BF16", seed: int = 0, shapes=None) -> Path:
    """A tiny Llama-shaped HF directory (one safetensors file, a config.json)."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or llama_shapes()
    ts = {n: (torch.randn(s, generator=g) * 0.05).to(TORCH[dtype]) for n, s in shapes.items()}
    root.mkdir(parents=True)
    save_file(ts, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(
        json.dumps({**CONFIG, "dtype": str(TORCH[dtype]).removeprefix("torch.")})
    )
    return root


def make_adapter(root: Path, model: Path, targets=("q_proj", "v_proj", "down_proj"), r: int = 4,
                 alpha: float = 8, dtype: str = "F32", seed: int = 1, **cfg) -> Path:  # fmt: skip
    """A PEFT-format LoRA adapter of ``model`` (adapter_config.json and
    adapter_model.safetensors written here, as PEFT's save_pretrained lays them out)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {n: t.shape for n, t in load_dir(model).items()}
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets),
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "bias": "none",
              "lora_bias": False, "modules_to_save": None, "rank_pattern": {},
              "alpha_pattern": {}, "task_type": "CAUSAL_LM", "inference_mode": True,
              "base_model_name_or_path": str(model), **cfg}  # fmt: skip
    weights = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if len(shape) != 2 or module.rsplit(".", 1)[-1] not in targets:
            continue
        rk, _ = ref.spec_lora_rank_scale(config, module)
        out_f, in_f = shape[::-1] if config["fan_in_fan_out"] else shape
        key = f"base_model.model.{module}"
        weights[key + ".lora_A.weight"] = (torch.randn(rk, in_f, generator=g) * 0.2).to(
            TORCH[dtype]
        )
        weights[key + ".lora_B.weight"] = (torch.randn(out_f, rk, generator=g) * 0.2).to(
            TORCH[dtype]
        )
    root.mkdir(parents=True)
    save_file(weights, str(root / "adapter_model.safetensors"), metadata={"format": "pt"})
    (root / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return root


def oracle(model: Path, adapter: Path) -> dict[str, np.ndarray]:
    """Every tensor of MODEL+ADAPTER by the SPEC oracle: name -> uint8 bytes."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    lora = {k: v.float().numpy() for k, v in load_dir(adapter).items()}
    out = {}
    for name, t in load_dir(model).items():
        w = as_numpy(t)
        key = "base_model.model." + name.removesuffix(".weight")
        if key + ".lora_A.weight" in lora:
            _, scale = ref.spec_lora_rank_scale(cfg, name.removesuffix(".weight"))
            dtype = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[t.dtype]
            w = ref.spec_lora(w.reshape(t.shape), dtype, lora[key + ".lora_A.weight"],
                              lora[key + ".lora_B.weight"], scale,
                              bool(cfg.get("fan_in_fan_out"))).reshape(-1)  # fmt: skip
        out[name] = np.ascontiguousarray(w).view(np.uint8)
    return out


def test_oracle_is_exact_where_float32_is(tmp_path):
    """The oracle on small integers (every product, sum and the result exact in float32 and
    bf16) equals W + scale * (B @ A) in float64; with fan_in_fan_out, (B @ A)^T."""
    rng = np.random.default_rng(0)
    a = rng.integers(-4, 5, (3, 6)).astype(np.float32)
    b = rng.integers(-4, 5, (5, 3)).astype(np.float32)
    w = rng.integers(-64, 65, (5, 6)).astype(np.float32)
    bits = ref.from_float32(w, "BF16")
    got = ref.to_float32(ref.spec_lora(bits, "BF16", a, b, 0.5), "BF16")
    assert np.array_equal(got, w + 0.5 * (b.astype(np.float64) @ a))
    got = ref.to_float32(ref.spec_lora(bits.T.copy(), "BF16", a, b, 2.0, True), "BF16")
    assert np.array_equal(got, w.T + 2.0 * (b.astype(np.float64) @ a).T)
    cfg = {"r": 8, "lora_alpha": 16, "rank_pattern": {"v_proj": 2, r"layers\.1\..*": 4},
           "alpha_pattern": {"q_proj": 3}}  # fmt: skip
    assert ref.spec_lora_rank_scale(cfg, "model.layers.0.self_attn.v_proj") == (2, 8.0)
    assert ref.spec_lora_rank_scale(cfg, "model.layers.1.self_attn.q_proj") == (4, 0.75)
    assert ref.spec_lora_rank_scale(cfg, "model.layers.0.self_attn.xv_proj") == (8, 2.0)
    assert ref.spec_lora_rank_scale({**cfg, "use_rslora": True}, "a.k_proj") == (8, 16 / 8**0.5)


def _same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        assert np.array_equal(got[name], value), name


@pytest.mark.parametrize(
    "dtype,adapter_dtype,cfg",
    [
        ("BF16", "F32", {}),
        ("BF16", "BF16", {"use_rslora": True, "r": 8, "lora_alpha": 3}),
        ("F16", "F16", {"rank_pattern": {"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                        "alpha_pattern": {"down_proj": 5}}),
        ("F32", "F32", {"fan_in_fan_out": True}),
    ],
)  # fmt: skip
def test_apply_lora_equals_the_oracle(tmp_path, dtype, adapter_dtype, cfg):
    shapes = llama_shapes()
    if cfg.get("fan_in_fan_out"):  # GPT-2 Conv1D layout: weights stored [in, out]
        shapes = {n: (s[::-1] if len(s) == 2 and "layers" in n else s) for n, s in shapes.items()}
    model = make_model(tmp_path / "m", dtype, shapes=shapes)
    adapter = make_adapter(tmp_path / "lora", model, dtype=adapter_dtype, **cfg)
    s = apply_lora(f"{model}+{adapter}", tmp_path / "out")
    assert s.bytes_read > 0
    _same(output_bytes(tmp_path / "out"), oracle(model, adapter))
    rec = json.loads((tmp_path / "out" / "streammerge.json").read_text())
    assert rec["base"]["adapter"]["path"] == str(adapter.resolve())
    assert rec["apply_lora"]["adapter"] == rec["base"]["adapter"]
    assert "LoRA adapter `lora` merged" in (tmp_path / "out" / "README.md").read_text()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["hidden_size"] == H


def test_adapted_bytes_do_not_depend_on_the_cut(tmp_path, monkeypatch):
    """adapt_range over any cut of W (mid-row included) gives the whole tensor's bytes, so
    do adapt_jobs' pieces on a thread pool; and apply-lora with --memory 1MiB (many chunks)
    equals the default run."""
    from concurrent.futures import ThreadPoolExecutor

    from streammerge.io import lora_delta

    shapes = {"model.layers.0.mlp.down_proj.weight": (512, 1024), "model.norm.weight": (8,)}
    model = make_model(tmp_path / "m", "BF16", shapes=shapes)
    adapter = make_adapter(tmp_path / "lora", model, targets=("down_proj",), r=16)
    m = open_input(f"{model}+{adapter}")
    info = m.tensors["model.layers.0.mlp.down_proj.weight"]
    assert isinstance(info, AdaptedTensorInfo)
    raw = as_numpy(load_dir(model)[info.name]).view(np.uint8)
    whole = raw.copy()
    adapt_range(info, 0, whole)
    rng = np.random.default_rng(0)
    cuts = np.unique(np.r_[0, rng.integers(1, info.numel, 7), info.numel]) * 2
    for lo, hi in itertools.pairwise(cuts):
        part = raw[lo:hi].copy()
        adapt_range(info, int(lo), part)
        assert np.array_equal(part, whole[lo:hi])
    want = oracle(model, adapter)
    assert np.array_equal(whole, want[info.name])
    monkeypatch.setattr(lora_delta, "PIECE_ELEMS", 3000)  # pieces of 2 rows
    pieced = raw.copy()
    with ThreadPoolExecutor(4) as pool:
        lora_delta.adapt_jobs([(info, 2, len(raw) - 2, pieced[2:])], pool)
    assert np.array_equal(pieced[2:], whole[2:])
    apply_lora(f"{model}+{adapter}", tmp_path / "small",
                           Options(memory="1MiB"))  # fmt: skip
    apply_lora(f"{model}+{adapter}", tmp_path / "big")
    _same(output_bytes(tmp_path / "small"), want)
    _same(output_bytes(tmp_path / "big"), want)


def test_merge_with_an_adapted_input_equals_apply_then_merge(tmp_path):
    base = make_model(tmp_path / "base", seed=0)
    ft = make_model(tmp_path / "ft", seed=2)
    adapter = make_adapter(tmp_path / "lora", base)
    kw = {"method": "ties", "density": 0.5, "weights": [0.7, 0.4], "seed": 3}
    streammerge.merge([f"{base}+{adapter}", ft], base, tmp_path / "direct", memory="16MiB", **kw)
    apply_lora(f"{base}+{adapter}", tmp_path / "applied")
    streammerge.merge([tmp_path / "applied", ft], base, tmp_path / "twostep", **kw)
    _same(output_bytes(tmp_path / "direct"), output_bytes(tmp_path / "twostep"))
    rec = json.loads((tmp_path / "direct" / "streammerge.json").read_text())
    assert rec["models"][0]["adapter"]["fingerprint"]
    assert "adapter" not in rec["models"][1]


def test_cli_and_yaml_take_model_plus_adapter(tmp_path):
    base = make_model(tmp_path / "base", seed=0)
    ft = make_model(tmp_path / "ft", seed=2)
    adapter = make_adapter(tmp_path / "lora", base)
    p = run_cli(["apply-lora", f"{base}+{adapter}", "-o", str(tmp_path / "applied")])
    assert p.returncode == 0, p.stderr
    _same(output_bytes(tmp_path / "applied"), oracle(base, adapter))
    # --base MODEL+ADAPTER on the CLI, and model: / base_model: relative to a recipe
    p = run_cli([str(ft), str(tmp_path / "applied"), "--base", f"{base}+{adapter}", "--method",
                 "task_arithmetic", "--weights", "0.5,0.5", "-o", str(tmp_path / "cli")])  # fmt: skip
    assert p.returncode == 0, p.stderr
    p = run_cli([str(ft), f"{base}+{adapter}", "--base", str(base), "--plan", "-o",
                 str(tmp_path / "plan")])  # fmt: skip
    assert p.returncode == 0 and f"model 1: {base.resolve()}+{adapter.resolve()}" in p.stdout
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: task_arithmetic\nbase_model: base+lora\nmodels:\n"
                      "  - model: ft\n    parameters: {weight: 0.5}\n"
                      "  - model: applied\n    parameters: {weight: 0.5}\n")  # fmt: skip
    p = run_cli(["--config", str(recipe), "-o", str(tmp_path / "yaml")], cwd="/")
    assert p.returncode == 0, p.stderr
    _same(output_bytes(tmp_path / "yaml"), output_bytes(tmp_path / "cli"))


def test_split_rule_keeps_plus_in_directory_names(tmp_path):
    plus = make_model(tmp_path / "m+v2")
    adapter = make_adapter(tmp_path / "a+b", plus)
    assert split_reference(str(plus), lambda r: Path(r).is_dir()) == (
        str(plus),
        None,
    )  # a directory: plain
    got = split_reference(f"{plus}+{adapter}", lambda r: Path(r).is_dir())
    assert got == (str(plus), adapter)
    m = open_input(f"{plus}+{adapter}")
    assert m.adapter["path"] == str(adapter.resolve())
    with pytest.raises(MergeError, match="no adapter folder"):
        split_reference(f"{plus}+missing", lambda r: Path(r).is_dir())


def _refused(tmp_path, ref: str, match: str) -> None:
    out = tmp_path / "out"
    p = run_cli(["apply-lora", ref, "-o", str(out)])
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], p.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda a, cfg, w: cfg.update(use_dora=True), "use_dora"),
        (lambda a, cfg, w: cfg.update(modules_to_save=["lm_head"]), "modules_to_save"),
        (lambda a, cfg, w: cfg.update(peft_type="IA3"), "peft_type"),
        (lambda a, cfg, w: cfg.update(init_lora_weights="mica"), "init_lora_weights"),
        (lambda a, cfg, w: cfg.update(kasa_config={"k": 1}), "kasa_config"),
        (lambda a, cfg, w: (a / "adapter_model.safetensors").unlink(), "no adapter_model"),
        (lambda a, cfg, w: cfg.update(r=5), "do not fit"),
        (lambda a, cfg, w: w.update({"base_model.model.model.layers.7.mlp.up_proj.lora_A.weight":
                                     torch.zeros(4, H), "base_model.model.model.layers.7.mlp."
                                     "up_proj.lora_B.weight": torch.zeros(I, 4)}), "lacks"),
        (lambda a, cfg, w: w.update({"base_model.model.model.embed_tokens.lora_embedding_A":
                                     torch.zeros(4, V)}), "not a LoRA A/B"),
    ],
)  # fmt: skip
def test_refusals_are_one_line_before_anything_is_written(tmp_path, edit, match):
    model = make_model(tmp_path / "m")
    adapter = make_adapter(tmp_path / "lora", model)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    weights = dict(load_dir(adapter))
    edit(adapter, cfg, weights)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    if (adapter / "adapter_model.safetensors").exists():
        save_file(weights, str(adapter / "adapter_model.safetensors"))
    _refused(tmp_path, f"{model}+{adapter}", match)


def test_shape_mismatch_with_another_model_is_refused(tmp_path):
    model = make_model(tmp_path / "m")
    other = make_model(tmp_path / "wide", shapes=llama_shapes(h=H, i=I + 8))
    adapter = make_adapter(tmp_path / "lora", other)
    _refused(tmp_path, f"{model}+{adapter}", "do not fit")


def test_resume_notices_a_changed_adapter(tmp_path):
    shapes = {f"model.layers.{k}.mlp.down_proj.weight": (256, 512) for k in range(4)}
    base = make_model(tmp_path / "base", shapes=shapes)
    ft = make_model(tmp_path / "ft", seed=2, shapes=shapes)
    adapter = make_adapter(tmp_path / "lora", base, targets=("down_proj",))
    kw = {"method": "task_arithmetic", "weights": [0.5, 0.5], "shard_size": "300KB"}
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        streammerge.merge([f"{base}+{adapter}", ft], base, out,
                          on_bytes=fail_after(2_000_000, KeyboardInterrupt(), out), **kw)  # fmt: skip
    text = (adapter / "adapter_config.json").read_text()
    cfg = json.loads(text)
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 16}))
    with pytest.raises(MergeError, match="LoRA adapter of input 0 changed"):
        streammerge.merge([f"{base}+{adapter}", ft], base, out, resume=True, **kw)
    (adapter / "adapter_config.json").write_text(text)
    s = streammerge.merge([f"{base}+{adapter}", ft], base, out, resume=True, **kw)
    assert s.resumed_shards > 0


def test_against_peft_merge_and_unload(tmp_path):
    """Real PEFT (when installed): every element within 1 bf16 ulp, >= 99.9% identical."""
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    model = make_model(tmp_path / "m", shapes=llama_shapes(h=64, i=96))
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64,
                                                   "intermediate_size": 96,
                                                   "num_key_value_heads": 1}))  # fmt: skip
    adapter = make_adapter(tmp_path / "lora", model, r=16, alpha=32)
    apply_lora(f"{model}+{adapter}", tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(model)
    merged = PeftModel.from_pretrained(hf, adapter).merge_and_unload().state_dict()
    got = load_dir(tmp_path / "out")
    total = same = 0
    for name, t in got.items():
        a = t.view(torch.int16).numpy().astype(np.int32)
        b = merged[name].contiguous().view(torch.int16).numpy().astype(np.int32)
        assert np.abs(a - b).max() <= 1, name  # same sign: 1 ulp is 1 in the bits
        total, same = total + a.size, same + int((a == b).sum())
    assert same / total >= 0.999


def test_device_path_reads_adapted_rows(tmp_path):
    """The GPU backend takes rows from where their O_DIRECT reads landed; an adapted row is
    rewritten in place first. On fake CUDA streams (``ThreadQueue``, numba kernels) a merge
    with an adapted fine-tune gives numba's bytes."""
    from streammerge.api import execute, finalize, prepare
    from streammerge.exec import gpu
    from streammerge.exec.gpu import DeviceBackend
    from streammerge.exec.threadqueue import NumbaLauncher, ThreadQueue

    shapes = {f"model.layers.{k}.mlp.down_proj.weight": (256, 1024) for k in range(2)}
    base = make_model(tmp_path / "base", shapes=shapes)
    ft = make_model(tmp_path / "ft", seed=2, shapes=shapes)
    adapter = make_adapter(tmp_path / "lora", base, targets=("down_proj",), r=8)
    recipe = {"method": "ties", "density": 0.4, "seed": 5, "lam": 0.3}
    streammerge.merge([f"{base}+{adapter}", ft], base, tmp_path / "cpu", backend="numba",
                      device="cpu", **recipe)  # fmt: skip
    q = ThreadQueue(seed=1, max_delay_s=0.0003)
    prep = prepare([f"{base}+{adapter}", ft], base, tmp_path / "dev", recipe,
                   Options(memory="32MiB"))  # fmt: skip
    backend = DeviceBackend(q, NumbaLauncher(), gpu.device_stats_bytes(2) + 2**20)
    finalize(prep, execute(prep, backend))
    q.shutdown()
    _same(output_bytes(tmp_path / "dev"), output_bytes(tmp_path / "cpu"))


def test_model_by_url_with_a_local_adapter(tmp_path):
    """``https://.../model+/local/adapter``: the model's rows come by ranged requests and are
    adapted as they arrive; the bytes equal the local run's."""
    from test_remote import RangeServer

    model = make_model(tmp_path / "data" / "m")
    adapter = make_adapter(tmp_path / "lora", model)
    srv = RangeServer(tmp_path / "data")
    try:
        apply_lora(f"{srv.url}/m+{adapter}", tmp_path / "remote")
        assert srv.weight_ranges()
    finally:
        srv.close()
    _same(output_bytes(tmp_path / "remote"), oracle(model, adapter))
    rec = json.loads((tmp_path / "remote" / "streammerge.json").read_text())
    assert rec["base"]["url"] == f"{srv.url}/m" and rec["base"]["adapter"]["fingerprint"]
