"""Multi-SLERP agreement with mergekit 0.1.5 (docs/SPEC.md "Multi-SLERP", "Where it differs").

    python bench/msl_agree.py make DIR   # the bf16 trio (bench/sce_agree.py's) and 8 recipes
    for r in DIR/msl_*.yml: mergekit-yaml $r DIR/mk_NAME --lazy-unpickle -j 1;
                            streammerge --config $r -o DIR/sm_NAME
    python bench/mergekit_agree.py --pair NAME DIR/mk_NAME DIR/sm_NAME ...
    python bench/msl_agree.py ulps DIR   # distances in bf16 ulps (float32 outputs too)

Recipes: three fine-tunes (weights 0.5, 0.3, 0.2) or two (0.6, 0.4), with and without
``base_model``, ``dtype: bfloat16`` or ``dtype: float32``.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import sce_agree  # noqa: E402

RECIPES = {}
for n, ws in (("trio", (0.5, 0.3, 0.2)), ("pair", (0.6, 0.4))):
    for base in (True, False):
        for dt in ("bfloat16", "float32"):
            RECIPES[f"{n}_{'base' if base else 'nobase'}_{dt}"] = (ws, base, dt)


def make(root):
    sce_agree.make(root)
    for name, (ws, base, dt) in RECIPES.items():
        lines = ["merge_method: multislerp"] + ([f"base_model: {root}/base"] if base else [])
        lines.append("models:")
        for m, w in zip("abc", ws):
            lines += [f"  - model: {root}/{m}", "    parameters:", f"      weight: {w}"]
        lines.append(f"dtype: {dt}")
        open(os.path.join(root, f"msl_{name}.yml"), "w").write("\n".join(lines) + "\n")




def bf16_ulps(root):
    """For each recipe: the share of elements within 1 bf16 ulp and the largest distance in
    bf16 ulps (|mk - sm| over the bf16 spacing at max(|mk|, |sm|); a float32 output too)."""
    import glob

    from safetensors.torch import load_file

    def load(d):
        out = {}
        for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
            for k, v in load_file(f).items():
                if v.is_floating_point():
                    out[k] = v.double().numpy().reshape(-1)
        return out

    print("| recipe | bit-equal | <= 1 bf16 ulp | max bf16 ulp |")
    print("|---|---|---|---|")
    for name in RECIPES:
        mk, sm = load(os.path.join(root, f"mk_{name}")), load(os.path.join(root, f"sm_{name}"))
        tot = eq = near = 0
        worst = 0.0
        for k, a in mk.items():
            b = sm[k]
            m = np.maximum(np.abs(a), np.abs(b))
            e = np.floor(np.log2(np.where(m > 0, m, 1.0)))
            ulp = np.exp2(np.maximum(e, -126) - 7)
            d = np.abs(a - b) / ulp
            tot += a.size
            eq += int(np.sum(a == b))
            near += int(np.sum(d <= 1))
            worst = max(worst, float(d.max()))
        print(f"| {name} | {eq / tot:.6f} | {near / tot:.6f} | {worst:.3g} |")


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(os.path.abspath(sys.argv[2]))
    elif sys.argv[1] == "ulps":
        bf16_ulps(os.path.abspath(sys.argv[2]))
