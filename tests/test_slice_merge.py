"""Per-slice merges (issue 18): a ``slices:`` recipe whose slices list 2+ sources, merged
with the recipe's merge_method. Every output tensor is checked against the SPEC oracle
(tests/spec_reference.py) applied to the renamed input tensors with the parameter this
test resolves itself from mergekit's rules (source, slice, top level; per-model filters
on the input name, whole-merge ones on the output name; gradients restart per slice)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import spec_reference as ref
from conftest import as_numpy, load_dir, run_cli
from test_slices import LAYER_SHAPES, MKVENV, llama_model, run_mergekit

torch = pytest.importorskip("torch")

OUTSIDE = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def mk_gradient(values: list[float], t: float) -> float:
    """mergekit 0.1.5's ``evaluate_setting`` gradient, written from its source."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def out_layers(slices: list[list[tuple[int, int]]]) -> list[tuple[int, int, float]]:
    """(slice, offset k, t) of every output layer; ``slices``: per slice the sources'
    (start, stop)."""
    out = []
    for s, ranges in enumerate(slices):
        n = ranges[0][1] - ranges[0][0]
        out += [(s, k, k / (n - 1) if n > 1 else 1.0) for k in range(n)]
    return out


def slices_yaml(models, slices, source_params=None) -> str:
    """The ``slices:`` block: slice s takes layers ``slices[s][i]`` of ``models[i]``."""
    lines = ["slices:"]
    for s, ranges in enumerate(slices):
        lines.append("  - sources:")
        for i, (a, b) in enumerate(ranges):
            lines += [f"      - model: {models[i]}", f"        layer_range: [{a}, {b}]"]
            if source_params and (s, i) in source_params:
                lines.append(f"        parameters: {source_params[(s, i)]}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pair")
    return tmp, llama_model(tmp / "a", 6, seed=21), llama_model(tmp / "b", 6, seed=22, shards=3)


def test_slerp_per_slice_matches_the_oracle_on_the_renamed_layers(pair):
    tmp, a, b = pair
    slices = [[(0, 3), (2, 5)], [(3, 6), (0, 3)], [(5, 6), (1, 2)]]
    attn, mlp = [0.0, 0.5, 1.0], [1.0, 0.2]
    cfg = tmp / "slerp.yml"
    cfg.write_text(f"merge_method: slerp\nbase_model: {a}\n" + slices_yaml([a, b], slices)
                   + f"parameters:\n  t:\n    - filter: self_attn\n      value: {attn}\n"
                   f"    - filter: mlp\n      value: {mlp}\n    - value: 0.3\n")  # fmt: skip
    out = tmp / "out_slerp"
    r = run_cli(["--config", str(cfg), "-o", str(out), "--quiet", "--memory", "8MiB"])
    assert r.returncode == 0, r.stderr
    got, ta, tb = load_dir(out), load_dir(a), load_dir(b)
    rec = json.loads((out / "streammerge.json").read_text())
    layers = out_layers(slices)
    assert len(got) == len(layers) * len(LAYER_SHAPES) + len(OUTSIDE)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == len(layers)
    checks = [(n, n, n, 0.3) for n in OUTSIDE]  # outside the layers: t = 0, no filter matches
    for i, (s, k, t) in enumerate(layers):
        (a0, _), (b0, _) = slices[s]
        for rest in LAYER_SHAPES:
            want_t = mk_gradient(attn, t) if "self_attn" in rest else \
                mk_gradient(mlp, t) if "mlp" in rest else 0.3  # fmt: skip
            checks.append((f"model.layers.{i}.{rest}", f"model.layers.{a0 + k}.{rest}",
                           f"model.layers.{b0 + k}.{rest}", want_t))  # fmt: skip
    for name, in_a, in_b, want_t in checks:
        assert rec["tensors"][name]["t"] == want_t, name
        x, y = as_numpy(ta[in_a]), as_numpy(tb[in_b])
        want = ref.spec_slerp(x, y, want_t, "BF16", tuple(x.shape), "BF16", "BF16")
        assert as_numpy(got[name]).tobytes() == np.ascontiguousarray(want).tobytes(), name
    transformers = pytest.importorskip("transformers", reason="transformers cannot import")
    _, info = transformers.LlamaForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_task_arithmetic_scopes_and_filters_match_the_oracle(pair):
    """Per-source weight filtered on the *input* name, a slice weight gradient, a
    top-level lambda filtered on the *output* name."""
    tmp, a, b = pair
    base = llama_model(tmp / "base", 6, seed=23)
    slices = [[(1, 3), (2, 4), (4, 6)], [(0, 4), (0, 4), (1, 5)]]  # a's inputs are not outputs
    src_params = {(0, 1): "{weight: [{filter: layers.3., value: 0.25}, {value: 0.5}]}",
                  (1, 1): "{weight: [{filter: layers.1., value: 2.0}]}"}  # fmt: skip
    text = f"merge_method: task_arithmetic\nbase_model: {base}\n" + \
        slices_yaml([base, a, b], slices, src_params)  # fmt: skip
    text = text.replace("  - sources:", "  - parameters: {weight: [1.0, 0.0]}\n    sources:", 2)
    text = text.replace("  - parameters: {weight: [1.0, 0.0]}\n    sources:", "  - sources:", 1)
    cfg = tmp / "ta.yml"
    cfg.write_text(text + "parameters:\n  weight: 0.7\n  lambda: [{filter: layers.0., value: "
                   "0.5}, {value: 1.0}]\n")  # fmt: skip
    out = tmp / "out_ta"
    r = run_cli(["--config", str(cfg), "-o", str(out), "--quiet"])
    assert r.returncode == 0, r.stderr
    got, tbase, ta, tb = load_dir(out), load_dir(base), load_dir(a), load_dir(b)

    def weights(s: int, t: float, in_a: str) -> list[float]:
        if s == 0:  # a: its own filter on a's input name, else its own fallback; b: top
            return [0.25 if "layers.3." in in_a else 0.5, 0.7]
        slice_w = mk_gradient([1.0, 0.0], t)  # slice 1's weight, unless a's filter matches
        return [2.0 if "layers.1." in in_a else slice_w, slice_w]

    for i, (s, k, t) in enumerate(out_layers(slices)):
        starts = [rng[0] + k for rng in slices[s]]
        for rest in LAYER_SHAPES:
            name = f"model.layers.{i}.{rest}"
            ins = [f"model.layers.{j}.{rest}" for j in starts]
            w = weights(s, t, ins[1])
            lam = 0.5 if "layers.0." in name else 1.0
            want, _ = ref.spec_merge_v2(as_numpy(tbase[ins[0]]), [as_numpy(ta[ins[1]]),
                                        as_numpy(tb[ins[2]])], "BF16", method="task_arithmetic",
                                        key=0, weights=w, scale=lam,
                                        compute_dtype="BF16")  # fmt: skip
            assert as_numpy(got[name]).tobytes() == np.ascontiguousarray(want).tobytes(), name


BAD = [
    ([[(0, 2), (0, 3)]], True, "slices[0].sources[1].layer_range: 3 layers, slices[0].sources[0] has 2"),
    ([[(0, 2), (0, 2)], [(0, 2), (0, 2), (2, 4)]], True, "slices[1].sources[2].model: "),
    ([[(0, 2), (0, 2)]], False, "needs a base_model"),
]


@pytest.mark.parametrize("slices, with_base, want", BAD)
def test_bad_slice_merges_stop_in_one_line(pair, tmp_path, slices, with_base, want):
    _, a, b = pair
    models = [a, b, a]
    head = "merge_method: slerp\n" + (f"base_model: {a}\n" if with_base else "")
    (tmp_path / "r.yml").write_text(head + slices_yaml(models, slices))
    r = run_cli(["--config", str(tmp_path / "r.yml"), "-o", str(tmp_path / "out")])
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert want in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_interrupted_slice_merge_checks_each_source_model_on_resume(tmp_path):
    """The journal names each merged tensor's sources by their model (input j of a slice
    is not model j): a changed byte of the last slice's second fine-tune stops --resume."""
    from conftest import dir_digest

    import streammerge
    from streammerge.errors import MergeError
    from streammerge.io.reader import open_model
    from streammerge.recipe.mergekit_yaml import load_recipe

    base = llama_model(tmp_path / "base", 4, seed=31, shards=1)
    a = llama_model(tmp_path / "a", 4, seed=32, shards=1)
    b = llama_model(tmp_path / "b", 4, seed=33, shards=2)
    cfg = tmp_path / "r.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\n"
                   + slices_yaml([base, a, b], [[(0, 2), (1, 3), (2, 4)], [(1, 4)] * 3]))  # fmt: skip
    yr = load_recipe(cfg)
    args = ([str(m) for m in yr.models], yr.base)
    opts = {"shard_size": "8KB", "device": "cpu", **yr.recipe}
    streammerge.merge(*args, tmp_path / "ref", **opts)
    out = tmp_path / "out"
    journal = tmp_path / ".out.streammerge-journal"

    def used_of_b() -> list[str]:
        """Tensors of b (input "2") that journaled shards used: finished, relied on."""
        lines = journal.read_text().splitlines() if journal.is_file() else []
        recs = [json.loads(x) for x in lines if '"shard"' in x]
        return [t for r in recs for role, t, *_ in r["inputs"] if role == "2"]

    def interrupt_once_journaled(n: int) -> None:
        # on_bytes counts computed bytes; the writer journals later (under load, much later)
        if used_of_b():
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        streammerge.merge(*args, out, on_bytes=interrupt_once_journaled, **opts)
    head = open_model(b).tensors[used_of_b()[0]]
    data = bytearray(head.file.read_bytes())
    data[head.start] ^= 1
    head.file.write_bytes(bytes(data))
    with pytest.raises(MergeError, match="changed"):
        streammerge.merge(*args, out, resume=True, **opts)
    data[head.start] ^= 1
    head.file.write_bytes(bytes(data))
    s = streammerge.merge(*args, out, resume=True, **opts)
    assert s.resumed_shards > 0
    assert dir_digest(out) == dir_digest(tmp_path / "ref")


@pytest.mark.skipif(not (MKVENV / "bin" / "mergekit-yaml").exists(),
                    reason="mergekit 0.1.5 is not installed in /work/mkvenv")  # fmt: skip
def test_task_arithmetic_slices_byte_identical_to_mergekit(pair, tmp_path):
    _, a, b = pair
    base = llama_model(tmp_path / "base", 6, seed=24)
    cfg = tmp_path / "r.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\n"
                   + slices_yaml([base, a, b], [[(0, 3), (2, 5), (3, 6)], [(2, 6), (0, 4), (1, 5)]],
                                 {(0, 1): "{weight: [{filter: mlp, value: [0.2, 0.9]}]}"})
                   + "parameters: {weight: 0.6, lambda: [{filter: self_attn, value: 0.8}, "
                   "{value: 1.0}]}\ndtype: float32\nout_dtype: bfloat16\n")  # fmt: skip
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "ours"), "--quiet"])
    assert r.returncode == 0, r.stderr
    run_mergekit(cfg, tmp_path / "mk")
    got, want = load_dir(tmp_path / "ours"), load_dir(tmp_path / "mk")
    assert set(got) == set(want)
    diff = [n for n in want if as_numpy(got[n]).tobytes() != as_numpy(want[n]).tobytes()]
    assert not diff, diff[:5]


def test_a_slice_base_model_overrides_the_recipe_base(pair, tmp_path):
    """slerp: slice 1's own base_model b is its v0, slice 0 keeps the recipe's a."""
    _, a, b = pair
    body = slices_yaml([a, b], [[(0, 2), (2, 4)], [(2, 4), (0, 2)]])
    body = body.replace("  - sources:", "  - base_model: BASE\n    sources:")
    body = body.replace("BASE", str(a), 1).replace("BASE", str(b), 1)
    cfg = tmp_path / "r.yml"
    cfg.write_text(f"merge_method: slerp\nbase_model: {a}\n{body}parameters: {{t: 0.25}}\n")
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "out"), "--quiet"])
    assert r.returncode == 0, r.stderr
    got, ta, tb = load_dir(tmp_path / "out"), load_dir(a), load_dir(b)
    rest = "self_attn.q_proj.weight"
    for out_i, v0, v1 in ((1, ta[f"model.layers.1.{rest}"], tb[f"model.layers.3.{rest}"]),
                          (3, tb[f"model.layers.1.{rest}"], ta[f"model.layers.3.{rest}"])):  # fmt: skip
        x, y = as_numpy(v0), as_numpy(v1)
        want = ref.spec_slerp(x, y, 0.25, "BF16", tuple(x.shape), "BF16", "BF16")
        assert as_numpy(got[f"model.layers.{out_i}.{rest}"]).tobytes() == \
            np.ascontiguousarray(want).tobytes(), out_i  # fmt: skip
