"""Bit-level agreement of two model directories (e.g. mergekit's output vs streammerge's).

Compares every tensor the two directories share (safetensors, sharded or not, any shard
layout): the fraction of elements whose stored bits are equal, and the largest difference
in units in the last place of the stored dtype (bf16 / fp16 / fp32 / fp64: the bit
patterns compared as ordered integers, so +0 and -0 are 0 ulp apart; integer tensors:
the largest absolute difference). Prints a markdown table: one row per tensor for a single
pair, one row per method when several pairs are given.

    python bench/mergekit_agree.py MERGEKIT_OUT STREAMMERGE_OUT
    python bench/mergekit_agree.py --pair task_arithmetic mk/ta sm/ta --pair ties mk/ties sm/ties
    python bench/mergekit_agree.py mk/ties sm/ties --explain BASE A B --record sm/ties/streammerge.json

``--explain BASE MODEL...`` (the merge's inputs, fine-tunes in the recipe's order) sorts
every differing element into one reason: "threshold tie" when for some fine-tune j the
magnitude ``bits(rd(float32(model_j) - float32(base))) & 0x7FFFFFFF`` (rd: rounding to the
tensor's recorded working dtype, docs/SPEC.md "Working dtype (v3)") equals one of that
tensor's recorded thresholds (``streammerge.json`` ``"tensors"[name]["thresholds"][j]``:
mergekit's argsort keeps an arbitrary subset of the elements tied with the k-th largest
magnitude, streammerge keeps them all); else, for a ``linear`` record, "linear fma" when
recomputing the element from the inputs and the recorded weights gives A's bits with
mergekit's fused ``addcmul_`` (``acc = fma(x_j, float32(w_j), acc)``, exactly rounded) and
B's bits with SPEC's unfused sum (verified per element, not assumed); else "fma/rounding
(1 ulp)" when the two values are at most 1 ulp apart; else "other". ``--record``
defaults to ``B/streammerge.json``.

Memory stays bounded: tensors are processed one at a time, in chunks of ``--chunk``
elements. ``safe_open`` (numpy framework) lists names, dtypes and shapes; the bytes are
read through ``np.memmap`` at the offsets of the safetensors header, as raw bit patterns
(numpy has no bfloat16, and the comparison wants the bits anyway).

Self-check (``python -m doctest bench/mergekit_agree.py``):

>>> import os, tempfile, numpy as np, safetensors.numpy as stn
>>> d = tempfile.mkdtemp(); a, b = os.path.join(d, "a"), os.path.join(d, "b")
>>> os.makedirs(a); os.makedirs(b)
>>> x = np.linspace(-1, 1, 1000, dtype=np.float32)
>>> h = np.arange(10, dtype=np.float16)
>>> stn.save_file({"w": x, "h": h}, os.path.join(a, "model.safetensors"))
>>> y = x.copy(); y[3] = np.nextafter(y[3], np.float32(9)); y[7] = (y[7].view(np.int32) + 3).view(np.float32)
>>> stn.save_file({"w": y}, os.path.join(b, "model-00001-of-00002.safetensors"))
>>> stn.save_file({"h": h}, os.path.join(b, "model-00002-of-00002.safetensors"))
>>> r = compare_dirs(a, b)
>>> t = r["tensors"]["w"]; (t["equal"], t["numel"], t["max_ulp"], r["tensors"]["h"]["equal"])
(998, 1000, 3, 10)
>>> r["summary"]["equal"], r["summary"]["numel"], r["summary"]["max_ulp"]
(1008, 1010, 3)
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

REASONS = ("threshold tie", "linear fma", "fma/rounding (1 ulp)", "other")
FLOAT_BITS = {"BF16": 16, "F16": 16, "F32": 32, "F64": 64}
RAW = {  # safetensors dtype -> numpy dtype of the stored bits (floats) or values (ints)
    "BF16": np.uint16, "F16": np.uint16, "F32": np.uint32, "F64": np.uint64,
    "I8": np.int8, "U8": np.uint8, "I16": np.int16, "U16": np.uint16, "I32": np.int32,
    "U32": np.uint32, "I64": np.int64, "U64": np.uint64, "BOOL": np.uint8,
}  # fmt: skip


@dataclass(frozen=True)
class TensorRef:
    path: str
    dtype: str
    shape: tuple
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    def bits(self) -> np.ndarray:
        """The stored data as a flat read-only memmap of raw bits (floats) or values."""
        dt = np.dtype(RAW[self.dtype])
        if self.numel == 0:
            return np.zeros(0, dt)
        return np.memmap(self.path, dtype=dt, mode="r", offset=self.offset, shape=(self.numel,))


def _header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def index_dir(d: str | os.PathLike) -> dict[str, TensorRef]:
    """Every tensor of a model directory (all ``*.safetensors`` files in it)."""
    files = sorted(p for p in Path(d).glob("*.safetensors") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {d}")
    out: dict[str, TensorRef] = {}
    for p in files:
        head, base = _header(str(p))
        with safe_open(str(p), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = f.get_slice(name)
                dtype, shape = sl.get_dtype(), tuple(sl.get_shape())
                start, end = head[name]["data_offsets"]
                if head[name]["dtype"] != dtype or dtype not in RAW:
                    raise ValueError(f"{p}: {name}: unsupported dtype {dtype}")
                if name in out:
                    raise ValueError(f"{d}: tensor {name} in two files")
                out[name] = TensorRef(str(p), dtype, shape, base + start, end - start)
    return out


def _ordered_ulp(a: np.ndarray, b: np.ndarray, nbits: int) -> np.ndarray:
    """|a - b| in ulps of a float format, from raw bit patterns (uint64 result)."""
    a = a.astype(np.uint64)
    b = b.astype(np.uint64)
    sign = np.uint64(1 << (nbits - 1))
    mag = np.uint64((1 << (nbits - 1)) - 1)
    ma, mb = a & mag, b & mag
    same = (a & sign) == (b & sign)
    return np.where(same, np.where(ma >= mb, ma - mb, mb - ma), ma + mb)


def _to_f32(ref: TensorRef, raw: np.ndarray) -> np.ndarray:
    if ref.dtype == "BF16":
        return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if ref.dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    if ref.dtype == "F32":
        return raw.view(np.float32)
    if ref.dtype == "F64":
        return raw.view(np.float64).astype(np.float32)
    return raw.astype(np.float32)


def _is_nan(ref: TensorRef, raw: np.ndarray) -> np.ndarray:
    n = FLOAT_BITS[ref.dtype]
    exp = {16: 0x7C00 if ref.dtype == "F16" else 0x7F80, 32: 0x7F800000}.get(n)
    if n == 64:
        return np.isnan(raw.view(np.float64))
    e, m = np.uint64(exp), np.uint64(((1 << (n - 1)) - 1) & ~exp)
    r = raw.astype(np.uint64)
    return ((r & e) == e) & ((r & m) != 0)


def load_record(path: str | os.PathLike | None) -> dict:
    """``{tensor: [[thresholds of fine-tune j] or None, ...]}`` from a streammerge.json."""
    if path is None or not Path(path).is_file():
        return {}
    rec = json.loads(Path(path).read_text())
    return {
        name: t.get("thresholds") for name, t in (rec.get("tensors") or {}).items()
        if t.get("thresholds") is not None
    }  # fmt: skip


def load_compute(path: str | os.PathLike | None) -> dict:
    """``{tensor: working dtype D}`` (docs/SPEC.md "Working dtype (v3)") from a
    streammerge.json (tensors without one: float32)."""
    if path is None or not Path(path).is_file():
        return {}
    rec = json.loads(Path(path).read_text())
    return {name: t["compute_dtype"] for name, t in (rec.get("tensors") or {}).items()
            if t.get("compute_dtype")}  # fmt: skip


def _rd(x: np.ndarray, dtype: str | None) -> np.ndarray:
    """float32 values rounded to the working dtype (nearest even) and back to float32."""
    if dtype in (None, "F32"):
        return x
    bits = _round_stored(np.ascontiguousarray(x, np.float32), dtype)
    if dtype == "BF16":
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return bits.view(np.float16).astype(np.float32)


def load_linear(path: str | os.PathLike | None) -> dict:
    """``{tensor: (weights, normalize)}`` when the streammerge.json is a ``linear`` merge."""
    if path is None or not Path(path).is_file():
        return {}
    rec = json.loads(Path(path).read_text())
    if rec.get("method") != "linear":
        return {}
    return {
        name: (t["w"], bool(t.get("normalize", True)))
        for name, t in (rec.get("tensors") or {}).items() if t.get("w") is not None
    }  # fmt: skip


def _f32_exact(s: np.ndarray, e: np.ndarray) -> np.ndarray:
    """float32 round-to-nearest-even of the exact real ``s + e`` (float64 s, e from TwoSum).

    ``float32(s)`` is already right unless ``s`` sits exactly on a float32 midpoint and
    ``e`` is not zero (rounding to float64 cannot cross a midpoint, only land on one).
    """
    r = s.astype(np.float32)
    rd = r.astype(np.float64)
    toward = np.where(s > rd, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32)
    other = np.nextafter(r, toward)
    with np.errstate(invalid="ignore", over="ignore"):
        mid = (rd != s) & ((rd + other.astype(np.float64)) / 2 == s)
    fix = mid & (e != 0)
    if fix.any():
        hi, lo = np.maximum(r, other), np.minimum(r, other)
        r[fix] = np.where(e[fix] > 0, hi[fix], lo[fix])
    return r


def _round_stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> stored bits of ``dtype`` (round to nearest even)."""
    if dtype == "BF16":
        u = x.view(np.uint32).astype(np.uint64)
        return (
            (u + ((u >> np.uint64(16)) & np.uint64(1)) + np.uint64(0x7FFF)) >> np.uint64(16)
        ).astype(np.uint16)
    if dtype == "F16":
        return x.astype(np.float16).view(np.uint16)
    if dtype == "F32":
        return x.view(np.uint32)
    return x.astype(np.float64).view(np.uint64)


def linear_values(xs: list[np.ndarray], w: list[float], normalize: bool, fused: bool) -> np.ndarray:
    """float32 linear merge of the float32 inputs ``xs``.

    ``fused``: mergekit 0.1.5 (``result.addcmul_(x_j, w_j)`` on a zero float32 tensor, one
    rounding per step, then ``div_`` by the float32 sum of the weights, no zero guard).
    Else SPEC v2: ``acc = acc + float32(w_j) * x_j`` rounded twice per step, and a
    denominator of magnitude < 1e-8 replaced by 1.
    """
    wf = [np.float32(v) for v in w]
    acc = np.zeros(xs[0].shape, np.float32)
    with np.errstate(all="ignore"):
        for x, wj in zip(xs, wf):
            if fused:  # exact product in float64 (24 + 24 bits), TwoSum, one rounding
                p = x.astype(np.float64) * np.float64(wj)
                a = acc.astype(np.float64)
                s = p + a
                bp = s - a
                e = (a - (s - bp)) + (p - bp)
                acc = _f32_exact(s, e)
            else:
                acc = (acc + (wj * x).astype(np.float32)).astype(np.float32)
        den = np.float32(0)
        for wj in wf:
            den = np.float32(den + wj)
        if not fused and abs(float(den)) < 1e-8:
            den = np.float32(1)
        if normalize:
            acc = (acc / den).astype(np.float32)
    return acc


def compare_tensor(
    ra: TensorRef,
    rb: TensorRef,
    *,
    explain: tuple[TensorRef | None, list[TensorRef | None]] | None = None,
    thresholds: list | None = None,
    compute: str | None = None,
    linear: tuple[list[float], bool] | None = None,
    chunk: int = 1 << 20,
) -> dict:
    """Stats of one tensor pair; with ``explain`` = (base, models), the reasons too.

    ``linear`` = (weights, normalize) of a linear merge: a difference is "linear fma" when
    A's bits are the fused recomputation and B's the unfused one.
    """
    st = {"dtype": ra.dtype, "numel": ra.numel, "equal": 0, "le1": 0, "max_ulp": 0, "nan_diff": 0}
    if ra.dtype != rb.dtype:
        st["dtype"] = f"{ra.dtype}/{rb.dtype}"
    if ra.shape != rb.shape:
        st.update(status=f"shape {list(ra.shape)} vs {list(rb.shape)}", max_ulp=None)
        return st
    if ra.dtype != rb.dtype:  # values compared as float32 / int64; ulp undefined
        st["status"] = "dtype differs"
        st["max_ulp"] = None
    isfloat = ra.dtype in FLOAT_BITS and rb.dtype in FLOAT_BITS
    if explain is not None:
        st["reasons"] = dict.fromkeys(REASONS, 0)
    ba, bb = ra.bits(), rb.bits()
    tie_sets = [np.asarray(sorted(set(t)), np.uint32) if t else None for t in (thresholds or [])]
    for lo in range(0, ra.numel, chunk):
        a, b = np.asarray(ba[lo : lo + chunk]), np.asarray(bb[lo : lo + chunk])
        if ra.dtype != rb.dtype:
            if isfloat:
                va, vb = _to_f32(ra, a), _to_f32(rb, b)
                st["equal"] += int(np.count_nonzero((va == vb) | (np.isnan(va) & np.isnan(vb))))
            else:
                st["equal"] += int(np.count_nonzero(a.astype(np.float64) == b.astype(np.float64)))
            st["le1"] = st["equal"]
            continue
        diff = a != b
        nd = int(np.count_nonzero(diff))
        st["equal"] += a.size - nd
        st["le1"] += a.size - nd
        if nd == 0:
            continue
        idx = np.flatnonzero(diff)
        if isfloat:
            ulp = _ordered_ulp(a[idx], b[idx], FLOAT_BITS[ra.dtype])
            st["nan_diff"] += int(np.count_nonzero(_is_nan(ra, a[idx]) | _is_nan(rb, b[idx])))
        else:
            ulp = np.abs(a[idx].astype(np.float64) - b[idx].astype(np.float64))
        st["max_ulp"] = max(st["max_ulp"], int(ulp.max()))
        st["le1"] += int(np.count_nonzero(ulp <= 1))
        if explain is None:
            continue
        base, models = explain
        tie = np.zeros(idx.size, bool)
        if base is not None and base.shape == ra.shape:
            xb = _to_f32(base, np.asarray(base.bits()[lo : lo + chunk])[idx])
            for j, m in enumerate(models):
                if m is None or m.shape != ra.shape or j >= len(tie_sets) or tie_sets[j] is None:
                    continue
                xm = _to_f32(m, np.asarray(m.bits()[lo : lo + chunk])[idx])
                with np.errstate(invalid="ignore", over="ignore"):
                    # the task vector in the working dtype D (SPEC "Working dtype (v3)")
                    d = _rd((_rd(xm, compute) - _rd(xb, compute)).astype(np.float32), compute)
                mag = d.view(np.uint32) & np.uint32(0x7FFFFFFF)
                tie |= np.isin(mag, tie_sets[j])
        fma = np.zeros(idx.size, bool)
        if (
            linear is not None and isfloat and ra.dtype == rb.dtype
            and len(models) == len(linear[0])
            and all(m is not None and m.shape == ra.shape for m in models)
        ):  # fmt: skip
            xs = [_to_f32(m, np.asarray(m.bits()[lo : lo + chunk])[idx]) for m in models]
            want_a = _round_stored(linear_values(xs, linear[0], linear[1], True), ra.dtype)
            want_b = _round_stored(linear_values(xs, linear[0], linear[1], False), ra.dtype)
            fma = ~tie & (want_a == a[idx]) & (want_b == b[idx])
        one = ~tie & ~fma & (ulp <= 1)
        r = st["reasons"]
        r["threshold tie"] += int(np.count_nonzero(tie))
        r["linear fma"] += int(np.count_nonzero(fma))
        r["fma/rounding (1 ulp)"] += int(np.count_nonzero(one))
        r["other"] += int(idx.size - np.count_nonzero(tie | fma | one))
    st["equal_frac"] = st["equal"] / st["numel"] if st["numel"] else 1.0
    st["le1_frac"] = st["le1"] / st["numel"] if st["numel"] else 1.0
    return st


def compare_dirs(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    explain_inputs: list[str | os.PathLike] | None = None,
    record: str | os.PathLike | None = None,
    chunk: int = 1 << 20,
) -> dict:
    """Compare directory ``a`` with ``b`` tensor by tensor.

    ``explain_inputs`` = [base, model_0, model_1, ...] turns on the reasons; the
    thresholds come from ``record`` (default ``b/streammerge.json``).
    Returns ``{"tensors": {name: stats}, "only_a": [...], "only_b": [...], "summary": {...}}``.
    """
    ia, ib = index_dir(a), index_dir(b)
    explain = None
    thr: dict = {}
    lin: dict = {}
    comp: dict = {}
    if explain_inputs:
        ins = [index_dir(p) for p in explain_inputs]
        explain = (ins[0], ins[1:])
        rec = record if record is not None else Path(b) / "streammerge.json"
        thr = load_record(rec)
        lin = load_linear(rec)
        comp = load_compute(rec)
    tensors = {}
    for name in sorted(set(ia) & set(ib)):
        ex = None
        if explain is not None:
            ex = (explain[0].get(name), [m.get(name) for m in explain[1]])
        tensors[name] = compare_tensor(ia[name], ib[name], explain=ex, thresholds=thr.get(name),
                                       compute=comp.get(name), linear=lin.get(name),
                                       chunk=chunk)  # fmt: skip
    res = {
        "a": str(a), "b": str(b), "tensors": tensors,
        "only_a": sorted(set(ia) - set(ib)), "only_b": sorted(set(ib) - set(ia)),
    }  # fmt: skip
    res["summary"] = summarize(res)
    return res


def summarize(res: dict) -> dict:
    ts = res["tensors"].values()
    s = {
        "tensors": len(res["tensors"]),
        "tensors_equal": sum(1 for t in ts if t["equal"] == t["numel"] and "status" not in t),
        "numel": sum(t["numel"] for t in ts),
        "equal": sum(t["equal"] for t in ts),
        "le1": sum(t.get("le1", t["equal"]) for t in ts),
        "max_ulp": max((t["max_ulp"] for t in ts if t["max_ulp"] is not None), default=0),
        "nan_diff": sum(t["nan_diff"] for t in ts),
        "problems": [f"{n}: {t['status']}" for n, t in res["tensors"].items() if "status" in t],
        "only_a": len(res["only_a"]), "only_b": len(res["only_b"]),
    }  # fmt: skip
    s["equal_frac"] = s["equal"] / s["numel"] if s["numel"] else 1.0
    s["le1_frac"] = s["le1"] / s["numel"] if s["numel"] else 1.0
    if any("reasons" in t for t in ts):
        s["reasons"] = {k: sum(t.get("reasons", {}).get(k, 0) for t in ts) for k in REASONS}
    return s


def _frac(x: float) -> str:
    return "1" if x == 1 else f"{x:.6f}"


def markdown_per_tensor(res: dict, all_tensors: bool = False) -> str:
    ex = "reasons" in res["summary"]
    head = ["tensor", "dtype", "elements", "bit-equal", "within 1 ulp", "max ulp"]
    head += list(REASONS) if ex else []
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, t in res["tensors"].items():
        if not all_tensors and t["equal"] == t["numel"] and "status" not in t:
            continue
        row = [f"`{name}`", t["dtype"], str(t["numel"]), _frac(t["equal_frac"]),
               _frac(t["le1_frac"]), "-" if t["max_ulp"] is None else str(t["max_ulp"])]  # fmt: skip
        if ex:
            row += [str(t.get("reasons", {}).get(k, 0)) for k in REASONS]
        if "status" in t:
            row[1] += f" ({t['status']})"
        lines.append("| " + " | ".join(row) + " |")
    s = res["summary"]
    lines.append(
        f"\n{s['tensors_equal']}/{s['tensors']} tensors bit-identical, {s['equal']}/{s['numel']} "
        f"elements ({_frac(s['equal_frac'])}), {_frac(s['le1_frac'])} within 1 ulp, "
        f"max {s['max_ulp']} ulp"
        + (
            f", only in A: {s['only_a']}, only in B: {s['only_b']}"
            if s["only_a"] or s["only_b"]
            else ""
        )
        + (f"; reasons: {s['reasons']}" if ex else "")
    )
    return "\n".join(lines)


def markdown_per_method(rows: list[tuple[str, dict]]) -> str:
    ex = any("reasons" in r["summary"] for _, r in rows)
    head = ["method", "tensors bit-identical", "elements", "bit-equal", "within 1 ulp", "max ulp"]
    head += list(REASONS) if ex else []
    head += ["only A/B"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, r in rows:
        s = r["summary"]
        row = [label, f"{s['tensors_equal']}/{s['tensors']}", str(s["numel"]),
               _frac(s["equal_frac"]), _frac(s["le1_frac"]), str(s["max_ulp"])]  # fmt: skip
        if ex:
            row += [str(s.get("reasons", {}).get(k, "-")) for k in REASONS]
        row.append(f"{s['only_a']}/{s['only_b']}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _label(b: str) -> str:
    p = Path(b) / "streammerge.json"
    try:
        return str(json.loads(p.read_text()).get("method") or Path(b).name)
    except (OSError, ValueError):
        return Path(b).name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Bit-level agreement of two safetensors model directories, tensor by tensor."
    )
    ap.add_argument("dirs", nargs="*", metavar="DIR", help="A B (e.g. mergekit's, streammerge's)")
    ap.add_argument(
        "--pair",
        nargs=3,
        action="append",
        default=[],
        metavar=("LABEL", "A", "B"),
        help="one more pair, labelled (repeatable): one table row per pair",
    )
    ap.add_argument(
        "--explain",
        nargs="+",
        metavar="INPUT",
        help="INPUT_BASE INPUT_MODELS...: classify each differing element",
    )
    ap.add_argument(
        "--record",
        default=None,
        help="streammerge.json with the thresholds (default B/streammerge.json)",
    )
    ap.add_argument(
        "--all-tensors", action="store_true", help="list bit-identical tensors too (single pair)"
    )
    ap.add_argument("--json", default=None, help="write the full statistics here")
    ap.add_argument("--chunk", type=int, default=1 << 20, help="elements per read (memory)")
    ap.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 on any difference (with --explain: any not a threshold tie or linear fma)",
    )
    args = ap.parse_args(argv)  # fmt: skip
    pairs = [(p[0], p[1], p[2]) for p in args.pair]
    if args.dirs:
        if len(args.dirs) != 2:
            ap.error("give exactly two directories A B (or --pair LABEL A B)")
        pairs.insert(0, (_label(args.dirs[1]), args.dirs[0], args.dirs[1]))
    if not pairs:
        ap.error("nothing to compare")
    if args.record and len(pairs) > 1:
        ap.error("--record names one pair's streammerge.json; with several pairs each B's is used")
    results = []
    for label, a, b in pairs:
        r = compare_dirs(a, b, explain_inputs=args.explain, record=args.record, chunk=args.chunk)
        results.append((label, r))
    if len(results) == 1:
        print(markdown_per_tensor(results[0][1], args.all_tensors))
    else:
        print(markdown_per_method(results))
    for label, r in results:
        for what in ("only_a", "only_b"):
            if r[what]:
                print(f"{label}: {len(r[what])} tensors only in {what[-1].upper()}: "
                      f"{', '.join(r[what][:5])}{' ...' if len(r[what]) > 5 else ''}")  # fmt: skip
        for p in r["summary"]["problems"]:
            print(f"{label}: {p}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(results), indent=2) + "\n")
    bad = False
    for _, r in results:
        s = r["summary"]
        rs = s.get("reasons", {})
        unexplained = s["numel"] - s["equal"] - rs.get("threshold tie", 0) - rs.get("linear fma", 0)
        bad |= unexplained > 0 or bool(s["problems"]) or s["only_a"] > 0 or s["only_b"] > 0
    return 1 if (args.strict and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
