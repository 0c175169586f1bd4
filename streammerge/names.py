"""Tensor names: their sort order, and which names an output can carry."""

from __future__ import annotations

import re

_DIGITS = re.compile(r"([0-9]+)")  # ASCII digits only: "²" or "٣" are letters here


def natural_key(name: str) -> tuple:
    """Sort key that puts ``layers.2`` before ``layers.10``; a total order on names.

    Runs of ASCII digits compare as numbers (by length without leading zeros, then by
    digits, so a 5000-digit run needs no int conversion); everything else as text. Names
    equal as numbers (``w.1`` and ``w.01``) are ordered by the name itself, so the order
    never depends on how a header lists them.
    """
    parts = _DIGITS.split(name)
    key = tuple((len(p.lstrip("0")), p.lstrip("0")) if i % 2 else p for i, p in enumerate(parts))
    return key, name


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a tensor name in an output shard, or None when it can.

    A header's JSON may spell a lone UTF-16 surrogate (``"\\ud800"``): Python decodes it, but
    it has no UTF-8 form, so no safetensors file can hold it.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return f"the tensor name {name!a} is not valid Unicode (a lone surrogate)"
    if name == "__metadata__":
        return "a tensor may not be named __metadata__"
    return None
