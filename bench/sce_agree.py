"""SCE agreement with mergekit 0.1.5 (docs/SPEC.md "SCE", "Measured agreement").

    python bench/sce_agree.py make DIR       # the bf16 trio and the recipes (select_topk 1.0, 0.5, 0.1)
    (mergekit-yaml DIR/sce_T.yml DIR/mk_T --lazy-unpickle -j 1; streammerge --config DIR/sce_T.yml -o DIR/sm_T)
    python bench/mergekit_agree.py --pair "sce T" DIR/mk_T DIR/sm_T
    python bench/sce_agree.py explain DIR T  # are all differing elements at a variance tie?
"""

import glob, json, os, sys

import numpy as np
import torch
from safetensors.torch import load_file as _lf, save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import spec_reference as ref  # noqa: E402


def make(root):
    H, I, L, V = 256, 688, 4, 1000
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
           "intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": 4,
           "num_key_value_heads": 4, "vocab_size": V, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 512, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for l in range(L):
        p = f"model.layers.{l}."
        for n in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{n}_proj.weight"] = (H, H)
        shapes[p + "mlp.gate_proj.weight"] = (I, H); shapes[p + "mlp.up_proj.weight"] = (I, H)
        shapes[p + "mlp.down_proj.weight"] = (H, I)
        shapes[p + "input_layernorm.weight"] = (H,); shapes[p + "post_attention_layernorm.weight"] = (H,)
    base = {k: (torch.randn(s, generator=g) * 0.02 + (1.0 if len(s) == 1 else 0.0)) for k, s in shapes.items()}
    def save(name, tensors):
        d = os.path.join(root, name); os.makedirs(d, exist_ok=True)
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    save("base", base)
    for j, name in enumerate(("a", "b", "c")):
        save(name, {k: v + torch.randn(v.shape, generator=g) * (0.02 * v.std() if v.numel() > 1 else 0.02) * (1 + 0.5 * j) for k, v in base.items()})
    for topk in ("1.0", "0.5", "0.1"):
        open(os.path.join(root, f"sce_{topk}.yml"), "w").write(
            f"merge_method: sce\nbase_model: {root}/base\nmodels:\n  - model: {root}/a\n  - model: {root}/b\n  - model: {root}/c\n"
            f"parameters:\n  select_topk: {topk}\n")


def _load(d):
    out = {}
    for f in glob.glob(f"{d}/*.safetensors"):
        out.update({k: v.view(torch.int16).numpy().view(np.uint16) for k, v in _lf(f).items()})
    return out


def explain(root, topk):
    base, ms = _load(f"{root}/base"), [_load(f"{root}/{x}") for x in "abc"]
    mk, sm = _load(f"{root}/mk_{topk}"), _load(f"{root}/sm_{topk}")
    tot = diff = tie = other = 0
    for name, b in base.items():
        rows = [b.reshape(-1)] + [m[name].reshape(-1) for m in ms]
        d = mk[name].reshape(-1) != sm[name].reshape(-1)
        _, _, tv = ref._spec_sce_vectors(rows[0], rows[1:], ["BF16"] * 4)
        keys = ref.spec_sce_var_keys(tv, "BF16")
        _, t = ref.spec_sce_threshold(keys, float(topk))
        tot, diff, tie = tot + d.size, diff + d.sum(), tie + (d & (keys == t)).sum()
        other += bool((d & (keys != t)).any())
    print(f"select_topk {topk}: {tot} elements, {diff} differ, {tie} at a variance tie, "
          f"{other} tensors with other differences")


if __name__ == "__main__":
    make(sys.argv[2]) if sys.argv[1] == "make" else explain(sys.argv[2], sys.argv[3])
