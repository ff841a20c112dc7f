"""Readable pure-torch KD divergences: the specification and the CPU fallback.

Everything here follows ``shared/notes/kd-math.md`` line by line and lets
autograd produce the gradients, so it doubles as the float64 ground truth that
every fast backend is tested against. Rows are tokens: ``student`` and
``teacher`` are (N, V) logits; ``labels`` is (N,) or None.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCES = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "tvd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "taid",
)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(p||q) from log-probabilities; terms with p = 0 count 0.

    Both logs are masked before they meet, so a p = 0 term (log p = -inf,
    maybe log q = -inf too) gives neither a NaN value nor a NaN gradient."""
    p = logp.exp()
    live = p > 0
    zero = torch.zeros_like(p)
    return (p * (torch.where(live, logp, zero) - torch.where(live, logq, zero))).sum(-1)


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (...): rows that are no distribution: a NaN or +inf anywhere,
    or every entry -inf. (Single -inf entries are probability 0, which is fine.)"""
    return torch.isnan(x).any(-1) | torch.isposinf(x).any(-1) | torch.isneginf(x).all(-1)


class _NaNRows(torch.autograd.Function):
    """Identity, except that ``bad`` rows become NaN in the value *and* in the
    gradient: the non-finite rule, written once. (Autograd alone does not give
    it: the masks that keep p = 0 terms NaN-free would also stop a NaN.)"""

    @staticmethod
    def forward(ctx, x, bad):
        ctx.save_for_backward(bad)
        return x.masked_fill(bad.unsqueeze(-1), math.nan)

    @staticmethod
    def backward(ctx, grad):
        (bad,) = ctx.saved_tensors
        return grad.masked_fill(bad.unsqueeze(-1), math.nan), None


def propagate_nonfinite(z: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """z (N, V) with its ``bad`` rows (N,) turned to NaN, value and gradient."""
    return _NaNRows.apply(z, bad)


def _zero_rows(u: torch.Tensor) -> torch.Tensor:
    """An exact 0 per row that stays in u's graph (gradient exactly 0)."""
    return torch.where(torch.isneginf(u), 0.0, u).mul(0.0).sum(-1)


def _log_mix(log_a: torch.Tensor, weight_a: float, log_b: torch.Tensor) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b), computed as a logaddexp (never underflows)."""
    la = log_a + math.log(weight_a) if weight_a > 0 else torch.full_like(log_a, -math.inf)
    lb = log_b + math.log1p(-weight_a) if weight_a < 1 else torch.full_like(log_b, -math.inf)
    return torch.logaddexp(la, lb)


def divergence_rows(
    u: torch.Tensor,
    v: torch.Tensor,
    divergence: str,
    *,
    beta: float = 0.5,
    skew: float = 0.1,
    taid_t: float | None = None,
) -> torch.Tensor:
    """Per-row divergence between student q = softmax(u) and teacher p = softmax(v).

    ``u`` and ``v`` are the temperature-scaled logits z/T and z_t/T.
    """
    logq = torch.log_softmax(u, dim=-1)
    logp = torch.log_softmax(v, dim=-1)
    if divergence == "forward_kl":
        return _kl(logp, logq)
    if divergence == "reverse_kl":
        return _kl(logq, logp)
    if divergence == "jsd":
        logm = _log_mix(logp, beta, logq)
        return beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)
    if divergence == "tvd":
        return 0.5 * (logq.exp() - logp.exp()).abs().sum(-1)
    if divergence == "skew_forward_kl":
        # m = skew * p + (1 - skew) * q
        return _kl(logp, _log_mix(logp, skew, logq))
    if divergence == "skew_reverse_kl":
        # m = (1 - skew) * p + skew * q
        return _kl(logq, _log_mix(logq, skew, logp))
    if divergence == "taid":
        # The interpolated teacher sees the student through a stop-gradient.
        # t = 0: the target is the student itself, KL(q‖q) = 0 exactly (the
        # autograd form q·Σp − p would leave rounding noise instead of 0).
        # t = 1 takes the teacher whole (0 · -inf would be NaN).
        if taid_t == 0:
            return _zero_rows(u)
        if taid_t == 1:
            mix = v
        else:
            mix = (1 - taid_t) * u.detach() + taid_t * v
        logpt = torch.log_softmax(mix, dim=-1)
        return _kl(logpt, logq)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def kd_loss_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    taid_t: float | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    t2_scale: bool = True,
) -> torch.Tensor:
    """Per-row loss ``hard_weight * CE + (1 - hard_weight) * [T^2] * D``; 0 at ignored rows.

    Computes in float32 (float64 stays float64) whatever the input dtype, so
    bf16/fp16 logits lose nothing in the divergence.

    Non-finite rule: a row that counts (not ignored) whose student or teacher
    logits hold a NaN or +inf, or are all -inf, has a NaN loss and a NaN in
    every entry of its gradient row. Ignored rows count nowhere, whatever
    they hold.
    """
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    z = student.to(acc)
    zt = teacher.to(acc)
    if labels is not None:
        # Ignored rows count nowhere: give them harmless logits, so that an
        # infinite loss there cannot leak a NaN into the gradient.
        dropped = (labels == ignore_index).unsqueeze(-1)
        z = torch.where(dropped, torch.zeros_like(z), z)
        zt = torch.where(dropped, torch.zeros_like(zt), zt)
    bad = nonfinite_rows(z) | nonfinite_rows(zt)
    z = propagate_nonfinite(z, bad)
    soft = divergence_rows(
        z / temperature, zt / temperature, divergence, beta=beta, skew=skew, taid_t=taid_t
    )
    if t2_scale:
        soft = soft * (temperature * temperature)
    loss = (1.0 - hard_weight) * soft
    if hard_weight > 0:
        ce = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="none")
        loss = loss + hard_weight * ce
    loss = loss.masked_fill(bad, math.nan)
    if labels is not None:
        loss = torch.where(labels != ignore_index, loss, torch.zeros_like(loss))
    return loss


def reduce_rows(
    loss_rows: torch.Tensor,
    labels: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
) -> torch.Tensor:
    """'mean' averages over rows that are not ignored (0 when all are); 'sum'; 'none'."""
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    if labels is None:
        count = loss_rows.new_tensor(float(loss_rows.numel()))
    else:
        count = (labels != ignore_index).sum().to(loss_rows.dtype)
    return total / count.clamp_min(1)


def kd_loss(student, teacher, *, reduction: str = "mean", **kw) -> torch.Tensor:
    """The whole reference loss on (N, V) logits: rows, then the reduction."""
    rows = kd_loss_rows(student, teacher, **kw)
    return reduce_rows(rows, kw.get("labels"), kw.get("ignore_index", -100), reduction)
