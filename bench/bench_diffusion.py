"""pytest-benchmark cases for the diffusion-distillation ops: forward+backward
of the fused cpp op against the torch reference (eager) and torch.compile of
the reference, float32 on CPU with 2 threads, grouped per (op, shape) so
pytest-benchmark's table compares them side by side.

    pytest bench/bench_diffusion.py --benchmark-only [--benchmark-group-by=group]
"""
import pytest
import torch

import fastdistill as fd
from fastdistill.diffusion import NoiseSchedule
from fastdistill.bench import DIFFUSION_OPS, diffusion_fused_op, diffusion_inputs, diffusion_reference_op

SHAPES = [(64, 3, 64, 64), (64, 1, 28, 28)]
IMPLS = ["torch-eager", "torch-compile", "cpp"]
OPS = list(DIFFUSION_OPS)
THREADS = 2
SCHEDULE = NoiseSchedule("cosine", 1000)
_compiled = {}


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _inputs(shape):
    return diffusion_inputs(shape, SCHEDULE)


def _reference(op, d):
    return diffusion_reference_op(op, d)


def _fused(op, d):
    return diffusion_fused_op(op, d, SCHEDULE)


def _loss_fn(impl, op, shape, d):
    if impl == "torch-eager":
        return _reference(op, d)
    if impl == "torch-compile":
        key = (op, shape)
        if key not in _compiled:
            _compiled[key] = torch.compile(_reference(op, d), dynamic=False)
        return _compiled[key]
    if not fd.backends()["cpp"]:
        pytest.skip("cpp backend unavailable")
    return _fused(op, d)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_diffusion_op_fwd_bwd(benchmark, impl, op, shape):
    d = _inputs(shape)
    loss_fn = _loss_fn(impl, op, shape, d)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1))  # ddim_step's output
    benchmark.group = f"{op} {'x'.join(map(str, shape))} fp32 {THREADS} threads"

    def setup():
        return (d["c"].clone().requires_grad_() if op != "ddim_eps_cfg"
                else d["b"].clone().requires_grad_(),), {}

    def step(leaf):
        out = loss_fn(leaf)
        if out.dim():
            out.backward(grad_out)
        else:
            out.backward()

    benchmark.pedantic(step, setup=setup, rounds=40, warmup_rounds=3)
