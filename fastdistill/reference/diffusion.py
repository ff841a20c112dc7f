"""The diffusion-distillation ops, written plainly: the specification of the
fused kernels and the CPU fallback. Shapes: a batch of B samples (B, ...);
per-sample coefficients are float tensors (B,). Accumulation in float32
(float64 stays float64); results come back in the input's dtype.

Reductions, one rule for every op: ``"none"`` gives one value per sample,
``"mean"`` the mean of those, ``"sum"`` the sum over every element (for the
element-wise losses) or sample (pseudo-Huber, whose per-sample value is a
norm). For the element-wise losses (dmd, denoising, consistency "l2") the
per-sample value is the mean over the sample's elements, so "mean" is the mean
over all elements and "sum" = "mean" × numel.

The math: ``shared/notes/kd-math.md`` §6.
"""
from __future__ import annotations

import math

import torch

PREDICTIONS = ("eps", "x0", "v")
WEIGHTINGS = ("uniform", "snr", "min_snr", "snr_trunc")
METRICS = ("l2", "pseudo_huber")
REDUCTIONS = ("mean", "sum", "none")
DMD_EPS = 1e-8  # the guard of DMD's normalizer mean|x − x0_real| against 0


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) coefficients shaped to broadcast over a sample (B, 1, ..., 1)."""
    return v.reshape((-1,) + (1,) * (x.dim() - 1))


def _reduce_elementwise(per_sample_sum: torch.Tensor, elements: int, reduction: str):
    """The rule for element-wise losses, from each sample's sum over its elements."""
    if reduction == "sum":
        return per_sample_sum.sum()
    per_sample = per_sample_sum / elements
    return per_sample.mean() if reduction == "mean" else per_sample


def to_x0(x_t, pred, alpha, sigma, prediction: str):
    """x̂0 from a network's output under each parameterization."""
    if prediction == "x0":
        return pred
    if prediction == "eps":
        return (x_t - sigma * pred) / alpha
    return alpha * x_t - sigma * pred  # v = α ε − σ x0


def to_eps(x_t, pred, alpha, sigma, prediction: str):
    """ε̂ from a network's output under each parameterization."""
    if prediction == "eps":
        return pred
    if prediction == "x0":
        return (x_t - alpha * pred) / sigma
    return sigma * x_t + alpha * pred


def dmd_loss(x, x0_real, x0_fake, *, weight=None, reduction="mean", eps=DMD_EPS):
    """DMD/DMD2's distribution-matching loss of generated samples ``x``.

    g = (x0_fake − x0_real) / max(mean_elements |x − x0_real|, eps) per sample
    (both denoisers' estimates are constants), and the loss is
    ½‖x − sg(x − g)‖² weighted per sample: its value is ½ w Σ g², its gradient
    w.r.t. x exactly w·g (written as ½ w Σ g² + Σ (x − sg(x))·w·g, whose second
    term is 0 and carries the gradient without the rounding of x − (x − g)).
    """
    acc = _acc(x)
    xf = x.to(acc)
    real, fake = x0_real.detach().to(acc), x0_fake.detach().to(acc)
    dims = tuple(range(1, x.dim()))
    elements = math.prod(x.shape[1:])
    with torch.no_grad():
        norm = (xf.detach() - real).abs().mean(dims, keepdim=True).clamp_min(eps)
        g = (fake - real) / norm
        if weight is not None:
            g_w = g * _per_sample(weight.detach().to(acc), x)
        else:
            g_w = g
    per_sample = (0.5 * g * g_w).sum(dims) + ((xf - xf.detach()) * g_w).sum(dims)
    return _reduce_elementwise(per_sample, elements, reduction).to(x.dtype)


def denoising_target(x0, noise, alpha, sigma, prediction: str):
    """What a denoiser at x_t = α x0 + σ ε should output."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    return alpha * noise - sigma * x0


def denoising_weight(snr, prediction: str, weighting: str, gamma: float = 5.0):
    """Per-sample weight of the squared error in the prediction's own space.

    "uniform" weighs that error by 1 (the usual simple loss of each
    parameterization). The others are a weight λ(SNR) on the x0-space error
    ‖x̂0 − x0‖², turned into the prediction's space exactly: the eps error is
    SNR·‖x̂0 − x0‖², the v error (SNR + 1)·‖x̂0 − x0‖². "snr": λ = SNR (the eps
    loss); "min_snr": λ = min(SNR, γ) (Hang et al. 2023); "snr_trunc":
    λ = max(SNR, 1) (Salimans & Ho 2022)."""
    if weighting == "uniform":
        return torch.ones_like(snr)
    lam = {"snr": snr, "min_snr": snr.clamp(max=gamma), "snr_trunc": snr.clamp(min=1.0)}[weighting]
    if prediction == "eps":
        return lam / snr
    if prediction == "v":
        return lam / (snr + 1)
    return lam


def denoising_loss(pred, x0, noise, alpha, sigma, snr, *, prediction="eps", weighting="uniform",
                   gamma=5.0, reduction="mean"):
    """Weighted MSE of a denoiser's output against its target at x_t = α x0 + σ ε."""
    acc = _acc(pred)
    shape = lambda v: _per_sample(v.to(acc), pred)  # noqa: E731
    a, s = shape(alpha), shape(sigma)
    target = denoising_target(x0.detach().to(acc), noise.detach().to(acc), a, s, prediction)
    w = shape(denoising_weight(snr.to(acc), prediction, weighting, gamma))
    dims = tuple(range(1, pred.dim()))
    per_sample = (w * (pred.to(acc) - target) ** 2).sum(dims)
    return _reduce_elementwise(per_sample, math.prod(pred.shape[1:]), reduction).to(pred.dtype)


def pseudo_huber_c(elements: int) -> float:
    """iCT's default c = 0.00054·√d for samples of d elements (Song & Dhariwal 2023)."""
    return 0.00054 * math.sqrt(elements)


def consistency_loss(pred, target, *, metric="l2", c=None, x_t=None, c_skip=None, c_out=None,
                     weight=None, reduction="mean"):
    """Distance of a consistency model's output to its (constant) target.

    With ``x_t``, ``c_skip``, ``c_out`` the model's output is the boundary
    form f = c_skip·x_t + c_out·pred (pred: the network's x̂0), else f = pred.
    "l2": mean over elements of (f − y)²; "pseudo_huber": √(‖f − y‖² + c²) − c
    per sample (c defaults to ``pseudo_huber_c``). Times ``weight`` per sample.
    """
    acc = _acc(pred)
    f = pred.to(acc)
    if x_t is not None:
        f = _per_sample(c_skip.to(acc), pred) * x_t.detach().to(acc) + _per_sample(
            c_out.to(acc), pred) * f
    d2 = ((f - target.detach().to(acc)) ** 2).sum(tuple(range(1, pred.dim())))
    w = None if weight is None else weight.detach().to(acc)
    elements = math.prod(pred.shape[1:])
    if metric == "l2":
        return _reduce_elementwise(d2 if w is None else d2 * w, elements, reduction).to(pred.dtype)
    c = pseudo_huber_c(elements) if c is None else c
    per_sample = torch.sqrt(d2 + c * c) - c
    if w is not None:
        per_sample = per_sample * w
    out = {"mean": per_sample.mean, "sum": per_sample.sum}.get(reduction, lambda: per_sample)()
    return out.to(pred.dtype)


def ddim_step(x_t, pred, alpha, sigma, alpha_prev, sigma_prev, *, prediction="eps",
              guidance_scale=None, uncond=None):
    """One deterministic DDIM step from t to t_prev (η = 0).

    With ``guidance_scale`` s the output is first guided,
    uncond + s·(pred − uncond) (classifier-free guidance); then
    x_prev = α_prev·x̂0 + σ_prev·ε̂ (x̂0 itself where t_prev is the clean end).
    """
    acc = _acc(x_t)
    shape = lambda v: _per_sample(v.to(acc), x_t)  # noqa: E731
    p = pred.to(acc)
    if guidance_scale is not None:
        u = uncond.to(acc)
        p = u + guidance_scale * (p - u)
    xt = x_t.to(acc)
    a, s = shape(alpha), shape(sigma)
    x0 = to_x0(xt, p, a, s, prediction)
    eps = to_eps(xt, p, a, s, prediction)
    return (shape(alpha_prev) * x0 + shape(sigma_prev) * eps).to(x_t.dtype)
