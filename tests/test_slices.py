"""Layer slices with merge_method: passthrough (issue 18): mergekit's ``slices:`` recipes,
every output tensor a copy of one input tensor, config.json rewritten, inputs untouched,
bad recipes refused in one line before anything is written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import as_numpy, dir_digest, load_dir, run_cli, write_model

torch = pytest.importorskip("torch")

H, HEADS, KV, HEAD_DIM, INTER, VOCAB = 16, 2, 1, 8, 32, 40
LAYER_SHAPES = {
    "input_layernorm.weight": (H,),
    "self_attn.q_proj.weight": (HEADS * HEAD_DIM, H),
    "self_attn.k_proj.weight": (KV * HEAD_DIM, H),
    "self_attn.v_proj.weight": (KV * HEAD_DIM, H),
    "self_attn.o_proj.weight": (H, HEADS * HEAD_DIM),
    "post_attention_layernorm.weight": (H,),
    "mlp.gate_proj.weight": (INTER, H),
    "mlp.up_proj.weight": (INTER, H),
    "mlp.down_proj.weight": (H, INTER),
}
MKVENV = Path("/work/mkvenv")


def llama_config(n_layers: int, tied: bool = False, **extra) -> dict:
    """A real LlamaForCausalLM config.json (transformers loads it)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
        "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV,
        "head_dim": HEAD_DIM, "num_hidden_layers": n_layers, "vocab_size": VOCAB,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": tied,
        "hidden_act": "silu", "dtype": "bfloat16", **extra,
    }  # fmt: skip


def llama_model(root: Path, n_layers: int, seed: int, tied: bool = False, shards: int = 2,
                dtype=torch.bfloat16, config: dict | None = None) -> Path:  # fmt: skip
    """A small random Llama-shaped checkpoint (every tensor distinct) with its config."""
    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(VOCAB, H, generator=g)}
    for j in range(n_layers):
        for rest, shape in LAYER_SHAPES.items():
            t[f"model.layers.{j}.{rest}"] = torch.randn(shape, generator=g)
    t["model.norm.weight"] = torch.randn(H, generator=g)
    if not tied:
        t["lm_head.weight"] = torch.randn(VOCAB, H, generator=g)
    t = {k: v.to(dtype) for k, v in t.items()}
    return write_model(root, t, shards=shards, config=config or llama_config(n_layers, tied))


def write_recipe(path: Path, sources: list[tuple[Path, int, int]], extra: str = "",
                 method: str = "passthrough") -> Path:  # fmt: skip
    """A slices recipe: one slice per (model, start, stop)."""
    lines = [f"merge_method: {method}", "slices:"]
    for m, a, b in sources:
        lines += ["  - sources:", f"      - model: {m}", f"        layer_range: [{a}, {b}]"]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and \
        as_numpy(a).tobytes() == as_numpy(b).tobytes()  # fmt: skip


@pytest.fixture(scope="module")
def solar(tmp_path_factory):
    """An 8-layer model stacked SOLAR-style ([0, 6) then [2, 8)) through the CLI, in
    several output shards."""
    tmp = tmp_path_factory.mktemp("solar")
    m = llama_model(tmp / "m", 8, seed=1)
    before = dir_digest(m)
    cfg = write_recipe(tmp / "solar.yml", [(m, 0, 6), (m, 2, 8)])
    out = tmp / "out"
    r = run_cli(["--config", str(cfg), "-o", str(out), "--shard-size", "20KB"])
    assert r.returncode == 0, r.stderr
    return m, out, r, before


def test_solar_stack_maps_every_output_layer_to_its_input_layer(solar):
    m, out, r, before = solar
    src, got = load_dir(m), load_dir(out)
    assert len(list(out.glob("model-*.safetensors"))) > 1  # cut by --shard-size
    sources = list(range(6)) + list(range(2, 8))
    assert len(got) == 12 * len(LAYER_SHAPES) + 3
    for i, j in enumerate(sources):
        for rest in LAYER_SHAPES:
            assert same_bytes(got[f"model.layers.{i}.{rest}"], src[f"model.layers.{j}.{rest}"]), (i, j)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert same_bytes(got[name], src[name])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 12
    assert json.loads((m / "config.json").read_text())["num_hidden_layers"] == 8
    assert dir_digest(m) == before  # inputs never modified
    rec = json.loads((out / "streammerge.json").read_text())
    assert rec["method"] == "passthrough"
    assert rec["recipe"]["layer_runs"] == ["0-5 <- model 0:0-5", "6-11 <- model 0:2-7"]
    assert rec["recipe"]["layers"][6] == "6 <- model 0:2"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got)
    assert "passthrough ->" in r.stdout and "seed" not in r.stdout + r.stderr


def test_solar_stack_loads_in_transformers_with_every_key(solar):
    m, out, _, _ = solar
    transformers = pytest.importorskip("transformers", reason="transformers cannot import")
    model, info = transformers.LlamaForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.num_hidden_layers == 12 and len(model.model.layers) == 12
    src = load_dir(m)
    sd = model.state_dict()
    assert same_bytes(sd["model.layers.6.self_attn.q_proj.weight"].to(torch.bfloat16),
                      src["model.layers.2.self_attn.q_proj.weight"])  # fmt: skip
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, VOCAB) and torch.isfinite(logits.float()).all()


def test_tied_stack_writes_no_lm_head_and_loads_in_transformers(tmp_path):
    m = llama_model(tmp_path / "m", 8, seed=2, tied=True)
    out = tmp_path / "out"
    cfg = write_recipe(tmp_path / "r.yml", [(m, 0, 6), (m, 2, 8)])
    r = run_cli(["--config", str(cfg), "-o", str(out), "--quiet"])
    assert r.returncode == 0, r.stderr
    got = load_dir(out)
    assert "lm_head.weight" not in got and "model.embed_tokens.weight" in got
    transformers = pytest.importorskip("transformers", reason="transformers cannot import")
    model, info = transformers.LlamaForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.num_hidden_layers == 12 and len(model.model.layers) == 12
    sd = model.state_dict()
    src = load_dir(m)
    assert same_bytes(sd["model.layers.11.mlp.down_proj.weight"].to(torch.bfloat16),
                      src["model.layers.7.mlp.down_proj.weight"])  # fmt: skip
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, VOCAB) and torch.isfinite(logits.float()).all()


def test_two_models_pre_from_the_first_post_from_the_last(tmp_path):
    a = llama_model(tmp_path / "a", 4, seed=3, shards=1)
    b = llama_model(tmp_path / "b", 6, seed=4, shards=3)
    out = tmp_path / "out"
    cfg = write_recipe(tmp_path / "r.yml", [(a, 1, 3), (b, 0, 6), (a, 3, 4)],
                       extra="out_dtype: float32\n")  # fmt: skip
    r = run_cli(["--config", str(cfg), "-o", str(out), "--quiet"])
    assert r.returncode == 0, r.stderr
    sa, sb, got = load_dir(a), load_dir(b), load_dir(out)
    want = [(sa, 1), (sa, 2)] + [(sb, j) for j in range(6)] + [(sa, 3)]
    for i, (src, j) in enumerate(want):
        for rest in LAYER_SHAPES:
            x = got[f"model.layers.{i}.{rest}"]
            assert same_bytes(x, src[f"model.layers.{j}.{rest}"].float()), (i, j, rest)
    # embed_tokens from the first slice's model, norm and lm_head from the last slice's
    assert same_bytes(got["model.embed_tokens.weight"], sa["model.embed_tokens.weight"].float())
    assert same_bytes(got["model.norm.weight"], sa["model.norm.weight"].float())
    assert same_bytes(got["lm_head.weight"], sa["lm_head.weight"].float())
    cfg_out = json.loads((out / "config.json").read_text())
    assert cfg_out["num_hidden_layers"] == 9 and cfg_out["dtype"] == "float32"


def _prepare(tmp_path, recipe: Path):
    from streammerge.api import prepare
    from streammerge.api_types import Options
    from streammerge.recipe.mergekit_yaml import load_recipe

    yr = load_recipe(recipe)
    return prepare([str(m) for m in yr.models], yr.base, tmp_path / "out", yr.recipe, Options())


def test_config_per_layer_lists_follow_the_layers(tmp_path):
    types = [f"t{j}" for j in range(6)]
    a = llama_model(tmp_path / "a", 6, seed=5, config=llama_config(6, layer_types=types,
                    no_rope_layers=[1, 0, 1, 0, 1, 0], eos_token_id=[1, 2, 3, 4, 5, 6]))  # fmt: skip
    prep = _prepare(tmp_path, write_recipe(tmp_path / "r.yml", [(a, 4, 6), (a, 0, 3)]))
    up = prep.plan.config_updates()
    assert up["num_hidden_layers"] == 5
    assert up["layer_types"] == ["t4", "t5", "t0", "t1", "t2"]
    assert up["no_rope_layers"] == [1, 0, 1, 0, 1]
    assert "eos_token_id" not in up  # a list of 6 that is not per layer
    (cfg,) = [f for f in prep.output.side_files if f.name == "config.json"]
    written = json.loads(cfg.data)
    assert written["layer_types"] == up["layer_types"] and written["eos_token_id"] == [1, 2, 3, 4, 5, 6]
    prep.output.close()


@pytest.mark.parametrize(
    "arch, model_type, extra, want",
    [
        ("Gemma2ForCausalLM", "gemma2", {}, ["sliding_attention", "full_attention"] * 3),
        ("Gemma3ForCausalLM", "gemma3_text", {"sliding_window_pattern": 3},
         ["sliding_attention", "sliding_attention", "full_attention"] * 2),
        ("Qwen2ForCausalLM", "qwen2", {"use_sliding_window": True, "max_window_layers": 2},
         ["full_attention"] * 2 + ["sliding_attention"] * 4),
        ("Qwen3ForCausalLM", "qwen3", {}, ["full_attention"] * 6),
    ],
)  # fmt: skip
def test_layer_types_derived_as_transformers_does(tmp_path, arch, model_type, extra, want):
    cfg = {**llama_config(6), "architectures": [arch], "model_type": model_type, **extra}
    a = llama_model(tmp_path / "a", 6, seed=6, config=cfg)
    prep = _prepare(tmp_path, write_recipe(tmp_path / "r.yml", [(a, 0, 6), (a, 1, 3)]))
    assert prep.plan.config_updates()["layer_types"] == want + want[1:3]
    prep.output.close()


def test_journal_names_the_model_each_copy_comes_from(tmp_path):
    from streammerge.output.files import input_digests

    a = llama_model(tmp_path / "a", 2, seed=7, shards=1)
    b = llama_model(tmp_path / "b", 2, seed=8, shards=1)
    prep = _prepare(tmp_path, write_recipe(tmp_path / "r.yml", [(a, 0, 1), (b, 0, 2)]))

    class Hasher:
        def digest(self, info):
            return info.nbytes, info.file.parent.name  # the model directory, as the "hash"

    (shard,) = prep.plan.shards
    rows = input_digests(prep.plan, Hasher(), shard.filename)
    assert {(role, d) for role, _, _, d in rows} == {("0", "a"), ("1", "b")}
    names = {(role, name) for role, name, _, _ in rows}
    assert ("1", "model.layers.1.mlp.up_proj.weight") in names  # output layer 2 <- b:1
    assert ("1", "lm_head.weight") in names and ("0", "model.embed_tokens.weight") in names
    prep.output.close()


def test_plan_shows_the_layer_map_and_writes_nothing(tmp_path):
    m = llama_model(tmp_path / "m", 8, seed=9)
    cfg = write_recipe(tmp_path / "r.yml", [(m, 0, 6), (m, 2, 8)])
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "out"), "--plan"])
    assert r.returncode == 0, r.stderr
    assert "0-5 <- model 0:0-5" in r.stdout and "6-11 <- model 0:2-7" in r.stdout
    assert "passes: copy x9" in r.stdout and "bytes to read:" in r.stdout
    assert not (tmp_path / "out").exists()


def test_scale_of_one_is_a_copy(tmp_path):
    m = llama_model(tmp_path / "m", 4, seed=10)
    extra = ("parameters:\n  scale:\n    - filter: o_proj\n      value: [1, 1]\n"
             "    - value: 1.0\n")  # fmt: skip
    cfg = write_recipe(tmp_path / "r.yml", [(m, 0, 2), (m, 1, 4)], extra=extra)
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "out"), "--quiet"])
    assert r.returncode == 0, r.stderr
    got, src = load_dir(tmp_path / "out"), load_dir(m)
    assert same_bytes(got["model.layers.2.self_attn.o_proj.weight"],
                      src["model.layers.1.self_attn.o_proj.weight"])  # fmt: skip


def test_scale_multiplies_in_float32_and_keeps_signed_zeros(tmp_path):
    """mergekit's ``x * scale`` on a bf16 tensor: round_bf16(float32(x) * float32(scale)),
    -0.0 kept; a filter and a gradient over the slice pick each tensor's scale."""
    import torch

    m = llama_model(tmp_path / "m0", 4, seed=14)
    src = load_dir(m)
    src["model.layers.1.mlp.down_proj.weight"][0, :3] = torch.tensor([-0.0, 0.0, -1e-30])
    m = write_model(tmp_path / "m", src, shards=2, config=llama_config(4, False))
    extra = ("parameters:\n  scale:\n    - filter: down_proj\n      value: [0.5, 0.3]\n"
             "    - value: 1.0\n")  # fmt: skip
    cfg = write_recipe(tmp_path / "r.yml", [(m, 0, 2), (m, 1, 3)], extra=extra)
    r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "out"), "--quiet"])
    assert r.returncode == 0, r.stderr
    got = load_dir(tmp_path / "out")
    # output layers: 0 <- 0 (t 0), 1 <- 1 (t 1), 2 <- 1 (t 0), 3 <- 2 (t 1)
    for out_i, in_i, s in ((0, 0, 0.5), (1, 1, 0.3), (2, 1, 0.5), (3, 2, 0.3)):
        x = src[f"model.layers.{in_i}.mlp.down_proj.weight"]
        want = (x.float() * torch.tensor(s, dtype=torch.float32)).to(torch.bfloat16)
        assert same_bytes(got[f"model.layers.{out_i}.mlp.down_proj.weight"], want), out_i
    assert torch.signbit(got["model.layers.1.mlp.down_proj.weight"][0, :3]).tolist() == [True, False, True]
    assert same_bytes(got["model.layers.3.self_attn.o_proj.weight"],
                      src["model.layers.2.self_attn.o_proj.weight"])  # scale 1: a copy


BAD = [
    ([(0, 0, 6), (0, 6, 40)], "", "line 8: slices[1].sources[0].layer_range: [6, 40] is outside"),
    ([(0, 0, 6), (0, 5, 5)], "", "slices[1].sources[0].layer_range: [5, 5] is empty"),
    ([(0, 0, 2), (9, 0, 2)], "", "slices[1].sources[0].model: "),
    ([(0, 0, 2)], "parameters: {scale: 0.5}\nout_dtype: float32\n",
     "parameters.scale: scale 0.5 for"),
    ([(0, 0, 2)], "tokenizer_source: base\n", "tokenizer_source: not supported with slices"),
    ([(1, 0, 2)], "", "architecture GPT2LMHeadModel of"),
    ([(0, 0, 2)], "dtype: float16\nout_dtype: float32\n", "would be rounded to dtype F16"),
]


@pytest.mark.parametrize("sources, extra, want", BAD)
def test_bad_recipes_stop_in_one_line_before_writing(tmp_path, sources, extra, want):
    models = [llama_model(tmp_path / "m", 8, seed=11),
              llama_model(tmp_path / "gpt", 2, seed=12,
                          config={**llama_config(2), "architectures": ["GPT2LMHeadModel"]})]  # fmt: skip
    refs = [models[i] if i < 2 else tmp_path / "nowhere" for i, _, _ in sources]
    cfg = write_recipe(tmp_path / "r.yml", [(r, a, b) for r, (_, a, b) in zip(refs, sources)],
                       extra=extra)  # fmt: skip
    out = tmp_path / "out"
    r = run_cli(["--config", str(cfg), "-o", str(out)])
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("streammerge: error: "), r.stderr
    assert want in r.stderr, r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_two_sources_in_passthrough_and_one_in_a_merge_are_refused(tmp_path):
    m = llama_model(tmp_path / "m", 4, seed=13)
    two = tmp_path / "two.yml"
    two.write_text(f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {m}\n"
                   f"        layer_range: [0, 2]\n      - model: {m}\n"
                   "        layer_range: [2, 4]\n")  # fmt: skip
    ties = write_recipe(tmp_path / "ties.yml", [(m, 0, 2)], method="ties")
    for cfg, want in ((two, "line 3: slices[0].sources: 2 sources: passthrough takes exactly one"),
                      (ties, "line 3: slices[0].sources: 1 source: merge_method ties merges 2+")):  # fmt: skip
        r = run_cli(["--config", str(cfg), "-o", str(tmp_path / "out")])
        assert r.returncode == 2 and want in r.stderr, r.stderr
        assert not (tmp_path / "out").exists()


def run_mergekit(cfg: Path, out: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONHASHSEED": "0"}  # fmt: skip
    r = subprocess.run(
        [str(MKVENV / "bin" / "mergekit-yaml"), str(cfg), str(out), "--device", "cpu",
         "--no-cuda", "--no-copy-tokenizer", "--quiet", "--num-threads", "1"],
        check=False, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.skipif(not (MKVENV / "bin" / "mergekit-yaml").exists(),
                    reason="mergekit 0.1.5 is not installed in /work/mkvenv")  # fmt: skip
@pytest.mark.parametrize("extra", ["", "dtype: float32\nout_dtype: bfloat16\n",
                                   "out_dtype: float32\n"])  # fmt: skip
def test_byte_identical_to_mergekit(tmp_path, extra):
    a = llama_model(tmp_path / "a", 6, seed=14)
    b = llama_model(tmp_path / "b", 8, seed=15, shards=3)
    cfg = write_recipe(tmp_path / "r.yml", [(a, 0, 4), (b, 2, 8), (a, 3, 6)],
                       extra=extra + "parameters: {scale: [{filter: mlp, value: 1.0}]}\n")  # fmt: skip
    ours, theirs = tmp_path / "ours", tmp_path / "mk"
    r = run_cli(["--config", str(cfg), "-o", str(ours), "--quiet"])
    assert r.returncode == 0, r.stderr
    run_mergekit(cfg, theirs)
    got, want = load_dir(ours), load_dir(theirs)
    assert set(got) == set(want)
    diff = [n for n in want if not same_bytes(got[n], want[n])]
    assert not diff, diff[:5]
    for key in ("num_hidden_layers", "tie_word_embeddings"):
        assert json.loads((ours / "config.json").read_text())[key] == \
            json.loads((theirs / "config.json").read_text())[key]  # fmt: skip
    shutil.rmtree(theirs)


def test_interrupted_stack_resumes_and_checks_the_model_each_copy_came_from(tmp_path):
    import streammerge
    from conftest import fail_after
    from streammerge.errors import MergeError
    from streammerge.io.reader import open_model
    from streammerge.recipe.mergekit_yaml import load_recipe

    a = llama_model(tmp_path / "a", 4, seed=16, shards=1)
    b = llama_model(tmp_path / "b", 4, seed=17, shards=2)
    yr = load_recipe(write_recipe(tmp_path / "r.yml", [(a, 0, 3), (b, 1, 4), (b, 0, 2)]))
    args = ([str(m) for m in yr.models], yr.base)
    opts = {"shard_size": "8KB", "device": "cpu", **yr.recipe}
    streammerge.merge(*args, tmp_path / "ref", **opts)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        streammerge.merge(*args, out, on_bytes=fail_after(25_000, KeyboardInterrupt(), out), **opts)
    # lm_head (first in name order, so in a finished shard) comes from b, the last slice's
    # model: a byte of it changed in place must stop the resume (the journal names b for it).
    head = open_model(b).tensors["lm_head.weight"]
    data = bytearray(head.file.read_bytes())
    data[head.start] ^= 1
    head.file.write_bytes(bytes(data))
    with pytest.raises(MergeError, match="changed"):
        streammerge.merge(*args, out, resume=True, **opts)
    data[head.start] ^= 1  # the same bytes again, a new file identity: re-hashed, accepted
    head.file.write_bytes(bytes(data))
    s = streammerge.merge(*args, out, resume=True, **opts)
    assert s.resumed_shards > 0
    assert dir_digest(out) == dir_digest(tmp_path / "ref")
