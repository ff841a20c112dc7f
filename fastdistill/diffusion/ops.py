"""The fused diffusion-distillation ops: ``dmd_loss``, ``denoising_loss``,
``consistency_loss`` and ``ddim_step``.

Each checks its arguments once, then runs on the backend ``resolve`` picks:
"torch" is the reference (``fastdistill/reference/diffusion.py``, the spec,
with autograd), "cpp" the CPU kernels (``csrc/diffusion/diffusion_cpu.cpp``),
"triton" the Triton kernels (``kernels/diffusion.py``). The fused losses make
one pass over the data per sample (two for DMD's normalizer and the
pseudo-Huber norm) and compute the gradient in that pass: no autograd graph
and no temporaries of the batch's size besides the gradient itself; backward
only scales it. Differentiated twice (``create_graph=True``), backward
recomputes the gradient from the reference with autograd, so higher-order
gradients are exact. ``ddim_step`` is linear in x_t, pred and uncond with
per-sample coefficients; its backward applies them.

Inputs may be float32, bfloat16 or float16 (float64 runs on "torch" only);
arithmetic is float32, results and gradients come back in the input's dtype.
"""
from __future__ import annotations

import math
import weakref

import torch

from .. import _checks
from .._backend import resolve
from ..kd.options import scaled_gradient
from ..reference import diffusion as ref
from .schedule import NoiseSchedule

PREDICTIONS = ref.PREDICTIONS
WEIGHTINGS = ref.WEIGHTINGS
METRICS = ref.METRICS
REDUCTIONS = ref.REDUCTIONS


# ------------------------------------------------------------------ argument checks
def _samples(name: str, x) -> torch.Tensor:
    """A floating batch (B, ...) of B ≥ 1 non-empty samples, at least 2-D."""
    _checks.tensor(name, x, floating=True)
    if x.dim() < 2 or x.shape[0] < 1 or x.numel() == 0:
        raise ValueError(f"{name} must be a batch of samples (B, ...) with B ≥ 1, at least 2 "
                         f"dimensions and non-empty samples, got shape {tuple(x.shape)}")
    return x


def _like(name: str, y, like_name: str, x: torch.Tensor) -> torch.Tensor:
    _checks.tensor(name, y, floating=True)
    if y.shape != x.shape:
        raise ValueError(f"{name} {tuple(y.shape)} must have {like_name}'s shape {tuple(x.shape)}")
    return y


def _per_sample(name: str, v, batch: int):
    """None, or a floating tensor of shape (batch,): one value per sample."""
    if v is None:
        return None
    _checks.tensor(name, v, floating=True)
    if tuple(v.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one value per sample), got "
                         f"{tuple(v.shape)}")
    return v


def _constants(op: str, **tensors) -> None:
    """The op's constant inputs get no gradient: one that requires it is an error."""
    if not torch.is_grad_enabled():
        return
    for name, v in tensors.items():
        if v is not None and v.requires_grad:
            raise ValueError(f"{name} requires grad, but it is a constant of {op} (it gets no "
                             f"gradient): pass {name}.detach()")


def _schedule(schedule) -> NoiseSchedule:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    return schedule


def _dtype(*tensors) -> torch.dtype:
    """float64 when any input is (it runs on "torch"), else the first input's dtype."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return tensors[0].dtype


def _backend_for(backend, x: torch.Tensor, *tensors) -> str:
    """The backend of one call; "torch" for the reference ("cuda": this family's
    GPU path is triton). A fused backend asked for float64 is a TypeError."""
    name = resolve(backend, x.device, _dtype(x, *tensors))
    if name in ("torch", "cuda"):
        return "torch"
    if _dtype(x, *tensors) == torch.float64:
        raise TypeError(f"backend={name!r} takes float32, bfloat16 or float16 tensors; float64 "
                        "runs on backend='torch'")
    return name


def _kernels(name: str):
    if name == "cpp":
        return torch.ops.fastdistill
    from ..kernels import diffusion

    return diffusion


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _c(t):
    """A tensor as the kernels read it: contiguous (a copy only if it is not)."""
    return None if t is None else t.contiguous()


def _f32(v):
    """Per-sample coefficients as the kernels read them: contiguous float32 (B,)."""
    return None if v is None else v.detach().to(torch.float32).contiguous()


# ------------------------------------------------------------------ schedule tables
# The fused paths look coefficients up in float32 tables of every timestep
# (index t + 1: the clean end t = -1 first), computed once per schedule and
# device by the schedule's own methods, so the values are those of
# ``schedule.alpha(t)`` etc. bit for bit, at one index op per call.
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _table(schedule: NoiseSchedule, key, build):
    per = _TABLES.setdefault(schedule, {})
    entry = per.get(key)
    if entry is None or entry[0] is not schedule.alphas_cumprod:  # rebuilt if the schedule changed
        entry = (schedule.alphas_cumprod, build())
        per[key] = entry
    return entry[1]


def _all_timesteps(schedule: NoiseSchedule) -> torch.Tensor:
    return torch.arange(-1, schedule.num_steps, dtype=torch.int64)


def _coefficient(schedule: NoiseSchedule, what: str, device: torch.device, as_list: bool = False):
    """α ("alpha"), σ ("sigma") or SNR ("snr") of every timestep, float32 (T + 1,)
    on ``device`` (or as a list of Python floats)."""
    cpu = torch.device("cpu")
    if as_list:
        return _table(schedule, (what, "list"), lambda: _coefficient(schedule, what, cpu).tolist())
    if device != cpu:
        return _table(schedule, (what, device), lambda: _coefficient(schedule, what, cpu).to(device))
    return _table(schedule, (what, cpu), lambda: getattr(schedule, what)(_all_timesteps(schedule)))


def _denoising_weights(schedule, prediction, weighting, gamma, device) -> torch.Tensor:
    """``reference.diffusion.denoising_weight`` of every timestep, float32 (T + 1,)."""
    key = ("weight", prediction, weighting, gamma, device)
    return _table(schedule, key, lambda: ref.denoising_weight(
        _coefficient(schedule, "snr", torch.device("cpu")), prediction, weighting,
        gamma).to(torch.float32).to(device))


# ------------------------------------------------------------------ reductions
def _grad_scale(reduction: str, batch: int, elements: int, elementwise: bool = True) -> float:
    """What the kernels scale the gradient of each sample's value by: the
    reference's rule (element-wise losses: a sample's value is the mean over
    its elements; pseudo-Huber: its norm)."""
    if reduction == "sum":
        return 1.0
    if elementwise:
        return 1.0 / (batch * elements) if reduction == "mean" else 1.0 / elements
    return 1.0 / batch if reduction == "mean" else 1.0


def _reduce(values: torch.Tensor, reduction: str, elements: int, dtype: torch.dtype,
            elementwise: bool = True) -> torch.Tensor:
    """The loss from the kernels' per-sample values (float32 (B,): each
    sample's sum over its elements, or the pseudo-Huber value)."""
    if reduction == "sum":
        out = values.sum()
    elif reduction == "mean":
        out = values.sum() / (values.numel() * elements) if elementwise else values.mean()
    else:
        out = values / elements if elementwise else values
    return out.to(dtype)


class _FusedLoss(torch.autograd.Function):
    """A fused loss: ``run()`` gives (loss, gradient w.r.t. ``x`` at grad_out = 1);
    backward scales the saved gradient by grad_out. Differentiated twice,
    backward recomputes the gradient from ``reference(x)`` (the reduced
    reference loss) with autograd. Only ``x`` is saved (by reference, no copy)."""

    @staticmethod
    def forward(ctx, x, run, reduction, reference):
        out, grad = run()
        ctx.save_for_backward(grad, x)
        ctx.reduction, ctx.reference = reduction, reference
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad, x = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the reference's differentiable gradient
            with torch.enable_grad():
                out = ctx.reference(x)
            (g,) = torch.autograd.grad(out, x, grad_out, create_graph=True)
            return g, None, None, None
        flat = scaled_gradient(grad.view(grad.shape[0], -1), grad_out, ctx.reduction, False)
        return flat.view(grad.shape), None, None, None


def _fused_loss(x, need_grad: bool, run, reduction: str, reference) -> torch.Tensor:
    if not need_grad:  # evaluation: no gradient computed or written
        return run()[0]
    return _FusedLoss.apply(x, run, reduction, reference)


# ------------------------------------------------------------------ DMD
def dmd_loss(x, x0_real, x0_fake, *, weight=None, reduction="mean", backend="auto"):
    """DMD/DMD2's distribution-matching loss of generated samples ``x`` (B, ...).

    ``x0_real`` / ``x0_fake``: the real (teacher) and fake-score denoisers'
    estimates of x0 at a noised copy of ``x``, constants. Per sample
    g = (x0_fake − x0_real) / max(mean|x − x0_real|, 1e-8) and the loss is
    ½‖x − sg(x − g)‖²: value ½ w Σ g² (times ``weight`` w (B,), a constant),
    gradient w.r.t. ``x`` exactly w·g (reduction="sum"; "mean" divides by the
    number of elements, "none" by each sample's). Only ``x`` gets a gradient.
    """
    x = _samples("x", x)
    _like("x0_real", x0_real, "x", x)
    _like("x0_fake", x0_fake, "x", x)
    weight = _per_sample("weight", weight, x.shape[0])
    _checks.same_device(x=x, x0_real=x0_real, x0_fake=x0_fake, weight=weight)
    _checks.choice("reduction", reduction, REDUCTIONS)
    _constants("dmd_loss", x0_real=x0_real, x0_fake=x0_fake, weight=weight)
    reference = lambda v: ref.dmd_loss(v, x0_real, x0_fake, weight=weight,  # noqa: E731
                                       reduction=reduction)
    name = _backend_for(backend, x, x0_real, x0_fake)
    if name == "torch":
        return reference(x)
    B, n = x.shape[0], math.prod(x.shape[1:])
    need = torch.is_grad_enabled() and x.requires_grad
    args = (_c(x), _c(x0_real), _c(x0_fake), _f32(weight), _grad_scale(reduction, B, n),
            ref.DMD_EPS, need)

    def run():
        values, grad = _kernels(name).dmd_forward(*args)
        return _reduce(values, reduction, n, x.dtype), grad

    return _fused_loss(x, need, run, reduction, reference)


# ------------------------------------------------------------------ denoising
def denoising_loss(pred, x0, noise, t, schedule, *, prediction="eps", weighting="uniform",
                   min_snr_gamma=5.0, reduction="mean", backend="auto"):
    """Weighted MSE of a denoiser's output ``pred`` at x_t = α_t x0 + σ_t ε
    (``schedule.add_noise(x0, noise, t)``) against its target: ε ("eps"), x0
    ("x0") or α ε − σ x0 ("v"). ``weighting``: "uniform" (the plain loss of
    each parameterization), "snr", "min_snr" (min(SNR, ``min_snr_gamma``)) or
    "snr_trunc" (max(SNR, 1)): a weight λ(SNR) on the x0-space error carried
    over exactly into the prediction's space (``reference.diffusion.denoising_weight``).
    ``t``: an int or integer tensor () or (B,) in [0, T). Only ``pred`` gets a
    gradient (x0 and noise are constants)."""
    pred = _samples("pred", pred)
    _like("x0", x0, "pred", pred)
    _like("noise", noise, "pred", pred)
    _checks.same_device(pred=pred, x0=x0, noise=noise)
    schedule = _schedule(schedule)
    _checks.choice("prediction", prediction, PREDICTIONS)
    _checks.choice("weighting", weighting, WEIGHTINGS)
    gamma = _checks.real("min_snr_gamma", min_snr_gamma, low=0.0, low_open=True)
    _checks.choice("reduction", reduction, REDUCTIONS)
    B, n = pred.shape[0], math.prod(pred.shape[1:])
    t = schedule.check_timesteps("t", t, B).to(pred.device)
    _constants("denoising_loss", x0=x0, noise=noise)
    name = _backend_for(backend, pred, x0, noise)
    if name == "torch":
        acc = _acc(pred)
        return ref.denoising_loss(pred, x0, noise, schedule.alpha(t, acc), schedule.sigma(t, acc),
                                  schedule.snr(t, acc), prediction=prediction,
                                  weighting=weighting, gamma=gamma, reduction=reduction)
    i = t + 1
    alpha, sigma, snr = (_coefficient(schedule, k, pred.device)[i] for k in ("alpha", "sigma", "snr"))
    w = _denoising_weights(schedule, prediction, weighting, gamma, pred.device)[i]
    reference = lambda v: ref.denoising_loss(  # noqa: E731
        v, x0, noise, alpha, sigma, snr, prediction=prediction, weighting=weighting, gamma=gamma,
        reduction=reduction)
    need = torch.is_grad_enabled() and pred.requires_grad
    args = (_c(pred), None if prediction == "eps" else _c(x0),
            None if prediction == "x0" else _c(noise), alpha, sigma, w,
            PREDICTIONS.index(prediction), _grad_scale(reduction, B, n), need)

    def run():
        values, grad = _kernels(name).denoising_forward(*args)
        return _reduce(values, reduction, n, pred.dtype), grad

    return _fused_loss(pred, need, run, reduction, reference)


# ------------------------------------------------------------------ consistency
def consistency_loss(pred, target, *, metric="l2", c=None, x_t=None, c_skip=None, c_out=None,
                     weight=None, reduction="mean", backend="auto"):
    """Distance of a consistency model's output to its (constant) ``target``.

    With ``x_t``, ``c_skip``, ``c_out`` (all three, e.g. from
    ``NoiseSchedule.consistency_scalings``) the output is the boundary form
    f = c_skip·x_t + c_out·pred (pred: the network's x̂0), else f = pred.
    ``metric``: "l2" (mean over elements of (f − target)²) or "pseudo_huber"
    (√(‖f − target‖² + c²) − c per sample; ``c`` > 0, default
    0.00054·√(elements per sample)). Times ``weight`` (B,) per sample.
    Only ``pred`` gets a gradient: target, c_skip, c_out and weight are
    constants, and x_t is taken as one (as in the reference, it gets none).
    """
    pred = _samples("pred", pred)
    _like("target", target, "pred", pred)
    _checks.choice("metric", metric, METRICS)
    if c is not None:
        if metric != "pseudo_huber":
            raise ValueError(f"c is only used by metric='pseudo_huber', got metric={metric!r}")
        c = _checks.real("c", c, low=0.0, low_open=True)
    given = [v is not None for v in (x_t, c_skip, c_out)]
    if any(given) and not all(given):
        raise ValueError("x_t, c_skip and c_out go together (the boundary form "
                         "f = c_skip·x_t + c_out·pred): pass all three or none")
    B, n = pred.shape[0], math.prod(pred.shape[1:])
    if x_t is not None:
        _like("x_t", x_t, "pred", pred)
    c_skip = _per_sample("c_skip", c_skip, B)
    c_out = _per_sample("c_out", c_out, B)
    weight = _per_sample("weight", weight, B)
    _checks.same_device(pred=pred, target=target, x_t=x_t, c_skip=c_skip, c_out=c_out,
                        weight=weight)
    _checks.choice("reduction", reduction, REDUCTIONS)
    _constants("consistency_loss", target=target, x_t=x_t, c_skip=c_skip, c_out=c_out,
               weight=weight)
    reference = lambda v: ref.consistency_loss(  # noqa: E731
        v, target, metric=metric, c=c, x_t=x_t, c_skip=c_skip, c_out=c_out, weight=weight,
        reduction=reduction)
    name = _backend_for(backend, pred, target, x_t)
    if name == "torch":
        return reference(pred)
    l2 = metric == "l2"
    need = torch.is_grad_enabled() and pred.requires_grad
    args = (_c(pred), _c(target), None if x_t is None else _c(x_t.detach()), _f32(c_skip),
            _f32(c_out), _f32(weight), METRICS.index(metric),
            0.0 if l2 else (ref.pseudo_huber_c(n) if c is None else c),
            _grad_scale(reduction, B, n, elementwise=l2), need)

    def run():
        values, grad = _kernels(name).consistency_forward(*args)
        return _reduce(values, reduction, n, pred.dtype, elementwise=l2), grad

    return _fused_loss(pred, need, run, reduction, reference)


# ------------------------------------------------------------------ DDIM
def _ddim_combination(a, s, ap, sp, prediction, guidance_scale):
    """x_prev = A·x_t + P·p (p the guided output) from α, σ at t and t_prev
    (floats or float64 tensors); with guidance p = s·pred + (1 − s)·uncond,
    so the coefficients are (A, s·P, (1 − s)·P), else (A, P, None)."""
    if prediction == "eps":  # x̂0 = (x_t − σ p)/α, ε̂ = p
        A, P = ap / a, sp - ap * s / a
    elif prediction == "x0":  # x̂0 = p, ε̂ = (x_t − α p)/σ
        A, P = sp / s, ap - sp * a / s
    else:  # v: x̂0 = α x_t − σ p, ε̂ = σ x_t + α p
        A, P = ap * a + sp * s, sp * a - ap * s
    if guidance_scale is None:
        return A, P, None
    return A, guidance_scale * P, (1.0 - guidance_scale) * P


def _ddim_coefficients(schedule, t, t_prev, prediction, guidance_scale, batch=None, device=None):
    """The per-sample coefficients of a DDIM step, float32 (B,) each (the
    third None without guidance), composed in float64 from the same float32
    α, σ the reference sees. ``t`` / ``t_prev``: int64 (B,) tensors, or ints
    (one pair for the whole ``batch``: composed once, in Python floats)."""
    if isinstance(t, int) and isinstance(t_prev, int):
        a, s = (_coefficient(schedule, k, torch.device("cpu"), as_list=True) for k in ("alpha", "sigma"))
        coefs = _ddim_combination(a[t + 1], s[t + 1], a[t_prev + 1], s[t_prev + 1], prediction,
                                  guidance_scale)
        return tuple(None if c is None else torch.full((batch,), c, dtype=torch.float32, device=device)
                     for c in coefs)
    alpha, sigma = (_coefficient(schedule, k, t.device).double() for k in ("alpha", "sigma"))
    coefs = _ddim_combination(alpha[t + 1], sigma[t + 1], alpha[t_prev + 1], sigma[t_prev + 1],
                              prediction, guidance_scale)
    return tuple(None if c is None else c.float() for c in coefs)


class _FusedDDIM(torch.autograd.Function):
    """DDIM's step, linear in (x_t, pred, uncond) with per-sample coefficients
    (A, B, C): backward gives A·g, B·g, C·g (each in its input's dtype), with
    torch ops (exact, and differentiable in g) when differentiated twice."""

    @staticmethod
    def forward(ctx, x_t, pred, uncond, name, coefs):
        A, Bc, C = coefs
        ctx.name, ctx.coefs = name, coefs
        ctx.dtypes = (x_t.dtype, pred.dtype, None if uncond is None else uncond.dtype)
        return _kernels(name).ddim_affine(_c(x_t), A, _c(pred), Bc, _c(uncond), C, x_t.dtype)

    @staticmethod
    def backward(ctx, g):
        out = []
        for need, coef, dtype in zip(ctx.needs_input_grad[:3], ctx.coefs, ctx.dtypes):
            if not need or coef is None:
                out.append(None)
            elif torch.is_grad_enabled():  # create_graph
                shape = (-1,) + (1,) * (g.dim() - 1)
                out.append((g.to(torch.float32) * coef.view(shape)).to(dtype))
            else:
                out.append(_kernels(ctx.name).ddim_affine(g.contiguous(), coef, None, None, None,
                                                          None, dtype))
        return out[0], out[1], out[2], None, None


def ddim_step(x_t, pred, t, t_prev, schedule, *, prediction="eps", guidance_scale=None,
              uncond=None, backend="auto"):
    """One deterministic DDIM step (η = 0) from timestep ``t`` to ``t_prev``.

    ``pred``: the network's output at x_t under ``prediction`` ("eps", "x0",
    "v"). With ``guidance_scale`` s (and ``uncond``, the unconditional output;
    one needs the other) the output is first guided, uncond + s·(pred − uncond).
    Then x_prev = α_prev·x̂0 + σ_prev·ε̂; ``t_prev`` = -1 is the clean end
    (x_prev = x̂0). ``t`` in [0, T), ``t_prev`` in [-1, T): ints or integer
    tensors () or (B,). Returns x_prev in x_t's dtype; differentiable in
    x_t, pred and uncond (the step is linear in them).
    """
    x_t = _samples("x_t", x_t)
    _like("pred", pred, "x_t", x_t)
    if (guidance_scale is None) != (uncond is None):
        raise ValueError("guidance_scale and uncond go together (classifier-free guidance: "
                         "uncond + guidance_scale·(pred − uncond)): pass both or neither")
    if uncond is not None:
        _like("uncond", uncond, "x_t", x_t)
        guidance_scale = _checks.real("guidance_scale", guidance_scale)
    _checks.same_device(x_t=x_t, pred=pred, uncond=uncond)
    schedule = _schedule(schedule)
    _checks.choice("prediction", prediction, PREDICTIONS)
    B = x_t.shape[0]
    scalar = all(isinstance(v, int) and not isinstance(v, bool) for v in (t, t_prev))
    t_int, t_prev_int = t, t_prev
    t = schedule.check_timesteps("t", t, B).to(x_t.device)
    t_prev = schedule.check_timesteps("t_prev", t_prev, B, allow_clean=True).to(x_t.device)
    name = _backend_for(backend, x_t, pred, uncond)
    if name == "torch":
        acc = _acc(x_t)
        return ref.ddim_step(x_t, pred, schedule.alpha(t, acc), schedule.sigma(t, acc),
                             schedule.alpha(t_prev, acc), schedule.sigma(t_prev, acc),
                             prediction=prediction, guidance_scale=guidance_scale, uncond=uncond)
    if scalar:  # one step for the whole batch (a sampler's loop)
        coefs = _ddim_coefficients(schedule, t_int, t_prev_int, prediction, guidance_scale, B,
                                   x_t.device)
    else:
        coefs = _ddim_coefficients(schedule, t, t_prev, prediction, guidance_scale)
    need = torch.is_grad_enabled() and any(
        v is not None and v.requires_grad for v in (x_t, pred, uncond))
    if not need:
        A, Bc, C = coefs
        return _kernels(name).ddim_affine(_c(x_t), A, _c(pred), Bc, _c(uncond), C, x_t.dtype)
    return _FusedDDIM.apply(x_t, pred, uncond, name, coefs)
