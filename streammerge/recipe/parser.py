"""The command's argument parsers: ``streammerge`` and ``streammerge sweep`` (every flag has
help), and which flags set the recipe; ``streammerge.cli`` runs them."""

from __future__ import annotations

import argparse

from streammerge import __version__
from streammerge.errors import OneLineArgumentParser
from streammerge.methods.params import Param
from streammerge.methods.registry import METHODS, all_params, methods_taking


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every flag has help)."""
    p = _new_parser()
    _add_input_args(p)
    _add_recipe_args(p)
    _add_run_args(p)
    return p


def _new_parser() -> argparse.ArgumentParser:
    """The bare ``streammerge`` parser: its prog, description and epilog (the methods table),
    no arguments yet."""
    return OneLineArgumentParser(
        prog="streammerge",
        description="Merge fine-tunes of a common base (task arithmetic, DARE, TIES, "
        "breadcrumbs, linear), each with Mixup Model Merge (M3) weights or given ones, "
        "streaming tensors chunk by chunk in flat memory. The exact contract: docs/SPEC.md "
        "in the streammerge repository. Subcommand: streammerge sweep merges K mixup draws "
        "from one read, scores each with your evaluator and keeps the best (see "
        "streammerge sweep --help).",
        epilog="methods: "
        + "; ".join(
            f"{m.name} ({m.summary}; {', '.join(_method_flags(m))})" for m in METHODS.values()
        ),
    )


def _add_input_args(p: argparse.ArgumentParser) -> None:
    """Add what to merge and where to: the models (or --config), --plan/--json, --ray,
    --base, --method and --output."""
    p.add_argument(
        "models",
        nargs="*",
        metavar="MODEL",
        help="fine-tune directories (HF layout), model 0, 1, ... (or --config)",
    )
    p.add_argument(
        "--config",
        metavar="RECIPE.yml",
        default=None,
        help="a mergekit YAML recipe (merge_method, base_model, models, parameters, dtype, "
        "out_dtype, tokenizer_source; streammerge's own keys under streammerge:)",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="dry run: read headers only, print the per-tensor plan, bytes, memory and "
        "expected time, write nothing",
    )
    p.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="merge the output shards as tasks on a Ray cluster: auto joins a running one, an "
        "address names one, no value starts a local Ray instance (pip install 'streammerge[ray]')",
    )
    p.add_argument(
        "--base",
        default=None,
        metavar="DIR",
        help="the common base model directory (every method but linear needs it)",
    )
    p.add_argument(
        "--method",
        choices=tuple(METHODS),
        default=None,
        help="merge method (default dare_linear, with drop rate 0.5 unless --drop/--density)",
    )
    p.add_argument(
        "-o",
        "--output",
        default="merged",
        metavar="OUT",
        help="output directory, created (default: ./merged; never replaced without --overwrite)",
    )


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    """Add the recipe's values: --alpha, --lambda, --weights, one flag per method parameter
    (``_add_method_params``), --trim-scope, --seed and --dtype (``FLAG_RECIPE_KEYS``)."""
    p.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="Beta(α,α) concentration of the mixup ratio λ (default 1.0)",
    )
    p.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        default=None,
        help="fixed mixup ratio λ: w = (λ, 1-λ) (2 models)",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="fixed weights w, comma-separated, one per model (default: drawn by M3)",
    )
    _add_method_params(p)
    p.add_argument(
        "--trim-scope",
        choices=("tensor", "model"),
        default="tensor",
        help="population of the magnitude thresholds: each tensor (mergekit, default) or the "
        "whole model (the TIES and M3 papers)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed in [0, 2**64) (default: drawn from the OS, printed)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="output dtype of float tensors: bf16, fp16, fp32 (default: the base's)",
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Add how the merge runs and writes: shard size, memory, threads, device, backend, HTTP
    timeout, resume/overwrite, copies, I/O, non-finite values, output verbosity, --version."""
    p.add_argument(
        "--shard-size", default="5GB", help="largest output shard, e.g. 500MB, 5GB (default 5GB)"
    )
    p.add_argument(
        "--memory",
        default="256MiB",
        help="budget for all I/O buffers, e.g. 256MiB, 1GB (default 256MiB)",
    )
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to merge: cuda when available (auto, the default), cpu, or cuda",
    )
    p.add_argument(
        "--vram",
        default=None,
        help="GPU buffer budget, e.g. 2GB (default: a quarter of free GPU memory, at most 4GiB)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "numba", "triton"),
        default="auto",
        help="kernel: numba (CPU) or triton (GPU; with TRITON_INTERPRET=1 it runs on the CPU: "
        "the test path); auto picks triton on a GPU, else numba",
    )
    p.add_argument(
        "--http-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="inputs by http(s):// URL: seconds to wait to connect or for the next bytes "
        "before a request is retried (a few times, then the run stops) (default 30)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted merge into the same output"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty output / discard an interrupted merge",
    )
    p.add_argument(
        "--no-copy-files",
        dest="copy_files",
        action="store_false",
        help="do not copy config/tokenizer files from the base",
    )
    p.add_argument(
        "--buffered-io",
        dest="direct_io",
        action="store_false",
        help="write with the page cache, not O_DIRECT",
    )
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="keep NaN/Inf values the merge produces (by default they stop it)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar, only the closing line")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also print the seconds each pipeline stage was busy (on a GPU also each stream: "
        "h2d_s, kernel_s, d2h_s, and device_wait_s, the host waiting on the device)",
    )
    p.add_argument("--version", action="version", version=f"streammerge {__version__}")


def flag_params() -> list[Param]:
    """The method parameters that get a flag: every declared one that changes values and
    has a choice (not ``rescale``: only true; not ``int8_mask``), but the weight
    (``--weights``, beside M3's ``--alpha`` / ``--lambda``)."""
    return [p for p in all_params().values()
            if p.name != "weight" and p.affects_values and p.only is None]  # fmt: skip


def _param_help(p: Param) -> str:
    """``--help`` of a method parameter: its declared help, range, methods and default."""
    takes = methods_taking(p.name)
    defaults = {m: METHODS[m].param(p.name).default for m in takes}
    shown = {True: "on", False: "off"} if p.kind == "bool" else {}
    if len(set(defaults.values())) == 1:
        d = next(iter(defaults.values()))
        default = f"default {shown.get(d, d)}" if d is not None else ""
    else:
        by = {}
        for m, d in defaults.items():
            by.setdefault(shown.get(d, d), []).append(m)
        default = "default " + "; ".join(f"{d} for {', '.join(ms)}" for d, ms in by.items())
    per = "one value or one per model, e.g. 0.3,0.6; " if p.per_model and p.kind != "bool" else ""
    rng = f"{p.range_text()}; " if p.range_text() else ""
    return f"{p.help} ({per}{rng}{', '.join(takes)}; {default})".replace("; )", ")")


def _method_flags(m) -> list[str]:
    """The flags of method ``m``'s parameters (``--weights``, ``--density``, ...)."""
    flags = {p.name for p in flag_params()} | {"weight"}
    return [p.flag for p in m.params if p.name in flags]


def _add_method_params(p: argparse.ArgumentParser) -> None:
    """One flag per declared method parameter (``streammerge.methods``): a bool is
    ``--name / --no-name``, a per-model number a string of one or N numbers, a shared number
    a float; None when not given (the method's default applies)."""
    for param in flag_params():
        if param.kind == "bool":
            p.add_argument(param.flag, action=argparse.BooleanOptionalAction, default=None,
                           help=_param_help(param))  # fmt: skip
        elif param.per_model:
            p.add_argument(param.flag, default=None, help=_param_help(param))
        else:
            p.add_argument(param.flag, type=float, default=None, help=_param_help(param))


def flag_recipe_keys() -> tuple[str, ...]:
    """The parsed flags that set the recipe (the rest set how the merge runs: api.Options)."""
    return ("method", "seed", "alpha", "lam", "weights",
            *(p.name for p in flag_params()), "trim_scope", "dtype")  # fmt: skip


#: Flags that set the recipe (the rest set how the merge runs: api.Options).
FLAG_RECIPE_KEYS = flag_recipe_keys()


#: Options that change how a run goes, not what it writes: left out of the command the
#: model card gives (the card of a resumed or re-run merge must not change with them).
RUN_CONTROL = {
    "--resume", "--overwrite", "--quiet", "--debug", "--profile", "--memory", "--threads",
    "--backend", "--device", "--vram", "--buffered-io", "--ray", "--http-timeout",
}  # fmt: skip


def repeatable_argv(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` as typed, without the ``RUN_CONTROL`` options (and their values)."""
    out, skip = [], False
    for i, word in enumerate(argv):
        if skip:
            skip = False
            continue
        flag, eq, _ = word.partition("=")
        if flag not in RUN_CONTROL:
            out.append(word)
            continue
        # its value is the next word, unless given with "=" or the option takes none; an
        # optional value (nargs "?", --ray) only when the next word is not an option
        action = parser._option_string_actions.get(flag)
        if action is not None and not eq and action.nargs != 0 and i + 1 < len(argv):
            skip = action.nargs != "?" or not argv[i + 1].startswith("-")
    return out


def build_sweep_parser() -> argparse.ArgumentParser:
    """``streammerge sweep``: the merge flags, plus the draws, the evaluator and what to keep."""
    p = build_parser()
    p.prog = "streammerge sweep"
    p.description = (
        "M3 without the lottery: merge K mixup draws (Beta for 2 models, Dirichlet for more) "
        "from one read of the inputs, score each with your evaluator, keep the best. Every "
        "draw shares one mask seed, so each is exactly the single merge its row names."
    )
    p.epilog = (
        "Disk: all K + 1 outputs exist at once (--keep best removes the others only once every "
        "output is scored); the free-space check counts them all. Streams: notices and the "
        "table of draws on stderr, the closing lines (the command repeating the sweep, the "
        "best draw's) on stdout. Exit codes: 0 done; 2 bad input (one line, nothing written); "
        "3 an evaluator ran and no draw was scored: every output is kept, since none could be "
        "chosen, and one line gives the first failure; 130 interrupted; 1 a bug."
    )
    for action in p._actions:  # the single merge's help, as a sweep uses the flag
        if action.dest == "seed":
            action.help = ("mask seed shared by every draw, in [0, 2**64) (default: derived "
                           "from --sweep-seed, so that one seed repeats the sweep)")  # fmt: skip
    p.set_defaults(output="sweep")
    p.add_argument("--draws", type=int, default=8, help="number of draws K (default 8)")
    p.add_argument("--grid", action="store_true", help="evenly spaced λ in [0, 1] (2 models)")
    p.add_argument(
        "--sweep-seed",
        type=int,
        default=None,
        help="seed of the K draws, and of the masks without --seed: the same --sweep-seed "
        "repeats the sweep byte for byte (default: from the OS, printed)",
    )
    p.add_argument(
        "--eval",
        dest="eval_cmd",
        default=None,
        metavar="CMD",
        help="command scoring one output, run without a shell: split into words like a shell "
        "would, then {out} replaced by the output directory inside each word (it stays one "
        "argument whatever it contains, so quoting it is unnecessary and harmless; shell syntax "
        "such as pipes needs sh -c '...'); its last stdout line is a finite number or a JSON "
        'object of named numbers (e.g. "python score.py {out}")',
    )
    p.add_argument(
        "--eval-timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="seconds one evaluation may take (default 3600); then the evaluator's whole "
        "process group is killed and the draw recorded as failed",
    )
    p.add_argument("--eval-select", default=None, help="the named score to maximize")
    p.add_argument(
        "--keep",
        choices=("best", "all"),
        default="best",
        help="keep only the best draw's output (and the fixed reference) once every output "
        "is scored, or all (default best; all are kept when no draw was scored)",
    )
    return p


def build_apply_lora_parser() -> argparse.ArgumentParser:
    """``streammerge apply-lora MODEL+ADAPTER -o OUT``: the run flags of a merge."""
    p = OneLineArgumentParser(
        prog="streammerge apply-lora",
        description="Write MODEL with the PEFT LoRA adapter in the folder ADAPTER merged into "
        "it (PEFT's merge_and_unload, streamed: W + scale * (B @ A) computed as W's rows are "
        "read, nothing loaded whole; docs/SPEC.md \"LoRA inputs (v3)\").",
    )
    p.add_argument("model", metavar="MODEL+ADAPTER",
                   help="a model (directory, file:// or URL) and a PEFT adapter folder "
                   "(adapter_config.json, adapter_model.safetensors), joined by +")  # fmt: skip
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output directory, created (never replaced without --overwrite)")  # fmt: skip
    _add_run_args(p)
    return p
