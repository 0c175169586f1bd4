"""How a model card names its inputs (``streammerge.output.model_card``).

A path inside a Hugging Face cache (``.../models--org--name/snapshots/<rev>``) is
``org/name``; else a label the recipe gave (a repo id as written); else the directory name.
``hub_id`` finds an input's Hub repo id, ``model_name`` a short name, ``model_ref`` how the
card's recipe and command name it (never a local absolute path).
"""

from __future__ import annotations

import re
from pathlib import Path, PurePath

from streammerge.io.inputs import is_repo_id

_HF_CACHE_DIR = re.compile(r"^models--(.+)$")


def hf_repo_id(path: str | PurePath) -> tuple[str, str | None] | None:
    """(``org/name``, revision) when ``path`` lies in a Hugging Face cache
    (``.../models--org--name/snapshots/<revision>/...``), else None."""
    parts = PurePath(path).parts
    for i, part in enumerate(parts):
        m = _HF_CACHE_DIR.match(part)
        if m and i + 1 < len(parts) and parts[i + 1] == "snapshots":
            rev = parts[i + 2] if i + 2 < len(parts) else None
            return m.group(1).replace("--", "/"), rev
    return None


_HF_URL = re.compile(r"^(?:hf://(?:models/)?|https?://huggingface\.co/)([^/@\s]+/[^/@\s]+)")


def hub_id(path: str | None, label: str | None = None, name_or_path: str | None = None):
    """The Hugging Face repo id of an input, or None: from a cache snapshot path, an
    ``hf://`` or ``huggingface.co`` URL, a repo-id label as written, or the ``_name_or_path``
    its ``config.json`` gives (when that is a repo id, not a local path)."""
    for p in (path, label):
        if p:
            m = _HF_URL.match(str(p))
            if m:
                return m.group(1)
    if path and "://" not in str(path):
        hf = hf_repo_id(path)
        if hf is not None:
            return hf[0]
    if label and _looks_like_repo(label):
        return label.partition("@")[0]
    if name_or_path and _looks_like_repo(name_or_path):
        return name_or_path
    return None


def _looks_like_repo(label: str) -> bool:
    """A label written as a repo id (``is_repo_id``) that is not a local folder."""
    return is_repo_id(label) and not Path(label).expanduser().is_dir()


def model_name(path: str | None, label: str | None = None, name_or_path: str | None = None) -> str:
    """A short name of an input: its Hub repo id where known (``hub_id``), else the
    directory's (or URL's last part's) name."""
    known = hub_id(path, label, name_or_path)
    if known is not None:
        return known
    if path:
        return PurePath(str(path).rstrip("/")).name or str(path)
    return PurePath(label).name if label else "unknown"


def model_ref(path: str | None, label: str | None = None, name_or_path: str | None = None) -> str:
    """How the card's recipe and command name an input: ``org/name@revision`` for a
    Hugging Face cache snapshot, a repo-id label as written, a URL, a relative path as the
    user wrote it; never a local absolute path (a card is made to be published): the Hub
    id from ``config.json``'s ``_name_or_path``, else the directory's name."""
    if path and "://" not in str(path):
        hf = hf_repo_id(path)
        if hf is not None:
            return f"{hf[0]}@{hf[1]}" if hf[1] else hf[0]
    if label and _looks_like_repo(label):
        return label
    if label and "://" in label and not label.startswith("file://"):
        return label
    if path and "://" in str(path) and not str(path).startswith("file://"):
        return str(path)
    if label and not label.startswith(("/", "~", "file://")):
        return label
    return model_name(path, None, name_or_path)
