"""The output's README.md (streammerge.output.model_card): Hugging Face front matter, the recipe as
YAML, the drawn λ, the seed, and a command that really repeats the merge."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import make_trio, run_cli

import streammerge
from streammerge.output import model_card


def _parts(card: str) -> tuple[dict, dict]:
    """(front matter, recipe block) of a card, both parsed as YAML."""
    assert card.startswith("---\n")
    fm_text, body = card[4:].split("\n---\n", 1)
    m = re.search(r"```yaml\n(.*?)```", body, re.DOTALL)
    assert m, body
    return yaml.safe_load(fm_text), yaml.safe_load(m.group(1))


def _record(out: Path) -> dict:
    return json.loads((out / "streammerge.json").read_text())


def test_card_front_matter_recipe_seed_lambda_command(tmp_path):
    base, a, b = make_trio(tmp_path)
    streammerge.merge([a, b], base, tmp_path / "out", method="ties", seed=42, alpha=0.8,
                      density=0.3, threads=2)  # fmt: skip
    rec = _record(tmp_path / "out")
    command = f"streammerge {a} {b} --base {base} -o {tmp_path / 'out'} --method ties --density 0.3 --alpha 0.8"
    card = model_card.render(rec, command)
    fm, recipe = _parts(card)
    assert "base_model" not in fm  # local folders with no Hub id: no made-up repo ids
    assert fm["library_name"] == "transformers"
    assert fm["tags"] == ["merge", "streammerge", "ties"]
    assert fm["base_model_relation"] == "merge"
    lam = rec["mixup"][0]
    assert repr(lam) in card and "λ" in card
    assert "42" in card
    assert command + " --seed 42" in card  # a drawn seed would be lost otherwise
    assert recipe["merge_method"] == "ties"
    assert recipe["base_model"] == "base"  # never a local absolute path
    assert [m["model"] for m in recipe["models"]] == ["a", "b"]
    assert str(tmp_path) not in card.replace(command, "")
    assert all(m["parameters"] == {"weight": 1, "density": 0.3} for m in recipe["models"])
    assert recipe["streammerge"] == {"seed": 42, "mixup": {"alpha": 0.8}, "trim_scope": "tensor"}
    assert "trim_scope" not in model_card.recipe_to_yaml({**rec, "method": "dare_linear",
                                                          "recipe": {**rec["recipe"], "method": "dare_linear"}})  # fmt: skip
    # a command that already gives the seed is kept as is
    assert "--seed 7 --seed" not in model_card.render(rec, "streammerge x --seed 7")


def test_given_yaml_is_shown_as_is_and_three_models(tmp_path):
    rec = {
        "method": "dare_linear", "seed": 3, "alpha": 1.0, "lambda": None,
        "mixup": [0.2, 0.3, 0.5], "weights": [0.2, 0.3, 0.5], "drop": [0.5] * 3,
        "scale": 1.0, "normalize": False, "dtype": "BF16", "trim_scope": "tensor",
        "recipe": {"method": "dare_linear", "seed": 3, "mixup": [0.2, 0.3, 0.5], "alpha": 1.0,
                   "lambda": None, "models": [{}, {}, {}], "parameters": {},
                   "trim_scope": "tensor", "dtype": "BF16"},
        "base": {"path": "/hub/models--org--base/snapshots/abc123"},
        "models": [{"path": "/hub/models--org--ft-a/snapshots/def"}, {"path": "/data/ft-b"},
                   {"path": "/data/ft-c"}],
        "labels": ["org/base", "org/ft-a", "/data/ft-b", "someone/ft-c"],
    }  # fmt: skip
    card = model_card.render(rec, "streammerge --config r.yml")
    fm, recipe = _parts(card)
    assert fm["base_model"] == ["org/base", "org/ft-a", "someone/ft-c"]  # ft-b: no Hub id
    assert fm["tags"][-1] == "dare_linear"
    assert recipe["base_model"] == "org/base@abc123"
    assert [m["model"] for m in recipe["models"]] == ["org/ft-a@def", "ft-b", "someone/ft-c"]
    assert "/data/" not in card and "/hub/" not in card
    assert all(m["parameters"] == {"weight": 1, "density": 0.5} for m in recipe["models"])
    assert recipe["dtype"] == "float32" and recipe["out_dtype"] == "bfloat16"
    assert "Dirichlet" in card and "m = (0.2, 0.3, 0.5)" in card
    given = "merge_method: dare_linear\nbase_model: org/base\n# my recipe\n"
    card = model_card.render(rec, "streammerge --config r.yml", recipe_yaml=given)
    assert "```yaml\n" + given + "```" in card
    assert _parts(card)[1]["base_model"] == "org/base"


def test_linear_without_base(tmp_path):
    _, a, b = make_trio(tmp_path)
    streammerge.merge([a, b], None, tmp_path / "out", method="linear", seed=1, lam=0.25,
                      threads=2)  # fmt: skip
    rec = _record(tmp_path / "out")
    card = model_card.render(rec, model_card.repeat_command(rec, tmp_path / "again"))
    fm, recipe = _parts(card)
    assert "base_model" not in fm and fm["base_model_relation"] == "merge"
    assert "base_model" not in recipe and recipe["streammerge"]["mixup"] == {"lambda": 0.25}
    assert "λ = 0.25" in card and "--lambda=0.25" in card


def test_dare_drop_written_as_density_only_when_exact():
    assert model_card._density_for(0.5) == 0.5
    assert model_card._density_for(0.3) is None  # 1 - (1 - 0.3) != 0.3 in float64
    assert model_card._density_for(0.25) == 0.75


def test_hf_repo_id():
    assert model_card.hf_repo_id("/c/hub/models--meta-llama--Llama-3-8B/snapshots/9a8b") == (
        "meta-llama/Llama-3-8B", "9a8b",
    )  # fmt: skip
    assert model_card.hf_repo_id("/c/hub/models--gpt2/snapshots/1") == ("gpt2", "1")
    assert model_card.hf_repo_id("/data/models--x") is None
    assert model_card.model_name("/data/my-finetune") == "my-finetune"


CASES = [
    ("dare_ties", {"drop": "0.3,0.6", "alpha": 0.7, "scale": -0.5}, 4000),
    (
        "ties",
        {
            "lam": 0.375,
            "density": [0.4, 0.25],
            "trim_scope": "model",
            "dtype": "fp16",
            "normalize": False,
        },
        None,
    ),
    ("breadcrumbs", {"weights": [-0.2, 0.9], "density": 0.8, "gamma": 0.05}, None),
]


@pytest.mark.parametrize(("method", "kw", "shard"), CASES)
def test_repeat_command_repeats_the_merge(tmp_path, method, kw, shard):
    base, a, b = make_trio(tmp_path)
    extra = {"shard_size": shard} if shard else {}
    streammerge.merge([a, b], base, tmp_path / "out", method=method, seed=9, threads=2,
                      **kw, **extra)  # fmt: skip
    rec = _record(tmp_path / "out")
    cmd = model_card.repeat_command(rec, tmp_path / "again", shard)
    words = shlex.split(cmd)
    assert words[0] == "streammerge"
    assert str(base) not in cmd  # inputs by folder name: run where the models lie
    r = run_cli([*words[1:], "--quiet", "--threads", "2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    again = _record(tmp_path / "again")
    assert again["shards"] == rec["shards"]  # same files, sizes and sha256
    assert again["tensors"] == rec["tensors"]


def test_repeat_command_refuses_what_flags_cannot_say():
    rec = {"method": "ties", "seed": 1, "models": [{"path": "/a"}, {"path": "/b"}],
           "base": {"path": "/c"},
           "recipe": {"method": "ties", "seed": 1, "alpha": 1.0, "mixup": [0.5, 0.5],
                      "lambda": None, "models": [{"density": [0.1, 0.9]}, {"density": 0.5}],
                      "parameters": {}, "trim_scope": "tensor", "dtype": None}}  # fmt: skip
    with pytest.raises(ValueError, match="density"):
        model_card.repeat_command(rec, "/out")


def test_recipe_yaml_reads_back_to_the_same_merge(tmp_path, monkeypatch):
    """The rendered recipe, read by streammerge's mergekit YAML reader, merges the same bytes."""
    mky = pytest.importorskip("streammerge.recipe.mergekit_yaml")
    base, a, b = make_trio(tmp_path)
    streammerge.merge([a, b], base, tmp_path / "out", method="dare_ties", seed=4, alpha=0.6,
                      density="0.75,0.5", threads=2)  # fmt: skip
    rec = _record(tmp_path / "out")
    path = tmp_path / "recipe.yml"
    path.write_text(model_card.recipe_to_yaml(rec))
    monkeypatch.chdir(tmp_path)  # the card names inputs by folder: read it where they lie
    yr = mky.load_recipe(path)
    streammerge.merge([str(m) for m in yr.models], yr.base, tmp_path / "again", threads=2,
                      **yr.recipe)  # fmt: skip
    assert _record(tmp_path / "again")["shards"] == rec["shards"]


def test_cli_card_names_no_local_path_and_repeats_the_command_as_typed(tmp_path):
    base, a, b = make_trio(tmp_path)
    out = tmp_path / "out"
    typed = [str(a), str(b), "--base", str(base), "-o", str(out), "--method", "ties",
             "--density", "0.3"]  # fmt: skip
    r = run_cli([*typed, "--quiet", "--threads", "2", "--memory", "2GB"])
    assert r.returncode == 0, r.stderr
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card  # no local absolute path anywhere
    seed = _record(out)["seed"]
    # as typed (inputs by folder name), -o as OUT, no run-control options, plus the seed
    assert f"streammerge a b --base base -o OUT --method ties --density 0.3 --seed {seed}" in card
    assert "--threads" not in card and "--memory" not in card and "--quiet" not in card
    # a --resume spelled otherwise leaves the finished output and its card alone
    r = run_cli([*typed, "--resume", "--threads", "1"])
    assert r.returncode == 0, r.stderr
    assert (out / "README.md").read_text() == card


def test_card_names_hub_ids_from_the_cache_path_and_name_or_path(tmp_path):
    base, a, b = make_trio(tmp_path)
    snapshot = tmp_path / "hub" / "models--org--base" / "snapshots" / "abc123"
    snapshot.parent.mkdir(parents=True)
    base.rename(snapshot)
    (a / "config.json").write_text(json.dumps({"_name_or_path": "someone/ft-a"}))
    (b / "config.json").write_text(json.dumps({"_name_or_path": str(b)}))  # a path: not an id
    streammerge.merge([a, b], snapshot, tmp_path / "out", method="dare_ties", seed=3,
                      threads=2)  # fmt: skip
    card = (tmp_path / "out" / "README.md").read_text()
    fm, recipe = _parts(card)
    assert fm["base_model"] == ["org/base", "someone/ft-a"]
    assert fm["base_model_relation"] == "merge"
    assert recipe["base_model"] == "org/base@abc123"
    assert [m["model"] for m in recipe["models"]] == ["someone/ft-a", "b"]
    assert "https://huggingface.co/org/base" in card
    assert str(tmp_path) not in card


def test_repeatable_argv_drops_run_control_options_and_only_their_values():
    from streammerge.recipe.parser import build_parser, repeatable_argv

    argv = ["a", "b", "--threads", "2", "--memory=1GB", "--resume", "--seed", "3",
            "--ray", "--density", "0.5", "--ray=auto", "c", "--ray", "host:1", "--quiet"]  # fmt: skip
    # --ray takes an optional value: the next word only when it is not an option, and
    # never after "--ray=ADDR" (the model c stays)
    assert repeatable_argv(build_parser(), argv) == ["a", "b", "--seed", "3", "--density",
                                                     "0.5", "c"]  # fmt: skip
