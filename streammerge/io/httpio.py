"""HTTP(S) requests for inputs by URL, on the aiohttp session of fsspec's HTTPFileSystem.

fsspec's ``cat_file`` returns only the body, so a server that ignores ``If-Match`` could
send the bytes of a changed file and nothing would notice. These requests read the
response headers too:

- every ranged GET is checked against the size and ETag pinned when the file was opened
  (``Content-Range`` start, end and total, ``Content-Length``, ``ETag``);
- bodies are read in pieces with a cap, so a server that lies about a length (or sends
  none) cannot make the client buffer more than it asked for;
- every request has connect and read timeouts (``sock_read``: the longest wait for the
  next bytes, headers included), so a server that stops sending fails instead of hanging.

The functions here try once; ``remote.py`` retries and turns failures into one line.
Errors: ``Status`` (an HTTP status >= 400), ``TooLarge``, ``Mismatch`` (the file is not
the one pinned), ``Unsupported`` (a server that cannot serve ranges); a timeout raises
TimeoutError, a network failure aiohttp.ClientError or OSError.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: aiohttp takes a while, and local merges need none
    import aiohttp

#: Bytes per piece read from a response body.
CHUNK_BYTES = 1 << 20


class Status(Exception):
    """The server answered an HTTP error (``status`` >= 400); str: ``HTTP 403 Forbidden``."""

    def __init__(self, status: int, reason: str | None) -> None:
        if not reason:
            try:
                reason = HTTPStatus(status).phrase
            except ValueError:
                reason = ""
        self.status, self.reason = status, reason
        super().__init__(f"HTTP {status} {reason}".rstrip())


class TooLarge(Exception):
    """A body longer than allowed; ``size``: the length the server reported (None when it
    reported none and the stream ran past the limit)."""

    def __init__(self, size: int | None) -> None:
        self.size = size
        super().__init__(size)


class Mismatch(Exception):
    """The response is not of the file as pinned (str: what differs)."""


class Unsupported(Exception):
    """The server cannot serve what a merge needs (str: what it did instead)."""


def _sync(fs, coro, *args):
    from fsspec.asyn import sync

    return sync(fs.loop, coro, fs, *args)


def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    import aiohttp

    return aiohttp.ClientTimeout(
        total=None, connect=seconds, sock_connect=seconds, sock_read=seconds
    )


def _kw(fs, seconds: float, headers: dict[str, str]) -> dict:
    """Request arguments: the filesystem's own (storage options), our headers, timeouts."""
    kw = dict(fs.kwargs)
    kw["headers"] = {**(kw.get("headers") or {}), "Accept-Encoding": "identity", **headers}
    kw["timeout"] = _timeout(seconds)
    return kw


def _raise_status(r: aiohttp.ClientResponse) -> None:
    if r.status >= 400:
        raise Status(r.status, r.reason)


def _length(r: aiohttp.ClientResponse) -> int | None:
    """The body length the response states (None: none, or not of the identity bytes)."""
    if r.headers.get("Content-Encoding", "identity") not in ("identity", ""):
        return None
    text = r.headers.get("Content-Length")
    if text is None:
        return None
    if not text.strip().isdigit():
        raise Unsupported(f"a bad Content-Length {text!r}")
    return int(text)


async def _read_capped(r: aiohttp.ClientResponse, limit: int) -> bytearray:
    """The body, or TooLarge(None) as soon as it passes ``limit`` bytes."""
    buf = bytearray()
    async for chunk in r.content.iter_chunked(CHUNK_BYTES):
        buf += chunk
        if len(buf) > limit:
            raise TooLarge(None)
    return buf


async def _head(fs, url: str, seconds: float) -> tuple[int | None, str | None]:
    session = await fs.set_session()
    async with session.head(fs.encode_url(url), allow_redirects=True, **_kw(fs, seconds, {})) as r:
        if r.status not in (403, 405, 501):
            _raise_status(r)
            return _length(r), r.headers.get("ETag")
    # No HEAD (or one signed for GET only, as presigned URLs are): the first byte by GET.
    async with session.get(fs.encode_url(url), **_kw(fs, seconds, {"Range": "bytes=0-0"})) as r:
        _raise_status(r)
        if r.status == 206:
            m = re.fullmatch(r"bytes \d+-\d+/(\d+)", r.headers.get("Content-Range", "").strip())
            return (int(m.group(1)) if m else None), r.headers.get("ETag")
        return _length(r), r.headers.get("ETag")  # the body is not read


def head(fs, url: str, seconds: float) -> tuple[int | None, str | None]:
    """(size in bytes or None, ETag or None) of ``url``; one try, ``seconds`` timeouts.

    Raises:
        Status, TimeoutError, aiohttp.ClientError, OSError.
    """
    return _sync(fs, _head, url, seconds)


def _check_range(r, start: int, n: int, size: int, etag: str | None) -> None:
    """Refuse a response to ``Range: bytes=start-(start+n-1)`` that is not of the pinned file."""
    if r.headers.get("Content-Encoding", "identity") not in ("identity", ""):
        raise Unsupported(f"the server sent a range {r.headers['Content-Encoding']}-encoded")
    got = r.headers.get("ETag")
    if etag is not None and got is not None and got != etag:
        raise Mismatch(f"ETag {got}, pinned {etag}")
    if r.status == 206:
        text = r.headers.get("Content-Range", "")
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", text.strip())
        if m is None:
            raise Unsupported(f"a bad Content-Range {text!r}")
        if m.group(3) != "*" and int(m.group(3)) != size:
            raise Mismatch(f"{m.group(3)} bytes, pinned {size}")
        if (int(m.group(1)), int(m.group(2))) != (start, start + n - 1):
            raise Mismatch(f"range {m.group(1)}-{m.group(2)} for {start}-{start + n - 1}")
    elif r.status == 200:
        if not (start == 0 and n == size):
            raise Unsupported("the server ignores range requests (HTTP 200 for a range)")
    else:
        raise Unsupported(f"HTTP {r.status} for a range request")
    length = _length(r)
    if length is not None and length != n:
        raise Mismatch(f"Content-Length {length} for a range of {n} bytes")


async def _get_range(fs, url, start, n, size, etag, seconds) -> bytearray:
    headers = {"Range": f"bytes={start}-{start + n - 1}"}
    if etag is not None:
        headers["If-Match"] = etag
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), **_kw(fs, seconds, headers)) as r:
        _raise_status(r)
        _check_range(r, start, n, size, etag)
        try:
            body = await _read_capped(r, n)
        except TooLarge:
            raise Mismatch(f"more than {n} bytes for a range of {n}") from None
    if len(body) != n:
        raise Mismatch(f"{len(body)} bytes for a range of {n}")
    return body


def get_range(
    fs, url: str, start: int, n: int, size: int, etag: str | None, seconds: float
) -> bytearray:
    """Bytes ``[start, start + n)`` (n >= 1) of the file pinned at ``size`` bytes and
    ``etag``, checked against both (see the module docstring); one try.

    Raises:
        Status (412: the ETag no longer matches), Mismatch, Unsupported, TimeoutError,
        aiohttp.ClientError, OSError.
    """
    return _sync(fs, _get_range, url, start, n, size, etag, seconds)


async def _get_capped(fs, url: str, max_bytes: int, seconds: float) -> bytearray:
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), **_kw(fs, seconds, {})) as r:
        _raise_status(r)
        length = _length(r)
        if length is not None and length > max_bytes:
            raise TooLarge(length)  # refused before the body
        return await _read_capped(r, max_bytes)


def get_capped(fs, url: str, max_bytes: int, seconds: float) -> bytearray:
    """The whole file at ``url`` if it is at most ``max_bytes`` long: refused by its stated
    length before the body, else while streaming once past the limit; one try.

    Raises:
        TooLarge, Status, Unsupported, TimeoutError, aiohttp.ClientError, OSError.
    """
    return _sync(fs, _get_capped, url, max_bytes, seconds)
