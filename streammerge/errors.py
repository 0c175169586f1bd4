"""The one error type the engine raises for bad input, and its one-line rendering."""

from __future__ import annotations

from pathlib import Path

#: Process exit codes (README "Errors").
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class MergeError(Exception):
    """Bad input or an unusable output location, found before or during a merge.

    Rendered on one line as ``<what> (<file>, <tensor>): <todo>``; the CLI prefixes it
    with ``streammerge: error:`` and exits with code 2.

    Args:
        what: what is wrong, e.g. ``"header length 912 runs past the end of the file"``.
        file: the file or directory concerned (None when no single file is).
        tensor: the tensor concerned (None when no single tensor is).
        todo: what the user can do about it.
    """

    def __init__(
        self,
        what: str,
        file: str | Path | None = None,
        tensor: str | None = None,
        todo: str = "check the input",
    ) -> None:
        self.what = what
        self.file = None if file is None else str(file)
        self.tensor = tensor
        self.todo = todo
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ", ".join(x for x in (self.file, self.tensor) if x)
        where = f" ({where})" if where else ""
        return f"{self.what}{where}: {self.todo}".replace("\n", " ")
