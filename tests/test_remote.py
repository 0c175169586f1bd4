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


class RangeServer:
    """Serves ``root`` with HEAD, GET and ``Range: bytes=a-b``, an ETag per content, and
    ``If-Match``; logs every request; fails the first ``fail_first`` GETs of each weight
    file with 503 when asked."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log: list[tuple[str, str, str | None]] = []
        self.fail_first = 0
        self.fails: dict[str, int] = {}
        self.etags = True  # False: a server that sends no ETag (nothing pins the bytes)
        self.etag_salt = ""  # a new salt: new ETags for the same bytes (a re-upload)
        self.on_get = None  # hook(path, range) called before serving a GET
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

            def do_HEAD(self):
                server.log.append(("HEAD", self.path, None))
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
                if want is not None and want != etag:
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

    def weight_ranges(self) -> list:
        """GET ranges of weight files beyond their headers."""
        out = []
        for method, path, rng in self.log:
            if method == "GET" and path.endswith(".safetensors") and rng:
                a = int(re.match(r"bytes=(\d+)", rng).group(1))
                header = int.from_bytes((self.root / path.lstrip("/")).read_bytes()[:8], "little")
                if a >= 8 + header:
                    out.append((path, rng))
        return out

    def close(self) -> None:
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


def test_file_changed_mid_merge_stops_with_one_line(tmp_path, served):
    srv, _base, _a, b = served
    shard = max(b.glob("*.safetensors"))
    changed = []

    lock = threading.Lock()

    def change(path, rng):  # once weights are streaming, rewrite one of b's shards
        with lock:
            if not changed and path.endswith(".safetensors") and srv.weight_ranges():
                data = bytearray(shard.read_bytes())
                data[-1] ^= 0xFF
                tmp = shard.with_suffix(".tmp")
                tmp.write_bytes(bytes(data))
                tmp.replace(shard)  # atomic: a request sees the old or the new file
                changed.append(path)

    srv.on_get = change
    out = tmp_path / "r"
    argv = [f"{srv.url}/a", f"{srv.url}/b", "--base", f"{srv.url}/base", "-o", str(out),
            "--shard-size", "20KB", "--quiet"]  # fmt: skip
    r = run_cli(argv)
    assert changed
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "changed on the server" in lines[0], r.stderr
    assert not out.exists()
    # Nothing finished is lost: --resume keeps the shards whose inputs are unchanged and
    # merges the rest from the files as they are now.
    srv.on_get = None
    r = run_cli([*argv, "--resume"])
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
        streammerge.merge(urls, f"{srv.url}/base", out, on_bytes=fail_after(1_000_000, KeyboardInterrupt()),
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
        streammerge.merge(urls, f"{srv.url}/base", out, seed=3, on_bytes=fail_after(1_000_000, KeyboardInterrupt()),
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
