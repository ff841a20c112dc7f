"""Triton backend of the fused KD-divergence op (``fastdistill::kd_forward``).

Same contract and same algorithm as the C++ CPU kernel ``csrc/kd/kd_cpu.cpp``:
one program per row of (N, V) logits, looping over the vocabulary in
``BLOCK_V`` chunks (masked, so V need not be a multiple of the block) and
accumulating in float32:

  pass 1  online max / sum-exp of u = z/T and v = z_t/T (and of the TAID
          mixture, and of z at T=1 for the cross-entropy term), plus the
          closed-form loss of forward_kl / reverse_kl / taid, e.g.
          KL(p||q) = E_p[v - u] - lse_v + lse_u (for reverse_kl this is also
          the row constant K of the gradient);
  pass 2  only for jsd / tvd / skew_*: the loss and the row constant K that
          the gradient subtracts;
  pass 3  writes d loss / d z (which may overwrite the student logits: every
          element is read before it is written by the same program).

The formulas are those of ``shared/notes/kd-math.md`` §1, gradients taken
w.r.t. u and chained to z through 1/T.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# The divergence codes index this tuple, as the C++ enum does.
from fastdistill.reference.kd import DIVERGENCES

_FORWARD_KL, _REVERSE_KL, _JSD, _TVD, _SKEW_FORWARD_KL, _SKEW_REVERSE_KL, _TAID = range(7)

MAX_BLOCK_V = 4096
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------- helpers
@triton.jit
def _online_lse(m, s_acc, x):
    """One block of an online log-sum-exp.

    ``m`` is the running max (scalar), ``s_acc`` the per-lane sums of e^{x-m};
    returns the new max, the rescaled sums, e^{x-m_new} and the rescale factor.
    A max of -inf (nothing seen yet) is treated as 0 so that no -inf - -inf
    appears: every e^{-inf} is then simply 0.
    """
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    r = tl.exp(m - m_safe)
    e = tl.exp(x - m_safe)
    return m_new, s_acc * r + e, e, r


@triton.jit
def _lse(m, s_acc):
    return m + tl.log(tl.sum(s_acc, axis=0))


@triton.jit
def _log1p(x):
    # log(1 + x) accurate for small x (Kahan's trick; no libdevice needed).
    y = 1.0 + x
    return tl.where(y == 1.0, x, tl.log(y) * (x / (y - 1.0)))


@triton.jit
def _logaddexp(a, b):
    """log(e^a + e^b) without underflow; -inf when both are -inf."""
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    r = hi + _log1p(tl.exp(lo - hi))
    return tl.where(hi == float("-inf"), hi, r)


@triton.jit
def _mix(xs, xt, ws, wt):
    """ws * xs + wt * xt, a term whose weight is 0 counting 0 (also at -inf)."""
    a = tl.where(ws == 0.0, 0.0, ws * xs)
    b = tl.where(wt == 0.0, 0.0, wt * xt)
    return a + b


# ---------------------------------------------------------------------- kernel
@triton.jit
def _kd_fwd_kernel(
    S,  # (N, V) student logits
    TT,  # (N, V) teacher logits
    OUT,  # (N, V) gradient; may be S itself
    LABELS,  # (N,) int64 (unused unless HAS_LABELS)
    LOSS,  # (N,) float32
    COEF,  # (2,) float32: c_soft, c_hard (grad_scale already applied)
    V,
    ignore_index,
    inv_t,
    param,
    log_wp,
    log_wq,
    hard_weight,
    soft_scale,
    DIV: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    CE: tl.constexpr,
    CE_OWN_LSE: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # Log-probabilities are formed as (x - max) - log(sum e^{x - max}), never
    # as x - lse: with large logits (|x| ~ 1e3) the rounded lse alone would
    # cost ~1e-4 in every log-probability.
    row = tl.program_id(0).to(tl.int64)
    base = row * V
    s_row = S + base
    t_row = TT + base
    o_row = OUT + base
    cols0 = tl.arange(0, BLOCK_V)

    label = -1
    skip = False
    if HAS_LABELS:
        label = tl.load(LABELS + row)
        skip = label == ignore_index

    if skip:
        if NEED_GRAD:
            zero = tl.zeros([BLOCK_V], dtype=OUT.dtype.element_ty)
            for start in range(0, V, BLOCK_V):
                cols = start + cols0
                tl.store(o_row + cols, zero, mask=cols < V)
        tl.store(LOSS + row, 0.0)
    else:
        c_soft = tl.load(COEF)
        c_hard = tl.load(COEF + 1)
        t_w = param  # TAID: weight of the teacher in the mixture
        s_w = 1.0 - param  # TAID: weight of the (stop-gradient) student

        # ------------------------------------------------------------ pass 1
        # Running maxima (scalars) and per-lane sums relative to them; the
        # "a" sums are sum e^{x-m} d for the closed-form KL losses:
        #   forward_kl  KL(p||q)   = E_p[v - u] - lse_v + lse_u
        #   reverse_kl  KL(q||p)   = E_q[u - v] - lse_u + lse_v  (= K)
        #   taid        KL(p_t||q) = E_pt[w - u] - lse_w + lse_u
        m_u = float("-inf")
        m_v = float("-inf")
        m_w = float("-inf")
        m_z = float("-inf")
        s_u = tl.zeros([BLOCK_V], dtype=tl.float32)
        s_v = tl.zeros([BLOCK_V], dtype=tl.float32)
        s_w_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        s_z = tl.zeros([BLOCK_V], dtype=tl.float32)
        a_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        # the non-finite rule: a NaN or +inf on either side, or a side all -inf
        bad_acc = tl.zeros([BLOCK_V], dtype=tl.int32)
        live_s = tl.zeros([BLOCK_V], dtype=tl.int32)
        live_t = tl.zeros([BLOCK_V], dtype=tl.int32)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            mask = cols < V
            xs = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            xt = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            bad_acc |= ((xs != xs) | (xs == float("inf")) | (xt != xt) | (xt == float("inf"))).to(tl.int32)
            live_s |= (xs > float("-inf")).to(tl.int32)
            live_t |= (xt > float("-inf")).to(tl.int32)
            u = xs * inv_t
            v = xt * inv_t
            m_u, s_u, e_u, r_u = _online_lse(m_u, s_u, u)
            m_v, s_v, e_v, r_v = _online_lse(m_v, s_v, v)
            if DIV == 0:
                a_acc = a_acc * r_v + tl.where(e_v > 0.0, e_v * (v - u), 0.0)
            if DIV == 1:
                a_acc = a_acc * r_u + tl.where(e_u > 0.0, e_u * (u - v), 0.0)
            if DIV == 6:  # the mixture w = (1-t) u + t v
                w = tl.where(mask, _mix(xs, xt, s_w, t_w) * inv_t, float("-inf"))
                m_w, s_w_acc, e_w, r_w = _online_lse(m_w, s_w_acc, w)
                a_acc = a_acc * r_w + tl.where(e_w > 0.0, e_w * (w - u), 0.0)
            if CE_OWN_LSE:  # softmax(z) at T = 1 for the cross-entropy term
                m_z, s_z, e_z, r_z = _online_lse(m_z, s_z, xs)
        bad = (tl.max(bad_acc, axis=0) > 0) | (tl.max(live_s, axis=0) == 0) | (tl.max(live_t, axis=0) == 0)
        sum_u = tl.sum(s_u, axis=0)
        sum_v = tl.sum(s_v, axis=0)
        ls_u = tl.log(sum_u)
        ls_v = tl.log(sum_v)
        m_zc = m_u  # T = 1 for the CE term: the same as u
        ls_z = ls_u
        if CE_OWN_LSE:
            m_zc = m_z
            ls_z = tl.log(tl.sum(s_z, axis=0))
        m_wc = m_u
        ls_w = ls_u
        loss = 0.0
        k = 0.0
        if DIV == 0:
            loss = tl.sum(a_acc, axis=0) / sum_v + (m_u - m_v) + (ls_u - ls_v)
        if DIV == 1:
            loss = tl.sum(a_acc, axis=0) / sum_u + (m_v - m_u) + (ls_v - ls_u)
            k = loss
        if DIV == 6:
            sum_w = tl.sum(s_w_acc, axis=0)
            m_wc = m_w
            ls_w = tl.log(sum_w)
            loss = tl.sum(a_acc, axis=0) / sum_w + (m_u - m_w) + (ls_u - ls_w)

        # ------------------------------------------------------------ pass 2
        if DIV == 2 or DIV == 3 or DIV == 4 or DIV == 5:
            loss_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            k_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + cols0
                mask = cols < V
                xs = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                xt = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                logq = (xs * inv_t - m_u) - ls_u
                logp = (xt * inv_t - m_v) - ls_v
                q = tl.exp(logq)
                p = tl.exp(logp)
                has_q = mask & (q > 0.0)
                has_p = mask & (p > 0.0)
                if DIV == 2:  # jsd: beta KL(p||m) + (1-beta) KL(q||m); K = KL(q||m)
                    logm = _logaddexp(log_wp + logp, log_wq + logq)
                    tq = tl.where(has_q, q * (logq - logm), 0.0)
                    loss_acc += param * tl.where(has_p, p * (logp - logm), 0.0) + (1.0 - param) * tq
                    k_acc += tq
                elif DIV == 3:  # tvd: 1/2 sum |q - p|; K = sum q s, s = sign(q - p) / 2
                    d = q - p
                    sgn = tl.where(d > 0.0, 0.5, tl.where(d < 0.0, -0.5, 0.0))
                    loss_acc += tl.where(mask, 0.5 * tl.abs(d), 0.0)
                    k_acc += tl.where(mask, q * sgn, 0.0)
                elif DIV == 4:  # skew_forward_kl: KL(p||m); K = sum q p/m
                    logm = _logaddexp(log_wp + logp, log_wq + logq)
                    loss_acc += tl.where(has_p, p * (logp - logm), 0.0)
                    k_acc += tl.where(mask & (logp > float("-inf")), q * tl.exp(logp - logm), 0.0)
                else:  # skew_reverse_kl: KL(q||m); K = sum q (log q/m + 1 - skew q/m)
                    logm = _logaddexp(log_wp + logp, log_wq + logq)
                    lqm = logq - logm
                    loss_acc += tl.where(has_q, q * lqm, 0.0)
                    k_acc += tl.where(has_q, q * (lqm + 1.0 - param * tl.exp(lqm)), 0.0)
            loss = tl.sum(loss_acc, axis=0)
            k = tl.sum(k_acc, axis=0)

        # Read before pass 3 overwrites the row (in place).
        z_label = 0.0
        if CE:
            z_label = tl.load(s_row + label).to(tl.float32)

        # ------------------------------------------------------------ pass 3
        if NEED_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + cols0
                mask = cols < V
                xs = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                xt = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                logq = (xs * inv_t - m_u) - ls_u
                logp = (xt * inv_t - m_v) - ls_v
                q = tl.exp(logq)
                if DIV == 0:  # forward_kl: q - p
                    g = q - tl.exp(logp)
                elif DIV == 1:  # reverse_kl: q (log q - log p - K)
                    g = tl.where(q > 0.0, q * (logq - logp - k), 0.0)
                elif DIV == 2:  # jsd: (1-beta) q (log q - log m - K)
                    logm = _logaddexp(log_wp + logp, log_wq + logq)
                    g = tl.where(q > 0.0, (1.0 - param) * q * (logq - logm - k), 0.0)
                elif DIV == 3:  # tvd: q (s - K)
                    d = q - tl.exp(logp)
                    sgn = tl.where(d > 0.0, 0.5, tl.where(d < 0.0, -0.5, 0.0))
                    g = q * (sgn - k)
                elif DIV == 4:  # skew_forward_kl: -(1-skew) q (p/m - K)
                    logm = _logaddexp(log_wp + logp, log_wq + logq)
                    w = tl.where(logp > float("-inf"), tl.exp(logp - logm), 0.0)
                    g = -(1.0 - param) * q * (w - k)
                elif DIV == 5:  # skew_reverse_kl: q (log q/m + 1 - skew q/m - K)
                    logm = _logaddexp(log_wp + logp, log_wq + logq)
                    lqm = logq - logm
                    g = tl.where(q > 0.0, q * (lqm + 1.0 - param * tl.exp(lqm) - k), 0.0)
                else:  # taid: q - p_t, p_t = softmax((1-t) stopgrad(u) + t v)
                    g = q - tl.exp((_mix(xs, xt, s_w, t_w) * inv_t - m_wc) - ls_w)
                dz = c_soft * g
                if CE:
                    if CE_OWN_LSE:
                        sm = tl.exp((xs - m_zc) - ls_z)
                    else:
                        sm = q
                    dz += c_hard * sm
                    dz = tl.where(cols == label, dz - c_hard, dz)
                dz = tl.where(bad, float("nan"), dz)
                tl.store(o_row + cols, dz.to(OUT.dtype.element_ty), mask=mask)

        row_loss = (1.0 - hard_weight) * soft_scale * loss
        if CE:
            # CE = lse(z) - z[label] = (max - z[label]) + log(sum e^{z - max})
            row_loss += hard_weight * ((m_zc - z_label) + ls_z)
        tl.store(LOSS + row, tl.where(bad, float("nan"), row_loss))


# --------------------------------------------------------------------- wrapper
def _check_inputs(student, teacher, labels, divergence, temperature, hard_weight, out):
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError("kd_forward: student and teacher must be 2-D (N, V)")
    if student.shape != teacher.shape:
        raise ValueError(
            f"kd_forward: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
            "must have the same shape"
        )
    if not (student.is_contiguous() and teacher.is_contiguous()):
        raise ValueError("kd_forward: inputs must be contiguous")
    if student.dtype not in _FLOAT_DTYPES or teacher.dtype not in _FLOAT_DTYPES:
        raise TypeError("kd_forward: the triton backend takes float32, bfloat16 or float16 logits")
    if student.device != teacher.device:
        raise ValueError("kd_forward: student and teacher must be on the same device")
    if not (0 <= divergence < len(DIVERGENCES)):
        raise ValueError(f"kd_forward: unknown divergence {divergence}")
    if not temperature > 0:
        raise ValueError("kd_forward: temperature must be > 0")
    if labels is not None:
        if (
            labels.dim() != 1
            or labels.shape[0] != student.shape[0]
            or not labels.is_contiguous()
            or labels.dtype != torch.int64
            or labels.device != student.device
        ):
            raise ValueError("kd_forward: labels must be a contiguous int64 tensor of shape (N,)")
    elif hard_weight > 0:
        raise ValueError("kd_forward: hard_weight > 0 needs labels")
    if out is not None:
        if out.shape != student.shape or out.dtype != student.dtype or out.device != student.device:
            raise ValueError("kd_forward: out must have the student's shape, dtype and device")
        if not out.is_contiguous():
            raise ValueError("kd_forward: out must be contiguous")


def _launch_config(V: int) -> tuple[int, int]:
    block = min(MAX_BLOCK_V, triton.next_power_of_2(max(V, 1)))
    num_warps = 16 if block >= 4096 else 8 if block >= 2048 else 4
    return block, num_warps


def kd_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    ignore_index: int,
    divergence: int,
    param: float,
    temperature: float,
    hard_weight: float,
    soft_scale: float,
    mean_scale: bool,
    out: torch.Tensor | None = None,
    *,
    need_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (float32, (N,)) and the gradient w.r.t. the student logits.

    ``loss_rows = (1 - hard_weight) * soft_scale * D_row + hard_weight * CE_row``
    (0 at rows whose label is ``ignore_index``); the gradient, in the
    student's dtype, is ``grad_scale * d loss_row / d z`` with
    ``grad_scale = 1 / max(#kept rows, 1)`` if ``mean_scale`` else 1. With
    ``out`` (e.g. the student itself, for the in-place mode) the gradient is
    written there and ``out`` is returned. Without ``need_grad`` (evaluation,
    like the C++ op's last argument) no gradient is computed or written and
    an empty tensor comes back in its place.
    """
    if isinstance(out, bool):
        raise TypeError("kd_forward: `out` must be a tensor or None; pass need_grad= by keyword")
    if out is not None and not need_grad:
        raise ValueError("kd_forward: out= needs need_grad=True")
    divergence = int(divergence)
    hard_weight = float(hard_weight)
    _check_inputs(student, teacher, labels, divergence, temperature, hard_weight, out)
    N, V = student.shape
    device = student.device
    loss_rows = torch.empty((N,), dtype=torch.float32, device=device)
    if not need_grad:
        grad = student.new_empty((0,))
    elif out is None:
        grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    else:
        grad = out
    if N == 0:
        return loss_rows, grad
    ce = hard_weight > 0
    if ce:
        # Out-of-range labels would read out of bounds (the C++ op checks too).
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"kd_forward: labels[{i}] = {int(labels[i])} is neither in [0, {V}) nor ignore_index"
            )

    # c_soft, c_hard with grad_scale applied, computed on the device (no host sync).
    soft_coef = soft_scale * (1.0 - hard_weight) / temperature
    if mean_scale:
        if labels is None:
            count = torch.full((), float(max(N, 1)), dtype=torch.float64, device=device)
        else:
            count = (labels != ignore_index).sum().clamp_min(1).to(torch.float64)
        coef = (torch.tensor([soft_coef, hard_weight], dtype=torch.float64, device=device) / count).float()
    else:
        coef = torch.tensor([soft_coef, hard_weight], dtype=torch.float32, device=device)

    wp = 0.0  # weight of p in the mixture m
    if divergence in (_JSD, _SKEW_FORWARD_KL):
        wp = float(param)
    elif divergence == _SKEW_REVERSE_KL:
        wp = 1.0 - float(param)
    log_wp = math.log(wp) if wp > 0 else -math.inf
    log_wq = math.log1p(-wp) if wp < 1 else -math.inf

    block, num_warps = _launch_config(V)
    _kd_fwd_kernel[(N,)](
        student,
        teacher,
        grad if need_grad else student,  # never written without need_grad
        labels if labels is not None else loss_rows,  # dummy pointer, never read
        loss_rows,
        coef,
        V,
        int(ignore_index),
        1.0 / float(temperature),
        float(param),
        log_wp,
        log_wq,
        hard_weight,
        float(soft_scale),
        DIV=divergence,
        HAS_LABELS=labels is not None,
        CE=ce,
        CE_OWN_LSE=ce and float(temperature) != 1.0,
        NEED_GRAD=bool(need_grad),
        BLOCK_V=block,
        num_warps=num_warps,
    )
    return loss_rows, grad
