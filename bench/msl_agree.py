"""Multi-SLERP agreement with mergekit 0.1.5 (docs/SPEC.md "Multi-SLERP", "Where it differs").

    python bench/msl_agree.py make DIR   # the bf16 trio (bench/sce_agree.py's) and 8 recipes
    for r in DIR/msl_*.yml: mergekit-yaml $r DIR/mk_NAME --lazy-unpickle -j 1;
                            streammerge --config $r -o DIR/sm_NAME
    python bench/mergekit_agree.py --pair NAME DIR/mk_NAME DIR/sm_NAME ...

Recipes: three fine-tunes (weights 0.5, 0.3, 0.2) or two (0.6, 0.4), with and without
``base_model``, ``dtype: bfloat16`` or ``dtype: float32``.
"""

import os
import sys

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


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(os.path.abspath(sys.argv[2]))
