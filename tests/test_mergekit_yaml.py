"""mergekit YAML recipes: mergekit's per-tensor resolution (gradients over the layers,
filters, precedence), models from the local Hugging Face cache, and one-line errors naming
the key and its line for every malformed recipe, with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import dir_digest, expected_merge_v2, make_trio, output_bytes, run_cli

from streammerge.recipe.recipe import gradient, layer_positions


def _write(tmp: Path, text: str) -> Path:
    p = tmp / "recipe.yml"
    p.write_text(text)
    return p


def _recipe(base, a, b, method="task_arithmetic", extra="", a_params="", b_params=""):
    return f"""merge_method: {method}
base_model: {base}
models:
  - model: {base}
  - model: {a}
    parameters:
      weight: [0, 0.3, 0.7, 1]{a_params}
  - model: {b}
    parameters:
      weight:
        - filter: mlp
          value: [1.0, 0.5]
        - value: 0.25{b_params}
{extra}"""


def test_gradient_is_mergekits_expression():
    # mergekit 0.1.5 config.py: scaled = t*(L-1); i0 = int(scaled); i1 = min(L-1, i0+1)
    assert (
        gradient([0, 0.3, 0.7, 1], 0.1) == (1 - 0.30000000000000004) * 0 + 0.30000000000000004 * 0.3
    )
    assert gradient([0, 0.3, 0.7, 1], 1.0) == 1.0
    assert gradient([2.0], 0.7) == 2.0
    assert gradient([1.0, 0.5], 0.5) == 0.75


def test_layer_positions_of_common_layouts():
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.w", "model.layers.3.mlp.w",
             "lm_head.weight", "encoder.layer.2.attention.w", "h.1.attn.w"]  # fmt: skip
    t = layer_positions(names)
    assert t["model.embed_tokens.weight"] == 0.0 and t["lm_head.weight"] == 0.0
    assert t["model.layers.3.mlp.w"] == 1.0 and t["model.layers.0.mlp.w"] == 0.0
    assert t["encoder.layer.2.attention.w"] == pytest.approx(2 / 3)
    assert layer_positions(["x.layers.0.w"]) == {"x.layers.0.w": 1.0}  # n = 1: t = 1


def test_recipe_resolves_like_mergekit_and_is_bit_exact(tmp_path):
    base, a, b = make_trio(tmp_path)
    cfg = _write(
        tmp_path, _recipe(base, a, b, extra="parameters:\n  lambda: 0.9\nout_dtype: float16\n")
    )
    out = tmp_path / "out"
    r = run_cli(["--config", str(cfg), "-o", str(out), "--quiet"])
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "streammerge.json").read_text())
    t = rec["tensors"]
    # layers 0, 1, 10 -> n = 11; layer 1: t = 0.1; non-layer tensors: t = 0.
    assert t["layers.1.mlp.down.weight"]["w"] == [
        gradient([0, 0.3, 0.7, 1], 0.1),
        gradient([1.0, 0.5], 0.1),
    ]
    assert t["layers.10.norm.weight"]["w"] == [1.0, 0.25]
    assert t["embed.weight"]["w"] == [0.0, 0.25] and t["embed.weight"]["scale"] == 0.9
    assert rec["mixup"] is None and rec["dtype"] == "F16"
    want, _ = expected_merge_v2(out, base, [a, b])
    got = output_bytes(out)
    for name in want:
        assert np.array_equal(got[name], want[name]), name


def test_streammerge_block_mixup_seed_and_trim_scope(tmp_path):
    base, a, b = make_trio(tmp_path)
    extra = "streammerge:\n  mixup: {alpha: 0.5}\n  seed: 42\n  trim_scope: model\n"
    cfg = _write(tmp_path, _recipe(base, a, b, method="ties", extra=extra,
                                   a_params="\n      density: 0.4", b_params="\n      density: 0.6"))  # fmt: skip
    out = tmp_path / "out"
    r = run_cli(["--config", str(cfg), "-o", str(out), "--quiet"])
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "streammerge.json").read_text())
    assert rec["seed"] == 42 and rec["trim_scope"] == "model" and rec["alpha"] == 0.5
    m = rec["mixup"]
    assert rec["tensors"]["layers.10.norm.weight"]["w"] == [m[0] * 1.0, m[1] * 0.25]
    want, ths = expected_merge_v2(out, base, [a, b])
    got = output_bytes(out)
    for name in want:
        assert np.array_equal(got[name], want[name]), name
        assert rec["tensors"].get(name, {}).get("thresholds", ths.get(name)) == ths.get(name)


def test_model_by_repo_id_from_the_local_hf_cache(tmp_path, monkeypatch):
    base, a, b = make_trio(tmp_path)
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tuned-a" / "snapshots" / ("0" * 40)
    snap.parent.mkdir(parents=True)
    a.rename(snap)
    (cache / "models--acme--tuned-a" / "refs").mkdir()
    (cache / "models--acme--tuned-a" / "refs" / "main").write_text("0" * 40)
    cfg = _write(tmp_path, _recipe(base, "acme/tuned-a", b))
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    import os

    r = run_cli(
        ["--config", str(cfg), "-o", str(tmp_path / "out"), "--quiet"], env={**os.environ, **env}
    )
    assert r.returncode == 0, r.stderr
    cfg2 = _write(tmp_path, _recipe(base, "acme/missing", b))
    r = run_cli(["--config", str(cfg2), "-o", str(tmp_path / "o2")], env={**os.environ, **env})
    assert (
        r.returncode == 2
        and "hf download acme/missing" in r.stderr
        and "line 5: models[1].model" in r.stderr
    )


BAD = [
    ("merge_method: [ties\n", "not valid YAML"),
    ("- just\n- a list\n", "expected a mapping"),
    ("base_model: B\nmodels: [{model: A}, {model: C}]\n", "merge_method: missing"),
    ("merge_method: frankenmerge\nbase_model: B\nmodels: [{model: A}, {model: C}]\n", "no method 'frankenmerge'"),
    ("merge_method: ties\nmodels: [{model: A}, {model: C}]\n", "needs a base_model"),
    (
        "merge_method: ties\nbase_model: B\nslices: []\n",
        "line 3: slices: expected a list of {sources: [...]} entries",
    ),
    (
        "merge_method: ties\nbase_model: B\nmodels: [{model: A}, {model: C}]\ntokenizer_source: union\n",
        "line 4: tokenizer_source: union is not supported",
    ),
    (
        "merge_method: ties\nbase_model: B\nmodels: [{model: A}, {model: C}]\ncolour: red\n",
        "line 4: colour: unknown key",
    ),
    (
        "merge_method: ties\nbase_model: B\nmodels:\n  - model: A\n    params: {weight: 1}\n  - model: C\n",
        "line 5: models[0].params: unknown key",
    ),
    (
        "merge_method: ties\nbase_model: B\nmodels:\n  - model: A\n    parameters: {weight: one}\n  - model: C\n",
        "line 5: models[0].parameters.weight: expected a number",
    ),
    (
        "merge_method: ties\nbase_model: B\nmodels:\n  - model: A\n    parameters: {densty: 0.5}\n  - model: C\n",
        "models[0].parameters.densty: unknown parameter",
    ),
    (
        "merge_method: ties\nbase_model: B\nmodels: [{model: A}, {model: C}]\nparameters: {rescale: false}\n",
        "rescale: false is not supported",
    ),
    (
        "merge_method: ties\nbase_model: B\nmodels: [{model: A}, {model: C}]\nparameters: {normalize: maybe}\n",
        "parameters.normalize: expected true or false",
    ),
    (
        "merge_method: ties\nbase_model: B\nmodels: [{model: A}, {model: C}]\nstreammerge: {seed: [1, 2]}\n",
        "streammerge.seed: expected an integer",
    ),
    (
        "merge_method: ties\nbase_model: B\nmodels: [{model: A}, {model: C}]\nstreammerge: {mixup: {beta: 1}}\n",
        "streammerge.mixup: expected {alpha: A}",
    ),
    (
        "merge_method: ties\nbase_model: B\nmodels: [{model: A}, {model: C}]\nstreammerge: {speed: 9}\n",
        "streammerge.speed: unknown key",
    ),
    (
        "merge_method: ties\nbase_model: B\nmodels: [{model: A}, {model: C}]\ndtype: float64\n",
        "dtype: unsupported dtype",
    ),
    (
        "merge_method: ties\nbase_model: B\nmodels: [{model: A}, {model: /nowhere/x}]\n",
        "/nowhere/x is not a directory",
    ),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: A}]\n", "need at least 2 models besides the base"),
    (
        (
            "merge_method: ties\nbase_model: B\nmodels:\n  - model: A\n    parameters:\n      weight:\n"
            "        - filter: 3\n          value: 1\n  - model: C\n"
        ),
        "filter: expected a string",
    ),
    (
        (
            "merge_method: ties\nbase_model: B\nmodels: [{model: A}, {model: C}]\nparameters:\n"
            "  density: [{filter: mlp}]\n"
        ),
        "a filter entry needs a value",
    ),
    (
        "merge_method: ties\nbase_model: B\nmodels: [{model: A}, {model: C}]\nparameters: {int8_mask: [true]}\n",
        "not allowed here",
    ),
    (
        "merge_method: ties\nbase_model: B\nmodels:\n  - model: A\n    parameters: {density: 1.5}\n  - model: C\n",
        "models[0].parameters.density (line 5): density 1.5 must satisfy",
    ),
    (
        "merge_method: dare_ties\nbase_model: B\nmodels:\n  - model: A\n    parameters: {density: 0}\n  - model: C\n",
        "drop rate p = 1.0",
    ),
    (
        "merge_method: linear\nmodels: [{model: A}, {model: C}]\nparameters: {frobnicate: 2}\n",
        "line 3: parameters.frobnicate: unknown parameter",
    ),
    (
        "merge_method: ties\nbase_model: B\nmodels: [{model: A}, {model: C}]\ntokenizer_source: Z\n",
        "'Z' is not base or a model",
    ),
    (
        "merge_method: ties\nbase_model: B\nbase_model: C\nmodels: [{model: A}, {model: C}]\n",
        "duplicate key",
    ),
    # issue 20.11: constructs PyYAML's safe loader rejects or mergekit never reads
    ("merge_method: !!set {ties: null}\nbase_model: B\nmodels: [{model: A}, {model: C}]\n",
     "line 1: merge_method: unsupported YAML tag !!set"),
    ("merge_method: [ties]\nbase_model: B\nmodels: [{model: A}, {model: C}]\n",
     "line 1: merge_method: streammerge has no method ['ties']"),
    ("? [a, b]\n: 1\nmerge_method: ties\nbase_model: B\nmodels: [{model: A}, {model: C}]\n",
     "line 1: (top): a list or mapping used as a key"),
    ("merge_method: ties\nbase_model: B\nmodels:\n  - {model: A, parameters: {? [w]: 1}}\n"
     "  - model: C\n", "line 4: models[0].parameters: a list or mapping used as a key"),
    ("merge_method: !!python/object/apply:os.system [touch PWNED]\nbase_model: B\n"
     "models: [{model: A}, {model: C}]\n", "unsupported YAML tag !!python/object/apply:os.system"),
    ("merge_method: ties\nbase_model: !!python/name:os.system ''\nmodels: [{model: A}, {model: C}]\n",
     "line 2: base_model: unsupported YAML tag !!python/name:os.system"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: A}, {model: C}]\nparameters:\n  <<: 5\n",
     "line 5: parameters.<<: a merge key takes a mapping or a list of mappings"),
    ("merge_method: ties\nbase_model: B\nmodels: 5\n", "models"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: A}, {model: C}]\nparameters: [1, 2]\n",
     "parameters"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: A}, {model: C}]\nstreammerge: [1]\n",
     "line 4: streammerge: expected a mapping"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: [1]}, {model: C}]\n",
     "models[0].model: expected a directory or a Hugging Face repo id"),
]  # fmt: skip


def test_a_parameter_of_another_method_is_ignored_with_a_notice(tmp_path):
    """mergekit reads only the parameters a method declares (``lambda`` is not linear's):
    the recipe still merges, the value is not in the recipe, and a notice names its line."""
    from streammerge.recipe.mergekit_yaml import load_recipe

    base, a, b = make_trio(tmp_path)
    cfg = _write(tmp_path, f"merge_method: linear\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
                           "parameters: {lambda: 2, normalize: false}\n")  # fmt: skip
    seen = []
    yr = load_recipe(cfg, seen.append)
    assert seen == ["parameters.lambda (line 3) does not apply to linear: ignored"]
    assert yr.recipe["params"] == {"normalize": False}


@pytest.mark.parametrize("text, message", BAD)
def test_malformed_recipes_exit_2_with_one_line(tmp_path, text, message):
    base, a, b = make_trio(tmp_path)
    text = text.replace("model: A", f"model: {a}").replace("model: C", f"model: {b}")
    text = text.replace("base_model: B", f"base_model: {base}")
    cfg = _write(tmp_path, text)
    before = {p: dir_digest(p) for p in (base, a, b)}
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "out")])
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("streammerge: error: "), r.stderr
    assert message in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert {p: dir_digest(p) for p in (base, a, b)} == before


def test_config_refuses_models_and_recipe_flags(tmp_path):
    base, a, b = make_trio(tmp_path)
    cfg = _write(tmp_path, _recipe(base, a, b))
    r = run_cli(["--config", str(cfg), str(a), "-o", str(tmp_path / "o")])
    assert r.returncode == 2 and "--config names the models" in r.stderr
    r = run_cli(["--config", str(cfg), "--density", "0.3", "-o", str(tmp_path / "o")])
    assert r.returncode == 2 and "--density conflicts with --config" in r.stderr


def _bomb(levels: int = 10) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\nmerge_method: ties\n"


@pytest.mark.parametrize("plan", [True, False])
def test_alias_bomb_is_refused_in_bounded_time(tmp_path, plan):
    """Issue 20.2: a 1 KB file expanding to 10**10 nodes: one line naming the limit, within
    the test's timeout (it used to exhaust memory)."""
    cfg = _write(tmp_path, _bomb())
    assert cfg.stat().st_size < 1500
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "out"), *(["--plan"] * plan)],
                timeout=60)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "more than 100000 YAML nodes" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_recipe_larger_than_the_limit_is_refused(tmp_path):
    cfg = _write(tmp_path, "merge_method: ties\n" + "#" * (1 << 20) + "\n")
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "out")])
    assert r.returncode == 2 and "larger than 1 MiB" in r.stderr, r.stderr


def test_merge_keys_and_anchors_read_as_pyyaml_reads_them(tmp_path):
    """Issue 20.11: ``<<: *common`` (mergekit reads it through PyYAML): explicit keys win,
    an anchor-only top-level key is not an unknown key, and the merge is byte-identical to
    the same recipe written out."""
    base, a, b = make_trio(tmp_path)
    anchored = f"""common: &common
  density: 0.5
  weight: 0.3
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters:
      <<: *common
      weight: 0.7
  - model: {b}
    parameters: *common
streammerge: {{seed: 3}}
"""
    plain = f"""merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.5, weight: 0.7}}
  - model: {b}
    parameters: {{density: 0.5, weight: 0.3}}
streammerge: {{seed: 3}}
"""
    outs = []
    for name, text in (("anchored", anchored), ("plain", plain)):
        cfg = tmp_path / f"{name}.yml"
        cfg.write_text(text)
        r = run_cli(["--config", str(cfg), "-o", str(tmp_path / name)])
        assert r.returncode == 0, r.stderr
        outs.append(output_bytes(tmp_path / name))
    assert outs[0].keys() == outs[1].keys()
    for k in outs[0]:
        assert np.array_equal(outs[0][k], outs[1][k]), k


@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_dtype_is_the_working_dtype(tmp_path, method):
    """docs/SPEC.md "Working dtype (v3)": without ``dtype:`` a bf16 trio computes in BF16;
    ``dtype: float32`` gives v2's float32 bytes; ``dtype: float16`` rounds the bf16 inputs
    to float16 and writes float16 (mergekit's output dtype is D without ``out_dtype``). Every
    output is recomputed by the reference from the recipe rule alone."""
    base, a, b = make_trio(tmp_path, "BF16")
    params = "\n      density: 0.5"
    outs = {}
    for label, extra in (("none", ""), ("f32", "dtype: float32\nout_dtype: bfloat16\n"),
                         ("f16", "dtype: float16\n")):  # fmt: skip
        cfg = _write(tmp_path, _recipe(base, a, b, method=method, extra=extra, a_params=params,
                                       b_params=params))  # fmt: skip
        out = tmp_path / f"out_{label}"
        r = run_cli(["--config", str(cfg), "-o", str(out), "--quiet", "--seed", "7"])
        assert r.returncode == 0, r.stderr
        rec = json.loads((out / "streammerge.json").read_text())
        want_d = {"none": "BF16", "f32": "F32", "f16": "F16"}[label]
        assert {t["compute_dtype"] for t in rec["tensors"].values()} == {want_d}
        assert rec["dtype"] == {"none": None, "f32": "BF16", "f16": "F16"}[label]
        want, _ = expected_merge_v2(out, base, [a, b])
        got = output_bytes(out)
        for name in want:
            assert np.array_equal(got[name], want[name]), f"{label} {name}"
        outs[label] = got
    merged = [n for n in outs["none"] if "mlp" in n]
    assert any(not np.array_equal(outs["none"][n], outs["f32"][n]) for n in merged)
