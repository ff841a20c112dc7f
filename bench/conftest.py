"""Benchmarks run with `pytest bench --benchmark-only` (not part of `make test`)."""
import torch

import fastdistill._backend as _backend


def pytest_configure(config):
    torch.manual_seed(0)
    _backend.load_extension()
