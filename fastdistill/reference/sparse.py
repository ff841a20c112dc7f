"""Readable pure-torch sparse-teacher KD loss: the specification and the CPU fallback.

The teacher of a row is given sparsely: K token ids ``i_1..i_K`` and their
log-probabilities ``lp_1..lp_K`` (at the distillation temperature, as the
producer computed them). The student row is dense: logits z (length V), with
u = z/T and q = softmax(u). Following ``shared/notes/kd-math.md`` §3, the
loss compares *bins*:

``tail="bucket"``
    K + 1 bins: the K ids and one tail bin for everything else. Teacher
    P_k = exp(lp_k), P_tail = 1 − Σ_k P_k; student Q_k = q_{i_k},
    log Q_tail = LSE_{j∉ids}(u) − LSE(u) (its own sum, never 1 − Σ_k Q_k).
    When the ids cover the whole vocabulary there is no tail bin (both tails 0).
``tail="renormalize"``
    K bins, both sides renormalized over the ids: P̃ = P/ΣP, Q̃ = softmax(u_ids).
``tail="none"``
    Sampled teachers (``fastdistill.sample_teacher``): Σ_k P_k (lp_k − log q_{i_k}),
    forward KL only; the estimate P of p is unbiased, and so is the gradient
    q·ΣP − P.

Entries with ``lp == -inf`` are padding: they are no bin at all, on either
side (their ids are never read). A bin that is 0 on both sides contributes
nothing to any divergence. The divergence between the two bin distributions
is the one of ``reference.kd`` (``_kl``, ``_log_mix``), applied to the bin
log-probabilities as they are (no renormalization). Gradients come from
autograd; every operation is masked so that padding, dead bins and ignored
rows give no NaN in the value or the gradient.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kd import _kl, _log_mix, nonfinite_rows, propagate_nonfinite, reduce_rows

TAILS = ("bucket", "renormalize", "none")
# The divergences each tail supports (TAID needs the dense teacher logits).
SUPPORTED = {
    "bucket": ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"),
    "renormalize": ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"),
    "none": ("forward_kl",),
}
# tail="bucket": how far Σ exp(lp) may exceed 1 (rounding) before it is an error.
LOGPROB_SUM_TOL = 1e-3

_NEG_INF = -math.inf


def bin_divergence(logp: torch.Tensor, logq: torch.Tensor, divergence: str, *,
                   beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """Per-row divergence between bin distributions given by their log-probabilities.

    ``logp`` (teacher) and ``logq`` (student) are (N, B) and are used as
    they are: no log-softmax. Bins that are -inf on both sides are dead and
    count 0 (they are swapped for a harmless 0 before any arithmetic, so
    their gradient is exactly 0, never NaN).
    """
    live = (logp > _NEG_INF) | (logq > _NEG_INF)
    zero = torch.zeros((), dtype=logq.dtype, device=logq.device)
    logp = torch.where(live, logp, zero)
    logq = torch.where(live, logq, zero)
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
        return _kl(logp, _log_mix(logp, skew, logq))  # m = skew p + (1 - skew) q
    if divergence == "skew_reverse_kl":
        return _kl(logq, _log_mix(logq, skew, logp))  # m = (1 - skew) p + skew q
    raise ValueError(f"divergence {divergence!r} is not defined on sparse teachers")


def _safe_lse(x: torch.Tensor, any_live: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim; -inf (with zero gradient) for rows that are all -inf."""
    safe = torch.where(any_live.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return torch.where(any_live, torch.logsumexp(safe, dim=-1), _NEG_INF)


def bins(u: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, tail: str,
         tail_mass: torch.Tensor | None = None):
    """The bin log-probabilities (teacher, student), each (N, K) or (N, K + 1), float64.

    ``u`` = z/T (N, V) in the accumulation dtype; ``ids`` (N, K) int64;
    ``logprobs`` (N, K) in the accumulation dtype, -inf at padding.
    ``tail_mass`` (N,), for ``tail="bucket"``: the teacher's mass off the ids
    when the producer stored it (packed soft labels), used instead of
    1 − Σ exp(lp) — that difference loses a tail far below the float32
    rounding of the K masses (a tail of 1e-21 beside a top mass of 1 − 1e-8).

    The bin math runs in float64 (it is N×(K+1), small): the student's bins
    are one log-softmax over [u at the ids, LSE of u off the ids], so the
    gradient at an id is formed in one place (g − Q·Σg) and a near-one-hot
    row keeps its relative precision (no 1 − Σ Q_k, no cancellation between
    the gather and the LSE paths).
    """
    valid = logprobs > _NEG_INF
    any_valid = valid.any(-1)
    safe_ids = torch.where(valid, ids, torch.zeros_like(ids))
    u_ids = torch.where(valid, u.gather(-1, safe_ids), _NEG_INF).double()
    lp = logprobs.double()
    if tail == "renormalize":
        lq = torch.where(valid, u_ids - _safe_lse(u_ids, any_valid).unsqueeze(-1), _NEG_INF)
        lp = torch.where(valid, lp - _safe_lse(lp, any_valid).unsqueeze(-1), _NEG_INF)
        return lp, lq  # rows without any valid id: every bin dead (-inf, not NaN)
    if tail == "none":
        lse = torch.logsumexp(u, dim=-1, keepdim=True).double()
        return lp, torch.where(valid, u_ids - lse, _NEG_INF)
    # bucket: one more bin for the rest of the vocabulary, on both sides
    V = u.shape[-1]
    hits = torch.zeros_like(u).scatter_add_(-1, safe_ids, valid.to(u.dtype))  # no padding slot counts
    off = torch.where(hits > 0, _NEG_INF, u)
    lq_tail = _safe_lse(off, (off > _NEG_INF).any(-1)).double()  # -inf when the ids cover V
    lq = torch.log_softmax(torch.cat([u_ids, lq_tail.unsqueeze(-1)], -1), dim=-1)
    covered = valid.sum(-1) == V
    with torch.no_grad():  # the teacher is a constant
        if tail_mass is not None:
            lp_tail = torch.where(covered, _NEG_INF, tail_mass.double().log())
        else:
            psum = lp.exp().sum(-1)
            has_p = (psum < 1) & ~covered  # a sum above 1 (rounding) leaves no tail
            lp_tail = torch.where(has_p, torch.log1p(-torch.where(has_p, psum, 0.0)), _NEG_INF)
    return torch.cat([lp, lp_tail.unsqueeze(-1)], -1), lq


def sparse_kd_loss_rows(
    student: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    *,
    tail: str = "bucket",
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    t2_scale: bool = True,
    tail_mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row loss ``hard_weight * CE + (1 - hard_weight) * [T^2] * D(bins)``; 0 at ignored rows.

    ``student`` (N, V) logits; ``ids`` (N, K) integer; ``logprobs`` (N, K),
    -inf marking padding; ``tail_mass`` (N,) the stored teacher tail (see
    ``bins``), for packed soft labels. Computes in float32 (float64 stays float64), the
    (N, K + 1) bin math in float64.

    Non-finite rule (as in ``reference.kd``): a row that counts whose student
    logits hold a NaN or +inf or are all -inf, or whose teacher log-probs
    hold a NaN or +inf, has a NaN loss and a NaN in every entry of its
    gradient row. (An all -inf teacher row is all padding: no soft term.)
    """
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if divergence not in SUPPORTED[tail]:
        raise ValueError(f"divergence={divergence!r} is not supported with tail={tail!r}")
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    z = student.to(acc)
    lp = logprobs.to(acc)
    ids = ids.to(torch.int64)
    if labels is not None:
        # Ignored rows count nowhere: harmless logits and an all-padding teacher.
        dropped = (labels == ignore_index).unsqueeze(-1)
        z = torch.where(dropped, torch.zeros_like(z), z)
        lp = torch.where(dropped, torch.full_like(lp, _NEG_INF), lp)
    bad = nonfinite_rows(z) | torch.isnan(lp).any(-1) | torch.isposinf(lp).any(-1)
    z = propagate_nonfinite(z, bad)
    lp = lp.masked_fill(bad.unsqueeze(-1), _NEG_INF)  # the row is NaN already; keep the bins tidy
    logp, logq = bins(z / temperature, ids, lp, tail,
                      None if tail_mass is None or tail != "bucket" else tail_mass.reshape(-1))
    soft = bin_divergence(logp, logq, divergence, beta=beta, skew=skew).to(acc)
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


def sparse_kd_loss(student, ids, logprobs, *, reduction: str = "mean", **kw) -> torch.Tensor:
    """The whole reference loss on (N, V) logits: rows, then the reduction."""
    rows = sparse_kd_loss_rows(student, ids, logprobs, **kw)
    return reduce_rows(rows, kw.get("labels"), kw.get("ignore_index", -100), reduction)
