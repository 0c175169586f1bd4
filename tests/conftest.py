"""Shared fixtures: small real safetensors checkpoints, sharded any way, and an independent
recomputation of every merged tensor from the inputs and ``streammerge.json``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia")):
    os.environ.setdefault(
        "TRITON_INTERPRET", "1"
    )  # no GPU: Triton's CPU interpreter, set before import

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file



#: The CPU kernel modules with their cold compile time (s, 2-core AMD EPYC without AVX-512,
#: one process): the prewarm spreads them over two processes, longest first.
KERNEL_COMPILE_S = {
    "cpu_merge": 112, "cpu_stats": 41, "cpu_fusion": 41, "cpu_multislerp": 34,
    "cpu_karcher": 33, "cpu_stock": 27, "cpu_della": 26, "cpu_sce": 26, "cpu_nuslerp": 17,
    "cpu_ram": 16, "cpu_rows": 13, "cpu_nearswap": 8,
}  # fmt: skip


def _prewarm_groups(n_procs: int) -> list[list[str]]:
    """The kernel modules in ``n_procs`` groups of about equal compile time (longest first)."""
    groups: list[list[str]] = [[] for _ in range(n_procs)]
    loads = [0] * n_procs
    for mod, secs in sorted(KERNEL_COMPILE_S.items(), key=lambda kv: -kv[1]):
        i = loads.index(min(loads))
        groups[i].append(mod)
        loads[i] += secs
    return groups


def pytest_sessionstart(session):
    """Compile every CPU kernel into numba's on-disk cache before any test, once, in two
    processes at a time. A cold cache makes a run print the one-time "compiling the CPU
    kernels" notice, which would add a line to the tests that check an error is one line;
    and pytest-xdist's workers, meeting a kernel at the same moment, would each compile it
    (cpu_merge alone takes 30-110 s). Under xdist this runs in the controller only, before
    it starts the workers, which then load the kernels from the cache."""
    if hasattr(session.config, "workerinput"):
        return
    procs = []
    for group in _prewarm_groups(2):
        code = "import streammerge, importlib\n" + "".join(
            f"importlib.import_module('streammerge.kernels.{m}').warmup()\n" for m in group
        )
        procs.append((group, subprocess.Popen([sys.executable, "-c", code])))
    for group, proc in procs:
        if proc.wait() != 0:
            raise RuntimeError(f"compiling the CPU kernels {group} failed (exit {proc.returncode})")


TORCH_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "I64": torch.int64,
    "I32": torch.int32,
}


def run_cli(argv: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``python -m streammerge.cli *argv`` in a child process; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "streammerge.cli", *argv],
        check=False, capture_output=True, text=True, timeout=timeout, **kw,
    )  # fmt: skip


def fail_after(nbytes: int, exc: BaseException, out: Path | None = None):
    """An ``on_bytes`` progress callback that raises ``exc`` once more than ``nbytes``
    input bytes are done: an error injected mid-merge, from the caller's side. With
    ``out`` (the merge's output directory) it first waits, up to 60 s, for the journal
    beside ``out`` to record a finished shard: on a loaded machine the writer can lag the
    compute stage, and a resume test needs a shard to keep."""
    seen = [0]
    journal = None if out is None else out.parent / f".{out.name}.streammerge-journal"

    def on_bytes(n: int) -> None:
        seen[0] += n
        if seen[0] > nbytes:
            for _ in range(0 if journal is None else 600):
                if journal.is_file() and '"shard"' in journal.read_text():
                    break
                time.sleep(0.1)
            raise exc

    return on_bytes


def merge_argv(models: list[Path], base: Path, out: Path, *extra: str) -> list[str]:
    """CLI arguments merging ``models`` of ``base`` into ``out``, then ``extra``."""
    return [*map(str, models), "--base", str(base), "-o", str(out), *extra]


def write_model(
    root: Path, tensors: dict[str, torch.Tensor], shards: int = 1, config: dict | None = None
) -> Path:
    """Save ``tensors`` as an HF directory: one file, or ``shards`` files plus an index.

    Tensors are dealt to shards round-robin in insertion order, so different ``shards``
    give differently sharded copies of a model.
    """
    root.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k in range(shards):
            part = {n: tensors[n] for n in names[k::shards]}
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(root / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = config or {"model_type": "test", "vocab_size": 10}
    (root / "config.json").write_text(json.dumps(cfg))
    return root


def make_trio(
    tmp: Path,
    dtype: str = "BF16",
    shards: tuple[int, int, int] = (1, 3, 2),
    seed: int = 0,
    big: int = 0,
    model_dtypes: tuple[str, str] | None = None,
) -> tuple[Path, Path, Path]:
    """A base and two fine-tunes (base + small noise), sharded differently.

    Includes odd sizes, an integer buffer, and a tensor only the base has. ``big`` adds a
    tensor of that many elements (to span several chunks).
    """
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "embed.weight": (37, 24),
        "layers.0.attn.q.weight": (24, 24),
        "layers.0.mlp.up.weight": (61, 24),
        "layers.0.norm.weight": (24,),
        "layers.1.mlp.down.weight": (24, 61),
        "layers.10.norm.weight": (24,),
        "scalar.weight": (),
    }
    if big:
        shapes["layers.2.big.weight"] = (big,)
    base = {n: (torch.randn(s, generator=g) * 0.02) for n, s in shapes.items()}
    mdt = model_dtypes or (dtype, dtype)
    out = []
    for k, name in enumerate(("base", "a", "b")):
        dt = dtype if k == 0 else mdt[k - 1]
        ts = {
            n: (v if k == 0 else v + torch.randn(v.shape, generator=g) * 0.002).to(TORCH_DTYPES[dt])
            for n, v in base.items()
        }
        ts["position_ids"] = torch.arange(13, dtype=torch.int64).reshape(1, 13)
        if k == 0:
            ts["pooler.weight"] = torch.randn(5, 3, generator=g).to(TORCH_DTYPES[dt])
        out.append(write_model(tmp / name, ts, shards=shards[k]))
    return out[0], out[1], out[2]


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor's stored bytes as the CPU carrier array (bf16 -> uint16 bits)."""
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def load_dir(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory (test sizes only)."""
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def expected_merge(out_dir: Path, base: Path, models: list[Path]) -> dict[str, np.ndarray]:
    """Recompute every output tensor independently from the inputs and streammerge.json,
    with the numpy SPEC reference (tests/spec_reference.py). Returns name -> uint8 bytes."""
    import spec_reference as ref

    rec = json.loads((out_dir / "streammerge.json").read_text())
    b = load_dir(base)
    ms = [load_dir(m) for m in models]
    dtype = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
    out = {}
    for name, bt in b.items():
        want = rec["dtype"]  # None, or the output dtype as a safetensors string
        if not bt.is_floating_point():
            out[name] = as_numpy(bt).view(np.uint8)
            continue
        if not all(name in m for m in ms):  # only the base has it: copied, cast to --dtype
            x = as_numpy(bt)
            if want is not None and want != dtype[bt.dtype]:
                x = ref.from_float32(ref.to_float32(x, dtype[bt.dtype]), want)
            out[name] = np.ascontiguousarray(x).view(np.uint8)
            continue
        key = ref.spec_key(rec["seed"], name)
        # SPEC "Working dtype (v3)": v1's formula (dare_linear) in the promoted input dtype
        compute = working_dtype(rec, [dtype[bt.dtype]] + [dtype[m[name].dtype] for m in ms])
        res, _ = ref.spec_merge_v2(
            as_numpy(bt),
            [as_numpy(m[name]) for m in ms],
            want or dtype[bt.dtype],
            method="dare_linear",
            key=key,
            start=0,
            model_ids=list(range(len(ms))),
            drop=rec["drop"],
            weights=rec["weights"],
            scale=rec["scale"],
            normalize=False,
            base_dtype=dtype[bt.dtype],
            model_dtypes=[dtype[m[name].dtype] for m in ms],
            compute_dtype=compute,
        )
        out[name] = np.ascontiguousarray(res).view(np.uint8)
    return out


def output_bytes(out_dir: Path) -> dict[str, np.ndarray]:
    """Every output tensor's stored bytes, name -> uint8."""
    return {n: as_numpy(t).view(np.uint8) for n, t in load_dir(out_dir).items()}


def dir_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (inputs must never change)."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def working_dtype(rec: dict, dtypes: list[str]) -> str:
    """The working dtype D of a merged tensor from docs/SPEC.md "Working dtype (v3)" alone:
    F32 for linear and slerp; else the recipe's compute dtype, or the inputs' promotion."""
    import spec_reference as ref

    if rec["method"] in ("linear", "slerp"):
        return "F32"
    return rec["recipe"].get("compute_dtype") or ref.spec_promote(dtypes)


def expected_merge_v2(
    out_dir: Path, base: Path | None, models: list[Path]
) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """Recompute every output tensor of any method from the inputs and streammerge.json's
    per-tensor record alone, with the numpy SPEC v2 reference (thresholds recomputed by
    sorting, never read from the record). Returns (name -> uint8 bytes, name -> thresholds)."""
    import spec_reference as ref

    rec = json.loads((out_dir / "streammerge.json").read_text())
    method = rec["method"]
    b = load_dir(base) if base is not None else None
    ms = [load_dir(m) for m in models]
    ref_model = b if b is not None else ms[0]
    dtype = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
    sparsifier = ref.METHODS[method][1]
    merged = [n for n, t in ref_model.items() if t.is_floating_point() and all(n in m for m in ms)]
    model_th = None
    if rec["trim_scope"] == "model" and sparsifier in ("magnitude", "breadcrumbs"):
        model_th = []
        for j, m in enumerate(ms):
            mags = []
            for n in merged:
                d = working_dtype(rec, [dtype[b[n].dtype]] + [dtype[x[n].dtype] for x in ms])
                x_j = ref.spec_rd(ref.to_float32(as_numpy(m[n]), dtype[m[n].dtype]), d)
                x_b = ref.spec_rd(ref.to_float32(as_numpy(b[n]), dtype[b[n].dtype]), d)
                mags.append(ref.spec_mag(ref.spec_rd(x_j - x_b, d)))
            mags = np.concatenate(mags)
            t0 = rec["tensors"][merged[0]]
            model_th.append(
                ref.spec_thresholds(
                    sparsifier, mags, t0["density"][j], (t0.get("gamma") or [None] * len(ms))[j]
                )
            )
    out, ths = {}, {}
    for name, bt in ref_model.items():
        want = rec["dtype"]
        if name not in merged:
            x = as_numpy(bt)
            if bt.is_floating_point() and want is not None and want != dtype[bt.dtype]:
                x = ref.from_float32(ref.to_float32(x, dtype[bt.dtype]), want)
            out[name] = np.ascontiguousarray(x).view(np.uint8)
            continue
        tr = rec["tensors"][name]
        res, th = ref.spec_merge_v2(
            as_numpy(bt) if b is not None else None,
            [as_numpy(m[name]) for m in ms],
            want or dtype[bt.dtype],
            method=method,
            key=ref.spec_key(rec["seed"], name),
            weights=tr["w"],
            density=tr.get("density"),
            drop=tr.get("drop"),
            gamma=tr.get("gamma"),
            scale=tr.get("scale", 1.0),
            normalize=tr["normalize"],
            thresholds=model_th,
            base_dtype=dtype[bt.dtype] if b is not None else None,
            model_dtypes=[dtype[m[name].dtype] for m in ms],
            compute_dtype=working_dtype(
                rec, ([dtype[bt.dtype]] if b is not None else []) + [dtype[m[name].dtype] for m in ms]
            ),
        )
        out[name] = np.ascontiguousarray(res).view(np.uint8)
        ths[name] = th
    return out, ths
