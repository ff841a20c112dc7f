"""Triton backend of the sparse-teacher KD op (``fastdistill::sparse_kd_forward``).

Same contract and algorithm as the C++ CPU kernel ``csrc/sparse/sparse_cpu.cpp``:
one program per row, the vocabulary walked in ``BLOCK_V`` chunks (masked),
the K teacher entries in ``BLOCK_K`` chunks, everything accumulated in float32:

  pass A   the max of the row, then Σ e^{u - max} in float64 (of float32
           exponentials), and of z at T = 1 for the cross-entropy term when T ≠ 1;
  K pass 1 gather u at the ids: the number of valid entries, Σ exp(lp), the
           log-sum-exp of lp and Σ_ids e^{u - max}; those are the same floats
           pass A summed, so the tail mass Σ_all − Σ_ids is exact up to
           float64 rounding (never 1 − Σ q_k in float32, which loses a small
           tail). A tail below ~1e-38 of the max underflows to 0 in float32;
  K pass 2 the bin math (fastdistill/reference/sparse.py): loss, S = Σ G and
           the row coefficient c, so that d soft / d u_j = c·q_j off the ids;
  pass B   writes the gradient row, c·q_j as sign(c)·exp((u − max) + log|c| − log Σ);
  K pass 3 after a barrier, overwrites the K id positions with their own
           gradient (G_k − q_k S and the CE part).

With PACKED the teacher is packed soft-label rows (fastdistill/softlabels/
codec.py, the same unpack as csrc/softlabels/packed_row.h): each K pass
unpacks its block of entries from the row's bytes, after one K pass that
finds a top-k row's renormalizing shift; no id or log-prob tensor exists.

Gradient of the bins (shared/notes/kd-math.md §3), G_b = Q_b ∂D/∂Q_b:
∂L/∂u_j = [j = i_k] G_k + [j ∉ ids] r·q_j − q_j S, r = ∂D/∂Q_tail.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastdistill.reference.kd import DIVERGENCES

_FORWARD_KL, _REVERSE_KL, _JSD, _TVD, _SKEW_FORWARD_KL, _SKEW_REVERSE_KL, _TAID = range(7)
_BUCKET, _RENORMALIZE, _NONE = range(3)  # indices of fastdistill.kd.sparse.TAILS

MAX_BLOCK_V = 4096
MAX_BLOCK_K = 1024
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------- helpers
@triton.jit
def _lse_step(m, s_acc, x):
    """One block of an online log-sum-exp: running max ``m`` (scalar), per-lane
    sums ``s_acc`` of e^{x-m}; a max of -inf is treated as 0 (no -inf - -inf)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s_acc * tl.exp(m - m_safe) + tl.exp(x - m_safe)


@triton.jit
def _exp_rel(x, inv_t, m):
    """e^{x·inv_t − m}: one helper, so pass A and the gather compute the same floats."""
    u = x * inv_t
    return tl.exp(u - m)


@triton.jit
def _log1p(x):
    # log(1 + x) accurate for small x (Kahan's trick)
    y = 1.0 + x
    return tl.where(y == 1.0, x, tl.log(y) * (x / (y - 1.0)))


@triton.jit
def _logaddexp(a, b):
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return tl.where(hi == float("-inf"), hi, hi + _log1p(tl.exp(lo - hi)))


@triton.jit
def _read_bits(base, bit, width, limit, mask):
    """Bits [bit, bit + width) of a little-endian bit stream at ``base`` (width
    ≤ 25: four bytes cover them), reading no byte at or past ``limit``."""
    byte = bit >> 3
    shift = bit & 7
    v = tl.zeros_like(bit)
    for i in tl.static_range(4):
        b = tl.load(base + byte + i, mask=mask & (byte + i < limit), other=0).to(tl.int64)
        v = v | (b << (8 * i))
    one = tl.full([], 1, tl.int64)
    return (v >> shift) & ((one << width) - 1)


@triton.jit
def _packed_raw(d_row, ks, K, values_off, values_bytes, value_bits, inv_k,
                METHOD: tl.constexpr, VBITS16: tl.constexpr):
    """Entries ks' values before renormalization; -inf at padding / probability 0."""
    mask = ks < K
    vals = d_row + values_off
    if METHOD == 1:  # sampled: counts
        c = _read_bits(vals, ks.to(tl.int64) * value_bits, value_bits, values_bytes, mask)
        raw = tl.where(c > 0, tl.log(c.to(tl.float32) * inv_k), float("-inf"))
    elif VBITS16:  # float16 log-probs
        lo = tl.load(vals + 2 * ks, mask=mask, other=0).to(tl.int32)
        hi = tl.load(vals + 2 * ks + 1, mask=mask, other=0).to(tl.int32)
        raw = (lo | (hi << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:  # 8-bit codes: c/255 = (P / P_max)^(1/4)
        c = tl.load(vals + ks, mask=mask, other=0).to(tl.float32)
        raw = tl.where(c > 0.0, 4.0 * tl.log(c / 255.0), float("-inf"))
    return tl.where(mask, raw, float("-inf"))


@triton.jit
def _entries(id_row, lp_row, ks, K, shift, ids_off, ids_bytes, values_off, values_bytes, id_bits,
             value_bits, inv_k, PACKED: tl.constexpr, METHOD: tl.constexpr, VBITS16: tl.constexpr):
    """(lp, valid, idx) of entries ks of a row: read from the (ids, logprobs)
    rows, or unpacked from the packed row ``id_row`` (lp = raw + shift)."""
    if PACKED:
        raw = _packed_raw(id_row, ks, K, values_off, values_bytes, value_bits, inv_k, METHOD,
                          VBITS16)
        lp = (raw.to(tl.float64) + shift).to(tl.float32)  # shift: float64 (pass 0)
        valid = lp > float("-inf")
        idx = _read_bits(id_row + ids_off, ks.to(tl.int64) * id_bits, id_bits, ids_bytes, valid)
    else:
        lp = tl.load(lp_row + ks, mask=ks < K, other=float("-inf"))
        valid = lp > float("-inf")
        idx = tl.load(id_row + ks, mask=valid, other=0)
    return lp, valid, idx


@triton.jit
def _bin(lp, lq, param, log_wp, log_wq, DIV: tl.constexpr):
    """One bin's (term, G = Q ∂D/∂Q, ∂D/∂Q) between teacher lp and student lq
    log-probabilities; a bin that is -inf on both sides is dead: all 0."""
    dead = (lp == float("-inf")) & (lq == float("-inf"))
    lp = tl.where(dead, 0.0, lp)
    lq = tl.where(dead, 0.0, lq)
    p = tl.exp(lp)
    q = tl.exp(lq)
    hp = p > 0.0
    hq = q > 0.0
    if DIV == 0:  # forward_kl: P (lp - lq)
        term = tl.where(hp, p * (lp - lq), 0.0)
        dq = tl.where(hp, -tl.exp(lp - lq), 0.0)
        g = -p
    elif DIV == 1:  # reverse_kl: Q (lq - lp)
        term = tl.where(hq, q * (lq - lp), 0.0)
        dq = tl.where(hq, lq - lp + 1.0, 0.0)
        g = tl.where(hq, q * dq, 0.0)
    elif DIV == 2:  # jsd: beta KL(P||M) + (1-beta) KL(Q||M)
        lm = _logaddexp(log_wp + lp, log_wq + lq)
        term = param * tl.where(hp, p * (lp - lm), 0.0) + (1.0 - param) * tl.where(hq, q * (lq - lm), 0.0)
        dq = tl.where(hq, (1.0 - param) * (lq - lm), 0.0)
        g = tl.where(hq, q * dq, 0.0)
    elif DIV == 3:  # tvd: 1/2 |Q - P|, sign(0) = 0
        d = q - p
        term = 0.5 * tl.abs(d)
        dq = tl.where(d > 0.0, 0.5, tl.where(d < 0.0, -0.5, 0.0))
        g = q * dq
    elif DIV == 4:  # skew_forward_kl: KL(P||M), M = skew P + (1-skew) Q
        lm = _logaddexp(log_wp + lp, log_wq + lq)
        term = tl.where(hp, p * (lp - lm), 0.0)
        dq = tl.where(hp, -(1.0 - param) * tl.exp(lp - lm), 0.0)
        g = tl.where(hp, tl.where(lm == float("-inf"), -p, -(1.0 - param) * tl.exp(lq + lp - lm)), 0.0)
    else:  # skew_reverse_kl: KL(Q||M), M = (1-skew) P + skew Q
        lm = _logaddexp(log_wp + lp, log_wq + lq)
        term = tl.where(hq, q * (lq - lm), 0.0)
        dq = tl.where(hq, (lq - lm) + 1.0 - param * tl.exp(lq - lm), 0.0)
        g = tl.where(hq, q * dq, 0.0)
    term = tl.where(dead, 0.0, term)
    g = tl.where(dead, 0.0, g)
    dq = tl.where(dead, 0.0, dq)
    return term, g, dq


# ---------------------------------------------------------------------- kernel
@triton.jit
def _sparse_fwd_kernel(
    S,  # (N, V) student logits
    IDS,  # (N, K) int64; PACKED: the packed rows (N, ROW_BYTES) uint8
    LP,  # (N, K) float32, -inf at padding (unused when PACKED)
    OUT,  # (N, V) gradient (S itself when in place)
    ZK,  # (N, K) float32 scratch: z at the ids, kept for pass 3 (pass B may overwrite S)
    LABELS,  # (N,) int64 (unused unless HAS_LABELS)
    LOSS,  # (N,) float32
    COEF,  # (2,) float32: c_soft, c_hard (grad_scale applied)
    V,
    K,
    ignore_index,
    inv_t,
    param,
    log_wp,
    log_wq,
    hard_weight,
    soft_scale,
    ROW_BYTES,  # PACKED only: the packed row layout (Codec.layout())
    VALUES_OFF,
    IDS_OFF,
    ID_BITS,
    VALUE_BITS,
    INV_K,  # 1 / k: a sampled count c is log(c / k)
    DIV: tl.constexpr,
    TAIL: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    CE: tl.constexpr,
    CE_OWN_LSE: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PACKED: tl.constexpr,
    METHOD: tl.constexpr,
    VBITS16: tl.constexpr,
):
    NEG_INF = float("-inf")
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * V
    o_row = OUT + row * V
    if PACKED:
        id_row = IDS + row * ROW_BYTES
    else:
        id_row = IDS + row * K
    lp_row = LP + row * K
    values_bytes = IDS_OFF - VALUES_OFF
    ids_bytes = ROW_BYTES - IDS_OFF
    zk_row = ZK + row * K
    cols0 = tl.arange(0, BLOCK_V)
    ks0 = tl.arange(0, BLOCK_K)

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
        # ------------------------------------------------------------ pass A
        # The max first, then the sums relative to it: every e^{u - max} is
        # then the very float that K pass 1 recomputes at the ids, and the
        # tail Σ_{j∉ids} e^{u_j - max} = (Σ_all - Σ_ids) is exact up to
        # float64 rounding of the sums (never 1 - Σ_k q_k in float32).
        m_x = NEG_INF
        # the non-finite rule: a NaN or +inf student logit, or a row all -inf
        bad_acc = tl.zeros([BLOCK_V], dtype=tl.int32)
        live_acc = tl.zeros([BLOCK_V], dtype=tl.int32)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            xs = tl.load(s_row + cols, mask=cols < V, other=NEG_INF).to(tl.float32)
            bad_acc |= ((xs != xs) | (xs == float("inf"))).to(tl.int32)
            live_acc |= (xs > NEG_INF).to(tl.int32)
            m_x = tl.maximum(m_x, tl.max(xs, axis=0))
        bad = (tl.max(bad_acc, axis=0) > 0) | (tl.max(live_acc, axis=0) == 0)
        m_u = m_x * inv_t  # inv_t > 0: the max of the rounded products
        s_all = tl.zeros([BLOCK_V], dtype=tl.float64)
        s_z = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            xs = tl.load(s_row + cols, mask=cols < V, other=NEG_INF).to(tl.float32)
            s_all += _exp_rel(xs, inv_t, m_u).to(tl.float64)
            if CE_OWN_LSE:
                s_z += tl.exp(xs - m_x)
        sum_all = tl.sum(s_all, axis=0)
        ls_u = tl.log(sum_all.to(tl.float32))  # for pass B's float32 exponentials
        ls_u64 = tl.log(sum_all)  # for the bin math, in float64 (see K pass 2)
        m_zc = m_u  # at T = 1 the CE softmax is q itself
        ls_z = ls_u
        if CE_OWN_LSE:
            m_zc = m_x
            ls_z = tl.log(tl.sum(s_z, axis=0))

        # ------------------------------------------------------------ K pass 0
        # packed top-k: the shift that makes the k masses sum to 1 − tail
        shift = 0.0
        log_tail = tl.zeros([], dtype=tl.float64) + NEG_INF  # the stored tail mass, packed top-k
        if PACKED:
            if METHOD == 0:
                # float64: a top mass of 1 − 1e-8 beside small ones keeps its 1e-8
                m_r = tl.zeros([], dtype=tl.float64) + float("-inf")
                s_r = tl.zeros([BLOCK_K], dtype=tl.float64)
                for kb in range(0, K, BLOCK_K):
                    raw = _packed_raw(id_row, kb + ks0, K, VALUES_OFF, values_bytes, VALUE_BITS,
                                      INV_K, METHOD, VBITS16)
                    m_r, s_r = _lse_step(m_r, s_r, raw.to(tl.float64))
                t_lo = tl.load(id_row + 0).to(tl.int32)
                t_1 = tl.load(id_row + 1).to(tl.int32)
                t_2 = tl.load(id_row + 2).to(tl.int32)
                t_3 = tl.load(id_row + 3).to(tl.int32)
                tail_mass = (t_lo | (t_1 << 8) | (t_2 << 16) | (t_3 << 24)).to(tl.float32, bitcast=True)
                shift = tl.where(m_r > float("-inf"),
                                 _log1p(-tail_mass.to(tl.float64))
                                 - (m_r + tl.log(tl.sum(s_r, axis=0))), 0.0)
                log_tail = tl.log(tail_mass.to(tl.float64))

        # ------------------------------------------------------------ K pass 1
        # the number of valid entries, Σ P, the lse of lp, Σ_ids e^{u - max}
        n_valid = 0
        sum_p = tl.zeros([], dtype=tl.float64)
        m_p = NEG_INF
        s_p = tl.zeros([BLOCK_K], dtype=tl.float32)
        s_ids = tl.zeros([BLOCK_K], dtype=tl.float64)
        for kb in range(0, K, BLOCK_K):
            ks = kb + ks0
            lp, valid, idx = _entries(id_row, lp_row, ks, K, shift, IDS_OFF, ids_bytes, VALUES_OFF,
                                      values_bytes, ID_BITS, VALUE_BITS, INV_K, PACKED, METHOD,
                                      VBITS16)
            zi = tl.load(s_row + idx, mask=valid, other=NEG_INF).to(tl.float32)
            bad = bad | (tl.sum(((lp != lp) | (lp == float("inf"))).to(tl.int32), axis=0) > 0)
            n_valid += tl.sum(valid.to(tl.int32), axis=0)
            # float64: the teacher's tail 1 − Σ P keeps its precision
            sum_p += tl.sum(tl.where(valid, tl.exp(lp.to(tl.float64)), 0.0), axis=0)
            m_p, s_p = _lse_step(m_p, s_p, lp)
            s_ids += tl.where(valid, _exp_rel(zi, inv_t, m_u), 0.0).to(tl.float64)
        lse_p = m_p + tl.log(tl.sum(s_p, axis=0))
        sum_ids = tl.sum(s_ids, axis=0)
        sum_tail = sum_all - sum_ids
        # log Σ_k q_k and log Q_tail, in float64
        lse_q = tl.log(sum_ids / sum_all)
        lq_tail = tl.where(sum_tail > 0.0, tl.log(sum_tail / sum_all), NEG_INF)

        # ------------------------------------------------------------ K pass 2
        # The bin math (K+1 values a row) runs in float64, as the cpp kernel's:
        # a near-one-hot row's gradient at an id, G_k − Q_k·S, is a difference
        # of nearly equal terms that float32 would flush to 0.
        loss = tl.zeros([], dtype=tl.float64)
        big_s = tl.zeros([], dtype=tl.float64)
        for kb in range(0, K, BLOCK_K):
            ks = kb + ks0
            lp, valid, idx = _entries(id_row, lp_row, ks, K, shift, IDS_OFF, ids_bytes, VALUES_OFF,
                                      values_bytes, ID_BITS, VALUE_BITS, INV_K, PACKED, METHOD,
                                      VBITS16)
            zi = tl.load(s_row + idx, mask=valid, other=0.0).to(tl.float32)
            if NEED_GRAD:
                tl.store(zk_row + ks, zi, mask=ks < K)
            lu = tl.where(valid, (zi * inv_t - m_u).to(tl.float64) - ls_u64, NEG_INF)
            lp = lp.to(tl.float64)
            if TAIL == 2:  # none: P (lp - lu)
                p = tl.exp(lp)
                loss += tl.sum(tl.where(valid & (p > 0.0), p * (lp - lu), 0.0), axis=0)
            else:
                if TAIL == 1:  # renormalize over the ids
                    blp = tl.where(valid, lp - lse_p, NEG_INF)
                    blq = tl.where(valid, lu - lse_q, NEG_INF)
                else:
                    blp = lp
                    blq = lu
                term, g, dq = _bin(blp, blq, param, log_wp, log_wq, DIV)
                loss += tl.sum(tl.where(valid, term, 0.0), axis=0)
                big_s += tl.sum(tl.where(valid, g, 0.0), axis=0)
        c_row = tl.zeros([], dtype=tl.float64)
        if TAIL == 0:  # the tail bin; none when the ids cover the vocabulary
            covered = n_valid == V
            if PACKED and METHOD == 0:  # stored: 1 − Σ P would lose a tail below float32 rounding
                lp_t = tl.where(covered, NEG_INF, log_tail)
            else:
                lp_t = tl.where(covered | (sum_p >= 1.0), NEG_INF, tl.log(1.0 - sum_p))
            lq_t = tl.where(covered, NEG_INF, lq_tail)
            term_t, g_t, dq_t = _bin(lp_t, lq_t, param, log_wp, log_wq, DIV)
            loss += term_t
            big_s += g_t
            c_row = tl.where(lq_t == NEG_INF, 0.0, dq_t) - big_s
        if TAIL == 2:
            c_row = sum_p

        # ------------------------------------------------------------ pass B
        z_label = 0.0
        if CE:
            z_label = tl.load(s_row + label).to(tl.float32)
        if NEED_GRAD:
            coef_a = (c_soft * c_row).to(tl.float32)
            if CE and not CE_OWN_LSE:
                coef_a += c_hard
            sgn_a = tl.where(coef_a < 0.0, -1.0, 1.0)
            off_a = tl.log(tl.abs(coef_a)) - ls_u  # -inf when coef_a = 0: every term 0
            off_b = tl.log(c_hard) - ls_z
            for start in range(0, V, BLOCK_V):
                cols = start + cols0
                mask = cols < V
                xs = tl.load(s_row + cols, mask=mask, other=NEG_INF).to(tl.float32)
                dz = sgn_a * tl.exp((xs * inv_t - m_u) + off_a)
                if CE:
                    if CE_OWN_LSE:
                        dz += tl.exp((xs - m_zc) + off_b)
                    dz = tl.where(cols == label, dz - c_hard, dz)
                dz = tl.where(bad, float("nan"), dz)
                tl.store(o_row + cols, dz.to(OUT.dtype.element_ty), mask=mask)
            # the id positions below overwrite what this pass wrote there
            tl.debug_barrier()

            # -------------------------------------------------------- K pass 3
            for kb in range(0, K, BLOCK_K):
                ks = kb + ks0
                lp, valid, idx = _entries(id_row, lp_row, ks, K, shift, IDS_OFF, ids_bytes,
                                          VALUES_OFF, values_bytes, ID_BITS, VALUE_BITS, INV_K,
                                          PACKED, METHOD, VBITS16)
                zi = tl.load(zk_row + ks, mask=valid, other=0.0)
                lu = tl.where(valid, (zi * inv_t - m_u).to(tl.float64) - ls_u64, NEG_INF)
                lp = lp.to(tl.float64)
                if TAIL == 2:
                    gk = tl.exp(lu) * c_row - tl.exp(lp)
                else:
                    if TAIL == 1:
                        blp = tl.where(valid, lp - lse_p, NEG_INF)
                        blq = tl.where(valid, lu - lse_q, NEG_INF)
                    else:
                        blp = lp
                        blq = lu
                    term, g, dq = _bin(blp, blq, param, log_wp, log_wq, DIV)
                    gk = g - tl.exp(blq) * big_s
                v = c_soft * gk
                if CE:
                    if CE_OWN_LSE:
                        sm = tl.exp((zi - m_zc) - ls_z)
                    else:
                        sm = tl.exp(lu)
                    v += c_hard * (sm - tl.where(idx == label, 1.0, 0.0))
                v = tl.where(bad, float("nan"), v)
                tl.store(o_row + idx, v.to(tl.float32).to(OUT.dtype.element_ty), mask=valid)

        row_loss = ((1.0 - hard_weight) * soft_scale * loss).to(tl.float32)
        if CE:
            row_loss += hard_weight * ((m_zc - z_label) + ls_z)
        tl.store(LOSS + row, tl.where(bad, float("nan"), row_loss))


# --------------------------------------------------------------------- wrapper
def _check_inputs(student, ids, logprobs, labels, divergence, tail, temperature, hard_weight):
    if student.dim() != 2 or not student.is_contiguous():
        raise ValueError("sparse_kd_forward: student must be a contiguous (N, V) tensor")
    if student.dtype not in _FLOAT_DTYPES:
        raise TypeError("sparse_kd_forward: the triton backend takes float32, bfloat16 or float16 logits")
    if student.shape[1] == 0:
        raise ValueError("sparse_kd_forward: the vocabulary must not be empty")
    if ids is None:  # packed rows: checked by the caller
        pass
    elif (ids.dim() != 2 or ids.shape[0] != student.shape[0] or not ids.is_contiguous()
            or ids.dtype != torch.int64 or ids.device != student.device):
        raise ValueError("sparse_kd_forward: ids must be a contiguous int64 tensor of shape (N, K)")
    elif (logprobs.shape != ids.shape or not logprobs.is_contiguous() or logprobs.dtype != torch.float32
            or logprobs.device != student.device):
        raise ValueError("sparse_kd_forward: logprobs must be a contiguous float32 tensor shaped like ids")
    if not (0 <= divergence < len(DIVERGENCES)) or divergence == _TAID:
        raise ValueError(f"sparse_kd_forward: divergence {divergence} is not defined on sparse teachers")
    if not (0 <= tail < 3):
        raise ValueError(f"sparse_kd_forward: unknown tail {tail}")
    if tail == _NONE and divergence != _FORWARD_KL:
        raise ValueError("sparse_kd_forward: tail 'none' supports forward_kl only")
    if not temperature > 0:
        raise ValueError("sparse_kd_forward: temperature must be > 0")
    if labels is not None:
        if (labels.dim() != 1 or labels.shape[0] != student.shape[0] or not labels.is_contiguous()
                or labels.dtype != torch.int64 or labels.device != student.device):
            raise ValueError("sparse_kd_forward: labels must be a contiguous int64 tensor of shape (N,)")
    elif hard_weight > 0:
        raise ValueError("sparse_kd_forward: hard_weight > 0 needs labels")


def _launch_config(V: int, K: int) -> tuple[int, int, int]:
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(max(V, 1)))
    block_k = min(MAX_BLOCK_K, triton.next_power_of_2(max(K, 1)))
    num_warps = 16 if block_v >= 4096 else 8 if block_v >= 2048 else 4
    return block_v, block_k, num_warps


def sparse_kd_forward(
    student: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    ignore_index: int,
    divergence: int,
    tail: int,
    param: float,
    temperature: float,
    hard_weight: float,
    soft_scale: float,
    mean_scale: bool,
    need_grad: bool = True,
    out: torch.Tensor | None = None,
    layout: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (float32, (N,)) and the gradient w.r.t. the student logits.

    ``loss_rows = (1 - hard_weight) * soft_scale * D_bins + hard_weight * CE``
    (0 at ignored rows); the gradient, in the student's dtype, is
    ``grad_scale * d loss_row / d z`` with ``grad_scale = 1 / max(#kept rows, 1)``
    if ``mean_scale`` else 1; empty without ``need_grad``. ``ids`` int64 and
    ``logprobs`` float32 (N, K), -inf marking padding; the ids of finite
    entries must be distinct and in [0, V) (the public function checks).
    ``out=student`` writes the gradient over the logits (in place) and returns it.
    With ``layout`` (``Codec.layout()``), ``ids`` is packed soft-label rows
    (N, row_bytes) uint8 and ``logprobs`` is None: the kernel unpacks them.
    """
    divergence = int(divergence)
    tail = int(tail)
    hard_weight = float(hard_weight)
    packed = layout is not None
    if packed:
        method, vocab, K, value_bits, id_bits, values_off, ids_off, row_bytes = (int(x) for x in layout)
        if (ids.dtype != torch.uint8 or ids.dim() != 2 or ids.shape != (student.shape[0], row_bytes)
                or not ids.is_contiguous() or ids.device != student.device):
            raise ValueError("sparse_kd_forward: packed rows must be a contiguous uint8 tensor "
                             f"(N, {row_bytes}) on the student's device")
        if id_bits > 25 or (method == 1 and value_bits > 25):
            raise ValueError("sparse_kd_forward: the triton unpack reads fields of at most 25 bits")
        if vocab != student.shape[1]:
            raise ValueError(f"sparse_kd_forward: the student's vocabulary ({student.shape[1]}) "
                             f"differs from the soft labels' ({vocab})")
        logprobs = ids  # never read when packed
        _check_inputs(student, None, None, labels, divergence, tail, temperature, hard_weight)
    else:
        method = value_bits = id_bits = values_off = ids_off = row_bytes = 0
        _check_inputs(student, ids, logprobs, labels, divergence, tail, temperature, hard_weight)
        K = ids.shape[1]
    N, V = student.shape
    device = student.device
    loss_rows = torch.empty((N,), dtype=torch.float32, device=device)
    if out is not None and need_grad:
        grad = out
    elif need_grad:
        grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    else:
        grad = student.new_empty((0,))
    if N == 0:
        return loss_rows, grad
    ce = hard_weight > 0
    if ce:  # out-of-range labels would read out of bounds
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"sparse_kd_forward: labels[{i}] = {int(labels[i])} is neither in [0, {V}) nor ignore_index")

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

    block_v, block_k, num_warps = _launch_config(V, K)
    _sparse_fwd_kernel[(N,)](
        student,
        ids,
        logprobs,
        grad if need_grad else student,  # never written without need_grad
        torch.empty((N, K) if need_grad else (1,), dtype=torch.float32, device=device),
        labels if labels is not None else loss_rows,  # dummy pointer, never read
        loss_rows,
        coef,
        V,
        K,
        int(ignore_index),
        1.0 / float(temperature),
        float(param),
        log_wp,
        log_wq,
        hard_weight,
        float(soft_scale),
        row_bytes,
        values_off,
        ids_off,
        id_bits,
        value_bits,
        1.0 / K,
        DIV=divergence,
        TAIL=tail,
        HAS_LABELS=labels is not None,
        CE=ce,
        CE_OWN_LSE=ce and float(temperature) != 1.0,
        NEED_GRAD=bool(need_grad),
        BLOCK_V=block_v,
        BLOCK_K=block_k,
        num_warps=num_warps,
        PACKED=packed,
        METHOD=method,
        VBITS16=value_bits == 16,
    )
    return loss_rows, grad
