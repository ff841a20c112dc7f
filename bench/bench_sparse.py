"""pytest-benchmark cases for sparse_kd_loss: forward+backward of a top-64
teacher with a tail bucket, fused (cpp) against the pure-torch reference, and
the dense kd_loss on the full teacher row as the yardstick it replaces.

    pytest bench/bench_sparse.py --benchmark-only
"""
import pytest
import torch

import fastdistill as fd
from fastdistill.reference import sparse as ref

N, V, K = 256, 32000, 64
IMPLS = ["sparse-torch-eager", "sparse-cpp", "dense-kd-cpp"]


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_kd_loss_fwd_bwd(benchmark, impl):
    if impl.endswith("cpp") and not fd.backends()["cpp"]:
        pytest.skip("cpp backend unavailable")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(N, V, generator=g) * 2
    teacher = torch.randn(N, V, generator=g) * 2
    lp, ids = torch.log_softmax(teacher, -1).topk(K, dim=-1)
    benchmark.group = f"sparse_kd_loss forward_kl top-{K} {N}x{V} fp32"
    if impl == "sparse-torch-eager":
        def loss_fn(s):
            return ref.sparse_kd_loss(s, ids, lp)
    elif impl == "sparse-cpp":
        def loss_fn(s):
            return fd.sparse_kd_loss(s, ids, lp, backend="cpp")
    else:
        def loss_fn(s):
            return fd.kd_loss(s, teacher, backend="cpp")

    def setup():
        return (base.clone().requires_grad_(),), {}

    def step(s):
        loss_fn(s).backward()

    benchmark.pedantic(step, setup=setup, rounds=5, warmup_rounds=2)
