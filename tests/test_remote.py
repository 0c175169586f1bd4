"""Inputs by URL: a local HTTP server with range requests (started here, 127.0.0.1 only).
The merge equals the one from local paths; preflight and --plan fetch only headers;
transient server failures are retried; a file changed mid-merge stops the run with one
line."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import fail_after, make_trio, output_bytes, run_cli

import streammerge
from streammerge.api import Options
from streammerge.errors import MergeError

pytest.importorskip("aiohttp")


class Synthetic:
    """A file made on the fly: ``prefix`` then ``fill`` bytes up to ``size`` bytes, served
    whole (Range ignored, HTTP 200) in 64 KiB writes. ``length``: send Content-Length on
    GET; ``head_size``: the Content-Length a HEAD reports (None: none)."""

    def __init__(self, prefix: bytes, size: int, *, length: bool, head_size: int | None,
                 fill: bytes = b"a") -> None:  # fmt: skip
        self.prefix, self.size, self.fill = prefix, size, fill
        self.length, self.head_size = length, head_size


class RangeServer:
    """Serves ``root`` with HEAD, GET and ``Range: bytes=a-b``, an ETag per content, and
    ``If-Match``; logs every request. Faults on demand: the first ``fail_first`` GETs of
    each weight file answer 503; ``if_match = False`` ignores If-Match (serves whatever
    the file holds now); ``change_after(n, path)`` rewrites a file after n weight reads;
    ``status[url path]`` answers that HTTP status; ``stall = (mode, when)`` hangs the
    requests ``when(method, path, range)`` picks ("nothing": send nothing; "headers": the
    status line and headers, then nothing); ``synthetic[url path]`` serves a Synthetic
    file, counting the body bytes it managed to send in ``sent``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log: list[tuple[str, str, str | None]] = []
        self.fail_first = 0
        self.fails: dict[str, int] = {}
        self.etags = True  # False: a server that sends no ETag (nothing pins the bytes)
        self.etag_salt = ""  # a new salt: new ETags for the same bytes (a re-upload)
        self.if_match = True  # False: a server that ignores If-Match
        self.on_get = None  # hook(path, range) called before serving a GET
        self.status: dict[str, int] = {}
        self.stall = None
        self.synthetic: dict[str, Synthetic] = {}
        self.sent: dict[str, int] = {}
        self.release = threading.Event()  # set on close: stalled requests end
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _file(self) -> Path | None:
                p = (server.root / self.path.lstrip("/")).resolve()
                return p if p.is_file() and server.root in p.parents else None

            def _etag(self, p: Path) -> str:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
                return f'"{digest}{server.etag_salt}"'

            def _fault(self, method: str, rng: str | None) -> bool:
                """Answer a stall or a forced status; True when it did."""
                if server.stall is not None and server.stall[1](method, self.path, rng):
                    p = self._file()
                    if server.stall[0] == "headers" and p is not None:
                        size = p.stat().st_size
                        a, b = 0, size - 1
                        if rng:
                            a, b = (int(x) for x in re.match(r"bytes=(\d+)-(\d+)", rng).groups())
                            self.send_response(206)
                            self.send_header("Content-Range", f"bytes {a}-{b}/{size}")
                        else:
                            self.send_response(200)
                        self.send_header("Content-Length", str(b - a + 1))
                        if server.etags:
                            self.send_header("ETag", self._etag(p))
                        self.end_headers()
                        self.wfile.flush()
                    server.release.wait(60)
                    return True
                code = server.status.get(self.path)
                if code is not None:
                    self.send_response(code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return True
                return False

            def _synthetic(self, s: Synthetic, head: bool) -> None:
                self.send_response(200)
                n = s.head_size if head else (s.size if s.length else None)
                if n is not None:
                    self.send_header("Content-Length", str(n))
                self.end_headers()
                if head:
                    return
                chunk, sent = s.fill * 65536, 0
                try:
                    self.wfile.write(s.prefix)
                    sent = len(s.prefix)
                    while sent < s.size:
                        k = min(len(chunk), s.size - sent)
                        self.wfile.write(chunk[:k])
                        sent += k
                        server.sent[self.path] = sent
                except OSError:  # the client hung up
                    pass

            def do_HEAD(self):
                server.log.append(("HEAD", self.path, None))
                if self._fault("HEAD", None):
                    return
                if self.path in server.synthetic:
                    return self._synthetic(server.synthetic[self.path], head=True)
                p = self._file()
                if p is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(p.stat().st_size))
                if server.etags:
                    self.send_header("ETag", self._etag(p))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self):
                rng = self.headers.get("Range")
                server.log.append(("GET", self.path, rng))
                if server.on_get is not None:
                    server.on_get(self.path, rng)
                if self._fault("GET", rng):
                    return
                if self.path in server.synthetic:
                    return self._synthetic(server.synthetic[self.path], head=False)
                p = self._file()
                if p is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                if self.path.endswith(".safetensors") and server.fail_first:
                    n = server.fails.get(self.path, 0)
                    if n < server.fail_first:
                        server.fails[self.path] = n + 1
                        self.send_response(503)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                data = p.read_bytes()
                etag = self._etag(p)
                want = self.headers.get("If-Match")
                if server.if_match and want is not None and want != etag:
                    self.send_response(412)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if rng:
                    a, b = re.match(r"bytes=(\d+)-(\d*)", rng).groups()
                    a, b = int(a), (int(b) if b else len(data) - 1)
                    body = data[a : b + 1]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {a}-{a + len(body) - 1}/{len(data)}")
                else:
                    body = data
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                if server.etags:
                    self.send_header("ETag", etag)
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def is_weight_range(self, path: str, rng: str | None) -> bool:
        """A GET range of a weight file beyond its header."""
        if not (path.endswith(".safetensors") and rng):
            return False
        a = int(re.match(r"bytes=(\d+)", rng).group(1))
        header = int.from_bytes((self.root / path.lstrip("/")).read_bytes()[:8], "little")
        return a >= 8 + header

    def weight_ranges(self) -> list:
        """GET ranges of weight files beyond their headers."""
        return [(p, r) for m, p, r in self.log if m == "GET" and self.is_weight_range(p, r)]

    def change_after(self, n: int, shard: Path, change) -> list:
        """Rewrite ``shard`` with ``change(bytes) -> bytes`` (atomically: a request sees the
        old or the new file) before serving the GET that follows the n-th weight range;
        returns a list that gets the request's path once it happened."""
        changed, lock = [], threading.Lock()

        def hook(path, rng):
            with lock:
                if not changed and len(self.weight_ranges()) > n:
                    tmp = shard.with_suffix(".tmp")
                    tmp.write_bytes(change(shard.read_bytes()))
                    tmp.replace(shard)
                    changed.append(path)

        self.on_get = hook
        return changed

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()


@pytest.fixture
def served(tmp_path):
    base, a, b = make_trio(tmp_path / "data", big=200_000)
    srv = RangeServer(tmp_path / "data")
    yield srv, base, a, b
    srv.close()


def test_merge_from_urls_equals_local(tmp_path, served):
    srv, base, a, b = served
    urls = [f"{srv.url}/{p.name}" for p in (a, b)]
    kw = {"seed": 4, "method": "ties", "density": 0.5, "options": Options(memory="24MiB")}
    s = streammerge.merge(urls, f"{srv.url}/base", tmp_path / "r", **kw)
    streammerge.merge([a, b], base, tmp_path / "l", **kw)
    got, want = output_bytes(tmp_path / "r"), output_bytes(tmp_path / "l")
    assert got.keys() == want.keys() and all((got[n] == want[n]).all() for n in want)
    rec = json.loads((tmp_path / "r" / "streammerge.json").read_text())
    assert rec["models"][0]["url"] == urls[0] and rec["base"]["url"] == f"{srv.url}/base"
    assert (tmp_path / "r" / "config.json").is_file()  # side files come along
    assert srv.weight_ranges() and s.bytes_read > 0


def test_plan_fetches_headers_only(tmp_path, served):
    srv, _base, _a, _b = served
    r = run_cli([f"{srv.url}/a", f"{srv.url}/b", "--base", f"{srv.url}/base",
                 "-o", str(tmp_path / "o"), "--plan", "--json"])  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bytes_read"] > 0
    assert srv.weight_ranges() == [] and not (tmp_path / "o").exists()
    assert any(m == "GET" and p.endswith(".safetensors") for m, p, _ in srv.log)  # headers


def test_transient_failures_are_retried(tmp_path, served):
    srv, base, a, b = served
    srv.fail_first = 2
    streammerge.merge([f"{srv.url}/a", f"{srv.url}/b"], f"{srv.url}/base", tmp_path / "r",
                      seed=1)  # fmt: skip
    streammerge.merge([a, b], base, tmp_path / "l", seed=1)
    got, want = output_bytes(tmp_path / "r"), output_bytes(tmp_path / "l")
    assert all((got[n] == want[n]).all() for n in want)
    assert sum(srv.fails.values()) >= 2


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


@pytest.mark.parametrize(
    "if_match, etags, change",
    [(True, True, _flip_last), (False, True, _flip_last), (False, False, lambda d: d + b"\0" * 16)],
    ids=["if-match", "if-match-ignored", "no-etag-grown"],
)
def test_file_changed_mid_merge_stops_with_one_line(tmp_path, served, if_match, etags, change):
    """A shard rewritten once weights stream stops the run with one line naming it, exit 2,
    nothing published: by the server's 412 (If-Match), else by the ETag or the size
    (Content-Range total) of the next range, which is checked against the pinned ones. Then
    --resume (the file settled) finishes, equal to a local merge of the files as they are;
    a file whose size changed changed its header's fingerprint: --resume is refused with one
    line naming its URL, and --overwrite merges it anew."""
    srv, _base, _a, b = served
    srv.if_match, srv.etags = if_match, etags
    shard = max(b.glob("*.safetensors"))
    changed = srv.change_after(0, shard, change)
    out = tmp_path / "r"
    argv = [f"{srv.url}/a", f"{srv.url}/b", "--base", f"{srv.url}/base", "-o", str(out),
            "--shard-size", "20KB", "--quiet"]  # fmt: skip
    r = run_cli(argv)
    assert changed
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("streammerge: error: changed on the server since the merge "
                               f"started (") and f"({srv.url}/b/{shard.name}): " in lines[0], lines  # fmt: skip
    assert not out.exists()
    # Nothing finished is lost: --resume keeps the shards whose inputs are unchanged and
    # merges the rest from the files as they are now.
    srv.on_get = None
    r = run_cli([*argv, "--resume"])
    if not etags:  # the size is in the header's fingerprint: resuming is refused
        assert r.returncode == 2 and _error_lines(r)[0].startswith(
            "streammerge: error: the recipe or the inputs changed since the interrupted merge "
            f"(the header of {srv.url}/b/{shard.name} changed) ("), r.stderr
        r = run_cli([*argv, "--overwrite"])
    assert r.returncode == 0, r.stderr
    local = tmp_path / "local"
    assert run_cli([str(tmp_path / "data" / n) for n in ("a", "b")]
                   + ["--base", str(tmp_path / "data" / "base"), "-o", str(local),
                      "--shard-size", "20KB", "--quiet", "--seed",
                      str(json.loads((out / "streammerge.json").read_text())["seed"])]
                   ).returncode == 0  # fmt: skip
    got, want = output_bytes(out), output_bytes(local)
    assert got.keys() == want.keys() and all((got[n] == want[n]).all() for n in want)


def test_unreachable_url_is_one_line(tmp_path):
    r = run_cli(["http://127.0.0.1:9/a", "http://127.0.0.1:9/b", "--base",
                 "http://127.0.0.1:9/c", "-o", str(tmp_path / "o")])  # fmt: skip
    assert r.returncode == 2
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1


@pytest.mark.parametrize("etags", [True, False])
def test_interrupted_remote_merge_resumes(tmp_path, served, etags):
    """A merge from URLs stopped after some shards (an error in the caller's progress
    callback) resumes with --resume: the finished shards are kept (not merged again) and the
    result equals the local merge byte for byte. With ETags the inputs of the finished
    shards are trusted as pinned; without, their bytes are fetched again and re-hashed."""
    srv, base, a, b = served
    srv.etags = etags
    urls = [f"{srv.url}/a", f"{srv.url}/b"]
    kw = {"seed": 3, "method": "ties", "density": 0.5}
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        streammerge.merge(urls, f"{srv.url}/base", out, on_bytes=fail_after(1_000_000, KeyboardInterrupt(), out),
                          shard_size="200KB", **kw)  # fmt: skip
    first = len(srv.weight_ranges())
    assert first and not out.exists()
    srv.log.clear()
    s = streammerge.merge(urls, f"{srv.url}/base", out, shard_size="200KB", resume=True, **kw)
    fetched = sum(int(b) - int(a) + 1 for m, p, r in srv.log if m == "GET" and r
                  and p.endswith(".safetensors")
                  for a, b in [re.match(r"bytes=(\d+)-(\d+)", r).groups()])  # fmt: skip
    full = streammerge.merge([a, b], base, tmp_path / "l", shard_size="200KB", **kw)
    got, want = output_bytes(out), output_bytes(tmp_path / "l")
    assert got.keys() == want.keys() and all((got[n] == want[n]).all() for n in want)
    assert 0 < s.bytes_read < full.bytes_read  # the finished shards were not merged again
    # Ranges fetched by the resumed run: the weights it merges and a few header ranges;
    # without ETags also the finished shards' inputs again (re-hashed): all of them.
    assert (fetched >= full.bytes_read) == (not etags), (fetched, s.bytes_read, full.bytes_read)


def test_resume_refuses_a_changed_input_without_etag(tmp_path, served):
    """No ETag pins the bytes: on --resume the finished shards' input tensors are fetched
    again and hashed, and a tensor whose bytes changed (same size, same header) stops the
    run with one line naming it; the output is not finished."""
    from safetensors.torch import load_file, save_file

    srv, _base, _a, b = served
    srv.etags = False
    urls = [f"{srv.url}/a", f"{srv.url}/b"]
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        streammerge.merge(urls, f"{srv.url}/base", out, seed=3, on_bytes=fail_after(1_000_000, KeyboardInterrupt(), out),
                          shard_size="200KB")  # fmt: skip
    name = "layers.0.attn.q.weight"  # merged into the first (finished) output shard
    shard = next(p for p in b.glob("*.safetensors") if name in load_file(p))
    tensors = load_file(shard)
    tensors[name] = tensors[name] * 2
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(MergeError, match="an input changed") as e:
        streammerge.merge(urls, f"{srv.url}/base", out, seed=3, shard_size="200KB",
                          resume=True)  # fmt: skip
    assert e.value.tensor == name and "\n" not in str(e.value)
    assert not out.exists()


def test_resume_of_a_finished_remote_merge(tmp_path, served):
    """--resume on a finished merge from URLs: with the same ETags a no-op that fetches no
    weight; with new ETags on the same bytes the tensors are fetched and hashed again and
    the output is left as it was (exit 0); after a file's bytes changed, refused with one
    line, the output left as it was."""
    from safetensors.torch import load_file, save_file

    srv, _base, _a, b = served
    out = tmp_path / "r"
    argv = [f"{srv.url}/a", f"{srv.url}/b", "--base", f"{srv.url}/base", "-o", str(out),
            "--seed", "2", "--quiet"]  # fmt: skip
    assert run_cli(argv).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    srv.log.clear()
    r = run_cli([*argv, "--resume"])
    assert r.returncode == 0, r.stderr
    assert srv.weight_ranges() == []
    srv.etag_salt = "-reuploaded"  # new ETags, same bytes: re-hashed, accepted, unchanged
    r = run_cli([*argv, "--resume"])
    assert r.returncode == 0, r.stderr
    assert srv.weight_ranges() and {p.name: p.read_bytes() for p in out.iterdir()} == before
    shard = max(b.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(n for n in sorted(tensors) if n != "position_ids")  # a merged tensor
    tensors[name] = tensors[name] + 1
    save_file(tensors, shard, metadata={"format": "pt"})
    r = run_cli([*argv, "--resume"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "an input changed" in lines[0], r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _error_lines(r) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.strip()]


def _argv(srv, out: Path, *extra: str) -> list[str]:
    return [f"{srv.url}/a", f"{srv.url}/b", "--base", f"{srv.url}/base", "-o", str(out),
            "--quiet", *extra]  # fmt: skip


@pytest.mark.parametrize("reported", [True, False], ids=["length-reported", "no-length"])
def test_remote_index_size_limit_applies_while_streaming(tmp_path, served, reported):
    """A 200 MB index: refused by its Content-Length before the body is read; without a
    length, refused once the stream passes the local limit (reader.MAX_INDEX_BYTES), not
    after the whole download. One line naming the index URL, exit 2, nothing written."""
    from streammerge.io.reader import MAX_INDEX_BYTES

    srv, *_ = served
    path, size = "/a/model.safetensors.index.json", 2 * MAX_INDEX_BYTES
    srv.synthetic[path] = Synthetic(b'{"weight_map": {"x": "', size, length=reported,
                                    head_size=size if reported else None)  # fmt: skip
    r = run_cli(_argv(srv, tmp_path / "o"))
    limit_bytes = MAX_INDEX_BYTES
    what = f"{size} bytes, more than {limit_bytes}" if reported else f"more than {limit_bytes} bytes"
    assert r.returncode == 2 and _error_lines(r) == [
        f"streammerge: error: index is {what} ({srv.url}{path}): fix or re-save the index"
    ], r.stderr
    limit = 30_000_000 if reported else MAX_INDEX_BYTES + 30_000_000  # socket buffers
    assert srv.sent.get(path, 0) < limit
    assert not (tmp_path / "o").exists()


def test_remote_side_file_download_is_capped(tmp_path, served):
    """A config.json whose HEAD says 100 bytes but whose GET streams 200 MB with no length:
    the download stops at remote.MAX_SIDE_BYTES and the file is skipped with a notice (as
    a local side file over the copy limit is), the merge goes on."""
    from streammerge.io.remote import MAX_SIDE_BYTES

    srv, *_ = served
    path = "/base/config.json"
    srv.synthetic[path] = Synthetic(b'{"x": "', 200_000_000, length=False, head_size=100)
    out = tmp_path / "o"
    r = run_cli(_argv(srv, out))
    assert r.returncode == 0, r.stderr
    assert f"streammerge: skipped {srv.url}{path}: more than {MAX_SIDE_BYTES} bytes" in r.stderr
    assert srv.sent[path] < MAX_SIDE_BYTES + 30_000_000 and not (out / "config.json").exists()


def test_remote_header_length_is_bounded_before_fetching(tmp_path, served):
    """A shard whose 8-byte prefix claims a 1 TiB header: refused with the local reader's
    line, naming the shard's URL, before any byte past the prefix is fetched."""
    srv, _base, _a, b = served
    shard = min(b.glob("*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes((2**40).to_bytes(8, "little") + data[8:])
    r = run_cli(_argv(srv, tmp_path / "o"))
    assert r.returncode == 2 and _error_lines(r) == [
        f"streammerge: error: header length {2**40} runs past the end of the {len(data)}-byte "
        f"file ({srv.url}/b/{shard.name}): the shard is truncated or not safetensors: "
        "re-download or re-save it"
    ], r.stderr
    assert [rng for m, p, rng in srv.log if m == "GET" and p == f"/b/{shard.name}"] == ["bytes=0-7"]


@pytest.mark.parametrize("depth", [9, 100_000])
def test_remote_deep_index_is_one_line(tmp_path, served, depth):
    """An index nested too deep over HTTP: the local reader's line naming the index URL,
    exit 2 (100 000 levels used to end in a RecursionError, exit 1)."""
    srv, _base, a, _b = served
    index = a / "model.safetensors.index.json"
    index.write_text('{"weight_map": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}")
    r = run_cli(_argv(srv, tmp_path / "o"))
    what = "nests too deep" if depth > 1000 else f"nests {depth}+ levels deep, more than 8"
    assert r.returncode == 2 and _error_lines(r) == [
        f"streammerge: error: index {what} ({srv.url}/a/{index.name}): fix or re-save the index"
    ], r.stderr


@pytest.mark.parametrize(
    "mode, phase",
    [("nothing", "weights"), ("headers", "weights"), ("nothing", "open")],
)
def test_stalled_server_times_out(tmp_path, served, mode, phase):
    """A server that accepts and then sends nothing (or only the headers) fails after
    --http-timeout, TIMEOUT_ATTEMPTS tries with backoff: one line naming the URL and the
    timeout, exit 2, in bounded time; nothing published."""
    import time

    from streammerge.io.remote import TIMEOUT_ATTEMPTS

    srv, _base, _a, b = served
    shard = f"/b/{min(b.glob('*.safetensors')).name}"
    if phase == "weights":
        srv.stall = (mode, lambda m, p, rng: p == shard and srv.is_weight_range(p, rng))
    else:
        srv.stall = (mode, lambda m, p, rng: p == shard)
    out = tmp_path / "o"
    t0 = time.monotonic()
    r = run_cli([*_argv(srv, out), "--http-timeout", "0.5"], timeout=120)
    assert time.monotonic() - t0 < 60
    assert r.returncode == 2 and _error_lines(r) == [
        f"streammerge: error: timed out after 0.5 s, {TIMEOUT_ATTEMPTS} tries ({srv.url}{shard}): "
        "check the server and the network (or raise --http-timeout), then re-run with --resume"
    ], r.stderr
    assert not out.exists()


def test_http_timeout_option(tmp_path, served):
    """--http-timeout is checked like every option, and travels with a pickled RemoteFile
    (Ray workers)."""
    import pickle

    from streammerge.io.remote import open_remote_model

    srv, *_ = served
    r = run_cli(_argv(srv, tmp_path / "o", "--http-timeout", "0"))
    assert r.returncode == 2 and _error_lines(r) == [
        "streammerge: error: --http-timeout must be > 0, got 0.0: check the command-line options"
    ], r.stderr
    with pytest.raises(MergeError, match="--http-timeout must be a number"):
        streammerge.merge([f"{srv.url}/a", f"{srv.url}/b"], f"{srv.url}/base", tmp_path / "o",
                          options=Options(http_timeout="soon"))  # fmt: skip
    m = open_remote_model(f"{srv.url}/b", http_timeout=7.5)
    f = next(iter(m.tensors.values())).file
    g = pickle.loads(pickle.dumps(f))
    assert (g.url, g.size, g.etag, g.timeout) == (f.url, f.size, f.etag, 7.5)
    assert g.read(0, 8) == f.read(0, 8)


@pytest.mark.parametrize(
    "code, phase, line",
    [
        (404, "open", "HTTP 404 Not Found: the index names this shard ({url}): restore the "
                      "shard or fix the index"),
        (403, "open", "HTTP 403 Forbidden ({url}): check the URL and the credentials"),
        (404, "weights", "changed on the server since the merge started (HTTP 404 Not Found) "
                         "({url}): re-run with --resume when the file is stable (finished "
                         "shards whose inputs are unchanged are kept)"),
        (403, "weights", "HTTP 403 Forbidden ({url}): check the URL and the credentials"),
        (500, "weights", "HTTP 500 Internal Server Error, {n} tries ({url}): the server keeps "
                         "failing: re-run with --resume later"),
    ],
)  # fmt: skip
def test_http_errors_name_the_status_and_the_url(tmp_path, served, code, phase, line):
    """An HTTP error on a shard, when it is opened or while its weights stream (a 500 that
    lasts past the retries): one line with the status and the shard's URL, exit 2, nothing
    published; the 500 case then resumes once the server recovers."""
    from streammerge.io.remote import ATTEMPTS

    srv, *_, b = served
    shard = f"/b/{min(b.glob('*.safetensors')).name}"
    if phase == "open":
        srv.status[shard] = code
    else:
        def fail(path, rng):
            if path == shard and srv.is_weight_range(path, rng):
                srv.status[shard] = code

        srv.on_get = fail
    out = tmp_path / "o"
    argv = _argv(srv, out, "--shard-size", "20KB")
    r = run_cli(argv)
    assert r.returncode == 2 and _error_lines(r) == [
        "streammerge: error: " + line.format(url=srv.url + shard, n=ATTEMPTS)
    ], r.stderr
    assert not out.exists()
    if code == 500:
        srv.on_get = None
        srv.status.clear()
        assert run_cli([*argv, "--resume"]).returncode == 0 and (out / "streammerge.json").is_file()
