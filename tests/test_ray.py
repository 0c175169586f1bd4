"""Merges over a local Ray cluster (2 workers): byte-identical to the one-machine merge for
DARE and TIES recipes, with a worker killed mid-task, and --resume after the driver is
killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import make_trio, merge_argv, run_cli

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from streammerge.api import Options
from streammerge.jobs.distributed import merge_ray, partition


def _shards(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix == ".safetensors"}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_partition_balances_bytes():
    class S:
        def __init__(self, name, n):
            self.filename, self.read_bytes = name, n

    shards = [S(f"s{i}", n) for i, n in enumerate((9, 5, 4, 3))]
    groups = partition(shards, 2)
    assert [[s.filename for s in g] for g in groups] == [["s0", "s3"], ["s1", "s2"]]
    assert len(partition(shards, 10)) == 4


@pytest.mark.parametrize(
    "recipe", [{"drop": 0.4, "alpha": 0.7}, {"method": "ties", "density": 0.3, "weights": [1, 0.6]}]
)
def test_ray_merge_equals_local(tmp_path, cluster, recipe):
    base, a, b = make_trio(tmp_path, big=200_000)
    opts = Options(shard_size="60KB", memory="24MiB")
    import streammerge

    local = streammerge.merge([a, b], base, tmp_path / "local", seed=8, options=opts, **recipe)
    dist = merge_ray([a, b], base, tmp_path / "ray", seed=8, options=opts, **recipe)
    assert _shards(tmp_path / "ray") == _shards(tmp_path / "local")
    assert len(_shards(tmp_path / "ray")) > 2
    assert dist.bytes_read == local.bytes_read
    assert (tmp_path / "ray" / "streammerge.json").read_bytes() == (
        tmp_path / "local" / "streammerge.json"
    ).read_bytes()


def _kill_a_task_worker(staging: Path, done: threading.Event, killed: list) -> None:
    """Kill -9 the first worker process running a merge task once it writes a shard."""
    while not done.is_set():
        if staging.is_dir() and any(p.suffix == ".tmp" for p in staging.iterdir()):
            for p in psutil.process_iter(["cmdline"]):
                if any("_run_task" in part for part in (p.info["cmdline"] or [])):
                    os.kill(p.pid, signal.SIGKILL)
                    killed.append(p.pid)
                    return
        time.sleep(0.005)


def test_worker_killed_mid_task_still_identical(tmp_path, cluster):
    base, a, b = make_trio(tmp_path, big=3_000_000)
    opts = Options(shard_size="1MB", memory="24MiB")
    import streammerge

    recipe = {"method": "ties", "density": 0.4, "alpha": 1.0}
    streammerge.merge([a, b], base, tmp_path / "local", seed=3, options=opts, **recipe)
    done, killed = threading.Event(), []
    staging = tmp_path / ".ray.streammerge-partial"
    watcher = threading.Thread(target=_kill_a_task_worker, args=(staging, done, killed))
    watcher.start()
    try:
        merge_ray([a, b], base, tmp_path / "ray", seed=3, options=opts, **recipe)
    finally:
        done.set()
        watcher.join()
    assert killed, "no task worker was found to kill"
    assert _shards(tmp_path / "ray") == _shards(tmp_path / "local")


def test_resume_after_the_driver_is_killed(tmp_path):
    base, a, b = make_trio(tmp_path, big=40_000_000)  # its shard outlasts the small ones
    out = tmp_path / "out"
    argv = merge_argv([a, b], base, out, "--ray", "--seed", "5", "--shard-size", "500KB",
                      "--memory", "24MiB", "--quiet")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "streammerge.cli", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    journal = tmp_path / ".out.streammerge-journal"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if journal.is_file() and journal.read_text().count('"shard"') >= 1:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the merge finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    assert not out.exists() and journal.is_file()
    r = run_cli([*argv, "--resume"], timeout=600)
    assert r.returncode == 0, r.stderr
    local = tmp_path / "local"
    r = run_cli(merge_argv([a, b], base, local, "--seed", "5", "--shard-size", "500KB", "--quiet"))
    assert r.returncode == 0, r.stderr
    assert _shards(out) == _shards(local)


def test_sweep_on_ray_equals_local_sweep(tmp_path, cluster):
    import streammerge.jobs.sweep as sw

    base, a, b = make_trio(tmp_path, big=100_000)
    opts = Options(shard_size="60KB", memory="24MiB")
    kw = {"draws": 3, "seed": 2, "sweep_seed": 9, "keep": "all", "method": "dare_ties",
          "density": 0.5, "evaluate": lambda p: float(len(os.listdir(p)))}  # fmt: skip
    local = sw.sweep([a, b], base, tmp_path / "l", options=opts, **kw)
    dist = sw.sweep([a, b], base, tmp_path / "r", options=opts, ray_address="local", **kw)
    assert [d.weights for d in dist.draws] == [d.weights for d in local.draws]
    for dl, dr in zip(local.draws, dist.draws):
        assert _shards(dr.dir) == _shards(dl.dir) and dr.score == dl.score
    assert dist.bytes_read >= local.bytes_read  # groups read the inputs once each


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1"])
def test_unreachable_ray_address_is_one_line_in_bounded_time(tmp_path, address):
    # ray.init retries an unreachable address for minutes; the merge says so at once
    base, a, b = make_trio(tmp_path)
    start = time.monotonic()
    r = run_cli([str(a), str(b), "--base", str(base), "-o", str(tmp_path / "out"),
                 "--ray", address], timeout=60)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "cannot reach the Ray cluster at " + address in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and time.monotonic() - start < 30
    assert not (tmp_path / "out").exists()
