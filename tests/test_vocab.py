"""Vocabulary mismatch (issue 5): embeddings of 32000/32001/32002-style row counts follow the
documented rule, config.json's vocab_size follows, and transformers loads the merge."""

from __future__ import annotations

import json

import numpy as np
import pytest
import spec_reference as ref
import torch
from conftest import as_numpy, load_dir, write_model

import streammerge

HIDDEN = 16


def _llama(tmp, name, vocab, g, base=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if base is not None:  # a fine-tune: the base's values + noise, extra rows random
        for k, v in sd.items():
            b = base[k]
            rows = min(b.shape[0], v.shape[0]) if v.dim() else None
            fresh = (v.float() + torch.randn(v.shape, generator=g) * 0.01).to(torch.bfloat16)
            if v.dim() and rows is not None:
                fresh[:rows] = (
                    b[:rows].float() + torch.randn(b[:rows].shape, generator=g) * 0.002
                ).to(torch.bfloat16)
            sd[k] = fresh
    d = write_model(tmp / name, sd, config=cfg.to_dict())
    (d / "tokenizer.json").write_text(json.dumps({"rows": vocab}))
    return d, sd


@pytest.mark.parametrize("rows", [(100, 101, 102), (102, 100, 101)])
def test_vocab_rule_and_transformers_load(tmp_path, rows):
    g = torch.Generator().manual_seed(1)
    vb, va, vbb = rows
    base, bsd = _llama(tmp_path, "base", vb, g)
    a, asd = _llama(tmp_path, "a", va, g, bsd)
    b, bbsd = _llama(tmp_path, "b", vbb, g, bsd)
    out = tmp_path / "out"
    s = streammerge.merge([a, b], base, out, seed=11, drop=[0.4, 0.7], memory="2MiB")
    assert any("embed_tokens" in r for r in s.vocab_rules) and any(
        "lm_head" in r for r in s.vocab_rules
    )
    cfg = json.loads((out / "config.json").read_text())
    want_rows = max(va, vbb)
    assert cfg["vocab_size"] == want_rows
    assert json.loads((out / "tokenizer.json").read_text())["rows"] == want_rows

    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.get_input_embeddings().weight.shape == (want_rows, HIDDEN)

    rec = json.loads((out / "streammerge.json").read_text())
    w, p = rec["weights"], rec["drop"]
    got = load_dir(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        key = ref.spec_key(11, name)
        outv = as_numpy(got[name])
        srcs = [as_numpy(asd[name]), as_numpy(bbsd[name])]
        srows = [va, vbb]
        bv = as_numpy(bsd[name])
        for r in range(want_rows):
            lo = r * HIDDEN
            act = [j for j in range(2) if srows[j] > r]
            ms = [srcs[j][lo : lo + HIDDEN] for j in act]
            wa = sum(w[j] for j in act)
            if r < vb:
                ww = list(w) if len(act) == 2 else [w[j] * sum(w) / wa for j in act]
                base_rows, drops = bv[lo : lo + HIDDEN], [p[j] for j in act]
            else:  # x_b = +0.0, no drop, the weights renormalized
                base_rows, drops = np.zeros(HIDDEN, np.uint16), [0.0] * len(act)
                ww = [w[j] / wa for j in act]
            # v1's formula (dare_linear) in the working dtype BF16 (SPEC v3)
            exp, _ = ref.spec_merge_v2(
                base_rows, ms, "BF16", method="dare_linear", key=key, start=lo,
                model_ids=act, drop=drops, weights=ww, scale=1.0, normalize=False,
                base_dtype="BF16", model_dtypes=["BF16"] * len(ms), compute_dtype="BF16",
            )  # fmt: skip
            assert np.array_equal(outv[lo : lo + HIDDEN], exp), (name, r)


def test_other_shape_mismatch_stops_before_writing(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = write_model(tmp_path / "base", {"w": torch.randn(4, 6, generator=g)})
    a = write_model(tmp_path / "a", {"w": torch.randn(5, 6, generator=g)})
    b = write_model(tmp_path / "b", {"w": torch.randn(4, 8, generator=g)})
    with pytest.raises(streammerge.api.MergeError, match="shape mismatch"):
        streammerge.merge([a, b], base, tmp_path / "out", seed=1)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_vocab_rule_with_thresholds_counts_each_fine_tunes_rows(tmp_path, method):
    """TIES-family thresholds over a vocabulary-shaped tensor: the population of fine-tune j
    is the rows the base and j both have (docs/SPEC.md), whatever the chunking."""
    g = torch.Generator().manual_seed(2)
    base, bsd = _llama(tmp_path, "base", 102, g)
    a, asd = _llama(tmp_path, "a", 40, g, bsd)  # rows 40-100: only b (and the base) have them
    b, bbsd = _llama(tmp_path, "b", 101, g, bsd)
    kw = {"method": method, "seed": 3, "density": 0.3, "weights": [1.0, 0.5]}
    for mem in ("24MiB", "256MiB"):
        out = tmp_path / mem
        streammerge.merge([a, b], base, out, memory=mem, **kw)
        rec = json.loads((out / "streammerge.json").read_text())
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            x_b = ref.to_float32(as_numpy(bsd[name]), "BF16").reshape(102, HIDDEN)
            for j, sd in enumerate((asd, bbsd)):
                m = ref.to_float32(as_numpy(sd[name]), "BF16").reshape(-1, HIDDEN)
                rows = min(m.shape[0], x_b.shape[0], 101)
                # the task vector in the working dtype BF16 (SPEC "Working dtype (v3)")
                mags = ref.spec_mag(ref.spec_rd(m[:rows] - x_b[:rows], "BF16")).reshape(-1)
                sparsifier = "magnitude" if method == "ties" else "breadcrumbs"
                want = ref.spec_thresholds(sparsifier, mags, 0.3, 0.01)
                assert rec["tensors"][name]["thresholds"][j] == want, (mem, name, j)
