"""Issue 12, "never touch an input, never leak a file, check everything before writing,
resume that cannot be fooled": the cases that are not a plain refusal (those are in the
hostile corpus, ``test_hostile_inputs.py``): symlinks, finished outputs, outputs that
appear or are swapped, killed ``--overwrite``, descriptor limits, API arguments, notices,
non-finite values, name order, and the peak-memory figure.

Every refusal here is checked as in the corpus: exit 2, one line, inputs unchanged
(content hashes), and nothing left behind that the run created.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    dir_digest,
    load_dir,
    make_trio,
    merge_argv,
    run_cli,
    write_model,
)
from test_hostile_inputs import assert_one_line_error, read_st, snapshot

import streammerge
import streammerge.cli
from streammerge.errors import MergeError, OptionError, error_line
from streammerge.output.outdir import OutputDir

SEED = ["--seed", "7"]


def trio(tmp_path: Path, **kw) -> tuple[Path, Path, Path]:
    return make_trio(tmp_path / "m", **kw)


def digests(*dirs: Path) -> dict:
    return {d: dir_digest(d) for d in dirs}


def stat_snapshot(root: Path) -> dict:
    """Every entry below ``root`` with its bytes' hash and its mtime (what "changes
    nothing" means)."""
    snap = snapshot(root)
    return {k: (v, os.lstat(root / k).st_mtime_ns) for k, v in snap.items()}


def hidden_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".streammerge-" in p.name)


# --- 2: side files ---------------------------------------------------------------------------


def test_symlinked_side_file_out_of_the_model_is_skipped_with_a_notice(tmp_path):
    base, a, b = trio(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of any model")
    (base / "leak.txt").symlink_to(secret)
    (base / "leakdir").symlink_to(tmp_path)
    (base / "inside.txt").write_text("kept")
    (base / "alias.txt").symlink_to(base / "inside.txt")  # inside the model: copied
    out = tmp_path / "out"
    r = run_cli(merge_argv([a, b], base, out, *SEED))
    assert r.returncode == 0, r.stderr
    assert f"skipped {base / 'leak.txt'}" in r.stderr and "outside the model" in r.stderr
    assert f"skipped {base / 'leakdir'}" in r.stderr
    assert not (out / "leak.txt").exists() and not (out / "leakdir").exists()
    assert (out / "alias.txt").read_text() == "kept" and not (out / "alias.txt").is_symlink()
    assert "not part of any model" not in "".join(
        p.read_text(errors="replace") for p in out.rglob("*") if p.is_file()
    )


def _hf_snapshot(cache: Path, repo: str, model: Path) -> Path:
    """``model`` laid out as a Hugging Face cache snapshot: files are symlinks into blobs/."""
    root = cache / f"models--org--{repo}"
    snap = root / "snapshots" / "0123abc"
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(model.iterdir()):
        blob = root / "blobs" / f"blob-{f.name}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / blob.name)
    return snap


def test_hugging_face_cache_snapshots_keep_working(tmp_path):
    base, a, b = trio(tmp_path)
    (base / "tokenizer.json").write_text('{"t": 1}')
    cache = tmp_path / "hub"
    hb, ha, hbb = (_hf_snapshot(cache, n, m) for n, m in (("base", base), ("a", a), ("b", b)))
    assert (hb / "model.safetensors").is_symlink()
    r = run_cli(merge_argv([ha, hbb], hb, tmp_path / "out", *SEED))
    assert r.returncode == 0, r.stderr
    assert "skipped" not in r.stderr
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"t": 1}'
    ref = tmp_path / "ref"
    assert run_cli(merge_argv([a, b], base, ref, *SEED)).returncode == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (ref / name).read_bytes()


# --- 7: --resume on a finished output --------------------------------------------------------


def test_resume_on_a_finished_output_changes_nothing(tmp_path):
    base, a, b = trio(tmp_path)
    out = tmp_path / "out"
    argv = merge_argv([a, b], base, out, *SEED)
    assert run_cli(argv).returncode == 0
    before = stat_snapshot(tmp_path)
    for extra in (["--resume"], ["--resume", "--quiet"]):
        r = run_cli(argv + extra)
        assert r.returncode == 0, r.stderr
        assert "already this merge" in r.stderr and "nothing to do" in r.stderr, r.stderr
        assert stat_snapshot(tmp_path) == before
    # without --seed the seed comes from the finished output's record
    r = run_cli(merge_argv([a, b], base, out, "--resume"))
    assert r.returncode == 0 and "nothing to do" in r.stderr, r.stderr
    assert stat_snapshot(tmp_path) == before


def test_resume_on_a_finished_output_refuses_another_recipe(tmp_path):
    base, a, b = trio(tmp_path)
    out = tmp_path / "out"
    assert run_cli(merge_argv([a, b], base, out, *SEED)).returncode == 0
    before = stat_snapshot(tmp_path)
    r = run_cli(merge_argv([a, b], base, out, "--seed", "8", "--resume"))
    assert_one_line_error(r, [str(out), "another recipe", "--overwrite"])
    assert stat_snapshot(tmp_path) == before


def _edit_in_place(f: Path, offset: int) -> None:
    """Flip one byte at ``offset``, then restore the size and mtime (``touch -r``)."""
    st = f.stat()
    with open(f, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x40]))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns


def tensor_offset(f: Path, name: str) -> int:
    header, _ = read_st(f)
    n = int.from_bytes(f.read_bytes()[:8], "little")
    return 8 + n + header[name]["data_offsets"][0]


def test_resume_on_a_finished_output_refuses_an_input_edited_in_place(tmp_path):
    base, a, b = trio(tmp_path)
    out = tmp_path / "out"
    argv = merge_argv([a, b], base, out, *SEED)
    assert run_cli(argv).returncode == 0
    f = base / "model.safetensors"
    _edit_in_place(f, tensor_offset(f, "layers.0.mlp.up.weight") + 5)
    before = stat_snapshot(tmp_path)
    r = run_cli(argv + ["--resume"])
    assert_one_line_error(r, [str(f), "layers.0.mlp.up.weight", "changed", "--overwrite"])
    assert stat_snapshot(tmp_path) == before


# --- 5: where the output really is, and what may replace it ----------------------------------


def test_output_symlink_to_an_empty_directory(tmp_path):
    base, a, b = trio(tmp_path)
    target = tmp_path / "disk" / "merged"
    target.mkdir(parents=True)
    link = tmp_path / "out"
    link.symlink_to(target)
    argv = merge_argv([a, b], base, link, *SEED)
    r = run_cli(argv)
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and (target / "streammerge.json").is_file()
    assert hidden_leftovers(tmp_path) == [] and hidden_leftovers(target.parent) == []
    before = stat_snapshot(tmp_path)
    assert run_cli(argv + ["--resume"]).returncode == 0
    assert stat_snapshot(tmp_path) == before


def test_output_symlink_to_a_finished_model_with_overwrite(tmp_path):
    base, a, b = trio(tmp_path)
    target = tmp_path / "disk" / "merged"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("an older model")
    link = tmp_path / "out"
    link.symlink_to(target)
    r = run_cli(merge_argv([a, b], base, link, *SEED, "--overwrite"))
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and not (target / "old.txt").exists()
    assert (target / "streammerge.json").is_file()
    assert hidden_leftovers(target.parent) == []


def test_output_appearing_before_the_staging_is_not_replaced(tmp_path, monkeypatch, capsys):
    """A second merge into the same output, delayed between its preflight and its staging,
    finds the first one's finished output: refused, nothing replaced."""
    base, a, b = trio(tmp_path)
    out = tmp_path / "out"
    real_open = OutputDir.open

    def late(self, *args):
        out.mkdir()
        (out / "model.safetensors").write_text("the first merge's output")
        return real_open(self, *args)

    monkeypatch.setattr(OutputDir, "open", late)
    rc = streammerge.cli.main(merge_argv([a, b], base, out, *SEED, "--quiet"))
    err = capsys.readouterr().err
    assert_one_line_error(subprocess.CompletedProcess([], rc, "", err), [str(out), "not empty"])
    assert (out / "model.safetensors").read_text() == "the first merge's output"
    assert hidden_leftovers(tmp_path) == []


def test_output_appearing_during_the_merge_is_not_replaced(tmp_path, monkeypatch, capsys):
    """The output appears while shards are written: the final step refuses to replace it,
    keeps the work, and --resume --overwrite finishes."""
    base, a, b = trio(tmp_path)
    out = tmp_path / "out"
    argv = merge_argv([a, b], base, out, *SEED, "--quiet")
    real_commit = OutputDir.commit_shard

    def commit(self, *args):
        real_commit(self, *args)
        out.mkdir(exist_ok=True)
        (out / "model.safetensors").write_text("another merge's output")

    with monkeypatch.context() as m:
        m.setattr(OutputDir, "commit_shard", commit)
        rc = streammerge.cli.main(argv)
    err = capsys.readouterr().err
    assert_one_line_error(
        subprocess.CompletedProcess([], rc, "", err), [str(out), "appeared", "--resume --overwrite"]
    )
    assert (out / "model.safetensors").read_text() == "another merge's output"
    assert hidden_leftovers(tmp_path) == [".out.streammerge-journal", ".out.streammerge-partial"]
    assert streammerge.cli.main(argv + ["--resume", "--overwrite"]) == 0
    assert "resumed" in capsys.readouterr().out
    assert hidden_leftovers(tmp_path) == [] and (out / "streammerge.json").is_file()


KILL_AT = """
import os, sys
import streammerge.output.finish as fin
import streammerge.output.outdir as o
{patch}
import streammerge.cli
sys.exit(streammerge.cli.main({argv!r}))
"""


def _killed_run(argv: list[str], patch: str) -> int:
    code = KILL_AT.format(patch=patch, argv=argv)
    r = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300
    )
    return r.returncode


def _old_model(out: Path, trio_dirs, seed: str) -> dict[str, str]:
    base, a, b = trio_dirs
    assert run_cli(merge_argv([a, b], base, out, "--seed", seed)).returncode == 0
    return dir_digest(out)


def test_overwrite_killed_after_the_exchange_is_cleaned_up(tmp_path):
    """Killed after the atomic exchange, before the old model is removed: the output is the
    new model, whole; the next run on it removes the old one (recorded in the journal)."""
    dirs = trio(tmp_path)
    out = tmp_path / "out"
    _old_model(out, dirs, "1")
    ref = tmp_path / "ref"
    _old_model(ref, dirs, "7")
    argv = merge_argv([dirs[1], dirs[2]], dirs[0], out, *SEED, "--overwrite")
    rc = _killed_run(argv, "o.OutputDir._remove_old = lambda self, swap: os._exit(9)")
    assert rc == 9
    assert dir_digest(out) == dir_digest(ref)  # the new model is in place, whole
    assert hidden_leftovers(tmp_path) == [".out.streammerge-journal", ".out.streammerge-partial"]
    r = run_cli(merge_argv([dirs[1], dirs[2]], dirs[0], out, *SEED, "--resume"))
    assert r.returncode == 0 and "nothing to do" in r.stderr, r.stderr
    assert hidden_leftovers(tmp_path) == [] and dir_digest(out) == dir_digest(ref)


def test_overwrite_killed_before_the_exchange_keeps_the_old_model(tmp_path):
    dirs = trio(tmp_path)
    out = tmp_path / "out"
    old = _old_model(out, dirs, "1")
    argv = merge_argv([dirs[1], dirs[2]], dirs[0], out, *SEED, "--overwrite")
    rc = _killed_run(argv, "fin.renameat2 = lambda *a: os._exit(9)")
    assert rc == 9 and dir_digest(out) == old
    assert run_cli(argv + ["--resume"]).returncode == 0
    ref = tmp_path / "ref"
    _old_model(ref, dirs, "7")
    assert dir_digest(out) == dir_digest(ref) and hidden_leftovers(tmp_path) == []


def test_overwrite_without_exchange_killed_between_renames_is_completed(tmp_path):
    """Where the filesystem cannot exchange (EINVAL), two journaled renames: killed
    between them, the next run puts the new model in place and removes the old one."""
    dirs = trio(tmp_path)
    out = tmp_path / "out"
    _old_model(out, dirs, "1")
    patch = """
import errno
def no_exchange(*a):
    raise OSError(errno.EINVAL, "no RENAME_EXCHANGE here")
fin.renameat2 = no_exchange
real_finish, real_rename = o.OutputDir.finish, os.rename
def finish(self):
    def rename(src, dst):
        real_rename(src, dst)
        os._exit(9)
    o.os.rename = rename
    real_finish(self)
o.OutputDir.finish = finish
"""
    argv = merge_argv([dirs[1], dirs[2]], dirs[0], out, *SEED, "--overwrite")
    assert _killed_run(argv, patch) == 9
    assert not out.exists()
    assert hidden_leftovers(tmp_path) == [
        ".out.streammerge-journal",
        ".out.streammerge-old",
        ".out.streammerge-partial",
    ]
    r = run_cli(merge_argv([dirs[1], dirs[2]], dirs[0], out, *SEED, "--resume"))
    assert r.returncode == 0, r.stderr
    ref = tmp_path / "ref"
    _old_model(ref, dirs, "7")
    assert dir_digest(out) == dir_digest(ref) and hidden_leftovers(tmp_path) == []


# --- 4: descriptors --------------------------------------------------------------------------


def test_more_input_shards_than_the_open_file_limit(tmp_path):
    """1200 shards per model (3600 files) with ``ulimit -n 1024``: read within the limit."""
    g = torch.Generator().manual_seed(0)
    names = [f"layers.{i}.w" for i in range(1200)]
    base_t = {n: torch.randn(4, generator=g) for n in names}
    dirs = []
    for k, name in enumerate(("base", "a", "b")):
        ts = {n: v + 0.01 * k for n, v in base_t.items()}
        dirs.append(write_model(tmp_path / "m" / name, ts, shards=1200))
    flat = [write_model(tmp_path / "flat" / d.name, load_dir(d)) for d in dirs]

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    out = tmp_path / "out"
    r = run_cli(merge_argv(dirs[1:], dirs[0], out, *SEED, "--quiet"), preexec_fn=limit)
    assert r.returncode == 0, r.stderr
    ref = tmp_path / "ref"
    assert run_cli(merge_argv(flat[1:], flat[0], ref, *SEED, "--quiet")).returncode == 0
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()


# --- 4, 8: API arguments ---------------------------------------------------------------------


def test_api_arguments_are_checked_before_anything_is_written(tmp_path):
    base, a, b = trio(tmp_path)
    out = tmp_path / "out"
    ok = {"models": [a, b], "base": base, "out": out}
    bad = [
        {"models": str(a)},  # a string where a list is expected: not walked by character
        {"models": [a]},
        {"models": [a, 5]},
        {"base": None},
        {"out": 3},
        {"seed": 1.7},
        {"seed": -1},
        {"seed": True},
        {"threads": 0},
        {"threads": 2.5},
        {"lam": float("nan")},
        {"weights": "x,y"},
        {"weights": [1e308, 1e308]},
        {"drop": 1.0},
        {"drop": [0.5, "a"]},
        {"memory": "100TB"},
        {"memory": [1]},
        {"shard_size": 0},
        {"backend": "gpu"},
        {"device": 1},
        {"overwrite": "yes"},
        {"on_bytes": 5},
        {"alpha": 0},
        {"scale": float("inf")},
        {"dtype": 16},
    ]
    before = snapshot(tmp_path)
    for kw in bad:
        args = {**ok, **kw}
        with pytest.raises(ValueError) as e:
            streammerge.merge(args.pop("models"), args.pop("base"), args.pop("out"), **args)
        assert isinstance(e.value, OptionError) and isinstance(e.value, MergeError), kw
        assert "\n" not in str(e.value), kw
        assert snapshot(tmp_path) == before, kw


# --- 8: notices, non-finite values, names ---------------------------------------------------


def test_lambda_outside_the_unit_interval_is_allowed_with_a_notice(tmp_path):
    base, a, b = trio(tmp_path)
    r = run_cli(merge_argv([a, b], base, tmp_path / "out", *SEED, "--lambda", "1.5"))
    assert r.returncode == 0, r.stderr
    assert "--lambda 1.5 is outside [0, 1]" in r.stderr


def test_nonfinite_values_stop_the_merge_unless_allowed(tmp_path):
    """Weights of 1e8 overflow fp16: every merged value is Inf. The merge stops at the end
    (one line, no blank line, inputs unchanged, the work kept); --resume --allow-nonfinite
    keeps them and says how many."""
    base, a, b = trio(tmp_path)
    before = digests(base, a, b)
    out = tmp_path / "out"
    argv = merge_argv([a, b], base, out, *SEED, "--dtype", "fp16", "--weights", "1e8,1e8")
    r = run_cli(argv)
    lines = r.stderr.rstrip("\n").split("\n")
    assert "" not in lines, "a blank line before the error"
    assert [x for x in lines if "error" in x] == lines[-1:]  # notices, then the one error
    last = subprocess.CompletedProcess([], r.returncode, r.stdout, lines[-1])
    assert_one_line_error(last, ["non-finite", "--allow-nonfinite", "--resume"])
    assert not out.exists() and digests(base, a, b) == before
    r = run_cli(argv + ["--resume", "--allow-nonfinite"])
    assert r.returncode == 0, r.stderr
    assert "kept" in r.stderr and "non-finite values the merge produced" in r.stderr
    assert hidden_leftovers(tmp_path) == []
    merged = load_dir(out)["layers.0.mlp.up.weight"]
    assert not torch.isfinite(merged.float()).all()


def test_nonfinite_values_stop_at_the_first_shard_that_has_them(tmp_path):
    """Issue 20.12: one tensor overflows fp16 (both fine-tunes near 6e4, weights 1, 1). The
    merge (task vectors near 6e4 each) stops before that shard is committed, naming it; the shards after it
    are never written; inputs unchanged, nothing published; --resume --allow-nonfinite
    completes."""
    base, a, b = trio(tmp_path, dtype="F16")
    name = "layers.1.mlp.down.weight"
    for d in (a, b):
        ts = load_dir(d)
        ts[name] = torch.full_like(ts[name], 60000.0)
        write_model(d, ts, shards=2)
    before = digests(base, a, b)
    out = tmp_path / "out"
    argv = merge_argv([a, b], base, out, *SEED, "--method", "task_arithmetic", "--weights", "1,1",
                      "--shard-size", "1KB")  # fmt: skip
    r = run_cli(argv)
    lines = r.stderr.rstrip("\n").split("\n")
    assert [x for x in lines if "error" in x] == lines[-1:]  # notices, then the one error
    last = subprocess.CompletedProcess([], r.returncode, r.stdout, lines[-1])
    assert_one_line_error(last, ["non-finite", name, "--allow-nonfinite"])
    assert not out.exists() and digests(base, a, b) == before
    staging = [p for p in tmp_path.iterdir() if ".streammerge-" in p.name and p.is_dir()]
    assert len(staging) == 1
    written = sorted(p.name for p in staging[0].glob("model-*.safetensors*"))
    assert written, "the shards before the overflowing tensor are kept for --resume"
    failing = [w for w in written if w.endswith(".tmp")]
    assert len(failing) == 1, written  # the overflowing shard, not committed
    index = {int(w.split("-")[1]) for w in written}
    assert max(index) == int(failing[0].split("-")[1]), "a shard after it was written"
    r = run_cli(argv + ["--resume", "--allow-nonfinite"])
    assert r.returncode == 0, r.stderr
    assert not torch.isfinite(load_dir(out)[name].float()).all()
    assert torch.isfinite(load_dir(out)["embed.weight"].float()).all()


def test_nonfinite_values_copied_from_inputs_are_not_the_merges(tmp_path):
    base, a, b = trio(tmp_path)
    ts = load_dir(base)
    ts["pooler.weight"][0, 0] = float("inf")  # only the base has it: copied as it is
    write_model(base, ts)
    r = run_cli(merge_argv([a, b], base, tmp_path / "out", *SEED))
    assert r.returncode == 0, r.stderr
    assert "1 non-finite values come from inputs that have them" in r.stderr


def test_file_url_inputs_merge_as_their_paths(tmp_path):
    """Issue 20.1: a file:// input is the local directory it names (one resolver): the same
    bytes as plain paths, recorded by path."""
    base, a, b = trio(tmp_path)
    plain, url = tmp_path / "plain", tmp_path / "url"
    r = run_cli(merge_argv([a, b], base, plain, *SEED))
    assert r.returncode == 0, r.stderr
    r = run_cli([f"file://{a}", f"file://{b}", "--base", f"file://{base}", "-o",
                 f"file://{url}", *SEED])  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert load_dir(url).keys() == load_dir(plain).keys()
    for f in plain.glob("*.safetensors"):
        assert (url / f.name).read_bytes() == f.read_bytes()
    import json

    rec = json.loads((url / "streammerge.json").read_text())
    assert rec["models"][0]["path"] == str(a.resolve())


def test_models_of_different_architectures_are_named_as_such(tmp_path):
    """Issue 21.12: a GPT-2 fine-tune beside Llama ones: the error says the architectures
    differ (from config.json), not only which tensors are missing."""
    import json

    base, a, b = trio(tmp_path)
    for d in (base, a):
        (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    gpt2 = write_model(tmp_path / "gpt2", {"wte.weight": torch.zeros(4, 3)},
                       config={"architectures": ["GPT2LMHeadModel"]})  # fmt: skip
    r = run_cli(merge_argv([a, gpt2], base, tmp_path / "out", *SEED))
    line = assert_one_line_error(r, ["tensor(s) in a fine-tune are not in the base"])
    assert "the architectures differ (GPT2LMHeadModel vs LlamaForCausalLM)" in line


def test_name_order_does_not_depend_on_the_header_order(tmp_path):
    """``w.1`` and ``w.01`` sort equal as numbers: the name breaks the tie."""
    g = torch.Generator().manual_seed(0)
    ts = {n: torch.randn(3, generator=g) for n in ("w.1", "w.01", "w1²", "w.10")}
    outs = []
    for k, order in enumerate((list(ts), list(reversed(ts)))):
        root = tmp_path / f"order{k}"
        dirs = [
            write_model(root / n, {x: ts[x] + 0.01 * i for x in order})
            for i, n in enumerate(("base", "a", "b"))
        ]
        r = run_cli(merge_argv(dirs[1:], dirs[0], root / "out", *SEED))
        assert r.returncode == 0, r.stderr  # "w1²" is a name like any other
        outs.append((root / "out" / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]


# --- 10: peak memory -------------------------------------------------------------------------

LARGE_PARENT = """
import os, resource, subprocess, sys
held = b"x" * (1200 * 2**20)  # resident in the parent
p = subprocess.Popen([sys.executable, "-m", "streammerge.cli", *sys.argv[1:]],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
out, err = p.communicate()
print(p.returncode, out.strip().splitlines()[-1] if out.strip() else err, sep="\\n")
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
"""


def test_peak_rss_is_the_process_own_when_started_by_a_large_process(tmp_path):
    base, a, b = trio(tmp_path)
    argv = merge_argv([a, b], base, tmp_path / "out", *SEED, "--quiet")
    r = subprocess.run(
        [sys.executable, "-c", LARGE_PARENT, *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    rc, line, child_maxrss_mib = r.stdout.strip().split("\n")
    assert rc == "0", r.stdout + r.stderr
    peak = float(line.split("peak RSS ")[1].split(" MiB")[0])
    assert int(child_maxrss_mib) >= 1200, "ru_maxrss should carry the parent's 1.2 GB over"
    assert 10 < peak < 800, line


# --- 8: error lines --------------------------------------------------------------------------


def test_io_errors_name_the_file_they_happened_on():
    code, line = error_line(OSError(errno.EIO, "Input/output error", "/data/a/x.safetensors"), "o")
    assert code == 2 and "/data/a/x.safetensors" in line and "(o)" not in line
    assert "device" in line
    code, line = error_line(OSError(errno.ENOMEM, "Cannot allocate memory"), "/out")
    assert "/out" not in line and "--memory" in line
    code, line = error_line(OSError(errno.ENOSPC, "No space left on device"), "/out")
    assert "/out" in line and "--resume" in line
    code, line = error_line(RecursionError("maximum recursion depth exceeded"))
    assert code == 1 and "report this bug" in line and "\n" not in line


def test_ctrl_c_at_any_moment_is_one_line(tmp_path):
    """From the moment the command's code runs (after ~0.3 s of interpreter and package
    start-up, before which Python itself reports a KeyboardInterrupt)."""
    base, a, b = trio(tmp_path, big=3_000_000)
    argv = merge_argv([a, b], base, tmp_path / "out", *SEED, "--memory", "2MiB")
    t0 = time.monotonic()
    assert run_cli(argv).returncode == 0
    whole = time.monotonic() - t0  # fixed delays all came after the end on a quiet machine
    delays, checked = [f * whole for f in (0.5, 0.65, 0.8, 0.9, 0.95)], 0
    while delays:
        delay = delays.pop(0)
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        shutil.rmtree(tmp_path / ".out.streammerge-partial", ignore_errors=True)
        (tmp_path / ".out.streammerge-journal").unlink(missing_ok=True)
        p = subprocess.Popen(
            [sys.executable, "-m", "streammerge.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # SIGINT as a terminal gives it: a child inherits an ignored SIGINT (the test
            # process may ignore it under xdist), and Python then raises no KeyboardInterrupt
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        if p.returncode == 0 or "streammerge: read" in out:
            continue  # finished first (a signal during interpreter exit: -SIGINT, no line)
        if p.returncode == -signal.SIGINT and delay < 6:
            # Python's own KeyboardInterrupt: the interpreter was still importing (a loaded
            # machine starts slower), the command's code had not run; try a little later
            delays.insert(0, delay + 0.1 * whole)
            continue
        assert p.returncode == 130, (delay, err)
        checked += 1
        lines = [x for x in err.split("\n") if x and not x.startswith("streammerge: seed")]
        lines = [x for x in lines if "writing" not in x and "copied from the base" not in x]
        assert len(lines) == 1 and "interrupted" in lines[0], (delay, err)
    assert checked >= 1, "every merge finished before its Ctrl-C"



@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")
def test_ctrl_c_as_the_journal_closes_is_the_interrupt(tmp_path, monkeypatch):
    """A Ctrl-C that lands just after the finished merge closes its journal's descriptor
    (the output has appeared): the cleanup that follows must not close that descriptor a
    second time. Before, it did, and its EBADF replaced the interrupt ("Bad file
    descriptor", exit 2, seen once in test_ctrl_c_at_any_moment_is_one_line); had another
    thread opened a file meanwhile, it would have closed that file instead."""
    base, a, b = trio(tmp_path)
    out = tmp_path / "out"
    real_close, hits = os.close, []

    def close(fd: int) -> None:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        real_close(fd)
        if "streammerge-journal" in target and out.is_dir() and not hits:
            hits.append(fd)
            raise KeyboardInterrupt  # as Python raises it: after the call returned

    monkeypatch.setattr(os, "close", close)
    with pytest.raises(KeyboardInterrupt):
        streammerge.merge([a, b], base, out, seed=7)
    monkeypatch.undo()
    assert hits, "the journal's descriptor was never closed with the output in place"
    with pytest.raises(OSError):  # closed exactly once: the number is free (or not ours)
        os.fstat(hits[0])
    assert (out / "model.safetensors").is_file() or any(out.glob("*.safetensors"))


def test_ctrl_c_just_after_the_staging_mkdir_can_be_resumed(tmp_path, monkeypatch):
    """A Ctrl-C that lands just after the staging directory is made: the journal that
    records the mkdir is kept, so the empty directory is explained and ``--resume`` goes
    on. Before, the interrupt's cleanup deleted the journal, and every later run (plain,
    ``--resume``, ``--overwrite``) refused the unexplained staging directory."""
    from streammerge.output import outdir

    base, a, b = trio(tmp_path)
    out = tmp_path / "out"
    real_mkdir, hits = os.mkdir, []

    def mkdir(path, *args, **kw):
        real_mkdir(path, *args, **kw)
        if str(path).endswith(".streammerge-partial") and not hits:
            hits.append(path)
            raise KeyboardInterrupt

    monkeypatch.setattr(outdir.os, "mkdir", mkdir)
    with pytest.raises(KeyboardInterrupt):
        streammerge.merge([a, b], base, out, seed=7)
    monkeypatch.undo()
    assert hits and Path(hits[0]).is_dir() and not out.exists()
    streammerge.merge([a, b], base, out, seed=7, resume=True)
    assert any(out.glob("*.safetensors")) and not Path(hits[0]).exists()

# --- 8: a header of many tensors --------------------------------------------------------------

BIG_HEADER = """
import sys
from streammerge.sysinfo import peak_rss_bytes
before = peak_rss_bytes()
from streammerge.io.reader import open_model
m = open_model(sys.argv[1])
print(len(m.tensors), before, peak_rss_bytes())
"""


def test_a_header_of_300k_tensors_parses_in_bounded_memory(tmp_path):
    """Entries become tuples as they are parsed and overlaps are checked with numpy: 1M
    tensors (an 89 MB header) peak at 682 MiB, 6.8 s (before: 1046 MiB, 9.1 s); here 300k must stay
    under 700 bytes a tensor above the start-up figure."""
    n = 300_000
    entries = ",".join(
        f'"model.layers.{i}.w":{{"dtype":"BF16","shape":[1],"data_offsets":[{2 * i},{2 * i + 2}]}}'
        for i in range(n)
    )
    raw = ('{"__metadata__":{"format":"pt"},' + entries + "}").encode()
    raw += b" " * (-len(raw) % 8)
    d = tmp_path / "big"
    d.mkdir()
    (d / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(2 * n))
    r = subprocess.run(
        [sys.executable, "-c", BIG_HEADER, str(d)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    count, before, peak = map(int, r.stdout.split())
    assert count == n, r.stderr
    assert (peak - before) / n < 700, (peak - before) / n
