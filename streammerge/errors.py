"""The one error type the engine raises for bad input, and how every failure becomes one line.

Every failure the command reports is one line on stderr, ``streammerge: error: <what>
(<file>, <tensor>): <what to do>``, with no blank line before it, and an exit code:
2 for bad input, options or output locations (and for I/O errors during a merge, which
``--resume`` continues), 130 for Ctrl-C, 1 for a bug (``--debug`` adds the traceback).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

#: Process exit codes (README "Errors").
EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
PREFIX = "streammerge: error: "


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
        return one_line(f"{self.what}{where}: {self.todo}")


class OptionError(MergeError, ValueError):
    """A bad option or API argument (a ValueError too, so ``except ValueError`` catches it).

    Raised before anything is opened or written; rendered like every MergeError.
    """

    def __init__(self, what: str, todo: str = "check the command-line options") -> None:
        super().__init__(what, None, None, todo)


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters shown escaped (a file or
    tensor name may contain any of them: the error line must stay one line)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in text)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error (no usage block)."""

    def error(self, message: str) -> NoReturn:
        hint = self._suggestion(message)
        todo = f"did you mean {hint!r}? (see {self.prog} --help)" if hint else f"see {self.prog} --help"
        print(f"{PREFIX}{one_line(message)}: {todo}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT)

    def _suggestion(self, message: str) -> str | None:
        """The closest choice or option to a mistyped one, or None."""
        import re

        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            return closest(m.group(1), re.findall(r"'([^']*)'", m.group(2)))
        m = re.search(r"unrecognized arguments: (\S+)", message)
        if m and m.group(1).startswith("--"):
            options = [o for a in self._actions for o in a.option_strings]
            return closest(m.group(1).split("=")[0], options)
        return None


def closest(word: str, choices) -> str | None:
    """The closest of ``choices`` to a mistyped ``word`` (difflib, ratio >= 0.6), or None."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def _os_error_line(e: OSError, output: str | Path | None) -> str:
    """One line for an OSError met during a merge: what failed, on which file, what to do.

    A full disk is the output's; EIO is the device of the file named; ENOMEM is memory.
    """
    what = e.strerror or str(e)
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        if not where and output:
            where = f" ({os.path.abspath(output)})"
        todo = "free disk space, then re-run the same command with --resume"
    elif e.errno == errno.ENOMEM:
        todo = "lower --memory or free memory, then re-run the same command with --resume"
    elif e.errno == errno.EIO:
        todo = (
            "the device reported a read or write error: check it (dmesg), then re-run with --resume"
        )
    elif e.errno == errno.EMFILE or e.errno == errno.ENFILE:
        todo = "raise the open-file limit (ulimit -n), then re-run with --resume"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        todo = "check the permissions of the file named"
    else:
        todo = "check the file named and the disk, then re-run with --resume"
    return one_line(f"{what}{where}: {todo}")


def error_line(e: BaseException, output: str | Path | None = None) -> tuple[int, str]:
    """(exit code, the one line without the prefix) for any exception a merge can raise."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, (
            "interrupted; finished shards are kept: re-run the same command with --resume "
            "to continue"
        )
    if isinstance(e, MergeError):
        return EXIT_BAD_INPUT, str(e)
    if isinstance(e, OSError):
        return EXIT_BAD_INPUT, _os_error_line(e, output)
    if isinstance(e, MemoryError):
        return (
            EXIT_BAD_INPUT,
            "out of memory: lower --memory or free memory, then re-run with --resume",
        )
    if type(e) is ValueError:  # an option the recipe refused (methods.make_recipe)
        return EXIT_BAD_INPUT, one_line(f"{e}: check the command-line options")
    return EXIT_BUG, one_line(
        f"internal error ({type(e).__name__}: {e}): please report this bug with the output of --debug"
    )


def report(e: BaseException, output: str | Path | None = None, debug: bool = False) -> int:
    """Print ``e`` as one ``streammerge: error:`` line on stderr (the traceback first with
    ``debug``); returns the exit code. Ctrl-C prints one ``streammerge:`` line."""
    if debug:
        traceback.print_exception(e)
    code, line = error_line(e, output)
    prefix = "streammerge: " if code == EXIT_INTERRUPTED else PREFIX
    print(prefix + line, file=sys.stderr, flush=True)
    return code


def guarded_main(main, argv: list[str] | None = None) -> int:
    """Run the command's ``main(argv)``: Ctrl-C or an unexpected error anywhere (imports,
    argument parsing) still ends in one line and an exit code, not a traceback."""
    try:
        return main(argv)
    except KeyboardInterrupt as e:
        return report(e)
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback with --debug
        return report(e, None, "--debug" in (sys.argv if argv is None else argv))
