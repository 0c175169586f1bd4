"""streammerge.vector_width: numba compiles for the whole AVX-512 register, unless the user
chose numba's target, and the kernels give the same bytes at either width."""

from __future__ import annotations

import subprocess
import sys

import llvmlite.binding as llvm
import pytest

from streammerge.vector_width import PREFER_256, SET_HERE, prefer_full_vectors, users_environ

HAS_AVX512 = bool(llvm.get_host_cpu_features().get("avx512f", False))


def test_the_users_choice_of_numba_target_is_kept():
    for env in ({"NUMBA_CPU_FEATURES": "+avx2"}, {"NUMBA_CPU_NAME": "generic"},
                {"NUMBA_ENABLE_AVX": "0"}):  # fmt: skip
        before = dict(env)
        assert prefer_full_vectors(env) is False
        assert env == before


def test_an_inherited_setting_is_made_again_for_this_host():
    """A child of a streammerge process (the marker set) may run on another CPU."""
    env = {"NUMBA_CPU_FEATURES": "+made-elsewhere", SET_HERE: "1"}
    assert prefer_full_vectors(env) is HAS_AVX512
    assert "+made-elsewhere" not in env.get("NUMBA_CPU_FEATURES", "")


def test_avx512_hosts_get_full_width_vectors():
    env: dict = {}
    assert prefer_full_vectors(env) is HAS_AVX512
    if HAS_AVX512:
        feats = env["NUMBA_CPU_FEATURES"].split(",")
        assert feats[-1] == f"-{PREFER_256}" and "+avx512f" in feats
        assert users_environ({**env, "PATH": "/bin"}) == {"PATH": "/bin"}
    else:
        assert env == {}


def test_a_users_own_numba_target_is_passed_on():
    env = {"NUMBA_CPU_FEATURES": "+avx2", "PATH": "/bin"}
    assert users_environ(env) == env
    assert SET_HERE not in users_environ(env)


_DIGEST = """
import hashlib, numpy as np
from streammerge.kernels import cpu_fusion, cpu_merge
from numba.core import config
rng = np.random.default_rng(3)
x = (rng.standard_normal(64 * 2048) * 0.02).astype(np.float32)
y = (x + rng.standard_normal(x.size).astype(np.float32) * 0.002).astype(np.float32)
a = (x.view(np.uint32) >> 16).astype(np.uint16)
b = (y.view(np.uint32) >> 16).astype(np.uint16)
k = cpu_fusion.fusion_k(a.view(np.uint8), "BF16", b.view(np.uint8), "BF16", 64, 2048)
m = cpu_merge.merge_arrays(a, [b, a ^ np.uint16(1)], "BF16", key=5, start=0, drop=[0.5, 0.3],
                           weights=[0.6, 0.4], base_dtype="BF16", model_dtypes=["BF16"] * 2,
                           compute_dtype="BF16")
full = config.CPU_FEATURES.endswith("-prefer-256-bit")
print(full, hashlib.sha256(k.tobytes() + m.tobytes()).hexdigest())
"""


@pytest.mark.skipif(not HAS_AVX512, reason="the host has no AVX-512: one vector width only")
def test_kernels_give_the_same_bytes_at_either_width():
    """A fresh process at each width (numba reads its features once): arcee_fusion's k and
    a bf16 DARE merge, the same bytes."""
    got = {}
    for full in (True, False):
        env = {k: v for k, v in users_environ().items() if not k.startswith("NUMBA_CPU_")}
        if not full:
            env["NUMBA_CPU_FEATURES"] = llvm.get_host_cpu_features().flatten()
        r = subprocess.run([sys.executable, "-c", _DIGEST], env=env, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr
        flag, digest = r.stdout.split()
        assert flag == str(full)
        got[full] = digest
    assert got[True] == got[False]
