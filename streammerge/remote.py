"""Inputs by URL through fsspec: ``https://``, ``http://``, ``hf://org/model[@revision]``,
``s3://``, ``gs://``, ``file://``.

Headers first: ``open_remote_model`` fetches the index and, per shard, only the 8-byte
length and the JSON header (range reads), writes them into a local *skeleton* directory
(the index, and sparse files of the shards' true sizes holding just their headers), and
validates it with the same code as a local model (``reader.open_model``). So every check
and ``--plan`` finish before a byte of weights moves. The tensors then point at
``RemoteFile`` objects, and ``read_jobs`` streams weights with ranged reads, cut in pieces
read several at a time by the pipeline's reader pool, into the same bounded buffers.

Integrity: each file's size and ETag are pinned when it is opened (``hf://`` revisions are
resolved to a commit); HTTP range reads carry ``If-Match: <ETag>``, so a file changed on
the server mid-merge fails its next read (412) and the run stops with one line (finished
shards stay journaled). Transient errors (connection resets, 5xx, 429, timeouts) are
retried with exponential backoff. Side files (config, tokenizer) are downloaded into the
skeleton, so they are copied as from a local base.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from streammerge.errors import MergeError
from streammerge.reader import INDEX_FILE, SINGLE_FILE, ModelDir, open_model

#: Bytes per ranged request (pieces of one chunk row are read concurrently by the pool).
PIECE_BYTES = 8 * 2**20
#: Attempts per request, and the first backoff (seconds; doubles each retry).
ATTEMPTS = 6
BACKOFF_S = 0.05
#: Side files fetched from a remote base (plain HTTP servers cannot list a directory).
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt",
    "added_tokens.json", "README.md",
)  # fmt: skip
MAX_SIDE_BYTES = 64 * 2**20


def is_url(path) -> bool:
    """True for ``scheme://...`` strings (a local path never has ``://``)."""
    return isinstance(path, str) and "://" in path


class RemoteChanged(MergeError):
    """A remote input changed (size or ETag) after it was opened."""


class RemoteFile:
    """One remote shard: URL, pinned size and ETag, and ranged reads with retries.

    Attributes:
        url: the file's URL; name: its base name; parent: the model's URL (for messages).
        size: bytes; etag: the server's ETag when it gives one (else None).
    """

    def __init__(self, fs, path: str, url: str, size: int, etag: str | None) -> None:
        self.fs, self.path, self.url = fs, path, url
        self.size, self.etag = size, etag
        self.name = url.rstrip("/").rsplit("/", 1)[-1]
        self.parent = url.rstrip("/").rsplit("/", 1)[0]

    def __str__(self) -> str:
        return self.url

    def __reduce__(self):  # pickled to Ray workers: reconnect there
        return (_reopen, (self.url, self.size, self.etag))

    def read(self, start: int, n: int) -> bytes:
        """Bytes ``[start, start + n)``, retried with backoff on transient errors.

        Raises:
            RemoteChanged: the server's copy changed (412 on If-Match, or a short read).
            MergeError: still failing after ATTEMPTS tries.
        """
        kw = {}
        if self.etag is not None and _is_http(self.url):
            kw["headers"] = {"If-Match": self.etag}
        delay = BACKOFF_S
        for attempt in range(ATTEMPTS):
            try:
                data = self.fs.cat_file(self.path, start=start, end=start + n, **kw)
            except Exception as e:  # noqa: BLE001 - classified below
                status = getattr(e, "status", None) or getattr(e, "code", None)
                if status == 412:
                    raise RemoteChanged(
                        "changed on the server since the merge started (ETag no longer matches)",
                        self.url, None, "re-run with --resume when the file is stable (finished "
                        "shards whose inputs are unchanged are kept)",
                    ) from None  # fmt: skip
                if isinstance(e, FileNotFoundError) or status in (401, 403, 404):
                    raise MergeError(f"cannot read ({type(e).__name__}: {e})", self.url, None,
                                     "check the URL and credentials") from None  # fmt: skip
                if attempt == ATTEMPTS - 1:
                    raise MergeError(
                        f"read failed {ATTEMPTS} times ({type(e).__name__}: {e})", self.url,
                        None, "check the network, then re-run with --resume",
                    ) from None  # fmt: skip
                time.sleep(delay)
                delay *= 2
                continue
            if len(data) != n:
                raise RemoteChanged(
                    f"range {start}-{start + n} returned {len(data)} bytes (the file changed "
                    "or the server ignores ranges)", self.url, None,
                    "serve the file with range requests, unchanged during the merge",
                )  # fmt: skip
            return data
        raise AssertionError("unreachable")


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _reopen(url: str, size: int, etag: str | None) -> RemoteFile:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return RemoteFile(fs, path, url, size, etag)


def _info(fs, path: str, url: str) -> tuple[int, str | None]:
    delay = BACKOFF_S
    for attempt in range(ATTEMPTS):
        try:
            info = fs.info(path)
            break
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - transient, retried
            if attempt == ATTEMPTS - 1:
                raise MergeError(f"cannot reach ({type(e).__name__}: {e})", url, None,
                                 "check the URL and the network") from None  # fmt: skip
            time.sleep(delay)
            delay *= 2
    size = info.get("size")
    if size is None:
        raise MergeError("the server does not report the file size", url, None,
                         "serve it with Content-Length and range requests")  # fmt: skip
    etag = info.get("ETag") or info.get("etag") or info.get("oid") or info.get("blob_id")
    return int(size), etag


def _pin(url: str) -> tuple[object, str, str, str | None]:
    """(fs, root path, canonical URL, revision): ``hf://`` pinned to a commit."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url.rstrip("/"))
    except (ImportError, ValueError) as e:
        raise MergeError(f"unsupported URL ({e})", url, None,
                         "use https://, hf://, s3:// (s3fs) or gs:// (gcsfs)") from None  # fmt: skip
    revision = None
    if url.startswith("hf://"):
        try:
            res = fs.resolve_path(root)
            revision = getattr(res, "revision", None)
            repo = f"{res.repo_id}@{revision}" if revision else res.repo_id
            root = f"{getattr(res, 'repo_type', 'model')}s/{repo}".replace("models/", "", 1)
            url = f"hf://{root}"
        except Exception as e:  # noqa: BLE001
            raise MergeError(f"cannot resolve the Hub repo ({type(e).__name__}: {e})", url, None,
                             "check the repo id and revision, or HF_TOKEN") from None  # fmt: skip
    return fs, root, url.rstrip("/"), revision


def open_remote_model(url: str) -> ModelDir:
    """Open a model by URL, reading headers only (see the module docstring).

    Returns:
        A ModelDir validated like a local one, whose tensors live in ``RemoteFile``s;
        ``url`` and ``revision`` are set on it for the record, ``stamp`` is built from the
        files' sizes and ETags (what ``--resume`` compares).

    Raises:
        MergeError: unreachable URL, no weights, a bad index or header (the same checks
            as a local model).
    """
    fs, root, canon, revision = _pin(url)
    skel = Path(tempfile.mkdtemp(prefix="streammerge-remote-"))
    atexit.register(shutil.rmtree, skel, True)
    files: dict[str, RemoteFile] = {}

    def remote(name: str) -> RemoteFile | None:
        try:
            size, etag = _info(fs, f"{root}/{name}", f"{canon}/{name}")
        except FileNotFoundError:
            return None
        return RemoteFile(fs, f"{root}/{name}", f"{canon}/{name}", size, etag)

    index = remote(INDEX_FILE)
    if index is not None:
        text = index.read(0, index.size)
        (skel / INDEX_FILE).write_bytes(text)
        try:
            names = list(dict.fromkeys(json.loads(text)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            names = []  # open_model names the problem with the index
    else:
        names = [SINGLE_FILE]
    for name in names:
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            continue  # open_model refuses it with its own message
        f = remote(name)
        if f is None:
            if index is None:
                raise MergeError(f"no {SINGLE_FILE} or {INDEX_FILE}", canon, None,
                                 "pass a model URL in Hugging Face safetensors layout")  # fmt: skip
            continue
        head = f.read(0, min(8, f.size))
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        header = f.read(8, min(n, max(0, f.size - 8))) if n else b""
        with open(skel / name, "wb") as out:  # sparse: the header, then a hole
            out.write(head + header)
            out.truncate(f.size)
        files[name] = f
    for side in SIDE_FILES:
        f = remote(side)
        if f is not None and f.size <= MAX_SIDE_BYTES:
            (skel / side).write_bytes(f.read(0, f.size) if f.size else b"")
    try:
        model = open_model(skel)
    except MergeError as e:
        raise MergeError(e.what.replace(str(skel), canon), canon, e.tensor, e.todo) from None
    model.tensors = {n: replace(t, file=files[Path(t.file).name]) for n, t in model.tensors.items()}
    stamp = hashlib.sha256()
    for name, f in sorted(files.items()):
        stamp.update(f"{name}\0{f.size}\0{f.etag}\0".encode())
    model.stamp = stamp.hexdigest()
    model.url, model.revision = canon, revision  # type: ignore[attr-defined]
    return model


def read_jobs(jobs, pool) -> None:
    """Fill rows from remote files: ``(info, byte_offset, nbytes, row)`` jobs cut into
    PIECE_BYTES ranges read concurrently by ``pool`` (the pipeline's reader threads)."""
    futures = []
    for info, byte_offset, nbytes, row in jobs:
        f: RemoteFile = info.file
        pos = info.start + byte_offset
        for off in range(0, nbytes, PIECE_BYTES):
            n = min(PIECE_BYTES, nbytes - off)
            futures.append(pool.submit(_read_piece, f, pos + off, n, row, off))
    for fut in futures:
        fut.result()


def _read_piece(f: RemoteFile, pos: int, n: int, row, off: int) -> None:
    row[off : off + n] = np.frombuffer(f.read(pos, n), np.uint8)
