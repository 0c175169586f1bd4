"""Open a model directory and validate every safetensors header (``open_model``).

The safetensors format (huggingface/safetensors README): 8 bytes little-endian u64 N, then
N bytes of UTF-8 JSON mapping each tensor name to ``{"dtype", "shape", "data_offsets":
[begin, end]}`` (offsets relative to the data area that follows the header, ``end - begin
== prod(shape) * itemsize``), an optional ``"__metadata__"`` string map, then the data.

The tensors' bytes are read by ``streammerge.io.ranges.RangeReader``.
"""

from __future__ import annotations

import hashlib
import math
import os
from array import array
from pathlib import Path

import numpy as np

from streammerge.errors import MergeError
from streammerge.io import safejson
from streammerge.io.model_types import (  # noqa: F401  (re-exported: reader's names as before)
    DTYPE_ITEMSIZE,
    FLOAT_DTYPES,
    ModelDir,
    TensorInfo,
)
from streammerge.io.paths import check_within_model
from streammerge.names import name_problem

#: Largest header the reader accepts (bytes); the Rust safetensors loader uses 100 MB.
MAX_HEADER_BYTES = 100_000_000
#: Deepest JSON nesting of an index (root, weight_map or metadata, a value).
MAX_INDEX_DEPTH = 8
#: Largest index file accepted (bytes).
MAX_INDEX_BYTES = 100_000_000
#: Largest dimension and element count (torch and safetensors count in 64-bit integers).
MAX_ELEMS = 2**63 - 1
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


def _header_object(pairs: list[tuple[str, object]]):
    """``json.loads`` hook: a key given twice is an error (plain ``json.loads`` keeps the
    last one silently, so a header could hide a second span for a tensor); a well-formed
    tensor entry becomes a tuple ``(dtype, shape tuple, begin, end)`` at once instead of a
    dict of lists (JSON itself never makes tuples, so a tuple is always such an entry)."""
    if len(pairs) == 3:
        (k0, dtype), (k1, shape), (k2, offsets) = pairs
        if not (k0 == "dtype" and k1 == "shape" and k2 == "data_offsets"):
            d = dict(pairs)
            if d.keys() != _ENTRY_KEYS:
                d = None
            else:
                dtype, shape, offsets = d["dtype"], d["shape"], d["data_offsets"]
        else:
            d = True
        if (
            d is not None
            and type(dtype) is str
            and type(shape) is list
            and type(offsets) is list
            and len(offsets) == 2
        ):
            return (dtype, tuple(shape), offsets[0], offsets[1])
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _shape_ok(shape) -> bool:
    """Dimensions are non-negative ints, and their product (zeros aside) fits int64: a
    zero-element tensor with a dimension of 2**70 is no tensor safetensors can load."""
    if not all(type(d) is int and d >= 0 for d in shape):
        return False
    n = 1
    for d in shape:
        if d:
            n *= d
            if n > MAX_ELEMS:
                return False
    return True


def header_length(head: bytes, size: int, path) -> int:
    """The header length a safetensors file of ``size`` bytes states in its first 8 bytes
    ``head`` (little-endian), checked before the header is read.

    Raises:
        MergeError: fewer than 8 bytes, or a length past the end of the file or above
            MAX_HEADER_BYTES (naming ``path``, a path or a URL).
    """
    if len(head) < 8:
        raise MergeError(
            f"file is {size} bytes, too short for a safetensors header",
            path,
            todo="the shard is truncated: re-download or re-save it",
        )
    n = int.from_bytes(head[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise MergeError(
            f"header length {n} runs past the end of the {size}-byte file",
            path,
            todo="the shard is truncated or not safetensors: re-download or re-save it",
        )
    return n


def _read_header_bytes(path: Path) -> tuple[int, int, bytes]:
    """(file size, header length N, the N header bytes) of one safetensors file.

    Raises:
        MergeError: the file cannot be read, or its stated header length is bad.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = header_length(f.read(8), size, path)
            raw = f.read(n)
    except OSError as e:
        raise MergeError(
            f"cannot read file: {e.strerror}", path, todo="check the path and its permissions"
        ) from e
    return size, n, raw


def _decode_header(raw: bytes, path: Path, fix: str) -> dict:
    """The header's JSON object: name -> entry (a tuple ``(dtype, shape, begin, end)`` when
    well formed, see ``_header_object``), and ``__metadata__``.

    Raises:
        MergeError: bad JSON (or a number too long), a key listed twice, not an object.
    """
    try:
        header = safejson.loads(
            raw,
            path,
            max_depth=None,  # the entries' structure is checked by _checked_entry
            max_bytes=MAX_HEADER_BYTES,
            todo=fix,
            what="header",
            object_pairs_hook=_header_object,
        )
    except _DuplicateKey as e:
        raise MergeError("the header lists this key twice", path, e.key, fix) from None
    if not isinstance(header, dict):
        raise MergeError("header is not a JSON object", path, todo=fix)
    return header


def _checked_entry(
    name: str, entry, path: Path, data_size: int, fix: str
) -> tuple[str, tuple | list, int, int]:
    """(dtype, shape, begin, end) of tensor ``name``'s header entry, checked: ``begin`` and
    ``end`` are byte offsets in the data area of ``data_size`` bytes.

    Raises:
        MergeError: a name no UTF-8 file can hold, an entry that is not an object, an
            unknown dtype, a bad shape or data_offsets, span != shape x itemsize, or a span
            past the data area.
    """
    problem = name_problem(name)
    if problem is not None:
        raise MergeError(problem, path, ascii(name), "rename the tensor and re-save the shard")
    if type(entry) is tuple:
        dtype, shape, begin, end = entry
        offsets = [begin, end]
    elif isinstance(entry, dict):
        dtype, shape, offsets = (
            entry.get("dtype"),
            entry.get("shape"),
            entry.get("data_offsets"),
        )
    else:
        raise MergeError("header entry is not a JSON object", path, name, fix)
    if dtype not in DTYPE_ITEMSIZE:
        raise MergeError(f"unknown dtype {dtype!r}", path, name, fix)
    if not (isinstance(shape, (list, tuple)) and _shape_ok(shape)):
        raise MergeError(
            f"bad shape {list(shape) if isinstance(shape, tuple) else shape!r}", path, name, fix
        )
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise MergeError(f"bad data_offsets {offsets!r}", path, name, fix)
    begin, end = offsets
    want = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
    if end - begin != want:
        raise MergeError(
            f"byte span {end - begin} != shape {list(shape)} x {DTYPE_ITEMSIZE[dtype]} bytes ({want})",
            path,
            name,
            fix,
        )
    if end > data_size:
        raise MergeError(
            f"data_offsets {offsets} run past the {data_size}-byte data area",
            path,
            name,
            "the shard is truncated: re-download or re-save it",
        )
    return dtype, shape, begin, end


def _parse_header(path: Path, digest: hashlib._Hash) -> tuple[dict[str, TensorInfo], str]:
    """Parse and validate one safetensors file's header.

    Returns:
        (name -> TensorInfo, sha256 hex of the file's name, size and header bytes).

    Raises:
        MergeError: unreadable file, header length past the end, bad JSON (or nested too
            deep, or a number too long), unknown dtype, a shape past int64, span != shape x
            itemsize, span outside the data area, overlapping spans, a key listed twice, or a
            tensor name no UTF-8 file can hold.
    """
    size, n, raw = _read_header_bytes(path)
    file_digest = hashlib.sha256(f"{path.name}\0{size}\0".encode())
    file_digest.update(raw)
    digest.update(f"{path.name}\0{size}\0".encode())
    digest.update(raw)
    fix = "the shard is corrupt: re-download or re-save it"
    header = _decode_header(raw, path, fix)
    del raw
    data_start = 8 + n
    data_size = size - data_start
    out: dict[str, TensorInfo] = {}
    begins, ends = array("q"), array("q")  # 16 bytes a tensor, not a tuple each
    for name in list(header):
        entry = header.pop(name)
        if name == "__metadata__":
            if not isinstance(entry, dict):
                raise MergeError(
                    "__metadata__ is not a JSON object", path, todo="re-save the shard"
                )
            continue
        dtype, shape, begin, end = _checked_entry(name, entry, path, data_size, fix)
        begins.append(begin)
        ends.append(end)
        out[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + begin, end - begin)
    del header
    _check_overlaps(np.frombuffer(begins, np.int64), np.frombuffer(ends, np.int64), out, path)
    return out, file_digest.hexdigest()


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file (e.g. a LoRA adapter's weights), its header
    checked as a model shard's is (``_parse_header``).

    Raises:
        MergeError: as ``_parse_header``.
    """
    return _parse_header(Path(path), hashlib.sha256())[0]


def _check_overlaps(begins: np.ndarray, ends: np.ndarray, infos: dict, path: Path) -> None:
    """Refuse two non-empty byte spans that overlap (vectorized: 1M tensors in ~0.1 s).

    Raises:
        MergeError: naming both tensors.
    """
    idx = np.flatnonzero(ends > begins)
    order = idx[np.lexsort((ends[idx], begins[idx]))]
    b, e = begins[order], ends[order]
    if b.size < 2:
        return
    reach = np.maximum.accumulate(e)  # furthest end of the spans so far
    bad = np.flatnonzero(b[1:] < reach[:-1])
    if bad.size:
        i = int(bad[0]) + 1
        names = list(infos)
        prev = int(order[int(np.argmax(e[:i]))])
        raise MergeError(
            f"byte span overlaps tensor {names[prev]!r}",
            path,
            names[int(order[i])],
            "the shard is corrupt: re-download or re-save it",
        )


#: What to do about a file (or a symlink) that leads out of the model directory.
_OUTSIDE = "copy the file into the model directory (symlinks may not lead out of it)"


def _check_directory(root: Path) -> None:
    """Refuse a path that is not a readable directory."""
    if not root.is_dir():
        raise MergeError(
            "not a directory", root, todo="pass a model directory in Hugging Face layout"
        )
    try:
        os.listdir(root)
    except OSError as e:
        raise MergeError(
            f"cannot read directory: {e.strerror}", root, todo="check the path and its permissions"
        ) from e


def _load_weight_map(index_path: Path) -> dict[str, str]:
    """The index's ``weight_map``: tensor name -> shard file name.

    Raises:
        MergeError: bad JSON, or no such mapping of strings to strings.
    """
    index = safejson.load_file(
        index_path,
        max_depth=MAX_INDEX_DEPTH,
        max_bytes=MAX_INDEX_BYTES,
        todo="fix or re-save the index",
        what="index",
    )
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise MergeError(
            "bad index: no weight_map mapping tensor names to file names",
            index_path,
            todo="fix or re-save the index",
        )
    return weight_map


def _parse_shards(
    root: Path, index_path: Path, files: list[str], digest, file_fps: dict[str, str]
) -> dict[str, dict[str, TensorInfo]]:
    """Every shard's header, in index order: file name -> (name -> TensorInfo); each
    file's fingerprint goes into ``file_fps``, its name, size and header into ``digest``.

    Raises:
        MergeError: a shard named outside the directory, missing, or leading out of it,
            or any header check of ``_parse_header``.
    """
    headers = {}
    for fname in files:
        fpath = root / fname
        if Path(fname).name != fname or fname in ("", ".", ".."):
            raise MergeError(
                f"the index names shard {fname!r}, outside the model directory",
                index_path,
                todo="fix the index: shards lie beside it",
            )
        if not fpath.is_file():
            raise MergeError(
                f"the index names shard {fname!r}, which is missing",
                index_path,
                todo="restore the shard or fix the index",
            )
        check_within_model(fpath, root, "the shard", _OUTSIDE)
        headers[fname], file_fps[fname] = _parse_header(fpath, digest)
    return headers


def _join_shards(root: Path, headers: dict[str, dict[str, TensorInfo]]) -> dict[str, TensorInfo]:
    """The shards' tensors in one map: name -> TensorInfo, in index order of the shards.

    Raises:
        MergeError: a tensor stored in two shards.
    """
    tensors: dict[str, TensorInfo] = {}
    for fname, infos in headers.items():  # every header first: a duplicate is named as one
        for name, info in infos.items():
            if name in tensors:
                raise MergeError(
                    f"tensor stored in two shards ({tensors[name].file.name} and {fname})",
                    root,
                    name,
                    "remove the duplicate or re-save the model",
                )
            tensors[name] = info
    return tensors


def _check_index_agrees(
    index_path: Path, weight_map: dict[str, str], tensors: dict[str, TensorInfo]
) -> None:
    """Refuse an index whose ``weight_map`` and the shards' headers disagree: a tensor in
    another shard than the index says, or a tensor the index names and no header has."""
    for name, info in tensors.items():
        if weight_map.get(name) != info.file.name:
            raise MergeError(
                f"the header of {info.file.name} has this tensor, the index says {weight_map.get(name)!r}",
                index_path,
                name,
                "fix or re-save the index",
            )
    for name, fname in weight_map.items():
        if name not in tensors:
            raise MergeError(
                f"the index puts this tensor in {fname}, whose header lacks it",
                index_path,
                ascii(name) if name_problem(name) else name,
                "fix or re-save the index",
            )


def _open_index(
    root: Path, index_path: Path, digest, file_fps: dict[str, str]
) -> tuple[dict[str, TensorInfo], list[Path]]:
    """(name -> TensorInfo, the shard paths in index order) of a sharded model, every
    header checked and checked against the index."""
    check_within_model(index_path, root, "the index", _OUTSIDE)
    weight_map = _load_weight_map(index_path)
    files = list(dict.fromkeys(weight_map.values()))
    headers = _parse_shards(root, index_path, files, digest, file_fps)
    tensors = _join_shards(root, headers)
    del headers
    _check_index_agrees(index_path, weight_map, tensors)
    return tensors, [root / f for f in files]


def _stamp(file_paths: list[Path]) -> str:
    """sha256 (hex) of every file's name, size and modification time (ns)."""
    stamp = hashlib.sha256()
    for p in file_paths:
        st = p.stat()
        stamp.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return stamp.hexdigest()


def open_model(path: str | Path) -> ModelDir:
    """Open and validate a model directory: every header, and the index against them.

    Args:
        path: directory with ``model.safetensors``, or ``model.safetensors.index.json``
            plus the shards its ``weight_map`` names.

    Returns:
        ModelDir with every tensor's location.

    Raises:
        MergeError: not a directory, no weights, bad index, a shard missing, a tensor in two
            shards, index and headers disagreeing, or any header check of the reader failing.
    """
    root = Path(path)
    _check_directory(root)
    digest = hashlib.sha256()
    index_path = root / INDEX_FILE
    file_fps: dict[str, str] = {}
    if index_path.is_file():
        tensors, file_paths = _open_index(root, index_path, digest, file_fps)
    elif (root / SINGLE_FILE).is_file():
        file_paths = [root / SINGLE_FILE]
        check_within_model(file_paths[0], root, "the weights file", _OUTSIDE)
        tensors, file_fps[SINGLE_FILE] = _parse_header(file_paths[0], digest)
    else:
        raise MergeError(
            f"no {SINGLE_FILE} or {INDEX_FILE}",
            root,
            todo="pass a model directory in Hugging Face safetensors layout",
        )
    if not tensors:
        raise MergeError(
            "the model has no tensors", root, todo="pass a model directory with weights"
        )
    total = sum(t.nbytes for t in tensors.values())
    return ModelDir(
        root, file_paths, tensors, digest.hexdigest(), total, _stamp(file_paths), file_fps
    )
