"""Entropic optimal transport: ``sinkhorn``, ``sinkhorn_divergence`` and the
SinKD batch-wise KD loss ``sinkhorn_kd_loss``.

This module is the pure-torch backend (``shared/notes/kd-math.md`` §4): the
readable specification that every fast kernel of the family is checked
against. The iterations run in the log domain, so tiny ε or fp16 costs never
underflow the Gibbs kernel exp(−C/ε) the way the linear-domain form does.

Conventions, for one problem with cost C (N×M), weights a (N), b (M), ε > 0:

    f_i = −ε LSE_j((g_j − C_ij)/ε + log b_j)         (rows; first, from g = 0)
    g_j = −ε LSE_i((f_i − C_ij)/ε + log a_i)         (columns; one iteration = f then g)
    P_ij = a_i b_j exp((f_i + g_j − C_ij)/ε)         (the plan)
    OT_ε(a, b) = ⟨a, f⟩ + ⟨b, g⟩                     (the entropic objective, dual form)

Gradients come from the envelope (Danskin) theorem applied to OT_ε at
convergence: ∂OT_ε/∂C = P, ∂OT_ε/∂a = f, ∂OT_ε/∂b = g. No graph is kept
through the iterations (except in ``sinkhorn_kd_loss(gradient="unrolled")``).
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import torch

from . import _checks
from ._backend import resolve

KD_COSTS = ("l1", "sqeuclidean", "cosine")
# The largest W_ij of each SinKD cost between probability rows (sinkhorn_kd_loss's epsilon floor).
_KD_COST_MAX = {"l1": 2.0, "sqeuclidean": 2.0, "cosine": 1.0}
KD_GRADIENTS = ("envelope", "unrolled")
DIVERGENCE_MODES = ("auto", "online", "tensorized")

# Rounds between two early-exit checks of ``tol`` (a host read of "has every
# problem stopped?"); between them nothing leaves the device, and under
# torch.compile there is no check at all (all n_iters rounds run, the stopped
# problems frozen): the results are the same either way.
TOL_CHECK_EVERY = 10

# sinkhorn_divergence(mode="auto") stores the costs (tensorized) when all of
# them together, float32, take at most this many bytes (as GeomLoss picks its
# tensorized backend); above it the cost is rebuilt in every half-step (online).
TENSORIZED_BUDGET_BYTES = 256 * 1024 * 1024

__all__ = ["SinkhornResult", "sinkhorn", "sinkhorn_divergence", "sinkhorn_kd_loss",
           "KD_COSTS", "KD_GRADIENTS", "DIVERGENCE_MODES", "TENSORIZED_BUDGET_BYTES",
           "TOL_CHECK_EVERY"]


class SinkhornResult(NamedTuple):
    """What ``sinkhorn`` returns; every field has the batch shape (...) in front.

    value: ⟨P, C⟩, shape (...): the transport cost (POT's ``sinkhorn2``).
        Its backward is the envelope gradient of OT_ε (see ``sinkhorn``).
    f: (..., N) and g: (..., M): the potentials, centered so that
        ⟨a, f⟩ = ⟨b, g⟩ = OT_ε / 2; returned without gradient.
    plan: (..., N, M) with ``return_plan=True``, else None; without gradient.
    """

    value: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    plan: torch.Tensor | None


# --------------------------------------------------------------------------- first order

def _first_order_only(what: str):
    """Decorator for the backward of an autograd.Function with no second
    derivative: run it without a graph and, under create_graph=True, return
    its results from a node that raises (naming ``what``) when a second
    backward reaches it. The node hangs on the Function's saved inputs, so a
    second backward towards them (or anything upstream) always reaches it.

    torch's ``once_differentiable`` is not enough here: it ties the results
    only when an incoming gradient requires grad (for a scalar loss the seed
    is a constant, so they came back as constants), and to fresh leaves that
    a second backward towards the inputs never visits; either way a
    Hessian-vector product silently lost this op's part."""
    message = (f"{what} is first-order only: its gradient cannot be differentiated again "
               "(a second backward, after create_graph=True, went through it)").encode()

    def deco(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                out = backward(ctx, *grads)
            if not torch.is_grad_enabled():  # a plain backward (no create_graph)
                return out
            outs = out if isinstance(out, tuple) else (out,)
            tied = [t for t in outs if isinstance(t, torch.Tensor)]
            anchors = [t for t in ctx.saved_tensors if isinstance(t, torch.Tensor) and t.requires_grad]
            if not tied:
                return out
            fake = [t.detach().requires_grad_(True) for t in tied]
            err = torch._C._functions.DelayedError(message, len(fake) + len(anchors))
            raised = err(*fake, *anchors)
            raised = list(raised) if isinstance(raised, (tuple, list)) else [raised]
            it = iter(raised[:len(fake)])
            res = [next(it) if isinstance(t, torch.Tensor) else t for t in outs]
            return tuple(res) if isinstance(out, tuple) else res[0]
        return wrapper
    return deco


# --------------------------------------------------------------------------- checks

def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _positive_int(name: str, x) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < 1:
        raise ValueError(f"{name} must be >= 1, got {x}")
    return int(x)


def _weights(name: str, w, shape: torch.Size, device: torch.device,
             dtype: torch.dtype) -> torch.Tensor:
    """Non-negative finite weights of the given shape that sum to 1 per problem.

    They are used as given (never renormalized); the sum may differ from 1 by
    what the weights' own dtype can represent (max(1e-6, n·eps(dtype)))."""
    if w is None:
        n = shape[-1]
        return torch.full(shape, 1.0 / n, dtype=dtype, device=device)
    _checks.tensor(name, w, floating=True)
    if w.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(w.shape)}")
    if w.device != device:
        raise ValueError(f"{name} is on {w.device} but cost is on {device}")
    if w.numel() and not torch.compiler.is_compiling():  # value checks read the data: eager only
        if not torch.isfinite(w).all():
            raise ValueError(f"{name} must be finite")
        if (w < 0).any():
            raise ValueError(f"{name} must be non-negative, got min {w.min().item():g}")
        tol = max(1e-6, shape[-1] * torch.finfo(w.dtype).eps)
        err = (w.double().sum(-1) - 1).abs().max().item()
        if err > tol:
            raise ValueError(
                f"{name} must sum to 1 over its last dimension (each problem's weights), "
                f"off by up to {err:.3g} (tolerance {tol:.3g}); normalize it"
            )
    return w.to(dtype)


def _options(epsilon, n_iters, tol=None) -> tuple[float, int, float | None]:
    eps = _checks.real("epsilon", epsilon, low=0.0, low_open=True)
    n = _positive_int("n_iters", n_iters)
    if tol is not None:
        tol = _checks.real("tol", tol, low=0.0, low_open=True)
    return eps, n, tol


def _check_epsilon(eps: float, dtype: torch.dtype, max_cost: float | None) -> None:
    """Refuse an ε the work dtype cannot carry. Always (a check on a python float,
    free under torch.compile): ε must be a normal number of ``dtype`` (below,
    C/ε is inf or NaN). With ``max_cost`` (an upper bound of |C|, known in eager
    mode): ε >= max_cost·eps(dtype). The potentials are of the size of the costs
    and carry a rounding of max|C|·eps(dtype), which every exp((f + g − C)/ε)
    magnifies by 1/ε: below that floor one rounding step moves a plan entry by
    more than a factor e, and some 90 times below it the plan overflows to inf."""
    info = torch.finfo(dtype)
    if eps < info.tiny:
        raise ValueError(f"epsilon={eps:g} is below the smallest normal {dtype} "
                         f"({info.tiny:g}): C/epsilon is not representable")
    if max_cost is not None and eps < max_cost * info.eps:
        limit = max_cost * info.eps
        raise ValueError(
            f"epsilon={eps:g} is below what {dtype} resolves for costs up to {max_cost:g}: "
            f"epsilon must be >= max|cost|·eps({dtype}) = {limit:.3g} (the potentials' rounding, "
            "magnified by 1/epsilon in the plan)"
            + ("" if dtype == torch.float64 else "; use float64 (backend='torch') for a smaller "
               "epsilon"))


def _log(w: torch.Tensor) -> torch.Tensor:
    """log of the weights; a zero weight gives -inf, which every LSE below takes."""
    return w.log()


# --------------------------------------------------------------------------- the solver

def _lse_rows(C, g, logb, eps):
    """−ε LSE_j((g_j − C_ij)/ε + log b_j): the f update (the c-transform of g)."""
    return -eps * torch.logsumexp((g.unsqueeze(-2) - C) / eps + logb.unsqueeze(-2), dim=-1)


def _lse_cols(C, f, loga, eps):
    """−ε LSE_i((f_i − C_ij)/ε + log a_i): the g update."""
    return -eps * torch.logsumexp((f.unsqueeze(-1) - C) / eps + loga.unsqueeze(-1), dim=-2)


def _iterate(C, loga, logb, eps, n_iters, tol, rows=_lse_rows, cols=_lse_cols):
    """Log-domain Sinkhorn: n_iters rounds of (f update, g update), from g = 0.

    ``eps`` is one float or a schedule of n_iters values (ε-scaling; a list
    of floats or a 1-d tensor): round k updates f, then g, at eps[k]. After
    each g update the column marginals are exact; the row marginals are off
    by a_i (exp((f_i − f_new_i)/ε) − 1), which the next f update gives for
    free. With ``tol`` each problem of the batch stops at the first round
    whose L1 error is below tol, keeping the (f, g) it was measured on: its
    potentials are frozen from then on (no host sync); every
    ``TOL_CHECK_EVERY`` rounds, in eager mode, the loop ends once every
    problem has stopped. Plain torch ops (``rows``/``cols``: the half-steps,
    torch's or a kernel's): under autograd this is the unrolled graph.
    """
    sched = _schedule_list(eps, n_iters)
    g = torch.zeros_like(logb)
    f = rows(C, g, logb, sched[0])
    done = None
    for it in range(n_iters):
        g_new = cols(C, f, loga, sched[it])
        g = g_new if done is None else torch.where(done.unsqueeze(-1), g, g_new)
        if it == n_iters - 1:
            break
        f_new = rows(C, g, logb, sched[it + 1])
        if tol is None:
            f = f_new
            continue
        row_mass = torch.exp(loga + (f - f_new) / sched[it + 1])
        stop = (row_mass - loga.exp()).abs().sum(-1) < tol  # NaN never stops
        done = stop if done is None else done | stop
        f = torch.where(done.unsqueeze(-1), f, f_new)
        if ((it + 1) % TOL_CHECK_EVERY == 0 and not torch.compiler.is_compiling()
                and bool(done.all())):
            break
    return f, g


def _iterate_symmetric(C, loga, eps, n_iters, rows=_lse_rows):
    """The self-transport OT_ε(a, a) of a symmetric cost (debiasing terms):
    its potentials are equal (f = g), and the averaged update
    f ← ½(f + T(f)), T(f)_i = −ε LSE_j((f_j − C_ij)/ε + log a_j), from
    f = T(0), converges in a few steps (Feydy et al. 2019), where the
    alternating one oscillates. n_iters + 1 half-steps, round k at eps[k]."""
    sched = _schedule_list(eps, n_iters)
    f = rows(C, torch.zeros_like(loga), loga, sched[0])
    for it in range(n_iters):
        f = 0.5 * (f + rows(C, f, loga, sched[it]))
    return f


def _schedule_list(eps, n_iters):
    """ε per round: a list of floats, or the schedule tensor as it is."""
    return [eps] * n_iters if isinstance(eps, float) else eps


def _plan(C, f, g, loga, logb, eps):
    return torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - C) / eps
                     + loga.unsqueeze(-1) + logb.unsqueeze(-2))


def _center(f, g, a, b):
    """Shift (f + c, g − c), which changes neither P nor OT_ε, so that
    ⟨a, f⟩ = ⟨b, g⟩: a convention that depends on neither the start nor the
    number of iterations."""
    c = 0.5 * ((b * g).sum(-1) - (a * f).sum(-1))
    return f + c.unsqueeze(-1), g - c.unsqueeze(-1)


def _torch_plan(C, f, g, loga, logb, eps, scale, dtype):
    P = _plan(C, f, g, loga, logb, eps)
    return (P if scale is None else scale[..., None, None] * P).to(dtype)


def _torch_value(C, f, g, loga, logb, eps):
    return (_plan(C, f, g, loga, logb, eps) * C).sum((-2, -1))


class _DenseKernels(NamedTuple):
    """One backend's kernels on a given cost: the torch reference takes any
    (..., N, M) in the work dtype; cpp and triton a contiguous (B, N, M) cost
    in its own dtype (float32/bf16/fp16) and (B, ·) float32 weights."""

    solve: object            # (C, loga, logb, sched, n_iters, tol) -> (f, g)
    solve_symmetric: object  # (C, loga, sched, n_iters) -> f
    plan: object             # (C, f, g, loga, logb, eps, scale | None, dtype) -> scale·P in dtype
    value: object            # (C, f, g, loga, logb, eps) -> ⟨P, C⟩


def _eps_tensor(sched, n_iters: int) -> torch.Tensor:
    """The ε of each round as the float64 CPU tensor the cpp ops take."""
    if isinstance(sched, float):
        return torch.full((n_iters,), sched, dtype=torch.float64)
    if isinstance(sched, torch.Tensor):
        return sched.to(device="cpu", dtype=torch.float64)
    return torch.tensor(list(sched), dtype=torch.float64)


def _cpp_kernels() -> _DenseKernels:
    ops = torch.ops.fastdistill
    return _DenseKernels(
        lambda C, la, lb, sched, n, tol: ops.sinkhorn_solve(C, la, lb, _eps_tensor(sched, n),
                                                            -1.0 if tol is None else tol),
        lambda C, la, sched, n: ops.sinkhorn_solve_symmetric(C, la, _eps_tensor(sched, n)),
        ops.sinkhorn_plan, ops.sinkhorn_value)


def _triton_kernels() -> _DenseKernels:
    from fastdistill.kernels import ot as triton_ot  # CUDA only; imported on demand

    rows, cols = triton_ot.dense_softmin_rows, triton_ot.dense_softmin_cols
    return _DenseKernels(
        lambda C, la, lb, sched, n, tol: _iterate(C, la, lb, sched, n, tol, rows=rows, cols=cols),
        lambda C, la, sched, n: _iterate_symmetric(C, la, sched, n, rows=rows),
        triton_ot.dense_plan, triton_ot.dense_value)


_TORCH_KERNELS = _DenseKernels(
    lambda C, la, lb, sched, n, tol: _iterate(C, la, lb, sched, n, tol),
    lambda C, la, sched, n: _iterate_symmetric(C, la, sched, n),
    _torch_plan, _torch_value)


def _dense_kernels(name: str) -> _DenseKernels:
    if name == "torch":
        return _TORCH_KERNELS
    return _cpp_kernels() if name == "cpp" else _triton_kernels()


class _Envelope(torch.autograd.Function):
    """Forward: solve, return ⟨P, C⟩, OT_ε, f, g (and P). Backward: the envelope
    gradient of OT_ε for both scalar outputs (P, f, g); f, g, P carry none.

    ``name``: the backend whose ``_DenseKernels`` run it; ``sched``: ε per
    round (a float, a list or a tensor of n_iters), ending at ``eps``;
    ``symmetric``: the self-transport solve of a symmetric cost, b = None
    (it is a; torch.compile cannot trace one tensor given twice)."""

    @staticmethod
    def forward(ctx, C, a, b, eps, name, sched, n_iters, tol, symmetric, want_plan):
        if symmetric:
            b = a
        K = _dense_kernels(name)
        loga, logb = _log(a), _log(b)
        if symmetric:
            f = K.solve_symmetric(C, loga, sched, n_iters)
            g = f
        else:
            f, g = K.solve(C, loga, logb, sched, n_iters, tol)
        f, g = _center(f, g, a, b)
        value = K.value(C, f, g, loga, logb, eps)
        objective = (a * f).sum(-1) + (b * g).sum(-1)
        ctx.eps, ctx.name, ctx.symmetric = eps, name, symmetric
        ctx.save_for_backward(C, a, b, f, g)  # P is recomputed: O(N + M) extra, not O(NM)
        plan = K.plan(C, f, g, loga, logb, eps, None, f.dtype) if want_plan else None
        if plan is not None:
            ctx.mark_non_differentiable(f, g, plan)
        else:
            ctx.mark_non_differentiable(f, g)
        return value, objective, f, g, plan

    @staticmethod
    @_first_order_only("the Sinkhorn envelope gradient (sinkhorn, sinkhorn_divergence on torch, "
                      "sinkhorn_kd_loss with gradient='envelope')")
    def backward(ctx, d_value, d_objective, _df, _dg, _dplan):
        C, a, b, f, g = ctx.saved_tensors
        scale = torch.zeros_like(f[..., 0])
        if d_value is not None:
            scale = scale + d_value
        if d_objective is not None:
            scale = scale + d_objective
        grad_C = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            K = _dense_kernels(ctx.name)
            grad_C = K.plan(C, f, g, _log(a), _log(b), ctx.eps, scale.contiguous(), C.dtype)
        if ctx.needs_input_grad[1]:
            grad_a = scale.unsqueeze(-1) * (f + g if ctx.symmetric else f)  # a is both sides
        if ctx.needs_input_grad[2]:
            grad_b = scale.unsqueeze(-1) * g
        return grad_C, grad_a, grad_b, None, None, None, None, None, None, None


def _check_cost(cost) -> float | None:
    """Checks the cost; returns max|C| in eager mode (None under torch.compile or
    for an empty batch)."""
    _checks.tensor("cost", cost, floating=True)
    if cost.dim() < 2:
        raise ValueError(f"cost must have shape (..., N, M), got {tuple(cost.shape)}")
    if cost.shape[-1] == 0 or cost.shape[-2] == 0:
        raise ValueError(f"cost must have at least one row and one column, got {tuple(cost.shape)}")
    if cost.numel() and not torch.compiler.is_compiling():
        # min and max are finite iff every entry is (NaN propagates through both): one
        # reduction and one read, where isfinite(cost).all() would allocate ~112 MB at 4096×4096
        lo, hi = torch.stack(torch.aminmax(cost)).tolist()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("cost must be finite (give a zero weight instead of an infinite cost)")
        return max(abs(lo), abs(hi))
    return None


def _solve(cost, a, b, eps, n_iters, tol, want_plan, name="torch"):
    """Checked inputs in, (value, OT_ε, f, g, plan) out, in the work dtype
    (the cost itself stays in its dtype on cpp and triton)."""
    wd = _work_dtype(cost)
    a = _weights("a", a, cost.shape[:-1], cost.device, wd)
    b = _weights("b", b, cost.shape[:-2] + cost.shape[-1:], cost.device, wd)
    if name == "torch":
        return _Envelope.apply(cost.to(wd), a, b, eps, name, eps, n_iters, tol, False, want_plan)
    batch, (N, M) = cost.shape[:-2], cost.shape[-2:]
    value, obj, f, g, plan = _Envelope.apply(
        cost.reshape(-1, N, M).contiguous(), a.reshape(-1, N).contiguous(),
        b.reshape(-1, M).contiguous(), eps, name, eps, n_iters, tol, False, want_plan)
    return (value.reshape(batch), obj.reshape(batch), f.reshape(batch + (N,)),
            g.reshape(batch + (M,)), None if plan is None else plan.reshape(batch + (N, M)))


def sinkhorn(cost: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
             *, epsilon: float, n_iters: int = 100, tol: float | None = None,
             return_plan: bool = False, backend: str = "auto") -> SinkhornResult:
    """Entropic OT between weights a and b with cost C, log-domain, batched.

    cost: (..., N, M), any leading batch shape (many problems in one call);
    a: (..., N) and b: (..., M), non-negative and summing to 1 per problem
    (default uniform). Zero weights are allowed. Used as given: nothing is
    renormalized or broadcast. The work is done in float32 (float64 stays
    float64 and runs on backend="torch"; fp16/bf16 costs are read in their
    dtype and accumulated in float32) and the results come back in that
    dtype; the gradient w.r.t. cost comes back in cost's dtype. The log
    domain never underflows, but float32 potentials carry rounding of
    ~|f|·2⁻²⁴, which the plan sees magnified by 1/ε (relative ~1e-3 at
    ε = 1e-4 with costs ~1): use float64 for tiny ε where that matters. An
    ε below max|C|·eps(work dtype) (1.2e-7·max|C| in float32), where that
    rounding moves the plan's entries by more than a factor e, is refused
    (in eager mode; under torch.compile only ε below the dtype's smallest
    normal number is, the cost's range being data).

    n_iters rounds of (f update, g update), or fewer with ``tol``: each
    problem of the batch stops (its f, g kept from then on) at the first
    round where the L1 error of its row marginals, Σ_i |Σ_j P_ij − a_i| (the
    columns are exact after each round), is below tol. Nothing is read back
    to the host per round: every ``TOL_CHECK_EVERY`` rounds the loop ends if
    every problem has stopped (under torch.compile it runs all n_iters
    rounds, with the same results).

    Returns ``SinkhornResult(value, f, g, plan)``: value = ⟨P, C⟩ as POT's
    ``sinkhorn2`` reports it; f, g centered so that ⟨a, f⟩ = ⟨b, g⟩ =
    OT_ε/2; plan P only with ``return_plan=True``.

    Gradients (envelope theorem, no backpropagation through the iterations):
    ``value`` backpropagates the gradient of the entropic objective
    OT_ε = ⟨a, f⟩ + ⟨b, g⟩ at convergence, not that of ⟨P, C⟩ itself:
    ∂/∂C = P, ∂/∂a = f, ∂/∂b = g (f, g with the centering above; on the
    simplex only their differences matter, since Σ δa = Σ δb = 0). The two
    differ by the gradient of ε·KL(P ‖ a⊗b), which is O(ε). f, g and plan
    are returned without gradient.

    backend="torch" is the readable reference; "cpp" (CPU) runs the whole
    loop in one op (one row-wise sweep of the cost per half-step, the plan
    and the value fused, never a second N×M buffer), "triton" (CUDA) one
    kernel per half-step; "auto" picks per ``fastdistill.backends()``.
    """
    max_cost = _check_cost(cost)
    eps, n_iters, tol = _options(epsilon, n_iters, tol)
    _check_epsilon(eps, _work_dtype(cost), max_cost)
    _checks.flag("return_plan", return_plan)
    name = resolve(backend, cost.device, _work_dtype(cost))
    if name != "torch" and cost.dtype == torch.float64:
        raise TypeError(f"backend={name!r} takes float32, bfloat16 or float16 costs; "
                        "float64 runs on backend='torch'")
    value, _, f, g, plan = _solve(cost, a, b, eps, n_iters, tol, return_plan, name)
    return SinkhornResult(value, f, g, plan)


# --------------------------------------------------------------------------- divergence

def _point_cost(x: torch.Tensor, y: torch.Tensor, p: int) -> torch.Tensor:
    """|x_i − y_j|^p / p, dense (..., N, M)."""
    if p == 2:
        # ½|x|² + ½|y|² − x·y: O(NM) memory; the clamp only removes rounding below 0
        xx = (x * x).sum(-1, keepdim=True)
        yy = (y * y).sum(-1).unsqueeze(-2)
        return (0.5 * (xx + yy) - x @ y.transpose(-1, -2)).clamp_min(0)
    # p = 1: exact differences (the expanded form loses |x − y| near 0 to sqrt of rounding);
    # the norm's gradient at x_i = y_j is taken as 0 (a subgradient), not NaN
    sq = (x.unsqueeze(-2) - y.unsqueeze(-3)).pow(2).sum(-1)
    live = sq > 0
    return torch.where(live, torch.where(live, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def _diameter(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The diagonal of the box holding every point of x and y (over the batch), a
    float64 scalar tensor on their device: |x_i − y_j| never exceeds it."""
    pts = torch.cat([x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])])
    return (pts.amax(0) - pts.amin(0)).double().norm()


def _eps_schedule(eps: float, n_iters: int, scaling, x: torch.Tensor, y: torch.Tensor, p: int):
    """ε per round: constant (a list of floats), or with ε-scaling
    ε_k = max(ε, ε₀·scaling^k) from ε₀ = diameter^p / p, the largest cost the
    clouds can have (diameter: the diagonal of the box holding every point of
    x and y, over the batch), as a float64 tensor on the clouds' device,
    computed there (no host sync). The schedule must reach ε within n_iters
    rounds: checked in eager mode (one read of ε₀ per call); under
    torch.compile, which cannot raise on data, the last round is at ε
    whatever ε₀ was."""
    if scaling is None:
        return [eps] * n_iters
    scaling = _checks.real("scaling", scaling, low=0.0, high=1.0, low_open=True, high_open=True)
    eps0 = _diameter(x, y) ** p / p
    k = torch.arange(n_iters, dtype=torch.float64, device=x.device)
    sched = torch.clamp_min(eps0 * scaling ** k, eps)
    sched[-1] = eps
    if not torch.compiler.is_compiling():
        e0 = float(eps0)
        needed = math.ceil(math.log(eps / e0) / math.log(scaling)) + 1 if e0 > eps else 1
        if needed > n_iters:
            raise ValueError(f"scaling={scaling} anneals ε from {e0:.4g} (diameter^p/p) to epsilon="
                             f"{eps} in {needed} rounds, more than n_iters={n_iters}: raise n_iters "
                             "or lower scaling")
    return sched


def _tensorized_bytes(batch: int, N: int, M: int, debias: bool) -> int:
    """float32 bytes of the costs the tensorized divergence stores."""
    return 4 * batch * (N * M + (N * N + M * M if debias else 0))


def _dense_point_cost(x: torch.Tensor, y: torch.Tensor, p: int) -> torch.Tensor:
    """|x_i − y_j|^p / p, (B, N, M) float32, no graph: for p = 2 one batched
    GEMM into the only N×M buffer (½|x|² + ½|y|² − x·y, clamped at 0, the
    norms accumulated in float64 as the tiled kernels do), for p = 1 exact
    differences (torch.cdist without its GEMM shortcut)."""
    if p == 2:
        hx = (0.5 * x.double().pow(2).sum(-1)).float()
        hy = (0.5 * y.double().pow(2).sum(-1)).float()
        C = torch.baddbmm(hy.unsqueeze(-2), x, y.transpose(-1, -2), alpha=-1.0)
        return C.add_(hx.unsqueeze(-1)).clamp_min_(0)
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")


def sinkhorn_divergence(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor | None = None,
                        b: torch.Tensor | None = None, *, epsilon: float, p: int = 2,
                        debias: bool = True, n_iters: int = 100, scaling: float | None = None,
                        mode: str = "auto", backend: str = "auto") -> torch.Tensor:
    """Sinkhorn divergence between point clouds x (..., N, d) and y (..., M, d).

    Cost |x_i − y_j|^p / p (Euclidean norm, p in {1, 2}); weights a (..., N),
    b (..., M) as in ``sinkhorn``. Like GeomLoss, it uses the entropic
    objective OT_ε = ⟨a, f⟩ + ⟨b, g⟩ (not ⟨P, C⟩):
    debias=True gives S_ε = OT_ε(a, b) − ½ OT_ε(a, a) − ½ OT_ε(b, b), which is
    ≥ 0 and 0 when the clouds are equal (Feydy et al. 2019); debias=False
    gives OT_ε(a, b). Shape (...), float32 (float64 for float64 clouds).

    OT_ε(a, b) runs n_iters rounds of (f, g) updates as ``sinkhorn`` does; each
    self term OT_ε(a, a) n_iters averaged symmetric updates (its two
    potentials are equal). ``scaling`` in (0, 1) anneals ε (ε-scaling): round
    k runs at max(ε, ε₀·scaling^k), ε₀ = diameter^p/p; the schedule must reach
    ε within n_iters. ε below diameter^p/p·eps(work dtype) (the costs' bound,
    as ``sinkhorn`` bounds ε by max|C|) is refused in eager mode.

    Gradients w.r.t. x, y, a, b: the envelope gradient of each solve.
    backend="torch" is the readable reference: it builds the dense cost
    (O(NM) memory, O(NMd) for p = 1) and lets autograd take the gradient
    through it. On "cpp" (CPU) and "triton" (CUDA), ``mode`` says how:
    "online" never stores a cost: it rebuilds it tile by tile in every
    half-step (extra memory O(N + M)); "tensorized" computes each cost once
    (one GEMM, float32, one at a time: N×M, then N×N and M×M for the
    debiasing terms) and iterates on it with ``sinkhorn``'s kernels, several
    times faster; "auto" is tensorized when those costs together take at
    most ``TENSORIZED_BUDGET_BYTES`` (256 MiB), else online. Both take the
    gradient the same tiled way (no cost is kept for the backward).
    backend="auto" picks per ``fastdistill.backends()``; backend="torch"
    takes mode "auto" or "tensorized" (it is dense).
    """
    _checks.tensor("x", x, floating=True)
    _checks.tensor("y", y, floating=True)
    _checks.same_device(x=x, y=y)
    if x.dim() < 2 or y.dim() < 2:
        raise ValueError(f"x and y must have shape (..., N, d) and (..., M, d), got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[:-2] != y.shape[:-2] or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must agree in their batch "
                         "dimensions and in d (the last)")
    if x.shape[-2] == 0 or y.shape[-2] == 0:
        raise ValueError("x and y must each have at least one point")
    if x.shape[-1] == 0:
        raise ValueError("the points must have at least one coordinate (d >= 1)")
    if isinstance(p, bool) or p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    _checks.flag("debias", debias)
    _checks.choice("mode", mode, DIVERGENCE_MODES)
    eps, n_iters, _ = _options(epsilon, n_iters)
    wd = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    name = resolve(backend, x.device, wd)
    if name != "torch" and wd == torch.float64:
        raise TypeError(f"backend={name!r} takes float32, bfloat16 or float16 points; "
                        "float64 runs on backend='torch'")
    if name == "torch" and mode == "online":
        raise ValueError("mode='online' needs backend 'cpp' (CPU) or 'triton' (CUDA): the torch "
                         "reference always builds the dense cost (mode 'auto' or 'tensorized')")
    x, y = x.to(wd), y.to(wd)
    max_cost = None
    if not torch.compiler.is_compiling():
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise ValueError("x and y must be finite")
        max_cost = float(_diameter(x.detach(), y.detach())) ** p / p  # the largest cost
    _check_epsilon(eps, wd, max_cost)
    a = _weights("a", a, x.shape[:-1], x.device, wd)
    b = _weights("b", b, y.shape[:-1], y.device, wd)
    sched = _eps_schedule(eps, n_iters, scaling, x.detach(), y.detach(), p)

    if name != "torch":
        batch = x.shape[:-2]
        flat = [t.reshape((-1,) + t.shape[len(batch):]) for t in (x, y, a, b)]
        if mode == "auto":
            size = _tensorized_bytes(flat[0].shape[0], x.shape[-2], y.shape[-2], debias)
            mode = "tensorized" if size <= TENSORIZED_BUDGET_BYTES else "online"
        return _TiledDivergence.apply(*flat, eps, sched, p, debias, name,
                                      mode == "tensorized").reshape(batch)

    def ot_eps(u, v, wu, wv):
        return _Envelope.apply(_point_cost(u, v, p), wu, wv, eps, "torch", sched, n_iters, None,
                               False, False)[1]

    def ot_self(u, wu):
        return _Envelope.apply(_point_cost(u, u, p), wu, None, eps, "torch", sched, n_iters, None,
                               True, False)[1]

    out = ot_eps(x, y, a, b)
    if debias:
        out = out - 0.5 * ot_self(x, a) - 0.5 * ot_self(y, b)
    return out


class _PointOps(NamedTuple):
    """One backend's tiled kernels (contract of the fastdistill::ot_* ops)."""

    softmin: object        # (x, y, h, eps, p) -> (B, N)
    transport_grad: object  # (x, y, l, h, eps, p) -> (B, N, d)


def _point_ops(name: str) -> _PointOps:
    if name == "cpp":
        return _PointOps(torch.ops.fastdistill.ot_softmin, torch.ops.fastdistill.ot_transport_grad)
    from fastdistill.kernels import ot as triton_ot  # CUDA only; imported on demand

    return _PointOps(triton_ot.softmin, triton_ot.transport_grad)


def _softmin_at(ops, x, y, h, eps, p):
    """The tiled c-transform at ε given as a float, or as a 0-dim device
    tensor (a round of an ε-scaling schedule) without reading it back: the
    cost is homogeneous, C(x/s, y/s) = C(x, y)/s^p, so at s = ε^(1/p) the
    kernel runs at ε = 1 on the rescaled clouds and its output is scaled
    by ε (O((N+M)d) extra work per half-step, no host sync, traceable)."""
    if not isinstance(eps, torch.Tensor):
        return ops.softmin(x, y, h, eps, p)
    s = (eps if p == 1 else eps.sqrt()).to(x.dtype)
    xs = (x / s).contiguous()
    ys = xs if y is x else (y / s).contiguous()  # the symmetric solves rescale one cloud once
    return ops.softmin(xs, ys, h, 1.0, p) * eps.to(torch.float32)


def _tiled_solve(ops, x, y, loga, logb, sched, p):
    """``_iterate`` (fixed rounds, no tol) with the tiled c-transforms."""
    n = len(sched)
    g = torch.zeros_like(logb)
    f = _softmin_at(ops, x, y, (logb + g / sched[0]).contiguous(), sched[0], p)
    for it in range(n):
        g = _softmin_at(ops, y, x, (loga + f / sched[it]).contiguous(), sched[it], p)
        if it < n - 1:
            f = _softmin_at(ops, x, y, (logb + g / sched[it + 1]).contiguous(), sched[it + 1], p)
    return f, g


def _tiled_solve_symmetric(ops, x, loga, sched, p):
    """``_iterate_symmetric`` with the tiled c-transform."""
    f = _softmin_at(ops, x, x, loga.contiguous(), sched[0], p)
    for e in sched:
        f = 0.5 * (f + _softmin_at(ops, x, x, (loga + f / e).contiguous(), e, p))
    return f


def _divergence_potentials(x, y, loga, logb, sched, p, debias, name, tensorized):
    """(f, g, f_x, f_y) of OT_ε(a, b) and, with debias, of the self terms
    (None without): online with the tiled kernels (an ε-scaling schedule
    stays on the device, see ``_softmin_at``), or tensorized on each cost in
    turn, built once and freed after its solve."""
    n = len(sched)
    if not tensorized:
        ops = _point_ops(name)
        f, g = _tiled_solve(ops, x, y, loga, logb, sched, p)
        if not debias:
            return f, g, None, None
        return f, g, _tiled_solve_symmetric(ops, x, loga, sched, p), _tiled_solve_symmetric(ops, y, logb, sched, p)
    K = _dense_kernels(name)
    f, g = K.solve(_dense_point_cost(x, y, p), loga, logb, sched, n, None)
    if not debias:
        return f, g, None, None
    fx = K.solve_symmetric(_dense_point_cost(x, x, p), loga, sched, n)
    fy = K.solve_symmetric(_dense_point_cost(y, y, p), logb, sched, n)
    return f, g, fx, fy


class _TiledDivergence(torch.autograd.Function):
    """``sinkhorn_divergence`` on flattened (B, N, d) float32 clouds with the
    cpp/triton kernels, the solves online or tensorized; backward (the same
    for both): the envelope gradient of each solve by the tiled kernels,
    ∂OT_ε(a, b)/∂x_i = Σ_j P_ij ∇_x C(x_i, y_j) (the self terms count twice,
    once per argument of the symmetric cost, halved by the ½ of S_ε),
    ∂OT_ε/∂a = f, ∂OT_ε/∂b = g."""

    @staticmethod
    def forward(ctx, x, y, a, b, eps, sched, p, debias, name, tensorized):
        x, y = x.contiguous(), y.contiguous()
        loga, logb = _log(a).contiguous(), _log(b).contiguous()
        f, g, fx, fy = _divergence_potentials(x, y, loga, logb, sched, p, debias, name, tensorized)
        f, g = _center(f, g, a, b)
        out = (a * f).sum(-1) + (b * g).sum(-1)
        if debias:
            out = out - (a * fx).sum(-1) - (b * fy).sum(-1)  # ½ OT_ε(a, a) = ⟨a, f_x⟩
        ctx.eps, ctx.p, ctx.name, ctx.debias = eps, p, name, debias
        ctx.save_for_backward(x, y, a, b, f, g, fx if debias else f, fy if debias else g)
        return out

    @staticmethod
    @_first_order_only("sinkhorn_divergence on the cpp/triton backends (tiled envelope gradient; "
                      "backend='torch' is first-order too)")
    def backward(ctx, d_out):
        x, y, a, b, f, g, fx, fy = ctx.saved_tensors
        eps, p, ops = ctx.eps, ctx.p, _point_ops(ctx.name)
        lf, lg = (_log(a) + f / eps).contiguous(), (_log(b) + g / eps).contiguous()
        grad = [None] * 10
        scale = d_out.unsqueeze(-1)

        def cloud_grad(u, v, lu, lv, w, fu):
            """∂S/∂u: the cross term's transport gradient minus the self term's."""
            out = ops.transport_grad(u, v, lu, lv, eps, p)
            if ctx.debias:
                ls = (_log(w) + fu / eps).contiguous()
                out = out - ops.transport_grad(u, u, ls, ls, eps, p)
            return scale.unsqueeze(-1) * out

        if ctx.needs_input_grad[0]:
            grad[0] = cloud_grad(x, y, lf, lg, a, fx)
        if ctx.needs_input_grad[1]:
            grad[1] = cloud_grad(y, x, lg, lf, b, fy)
        if ctx.needs_input_grad[2]:
            grad[2] = scale * ((f - fx) if ctx.debias else f)
        if ctx.needs_input_grad[3]:
            grad[3] = scale * ((g - fy) if ctx.debias else g)
        return tuple(grad)


# --------------------------------------------------------------------------- SinKD

def _kd_cost(q: torch.Tensor, p: torch.Tensor, cost: str) -> torch.Tensor:
    """W_ij between student row q_i and teacher row p_j, (B, B)."""
    if cost == "l1":
        return torch.cdist(q.unsqueeze(0), p.unsqueeze(0), p=1).squeeze(0)
    if cost == "sqeuclidean":
        # Σ_v (q_iv − p_jv)²; the clamp only removes rounding below 0
        qq = (q * q).sum(-1, keepdim=True)
        pp = (p * p).sum(-1).unsqueeze(0)
        return (qq + pp - 2 * q @ p.T).clamp_min(0)
    # cosine: 1 − cos(q_i, p_j); probability rows never have norm 0
    qn = q / q.norm(dim=-1, keepdim=True)
    pn = p / p.norm(dim=-1, keepdim=True)
    return 1 - qn @ pn.T


class _TiledL1Cost(torch.autograd.Function):
    """W = Σ_v |q_iv − p_jv| by the Triton kernels, tiled over V (q differentiable,
    p constant); backward dq = Σ_j G_ij sign(q_iv − p_jv)."""

    @staticmethod
    def forward(ctx, q, p):
        from fastdistill.kernels import ot as triton_ot  # CUDA only; imported on demand

        q, p = q.contiguous(), p.contiguous()
        ctx.save_for_backward(q, p)
        return triton_ot.sinkd_l1_cost(q, p)

    @staticmethod
    @_first_order_only("sinkhorn_kd_loss's triton L1 cost (use backend='torch' with "
                      "gradient='unrolled' for second derivatives)")
    def backward(ctx, grad):
        from fastdistill.kernels import ot as triton_ot

        q, p = ctx.saved_tensors
        return triton_ot.sinkd_l1_cost_backward(q, p, grad.float().contiguous()), None


class _FusedL1Cost(torch.autograd.Function):
    """The cpp kernel: softmax(z/T) of both sides and W = Σ_v |q_iv − p_jv| in one
    op from float32 logits; backward straight to the student logits."""

    @staticmethod
    def forward(ctx, student, teacher, temperature):
        W, q, p = torch.ops.fastdistill.sinkd_l1_forward(student.contiguous(), teacher.contiguous(),
                                                          temperature)
        # the student is saved only for _first_order_only (its second-backward
        # error hangs on it); the backward needs q and p alone
        ctx.save_for_backward(q, p, student)
        ctx.temperature = temperature
        return W

    @staticmethod
    @_first_order_only("sinkhorn_kd_loss's fused cpp L1 cost (use backend='torch' with "
                      "gradient='unrolled' for second derivatives)")
    def backward(ctx, grad):
        q, p, _ = ctx.saved_tensors
        dz = torch.ops.fastdistill.sinkd_l1_backward(q, p, grad.float().contiguous(), ctx.temperature)
        return dz, None, None


def sinkhorn_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                     temperature: float = 2.0, epsilon: float = 0.1, n_iters: int = 20,
                     cost: str = "l1", gradient: str = "envelope",
                     labels: torch.Tensor | None = None, ignore_index: int = -100,
                     backend: str = "auto") -> torch.Tensor:
    """SinKD (Cui et al. 2024): entropic OT across the rows of a batch.

    Logits (..., V) are flattened to rows; rows whose label is ignore_index
    are dropped; the remaining B rows are the support points of both sides,
    with uniform weights 1/B. q = softmax(student/T), p = softmax(teacher/T);
    W_ij = cost(q_i, p_j): "l1" Σ_v |q_iv − p_jv| (the paper's), "sqeuclidean"
    Σ_v (q_iv − p_jv)², "cosine" 1 − cos(q_i, p_j). Returns ⟨P, W⟩ (a scalar,
    float32, or float64 for float64 logits) after n_iters rounds of (row,
    column) updates from the Gibbs kernel exp(−W/ε): the reference's sum
    Σ P_ref·W divided by B (its 0.001 factor is the user's loss weight).
    An all-ignored batch gives 0. W is at most 2 ("l1", "sqeuclidean") or 1
    ("cosine"), so epsilon must be >= that bound times eps(work dtype)
    (2.4e-7 for "l1" in float32), like ``sinkhorn``'s floor.

    gradient="envelope" (cheap): ∂/∂W = P, the envelope gradient of OT_ε,
    which differs from the exact gradient of ⟨P, W⟩ by O(ε) terms;
    "unrolled": autograd through the iterations, the gradient of the
    reference formulation. The teacher is a constant: teacher_logits must
    not require grad.

    backend="torch" builds W with ``torch.cdist`` (the reference); "cpp"
    computes both softmaxes and the L1 cost (the O(B²V) hot part) in one
    kernel walking V in chunks, and the gradient back to the logits in
    another; "triton" has tiled kernels for the L1 cost and its gradient
    (softmaxes by torch). The "sqeuclidean" and "cosine" costs are GEMMs on
    every backend.
    """
    s = _checks.tensor("student_logits", student_logits, floating=True)
    t = _checks.tensor("teacher_logits", teacher_logits, floating=True)
    _checks.same_device(student_logits=s, teacher_logits=t)
    if s.dim() < 1 or s.shape != t.shape:
        raise ValueError(f"student_logits {tuple(s.shape)} and teacher_logits "
                         f"{tuple(t.shape)} must have the same shape (..., V)")
    if s.shape[-1] == 0:
        raise ValueError("the vocabulary dimension of the logits must not be empty")
    T = _checks.real("temperature", temperature, low=0.0, low_open=True)
    eps, n_iters, _ = _options(epsilon, n_iters)
    _checks.choice("cost", cost, KD_COSTS)
    _checks.choice("gradient", gradient, KD_GRADIENTS)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError("teacher_logits requires grad, but the teacher is a constant in KD: "
                         "pass teacher_logits.detach()")
    if labels is not None:
        _checks.labels_for("labels", labels, s.shape[:-1], s.device)

    wd = _work_dtype(s) if s.dtype == t.dtype else torch.promote_types(_work_dtype(s), _work_dtype(t))
    name = resolve(backend, s.device, wd)
    if name != "torch" and wd == torch.float64:
        raise TypeError(f"backend={name!r} takes float32, bfloat16 or float16 logits; "
                        "float64 runs on backend='torch'")
    _check_epsilon(eps, wd, _KD_COST_MAX[cost])  # W is bounded by its kind: no data read
    V = s.shape[-1]
    s2, t2 = s.reshape(-1, V), t.reshape(-1, V)
    if labels is not None:
        keep = labels.reshape(-1) != ignore_index
        s2, t2 = s2[keep], t2[keep]
    B = s2.shape[0]
    if B == 0:  # still attached to the graph: backward gives zeros, never NaN
        return s2.to(wd).sum()
    if cost == "l1" and name == "cpp":
        W = _FusedL1Cost.apply(s2.to(wd), t2.detach().to(wd), T)
    else:
        q = torch.softmax(s2.to(wd) / T, dim=-1)
        p = torch.softmax(t2.to(wd) / T, dim=-1)
        W = _TiledL1Cost.apply(q, p.detach()) if cost == "l1" and name != "torch" else _kd_cost(q, p, cost)
    if not torch.isfinite(W).all():
        raise ValueError("the logits must be finite (their softmax gave a non-finite cost)")
    w = torch.full((B,), 1.0 / B, dtype=wd, device=s.device)
    if gradient == "envelope":
        return _Envelope.apply(W, w, w, eps, "torch", eps, n_iters, None, False, False)[0]
    logw = _log(w)
    f, g = _iterate(W, logw, logw, eps, n_iters, None)
    return (_plan(W, f, g, logw, logw, eps) * W).sum()
