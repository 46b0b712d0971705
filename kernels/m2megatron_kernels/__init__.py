"""Triton kernels of m2megatron, installed as `m2megatron_kernels` (PyPI already has a `kernels`)."""
