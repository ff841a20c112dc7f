"""pytest-benchmark cases for fd.ot (issue 5), at sizes where a round takes
seconds: forward+backward of the debiased Sinkhorn divergence between point
clouds (fastdistill's torch and cpp backends against POT's log-domain solver
and GeomLoss's tensorized backend, configured as in ``fastdistill bench
--case ot``), and the SinKD loss against the faithful torch port of its
formulation.
POT and GeomLoss are bench-only dependencies: their cases skip without them.

    pytest bench/bench_ot.py --benchmark-only
"""
import pytest
import torch

import fastdistill as fd
from fastdistill import bench as report

N, D, EPS, ITERS = 1024, 64, 0.05, 100
B, V, T, KD_EPS, KD_ITERS = 64, 8000, 2.0, 0.1, 20
DIV_IMPLS = ["POT", "GeomLoss", "fastdistill sinkhorn_divergence torch", "fastdistill sinkhorn_divergence cpp"]
KD_IMPLS = ["reference-port", "torch-envelope", "torch-unrolled", "cpp-envelope", "cpp-unrolled"]


@pytest.mark.parametrize("impl", DIV_IMPLS)
def test_sinkhorn_divergence_fwd_bwd(benchmark, impl):
    if impl == "POT":
        pytest.importorskip("ot")
    elif impl == "GeomLoss":
        pytest.importorskip("geomloss")
    loss_fn = next(f for label, f in report._ot_divergence_impls(EPS, ITERS, log=lambda *_: None)
                   if label.startswith(impl))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(N, D, generator=g) / D**0.5
    y0 = torch.randn(N, D, generator=g) / D**0.5 * 0.8 + 0.5 / D**0.5
    benchmark.group = f"sinkhorn_divergence p=2 eps={EPS} {ITERS} it {N}x{N}x{D} fp32"

    def setup():
        return (x0.clone().requires_grad_(), y0.clone().requires_grad_()), {}

    def step(x, y):
        loss_fn(x, y).backward()

    benchmark.pedantic(step, setup=setup, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("impl", KD_IMPLS)
def test_sinkhorn_kd_loss_fwd_bwd(benchmark, impl):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(B, V, generator=g) * 2
    teacher = torch.randn(B, V, generator=g) * 2
    benchmark.group = f"sinkhorn_kd_loss l1 T={T:g} eps={KD_EPS} {KD_ITERS} it {B}x{V} fp32"
    if impl == "reference-port":
        def loss_fn(s):
            return report.sinkd_reference(s, teacher, T, KD_EPS, KD_ITERS) / B
    else:
        backend, mode = impl.split("-")

        def loss_fn(s):
            return fd.ot.sinkhorn_kd_loss(s, teacher, temperature=T, epsilon=KD_EPS,
                                          n_iters=KD_ITERS, gradient=mode, backend=backend)

    def setup():
        return (base.clone().requires_grad_(),), {}

    def step(s):
        loss_fn(s).backward()

    benchmark.pedantic(step, setup=setup, rounds=5, warmup_rounds=1)
