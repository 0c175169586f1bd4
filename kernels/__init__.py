"""Fused merge kernels: numba (CPU), Triton (GPU); installed as ``streammerge.kernels``."""
