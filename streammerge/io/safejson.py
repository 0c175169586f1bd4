"""JSON from input files, parsed with limits: size, nesting depth, integer length.

Python's ``json`` recurses once per nesting level, so 1000 nested brackets (2 KB) end in a
RecursionError, and a 5000-digit number in a ValueError about int conversion; neither
names the file. ``loads`` parses with integers of at most MAX_INT_DIGITS digits and no
NaN / Infinity, turns a RecursionError (the C parser's own guard, so no stack is at risk)
and every other failure into a one-line MergeError naming the file, then measures the
depth of what it parsed (a loop, not a recursion) against the caller's limit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from streammerge.errors import MergeError

#: Most digits an integer may have (2**64 has 20; a little more lets the shape check name
#: the tensor of a 2**70 dimension).
MAX_INT_DIGITS = 40


class _Refused(ValueError):
    pass


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"a number of {len(text)} digits")
    return int(text)


def _constant(text: str):
    raise _Refused(f"{text} is not a JSON number")


def nesting_depth(obj, stop: int | None = None) -> int:
    """Deepest nesting of parsed JSON (a scalar is 0, ``{}`` is 1); a loop, so any depth
    is safe. Stops looking once ``stop`` is exceeded."""
    deepest = 0
    todo = [(obj, 1)]
    while todo:
        x, d = todo.pop()
        if isinstance(x, dict):
            x = x.values()
        elif not isinstance(x, (list, tuple)):
            continue
        deepest = max(deepest, d)
        if stop is not None and deepest > stop:
            return deepest
        todo.extend((v, d + 1) for v in x if isinstance(v, (dict, list, tuple)))
    return deepest


def loads(
    raw: bytes,
    path: str | Path,
    *,
    max_depth: int | None,
    max_bytes: int,
    todo: str,
    what: str = "JSON",
    object_pairs_hook: Callable | None = None,
):
    """Parse ``raw`` (UTF-8 JSON read from ``path``) within the limits.

    Args:
        max_depth: most nested arrays / objects allowed (the root object is depth 1); None:
            the caller checks the structure itself (a RecursionError is still caught).
        max_bytes: longest text accepted.
        todo: what to do when it is refused (the end of the error line).
        what: what the text is, for the error line (``"header"``, ``"index"``).
        object_pairs_hook: passed to ``json.loads``; a ValueError it raises is reported.

    Raises:
        MergeError: too long, too deep, not UTF-8, not JSON, an integer of more than
            MAX_INT_DIGITS digits, NaN / Infinity, or refused by the hook.
    """
    if len(raw) > max_bytes:
        raise MergeError(f"{what} is {len(raw)} bytes, more than {max_bytes}", path, None, todo)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MergeError(
            f"{what} is not valid JSON (not UTF-8: {e.reason} at byte {e.start})", path, None, todo
        ) from None
    try:
        obj = json.loads(
            text, parse_int=_int, parse_constant=_constant, object_pairs_hook=object_pairs_hook
        )
    except _Refused as e:
        raise MergeError(f"{what} is not valid: {e}", path, None, todo) from None
    except json.JSONDecodeError as e:
        raise MergeError(f"{what} is not valid JSON ({e})", path, None, todo) from None
    except RecursionError:
        raise MergeError(f"{what} nests too deep", path, None, todo) from None
    del text
    if max_depth is not None:
        depth = nesting_depth(obj, max_depth)
        if depth > max_depth:
            raise MergeError(
                f"{what} nests {depth}+ levels deep, more than {max_depth}", path, None, todo
            )
    return obj


def load_file(path: Path, *, max_depth: int, max_bytes: int, todo: str, what: str = "JSON"):
    """``loads`` of a file's bytes; a file larger than ``max_bytes`` is not read.

    Raises:
        MergeError: as ``loads``, or the file cannot be read.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise MergeError(f"cannot read {what}: {e.strerror}", path, None, todo) from None
    return loads(raw, path, max_depth=max_depth, max_bytes=max_bytes, todo=todo, what=what)
