"""A layer stack that repeats layers (issue 18): streammerge's peak RSS against --memory, and
mergekit's on the same recipe, in the same run.

    python bench/bench_stack.py --data bench/data/trio-2gb [--memory 64MiB,256MiB]
        [--mergekit-bin /path/to/mergekit-yaml] [--out bench/results/stack.md]

The recipe stacks model ``a`` of the trio (``bench/make_synthetic.py``): all its layers,
then its upper half again (a SOLAR-style depth up-scaling), ``merge_method: passthrough``.
Each contender runs as a child process; its wall time and peak RSS come from ``os.wait4``
(the child's own rusage). The process baseline is the RSS of a Python that imported
streammerge's CLI and did nothing else. mergekit (when its ``mergekit-yaml`` is
found) runs on the same recipe, and the two outputs are compared tensor by tensor
(``bench/mergekit_agree.py``) and file by file.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mergekit_agree import compare_dirs  # noqa: E402


def run_child(argv: list[str], env: dict | None = None) -> tuple[float, float, int]:
    """Run ``argv``; returns (wall seconds, peak RSS MiB, exit code)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    err = p.stderr.read().decode() if p.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(f"{argv[0]} failed ({code}): {err.strip()[-500:]}", file=sys.stderr)
    return time.perf_counter() - t0, ru.ru_maxrss / 1024, code


def baseline_mib() -> float:
    """Peak RSS of a Python that imported streammerge's CLI and did nothing else (a stack
    only copies tensors: numba's kernels are never loaded)."""
    code = "import resource, streammerge.cli\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.strip())  # fmt: skip


def stack_recipe(model: Path, layers: int) -> str:
    half = layers // 2
    return (f"slices:\n  - sources:\n      - model: {model}\n        layer_range: [0, {layers}]\n"
            f"  - sources:\n      - model: {model}\n        layer_range: [{half}, {layers}]\n"
            "merge_method: passthrough\ndtype: bfloat16\n")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a trio from bench/make_synthetic.py")
    ap.add_argument("--memory", default="64MiB,256MiB", help="streammerge --memory values")
    ap.add_argument("--mergekit-bin", default=os.environ.get("STREAMMERGE_MERGEKIT_BIN"),
                    help="mergekit-yaml (default: $STREAMMERGE_MERGEKIT_BIN or on PATH)")
    ap.add_argument("--work", default="/tmp/streammerge-bench-stack", help="scratch outputs")
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    a = ap.parse_args(argv)
    model = Path(a.data).resolve() / "a"
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    recipe = work / "stack.yml"
    recipe.write_text(stack_recipe(model, layers))
    rows = [f"| process baseline (imports) | - | {baseline_mib():.0f} | - |"]
    sm_out = None
    for mem in a.memory.split(","):
        sm_out = work / f"sm-{mem}"
        wall, rss, code = run_child([sys.executable, "-m", "streammerge.cli", "--config",
                                     str(recipe), "-o", str(sm_out), "--memory", mem, "--quiet"])  # fmt: skip
        rows.append(f"| streammerge --memory {mem} | {wall:.1f} | {rss:.0f} | {code} |")
    mk = a.mergekit_bin or shutil.which("mergekit-yaml")
    agree = ""
    if mk:
        mk_out = work / "mergekit"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
        wall, rss, code = run_child([mk, str(recipe), str(mk_out), "--no-copy-tokenizer",
                                     "--device", "cpu", "--quiet"], env)  # fmt: skip
        rows.append(f"| mergekit 0.1.5 | {wall:.1f} | {rss:.0f} | {code} |")
        if code == 0 and sm_out is not None:
            s = compare_dirs(mk_out, sm_out)["summary"]
            same = filecmp.cmp(mk_out / "model.safetensors", sm_out / "model.safetensors",
                               shallow=False) if (mk_out / "model.safetensors").exists() else False  # fmt: skip
            agree = (f"\nmergekit vs streammerge: {s['tensors_equal']}/{s['tensors']} tensors "
                     f"bit-identical, max {s['max_ulp']} ulp; model.safetensors files "
                     f"{'identical' if same else 'differ (sharding or order)'}\n")  # fmt: skip
    table = (f"Stack of {model}: layers [0, {layers}) then [{layers // 2}, {layers}) "
             f"({layers + layers - layers // 2} layers)\n\n| contender | wall s | peak RSS MiB | exit |\n"
             "|---|---|---|---|\n" + "\n".join(rows) + "\n" + agree)  # fmt: skip
    print(table)
    if a.out:
        Path(a.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
