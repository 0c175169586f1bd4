"""Inputs by URL through fsspec: ``https://``, ``http://``, ``hf://org/model[@revision]``,
``s3://``, ``gs://``, ``file://``.

Headers first: ``open_remote_model`` fetches the index and, per shard, only the 8-byte
length and the JSON header (range reads), writes them into a local *skeleton* directory
(the index, and sparse files of the shards' true sizes holding just their headers), and
validates it with the same code as a local model (``reader.open_model``). So every check
and ``--plan`` finish before a byte of weights moves. The tensors then point at
``RemoteFile`` objects, and ``read_jobs`` streams weights with ranged reads, cut in pieces
read several at a time by the pipeline's reader pool, into the same bounded buffers.

Limits: the index and the side files are fetched with the local limits (the index's
size and depth: ``reader.MAX_INDEX_BYTES``, ``MAX_INDEX_DEPTH``; side files up to
MAX_SIDE_BYTES), refused by their stated length before the body and, over HTTP, while
streaming when a server states none or lies; a header length is checked against the file
size and ``reader.MAX_HEADER_BYTES`` before the header is fetched.

Integrity: each file's size and ETag are pinned when it is opened (``hf://`` revisions are
resolved to a commit). HTTP range reads (``streammerge.io.httpio``) carry ``If-Match:
<ETag>``, and every response's ETag, Content-Range total and length are compared with the
pinned ones, so a file changed on the server mid-merge stops the run with one line
(RemoteChanged) even where the server ignores If-Match; finished shards stay journaled
and ``--resume`` re-verifies the inputs. HTTP requests time out after ``--http-timeout``
seconds without data. Transient errors (connection resets, 5xx, 429, timeouts) are
retried with exponential backoff; the rest become one line naming the file's URL (an HTTP
error with its status, ``HTTP 403 Forbidden``). Side files (config, tokenizer) are
downloaded into the skeleton, so they are copied as from a local base.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from streammerge.errors import MergeError
from streammerge.io import httpio, safejson
from streammerge.io.reader import (
    INDEX_FILE,
    MAX_INDEX_BYTES,
    MAX_INDEX_DEPTH,
    SINGLE_FILE,
    ModelDir,
    header_length,
    open_model,
)
from streammerge.notices import notice

#: Bytes per ranged request (pieces of one chunk row are read concurrently by the pool).
PIECE_BYTES = 8 * 2**20
#: Attempts per request, and the first backoff (seconds; doubles each retry).
ATTEMPTS = 6
BACKOFF_S = 0.05
#: Attempts per request that time out (each waits up to the timeout).
TIMEOUT_ATTEMPTS = 3
#: Seconds an HTTP request may wait to connect, or for the next bytes (``--http-timeout``).
DEFAULT_HTTP_TIMEOUT_S = 30.0
#: HTTP statuses retried (with every 5xx).
RETRY_STATUS = frozenset({408, 425, 429})
#: Side files fetched from a remote base (plain HTTP servers cannot list a directory).
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt",
    "added_tokens.json", "README.md",
)  # fmt: skip
MAX_SIDE_BYTES = 64 * 2**20
RESUME_TODO = (
    "re-run with --resume when the file is stable (finished shards whose inputs are "
    "unchanged are kept)"
)


class RemoteChanged(MergeError):
    """A remote input changed (size or ETag) after it was opened."""


class RemoteHTTPError(MergeError):
    """An HTTP error status that retrying does not help (``status``: the code)."""

    def __init__(self, what="", file=None, tensor=None, todo="check the input", status=0):
        super().__init__(what, file, tensor, todo)
        self.status = status


class _Absent(Exception):
    """The file does not exist (HTTP 404 / 410, or FileNotFoundError); str: how it was told."""


def _todo(status: int) -> str:
    if status in (401, 403):
        return "check the URL and the credentials"
    return "check the URL"


def _retry(call, url: str, seconds: float):
    """``call()`` with retries and backoff on transient failures (connection errors, 5xx,
    408 / 425 / 429: ATTEMPTS tries; timeouts: TIMEOUT_ATTEMPTS).

    Raises:
        RemoteChanged: a 412 (If-Match) or a response not of the pinned file.
        RemoteHTTPError: another HTTP error status (404 included: callers decide).
        MergeError: a server that cannot serve ranges, or still failing after the tries:
            one line naming ``url`` (and the timeout, or the last status).
        httpio.TooLarge: passed through.
    """
    from aiohttp import ClientError

    delay, timeouts, last = BACKOFF_S, 0, ""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except httpio.Status as e:
            if e.status == 412:
                raise _changed(url, "ETag no longer matches") from None
            if not (e.status in RETRY_STATUS or e.status >= 500):
                raise RemoteHTTPError(str(e), url, None, _todo(e.status), status=e.status) from None
            last = str(e)
        except httpio.Mismatch as e:
            raise _changed(url, str(e)) from None
        except httpio.Unsupported as e:
            raise MergeError(str(e), url, None, "serve the file with range requests") from None
        except TimeoutError:  # before OSError: TimeoutError is one
            timeouts += 1
            if timeouts == TIMEOUT_ATTEMPTS:
                raise MergeError(
                    f"timed out after {seconds:g} s, {timeouts} tries", url, None,
                    "check the server and the network (or raise --http-timeout), then re-run "
                    "with --resume",
                ) from None  # fmt: skip
            last = f"timed out after {seconds:g} s"
        except (ClientError, OSError) as e:  # transient: connection refused, reset...
            last = f"cannot reach the server ({type(e).__name__}: {e})"
        if attempt < ATTEMPTS:
            time.sleep(delay)
            delay *= 2
    raise MergeError(f"{last}, {ATTEMPTS} tries", url, None,
                     "the server keeps failing: re-run with --resume later")  # fmt: skip


def _changed(url: str, detail: str) -> RemoteChanged:
    return RemoteChanged(f"changed on the server since the merge started ({detail})", url,
                         None, RESUME_TODO)  # fmt: skip


class RemoteFile:
    """One remote shard: URL, pinned size and ETag, and ranged reads with retries.

    Attributes:
        url: the file's URL; name: its base name; parent: the model's URL (for messages).
        size: bytes; etag: the server's ETag when it gives one (else None).
        timeout: seconds an HTTP request may wait to connect or for the next bytes.
    """

    def __init__(self, fs, path: str, url: str, size: int, etag: str | None,
                 timeout: float = DEFAULT_HTTP_TIMEOUT_S) -> None:  # fmt: skip
        self.fs, self.path, self.url = fs, path, url
        self.size, self.etag, self.timeout = size, etag, timeout
        self.name = url.rstrip("/").rsplit("/", 1)[-1]
        self.parent = url.rstrip("/").rsplit("/", 1)[0]

    def __str__(self) -> str:
        return self.url

    def __reduce__(self):  # pickled to Ray workers: reconnect there
        return (_reopen, (self.url, self.size, self.etag, self.timeout))

    def read(self, start: int, n: int) -> bytes | bytearray:
        """Bytes ``[start, start + n)``, retried with backoff on transient errors; over
        HTTP each response is checked against the pinned size and ETag.

        Raises:
            RemoteChanged: the server's copy changed (412 on If-Match, another ETag or
                size, a short read, or the file gone: 404 / 410).
            MergeError: an HTTP error (``HTTP 403 Forbidden``), a timeout, or still
                failing after ATTEMPTS tries; one line naming the URL.
        """
        if n <= 0:
            return b""
        if not _is_http(self.url):
            return self._read_fsspec(start, n)
        try:
            return _retry(lambda: httpio.get_range(self.fs, self.url, start, n, self.size,
                                                   self.etag, self.timeout),
                          self.url, self.timeout)  # fmt: skip
        except RemoteHTTPError as e:
            if e.status in (404, 410):
                raise _changed(self.url, e.what) from None
            raise

    def _read_fsspec(self, start: int, n: int) -> bytes:
        """A ranged read through fsspec (``hf://``, ``s3://``...: no headers to check)."""
        delay = BACKOFF_S
        for attempt in range(ATTEMPTS):
            try:
                data = self.fs.cat_file(self.path, start=start, end=start + n)
            except Exception as e:  # noqa: BLE001 - classified below
                status = getattr(e, "status", None) or getattr(e, "code", None)
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
                raise _changed(self.url, f"range {start}-{start + n} returned {len(data)} bytes")
            return data
        raise AssertionError("unreachable")


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _reopen(url: str, size: int, etag: str | None,
            timeout: float = DEFAULT_HTTP_TIMEOUT_S) -> RemoteFile:  # fmt: skip
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return RemoteFile(fs, path, url, size, etag, timeout)


def _info(fs, path: str, url: str) -> tuple[int | None, str | None]:
    """(size, ETag) through fsspec's ``info`` (not HTTP); retried.

    Raises:
        _Absent: FileNotFoundError; MergeError: still failing after ATTEMPTS tries.
    """
    delay = BACKOFF_S
    for attempt in range(ATTEMPTS):
        try:
            info = fs.info(path)
            break
        except FileNotFoundError:
            raise _Absent("not found") from None
        except Exception as e:  # noqa: BLE001 - transient, retried
            if attempt == ATTEMPTS - 1:
                raise MergeError(f"cannot reach ({type(e).__name__}: {e})", url, None,
                                 "check the URL and the network") from None  # fmt: skip
            time.sleep(delay)
            delay *= 2
    size = info.get("size")
    etag = info.get("ETag") or info.get("etag") or info.get("oid") or info.get("blob_id")
    return (None if size is None else int(size)), etag


def _stat(fs, path: str, url: str, timeout: float) -> tuple[int, str | None]:
    """(size in bytes, ETag or None) of one remote file.

    Raises:
        _Absent: it does not exist; RemoteHTTPError, MergeError: as ``_retry``, or no size.
    """
    if _is_http(url):
        try:
            size, etag = _retry(lambda: httpio.head(fs, url, timeout), url, timeout)
        except RemoteHTTPError as e:
            if e.status in (404, 410):
                raise _Absent(e.what) from None
            raise
    else:
        size, etag = _info(fs, path, url)
    if size is None:
        raise MergeError("the server does not report the file size", url, None,
                         "serve it with Content-Length and range requests")  # fmt: skip
    return size, etag


def _exists(fs, root: str, canon: str, name: str, timeout: float) -> bool:
    """True when the model's file ``name`` can be opened (any failure: False)."""
    try:
        _stat(fs, f"{root}/{name}", f"{canon}/{name}", timeout)
    except (_Absent, MergeError):
        return False
    return True


def _fetch(fs, path: str, url: str, max_bytes: int, timeout: float) -> bytes | bytearray:
    """A whole small file (JSON, tokenizer) of at most ``max_bytes`` bytes: refused by its
    stated size before the body, and over HTTP also while streaming.

    Raises:
        _Absent, httpio.TooLarge, RemoteHTTPError, MergeError.
    """
    if _is_http(url):
        try:
            return _retry(lambda: httpio.get_capped(fs, url, max_bytes, timeout), url, timeout)
        except RemoteHTTPError as e:
            if e.status in (404, 410):
                raise _Absent(e.what) from None
            raise
    size, etag = _stat(fs, path, url, timeout)
    if size > max_bytes:
        raise httpio.TooLarge(size)
    return RemoteFile(fs, path, url, size, etag, timeout).read(0, size)


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


def _fetch_index(fs, root: str, canon: str, timeout: float):
    """(raw bytes, parsed JSON) of the model's index, or None when it has none; parsed
    with the local reader's limits.

    Raises:
        MergeError: too large, too deep, not JSON, or an HTTP error: one line naming the
            index's URL.
    """
    url, todo = f"{canon}/{INDEX_FILE}", "fix or re-save the index"
    try:
        raw = _fetch(fs, f"{root}/{INDEX_FILE}", url, MAX_INDEX_BYTES, timeout)
    except _Absent:
        return None
    except httpio.TooLarge as e:  # the local wording (safejson.loads)
        what = (f"index is {e.size} bytes, more than {MAX_INDEX_BYTES}" if e.size is not None
                else f"index is more than {MAX_INDEX_BYTES} bytes")  # fmt: skip
        raise MergeError(what, url, None, todo) from None
    except RemoteHTTPError as e:
        if e.status in (401, 403) and _exists(fs, root, canon, SINGLE_FILE, timeout):
            return None  # a store that answers 403 for a missing key (S3 over https)
        raise
    index = safejson.loads(raw, url, max_depth=MAX_INDEX_DEPTH, max_bytes=MAX_INDEX_BYTES,
                           todo=todo, what="index")  # fmt: skip
    return raw, index


def _fetch_header(fs, root: str, canon: str, name: str, timeout: float, out: Path,
                  indexed: bool) -> RemoteFile:  # fmt: skip
    """Open one shard: pin its size and ETag, check its header length, then fetch the
    length and the header into ``out`` (a sparse file of the shard's size).

    Raises:
        MergeError: missing (naming the status), unreachable, or a bad header length.
    """
    url = f"{canon}/{name}"
    try:
        size, etag = _stat(fs, f"{root}/{name}", url, timeout)
    except _Absent as e:
        if not indexed:
            todo = "pass a model URL in Hugging Face safetensors layout"
            raise MergeError(f"no {SINGLE_FILE} or {INDEX_FILE}", canon, None, todo) from None
        raise MergeError(f"{e}: the index names this shard", url, None,
                         "restore the shard or fix the index") from None  # fmt: skip
    f = RemoteFile(fs, f"{root}/{name}", url, size, etag, timeout)
    head = f.read(0, min(8, size))
    n = header_length(head, size, url)
    header = f.read(8, n)
    with open(out, "wb") as w:  # sparse: the header, then a hole
        w.write(head)
        w.write(header)
        w.truncate(size)
    return f


def _fetch_side_files(fs, root: str, canon: str, timeout: float, skel: Path) -> None:
    """Download the SIDE_FILES the model has into ``skel``; one over MAX_SIDE_BYTES is
    skipped with a notice (as a local side file over the copy limit is skipped).

    Raises:
        MergeError: a server error or timeout that the retries did not cure.
    """
    for side in SIDE_FILES:
        url = f"{canon}/{side}"
        try:
            data = _fetch(fs, f"{root}/{side}", url, MAX_SIDE_BYTES, timeout)
        except _Absent:
            continue
        except httpio.TooLarge:
            notice(f"skipped {url}: more than {MAX_SIDE_BYTES} bytes")
            continue
        except RemoteHTTPError as e:
            if 400 <= e.status < 500:  # optional: a store may answer 403 for a missing key
                continue
            raise
        (skel / side).write_bytes(data)


def open_remote_model(url: str, http_timeout: float = DEFAULT_HTTP_TIMEOUT_S) -> ModelDir:
    """Open a model by URL, reading headers only (see the module docstring).

    Args:
        url: the model's URL (``https://host/org/model``, ``hf://org/model@rev``...).
        http_timeout: seconds an HTTP request may wait to connect or for the next bytes.

    Returns:
        A ModelDir validated like a local one, whose tensors live in ``RemoteFile``s;
        ``url`` and ``revision`` are set on it for the record, ``stamp`` is built from the
        files' sizes and ETags (what ``--resume`` compares).

    Raises:
        MergeError: unreachable URL, an HTTP error, a timeout, no weights, a bad or too
            large index or header (the same checks as a local model); one line naming the
            URL of the file concerned.
    """
    fs, root, canon, revision = _pin(url)
    skel = Path(tempfile.mkdtemp(prefix="streammerge-remote-"))
    atexit.register(shutil.rmtree, skel, True)
    index = _fetch_index(fs, root, canon, http_timeout)
    names = [SINGLE_FILE]
    if index is not None:
        (skel / INDEX_FILE).write_bytes(index[0])
        wm = index[1].get("weight_map") if isinstance(index[1], dict) else None
        names = list(dict.fromkeys(wm.values())) if isinstance(wm, dict) else []
    files: dict[str, RemoteFile] = {}
    for name in names:
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            continue  # open_model refuses it with its own message
        files[name] = _fetch_header(fs, root, canon, name, http_timeout, skel / name,
                                    index is not None)  # fmt: skip
    _fetch_side_files(fs, root, canon, http_timeout, skel)
    try:
        model = open_model(skel)
    except MergeError as e:  # name the URLs, not the skeleton
        at = lambda s: s if s is None else s.replace(str(skel), canon)  # noqa: E731
        raise MergeError(at(e.what), at(e.file), e.tensor, e.todo) from None
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
