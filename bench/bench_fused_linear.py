"""pytest-benchmark cases for fused_linear_kd_loss: forward+backward of the LM
head + JSD loss against the materialized-logits reference and Liger-Kernel's
chunked fused-linear JSD (when installed: `pip install liger-kernel`).

    pytest bench/bench_fused_linear.py --benchmark-only
"""
import pytest
import torch

import fastdistill as fd
from fastdistill.reference import kd as ref

N, H, V = 1024, 512, 32000
IMPLS = ["torch-eager", "liger", "fastdistill"]


def _loss_fn(impl):
    if impl == "torch-eager":
        def naive(h, w, th, tw, labels):
            with torch.no_grad():
                t = th @ tw.t()
            return ref.kd_loss(h @ w.t(), t, divergence="jsd")
        return naive
    if impl == "liger":
        lk = pytest.importorskip("liger_kernel.chunked_loss")
        return lk.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5)
    return lambda h, w, th, tw, labels: fd.fused_linear_kd_loss(h, w, th, tw, divergence="jsd")


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_jsd_fwd_bwd(benchmark, impl):
    g = torch.Generator().manual_seed(0)
    hid, th = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    w, tw = torch.randn(V, H, generator=g) / H**0.5, torch.randn(V, H, generator=g) * 2 / H**0.5
    labels = torch.randint(0, V, (N,), generator=g)
    loss_fn = _loss_fn(impl)
    benchmark.group = f"fused_linear_kd jsd {N}x{H}x{V} fp32"

    def setup():
        return (hid.clone().requires_grad_(), w.clone().requires_grad_()), {}

    def step(x, wx):
        loss_fn(x, wx, th, tw, labels).backward()

    benchmark.pedantic(step, setup=setup, rounds=3, warmup_rounds=2)
