"""Where things really are: paths resolved through symlinks, how two paths relate, which
folders a model's files may come from, and mount points.

A merge creates, renames and deletes paths (the staging directory, the journal, the
output, an old output it replaces); every one is resolved and compared with every input
resolved the same way (model directories, their weight files, the side files copied), so
no input can be, contain or lie inside a path the run touches, whatever symlinks say.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from streammerge.errors import MergeError

#: Hugging Face cache repo folders: ``<cache>/models--org--name/{snapshots/<rev>,blobs}``.
HF_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


def real(path: str | os.PathLike) -> Path:
    """``path`` absolute, every symlink resolved (a missing tail is kept as written)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def relation(a: Path, b: Path) -> str | None:
    """How resolved path ``a`` relates to resolved path ``b``: ``"is"``, ``"is inside"``,
    ``"contains"``, or None."""
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def model_roots(model_dir: Path) -> tuple[Path, ...]:
    """Folders a model's files may resolve into: the directory itself, and for a Hugging Face
    cache snapshot (``.../models--org--name/snapshots/<rev>``, whose files are symlinks into
    ``../../blobs/``) that model's repo folder."""
    root = real(model_dir)
    parent = root.parent
    if parent.name == "snapshots" and parent.parent.name.startswith(HF_REPO_PREFIXES):
        return (root, parent.parent)
    return (root,)


def inside_roots(path: Path, roots: Iterable[Path]) -> bool:
    """True when resolved ``path`` lies inside (or is) one of ``roots``."""
    return any(r == path or r in path.parents for r in roots)


def check_within_model(path: Path, model_dir: Path, what: str, todo: str) -> Path:
    """``path`` resolved; refused unless it lies inside the model directory (or its Hugging
    Face cache repo folder).

    Raises:
        MergeError: it resolves elsewhere (a symlink out of the model).
    """
    target = real(path)
    if not inside_roots(target, model_roots(model_dir)):
        raise MergeError(
            f"{what} is a symlink to {target}, outside the model directory",
            path,
            None,
            todo,
        )
    return target


def check_apart(touched: Iterable[tuple], inputs: Iterable[Path]) -> None:
    """Refuse when a path the run creates, renames or deletes is, contains or lies inside an
    input (all paths already resolved).

    Args:
        touched: (what the path is, e.g. ``"the staging directory"``, resolved path[, the
            path as the user named it, for the message]).
        inputs: resolved input paths (model directories and their files).

    Raises:
        MergeError: naming the path, its role and the input.
    """
    inputs = list(inputs)
    for role, path, *shown in touched:
        for inp in inputs:
            rel = relation(path, inp)
            if rel is not None:
                what = "is the input" if rel == "is" else f"{rel} the input"
                named = shown[0] if shown and shown[0] != path else None
                raise MergeError(
                    f"{role} {what} {inp}" + (f" (through {named})" if named else ""),
                    path,
                    None,
                    "choose an output directory apart from every input",
                )


def is_mount_point(path: Path) -> bool:
    """True when ``path`` is a mount point (a directory that cannot be renamed onto)."""
    try:
        return os.path.ismount(path)
    except OSError:
        return False


def identity(path: Path, follow: bool = False) -> list[int] | None:
    """``[st_dev, st_ino]`` of ``path`` (the entry itself unless ``follow``); None if absent."""
    try:
        st = os.stat(path, follow_symlinks=follow)
    except FileNotFoundError:
        return None
    return [st.st_dev, st.st_ino]
