"""Files beside the weights (config, tokenizer, sentence-transformers modules) copied into
the output: which ones, from which model, and how ``config.json`` follows the vocabulary rule.

``plan_side_files`` decides everything before the merge starts (so a bad ``config.json``
stops the run before a byte is written): a file is copied only when its resolved path lies
inside its model directory, or inside that model's Hugging Face cache repo folder (cache
snapshots are symlinks into ``../../blobs/``); any other symlink is skipped with a notice
naming it. Each planned file is remembered by device and inode, and opened without
following symlinks when it is copied, so a file swapped for a symlink meanwhile is refused.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from streammerge.errors import MergeError
from streammerge.io import safejson
from streammerge.io.paths import inside_roots, model_roots, real
from streammerge.io.reader import INDEX_FILE, ModelDir
from streammerge.notices import notice
from streammerge.plan.plan_types import Plan

#: Files never copied from the base: weights in any format, and our own record.
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".pkl",
)
SKIP_NAMES = {INDEX_FILE, "pytorch_model.bin.index.json", "streammerge.json", "README.md"}
TOKENIZER_PREFIXES = (
    "tokenizer",
    "special_tokens_map",
    "added_tokens",
    "vocab.",
    "merges.txt",
    "spiece",
    "sentencepiece",
)
#: Largest non-weight file copied (bytes).
MAX_COPY_BYTES = 256 * 2**20
#: Limits on config.json when the vocabulary rule rewrites it.
MAX_CONFIG_BYTES = 16 * 2**20
MAX_CONFIG_DEPTH = 64


@dataclass(frozen=True)
class SideFile:
    """One file to put in the output.

    Attributes:
        name: its path in the output (``"1_Pooling/config.json"``).
        src: the resolved source file (None when ``data`` is given).
        dev, ino, size: the source as planned (checked again when it is copied).
        data: the bytes to write instead of a copy (``config.json`` rewritten).
    """

    name: str
    src: Path | None
    dev: int = 0
    ino: int = 0
    size: int = 0
    data: bytes | None = None

    @property
    def size_bytes(self) -> int:
        """Bytes this file adds to the output."""
        return len(self.data) if self.data is not None else self.size


def _candidates(model: ModelDir):
    """(relative path, path) of the files of a model directory that may be copied."""
    root = model.path
    roots = model_roots(root)
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow directory symlinks
        for d in dirnames:
            link = Path(dirpath) / d
            if link.is_symlink() and not inside_roots(real(link), roots):
                notice(f"skipped {link}: a symlink to {real(link)}, outside the model directory")
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if (
                f.startswith(".")
                or f in SKIP_NAMES
                or f.endswith(WEIGHT_SUFFIXES)
                or f.endswith(".tmp")
            ):
                continue
            p = Path(dirpath) / f
            yield p.relative_to(root), p


def _resolve(model: ModelDir, p: Path) -> tuple[Path, os.stat_result] | None:
    """The file behind ``p`` if it may be copied (a regular file inside the model or its
    cache repo, at most MAX_COPY_BYTES); None, with a notice when it is a symlink out."""
    target = real(p)
    if not inside_roots(target, model_roots(model.path)):
        notice(f"skipped {p}: a symlink to {target}, outside the model directory")
        return None
    try:
        st = os.stat(target)
    except OSError:
        return None  # a dangling symlink: nothing to copy
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_COPY_BYTES:
        return None
    return target, st


def plan_side_files(plan: Plan, base: ModelDir, models: Sequence[ModelDir]) -> list[SideFile]:
    """The files to copy from the base (and from the tokenizer's fine-tune under the
    vocabulary rule), decided and checked before the merge.

    With the vocabulary rule in force, tokenizer files come from the fine-tune with the most
    rows and ``config.json``'s ``vocab_size`` follows the output rows. A plan of layer
    slices sets the keys of its ``config_updates`` (``num_hidden_layers``, per-layer lists)
    in the output's copy (the input's file is never touched).

    Raises:
        MergeError: ``config.json`` is needed (vocabulary rule, slices) and is not a
            readable JSON object within the limits.
    """
    tok = models[plan.tokenizer_model] if plan.tokenizer_model is not None else None
    updates = plan.config_updates()  # layer slices: the layer count and per-layer lists
    is_tok = lambda rel: len(rel.parts) == 1 and rel.name.startswith(TOKENIZER_PREFIXES)
    out: list[SideFile] = []
    for rel, p in _candidates(base):
        if tok is not None and is_tok(rel):
            continue
        found = _resolve(base, p)
        if found is None:
            continue
        target, st = found
        if rel.as_posix() == "config.json" and (plan.vocab_rows is not None or updates):
            data = _rewritten_config(target, p, plan.vocab_rows, updates)
            out.append(SideFile("config.json", None, data=data))
            continue
        out.append(SideFile(rel.as_posix(), target, st.st_dev, st.st_ino, st.st_size))
    if tok is not None:
        for rel, p in _candidates(tok):
            if is_tok(rel) and (found := _resolve(tok, p)) is not None:
                target, st = found
                out.append(SideFile(rel.as_posix(), target, st.st_dev, st.st_ino, st.st_size))
    return out


def _rewritten_config(target: Path, p: Path, vocab_rows: int | None, updates: dict) -> bytes:
    """The bytes of ``config.json`` (``target``, found at ``p``) with ``vocab_size`` set to
    ``vocab_rows`` (when it has one and that is not None) and ``updates`` applied.

    Raises:
        MergeError: not a readable JSON object within the limits.
    """
    cfg = safejson.load_file(
        target,
        max_depth=MAX_CONFIG_DEPTH,
        max_bytes=MAX_CONFIG_BYTES,
        todo="fix the base's config.json",
        what="config",
    )
    if not isinstance(cfg, dict):
        raise MergeError("config is not a JSON object", p, None, "fix the base's config.json")
    if vocab_rows is not None and "vocab_size" in cfg:
        cfg["vocab_size"] = vocab_rows
    cfg.update(updates)
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()


def read_side_file(f: SideFile) -> bytes:
    """The bytes of a planned side file, refusing one replaced since it was planned.

    Raises:
        MergeError: the file changed (another inode, size) or cannot be read.
    """
    if f.data is not None:
        return f.data
    try:
        fd = os.open(f.src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise MergeError(
            f"cannot read a side file: {e.strerror}",
            f.src,
            None,
            "do not change inputs during a merge; re-run with --resume",
        ) from None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, st.st_size) != (f.dev, f.ino, f.size):
            raise MergeError(
                "a side file changed during the merge",
                f.src,
                None,
                "do not change inputs during a merge; re-run with --resume",
            )
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) != f.size:
        raise MergeError(
            "a side file changed during the merge",
            f.src,
            None,
            "do not change inputs during a merge; re-run with --resume",
        )
    return data


def copy_side_files(output, plan: Plan, base: ModelDir, models: Sequence[ModelDir]) -> None:
    """Write the side files into the output: those ``output`` planned in its preflight,
    else planned now."""
    files = getattr(output, "side_files", None)
    if files is None:
        files = plan_side_files(plan, base, models)
    for f in files:
        output.write_file(f.name, read_side_file(f))
