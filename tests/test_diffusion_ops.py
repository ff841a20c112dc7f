"""The diffusion-distillation ops (fastdistill/diffusion/ops.py): the torch
reference against the formulas (float64), and every fused backend against the
reference (values and gradients, every prediction / weighting / metric /
reduction, bf16/fp16, non-contiguous and mixed-dtype inputs, non-finite
inputs, double backward, bad arguments)."""
import math

import pytest
import torch

from fastdistill.diffusion import NoiseSchedule
from fastdistill.diffusion import ops
from fastdistill.diffusion.ops import consistency_loss, ddim_step, denoising_loss, dmd_loss
from fastdistill.reference import diffusion as ref

from conftest import fused_backends

FUSED = fused_backends()
ALL = ["torch"] + FUSED
# the backends that run here (a fused_backends() param is marked skipif(not available))
AVAILABLE = ["torch"] + [p.values[0] for p in FUSED if not p.marks[0].args[0]]
REDUCTIONS = ("mean", "sum", "none")
SCHEDULE = NoiseSchedule("cosine", 1000)
LINEAR = NoiseSchedule("linear", 1000)
# Batches not a multiple of any block: 3 and 5 samples of 64, 105 and 2 elements.
SHAPES = [(3, 1, 8, 8), (5, 3, 7, 5), (5, 2)]
FP32, LOWP = 1e-5, 2e-2
# The Triton interpreter evaluates inf − inf and NaN lanes with numpy, which warns.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


def assert_close_rel(actual, expected, rtol, what, scale=None):
    """Element-wise rtol with an absolute floor of rtol times the expected
    tensor's largest magnitude (or ``scale``)."""
    actual, expected = actual.double(), expected.double()
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30),
                               msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------- the cases
# Each case: the op, its keyword inputs, the names that get a gradient, and
# the remaining keywords. Per-sample tensors are floating too (cast with the rest).
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def dmd_case(shape, seed=0, weighted=True):
    g = _gen(seed)
    x = torch.randn(shape, generator=g)
    real = x + 0.5 * torch.randn(shape, generator=g)
    fake = real + 0.3 * torch.randn(shape, generator=g)
    inputs = dict(x=x, x0_real=real, x0_fake=fake,
                  weight=torch.rand(shape[0], generator=g) + 0.5 if weighted else None)
    return dmd_loss, inputs, ("x",), {}


def timesteps(batch, seed, high=1000):
    t = torch.randint(0, high, (batch,), generator=_gen(seed + 100))
    t[0] = high - 1  # the noisiest step, where α is smallest
    return t


def denoising_case(shape, seed=0, prediction="eps", weighting="uniform", schedule=SCHEDULE):
    g = _gen(seed)
    inputs = dict(pred=torch.randn(shape, generator=g), x0=torch.randn(shape, generator=g),
                  noise=torch.randn(shape, generator=g), t=timesteps(shape[0], seed),
                  schedule=schedule)
    return denoising_loss, inputs, ("pred",), dict(prediction=prediction, weighting=weighting)


def consistency_case(shape, seed=0, metric="l2", boundary=True, weighted=True, c=None):
    g = _gen(seed)
    inputs = dict(pred=torch.randn(shape, generator=g), target=torch.randn(shape, generator=g))
    if boundary:
        c_skip, c_out = SCHEDULE.consistency_scalings(timesteps(shape[0], seed, 100) - 1)
        inputs.update(x_t=torch.randn(shape, generator=g), c_skip=c_skip, c_out=c_out)
    if weighted:
        inputs["weight"] = torch.rand(shape[0], generator=g) + 0.5
    kw = dict(metric=metric)
    if c is not None:
        kw["c"] = c
    return consistency_loss, inputs, ("pred",), kw


def ddim_case(shape, seed=0, prediction="eps", guidance=None, t_prev=None, schedule=SCHEDULE):
    g = _gen(seed)
    t = timesteps(shape[0], seed)
    inputs = dict(x_t=torch.randn(shape, generator=g), pred=torch.randn(shape, generator=g), t=t,
                  t_prev=t - 37 if t_prev is None else t_prev, schedule=schedule)
    inputs["t_prev"] = inputs["t_prev"].clamp(min=-1) if torch.is_tensor(inputs["t_prev"]) else t_prev
    diff = ("x_t", "pred")
    kw = dict(prediction=prediction)
    if guidance is not None:
        inputs["uncond"] = torch.randn(shape, generator=g)
        kw["guidance_scale"] = guidance
        diff += ("uncond",)
    return ddim_step, inputs, diff, kw


def evaluate(case, backend, dtype=None, per_sample_dtype=None, **extra):
    """(output, {name: gradient}) of one case; the data inputs cast to dtype
    (per-sample tensors to per_sample_dtype, default dtype), the gradient
    taken against a ramp of output gradients (1 for a scalar loss)."""
    fn, inputs, diff, kw = case
    ins = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            to = per_sample_dtype if v.dim() == 1 and per_sample_dtype is not None else dtype
            v = v.detach().clone() if to is None else v.detach().to(to)
            if k in diff:
                v.requires_grad_()
        ins[k] = v
    out = fn(**ins, backend=backend, **{**kw, **extra})
    if out.dim():
        out.backward(torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view(out.shape))
    else:
        out.backward()
    return out.detach(), {k: ins[k].grad for k in diff}


def ddim_scale(case):
    """The size of a DDIM step's terms, |A|·|x_t| + |P|·|pred| (+ guidance):
    the cancellation between them is what float32 can resolve."""
    _, inp, _, kw = case
    t_prev = SCHEDULE.check_timesteps("t_prev", inp["t_prev"], inp["x_t"].shape[0], allow_clean=True)
    A, Bc, C = ops._ddim_coefficients(inp["schedule"], inp["t"], t_prev, kw["prediction"],
                                      kw.get("guidance_scale"))
    s = A.abs().max() * inp["x_t"].abs().max() + Bc.abs().max() * inp["pred"].abs().max()
    if C is not None:
        s = s + C.abs().max() * inp["uncond"].abs().max()
    return float(s)


def check_against_reference(case, backend, dtype=torch.float32, rtol=FP32, **extra):
    """The backend on dtype inputs against the reference in float64 on the same values."""
    got, got_g = evaluate(case, backend, dtype=dtype, per_sample_dtype=torch.float32, **extra)
    lowered, _ = evaluate(case, "torch", dtype=dtype, per_sample_dtype=torch.float32, **extra)
    fn, inputs, diff, kw = case
    exact = (fn, {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                      and v.dim() > 1 else v) for k, v in inputs.items()}, diff, kw)
    want, want_g = evaluate(exact, "torch", dtype=torch.float64, **extra)
    assert got.dtype == dtype and got.shape == want.shape
    scale = ddim_scale(case) if fn is ddim_step else None
    assert_close_rel(got, want, rtol, "value", scale)
    assert_close_rel(lowered, want, rtol, "value (reference)", scale)
    for k in diff:
        assert got_g[k].dtype == dtype and got_g[k].shape == inputs[k].shape
        assert_close_rel(got_g[k], want_g[k], rtol, f"grad {k}")


# ----------------------------------------------------------------- reference vs formulas
def test_reference_dmd_value_and_gradient_are_the_formula():
    fn, inp, _, _ = dmd_case((4, 3, 5), seed=1)
    x = inp["x"].double().requires_grad_()
    real, fake, w = inp["x0_real"].double(), inp["x0_fake"].double(), inp["weight"].double()
    norm = (x.detach() - real).abs().mean((1, 2), keepdim=True)
    g = (fake - real) / norm
    loss = dmd_loss(x, real, fake, weight=w, reduction="none", backend="torch")
    torch.testing.assert_close(loss, 0.5 * w * (g * g).mean((1, 2)), rtol=1e-12, atol=0)
    total = dmd_loss(x, real, fake, weight=w, reduction="sum", backend="torch")
    (grad,) = torch.autograd.grad(total, x)
    assert torch.equal(grad, w.view(-1, 1, 1) * g)  # exactly w·g
    torch.testing.assert_close(total, (0.5 * w.view(-1, 1, 1) * g * g).sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("prediction", ref.PREDICTIONS)
@pytest.mark.parametrize("weighting", ref.WEIGHTINGS)
def test_reference_denoising_formula_and_gradcheck(prediction, weighting):
    """The loss is w·(pred − target)² with the target of the parameterization;
    the non-uniform weightings are λ(SNR)·‖x̂0 − x0‖² in x0 space (x̂0 from
    pred at x_t = add_noise(x0, noise, t)); gradient 2·w·(pred − target)/n."""
    _, inp, _, kw = denoising_case((4, 2, 3), seed=2, prediction=prediction, weighting=weighting)
    pred, x0, noise = (inp[k].double() for k in ("pred", "x0", "noise"))
    t = inp["t"]
    t[1] = 3  # a high-SNR step too
    a, s = SCHEDULE.alpha(t, torch.float64).view(-1, 1, 1), SCHEDULE.sigma(t, torch.float64).view(-1, 1, 1)
    snr = SCHEDULE.snr(t, torch.float64)
    target = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[prediction]
    loss = lambda p, red="none": denoising_loss(p, x0, noise, t, SCHEDULE, reduction=red,  # noqa: E731
                                                backend="torch", **kw)
    got = loss(pred)
    if weighting == "uniform":
        torch.testing.assert_close(got, ((pred - target) ** 2).mean((1, 2)), rtol=1e-12, atol=0)
    else:
        lam = {"snr": snr, "min_snr": snr.clamp(max=5.0), "snr_trunc": snr.clamp(min=1.0)}[weighting]
        x_t = SCHEDULE.add_noise(x0, noise, t)
        x0_hat = ref.to_x0(x_t, pred, a, s, prediction)
        torch.testing.assert_close(got, lam * ((x0_hat - x0) ** 2).mean((1, 2)), rtol=1e-9, atol=0)
    w = ref.denoising_weight(snr, prediction, weighting).view(-1, 1, 1)
    p = pred.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(p).sum(), p)
    torch.testing.assert_close(grad, 2 * w * (pred - target) / 6, rtol=1e-12, atol=0)
    # (gradcheck away from t = T-1, where the 1/SNR weights of ~4e8 swamp its finite differences)
    t[0] = 700
    assert torch.autograd.gradcheck(lambda v: loss(v, "mean"), (p,))


@pytest.mark.parametrize("metric", ref.METRICS)
def test_reference_consistency_formula_and_gradcheck(metric):
    _, inp, _, _ = consistency_case((3, 2, 4), seed=3, metric=metric)
    pred, target, x_t = (inp[k].double() for k in ("pred", "target", "x_t"))
    cs, co, w = (inp[k].double() for k in ("c_skip", "c_out", "weight"))
    kw = dict(metric=metric, x_t=x_t, c_skip=cs, c_out=co, weight=w, backend="torch")
    f = cs.view(-1, 1, 1) * x_t + co.view(-1, 1, 1) * pred
    d2 = ((f - target) ** 2).sum((1, 2))
    got = consistency_loss(pred, target, reduction="none", **kw)
    if metric == "l2":
        want = w * d2 / 8
    else:
        c = 0.00054 * math.sqrt(8)
        want = w * (torch.sqrt(d2 + c * c) - c)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    p = pred.clone().requires_grad_()
    for red in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda v: consistency_loss(v, target, reduction=red, **kw), (p,))
    # the boundary condition: f(x, t = -1) = x (c_skip = 1, c_out = 0)
    cs1, co1 = SCHEDULE.consistency_scalings(torch.full((3,), -1))
    assert torch.equal(cs1, torch.ones(3)) and torch.equal(co1, torch.zeros(3))
    zero = consistency_loss(pred, x_t, metric=metric, x_t=x_t, c_skip=cs1.double(),
                            c_out=co1.double(), backend="torch")
    assert zero.item() == 0.0


@pytest.mark.parametrize("prediction", ref.PREDICTIONS)
@pytest.mark.parametrize("schedule", [SCHEDULE, LINEAR], ids=["cosine", "linear"])
def test_reference_ddim_with_the_exact_prediction_lands_on_the_schedule(prediction, schedule):
    g = _gen(4)
    x0, noise = torch.randn(4, 3, 5, dtype=torch.float64, generator=g), torch.randn(
        4, 3, 5, dtype=torch.float64, generator=g)
    t = torch.tensor([999, 600, 250, 1])
    x_t = schedule.add_noise(x0, noise, t)
    a, s = schedule.alpha(t, torch.float64).view(-1, 1, 1), schedule.sigma(t, torch.float64).view(-1, 1, 1)
    exact = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[prediction]
    clean = ddim_step(x_t, exact, t, -1, schedule, prediction=prediction, backend="torch")
    torch.testing.assert_close(clean, x0, rtol=1e-9, atol=1e-9)
    t_prev = torch.tensor([500, 599, 0, 0])
    step = ddim_step(x_t, exact, t, t_prev, schedule, prediction=prediction, backend="torch")
    torch.testing.assert_close(step, schedule.add_noise(x0, noise, t_prev), rtol=1e-9, atol=1e-9)
    # guidance with scale 1 is no guidance; any scale with uncond = pred too
    other = torch.randn(x0.shape, dtype=torch.float64, generator=g)
    for scale, uncond in ((1.0, other), (7.5, exact)):
        guided = ddim_step(x_t, exact, t, t_prev, schedule, prediction=prediction,
                           guidance_scale=scale, uncond=uncond, backend="torch")
        torch.testing.assert_close(guided, step, rtol=1e-9, atol=1e-9)  # 1/α ~ 2e4 at t = 999


@pytest.mark.parametrize("prediction", ref.PREDICTIONS)
def test_reference_ddim_gradcheck(prediction):
    _, inp, diff, kw = ddim_case((3, 4), seed=5, prediction=prediction, guidance=2.0)
    leaves = tuple(inp[k].double().requires_grad_() for k in diff)
    t = inp["t"].clone()
    t[0] = 500
    fn = lambda x, p, u: ddim_step(x, p, t, (t - 20).clamp(min=-1), SCHEDULE, uncond=u, backend="torch", **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


# ----------------------------------------------------------------- fused backends vs reference
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [True, False])
def test_dmd_matches_reference(backend, reduction, weighted):
    for i, shape in enumerate(SHAPES):
        check_against_reference(dmd_case(shape, i, weighted), backend, reduction=reduction)


def test_dmd_gradient_is_exactly_w_times_g_on_cpp():
    """The cpp gradient is w·g bit for bit, g computed as the reference does
    in float32 (|x − x0_real| on a grid of 1/8 so that every order of summing
    the normalizer gives the same float; B·n a power of 2, so "mean" is w·g
    scaled exactly)."""
    if "cpp" not in AVAILABLE:
        pytest.skip("cpp backend unavailable")
    g = _gen(6)
    shape = (4, 2, 4, 4)
    x = torch.randint(-16, 16, shape, generator=g).float() / 8
    real = torch.randint(-16, 16, shape, generator=g).float() / 8
    fake = torch.randn(shape, generator=g)
    w = torch.rand(4, generator=g) + 0.5
    norm = (x - real).abs().mean((1, 2, 3), keepdim=True).clamp_min(ref.DMD_EPS)
    wg = w.view(-1, 1, 1, 1) * ((fake - real) / norm)
    for reduction, divide in (("sum", 1), ("mean", x.numel()), ("none", x[0].numel())):
        leaf = x.clone().requires_grad_()
        out = dmd_loss(leaf, real, fake, weight=w, reduction=reduction, backend="cpp")
        (out.sum() if reduction == "none" else out).backward()
        assert torch.equal(leaf.grad, wg / divide), reduction
    leaf = x.clone().requires_grad_()
    dmd_loss(leaf, real, fake, reduction="sum", backend="cpp").backward()
    assert torch.equal(leaf.grad, (fake - real) / norm)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("prediction", ref.PREDICTIONS)
@pytest.mark.parametrize("weighting", ref.WEIGHTINGS)
def test_denoising_matches_reference(backend, prediction, weighting):
    for i, shape in enumerate(SHAPES):
        for reduction in REDUCTIONS:
            case = denoising_case(shape, i, prediction, weighting, LINEAR if i == 1 else SCHEDULE)
            check_against_reference(case, backend, reduction=reduction)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("metric", ref.METRICS)
@pytest.mark.parametrize("boundary", [True, False], ids=["boundary", "plain"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
def test_consistency_matches_reference(backend, metric, boundary, weighted):
    for i, shape in enumerate(SHAPES):
        for reduction in REDUCTIONS:
            check_against_reference(consistency_case(shape, i, metric, boundary, weighted), backend,
                                    reduction=reduction)


@pytest.mark.parametrize("backend", FUSED)
def test_pseudo_huber_at_small_distances_and_explicit_c(backend):
    """Distances far below c: √(D + c²) − c ≈ D / 2c, which the naive float32
    formula loses to cancellation; the kernels keep it (float64 reference)."""
    _, inp, diff, kw = consistency_case((3, 2, 5), seed=7, metric="pseudo_huber", boundary=False)
    inp["pred"] = inp["target"] + 1e-4 * inp["pred"]
    case = (consistency_loss, inp, diff, dict(kw, c=0.3))
    got, got_g = evaluate(case, backend, reduction="none")
    want, want_g = evaluate(case, "torch", dtype=torch.float64, reduction="none")
    assert_close_rel(got, want, 1e-4, "value")
    assert_close_rel(got_g["pred"], want_g["pred"], 1e-4, "grad")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("prediction", ref.PREDICTIONS)
@pytest.mark.parametrize("guidance", [None, 3.0, 1.0], ids=["plain", "cfg3", "cfg1"])
@pytest.mark.parametrize("t_prev", [None, -1], ids=["step", "clean"])
def test_ddim_matches_reference(backend, prediction, guidance, t_prev):
    for i, shape in enumerate(SHAPES):
        schedule = LINEAR if i == 1 else SCHEDULE
        check_against_reference(ddim_case(shape, i, prediction, guidance, t_prev, schedule), backend)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("prediction", ref.PREDICTIONS)
def test_ddim_fused_recovers_x0_and_guidance_one_is_none(backend, prediction):
    g = _gen(8)
    x0, noise = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    t = torch.tensor([800, 600, 400, 200, 10])
    x_t = SCHEDULE.add_noise(x0, noise, t)
    a, s = SCHEDULE.alpha(t).view(-1, 1, 1, 1), SCHEDULE.sigma(t).view(-1, 1, 1, 1)
    exact = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[prediction]
    clean = ddim_step(x_t, exact, t, -1, SCHEDULE, prediction=prediction, backend=backend)
    torch.testing.assert_close(clean, x0, rtol=1e-4, atol=1e-4)
    t_prev = t - 5
    step = ddim_step(x_t, exact, t, t_prev, SCHEDULE, prediction=prediction, backend=backend)
    torch.testing.assert_close(step, SCHEDULE.add_noise(x0, noise, t_prev), rtol=1e-4, atol=1e-4)
    guided = ddim_step(x_t, exact, t, t_prev, SCHEDULE, prediction=prediction, guidance_scale=1.0,
                       uncond=torch.randn(x0.shape, generator=g), backend=backend)
    torch.testing.assert_close(guided, step, rtol=1e-6, atol=1e-6)


def _all_cases(shape, seed=0):
    return {
        "dmd": dmd_case(shape, seed),
        "denoising_v_min_snr": denoising_case(shape, seed, "v", "min_snr"),
        "consistency_l2": consistency_case(shape, seed, "l2"),
        "consistency_huber": consistency_case(shape, seed, "pseudo_huber"),
        "ddim_x0_cfg": ddim_case(shape, seed, "x0", 2.5),
    }


CASE_NAMES = list(_all_cases((2, 2)))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs(backend, name, dtype):
    """bf16/fp16 read and written in their own dtype: the result and the
    gradients come back in it, within its rounding of the float64 reference."""
    case = _all_cases((3, 3, 7, 5), 9)[name]
    extra = {} if case[0] is ddim_step else dict(reduction="none")
    check_against_reference(case, backend, dtype=dtype, rtol=LOWP, **extra)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_noncontiguous_and_mixed_dtype_inputs(backend, name):
    fn, inp, diff, kw = _all_cases((5, 3, 7, 5), 10)[name]
    # every sample-shaped input a transposed view; the constants of another dtype
    strided = {k: (v.transpose(1, 3).contiguous().transpose(1, 3)
                   if isinstance(v, torch.Tensor) and v.dim() == 4 else v) for k, v in inp.items()}
    assert not any(v.is_contiguous() for v in strided.values()
                   if isinstance(v, torch.Tensor) and v.dim() == 4)
    case = (fn, strided, diff, kw)
    extra = {} if fn is ddim_step else dict(reduction="none")
    check_against_reference(case, backend, **extra)
    mixed = {k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.dim() == 4
                 and k not in diff else v) for k, v in strided.items()}
    got, got_g = evaluate((fn, mixed, diff, kw), backend, **extra)
    want, want_g = evaluate((fn, mixed, diff, kw), "torch", **extra)
    assert got.dtype == torch.float32
    assert_close_rel(got, want, FP32, "value", ddim_scale(case) if fn is ddim_step else None)
    for k in diff:
        assert_close_rel(got_g[k], want_g[k], FP32, f"grad {k}")


@pytest.mark.parametrize("name", CASE_NAMES)
def test_cpp_splits_large_samples_across_threads(name):
    """Few large samples are cut into parts that run in parallel (partial
    sums merged per sample between the passes): the same result."""
    if "cpp" not in AVAILABLE:
        pytest.skip("cpp backend unavailable")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for shape in ((1, 3, 100, 70), (2, 5, 4100)):  # 21000 and 20500 elements: 2 parts each
            case = _all_cases(shape, 11)[name]
            extra = {} if case[0] is ddim_step else dict(reduction="none")
            check_against_reference(case, "cpp", **extra)
            split, split_g = evaluate(case, "cpp", **extra)
            torch.set_num_threads(1)
            whole, whole_g = evaluate(case, "cpp", **extra)
            torch.set_num_threads(2)
            torch.testing.assert_close(split, whole, rtol=1e-6, atol=0)
            for k in whole_g:
                torch.testing.assert_close(split_g[k], whole_g[k], rtol=1e-6, atol=0)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_no_grad_and_scaled_backward(backend, name):
    """Evaluation (no gradient asked) gives the same value; a scaled loss
    scales the saved gradient; the fused result matches the torch one."""
    fn, inp, diff, kw = _all_cases((3, 2, 5), 12)[name]
    with torch.no_grad():
        got = fn(**inp, backend=backend, **kw)
    want = fn(**inp, backend="torch", **kw)
    assert_close_rel(got, want.detach(), FP32, "value", ddim_scale((fn, inp, diff, kw))
                     if fn is ddim_step else None)
    grads = []
    for be in (backend, "torch"):
        leaves = {k: inp[k].clone().requires_grad_() for k in diff}
        out = fn(**{**inp, **leaves}, backend=be, **kw)
        (3.0 * out.sum()).backward()
        grads.append(leaves)
    for k in diff:
        assert_close_rel(grads[0][k].grad, grads[1][k].grad, FP32, f"grad {k}")


def hvp(loss_fn, x, v):
    """∂/∂x ⟨∇(loss + 0.01‖x‖²), v⟩ (as tests/test_double_backward.py)."""
    x = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(loss_fn(x) + 0.01 * (x ** 2).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad((g * v.to(x.dtype)).sum(), x)
    return h


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_is_the_reference(backend, name, reduction):
    """create_graph through a fused op: the gradient recomputed from the
    reference (losses) or the linear coefficients (ddim), so Hessian-vector
    products equal the float64 reference's."""
    fn, inp, diff, kw = _all_cases((3, 2, 5), 13)[name]
    first = diff[-1]  # pred, or x (dmd), or uncond (ddim with guidance)
    v = torch.randn(inp[first].shape, generator=_gen(14))
    red = dict(reduction=reduction) if fn is not ddim_step else {}
    square = fn is ddim_step or reduction == "none"

    def probe(dtype, backend):
        others = {k: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
                  for k, t in inp.items() if k != first}

        def loss(x):
            out = fn(**others, **{first: x}, backend=backend, **kw, **red)
            return (out ** 2).sum() if square else out
        return hvp(loss, inp[first].to(dtype), v)

    want = probe(torch.float64, "torch")
    got = probe(torch.float32, backend)
    assert_close_rel(got, want, 1e-5, "hvp")


# ----------------------------------------------------------------- non-finite inputs
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("where", ["first", "constant"])
def test_nan_propagates(backend, name, where):
    fn, inp, diff, kw = _all_cases((3, 2, 5), 15)[name]
    constants = [k for k, v in inp.items() if isinstance(v, torch.Tensor) and v.dim() > 1
                 and k not in diff]
    if where == "constant" and not constants:
        pytest.skip("ddim_step has no constant inputs")
    key = diff[0] if where == "first" else constants[0]
    bad = inp[key].clone()
    bad[1, 1, 2] = float("nan")
    inp = dict(inp, **{key: bad})
    extra = {} if fn is ddim_step else dict(reduction="none")
    with torch.no_grad():
        out = fn(**inp, backend=backend, **kw, **extra)
        total = out if fn is ddim_step else fn(**inp, backend=backend, **kw)
    per_sample = out.isnan().flatten(1).any(1) if out.dim() > 1 else out.isnan()
    assert per_sample.tolist() == [False, True, False], per_sample  # the sample with the NaN only
    assert total.isnan().any()


@pytest.mark.parametrize("backend", FUSED)
def test_dmd_infinite_x_is_nan_like_the_reference(backend):
    """The reference's ½ g·wg + (x − sg(x))·wg is NaN where x is ±inf (g is 0
    there: the normalizer is inf); the kernels give the same NaN."""
    _, inp, _, _ = dmd_case((3, 2, 5), 16)
    inp["x"] = inp["x"].clone()
    inp["x"][2, 0, 0] = float("inf")
    for red in REDUCTIONS:
        got = dmd_loss(**inp, reduction=red, backend=backend)
        want = dmd_loss(**inp, reduction=red, backend="torch")
        torch.testing.assert_close(got, want, equal_nan=True, rtol=FP32, atol=1e-6)
    leaf = inp["x"].clone().requires_grad_()
    dmd_loss(**dict(inp, x=leaf), reduction="sum", backend=backend).backward()
    assert (leaf.grad[2] == 0).all() and leaf.grad[:2].isfinite().all()


# ----------------------------------------------------------------- dispatch and bad input
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_float64_runs_on_torch_only(backend, name):
    fn, inp, diff, kw = _all_cases((3, 2, 5), 17)[name]
    double = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in inp.items()}
    with pytest.raises(TypeError, match="float64 runs on backend='torch'"):
        fn(**double, backend=backend, **kw)
    auto = fn(**double, backend="auto", **kw)
    assert auto.dtype == torch.float64
    torch.testing.assert_close(auto, fn(**double, backend="torch", **kw), rtol=0, atol=0)


def _bad_calls():
    x = torch.randn(3, 2, 4)
    w = torch.rand(3)
    t = torch.tensor([1, 2, 3])
    S = SCHEDULE
    leaf = torch.randn(3, 2, 4, requires_grad=True)
    return [
        (lambda: dmd_loss(x.int(), x, x), TypeError, "x must be a floating tensor"),
        (lambda: dmd_loss(torch.randn(3), torch.randn(3), torch.randn(3)), ValueError, "x must be a batch"),
        (lambda: dmd_loss(torch.randn(0, 4), torch.randn(0, 4), torch.randn(0, 4)), ValueError, "B ≥ 1"),
        (lambda: dmd_loss(x, x[:2], x), ValueError, "x0_real .* must have x's shape"),
        (lambda: dmd_loss(x, x, x.transpose(1, 2)), ValueError, "x0_fake"),
        (lambda: dmd_loss(x, x, x, weight=torch.rand(4)), ValueError, r"weight must have shape \(3,\)"),
        (lambda: dmd_loss(x, x, x, weight=torch.rand(3, 1)), ValueError, "weight"),
        (lambda: dmd_loss(x, x, x, reduction="avg"), ValueError, "reduction must be one of"),
        (lambda: dmd_loss(x, x, x, backend="gpu"), ValueError, "backend must be one of"),
        (lambda: dmd_loss(x, leaf, x), ValueError, r"x0_real requires grad.*x0_real\.detach\(\)"),
        (lambda: dmd_loss(x, x, leaf), ValueError, r"x0_fake\.detach\(\)"),
        (lambda: dmd_loss(x, x, x, weight=w.requires_grad_()), ValueError, r"weight\.detach\(\)"),
        (lambda: denoising_loss(x, x, x, t, "cosine"), TypeError, "schedule must be a NoiseSchedule"),
        (lambda: denoising_loss(x, x, x, t, S, prediction="score"), ValueError, "prediction must be one of"),
        (lambda: denoising_loss(x, x, x, t, S, weighting="p2"), ValueError, "weighting must be one of"),
        (lambda: denoising_loss(x, x, x, t, S, min_snr_gamma=0.0), ValueError, "min_snr_gamma"),
        (lambda: denoising_loss(x, x, x, 1000, S), ValueError, r"t must be in \[0, 1000\)"),
        (lambda: denoising_loss(x, x, x, -1, S), ValueError, "t must be"),
        (lambda: denoising_loss(x, x, x, t.float(), S), TypeError, "t must hold integer"),
        (lambda: denoising_loss(x, x, x, t[:2], S), ValueError, r"t must have shape \(3,\)"),
        (lambda: denoising_loss(x, x[:, :1], x, t, S), ValueError, "x0 .* must have pred's shape"),
        (lambda: denoising_loss(x, x, leaf, t, S), ValueError, r"noise\.detach\(\)"),
        (lambda: denoising_loss(x, leaf, x, t, S), ValueError, r"x0\.detach\(\)"),
        (lambda: consistency_loss(x, x, metric="l1"), ValueError, "metric must be one of"),
        (lambda: consistency_loss(x, x, metric="pseudo_huber", c=0.0), ValueError, "c must be in"),
        (lambda: consistency_loss(x, x, metric="pseudo_huber", c=float("inf")), ValueError, "c must be in"),
        (lambda: consistency_loss(x, x, c=0.1), ValueError, "c is only used by metric='pseudo_huber'"),
        (lambda: consistency_loss(x, x, x_t=x, c_skip=w), ValueError, "x_t, c_skip and c_out go together"),
        (lambda: consistency_loss(x, x, c_skip=w, c_out=w), ValueError, "go together"),
        (lambda: consistency_loss(x, x, x_t=x[:1], c_skip=w, c_out=w), ValueError, "x_t"),
        (lambda: consistency_loss(x, x, x_t=x, c_skip=w[:2], c_out=w), ValueError, "c_skip must have shape"),
        (lambda: consistency_loss(x, x, x_t=x, c_skip=w.detach(), c_out=torch.ones(3, requires_grad=True)),
         ValueError, r"c_out\.detach\(\)"),
        (lambda: consistency_loss(x, leaf), ValueError, r"target\.detach\(\)"),
        (lambda: consistency_loss(x, x, x_t=leaf, c_skip=w.detach(), c_out=w.detach()), ValueError,
         r"x_t\.detach\(\)"),
        (lambda: consistency_loss(x, x, weight=torch.ones(3, dtype=torch.int64)), TypeError, "weight must be a floating"),
        (lambda: ddim_step(x, x, t, t - 1, S, guidance_scale=2.0), ValueError, "guidance_scale and uncond go together"),
        (lambda: ddim_step(x, x, t, t - 1, S, uncond=x), ValueError, "guidance_scale and uncond"),
        (lambda: ddim_step(x, x, t, t - 1, S, guidance_scale=float("nan"), uncond=x), ValueError, "guidance_scale"),
        (lambda: ddim_step(x, x, t, t - 1, S, guidance_scale=2.0, uncond=x[:, :1]), ValueError, "uncond"),
        (lambda: ddim_step(x, x[0:1], t, t - 1, S), ValueError, "pred .* must have x_t's shape"),
        (lambda: ddim_step(x, x, t, -2, S), ValueError, r"t_prev must be -1 \(clean\) or in"),
        (lambda: ddim_step(x, x, -1, -1, S), ValueError, "t must be in"),
        (lambda: ddim_step(x, x, t, t - 1, S, prediction="sample"), ValueError, "prediction must be one of"),
        (lambda: ddim_step(x, x, t, t - 1, S, backend="nope"), ValueError, "backend"),
        # timesteps beyond int64 (python ints, uint64 tensors) are range errors, not overflows
        (lambda: denoising_loss(x, x, x, 2**70, S), ValueError,
         r"t must be in \[0, 1000\), got 1180591620717411303424"),
        (lambda: denoising_loss(x, x, x, -2**70, S), ValueError, r"t must be in \[0, 1000\)"),
        (lambda: denoising_loss(x, x, x, torch.full((3,), 2**63 + 5, dtype=torch.uint64), S),
         ValueError, "t must be in .*uint64 values of 2\\*\\*63"),
        (lambda: ddim_step(x, x, 2**70, 0, S), ValueError, r"t must be in \[0, 1000\), got 1180"),
        (lambda: ddim_step(x, x, 5, -2**70, S), ValueError, r"t_prev must be -1 \(clean\) or in"),
        (lambda: ddim_step(x, x, 5, 2**64, S), ValueError, r"t_prev must be .*got 18446744073709551616"),
        (lambda: ddim_step(x, x, 5.0, 4, S), TypeError, "t must be an int or an integer tensor"),
        (lambda: S.add_noise(x, x, 2**70), ValueError, r"t must be in \[0, 1000\)"),
        (lambda: S.consistency_scalings(torch.tensor([3, 1000])), ValueError,
         r"t must be -1 \(clean\) or in \[0, 1000\)"),
        (lambda: S.consistency_scalings(torch.tensor([2.5])), TypeError, "t must hold integer"),
        (lambda: S.consistency_scalings(2**70), ValueError, "t must be -1"),
        (lambda: S.consistency_scalings(t, sigma_data=0.0), ValueError, "sigma_data"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_names_the_argument(i):
    call, exc, match = _bad_calls()[i]
    with pytest.raises(exc, match=match):
        call()


def test_constants_may_require_grad_without_grad_mode():
    x, real = torch.randn(3, 4), torch.randn(3, 4, requires_grad=True)
    with torch.no_grad():
        for backend in AVAILABLE:
            dmd_loss(x, real, torch.randn(3, 4), backend=backend)


@pytest.mark.parametrize("schedule", [SCHEDULE, LINEAR], ids=["cosine", "linear"])
def test_coefficient_tables_are_the_schedule_bit_for_bit(schedule):
    t = torch.arange(-1, 1000)
    for what in ("alpha", "sigma", "snr"):
        assert torch.equal(ops._coefficient(schedule, what, torch.device("cpu"))[t + 1],
                           getattr(schedule, what)(t))
        assert ops._coefficient(schedule, what, torch.device("cpu"), as_list=True) == \
            getattr(schedule, what)(t).tolist()
    snr = schedule.snr(t[1:])
    for prediction in ref.PREDICTIONS:
        for weighting in ref.WEIGHTINGS:
            table = ops._denoising_weights(schedule, prediction, weighting, 3.0, torch.device("cpu"))
            assert torch.equal(table[t[1:] + 1], ref.denoising_weight(snr, prediction, weighting, 3.0))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("prediction", ref.PREDICTIONS)
def test_ddim_int_timesteps_equal_tensor_timesteps(backend, prediction):
    """A sampler's ints (coefficients composed once in Python floats) give the
    same step, bit for bit, as the same timesteps as tensors."""
    _, inp, _, _ = ddim_case((3, 2, 5), 18, guidance=2.0)
    for t, t_prev in ((999, 950), (400, -1), (3, 0)):
        kw = dict(prediction=prediction, guidance_scale=2.0, uncond=inp["uncond"], backend=backend)
        as_int = ddim_step(inp["x_t"], inp["pred"], t, t_prev, SCHEDULE, **kw)
        as_tensor = ddim_step(inp["x_t"], inp["pred"], torch.full((3,), t), torch.tensor(t_prev),
                              SCHEDULE, **kw)
        assert torch.equal(as_int, as_tensor)


@pytest.mark.parametrize("backend", ["torch"] + [b for b in FUSED if b.values[0] == "cpp"])
def test_fullgraph_compile_of_a_step(backend):
    """A step through all four ops compiles with fullgraph=True (cpp: the
    registered ops' Meta kernels; the timestep checks skip their host read
    under compile) and matches eager, value and gradient."""
    g = _gen(50)
    x0 = torch.randn(4, 3, 8, 8, generator=g)
    real, fake, noise = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([10, 500, 900, 999])
    c_skip, c_out = SCHEDULE.consistency_scalings(t - 1)

    def step(x):
        return (dmd_loss(x, real, fake, backend=backend)
                + denoising_loss(x, real, noise, t, SCHEDULE, weighting="min_snr", backend=backend)
                + consistency_loss(x, real, x_t=noise, c_skip=c_skip, c_out=c_out,
                                   metric="pseudo_huber", backend=backend)
                + ddim_step(noise, x, t, (t - 20).clamp(min=-1), SCHEDULE, backend=backend).sum())

    outs = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        x = x0.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        outs.append((loss.detach(), x.grad))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_timesteps_of_every_integer_kind_agree():
    """python and numpy ints and integer tensors of any integer dtype give the same
    timesteps (the range is checked on the value, before any wrap)."""
    np = pytest.importorskip("numpy")
    x = torch.randn(3, 4)
    want = denoising_loss(x, x * 0.5, x * 0.25, 7, SCHEDULE)
    for t in (np.int64(7), torch.tensor(7), torch.full((3,), 7, dtype=torch.uint8),
              torch.full((3,), 7, dtype=torch.uint64), torch.full((3,), 7, dtype=torch.int16)):
        torch.testing.assert_close(denoising_loss(x, x * 0.5, x * 0.25, t, SCHEDULE), want)
    c_skip, c_out = SCHEDULE.consistency_scalings(torch.tensor([[-1, 7]]))
    assert c_skip.shape == (1, 2) and c_skip[0, 0] == 1 and c_out[0, 0] == 0
