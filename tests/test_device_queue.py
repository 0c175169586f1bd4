"""The GPU backend's orchestration without a GPU: ``DeviceBackend`` driven through
``ThreadQueue`` (a thread per stream, random delays, poisoned device memory), the same code
that drives CUDA streams. Bytes equal numba's; each fault a test introduces (a removed
event wait, a reused buffer set, a missing drain) is caught; an error mid-run drains every
stream; pinned memory stays within --memory; --vram, warm-up failures, an interpreted
kernel and WSL2 are handled before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import fail_after, make_trio

import streammerge
from streammerge import api
from streammerge.api import Options, execute, finalize, prepare
from streammerge.errors import MergeError
from streammerge.exec import gpu
from streammerge.exec.devqueue import TorchCudaQueue, pinned_size, torch_pinned_size
from streammerge.exec.gpu import DeviceBackend
from streammerge.exec.threadqueue import NumbaLauncher, ThreadQueue

BIG = 700_001  # many chunks at VRAM (about 43k elements a chunk for 3 bf16 rows)
#: A device budget of 1 MiB of chunk buffers besides the histograms' reserve.
VRAM = gpu.device_stats_bytes(2) + 2**20


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("trio"), big=BIG)


@pytest.fixture(scope="module")
def want(trio, tmp_path_factory):
    """numba's bytes for each recipe the tests run."""
    base, a, b = trio
    out = {}
    for name, recipe in RECIPES.items():
        d = tmp_path_factory.mktemp("cpu") / name
        streammerge.merge([a, b], base, d, backend="numba", device="cpu", **recipe)
        out[name] = _files(d)
    return out


RECIPES = {
    "dare_linear": {"seed": 5},
    "ties": {"method": "ties", "density": 0.4, "seed": 5, "lam": 0.3},
    "breadcrumbs_ties": {"method": "breadcrumbs_ties", "density": 0.5, "gamma": 0.1, "seed": 2},
    "ties_keep_all": {"method": "ties", "density": 1.0, "seed": 5},  # windows keep all
}


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.safetensors"))}


def _merge(trio, out: Path, backend, memory="32MiB", on_bytes=None, **recipe):
    """prepare -> execute on ``backend`` -> finalize; returns the RunStats."""
    base, a, b = trio
    prep = prepare([a, b], base, out, recipe, Options(memory=memory))
    try:
        stats = execute(prep, backend, on_bytes=on_bytes)
    except BaseException:
        prep.output.close()
        raise
    finalize(prep, stats)
    stats.copied_bytes = sum(t.base.nbytes for t in prep.plan.tensors if t.action == "copy")
    return stats


def _corrupted(trio, out: Path, backend, want: dict) -> bool:
    """True when a merge on ``backend`` is caught wrong: its bytes differ from ``want``, or
    the run stopped because it produced NaN from finite inputs (poisoned device memory)."""
    try:
        _merge(trio, out, backend, seed=5)
    except MergeError as e:
        assert "non-finite" in str(e), e
        return True
    return _files(out) != want


def _backend(q: ThreadQueue, vram: int = VRAM) -> DeviceBackend:
    return DeviceBackend(q, NumbaLauncher(), vram)


@pytest.mark.parametrize("name", list(RECIPES))
@pytest.mark.parametrize("seed", [0, 1])
def test_fake_streams_give_numba_bytes(trio, want, tmp_path, name, seed):
    """Random delays on three streams, many chunks in flight (and, for TIES, the
    synchronous histogram passes): the output is numba's, byte for byte; nothing ran after
    close, every stream is drained, nothing stays pinned, no merged row was memmoved."""
    q = ThreadQueue(seed=seed, max_delay_s=0.0005)
    stats = _merge(trio, tmp_path / "gpu", _backend(q), **RECIPES[name])
    assert _files(tmp_path / "gpu") == want[name]
    assert q.violations == [] and q.pending() == 0 and q.pinned_bytes == 0
    assert stats.moved_bytes <= stats.copied_bytes  # only tensors copied as they are
    assert 2**19 < q.peak_device_bytes <= VRAM  # chunk sets (+ histograms) within --vram
    assert all(stats.busy_s[k] > 0 for k in ("h2d_s", "kernel_s", "d2h_s", "device_wait_s"))
    q.shutdown()


@pytest.mark.parametrize("name", ["dare_linear", "ties"])
def test_numba_reads_rows_where_they_landed(trio, tmp_path, monkeypatch, name):
    """numba's merge and histogram kernels, like the device backend, take each row where
    its O_DIRECT read landed (unaligned tensor offsets): nothing but copied tensors is
    memmoved, and the bytes are those of rows memmoved into place."""
    from streammerge.exec.backends import NumbaBackend

    stats = _merge(trio, tmp_path / "cpu", NumbaBackend(), **RECIPES[name])
    assert _files(tmp_path / "cpu") == want_bytes(trio, tmp_path, name)
    assert stats.moved_bytes <= stats.copied_bytes
    monkeypatch.setattr(NumbaBackend, "takes_offsets", False)
    moved = _merge(trio, tmp_path / "moved", NumbaBackend(), **RECIPES[name])
    if moved.moved_bytes == 0:
        pytest.skip("O_DIRECT was not used on this filesystem")
    assert moved.moved_bytes > BIG and _files(tmp_path / "moved") == _files(tmp_path / "cpu")


def want_bytes(trio, tmp_path, name) -> dict[str, bytes]:
    """The recipe's bytes from a buffered read (no O_DIRECT, so no offsets)."""
    base, a, b = trio
    d = tmp_path / "buffered"
    streammerge.merge([a, b], base, d, backend="numba", device="cpu", direct_io=False,
                      **RECIPES[name])  # fmt: skip
    return _files(d)


@pytest.mark.parametrize("method", ["dare_linear", "ties"])
def test_sweep_outputs_on_fake_streams(trio, tmp_path, monkeypatch, method):
    """A sweep (K merges per slot: the inputs go to the device once, then a kernel and a
    D2H per output) through the device backend gives the numba sweep's bytes for every
    draw."""
    base, a, b = trio
    q = ThreadQueue(seed=3, max_delay_s=0.0005)
    copies = {"h2d": 0, "d2h": 0, "compute": 0}
    copy = q.copy

    def counted(stream, dst, src):
        copies[stream.name] += 1
        copy(stream, dst, src)

    q.copy = counted
    monkeypatch.setattr(gpu, "cuda_available", lambda: True)
    monkeypatch.setattr(gpu, "cuda_backend", lambda vram=None: _backend(q))
    kw = {"draws": 3, "method": method, "seed": 4, "sweep_seed": 9}
    if method != "dare_linear":
        kw["density"] = 0.5
    streammerge.sweep([a, b], base, tmp_path / "g", options=Options(memory="32MiB"),
                      keep="all", **kw)  # fmt: skip
    streammerge.sweep([a, b], base, tmp_path / "c", keep="all",
                      options=Options(backend="numba", device="cpu"), **kw)  # fmt: skip
    dirs = sorted(p.name for p in (tmp_path / "c").iterdir() if p.is_dir())
    assert len(dirs) >= 4  # 3 draws and the fixed reference
    for d in dirs:
        assert _files(tmp_path / "g" / d) == _files(tmp_path / "c" / d), d
    assert q.violations == [] and q.pending() == 0
    if method == "dare_linear":  # no histogram passes: 3 rows in once, each output back
        assert copies["h2d"] * len(dirs) == copies["d2h"] * 3 > 0, copies


class _Recording(NumbaLauncher):
    """Records the compiled-kernel signature of every launch, and whether a chunk of the
    run had been queued yet."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, tuple]] = []
        self.running = False

    @staticmethod
    def sig(op, a, inputs) -> tuple:
        n = "one" if a.n == 1 else a.n % 16 == 0  # Triton's integer specializations
        rows = ([a.base_row] if a.base_row >= 0 else []) + list(a.model_rows)
        aligned = tuple(inputs[r].ctypes.data % 16 == 0 for r in rows)  # and pointers'
        if op != "merge":
            return (op, a.dtypes, a.model_rows, n, aligned)
        return (op, a.dtypes, a.base_row, a.model_rows, a.model_ids,
                tuple(p > 0 for p in a.drop), a.keep_lo is None, a.consensus, a.normalize,
                a.linear, a.out_dtype, n, aligned)  # fmt: skip

    def merge(self, inputs, out, a):
        self.calls.append((self.running, self.sig("merge", a, inputs)))
        super().merge(inputs, out, a)

    def hist(self, op, inputs, a, hist, buckets=None):
        if op == "hist_high":
            self.calls.append((self.running, self.sig(op, a, inputs)))
        super().hist(op, inputs, a, hist, buckets)


@pytest.mark.parametrize("name", ["dare_linear", "ties", "ties_keep_all"])
def test_every_kernel_variant_is_compiled_before_the_first_read(trio, want, tmp_path, name):
    """prewarm launches each distinct kernel variant of the plan (dtypes, rows, flags,
    n == 1 / n % 16) before any chunk: the run launches no variant it had not warmed."""
    launcher = _Recording()
    be = DeviceBackend(ThreadQueue(max_delay_s=0.0), launcher, VRAM)
    run = be.run

    def run_marked(*a, **kw):
        launcher.running = True
        return run(*a, **kw)

    be.run = run_marked
    _merge(trio, tmp_path / "gpu", be, **RECIPES[name])
    assert _files(tmp_path / "gpu") == want[name]
    warmed = {sig for running, sig in launcher.calls if not running}
    used = {sig for running, sig in launcher.calls if running}
    assert used and used <= warmed, used - warmed
    be.q.shutdown()


def test_held_tensor_goes_to_the_device_once(trio, want, tmp_path):
    """TIES on tensors that fit a slot runs its passes on one fill (hist_high and merge; the
    bf16 working dtype needs no hist_low): the rows are copied to the device once for all
    of them (bytes still numba's)."""
    q = ThreadQueue(seed=2, max_delay_s=0.0002)
    copies, launches = [0], [0]
    copy, launch = q.copy, q.launch

    def count_copy(stream, dst, src):
        copies[0] += stream.name == "h2d"
        copy(stream, dst, src)

    def count_launch(stream, fn, *args):
        launches[0] += 1
        launch(stream, fn, *args)

    be = _backend(q, vram=gpu.device_stats_bytes(2) + 64 * 2**20)  # every tensor held
    q.copy, q.launch = count_copy, count_launch
    fills = set()
    to_device = be._to_device

    def seen(slot, args):
        fills.add((id(slot.inputs), slot.fill))
        return to_device(slot, args)

    be._to_device = seen
    _merge(trio, tmp_path / "gpu", be, **RECIPES["ties"])
    assert _files(tmp_path / "gpu") == want["ties"]
    # one copy of the 3 rows per fill, for all its passes (without reuse: 3 per pass)
    assert copies[0] == 3 * len(fills) and launches[0] >= 2 * len(fills), (copies, launches)
    q.shutdown()


# ----------------------------------------------------------------------------------------
# Faults introduced on purpose: each must change the bytes or be recorded
# ----------------------------------------------------------------------------------------


def _drop_wait(q: ThreadQueue, waiter: str, recorder: str) -> None:
    """Remove the backend's wait of stream ``waiter`` on events of stream ``recorder``."""
    orig = q.wait

    def wait(stream, event):
        if not (stream.name == waiter and event.stream.name == recorder):
            orig(stream, event)

    q.wait = wait


@pytest.mark.parametrize(
    "waiter, recorder, slow",
    [
        ("compute", "h2d", "h2d"),  # the kernel before its inputs are on the device
        ("d2h", "compute", "compute"),  # the output copied back before the kernel wrote it
        ("h2d", "d2h", "compute"),  # a reused buffer set: inputs overwritten under a kernel
    ],
)
def test_removed_stream_wait_changes_the_bytes(trio, want, tmp_path, waiter, recorder, slow):
    """With the ``slow`` stream delayed, the merge is right with every wait (control) and
    caught wrong without the one wait."""
    control = ThreadQueue(seed=7, max_delay_s=0.0003, bias={slow: 20})
    assert not _corrupted(trio, tmp_path / "ok", _backend(control), want["dare_linear"])
    q = ThreadQueue(seed=7, max_delay_s=0.0003, bias={slow: 20})
    _drop_wait(q, waiter, recorder)
    assert _corrupted(trio, tmp_path / "gpu", _backend(q), want["dare_linear"]), waiter
    control.shutdown()
    q.shutdown()


def test_removed_sweep_wait_changes_the_bytes(trio, tmp_path, monkeypatch):
    """In a sweep, each output's kernel waits for the previous output's D2H (one device
    output buffer per set): without that wait, outputs are caught wrong."""
    base, a, b = trio
    kw = {"draws": 3, "seed": 4, "sweep_seed": 9}
    streammerge.sweep([a, b], base, tmp_path / "c", keep="all",
                      options=Options(backend="numba", device="cpu"), **kw)  # fmt: skip
    dirs = sorted(p.name for p in (tmp_path / "c").iterdir() if p.is_dir())
    monkeypatch.setattr(gpu, "cuda_available", lambda: True)
    for fault in (False, True):
        q = ThreadQueue(seed=5, max_delay_s=0.0003, bias={"d2h": 20})
        if fault:
            _drop_wait(q, "compute", "d2h")
        monkeypatch.setattr(gpu, "cuda_backend", lambda vram=None, q=q: _backend(q))
        out = tmp_path / f"g{fault}"
        try:
            streammerge.sweep([a, b], base, out, options=Options(memory="32MiB"), keep="all",
                              **kw)  # fmt: skip
            same = all(_files(out / d) == _files(tmp_path / "c" / d) for d in dirs)
        except MergeError as e:  # NaN from finite inputs: caught too
            assert "non-finite" in str(e), e
            same = False
        assert same is not fault, fault
        q.shutdown()


def test_device_failure_mid_run_is_one_line(trio, tmp_path):
    """A kernel failing on the device mid-run (a sticky error, raised at the next wait) is a
    one-line MergeError; every stream is drained."""

    class FailsLater(NumbaLauncher):
        calls = 0

        def merge(self, inputs, out, a):
            FailsLater.calls += 1
            if FailsLater.calls > 8:
                raise RuntimeError("CUDA error: an illegal memory access was encountered\n...")
            super().merge(inputs, out, a)

    q = ThreadQueue(seed=1, max_delay_s=0.0002)
    be = DeviceBackend(q, FailsLater(), VRAM)
    with pytest.raises(MergeError, match="the GPU failed during the merge") as e:
        _merge(trio, tmp_path / "gpu", be, seed=5)
    assert "illegal memory access" in str(e.value) and "\n" not in str(e.value)
    assert q.pending() == 0 and q.pinned_bytes == 0
    q.shutdown()


def test_vram_too_small_names_the_users_value():
    """Below the histograms' reserve plus MIN_CHUNK_ELEMS elements of buffers: one line with
    the --vram given and a minimum that works."""
    be = DeviceBackend(ThreadQueue(), NumbaLauncher(), 2**20)
    with pytest.raises(MergeError, match="is too small") as e:
        be.max_chunk_elems(3, 2, 2)
    msg = str(e.value)
    assert msg.startswith("--vram 1") and "give at least" in msg and "-" not in msg.split()[1]
    need = streammerge.sizes.parse_size(msg.rsplit("give at least ", 1)[1])
    assert gpu.device_chunk_elems(need, 3, 2, 2) >= 4096
    be.q.shutdown()


def test_removed_host_wait_changes_the_bytes(trio, want, tmp_path):
    """The writer must not read a slot (nor the reader refill it) before its D2H."""
    q = ThreadQueue(seed=7, max_delay_s=0.0003, bias={"d2h": 20})
    be = _backend(q)
    be.wait = lambda handle: None
    assert _corrupted(trio, tmp_path / "gpu", be, want["dare_linear"])
    q.shutdown()


def test_reused_device_buffer_set_changes_the_bytes(trio, want, tmp_path):
    """Every chunk in device buffer set 0 but waiting only on the set its index names:
    a set reused while a kernel still reads it is caught."""
    q = ThreadQueue(seed=7, max_delay_s=0.0003, bias={"compute": 20})
    be = _backend(q)
    start = be.start

    def start_one_set(layout):
        start(layout)
        be._sets = [be._sets[0]] * be.depth  # three "sets", one buffer

    be.start = start_one_set
    assert _corrupted(trio, tmp_path / "gpu", be, want["dare_linear"])
    q.shutdown()


class Boom(Exception):
    pass


def test_error_mid_run_drains_every_stream(trio, tmp_path):
    """An error while chunks are queued on every stream: close() drains them before any
    buffer is freed (no work runs after it), unpins the slots, and the same backend merges
    correctly afterwards (a library caller that catches the error and merges again)."""
    q = ThreadQueue(seed=1, max_delay_s=0.002, bias={"d2h": 5})
    be = _backend(q)
    with pytest.raises(Boom):
        _merge(trio, tmp_path / "bad", be, on_bytes=fail_after(BIG, Boom("injected")), seed=5)
    assert q.pending() == 0 and q.pinned_bytes == 0 and q.closed >= 2  # warm-up + run
    q.max_delay_s = 0.0005
    _merge(trio, tmp_path / "good", be, seed=5)
    assert q.violations == []
    q.shutdown()


def test_missing_drain_is_caught(trio, tmp_path):
    """The same error with close() not draining: queued copies and kernels run on freed
    buffers, which the queue records."""
    q = ThreadQueue(seed=1, max_delay_s=0.002, bias={"d2h": 5})
    be = _backend(q)
    q.drain = lambda: None
    with pytest.raises(Boom):
        _merge(trio, tmp_path / "bad", be, on_bytes=fail_after(BIG, Boom("injected")), seed=5)
    while q.pending():
        pass
    assert any("after close()" in v for v in q.violations), q.violations
    q.shutdown()


# ----------------------------------------------------------------------------------------
# Pinned memory, --vram, warm-up, interpreter, WSL2
# ----------------------------------------------------------------------------------------


def test_pinned_bytes_stay_within_memory(trio, tmp_path):
    """With --memory 256MiB the host slots the backend pins (page-rounded registration)
    are at most 256 MiB; torch's pinned allocator (next power of two) would have pinned
    more than that for the same buffers."""
    q = ThreadQueue(seed=0, max_delay_s=0.0)
    sizes = []
    alloc = q.host_alloc
    q.host_alloc = lambda n: sizes.append(n) or alloc(n)
    be = DeviceBackend(q, NumbaLauncher(), 2**30)
    stats = _merge(trio, tmp_path / "gpu", be, memory="256MiB", method="ties", density=0.5)
    assert 0.5 * 2**28 < q.peak_pinned_bytes <= 2**28, q.peak_pinned_bytes
    layout = api.layout_for(prepare([trio[1], trio[2]], trio[0], tmp_path / "x",
                                    {"method": "ties", "density": 0.5},
                                    Options(memory="256MiB")), be)  # fmt: skip
    assert gpu.pinned_host_bytes(layout) == q.peak_pinned_bytes  # the formula is the run's
    assert stats.buffer_bytes <= 2**28
    assert sum(map(torch_pinned_size, sizes)) > 2**28  # what pin_memory=True would cost
    assert all(pinned_size(n) == -(-n // 4096) * 4096 for n in sizes)
    q.shutdown()


def test_vram_above_free_memory_is_a_one_line_error_before_anything(trio, tmp_path, capsys,
                                                                    monkeypatch):  # fmt: skip
    from streammerge import cli

    base, a, b = trio
    monkeypatch.setattr(gpu, "cuda_available", lambda: True)
    monkeypatch.setattr(
        gpu, "cuda_backend",
        lambda vram=None: DeviceBackend(ThreadQueue(free_bytes=8 * 10**9), NumbaLauncher(), vram),
    )  # fmt: skip
    out = tmp_path / "out"
    rc = cli.main([str(a), str(b), "--base", str(base), "-o", str(out), "--vram", "9GB"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--vram 9" in err and "free on fake:0" in err
    assert not out.exists()
    rc = cli.main([str(a), str(b), "--base", str(base), "-o", str(out), "--vram", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--vram" in err and not out.exists()


def test_device_out_of_memory_is_a_one_line_error(trio, tmp_path):
    """Device buffers are allocated by start(), before the first read; an OOM there is a
    MergeError and nothing is written."""

    class Full(ThreadQueue):
        def device_alloc(self, shape):
            if int(np.prod(shape)) > 4096:
                raise MergeError("out of GPU memory allocating 1 MiB of buffers on fake:0")
            return super().device_alloc(shape)

    q = Full()
    with pytest.raises(MergeError, match="out of GPU memory"):
        _merge(trio, tmp_path / "gpu", _backend(q), seed=5)
    assert not list((tmp_path / "gpu").glob("*.safetensors"))
    q.shutdown()


class _BrokenLauncher(NumbaLauncher):
    def merge(self, inputs, out, a):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment")


def test_warmup_failure_is_an_error_or_a_printed_fallback(trio, tmp_path, capsys, monkeypatch):
    """A GPU whose kernel cannot compile (no C compiler for Triton's driver stub): with
    --device cuda a one-line error before the output exists; under auto one line saying so
    and the merge runs on numba (same bytes)."""
    base, a, b = trio
    monkeypatch.setattr(gpu, "cuda_available", lambda: True)
    monkeypatch.setattr(
        gpu, "cuda_backend", lambda vram=None: DeviceBackend(ThreadQueue(), _BrokenLauncher())
    )
    with pytest.raises(MergeError, match="C compiler"):
        streammerge.merge([a, b], base, tmp_path / "cuda", device="cuda", seed=5)
    assert not (tmp_path / "cuda").exists()
    streammerge.merge([a, b], base, tmp_path / "auto", seed=5)
    err = capsys.readouterr().err
    assert "not using the GPU" in err and "numba" in err and err.count("\n") == 1
    streammerge.merge([a, b], base, tmp_path / "cpu", device="cpu", seed=5)
    assert _files(tmp_path / "auto") == _files(tmp_path / "cpu")


def test_cuda_backend_refuses_an_interpreted_kernel():
    """With TRITON_INTERPRET=1 the CUDA backend would run the kernel interpreted on the host
    (the interpreter copies CUDA tensors there and back): refused with one line, before any
    device call, so it runs the same with or without a GPU (a child process: the variable
    is read when triton is imported)."""
    pytest.importorskip("triton")
    script = (
        "from streammerge.exec import gpu\n"
        "from streammerge.errors import MergeError\n"
        "try:\n    gpu.cuda_backend()\nexcept MergeError as e:\n    print(e)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                       text=True, timeout=300, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "TRITON_INTERPRET=1 is set" in r.stdout and r.stdout.count("\n") == 1, r.stdout


def test_wsl2_gpu_is_seen(monkeypatch):
    """WSL2 exposes the GPU as /dev/dxg only: cuda_available asks torch there too."""
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    for nodes, want in ((("/dev/dxg",), True), (("/dev/nvidiactl",), True), ((), False)):
        monkeypatch.setattr(gpu.os.path, "exists", lambda p, n=nodes: p in n)
        assert gpu.cuda_available() is want, nodes


# ----------------------------------------------------------------------------------------
# TorchCudaQueue against a stand-in torch: the calls it makes
# ----------------------------------------------------------------------------------------


class _FakeCuda:
    """Records what TorchCudaQueue asks of torch.cuda."""

    class OutOfMemoryError(RuntimeError):
        pass

    def __init__(self) -> None:
        self.log: list = []
        log = self.log

        class Event:
            def __init__(self, **kw):
                log.append(("event", kw))

            def record(self, stream):
                pass

        class Stream:
            def __init__(self, device):
                pass

            def synchronize(self):
                log.append(("stream sync",))

        class Cudart:
            refuse = False

            def cudaHostRegister(self, ptr, size, flags):
                assert flags == 1  # cudaHostRegisterPortable: pinned for every device
                log.append(("register", ptr, size))
                return 712 if self.refuse else 0  # cudaErrorHostMemoryAlreadyRegistered

            def cudaHostUnregister(self, ptr):
                log.append(("unregister", ptr))
                return 0

        self.Event, self.Stream, self._cudart = Event, Stream, Cudart()

    def device(self, d):
        import contextlib

        return contextlib.nullcontext()

    def get_device_name(self, i):
        return "Fake GPU"

    def cudart(self):
        return self._cudart


def test_torch_queue_uses_blocking_events_and_registered_pages():
    """Events are blocking (the host sleeps in synchronize instead of spinning a core);
    host buffers are page-aligned and registered for exactly pinned_size bytes; close()
    synchronizes every stream before unregistering anything."""
    cuda = _FakeCuda()
    fake = types.SimpleNamespace(cuda=cuda, device=lambda kind, i: (kind, i))
    q = TorchCudaQueue(0, torch=fake)
    streams = [q.stream(n) for n in ("h2d", "compute", "d2h")]
    q.record(streams[0])
    assert cuda.log[-1] == ("event", {"enable_timing": True, "blocking": True})
    buf = q.host_alloc(10_000)
    kind, ptr, size = cuda.log[-1]
    assert kind == "register" and ptr == buf.ctypes.data and ptr % 4096 == 0
    assert size == pinned_size(10_000) == 12288 and q.pinned_bytes == 12288
    q.close()
    tail = [e[0] for e in cuda.log[-4:]]
    assert tail == ["stream sync"] * 3 + ["unregister"] and q.pinned_bytes == 0
    cuda._cudart.refuse = True  # registration refused: pageable memory, not counted pinned
    buf = q.host_alloc(5000)
    assert len(buf) == 5000 and buf.ctypes.data % 4096 == 0 and q.pinned_bytes == 0
    q.close()
    assert cuda.log[-1] == ("stream sync",)  # nothing to unregister


def test_make_backend_auto_without_driver_is_numba(monkeypatch):
    monkeypatch.setattr(gpu, "cuda_available", lambda: False)
    from streammerge.exec.backends import NumbaBackend
    from streammerge.exec.choose import make_backend

    assert isinstance(make_backend("auto", "auto", 1), NumbaBackend)
    with pytest.raises(MergeError, match="no CUDA device"):
        make_backend("auto", "cuda", 1)
    with pytest.raises(MergeError, match="numba runs on the CPU"):  # not silently the CPU
        make_backend("numba", "cuda", 1)


def test_cuda_device_that_cannot_start_is_a_merge_error(monkeypatch, capsys, trio, tmp_path):
    """A RuntimeError while the queue starts (an exclusive-process GPU in use, no memory
    for a context) is a MergeError: an error with --device cuda, a fallback under auto."""
    from streammerge.exec import devqueue

    class Busy:
        def __init__(self, index):
            raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable")

    monkeypatch.setattr(devqueue, "TorchCudaQueue", Busy)
    monkeypatch.setattr(
        gpu, "TritonLauncher", lambda torch: types.SimpleNamespace(interpreted=False)
    )
    with pytest.raises(MergeError, match="busy or unavailable"):
        gpu.cuda_backend()
    monkeypatch.setattr(gpu, "cuda_available", lambda: True)
    base, a, b = trio
    streammerge.merge([a, b], base, tmp_path / "auto", seed=5)
    assert "not using the GPU" in capsys.readouterr().err


def test_torch_queue_close_releases_after_a_sticky_error():
    """A stream whose synchronize raises (a sticky CUDA error): close() still unregisters
    the host memory, then the error propagates."""
    cuda = _FakeCuda()
    fake = types.SimpleNamespace(cuda=cuda, device=lambda kind, i: (kind, i))
    q = TorchCudaQueue(0, torch=fake)
    s = q.stream("h2d")

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    s.synchronize = broken
    q.host_alloc(4096)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        q.close()
    assert cuda.log[-1][0] == "unregister" and q.pinned_bytes == 0


def test_plan_on_a_gpu_machine_shows_the_gpu_layout(trio, tmp_path, capsys, monkeypatch):
    """--plan where a CUDA run would happen: the chunk is the --vram budget's, the pinned
    host bytes are reported (within --memory), no backend is started; --vram above the
    free memory is the same one-line error as a run's."""
    import json

    import torch

    from streammerge import cli

    base, a, b = trio
    monkeypatch.setattr(gpu, "cuda_available", lambda: True)
    # with TRITON_INTERPRET=1 a CUDA run would not start: --plan would show the CPU layout
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (8 * 10**9, 16 * 10**9))
    monkeypatch.setattr(gpu, "cuda_backend", None)  # starting one would fail the test
    argv = [str(a), str(b), "--base", str(base), "-o", str(tmp_path / "o"), "--plan", "--json",
            "--memory", "256MiB", "--vram", str(VRAM)]  # fmt: skip
    assert cli.main(argv) == 0
    mem = json.loads(capsys.readouterr().out)["memory"]
    assert mem["device"] == "cuda" and 0 < mem["pinned_bytes"] <= 2**28
    want = gpu.device_chunk_elems(VRAM, 3, 2, 2)
    assert mem["chunk_elems"] == want < mem["budget_bytes"] // 64
    assert cli.main([*argv[:-2], "--vram", "9GB"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "free on cuda:0" in err and not (tmp_path / "o").exists()

