"""streammerge apply-lora vs PEFT's merge_and_unload, bit by bit (docs/SPEC.md "LoRA inputs
(v3)"). Needs torch, transformers and peft importable (not project dependencies).

Builds a small Llama (hidden 1024, MLP 2816, 2 layers) in each model dtype and PEFT
adapters on all seven linear modules (plain, rsLoRA with a bf16 adapter, rank/alpha
patterns), merges each with both, and prints per case: elements compared, % identical,
% within 1 ulp of the model dtype, the count beyond 1 ulp, the largest ulp distance.
Elements far apart in ulps are results near zero after cancellation (W + delta ~ 0), where
an absolute difference of a few float32 ulps of delta is many ulps of the result.

    PYTHONPATH=.:PEFT_SITE python bench/lora_peft_agree.py [WORKDIR]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

H, I, V, LAYERS, HEADS, KV_HEADS = 1024, 2816, 512, 2, 16, 4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def make_model(root: Path, dtype: str) -> None:
    g = torch.Generator().manual_seed(0)
    kv = H // HEADS * KV_HEADS
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,),
              "lm_head.weight": (V, H)}  # fmt: skip
    for k in range(LAYERS):
        p = f"model.layers.{k}."
        shapes.update({p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (kv, H),
                       p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, H),
                       p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                       p + "mlp.down_proj.weight": (H, I), p + "input_layernorm.weight": (H,),
                       p + "post_attention_layernorm.weight": (H,)})  # fmt: skip
    ts = {n: (torch.randn(s, generator=g) * 0.02).to(TORCH[dtype]) for n, s in shapes.items()}
    root.mkdir(parents=True)
    save_file(ts, str(root / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
           "intermediate_size": I, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
           "num_hidden_layers": LAYERS, "vocab_size": V, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "dtype": str(TORCH[dtype]).removeprefix("torch.")}  # fmt: skip
    (root / "config.json").write_text(json.dumps(cfg))


def make_adapter(root: Path, model: Path, r: int, alpha: float, dtype: str, **cfg) -> None:
    import re

    g = torch.Generator().manual_seed(1)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(TARGETS),
              "bias": "none", "use_dora": False, "fan_in_fan_out": False, "rank_pattern": {},
              "alpha_pattern": {}, "task_type": "CAUSAL_LM", **cfg}  # fmt: skip
    weights = {}
    for name, t in load_file(str(model / "model.safetensors")).items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        rk = next((v for k, v in config["rank_pattern"].items()
                   if re.match(rf"(.*\.)?({k})$", module)), r)  # fmt: skip
        out_f, in_f = t.shape
        key = f"base_model.model.{module}"
        weights[key + ".lora_A.weight"] = (torch.randn(rk, in_f, generator=g) / in_f**0.5).to(
            TORCH[dtype]
        )
        weights[key + ".lora_B.weight"] = (torch.randn(out_f, rk, generator=g) * 0.01).to(
            TORCH[dtype]
        )
    root.mkdir(parents=True)
    save_file(weights, str(root / "adapter_model.safetensors"), metadata={"format": "pt"})
    (root / "adapter_config.json").write_text(json.dumps(config))


def peft_merge(model: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model)
    return PeftModel.from_pretrained(hf, adapter).merge_and_unload().state_dict()


def agreement(ours: dict, theirs: dict) -> dict:
    total = same = within = worst = 0
    for name, t in ours.items():
        u = theirs[name].contiguous()
        assert u.dtype == t.dtype, name
        a = t.view(INT[t.dtype]).numpy().astype(np.int64)
        b = u.view(INT[t.dtype]).numpy().astype(np.int64)
        sign = np.int64(1) << (8 * t.element_size() - 1)
        a = np.where(a < 0, -(a + sign), a)  # ordered: ulp distance = integer distance
        b = np.where(b < 0, -(b + sign), b)
        d = np.abs(a - b)
        total, same = total + d.size, same + int((d == 0).sum())
        within, worst = within + int((d <= 1).sum()), max(worst, int(d.max()))
    return {"elements": total, "identical_pct": 100 * same / total,
            "within_1ulp_pct": 100 * within / total, "beyond_1ulp": total - within,
            "max_ulp": worst}  # fmt: skip


def main() -> None:
    from streammerge.jobs.apply_lora import apply_lora

    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    cases = [
        ("BF16", "plain r16 a32, f32 adapter", {"r": 16, "alpha": 32, "dtype": "F32"}),
        ("BF16", "rslora r64 a16, bf16 adapter",
         {"r": 64, "alpha": 16, "dtype": "BF16", "use_rslora": True}),
        ("BF16", "rank/alpha patterns",
         {"r": 8, "alpha": 16, "dtype": "F32", "rank_pattern": {"down_proj": 32},
          "alpha_pattern": {r"layers\.1\..*": 7}}),
        ("F16", "plain r16 a32, f16 adapter", {"r": 16, "alpha": 32, "dtype": "F16"}),
        ("F32", "plain r16 a32, f32 adapter", {"r": 16, "alpha": 32, "dtype": "F32"}),
    ]  # fmt: skip
    print("| model | adapter | elements | identical % | within 1 ulp % | > 1 ulp | max ulp |")
    print("|---|---|---|---|---|---|---|")
    for k, (dtype, label, kw) in enumerate(cases):
        model, adapter, out = work / f"m{k}", work / f"a{k}", work / f"o{k}"
        make_model(model, dtype)
        make_adapter(adapter, model, **kw)
        apply_lora(f"{model}+{adapter}", out)
        ours = load_file(str(out / "model.safetensors")) if (out / "model.safetensors").exists() \
            else {n: t for f in sorted(out.glob("*.safetensors")) for n, t in load_file(str(f)).items()}  # fmt: skip
        r = agreement(ours, peft_merge(model, adapter))
        print(f"| {dtype} | {label} | {r['elements']} | {r['identical_pct']:.4f} | "
              f"{r['within_1ulp_pct']:.4f} | {r['beyond_1ulp']} | {r['max_ulp']} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
