"""Scoring a sweep's output: the ``--eval`` command (run without a shell, ``{out}`` replaced
in each word, within a timeout, killed with its process group), its last stdout line read as
a finite number or a JSON object of named numbers (``--eval-select``)."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from streammerge.errors import OptionError


#: Default ``--eval-timeout``: seconds one evaluation may take.
EVAL_TIMEOUT_S = 3600.0
#: Seconds between looks at a running evaluator (has it exited, is its time up).
EVAL_POLL_S = 0.1


class EvalError(Exception):
    """An evaluation that gave no usable score: its message is the draw's ``error``."""


def finite_json(value, path: str = "") -> tuple[object, dict[str, str]]:
    """``value`` (JSON-like: dicts, lists, numbers, strings) with every float that is not
    finite replaced by None, and {dotted path: repr of the value} of those replaced (the
    path of a top-level dict entry is its key)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, {path: repr(value)}
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    else:
        return value, {}
    clean, bad = {}, {}
    for k, v in items:
        clean[k], sub = finite_json(v, f"{path}.{k}" if path else str(k))
        bad.update(sub)
    return (clean if isinstance(value, dict) else list(clean.values())), bad


def parse_score(stdout: str, select: str | None) -> tuple[dict, float]:
    """The evaluator's last non-empty stdout line: a number, or a JSON object of named
    numbers (``select`` names the one to maximize; default its first key). The score must
    be a finite number (``NaN``, which Python's json.dumps writes, ``Infinity`` are refused);
    the other named scores may be anything.

    Returns:
        (named scores, ``{"score": x}`` for a plain number; the score maximized).

    Raises:
        EvalError: no line, not a number or JSON object, ``select`` missing, or a score that
            is not a finite number (the message quotes the last line).
    """
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        raise EvalError("the evaluator printed nothing on stdout")
    last = lines[-1].strip()
    try:
        value = json.loads(last)
    except json.JSONDecodeError:
        raise EvalError(f"last line is not a number or a JSON object: {last[:200]!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
        raise EvalError(f"last line is not a number or a JSON object: {last[:200]!r}")
    scores = {"score": float(value)} if not isinstance(value, dict) else value
    key = select or next(iter(scores), None)
    if (
        key not in scores
        or isinstance(scores[key], bool)
        or not isinstance(scores[key], (int, float))
    ):
        raise EvalError(f"no numeric score {key!r} in the last line {last[:200]!r}")
    if not math.isfinite(scores[key]):
        raise EvalError(f"score {key!r} is not a finite number in the last line {last[:200]!r}")
    return scores, float(scores[key])


@dataclass(frozen=True)
class CommandEvaluator:
    """The ``--eval`` command, run once per output without a shell.

    ``template`` is split into words as a POSIX shell would (``shlex.split``), then
    ``{out}`` is replaced inside every word by the output directory, which so stays exactly
    one argument whatever it contains (quoting ``{out}`` is unnecessary and harmless; so is
    ``--model={out}``). Shell syntax (pipes, ``&&``, ``$VAR``) is not interpreted: write
    ``sh -c '...'`` for that. The command's last stdout line is the score (``parse_score``).

    It runs with stdin closed, in a new session (its own process group). Once it exits, and
    when it runs longer than ``timeout_s`` seconds, its whole process group is killed
    (SIGKILL): children left behind cannot hold its output pipes open or outlive it.

    Attributes:
        template: the command; select: the named score to maximize; timeout_s: seconds
            one evaluation may take.

    Raises:
        OptionError: (on construction) a template ``shlex`` cannot split or with no words,
            a program not found, a timeout that is not a positive number of seconds.
    """

    template: str
    select: str | None = None
    timeout_s: float = EVAL_TIMEOUT_S

    def __post_init__(self) -> None:
        try:
            words = shlex.split(self.template)
        except ValueError as e:
            raise OptionError(f"--eval cannot be split into words ({e}): {self.template!r}",
                              "check its quotes") from None  # fmt: skip
        if not words:
            raise OptionError("--eval is empty", "give the command that scores {out}")
        if "{out}" not in words[0] and shutil.which(words[0]) is None:
            raise OptionError(f"--eval: program {words[0]!r} not found or not executable",
                              "give its path, or a program on PATH")  # fmt: skip
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or t == math.inf:
            raise OptionError(f"--eval-timeout must be a positive number of seconds, got {t!r}")

    def argv(self, out: Path) -> list[str]:
        """The command's argv for output directory ``out``."""
        return [w.replace("{out}", str(out)) for w in shlex.split(self.template)]

    def __call__(self, out: Path) -> tuple[dict, float]:
        """Score ``out``: (named scores, score). Raises EvalError (see ``run_evaluator``,
        ``parse_score``; a non-zero exit gives its last stderr line)."""
        r = run_evaluator(self.argv(out), self.timeout_s)
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["no stderr"])[-1]
            raise EvalError(f"exit {r.returncode}: {tail[:200]}")
        return parse_score(r.stdout, self.select)


def command_evaluator(
    template: str, select: str | None, timeout_s: float | None = None
) -> CommandEvaluator:
    """``CommandEvaluator(template, select, timeout_s)`` (timeout default EVAL_TIMEOUT_S)."""
    return CommandEvaluator(template, select, EVAL_TIMEOUT_S if timeout_s is None else timeout_s)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left of the group (or not ours to kill)


def run_evaluator(argv: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run ``argv`` (no shell) in a new session, stdin closed, stdout and stderr captured as
    text; kill its process group when it exits (leftover children) or after ``timeout_s``
    seconds.

    Raises:
        EvalError: it ran longer than ``timeout_s`` (``timed out after N s``), or could not
            be started (program missing, not executable).
    """
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    except OSError as e:
        raise EvalError(f"cannot run {argv[0]!r}: {e.strerror or e}") from None
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                out, err = p.communicate(timeout=max(0.0, min(EVAL_POLL_S,
                                                              deadline - time.monotonic())))  # fmt: skip
                break
            except subprocess.TimeoutExpired:
                if p.poll() is not None:  # it exited; children it left hold its pipes
                    _kill_group(p.pid)
                    out, err = p.communicate()
                    break
                if time.monotonic() >= deadline:
                    _kill_group(p.pid)
                    p.communicate()
                    raise EvalError(f"timed out after {timeout_s:g} s") from None
    finally:
        _kill_group(p.pid)  # whatever it left behind (Ctrl-C included)
        if p.poll() is None:
            p.kill()
            p.wait()
    return subprocess.CompletedProcess(argv, p.returncode, out, err)
