"""Triton kernels, installed as htakl_kernels.triton_kernels (never as a top-level package)."""
