"""Issue 5, "never lose data": a corpus of malformed and hostile inputs and bad output
locations. Each one must be refused before a byte is written: exit code 2, one line
``streammerge: error: <what> (<file>, <tensor>): <what to do>`` naming the file (and the
tensor where there is one), no traceback, no output or staging directory, and every input
byte for byte as it was.

Every case corrupts a fresh trio from ``make_trio`` (base: one file; a: three shards + index;
b: two shards + index) and runs the real CLI in a subprocess.

Issue 12 added the cases after ``unknown_output_dtype``: inputs inside a path the run would
create, rename or delete (the staging directory, the journal, the old-output path), a
directory at the staging path no journal records, JSON nested 1000 deep, a bad or deep
``config.json`` under the vocabulary rule, names UTF-8 cannot hold, a dimension past 64 bits
or of 5000 digits, weights symlinked out of the model, and options out of range (all refused
before the staging directory exists, never after the work).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import conftest
import pytest
import torch
from conftest import dir_digest, make_trio, write_model
from safetensors.torch import save_file

PREFIX = "streammerge: error: "
INDEX = "model.safetensors.index.json"


# --- raw safetensors surgery ---------------------------------------------------------------


def read_st(path: Path) -> tuple[dict, bytes]:
    """(header as a dict, data area bytes) of a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path: Path, header: bytes, data: bytes, n: int | None = None) -> None:
    """Write ``n`` (default: the true header length) as u64 LE, the header bytes, the data."""
    path.write_bytes((len(header) if n is None else n).to_bytes(8, "little") + header + data)


def edit_header(path: Path, fn: Callable[[dict], None]) -> None:
    """Rewrite a file's header JSON through ``fn`` (data area unchanged)."""
    header, data = read_st(path)
    fn(header)
    write_raw(path, json.dumps(header).encode(), data)


def shard_of(model: Path, tensor: str) -> Path:
    """The file of ``model`` holding ``tensor``."""
    index = model / INDEX
    if index.is_file():
        return model / json.loads(index.read_text())["weight_map"][tensor]
    return model / "model.safetensors"


def edit_index(model: Path, fn: Callable[[dict], None]) -> None:
    index = json.loads((model / INDEX).read_text())
    fn(index)
    (model / INDEX).write_text(json.dumps(index, indent=2))


def snapshot(root: Path) -> dict[str, str]:
    """Every entry below ``root`` (hidden ones too): sha256 of files, "dir" for directories."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[str(p.relative_to(root))] = "dir"
        else:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def fake_interrupted_merge(out: Path) -> Path:
    """What a merge killed after its first shard leaves beside ``out``: the staging directory
    and the journal recording it. Returns the staging directory."""
    staging = out.parent / f".{out.name}.streammerge-partial"
    staging.mkdir()
    (staging / "model-00001-of-00002.safetensors").write_bytes(b"finished work")
    st = staging.stat()
    head = {"journal": "streammerge-journal/2", "recipe": "x", "seed": 1, "shards": []}
    lines = [head, {"mkdir": True}, {"staging": [st.st_dev, st.st_ino]}]
    journal = out.parent / f".{out.name}.streammerge-journal"
    journal.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return staging


# --- the corpus ----------------------------------------------------------------------------


@dataclass
class Ctx:
    """One case's world: ``tmp/m/{base,a,b}`` and the output ``tmp/out``."""

    tmp: Path
    base: Path
    a: Path
    b: Path
    out: Path
    extra: list[str] = field(default_factory=list)
    argv: list[str] | None = None
    drop_caps: bool = False  # run the CLI without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH

    def default_argv(self) -> list[str]:
        return [
            str(self.a),
            str(self.b),
            "--base",
            str(self.base),
            "-o",
            str(self.out),
            "--seed",
            "1",
        ]


def truncated_shard(c: Ctx):
    f = shard_of(c.a, "layers.1.mlp.down.weight")
    os.truncate(f, f.stat().st_size // 2)
    return [str(f), "truncated"]


def truncated_to_nothing(c: Ctx):
    f = c.base / "model.safetensors"
    os.truncate(f, 5)
    return [str(f), "too short"]


def header_length_past_end(c: Ctx):
    f = shard_of(c.b, "embed.weight")
    header, data = read_st(f)
    text = json.dumps(header).encode()
    write_raw(f, text, data, n=len(text) + len(data) + 1)  # one byte more than there is
    return [str(f), "past the end"]


def header_length_huge(c: Ctx):
    f = shard_of(c.a, "embed.weight")
    header, data = read_st(f)
    write_raw(f, json.dumps(header).encode(), data, n=2**64 - 1)
    return [str(f), "header length"]


def bad_json(c: Ctx):
    f = shard_of(c.a, "embed.weight")
    header, data = read_st(f)
    text = json.dumps(header).encode()
    write_raw(f, text[: len(text) // 2], data)
    return [str(f), "not valid JSON"]


def header_not_utf8(c: Ctx):
    f = c.base / "model.safetensors"
    header, data = read_st(f)
    text = json.dumps(header).encode()
    write_raw(f, b"\xff\xfe" + text[2:], data)
    return [str(f), "not valid JSON"]


def header_not_object(c: Ctx):
    f = c.base / "model.safetensors"
    _, data = read_st(f)
    write_raw(f, b"[1, 2, 3]", data)
    return [str(f), "not a JSON object"]


def entry_not_object(c: Ctx):
    f = shard_of(c.b, "layers.0.attn.q.weight")
    edit_header(f, lambda h: h.__setitem__("layers.0.attn.q.weight", [1, 2]))
    return [str(f), "layers.0.attn.q.weight", "not a JSON object"]


def metadata_not_object(c: Ctx):
    f = shard_of(c.a, "embed.weight")
    edit_header(f, lambda h: h.__setitem__("__metadata__", "pt"))
    return [str(f), "__metadata__"]


def unknown_dtype(c: Ctx):
    f = shard_of(c.b, "layers.0.mlp.up.weight")
    edit_header(f, lambda h: h["layers.0.mlp.up.weight"].__setitem__("dtype", "F17"))
    return [str(f), "layers.0.mlp.up.weight", "unknown dtype"]


def bad_shape(c: Ctx):
    f = c.base / "model.safetensors"
    edit_header(f, lambda h: h["embed.weight"].__setitem__("shape", [-37, -24]))
    return [str(f), "embed.weight", "bad shape"]


def span_not_shape_times_itemsize(c: Ctx):
    f = shard_of(c.a, "layers.0.attn.q.weight")
    edit_header(f, lambda h: h["layers.0.attn.q.weight"].__setitem__("shape", [24, 23]))
    return [str(f), "layers.0.attn.q.weight", "byte span"]


def overlapping_offsets(c: Ctx):
    f = c.base / "model.safetensors"

    def fn(h):
        # embed.weight (37 x 24 bf16) moved onto the first bytes of layers.1.mlp.down.weight
        lo = h["layers.1.mlp.down.weight"]["data_offsets"][0]
        h["embed.weight"]["data_offsets"] = [lo, lo + 37 * 24 * 2]

    edit_header(f, fn)
    return [str(f), "overlaps"]


def offsets_out_of_range(c: Ctx):
    f = shard_of(c.b, "layers.1.mlp.down.weight")

    def fn(h):
        size = f.stat().st_size
        span = 24 * 61 * 2
        h["layers.1.mlp.down.weight"]["data_offsets"] = [size, size + span]

    edit_header(f, fn)
    return [str(f), "layers.1.mlp.down.weight", "data area"]


def offsets_reversed(c: Ctx):
    f = shard_of(c.a, "layers.0.norm.weight")

    def fn(h):
        lo, hi = h["layers.0.norm.weight"]["data_offsets"]
        h["layers.0.norm.weight"]["data_offsets"] = [hi, lo]

    edit_header(f, fn)
    return [str(f), "layers.0.norm.weight", "data_offsets"]


def tensor_listed_twice_in_header(c: Ctx):
    """Duplicate JSON keys: a naive json.loads silently keeps the last one."""
    f = c.base / "model.safetensors"
    header, data = read_st(f)
    first = json.dumps({"scalar.weight": header["scalar.weight"]})[1:-1]
    text = json.dumps(header)
    write_raw(f, ("{" + first + ", " + text[1:]).encode(), data)
    return [str(f), "scalar.weight", "twice"]


def no_tensors(c: Ctx):
    f = c.b / "model.safetensors"
    shutil.rmtree(c.b)
    c.b.mkdir()
    write_raw(f, json.dumps({"__metadata__": {"format": "pt"}}).encode(), b"")
    return [str(c.b), "no tensors"]


def index_names_missing_file(c: Ctx):
    f = shard_of(c.a, "layers.0.mlp.up.weight")
    f.unlink()
    return [str(c.a / INDEX), f.name, "missing"]


def index_escapes_directory(c: Ctx):
    def fn(index):
        index["weight_map"]["layers.0.mlp.up.weight"] = "../base/model.safetensors"

    edit_index(c.a, fn)
    return [str(c.a / INDEX), "../base/model.safetensors", "outside the model directory"]


def index_bad_json(c: Ctx):
    (c.b / INDEX).write_text('{"weight_map": {"embed.weight": ')
    return [str(c.b / INDEX), "index is not valid JSON"]


def index_without_weight_map(c: Ctx):
    edit_index(c.b, lambda index: index.pop("weight_map"))
    return [str(c.b / INDEX), "weight_map"]


def index_and_header_disagree(c: Ctx):
    files = sorted({*json.loads((c.a / INDEX).read_text())["weight_map"].values()})
    real = shard_of(c.a, "embed.weight").name
    other = next(f for f in files if f != real)
    edit_index(c.a, lambda index: index["weight_map"].__setitem__("embed.weight", other))
    return [str(c.a / INDEX), "embed.weight"]


def index_names_absent_tensor(c: Ctx):
    shard = shard_of(c.b, "embed.weight").name
    edit_index(c.b, lambda index: index["weight_map"].__setitem__("ghost.weight", shard))
    return [str(c.b / INDEX), "ghost.weight", "lacks it"]


def tensor_in_two_shards(c: Ctx):
    name = "layers.0.attn.q.weight"
    home = shard_of(c.a, name)
    other = next(p for p in sorted(c.a.glob("*.safetensors")) if p != home)
    from safetensors.torch import load_file

    tensors = load_file(str(other))
    tensors[name] = load_file(str(home))[name]
    save_file(tensors, str(other), metadata={"format": "pt"})
    return [str(c.a), name, "two shards"]


def _rewrite(model: Path, fn: Callable[[dict], None], shards: int) -> None:
    from conftest import load_dir

    tensors = load_dir(model)
    fn(tensors)
    for p in model.glob("*.safetensors*"):
        p.unlink()
    write_model(model, tensors, shards=shards)


def missing_tensor(c: Ctx):
    _rewrite(c.b, lambda t: t.pop("layers.0.mlp.up.weight"), shards=2)
    return [str(c.b), "layers.0.mlp.up.weight", "missing"]


def tensor_not_in_base(c: Ctx):
    _rewrite(c.a, lambda t: t.__setitem__("extra.weight", torch.zeros(3)), shards=3)
    return [str(c.a), "extra.weight", "not in the base"]


def shape_mismatch(c: Ctx):
    def fn(t):
        t["layers.0.attn.q.weight"] = t["layers.0.attn.q.weight"][:, :23].contiguous()

    _rewrite(c.a, fn, shards=3)
    return [
        str(shard_of(c.a, "layers.0.attn.q.weight")),
        "layers.0.attn.q.weight",
        "shape mismatch",
    ]


def float_here_integer_there(c: Ctx):
    def fn(t):
        t["layers.0.norm.weight"] = torch.zeros(24, dtype=torch.int32)

    _rewrite(c.b, fn, shards=2)
    return [str(shard_of(c.b, "layers.0.norm.weight")), "layers.0.norm.weight", "integer"]


def integer_buffers_differ(c: Ctx):
    def fn(t):
        t["position_ids"] = t["position_ids"].to(torch.int32)

    _rewrite(c.a, fn, shards=3)
    return [str(shard_of(c.a, "position_ids")), "position_ids", "differs"]


def unmergeable_float_dtype(c: Ctx):
    def fn(t):
        t["layers.10.norm.weight"] = t["layers.10.norm.weight"].to(torch.float64)

    _rewrite(c.base, fn, shards=1)
    return [str(c.base / "model.safetensors"), "layers.10.norm.weight", "F64"]


def empty_directory(c: Ctx):
    shutil.rmtree(c.a)
    c.a.mkdir()
    return [str(c.a), "no model.safetensors"]


def file_instead_of_directory(c: Ctx):
    shutil.rmtree(c.b)
    c.b.write_bytes(b"not a model")
    return [str(c.b), "not a directory"]


def directory_does_not_exist(c: Ctx):
    shutil.rmtree(c.b)
    return [str(c.b), "not a directory"]


def unreadable_directory(c: Ctx):
    c.drop_caps = True
    c.a.chmod(0)
    return [str(c.a), "ermission denied"]


def unreadable_shard(c: Ctx):
    c.drop_caps = True
    f = shard_of(c.b, "embed.weight")
    f.chmod(0)
    return [str(f), "ermission denied"]


def output_inside_input(c: Ctx):
    c.out = c.a / "merged"
    return [str(c.out), str(c.a), "inside"]


def output_is_input(c: Ctx):
    c.out = c.b
    return [str(c.out), "is the input"]


def output_contains_inputs(c: Ctx):
    c.out = c.a.parent
    return [str(c.out), "contains the input"]


def file_url_inputs_output_is_one(c: Ctx):
    """Issue 20.1: inputs as file:// URLs, the output one of them, with --overwrite."""
    c.argv = [f"file://{c.a}", f"file://{c.b}", "--base", f"file://{c.base}", "-o", str(c.a),
              "--seed", "1", "--overwrite"]  # fmt: skip
    return [str(c.a), "is the input"]


def mixed_url_and_path_inputs_under_the_output(c: Ctx):
    """Issue 20.1: plain and file:// inputs under D, ``-o D --overwrite``."""
    c.out = c.a.parent
    c.argv = [str(c.a), f"file://{c.b}", "--base", f"file://{c.base}", "-o", str(c.out),
              "--seed", "1", "--overwrite"]  # fmt: skip
    return [str(c.out), "contains the input"]


def file_url_inputs_under_the_output(c: Ctx):
    """Issue 20.1: every input a file:// URL under D, ``-o D --overwrite``."""
    c.out = c.a.parent
    c.argv = [f"file://{c.a}", f"file://{c.b}", "--base", f"file://{c.base}", "-o",
              str(c.out), "--seed", "1", "--overwrite"]  # fmt: skip
    return [str(c.out), "contains the input"]


def output_file_url_is_an_input_path(c: Ctx):
    """The output as a file:// URL naming a plain-path input."""
    c.argv = [str(c.a), str(c.b), "--base", str(c.base), "-o", f"file://{c.b}", "--seed", "1",
              "--overwrite"]  # fmt: skip
    return [str(c.b), "is the input"]


def unsupported_url_scheme(c: Ctx):
    c.argv = [str(c.a), f"ftp://example.invalid{c.b}", "--base", str(c.base), "-o",
              str(c.out), "--seed", "1"]  # fmt: skip
    return ["ftp://", "unsupported URL scheme"]


def output_is_link_to_input(c: Ctx):
    c.out = c.tmp / "link"
    c.out.symlink_to(c.base)
    return [str(c.out), str(c.base)]


def output_not_empty(c: Ctx):
    c.out.mkdir()
    (c.out / "notes.txt").write_text("keep me")
    return [str(c.out), "--overwrite"]


def output_is_a_file(c: Ctx):
    c.out.write_text("keep me")
    return [str(c.out), "not a directory"]


def output_parent_missing(c: Ctx):
    c.out = c.tmp / "nowhere" / "out"
    return [str(c.out.parent), "does not exist"]


def interrupted_staging_left(c: Ctx):
    """A previous merge was killed: without --resume / --overwrite its work is kept."""
    staging = fake_interrupted_merge(c.out)
    return [str(staging), "--resume"]


def drop_rate_one(c: Ctx):
    c.extra = ["--drop", "1"]
    return ["drop rate", "1.0"]


def lambda_with_three_models(c: Ctx):
    c3 = c.a.parent / "c"
    shutil.copytree(c.a, c3)
    c.argv = [
        str(c.a),
        str(c.b),
        str(c3),
        "--base",
        str(c.base),
        "-o",
        str(c.out),
        "--lambda",
        "0.3",
    ]
    return ["--lambda", "2 models"]


def one_model(c: Ctx):
    c.argv = [str(c.a), "--base", str(c.base), "-o", str(c.out)]
    return ["2 fine-tunes"]


def seed_out_of_range(c: Ctx):
    c.extra = ["--seed", str(2**64)]
    return ["seed"]


def memory_too_small(c: Ctx):
    c.extra = ["--memory", "64KiB"]
    return ["--memory"]


def bad_shard_size(c: Ctx):
    c.extra = ["--shard-size", "5 parsecs"]
    return ["not a size"]


def unknown_output_dtype(c: Ctx):
    c.extra = ["--dtype", "int4"]
    return ["int4", "bf16"]


CASES = [
    truncated_shard, truncated_to_nothing, header_length_past_end, header_length_huge, bad_json,
    header_not_utf8, header_not_object, entry_not_object, metadata_not_object, unknown_dtype,
    bad_shape, span_not_shape_times_itemsize, overlapping_offsets, offsets_out_of_range,
    offsets_reversed, tensor_listed_twice_in_header, no_tensors, index_names_missing_file,
    index_escapes_directory, index_bad_json, index_without_weight_map, index_and_header_disagree,
    index_names_absent_tensor, tensor_in_two_shards, missing_tensor, tensor_not_in_base,
    shape_mismatch, float_here_integer_there, integer_buffers_differ, unmergeable_float_dtype,
    empty_directory, file_instead_of_directory, directory_does_not_exist, unreadable_directory,
    unreadable_shard, output_inside_input, output_is_input, output_contains_inputs,
    output_is_link_to_input, output_not_empty, output_is_a_file, output_parent_missing,
    interrupted_staging_left, drop_rate_one, lambda_with_three_models, one_model,
    seed_out_of_range, memory_too_small, bad_shard_size, unknown_output_dtype,
]  # fmt: skip


# --- issue 12: paths the run touches, nesting, names, sizes, options ----------------------


def _partial(c: Ctx) -> Path:
    return c.out.parent / f".{c.out.name}.streammerge-partial"


def input_inside_staging_path_overwrite(c: Ctx):
    """An input model lies inside the staging path: --overwrite must not delete it."""
    c.a = _copy_model(c.a, _partial(c) / "a")
    c.extra = ["--overwrite"]
    return [str(_partial(c)), "staging directory contains the input", str(c.a)]


def input_inside_staging_path_resume(c: Ctx):
    c.a = _copy_model(c.a, _partial(c) / "a")
    c.extra = ["--resume"]
    return [str(_partial(c)), "staging directory contains the input"]


def input_inside_old_output_path(c: Ctx):
    """An input under .out.streammerge-old/, and --overwrite of an existing output."""
    c.a = _copy_model(c.a, c.out.parent / f".{c.out.name}.streammerge-old" / "a")
    c.out.mkdir()
    (c.out / "notes.txt").write_text("an older output")
    c.extra = ["--overwrite"]
    return ["old-output path contains the input", str(c.a)]


def input_is_the_journal_path(c: Ctx):
    c.a = _copy_model(c.a, c.out.parent / f".{c.out.name}.streammerge-journal")
    return ["the journal is the input"]


def journal_hard_link_to_an_input(c: Ctx):
    """A hard link to an input at the journal path: truncating the journal would empty it."""
    os.link(c.base / "config.json", c.out.parent / f".{c.out.name}.streammerge-journal")
    return ["hard links"]


def foreign_directory_at_staging_path(c: Ctx):
    """A directory streammerge did not create sits at the staging path: never deleted."""
    d = _partial(c)
    d.mkdir()
    (d / "precious.txt").write_text("not ours")
    c.extra = ["--overwrite"]
    return [str(d), "no streammerge journal records it"]


def output_symlink_to_nonempty_dir(c: Ctx):
    target = c.tmp / "elsewhere"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    c.out = c.tmp / "link"
    c.out.symlink_to(target)
    return [str(c.out), "not empty", "--overwrite"]


def header_nested_1000_deep(c: Ctx):
    """2 KB of brackets: Python's json would end in a RecursionError traceback."""
    f = shard_of(c.a, "embed.weight")
    _, data = read_st(f)
    write_raw(f, b'{"x": ' + b"[" * 1000 + b"]" * 1000 + b"}", data)
    return [str(f), "header nests too deep"]


def index_nested_1000_deep(c: Ctx):
    (c.b / INDEX).write_text('{"weight_map": {}, "metadata": ' + "[" * 1000 + "]" * 1000 + "}")
    return [str(c.b / INDEX), "nests"]


def _vocab_rule(c: Ctx) -> None:
    """a gets one more embedding row than the base: the vocabulary rule applies."""

    def fn(t):
        t["embed.weight"] = torch.cat([t["embed.weight"], t["embed.weight"][:1]])

    _rewrite(c.a, fn, shards=3)


def config_bad_json_under_vocab_rule(c: Ctx):
    _vocab_rule(c)
    (c.base / "config.json").write_text('{"vocab_size": 37, ')
    return [str(c.base / "config.json"), "not valid JSON"]


def config_nested_deep_under_vocab_rule(c: Ctx):
    _vocab_rule(c)
    (c.base / "config.json").write_text('{"vocab_size": 37, "x": ' + "[" * 500 + "]" * 500 + "}")
    return [str(c.base / "config.json"), "nests"]


def tensor_name_lone_surrogate(c: Ctx):
    f = c.base / "model.safetensors"
    header, data = read_st(f)
    text = json.dumps(header).replace('"scalar.weight"', '"scalar.\\ud800"')
    write_raw(f, text.encode(), data)
    return [str(f), "lone surrogate"]


def zero_elements_dimension_2_70(c: Ctx):
    """safetensors refuses a dimension past 64 bits even when another dimension is 0."""

    def fn(h):
        lo = h["scalar.weight"]["data_offsets"][0]
        h["empty.weight"] = {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [lo, lo]}

    edit_header(c.base / "model.safetensors", fn)
    return [str(c.base / "model.safetensors"), "empty.weight", "bad shape"]


def dimension_of_5000_digits(c: Ctx):
    f = shard_of(c.b, "embed.weight")
    header, data = read_st(f)
    text = json.dumps(header).replace("[37, 24]", "[37, 2" + "0" * 4999 + "]")
    write_raw(f, text.encode(), data)
    return [str(f), "5000 digits", "re-download or re-save"]


def weights_symlinked_out_of_the_model(c: Ctx):
    """model.safetensors is a symlink to a file outside the model directory."""
    elsewhere = c.tmp / "elsewhere"
    elsewhere.mkdir()
    f = c.base / "model.safetensors"
    f.rename(elsewhere / "model.safetensors")
    f.symlink_to(elsewhere / "model.safetensors")
    return [str(f), "outside the model directory"]


def memory_100tb(c: Ctx):
    c.extra = ["--memory", "100TB"]
    return ["--memory 100TB", "memory"]


def memory_1kb(c: Ctx):
    c.extra = ["--memory", "1KB"]
    return ["--memory 1KB is too small", "1MiB"]


def threads_zero(c: Ctx):
    c.extra = ["--threads", "0"]
    return ["--threads must be at least 1"]


def threads_negative(c: Ctx):
    c.extra = ["--threads", "-3"]
    return ["--threads must be at least 1"]


def weights_overflow_float32(c: Ctx):
    c.extra = ["--weights", "1e308,1e308"]
    return ["--weights", "overflows float32"]


def seed_not_an_integer(c: Ctx):
    c.extra = ["--seed", "1.7"]
    return ["--seed", "1.7"]


def argparse_missing_base(c: Ctx):
    c.argv = [str(c.a), str(c.b), "-o", str(c.out)]
    # one piece of advice (issue 21.12: two were glued together)
    return ["needs a base model: pass --base DIR (the model the fine-tunes were tuned from)"]


def argparse_unknown_option(c: Ctx):
    c.extra = ["--lamda", "0.3"]
    return ["--lamda", "did you mean '--lambda'?", "--help"]


def argparse_method_mistyped(c: Ctx):
    c.extra = ["--method", "tie"]
    return ["invalid choice: 'tie'", "did you mean 'ties'?"]


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


CASES += [
    input_inside_staging_path_overwrite, input_inside_staging_path_resume,
    input_inside_old_output_path, input_is_the_journal_path, journal_hard_link_to_an_input,
    foreign_directory_at_staging_path,
    output_symlink_to_nonempty_dir, header_nested_1000_deep, index_nested_1000_deep,
    config_bad_json_under_vocab_rule, config_nested_deep_under_vocab_rule,
    tensor_name_lone_surrogate, zero_elements_dimension_2_70, dimension_of_5000_digits,
    weights_symlinked_out_of_the_model, memory_100tb, memory_1kb, threads_zero,
    threads_negative, weights_overflow_float32, seed_not_an_integer, argparse_missing_base,
    argparse_unknown_option, file_url_inputs_output_is_one,
    mixed_url_and_path_inputs_under_the_output, file_url_inputs_under_the_output,
    output_file_url_is_an_input_path,
    unsupported_url_scheme, argparse_method_mistyped,
]  # fmt: skip


# --- running the CLI -----------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def _drop_dac_caps() -> None:
    """preexec_fn: take the file-permission override away from a root child (after exec)."""
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _can_drop_caps() -> bool:
    if os.geteuid() != 0:
        return True  # permissions already apply
    try:
        r = subprocess.run(["true"], check=False, preexec_fn=_drop_dac_caps, capture_output=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def run_cli(argv: list[str], drop_caps: bool = False) -> subprocess.CompletedProcess:
    preexec = _drop_dac_caps if drop_caps and os.geteuid() == 0 else None
    return conftest.run_cli(argv, timeout=120, preexec_fn=preexec)


def assert_one_line_error(r: subprocess.CompletedProcess, expect: list[str]) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = r.stderr.strip("\n").split("\n")
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith(PREFIX), line
    # "<what> (<file>, <tensor>): <what to do>"; option errors have no file to name
    assert re.fullmatch(r"streammerge: error: .+( \(.+\))?: .+", line), line
    for s in expect:
        assert s in line, f"{s!r} not in {line!r}"
    return line


def _world(tmp_path: Path) -> Ctx:
    base, a, b = make_trio(tmp_path / "m")
    return Ctx(tmp_path, base, a, b, tmp_path / "out")


@pytest.mark.parametrize("case", CASES, ids=[f.__name__ for f in CASES])
def test_hostile_input_refused_before_writing(tmp_path, case):
    c = _world(tmp_path)
    expect = case(c)
    if c.drop_caps and not _can_drop_caps():
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE: chmod does not block reads")
    inputs = [p for p in (c.base, c.a, c.b) if p.is_dir()]
    digests = {p: dir_digest(p) for p in inputs}
    before = snapshot(tmp_path)
    left_before = sorted(tmp_path.rglob("*.streammerge-*"))
    out_existed = c.out.exists() or c.out.is_symlink()
    try:
        r = run_cli((c.argv or c.default_argv()) + c.extra, drop_caps=c.drop_caps)
    finally:
        for p in (c.a, c.b, c.base) if c.drop_caps else ():
            if p.exists():
                for q in (p, *p.rglob("*")):
                    q.chmod(0o755 if q.is_dir() else 0o644)
    assert_one_line_error(r, expect)
    assert {p: dir_digest(p) for p in inputs} == digests, "an input changed"
    assert snapshot(tmp_path) == before, "something was written"
    if not out_existed:
        assert not c.out.exists()
    assert sorted(tmp_path.rglob("*.streammerge-*")) == left_before, "staging left behind"
    assert "command-line options" not in r.stderr or not case.__name__.startswith(
        ("header", "index", "tensor", "dimension", "zero", "config")
    ), "an input problem blamed on the options"


def test_corpus_is_large_enough():
    assert len(CASES) >= 22


def test_debug_shows_the_traceback(tmp_path):
    c = _world(tmp_path)
    expect = unknown_dtype(c)
    r = run_cli(c.default_argv() + ["--debug"])
    assert r.returncode == 2
    assert "Traceback" in r.stderr and "MergeError" in r.stderr
    last = r.stderr.strip("\n").split("\n")[-1]
    assert last.startswith(PREFIX) and all(s in last for s in expect), last
    assert not c.out.exists()


def test_full_disk_refused_before_writing(tmp_path, monkeypatch, capsys):
    """Free space below the planned output: refused in preflight (statvfs patched)."""
    import streammerge.cli
    import streammerge.output.files

    c = _world(tmp_path)
    before = snapshot(tmp_path)
    usage = namedtuple("usage", "total used free")
    seen = []

    def tiny(path):
        seen.append(Path(path))
        return usage(10**9, 10**9 - 4096, 4096)

    monkeypatch.setattr(streammerge.output.files.shutil, "disk_usage", tiny)
    rc = streammerge.cli.main(c.default_argv() + ["--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert seen == [tmp_path]
    line = assert_one_line_error(
        subprocess.CompletedProcess([], rc, "", err), [str(tmp_path), "not enough free disk space"]
    )
    assert "GB" in line
    assert snapshot(tmp_path) == before


def _mount_tmpfs(mnt: Path, size: str, remount: bool = False) -> subprocess.CompletedProcess:
    opts = f"remount,size={size}" if remount else f"size={size}"
    return subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)],
        check=False,
        capture_output=True,
        text=True,
    )


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 600 KB filesystem (tmpfs), when this process may mount one (root in a
    container with CAP_SYS_ADMIN); skipped otherwise."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount(8)")
    r = _mount_tmpfs(mnt, "600k")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_real_full_disk_refused_before_writing(tmp_path, small_tmpfs):
    c = _world(tmp_path)
    c.out = small_tmpfs / "out"
    before = snapshot(tmp_path)
    r = run_cli(c.default_argv())
    assert_one_line_error(r, [str(small_tmpfs), "not enough free disk space"])
    assert snapshot(tmp_path) == before
    assert list(small_tmpfs.iterdir()) == []


def test_second_merge_into_the_same_output_is_refused_by_the_lock(tmp_path):
    """A merge holds the journal's lock; a second merge into the same output is
    refused whatever its flags, and the first one's staging is left alone."""
    c = _world(tmp_path)
    fake_interrupted_merge(c.out)
    fd = os.open(tmp_path / ".out.streammerge-journal", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = snapshot(tmp_path)
        for flags in ([], ["--resume"], ["--overwrite"]):
            r = run_cli(c.default_argv() + flags)
            assert_one_line_error(r, [str(c.out), "another merge is writing this output"])
            assert snapshot(tmp_path) == before, flags
    finally:
        os.close(fd)
    assert not c.out.exists()


def test_disk_filling_up_during_the_merge(tmp_path, small_tmpfs, monkeypatch, capsys):
    """The disk fills while shards are written (another program took the space after the
    preflight, played here by a preflight told there is room): exit 2, one line, the
    partial shard deleted, nothing that looks like a model; with space again, --resume
    finishes."""
    import streammerge.cli
    import streammerge.output.files

    base, a, b = make_trio(tmp_path / "m", big=400_000)  # shards of ~9 KB, ~800 KB, <1 KB
    digests = {p: dir_digest(p) for p in (base, a, b)}
    out = small_tmpfs / "out"
    argv = [
        str(a),
        str(b),
        "--base",
        str(base),
        "-o",
        str(out),
        "--seed",
        "3",
        "--shard-size",
        "200KB",
        "--quiet",
    ]
    usage = namedtuple("usage", "total used free")
    with monkeypatch.context() as m:
        m.setattr(streammerge.output.files.shutil, "disk_usage", lambda p: usage(10**12, 0, 10**12))
        rc = streammerge.cli.main(argv)
    lines = capsys.readouterr().err.strip("\n").split("\n")
    # the merge had started: its notices ("copied from the base: ...") precede the error
    assert not [x for x in lines[:-1] if "error" in x], lines
    line = assert_one_line_error(
        subprocess.CompletedProcess([], rc, "", lines[-1]),
        ["No space left on device", str(out), "--resume"],
    )
    assert "(-, -)" not in line
    assert sorted(p.name for p in small_tmpfs.iterdir()) == [
        ".out.streammerge-journal",
        ".out.streammerge-partial",
    ]
    staging = small_tmpfs / ".out.streammerge-partial"
    assert not [p for p in staging.iterdir() if p.name.endswith(".tmp")]  # partial shard gone
    assert _mount_tmpfs(small_tmpfs, "80m", remount=True).returncode == 0  # > output + margin
    assert streammerge.cli.main(argv + ["--resume"]) == 0
    assert "(1 shard(s) resumed)" in capsys.readouterr().out
    assert [p.name for p in small_tmpfs.iterdir()] == ["out"]
    assert (out / "streammerge.json").is_file()
    assert {p: dir_digest(p) for p in (base, a, b)} == digests


def test_output_that_is_a_mount_point_is_refused_before_writing(tmp_path, small_tmpfs):
    """Issue 12: a mount point cannot be renamed onto; it used to run the whole merge, stage
    and count free space on the parent filesystem, then fail with EBUSY (and again with
    --resume / --overwrite)."""
    c = _world(tmp_path)
    c.out = small_tmpfs
    inputs = {p: dir_digest(p) for p in (c.base, c.a, c.b)}
    before = snapshot(tmp_path)
    for flags in ([], ["--resume"], ["--overwrite"]):
        r = run_cli(c.default_argv() + flags)
        assert_one_line_error(r, [str(small_tmpfs), "mount point", "inside it"])
        assert snapshot(tmp_path) == before, flags
    assert {p: dir_digest(p) for p in (c.base, c.a, c.b)} == inputs
