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
from fastdistill.diffusion.ops import consistency_loss, ddim_step, denoising_loss, dmd_loss
from fastdistill.reference import diffusion as ref

SHAPES = [(64, 3, 64, 64), (64, 1, 28, 28)]
IMPLS = ["torch-eager", "torch-compile", "cpp"]
OPS = ["dmd", "denoising_v_min_snr", "consistency_l2", "consistency_huber", "ddim_eps_cfg"]
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
    g = torch.Generator().manual_seed(0)
    B = shape[0]
    t = torch.randint(0, 1000, (B,), generator=g)
    c_skip, c_out = SCHEDULE.consistency_scalings(t)
    return dict(
        a=torch.randn(shape, generator=g), b=torch.randn(shape, generator=g),
        c=torch.randn(shape, generator=g), t=t, c_skip=c_skip,
        c_out=c_out, w=torch.rand(B, generator=g) + 0.5,
        alpha=SCHEDULE.alpha(t), sigma=SCHEDULE.sigma(t), snr=SCHEDULE.snr(t),
        # DDIM: one sampler step for the whole batch, t = 500 -> 450
        ddim_t=500, ddim_t_prev=450, ddim_coefs=[f(torch.full((B,), v)) for v in (500, 450)
                                                  for f in (SCHEDULE.alpha, SCHEDULE.sigma)])


def _reference(op, d):
    """The op as the reference computes it: f(leaf) -> tensor."""
    if op == "dmd":
        return lambda x: ref.dmd_loss(x, d["a"], d["b"], weight=d["w"])
    if op == "denoising_v_min_snr":
        return lambda x: ref.denoising_loss(x, d["a"], d["b"], d["alpha"], d["sigma"], d["snr"],
                                            prediction="v", weighting="min_snr")
    if op.startswith("consistency"):
        metric = "l2" if op.endswith("l2") else "pseudo_huber"
        return lambda x: ref.consistency_loss(x, d["a"], metric=metric, x_t=d["b"],
                                              c_skip=d["c_skip"], c_out=d["c_out"], weight=d["w"])
    return lambda x: ref.ddim_step(d["a"], x, *d["ddim_coefs"], prediction="eps",
                                   guidance_scale=3.0, uncond=d["c"])


def _fused(op, d):
    if op == "dmd":
        return lambda x: dmd_loss(x, d["a"], d["b"], weight=d["w"], backend="cpp")
    if op == "denoising_v_min_snr":
        return lambda x: denoising_loss(x, d["a"], d["b"], d["t"], SCHEDULE, prediction="v",
                                        weighting="min_snr", backend="cpp")
    if op.startswith("consistency"):
        metric = "l2" if op.endswith("l2") else "pseudo_huber"
        return lambda x: consistency_loss(x, d["a"], metric=metric, x_t=d["b"], c_skip=d["c_skip"],
                                          c_out=d["c_out"], weight=d["w"], backend="cpp")
    return lambda x: ddim_step(d["a"], x, d["ddim_t"], d["ddim_t_prev"], SCHEDULE, prediction="eps",
                               guidance_scale=3.0, uncond=d["c"], backend="cpp")


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
