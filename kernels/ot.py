"""Triton backend of entropic OT between point clouds (``fastdistill::ot_softmin``
and ``fastdistill::ot_transport_grad``; same contract as ``csrc/ot/ot_cpu.cpp``)
and of SinKD's L1 cost (``fastdistill::sinkd_l1_cost[_backward]``, as
``csrc/ot/sinkd_cpu.cpp``: tiles of W over V, never a B×B×V difference tensor).

The cost C_ij = |x_i − y_j|^p / p is never stored. One program takes
``BLOCK_N`` points of x and walks y in ``BLOCK_M`` tiles (flash-attention
style), building each tile of costs from ``BLOCK_K`` slices of the
coordinates:
  p = 2  ½|x|² + ½|y|² − x·y (clamped at 0), the dot products by ``tl.dot``
         in full fp32 (``input_precision="ieee"``: TF32 would cost ~1e-3 of
         the cost, magnified by 1/ε in the exponent);
  p = 1  exact differences, √Σ(x − y)².
``softmin``: out_i = −ε LSE_j(h_j − C_ij/ε), an online log-sum-exp across
the tiles. ``transport_grad``: out_i = Σ_j W_ij (x_i − y_j) with
W_ij = P_ij (p = 2) or P_ij / C_ij (p = 1, 0 where x_i = y_j) and
P_ij = exp(l_i + h_j − C_ij/ε); each program owns one ``BLOCK_D`` slice of
the output coordinates (the cost tile is rebuilt per slice).

On a given (materialized) cost C (B, N, M), contiguous, float32/bf16/fp16 read
in its dtype (fastdistill/ot.py's ``sinkhorn`` and the tensorized divergence;
the torch half-steps ``ot._lse_rows``/``ot._lse_cols`` are the spec):
``dense_softmin_rows`` f_i = −ε LSE_j((g_j − C_ij)/ε + log b_j) and
``dense_softmin_cols`` g_j = −ε LSE_i((f_i − C_ij)/ε + log a_i), one program
per block of rows (columns) walking the other side in tiles with an online
log-sum-exp; ε is read from a device tensor (an ε-scaling schedule never
leaves the device). ``dense_plan`` and ``dense_value`` give
scale·P and ⟨P, C⟩ (P never stored for the value).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 32
BLOCK_M = 32
MAX_BLOCK_D = 32  # output coordinates per program of transport_grad


@triton.jit
def _cost_tile(x_base, y_base, hx, hy, rows, cols, N, M, D,
               P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_M) costs of x rows ``rows`` against y points ``cols``,
    from BLOCK_K coordinates at a time."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        dims = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_base + rows[:, None] * D + dims[None, :],
                     mask=(rows[:, None] < N) & (dims[None, :] < D), other=0.0)
        yk = tl.load(y_base + cols[:, None] * D + dims[None, :],
                     mask=(cols[:, None] < M) & (dims[None, :] < D), other=0.0)
        if P == 2:
            acc += tl.dot(xk, tl.trans(yk), input_precision="ieee")
        else:
            diff = xk[:, None, :] - yk[None, :, :]
            acc += tl.sum(diff * diff, axis=2)
    if P == 2:
        return tl.maximum(hx[:, None] + hy[None, :] - acc, 0.0)
    return tl.sqrt(acc)


@triton.jit
def _tile(x_base, y_base, hx, hy_ptr, h_ptr, b, rows, j0, N, M, D,
          P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The tile of y points from j0: their indices, mask, the cost tile and h."""
    cols = j0 + tl.arange(0, BLOCK_M)
    cmask = cols < M
    hy = tl.load(hy_ptr + b * M + cols, mask=cmask, other=0.0)
    c = _cost_tile(x_base, y_base, hx, hy, rows, cols, N, M, D, P, BLOCK_N, BLOCK_M, BLOCK_K)
    hv = tl.load(h_ptr + b * M + cols, mask=cmask, other=float("-inf"))
    return cols, cmask, c, hv


@triton.jit
def _softmin_kernel(x_ptr, y_ptr, hx_ptr, hy_ptr, h_ptr, out_ptr, N, M, D, eps, inv_eps,
                    P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    x_base = x_ptr + b * N * D
    y_base = y_ptr + b * M * D
    hx = tl.load(hx_ptr + b * N + rows, mask=rmask, other=0.0)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j0 in range(0, M, BLOCK_M):
        cols, cmask, c, hv = _tile(x_base, y_base, hx, hy_ptr, h_ptr, b, rows, j0, N, M, D,
                                   P, BLOCK_N, BLOCK_M, BLOCK_K)
        e = hv[None, :] - c * inv_eps
        m_new = tl.maximum(m, tl.max(e, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(e - m_safe[:, None]), axis=1)
        m = m_new
    tl.store(out_ptr + b * N + rows, -eps * (m + tl.log(s)), mask=rmask)


@triton.jit
def _transport_grad_kernel(x_ptr, y_ptr, hx_ptr, hy_ptr, l_ptr, h_ptr, out_ptr, N, M, D, inv_eps,
                           P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    dblk = tl.program_id(1)
    b = tl.program_id(2)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    dims = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dims < D
    x_base = x_ptr + b * N * D
    y_base = y_ptr + b * M * D
    hx = tl.load(hx_ptr + b * N + rows, mask=rmask, other=0.0)
    lv = tl.load(l_ptr + b * N + rows, mask=rmask, other=float("-inf"))
    wsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    wy = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, M, BLOCK_M):
        cols, cmask, c, hv = _tile(x_base, y_base, hx, hy_ptr, h_ptr, b, rows, j0, N, M, D,
                                   P, BLOCK_N, BLOCK_M, BLOCK_K)
        w = tl.exp(lv[:, None] + hv[None, :] - c * inv_eps)
        if P == 1:
            w = tl.where(c > 0.0, w / tl.where(c > 0.0, c, 1.0), 0.0)
        w = tl.where(rmask[:, None] & cmask[None, :], w, 0.0)
        wsum += tl.sum(w, axis=1)
        yd = tl.load(y_base + cols[:, None] * D + dims[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        wy += tl.dot(w, yd, input_precision="ieee")
    xd = tl.load(x_base + rows[:, None] * D + dims[None, :],
                 mask=rmask[:, None] & dmask[None, :], other=0.0)
    tl.store(out_ptr + (b * N + rows[:, None]) * D + dims[None, :], wsum[:, None] * xd - wy,
             mask=rmask[:, None] & dmask[None, :])


def _check(op: str, x: torch.Tensor, y: torch.Tensor, p: int, eps: float) -> None:
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"{op}: x and y must be (B, N, d) and (B, M, d), got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if x.dtype != torch.float32 or y.dtype != torch.float32:
        raise TypeError(f"{op}: x and y must be float32")
    if p not in (1, 2):
        raise ValueError(f"{op}: p must be 1 or 2, got {p}")
    if not eps > 0:
        raise ValueError(f"{op}: eps must be > 0")


def _half_sq_norms(v: torch.Tensor) -> torch.Tensor:
    return 0.5 * (v.double() * v.double()).sum(-1).float()


def _block_d(D: int) -> int:
    """Output coordinates per program (tl.dot needs at least 16)."""
    return min(MAX_BLOCK_D, max(16, triton.next_power_of_2(D)))


def _block_k(D: int, p: int) -> int:
    """Coordinates per cost slice: tl.dot's 16+ for p = 2; few for p = 1,
    whose (BLOCK_N, BLOCK_M, BLOCK_K) differences live in registers."""
    return _block_d(D) if p == 2 else min(4, triton.next_power_of_2(D))


def softmin(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, eps: float, p: int) -> torch.Tensor:
    """out (B, N) = −ε LSE_j(h_j − C(x_i, y_j)/ε); x (B, N, d), y (B, M, d), h (B, M)."""
    _check("ot_softmin", x, y, p, eps)
    x, y, h = x.contiguous(), y.contiguous(), h.float().contiguous()
    B, N, D = x.shape
    M = y.shape[1]
    out = torch.empty((B, N), dtype=torch.float32, device=x.device)
    if B == 0 or N == 0:
        return out
    grid = (triton.cdiv(N, BLOCK_N), B)
    _softmin_kernel[grid](x, y, _half_sq_norms(x), _half_sq_norms(y), h, out, N, M, D,
                          float(eps), 1.0 / float(eps), P=p, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M,
                          BLOCK_K=_block_k(D, p))
    return out


def transport_grad(x: torch.Tensor, y: torch.Tensor, l: torch.Tensor, h: torch.Tensor,  # noqa: E741
                   eps: float, p: int) -> torch.Tensor:
    """out (B, N, d) = Σ_j P_ij ∇_x C(x_i, y_j), P_ij = exp(l_i + h_j − C_ij/ε)."""
    _check("ot_transport_grad", x, y, p, eps)
    x, y = x.contiguous(), y.contiguous()
    l, h = l.float().contiguous(), h.float().contiguous()
    B, N, D = x.shape
    M = y.shape[1]
    out = torch.zeros((B, N, D), dtype=torch.float32, device=x.device)
    if B == 0 or N == 0 or D == 0:
        return out
    bd = _block_d(D)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(D, bd), B)
    _transport_grad_kernel[grid](x, y, _half_sq_norms(x), _half_sq_norms(y), l, h, out, N, M, D,
                                 1.0 / float(eps), P=p, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M,
                                 BLOCK_K=_block_k(D, p), BLOCK_D=bd)
    return out


# --------------------------------------------------------------------- a given cost
DENSE_BLOCK_N = 32
DENSE_BLOCK_M = 64


@triton.jit
def _dense_rows_kernel(c_ptr, v_ptr, lw_ptr, eps_ptr, out_ptr, N, M,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """out_b,i = −ε LSE_j((v_b,j − C_b,ij)/ε + lw_b,j) for BLOCK_N rows."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    eps = tl.load(eps_ptr).to(tl.float32)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    base = c_ptr + b * N * M
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j0 in range(0, M, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        cmask = cols < M
        mask = rmask[:, None] & cmask[None, :]
        c = tl.load(base + rows[:, None].to(tl.int64) * M + cols[None, :], mask=mask, other=0.0)
        v = tl.load(v_ptr + b * M + cols, mask=cmask, other=0.0)
        lw = tl.load(lw_ptr + b * M + cols, mask=cmask, other=float("-inf"))
        e = (v[None, :] - c.to(tl.float32)) / eps + lw[None, :]
        e = tl.where(mask, e, float("-inf"))
        m_new = tl.maximum(m, tl.max(e, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(e - m_safe[:, None]), axis=1)
        m = m_new
    s = tl.where(rmask, s, 1.0)  # rows past N: no log(0)
    tl.store(out_ptr + b * N + rows, -eps * (m + tl.log(s)), mask=rmask)


@triton.jit
def _dense_cols_kernel(c_ptr, v_ptr, lw_ptr, eps_ptr, out_ptr, N, M,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """out_b,j = −ε LSE_i((v_b,i − C_b,ij)/ε + lw_b,i) for BLOCK_M columns."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    eps = tl.load(eps_ptr).to(tl.float32)
    cols = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cmask = cols < M
    base = c_ptr + b * N * M
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for i0 in range(0, N, BLOCK_N):
        rows = i0 + tl.arange(0, BLOCK_N)
        rmask = rows < N
        mask = rmask[:, None] & cmask[None, :]
        c = tl.load(base + rows[:, None].to(tl.int64) * M + cols[None, :], mask=mask, other=0.0)
        v = tl.load(v_ptr + b * N + rows, mask=rmask, other=0.0)
        lw = tl.load(lw_ptr + b * N + rows, mask=rmask, other=float("-inf"))
        e = (v[:, None] - c.to(tl.float32)) / eps + lw[:, None]
        e = tl.where(mask, e, float("-inf"))
        m_new = tl.maximum(m, tl.max(e, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(e - m_safe[None, :]), axis=0)
        m = m_new
    s = tl.where(cmask, s, 1.0)  # columns past M: no log(0)
    tl.store(out_ptr + b * M + cols, -eps * (m + tl.log(s)), mask=cmask)


@triton.jit
def _dense_plan_kernel(c_ptr, f_ptr, g_ptr, la_ptr, lb_ptr, scale_ptr, out_ptr, N, M, eps,
                       HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """out = scale_b · exp((f_i + g_j − C_ij)/ε + log a_i + log b_j), one tile."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = tl.program_id(2).to(tl.int64)
    rmask, cmask = rows < N, cols < M
    mask = rmask[:, None] & cmask[None, :]
    off = b * N * M + rows[:, None].to(tl.int64) * M + cols[None, :]
    c = tl.load(c_ptr + off, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + b * N + rows, mask=rmask, other=0.0)
    la = tl.load(la_ptr + b * N + rows, mask=rmask, other=float("-inf"))  # lanes past N, M: P = 0
    g = tl.load(g_ptr + b * M + cols, mask=cmask, other=0.0)
    lb = tl.load(lb_ptr + b * M + cols, mask=cmask, other=float("-inf"))
    p = tl.exp((f[:, None] + g[None, :] - c) / eps + la[:, None] + lb[None, :])
    if HAS_SCALE:
        p = p * tl.load(scale_ptr + b)
    tl.store(out_ptr + off, p.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dense_value_kernel(c_ptr, f_ptr, g_ptr, la_ptr, lb_ptr, out_ptr, N, M, eps,
                        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """out_b,i = Σ_j P_ij C_ij for BLOCK_N rows (P never stored)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(1).to(tl.int64)
    rmask = rows < N
    f = tl.load(f_ptr + b * N + rows, mask=rmask, other=0.0)
    la = tl.load(la_ptr + b * N + rows, mask=rmask, other=float("-inf"))  # lanes past N, M: P = 0
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j0 in range(0, M, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        cmask = cols < M
        mask = rmask[:, None] & cmask[None, :]
        c = tl.load(c_ptr + b * N * M + rows[:, None].to(tl.int64) * M + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        g = tl.load(g_ptr + b * M + cols, mask=cmask, other=0.0)
        lb = tl.load(lb_ptr + b * M + cols, mask=cmask, other=float("-inf"))
        p = tl.exp((f[:, None] + g[None, :] - c) / eps + la[:, None] + lb[None, :])
        acc += tl.sum(p * c, axis=1)
    tl.store(out_ptr + b * N + rows, acc, mask=rmask)


def _check_dense(op: str, C: torch.Tensor) -> None:
    if C.dim() != 3:
        raise ValueError(f"{op}: cost must be (B, N, M), got {tuple(C.shape)}")
    if C.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: cost must be float32, bfloat16 or float16, got {C.dtype}")


def _eps_on(eps, device: torch.device) -> torch.Tensor:
    """ε as a one-element float32 tensor on the device (no host read of a tensor ε)."""
    if isinstance(eps, torch.Tensor):
        return eps.reshape(1).to(device=device, dtype=torch.float32)
    return torch.full((1,), float(eps), dtype=torch.float32, device=device)


def _dense_softmin(C, v, lw, eps, over_rows: bool):
    _check_dense("dense_softmin", C)
    C = C.contiguous()
    B, N, M = C.shape
    n = N if over_rows else M
    out = torch.empty((B, n), dtype=torch.float32, device=C.device)
    if out.numel() == 0:
        return out
    v, lw = v.float().contiguous(), lw.float().contiguous()
    e = _eps_on(eps, C.device)
    if over_rows:
        grid = (triton.cdiv(N, DENSE_BLOCK_N), B)
        _dense_rows_kernel[grid](C, v, lw, e, out, N, M, BLOCK_N=DENSE_BLOCK_N, BLOCK_M=DENSE_BLOCK_M)
    else:
        grid = (triton.cdiv(M, DENSE_BLOCK_M), B)
        _dense_cols_kernel[grid](C, v, lw, e, out, N, M, BLOCK_N=DENSE_BLOCK_N, BLOCK_M=DENSE_BLOCK_M)
    return out


def dense_softmin_rows(C: torch.Tensor, g: torch.Tensor, logb: torch.Tensor, eps) -> torch.Tensor:
    """f (B, N) = −ε LSE_j((g_j − C_ij)/ε + log b_j): ``ot._lse_rows`` on (B, N, M)."""
    return _dense_softmin(C, g, logb, eps, True)


def dense_softmin_cols(C: torch.Tensor, f: torch.Tensor, loga: torch.Tensor, eps) -> torch.Tensor:
    """g (B, M) = −ε LSE_i((f_i − C_ij)/ε + log a_i): ``ot._lse_cols`` on (B, N, M)."""
    return _dense_softmin(C, f, loga, eps, False)


def dense_plan(C, f, g, loga, logb, eps: float, scale, dtype) -> torch.Tensor:
    """scale_b · P (B, N, M) in dtype (contract of fastdistill::sinkhorn_plan)."""
    _check_dense("dense_plan", C)
    C = C.contiguous()
    B, N, M = C.shape
    out = torch.empty((B, N, M), dtype=dtype, device=C.device)
    if out.numel() == 0:
        return out
    sc = scale.float().contiguous() if scale is not None else f
    grid = (triton.cdiv(N, DENSE_BLOCK_N), triton.cdiv(M, DENSE_BLOCK_M), B)
    _dense_plan_kernel[grid](C, f.contiguous(), g.contiguous(), loga.contiguous(), logb.contiguous(), sc,
                             out, N, M, float(eps), HAS_SCALE=scale is not None,
                             BLOCK_N=DENSE_BLOCK_N, BLOCK_M=DENSE_BLOCK_M)
    return out


def dense_value(C, f, g, loga, logb, eps: float) -> torch.Tensor:
    """(B,) Σ_ij P_ij C_ij (contract of fastdistill::sinkhorn_value)."""
    _check_dense("dense_value", C)
    C = C.contiguous()
    B, N, M = C.shape
    rows = torch.zeros((B, N), dtype=torch.float32, device=C.device)
    if rows.numel() and M:
        grid = (triton.cdiv(N, DENSE_BLOCK_N), B)
        _dense_value_kernel[grid](C, f.contiguous(), g.contiguous(), loga.contiguous(), logb.contiguous(),
                                  rows, N, M, float(eps), BLOCK_N=DENSE_BLOCK_N, BLOCK_M=DENSE_BLOCK_M)
    return rows.sum(-1)


# --------------------------------------------------------------------- SinKD's L1 cost
SINKD_BLOCK_B = 16  # rows of q (and of p) per program
SINKD_BLOCK_V = 32  # vocabulary columns per step


@triton.jit
def _sinkd_l1_kernel(q_ptr, p_ptr, w_ptr, Bq, Bp, V,
                     BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr):
    """W[i, j] = Σ_v |q_iv − p_jv| for one (BLOCK_B × BLOCK_B) tile of W."""
    ri = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rj = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    acc = tl.zeros((BLOCK_B, BLOCK_B), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        vs = v0 + tl.arange(0, BLOCK_V)
        q = tl.load(q_ptr + ri[:, None] * V + vs[None, :], mask=(ri[:, None] < Bq) & (vs[None, :] < V), other=0.0)
        p = tl.load(p_ptr + rj[:, None] * V + vs[None, :], mask=(rj[:, None] < Bp) & (vs[None, :] < V), other=0.0)
        acc += tl.sum(tl.abs(q[:, None, :] - p[None, :, :]), axis=2)
    tl.store(w_ptr + ri[:, None] * Bp + rj[None, :], acc, mask=(ri[:, None] < Bq) & (rj[None, :] < Bp))


@triton.jit
def _sinkd_l1_backward_kernel(q_ptr, p_ptr, g_ptr, dq_ptr, Bq, Bp, V,
                              BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr):
    """dq[i, v] = Σ_j G_ij sign(q_iv − p_jv) for BLOCK_B rows and BLOCK_V columns."""
    ri = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    vs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    vmask = vs < V
    q = tl.load(q_ptr + ri[:, None] * V + vs[None, :], mask=(ri[:, None] < Bq) & vmask[None, :], other=0.0)
    acc = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
    for j0 in range(0, Bp, BLOCK_B):
        rj = j0 + tl.arange(0, BLOCK_B)
        p = tl.load(p_ptr + rj[:, None] * V + vs[None, :], mask=(rj[:, None] < Bp) & vmask[None, :], other=0.0)
        g = tl.load(g_ptr + ri[:, None] * Bp + rj[None, :], mask=(ri[:, None] < Bq) & (rj[None, :] < Bp),
                    other=0.0)
        d = q[:, None, :] - p[None, :, :]
        sign = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
        acc += tl.sum(g[:, :, None] * sign, axis=1)
    tl.store(dq_ptr + ri[:, None] * V + vs[None, :], acc, mask=(ri[:, None] < Bq) & vmask[None, :])


def _check_rows(op: str, q: torch.Tensor, p: torch.Tensor) -> None:
    if q.dim() != 2 or p.dim() != 2 or q.shape[1] != p.shape[1]:
        raise ValueError(f"{op}: q and p must be (Bq, V) and (Bp, V), got {tuple(q.shape)} and "
                         f"{tuple(p.shape)}")
    if q.dtype != torch.float32 or p.dtype != torch.float32:
        raise TypeError(f"{op}: q and p must be float32")


def sinkd_l1_cost(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """W (Bq, Bp) = Σ_v |q_iv − p_jv| (contract of fastdistill::sinkd_l1_cost)."""
    _check_rows("sinkd_l1_cost", q, p)
    q, p = q.contiguous(), p.contiguous()
    Bq, V = q.shape
    Bp = p.shape[0]
    w = torch.zeros((Bq, Bp), dtype=torch.float32, device=q.device)
    if Bq and Bp and V:
        grid = (triton.cdiv(Bq, SINKD_BLOCK_B), triton.cdiv(Bp, SINKD_BLOCK_B))
        _sinkd_l1_kernel[grid](q, p, w, Bq, Bp, V, BLOCK_B=SINKD_BLOCK_B, BLOCK_V=SINKD_BLOCK_V)
    return w


def sinkd_l1_cost_backward(q: torch.Tensor, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dq (Bq, V) = Σ_j G_ij sign(q_iv − p_jv) (contract of fastdistill::sinkd_l1_cost_backward)."""
    _check_rows("sinkd_l1_cost_backward", q, p)
    q, p, grad = q.contiguous(), p.contiguous(), grad.float().contiguous()
    Bq, V = q.shape
    Bp = p.shape[0]
    dq = torch.zeros_like(q)
    if Bq and Bp and V:
        grid = (triton.cdiv(Bq, SINKD_BLOCK_B), triton.cdiv(V, SINKD_BLOCK_V))
        _sinkd_l1_backward_kernel[grid](q, p, grad, dq, Bq, Bp, V, BLOCK_B=SINKD_BLOCK_B,
                                        BLOCK_V=SINKD_BLOCK_V)
    return dq
