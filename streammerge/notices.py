"""Notices: one line each on stderr (``streammerge: <text>``), for what a user should know
but need not stop for (a skipped symlink, λ outside [0, 1], a finished merge left as is).

``sink`` may be replaced (the CLI's console, a test's list); the API prints to stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from streammerge.errors import one_line


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


#: Where notices go: called with the whole line.
sink: Callable[[str], None] = _stderr


def notice(text: str) -> None:
    """Emit ``streammerge: <text>`` as one line."""
    sink("streammerge: " + one_line(text))
