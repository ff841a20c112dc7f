"""Triton kernels of fastdistill's fused ops (one module per op family)."""
