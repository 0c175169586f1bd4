"""Which backend computes a merge (``--backend`` / ``--device``): the CUDA device when there
is one and it may be used, else numba (or Triton's CPU interpreter, asked for by name)."""

from __future__ import annotations

import sys

from streammerge.errors import MergeError, OptionError
from streammerge.sizes import parse_size


def wants_gpu(backend: str, device: str) -> bool:
    """Whether ``--backend`` / ``--device`` let a run use a CUDA device (when there is one:
    ``gpu.cuda_available``): device auto or cuda, backend auto or triton."""
    return device in ("auto", "cuda") and backend in ("auto", "triton")


def make_backend(backend: str, device: str, threads: int | None, vram: int | str | None = None,
                 preload: bool = True):  # fmt: skip
    """The compute backend for ``--backend`` / ``--device`` (see ``merge``); ``preload``:
    the CPU kernels load in the background from the start (``NumbaBackend``).

    On a CUDA device (``streammerge.exec.gpu.cuda_backend``: checks ``--vram`` against the free
    memory and compiles the kernel with a warm-up launch). Under ``auto``, a GPU that cannot
    run (no triton, no C compiler, a driver error, ``TRITON_INTERPRET=1``) falls back to
    numba with one line on stderr saying why; asked for with ``--device cuda`` or
    ``--backend triton``, it is the error.

    Raises:
        MergeError: cuda asked for but not usable; ValueError: unknown names.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {device!r} (use auto, cpu or cuda)")
    if backend not in ("auto", "numba", "triton"):
        raise ValueError(f"unknown backend {backend!r} (use numba or triton)")
    if device == "cuda" and backend == "numba":
        raise OptionError(
            "--device cuda with --backend numba: numba runs on the CPU",
            "use --backend auto (or triton) for the GPU, or --device cpu",
        )
    if wants_gpu(backend, device):
        from streammerge.exec import gpu

        if gpu.cuda_available():
            try:
                return gpu.cuda_backend(None if vram is None else parse_size(vram, "--vram"))
            except MergeError as e:
                if device == "cuda" or backend == "triton" or vram is not None:
                    raise  # asked for explicitly: say why it cannot run
                print(f"streammerge: not using the GPU: {e.what}; merging on the CPU (numba)",
                      file=sys.stderr, flush=True)  # fmt: skip
        elif device == "cuda":
            raise MergeError(
                "--device cuda but no CUDA device is available", None, None, "use --device cpu"
            )
    if backend == "triton":
        from streammerge.exec.backends import TritonCpuBackend

        return TritonCpuBackend()
    from streammerge.exec.backends import NumbaBackend

    return NumbaBackend(threads, preload)
