"""fd.ot: the log-domain Sinkhorn solver against an independent float64
computation and POT, its envelope gradients against finite differences of the
converged entropic objective, the Sinkhorn divergence, and the SinKD loss
against a faithful torch port of the paper's formulation."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastdistill as fd
from conftest import fused_backends

ot = fd.ot
F64 = torch.float64


def simplex(*shape, dtype=F64, zeros=0):
    w = torch.rand(*shape, dtype=F64) + 0.1
    if zeros:
        w[..., :zeros] = 0
    return (w / w.sum(-1, keepdim=True)).to(dtype)


def linear_sinkhorn(C, a, b, eps, n_iters):
    """Independent float64 Sinkhorn in the linear domain (scalings u, v), for a
    single problem with moderate ε. Returns value ⟨P, C⟩, the entropic
    objective ⟨a, f⟩ + ⟨b, g⟩, P, and f, g centered as fd.ot centers them."""
    C, a, b = C.double(), a.double(), b.double()
    K = torch.exp(-C / eps)
    u, v = torch.ones_like(a), torch.ones_like(b)
    for _ in range(n_iters):
        u = a / (K @ v)
        v = b / (K.T @ u)
    P = u[:, None] * K * v[None, :]
    f = eps * torch.log(u / a)  # P_ij = a_i b_j exp((f_i + g_j − C_ij)/ε)
    g = eps * torch.log(v / b)
    c = 0.5 * ((b * g).sum() - (a * f).sum())
    f, g = f + c, g - c
    return (P * C).sum(), (a * f).sum() + (b * g).sum(), P, f, g


# --------------------------------------------------------------------------- sinkhorn

@pytest.mark.parametrize("N,M", [(6, 6), (5, 9), (9, 4)])
def test_sinkhorn_matches_independent_float64(N, M):
    C = torch.rand(N, M, dtype=F64)
    a, b = simplex(N), simplex(M)
    value, obj, P, f, g = linear_sinkhorn(C, a, b, 0.2, 3000)
    r = ot.sinkhorn(C, a, b, epsilon=0.2, n_iters=3000, return_plan=True)
    torch.testing.assert_close(r.value, value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r.plan, P, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r.f, f, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(r.g, g, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close((a * r.f).sum() + (b * r.g).sum(), obj, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r.plan.sum(1), a)
    torch.testing.assert_close(r.plan.sum(0), b)


def test_sinkhorn_matches_pot():
    pot = pytest.importorskip("ot")
    N, M, eps = 7, 11, 0.05
    C = torch.rand(N, M, dtype=F64)
    a, b = simplex(N), simplex(M)
    r = ot.sinkhorn(C, a, b, epsilon=eps, n_iters=5000, return_plan=True)
    Cn, an, bn = C.numpy(), a.numpy(), b.numpy()
    P, log = pot.bregman.sinkhorn_log(an, bn, Cn, eps, numItermax=5000, stopThr=1e-13, log=True)
    value = pot.sinkhorn2(an, bn, Cn, eps, method="sinkhorn_log", numItermax=5000, stopThr=1e-13)
    torch.testing.assert_close(r.plan, torch.as_tensor(P), rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(r.value, torch.as_tensor(float(value), dtype=F64), rtol=1e-8, atol=0)
    # POT's scalings: P = diag(u) K diag(v), so f = ε (log u − log a) up to a constant
    f = eps * (torch.as_tensor(log["log_u"]) - a.log())
    g = eps * (torch.as_tensor(log["log_v"]) - b.log())
    torch.testing.assert_close(r.f - r.f[0], f - f[0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(r.g - r.g[0], g - g[0], rtol=1e-6, atol=1e-8)


def test_sinkhorn_approaches_exact_ot_as_epsilon_shrinks():
    pot = pytest.importorskip("ot")
    C = torch.rand(8, 10, dtype=F64)
    a, b = simplex(8), simplex(10)
    exact = pot.emd2(a.numpy(), b.numpy(), C.numpy())
    r = ot.sinkhorn(C, a, b, epsilon=1e-3, n_iters=20000, tol=1e-10)
    assert abs(r.value.item() - exact) < 1e-2


def test_sinkhorn_batched_equals_per_problem():
    C = torch.rand(2, 3, 5, 4)
    a, b = simplex(2, 3, 5, dtype=torch.float32), simplex(2, 3, 4, dtype=torch.float32)
    r = ot.sinkhorn(C, a, b, epsilon=0.1, n_iters=50, return_plan=True)
    assert r.value.shape == (2, 3) and r.f.shape == (2, 3, 5) and r.g.shape == (2, 3, 4)
    for i in range(2):
        for j in range(3):
            s = ot.sinkhorn(C[i, j], a[i, j], b[i, j], epsilon=0.1, n_iters=50, return_plan=True)
            torch.testing.assert_close(r.value[i, j], s.value)
            torch.testing.assert_close(r.f[i, j], s.f)
            torch.testing.assert_close(r.g[i, j], s.g)
            torch.testing.assert_close(r.plan[i, j], s.plan)
    # default weights are uniform; an empty batch is fine
    u = ot.sinkhorn(C, epsilon=0.1, n_iters=50)
    v = ot.sinkhorn(C, torch.full((2, 3, 5), 0.2), torch.full((2, 3, 4), 0.25), epsilon=0.1, n_iters=50)
    torch.testing.assert_close(u.value, v.value)
    assert ot.sinkhorn(torch.rand(0, 3, 4), epsilon=0.1).value.shape == (0,)


@pytest.mark.parametrize("eps", [1e-3, 1e-4])
def test_sinkhorn_tiny_epsilon_is_finite(eps):
    C = (torch.rand(20, 30) * 2).requires_grad_()
    a = simplex(20, dtype=torch.float32).requires_grad_()
    r = ot.sinkhorn(C, a, epsilon=eps, n_iters=100, return_plan=True)
    for t in (r.value, r.f, r.g, r.plan):
        assert torch.isfinite(t).all()
    # columns exact up to float32 rounding of g, magnified by 1/ε: |g|·2⁻²⁴/ε
    torch.testing.assert_close(r.plan.sum(0), torch.full((30,), 1 / 30), rtol=2e-3, atol=0)
    r.value.backward()
    assert torch.isfinite(C.grad).all() and torch.isfinite(a.grad).all()
    # the linear-domain kernel would be exp(-2000) = 0 here
    assert (torch.exp(-C.detach() / eps) == 0).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sinkhorn_half_precision_costs(dtype):
    C32 = torch.rand(2, 16, 24)
    C = C32.to(dtype).requires_grad_()
    r = ot.sinkhorn(C, epsilon=0.05, n_iters=200, return_plan=True)
    assert r.value.dtype == torch.float32 and r.f.dtype == torch.float32
    # exactly the float32 computation on the rounded cost...
    s = ot.sinkhorn(C.detach().float(), epsilon=0.05, n_iters=200, return_plan=True)
    torch.testing.assert_close(r.value, s.value, rtol=0, atol=0)
    # ...and close to the one on the unrounded cost
    t = ot.sinkhorn(C32, epsilon=0.05, n_iters=200)
    torch.testing.assert_close(r.value, t.value, rtol=2e-2, atol=0)
    r.value.sum().backward()
    assert C.grad.dtype == dtype
    torch.testing.assert_close(C.grad.float(), s.plan, rtol=1e-2, atol=1e-4)


def test_sinkhorn_zero_weights():
    C = torch.rand(6, 5, dtype=F64, requires_grad=True)
    a = torch.tensor([0.0, 0.3, 0.0, 0.2, 0.5, 0.0], dtype=F64, requires_grad=True)
    b = torch.tensor([0.25, 0.0, 0.25, 0.5, 0.0], dtype=F64, requires_grad=True)
    r = ot.sinkhorn(C, a, b, epsilon=0.01, n_iters=500, return_plan=True)
    for t in (r.value, r.f, r.g, r.plan):
        assert torch.isfinite(t).all()
    assert (r.plan[a.detach() == 0] == 0).all() and (r.plan[:, b.detach() == 0] == 0).all()
    r.value.backward()
    for t in (C.grad, a.grad, b.grad):
        assert torch.isfinite(t).all()
    # the same as the problem without the weightless points
    ia, ib = a.detach() > 0, b.detach() > 0
    s = ot.sinkhorn(C.detach()[ia][:, ib], a.detach()[ia], b.detach()[ib], epsilon=0.01,
                    n_iters=500, return_plan=True)
    torch.testing.assert_close(r.value, s.value)
    torch.testing.assert_close(r.f[ia], s.f)
    torch.testing.assert_close(r.g[ib], s.g)
    torch.testing.assert_close(r.plan[ia][:, ib], s.plan)


def test_sinkhorn_gradients_are_plan_and_potentials():
    C = torch.rand(3, 5, 7, requires_grad=True)
    a = simplex(3, 5, dtype=torch.float32).requires_grad_()
    b = simplex(3, 7, dtype=torch.float32).requires_grad_()
    r = ot.sinkhorn(C, a, b, epsilon=0.1, n_iters=30, return_plan=True)
    w = torch.rand(3)
    (w * r.value).sum().backward()
    torch.testing.assert_close(C.grad, w[:, None, None] * r.plan)
    torch.testing.assert_close(a.grad, w[:, None] * r.f)
    torch.testing.assert_close(b.grad, w[:, None] * r.g)
    for t in (r.f, r.g, r.plan):
        assert not t.requires_grad
    # the centering: <a, f> = <b, g>
    torch.testing.assert_close((a * r.f).sum(-1), (b * r.g).sum(-1))


def test_envelope_gradients_match_finite_differences_of_the_objective():
    torch.manual_seed(1)
    N, M, eps, h = 5, 6, 0.3, 1e-6
    C = torch.rand(N, M, dtype=F64)
    a, b = simplex(N), simplex(M)

    def objective(C, a, b):
        r = ot.sinkhorn(C, a, b, epsilon=eps, n_iters=20000, tol=1e-15)
        return ((a * r.f).sum() + (b * r.g).sum()).item()

    Cg, ag, bg = (t.clone().requires_grad_() for t in (C, a, b))
    ot.sinkhorn(Cg, ag, bg, epsilon=eps, n_iters=20000, tol=1e-15).value.backward()
    D = torch.randn(N, M, dtype=F64)
    fd_C = (objective(C + h * D, a, b) - objective(C - h * D, a, b)) / (2 * h)
    assert fd_C == pytest.approx((Cg.grad * D).sum().item(), rel=1e-6, abs=1e-9)
    # along the simplex: directions that sum to 0 (only differences of f, g matter)
    da = torch.randn(N, dtype=F64)
    da -= da.mean()
    db = torch.randn(M, dtype=F64)
    db -= db.mean()
    fd_a = (objective(C, a + h * da, b) - objective(C, a - h * da, b)) / (2 * h)
    fd_b = (objective(C, a, b + h * db) - objective(C, a, b - h * db)) / (2 * h)
    assert fd_a == pytest.approx((ag.grad * da).sum().item(), rel=1e-6, abs=1e-9)
    assert fd_b == pytest.approx((bg.grad * db).sum().item(), rel=1e-6, abs=1e-9)


def test_envelope_gradient_equals_unrolled_gradient_of_the_objective():
    """At convergence the gradient of OT_ε through the iterations is P."""
    C = torch.rand(6, 8, dtype=F64, requires_grad=True)
    a, b = simplex(6), simplex(8)
    eps = 0.2
    f, g = torch.zeros(6, dtype=F64), torch.zeros(8, dtype=F64)
    for _ in range(2000):  # log-domain, autograd through every step
        f = -eps * torch.logsumexp((g[None, :] - C) / eps + b.log()[None, :], dim=1)
        g = -eps * torch.logsumexp((f[:, None] - C) / eps + a.log()[:, None], dim=0)
    ((a * f).sum() + (b * g).sum()).backward()
    r = ot.sinkhorn(C.detach(), a, b, epsilon=eps, n_iters=2000, return_plan=True)
    torch.testing.assert_close(C.grad, r.plan, rtol=1e-8, atol=1e-12)


def test_sinkhorn_tol_stops_early():
    C = torch.rand(10, 12, dtype=F64)
    a, b = simplex(10), simplex(12)
    r = ot.sinkhorn(C, a, b, epsilon=0.05, n_iters=10000, tol=1e-4, return_plan=True)
    err = (r.plan.sum(1) - a).abs().sum().item()
    assert err < 1e-4
    full = ot.sinkhorn(C, a, b, epsilon=0.05, n_iters=10000)
    assert not torch.equal(r.f, full.f)
    # it stopped after some k < 10000 rounds: exactly the k-round result
    for k in range(1, 2000):
        s = ot.sinkhorn(C, a, b, epsilon=0.05, n_iters=k, return_plan=True)
        if torch.equal(s.f, r.f) and torch.equal(s.g, r.g):
            assert (s.plan.sum(1) - a).abs().sum().item() < 1e-4
            if k > 1:
                prev = ot.sinkhorn(C, a, b, epsilon=0.05, n_iters=k - 1, return_plan=True)
                assert (prev.plan.sum(1) - a).abs().sum().item() >= 1e-4
            break
    else:
        pytest.fail("the tol result is not any k-round result")
    # the batch stops when every problem is below tol
    Cb = torch.stack([C, C * 3])
    rb = ot.sinkhorn(Cb, epsilon=0.05, n_iters=10000, tol=1e-4, return_plan=True)
    assert ((rb.plan.sum(-1) - 0.1).abs().sum(-1) < 1e-4).all()


# --------------------------------------------------------------------------- divergence

@pytest.mark.parametrize("p", [1, 2])
def test_sinkhorn_divergence_nonnegative_and_zero_for_identical(p):
    x = torch.randn(3, 15, 4, requires_grad=True)
    y = (torch.randn(3, 11, 4) + 0.5).requires_grad_()
    s = ot.sinkhorn_divergence(x, y, epsilon=0.1, p=p)
    assert s.shape == (3,) and (s > 0).all()
    s.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    # identical clouds (the same points, or a copy): 0, with finite gradients
    z = x.detach().clone().requires_grad_()
    w = x.detach().clone().requires_grad_()
    s0 = ot.sinkhorn_divergence(z, w, epsilon=0.1, p=p)
    torch.testing.assert_close(s0, torch.zeros(3), rtol=0, atol=1e-5)
    s0.sum().backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(w.grad).all()
    # weighted, float64, also >= 0
    a, b = simplex(3, 15), simplex(3, 11)
    sw = ot.sinkhorn_divergence(x.detach().double(), y.detach().double(), a, b, epsilon=0.5, p=p)
    assert (sw >= -1e-12).all()


def test_sinkhorn_divergence_uses_the_entropic_objective():
    x, y = torch.randn(9, 3, dtype=F64), torch.randn(7, 3, dtype=F64)
    a, b = simplex(9), simplex(7)
    cost = 0.5 * torch.cdist(x, y) ** 2
    r = ot.sinkhorn(cost, a, b, epsilon=0.2, n_iters=300)
    biased = ot.sinkhorn_divergence(x, y, a, b, epsilon=0.2, n_iters=300, debias=False)
    torch.testing.assert_close(biased, (a * r.f).sum() + (b * r.g).sum())
    r1 = ot.sinkhorn(torch.cdist(x, y), a, b, epsilon=0.2, n_iters=300)
    torch.testing.assert_close(
        ot.sinkhorn_divergence(x, y, a, b, epsilon=0.2, n_iters=300, p=1, debias=False),
        (a * r1.f).sum() + (b * r1.g).sum())


def test_sinkhorn_divergence_gradcheck():
    x = torch.randn(5, 2, dtype=F64, requires_grad=True)
    y = torch.randn(4, 2, dtype=F64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda x, y: ot.sinkhorn_divergence(x, y, epsilon=1.0, n_iters=500), (x, y),
        eps=1e-6, atol=1e-6)


def test_symmetric_self_transport_equals_the_two_sided_solve():
    # OT_ε(a, a) of the debiasing terms runs the averaged symmetric update;
    # converged, it equals the alternating solve of the same problem
    x = torch.randn(2, 12, 3, dtype=F64)
    a = simplex(2, 12)
    C = 0.5 * torch.cdist(x, x) ** 2
    r = ot.sinkhorn(C, a, a, epsilon=0.3, n_iters=2000)
    f = ot._iterate_symmetric(C, a.log(), 0.3, 60)
    torch.testing.assert_close(2 * (a * f).sum(-1), (a * r.f).sum(-1) + (a * r.g).sum(-1))
    torch.testing.assert_close(f, r.f)


def test_eps_scaling_schedule():
    x, y = torch.zeros(4, 2, dtype=F64), torch.zeros(3, 2, dtype=F64)
    x[0, 0], y[0, 1] = 3.0, 4.0  # box diagonal 5: ε₀ = 5²/2 for p = 2, 5 for p = 1
    sched = ot._eps_schedule(0.1, 20, 0.5, x, y, 2)
    assert sched[0] == 12.5 and sched[1] == 6.25 and sched[-1] == 0.1 and len(sched) == 20
    assert ot._eps_schedule(0.1, 20, 0.5, x, y, 1)[0] == 5.0
    assert ot._eps_schedule(0.1, 5, None, x, y, 2) == [0.1] * 5
    assert ot._eps_schedule(50.0, 3, 0.5, x, y, 2).tolist() == [50.0] * 3  # ε₀ below ε: no annealing
    with pytest.raises(ValueError, match="n_iters"):
        ot._eps_schedule(0.1, 5, 0.5, x, y, 2)
    # annealed and plain runs converge to the same divergence
    u, v = torch.randn(20, 3, dtype=F64), torch.randn(17, 3, dtype=F64) + 1
    torch.testing.assert_close(ot.sinkhorn_divergence(u, v, epsilon=0.05, n_iters=400, scaling=0.7),
                               ot.sinkhorn_divergence(u, v, epsilon=0.05, n_iters=400))


# --------------------------------------------------------------------------- tiled kernels

def _tiled_ops(backend):
    return ot._point_ops(backend)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("p", [1, 2])
def test_tiled_kernels_match_the_dense_formulas(backend, p):
    # shapes that are not multiples of the tiles (cpp 256 x 256, triton 32 x 32)
    N, M, d = (300, 530, 7) if backend == "cpp" else (37, 45, 19)
    x = torch.randn(2, N, d) / math.sqrt(d)
    y = 0.8 * torch.randn(2, M, d) / math.sqrt(d) + 0.3
    y[1, :3] = x[1, :3]  # coincident points: cost 0, the p = 1 gradient's subgradient 0
    eps = 0.3
    h = torch.randn(2, M) - math.log(M)
    h[0, 5:40] = -math.inf  # zero weights
    ops = _tiled_ops(backend)
    C = ot._point_cost(x.double(), y.double(), p)
    ref = -eps * torch.logsumexp(h.double().unsqueeze(-2) - C / eps, -1)
    torch.testing.assert_close(ops.softmin(x, y, h, eps, p).double(), ref, rtol=1e-5, atol=1e-5)
    # row potentials that give the plan rows of mass ~1/N (a real plan, not underflow)
    l = (ref / eps - math.log(N) + 0.1 * torch.randn(2, N, dtype=F64)).float()
    xr = x.double().requires_grad_()
    plan = torch.exp(l.double().unsqueeze(-1) + h.double().unsqueeze(-2) - C / eps)
    (plan * ot._point_cost(xr, y.double(), p)).sum().backward()
    got = ops.transport_grad(x, y, l, h, eps, p).double()
    torch.testing.assert_close(got, xr.grad, rtol=1e-4, atol=1e-5 * xr.grad.abs().max().item())


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("debias,scaling", [(True, None), (False, None), (True, 0.6)])
def test_sinkhorn_divergence_backends_agree(backend, p, debias, scaling):
    shape = (2, 3) if backend == "cpp" else (2,)
    N, M, d = (150, 140, 5) if backend == "cpp" else (21, 18, 3)
    x = torch.randn(*shape, N, d)
    y = 0.7 * torch.randn(*shape, M, d) + 0.4
    a, b = simplex(*shape, N, dtype=torch.float32, zeros=2), simplex(*shape, M, dtype=torch.float32)
    kw = dict(epsilon=0.1, p=p, debias=debias, n_iters=30, scaling=scaling)
    grads = []
    w = torch.randn(shape)
    for name in ("torch", backend):
        xs, ys, as_, bs = (t.clone().requires_grad_() for t in (x, y, a, b))
        out = ot.sinkhorn_divergence(xs, ys, as_, bs, backend=name, **kw)
        assert out.shape == shape and out.dtype == torch.float32
        (out * w).sum().backward()
        grads.append((out.detach(), xs.grad, ys.grad, as_.grad, bs.grad))
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5 * (1 + want.abs().max().item()))


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sinkhorn_divergence_half_inputs_and_views(backend, dtype):
    # half clouds are upcast (the work is float32); non-contiguous views are fine
    x = torch.randn(30, 8, dtype=dtype)[::2]
    y = torch.randn(8, 25, dtype=dtype).T
    want = ot.sinkhorn_divergence(x.float(), y.float().contiguous(), epsilon=0.2, n_iters=20,
                                  backend="torch")
    got = ot.sinkhorn_divergence(x, y, epsilon=0.2, n_iters=20, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="float64"):
        ot.sinkhorn_divergence(x.double(), y.double(), epsilon=0.2, backend=backend)


# --------------------------------------------------------------------------- SinKD

def sinkd_reference(student, teacher, temperature=2.0, epsilon=0.1, n_iters=20, cost="l1"):
    """A faithful torch port of the SinKD formulation (Cui et al. 2024): the
    pairwise cost between student and teacher probability rows, the Gibbs
    kernel exp(−W/ε), n_iters linear-domain Sinkhorn normalizations (rows,
    then columns), loss Σ P·W (the paper then scales it by 0.001). The cost
    is built from the B×B×V differences, as the generic-op reference does."""
    p_s = F.softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    if cost == "l1":
        W = (p_s[:, None, :] - p_t[None, :, :]).abs().sum(-1)
    elif cost == "sqeuclidean":
        W = (p_s[:, None, :] - p_t[None, :, :]).pow(2).sum(-1)
    else:
        W = 1 - F.cosine_similarity(p_s[:, None, :], p_t[None, :, :], dim=-1)
    P = torch.exp(-W / epsilon)
    for _ in range(n_iters):
        P = P / P.sum(dim=1, keepdim=True)
        P = P / P.sum(dim=0, keepdim=True)
    return (P * W).sum()


@pytest.mark.parametrize("cost", ot.KD_COSTS)
def test_sinkd_unrolled_matches_reference(cost):
    B, V = 9, 40
    s0 = torch.randn(B, V, dtype=F64) * 2
    t = torch.randn(B, V, dtype=F64) * 2
    s1 = s0.clone().requires_grad_()
    s2 = s0.clone().requires_grad_()
    ours = ot.sinkhorn_kd_loss(s1, t, cost=cost, gradient="unrolled")
    ref = sinkd_reference(s2, t, cost=cost) / B
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-13)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-8, atol=1e-12)
    # same value in envelope mode; other temperature/ε/iterations still match
    torch.testing.assert_close(ot.sinkhorn_kd_loss(s0, t, cost=cost), ref.detach(),
                               rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(
        ot.sinkhorn_kd_loss(s0, t, cost=cost, temperature=1.0, epsilon=0.05, n_iters=7,
                            gradient="unrolled"),
        sinkd_reference(s0, t, 1.0, 0.05, 7, cost) / B, rtol=1e-10, atol=1e-13)


def test_sinkd_envelope_gradient():
    """"envelope" gives ∂/∂W = P, the gradient of OT_ε; that of ⟨P, W⟩ differs
    by O(ε) terms, so the two only agree loosely (same direction)."""
    B, V = 12, 30
    s0 = torch.randn(B, V, dtype=F64) * 2
    t = torch.randn(B, V, dtype=F64) * 2
    grads = {}
    for mode in ot.KD_GRADIENTS:
        s = s0.clone().requires_grad_()
        ot.sinkhorn_kd_loss(s, t, gradient=mode, epsilon=0.05, n_iters=300).backward()
        grads[mode] = s.grad
    env, unr = grads["envelope"], grads["unrolled"]
    assert F.cosine_similarity(env.flatten(), unr.flatten(), dim=0) > 0.9
    assert (env - unr).norm() < 0.5 * unr.norm()
    # exactly: the envelope gradient is the plan pushed back through the cost
    s = s0.clone().requires_grad_()
    q, p = F.softmax(s / 2, -1), F.softmax(t / 2, -1)
    W = (q[:, None, :] - p[None, :, :]).abs().sum(-1)
    plan = ot.sinkhorn(W.detach(), epsilon=0.05, n_iters=300, return_plan=True).plan
    (plan * W).sum().backward()
    torch.testing.assert_close(env, s.grad)


def test_sinkd_ignored_rows_are_dropped():
    s0 = torch.randn(2, 5, 20)
    t = torch.randn(2, 5, 20)
    labels = torch.tensor([[1, -100, 3, 4, -100], [0, 2, -100, 1, 1]])
    keep = labels != -100
    for mode in ot.KD_GRADIENTS:
        s = s0.clone().requires_grad_()
        loss = ot.sinkhorn_kd_loss(s, t, labels=labels, gradient=mode)
        sk = s0[keep].clone().requires_grad_()
        want = ot.sinkhorn_kd_loss(sk, t[keep], gradient=mode)
        torch.testing.assert_close(loss, want)
        loss.backward()
        want.backward()
        torch.testing.assert_close(s.grad[keep], sk.grad)
        assert (s.grad[~keep] == 0).all()
    # another ignore_index
    lab = torch.where(keep, labels, torch.full_like(labels, 7))
    torch.testing.assert_close(ot.sinkhorn_kd_loss(s0, t, labels=lab, ignore_index=7),
                               ot.sinkhorn_kd_loss(s0[keep], t[keep]))


@pytest.mark.parametrize("mode", ot.KD_GRADIENTS)
def test_sinkd_all_ignored_is_zero(mode):
    s = torch.randn(4, 10, requires_grad=True)
    loss = ot.sinkhorn_kd_loss(s, torch.randn(4, 10), labels=torch.full((4,), -100), gradient=mode)
    assert loss.item() == 0
    loss.backward()
    assert (s.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sinkd_half_logits(dtype):
    s32, t32 = torch.randn(16, 100) * 3, torch.randn(16, 100) * 3
    s = s32.to(dtype).requires_grad_()
    loss = ot.sinkhorn_kd_loss(s, t32.to(dtype), epsilon=0.01, n_iters=50)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, ot.sinkhorn_kd_loss(s32, t32, epsilon=0.01, n_iters=50),
                               rtol=2e-2, atol=0)
    loss.backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()


def test_sinkd_identical_rows_single_row_and_3d():
    z = torch.randn(6, 12)
    # one row: the plan is [[1]], the loss is W_11
    one = ot.sinkhorn_kd_loss(z[:1], z[1:2])
    q, p = F.softmax(z[0] / 2, -1), F.softmax(z[1] / 2, -1)
    torch.testing.assert_close(one, (q - p).abs().sum())
    s = z.clone().requires_grad_()
    ot.sinkhorn_kd_loss(s, z.clone(), cost="cosine").backward()
    assert torch.isfinite(s.grad).all()
    torch.testing.assert_close(ot.sinkhorn_kd_loss(z.view(2, 3, 12), z.view(2, 3, 12).flip(0)),
                               ot.sinkhorn_kd_loss(z, z.view(2, 3, 12).flip(0).reshape(6, 12)))


def _sinkd_l1_dense(zs, zt, T, G):
    """float64 W = Σ_v |q − p| from logits and dL/dzs for L = Σ G ⊙ W, by autograd."""
    zd = zs.double().requires_grad_()
    q, p = torch.softmax(zd / T, -1), torch.softmax(zt.double() / T, -1)
    W = (q[:, None, :] - p[None, :, :]).abs().sum(-1)
    (W * G.double()).sum().backward()
    return W.detach(), zd.grad


def test_sinkd_l1_cpp_kernels_match_the_dense_formulas():
    if not fd.backends()["cpp"]:
        pytest.skip("the C++ extension is unavailable")
    Bq, Bp, V, T = 11, 9, 2100, 1.7  # rows and columns off the blocks (4 rows, 1024 columns)
    zs, zt = torch.randn(Bq, V) * 2, torch.randn(Bp, V) * 2
    zt[2] = zs[5]  # equal probabilities: sign(0) = 0, as torch's abs
    G = torch.randn(Bq, Bp)
    W, q, p = torch.ops.fastdistill.sinkd_l1_forward(zs, zt, T)
    W_ref, dz_ref = _sinkd_l1_dense(zs, zt, T, G)
    torch.testing.assert_close(W.double(), W_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q, torch.softmax(zs / T, -1))
    dz = torch.ops.fastdistill.sinkd_l1_backward(q, p, G, T)
    torch.testing.assert_close(dz.double(), dz_ref, rtol=1e-4, atol=1e-6)


def test_sinkd_l1_triton_kernels_match_the_dense_formulas():
    if not fd.backends()["triton"]:
        pytest.skip("triton is unavailable")
    from fastdistill.kernels import ot as triton_ot
    Bq, Bp, V = 19, 17, 70  # off the blocks (16 rows, 32 columns)
    q = torch.softmax(torch.randn(Bq, V) * 2, -1)
    p = torch.softmax(torch.randn(Bp, V) * 2, -1)
    p[2, :V // 2] = q[5, :V // 2]  # equal entries: sign(0) = 0
    G = torch.randn(Bq, Bp)
    qd = q.double().requires_grad_()
    W = (qd[:, None, :] - p.double()[None, :, :]).abs().sum(-1)
    torch.testing.assert_close(triton_ot.sinkd_l1_cost(q, p).double(), W.detach(), rtol=1e-5, atol=1e-6)
    (W * G.double()).sum().backward()
    torch.testing.assert_close(triton_ot.sinkd_l1_cost_backward(q, p, G).double(), qd.grad,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("mode", ot.KD_GRADIENTS)
def test_sinkd_backends_agree(backend, mode):
    B, V = (21, 1500) if backend == "cpp" else (19, 70)
    s0 = torch.randn(3, B, V) * 2
    t = torch.randn(3, B, V) * 2
    t[0, 3] = s0[0, 3]  # a row whose student and teacher coincide
    labels = torch.randint(0, V, (3, B))
    labels[1, ::4] = -100
    out = []
    for name in ("torch", backend):
        s = s0.clone().requires_grad_()
        loss = ot.sinkhorn_kd_loss(s, t, labels=labels, gradient=mode, backend=name)
        loss.backward()
        out.append((loss.detach(), s.grad))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-4, atol=1e-7)
    with pytest.raises(TypeError, match="float64"):
        ot.sinkhorn_kd_loss(s0.double(), t.double(), backend=backend)


# --------------------------------------------------------------------------- bad input

C0 = torch.rand(3, 4)
A0 = torch.full((3,), 1 / 3)
B0 = torch.full((4,), 0.25)
X0, Y0 = torch.randn(5, 2), torch.randn(6, 2)
L0 = torch.randn(4, 8)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ot.sinkhorn(C0, epsilon=0.0), ValueError, "epsilon"),
    (lambda: ot.sinkhorn(C0, epsilon=-1.0), ValueError, "epsilon"),
    (lambda: ot.sinkhorn(C0, epsilon=math.inf), ValueError, "epsilon"),
    (lambda: ot.sinkhorn(C0), TypeError, "epsilon"),
    (lambda: ot.sinkhorn(C0, epsilon=0.1, n_iters=0), ValueError, "n_iters"),
    (lambda: ot.sinkhorn(C0, epsilon=0.1, n_iters=2.0), TypeError, "n_iters"),
    (lambda: ot.sinkhorn(C0, epsilon=0.1, tol=0), ValueError, "tol"),
    (lambda: ot.sinkhorn(C0, epsilon=0.1, return_plan=1), TypeError, "return_plan"),
    (lambda: ot.sinkhorn(C0[0], epsilon=0.1), ValueError, "cost"),
    (lambda: ot.sinkhorn(C0[:, :0], epsilon=0.1), ValueError, "cost"),
    (lambda: ot.sinkhorn(C0.long(), epsilon=0.1), TypeError, "cost"),
    (lambda: ot.sinkhorn(C0.numpy(), epsilon=0.1), TypeError, "cost"),
    (lambda: ot.sinkhorn(torch.full((3, 4), math.inf), epsilon=0.1), ValueError, "cost"),
    (lambda: ot.sinkhorn(C0, torch.tensor([0.5, 0.7, -0.2]), epsilon=0.1), ValueError, "non-negative"),
    (lambda: ot.sinkhorn(C0, torch.tensor([0.5, 0.7, 0.2]), epsilon=0.1), ValueError, "sum to 1"),
    (lambda: ot.sinkhorn(C0, A0, B0 * 2, epsilon=0.1), ValueError, "b must sum to 1"),
    (lambda: ot.sinkhorn(C0, A0[:2] * 1.5, epsilon=0.1), ValueError, "a must have shape"),
    (lambda: ot.sinkhorn(C0, None, A0, epsilon=0.1), ValueError, "b must have shape"),
    (lambda: ot.sinkhorn(C0.expand(2, 3, 4), A0, epsilon=0.1), ValueError, "a must have shape"),
    (lambda: ot.sinkhorn(C0, torch.tensor([1, 0, 0]), epsilon=0.1), TypeError, "a must be a floating"),
    (lambda: ot.sinkhorn(C0, torch.tensor([math.nan, 0.5, 0.5]), epsilon=0.1), ValueError, "a must be finite"),
    (lambda: ot.sinkhorn_divergence(X0, Y0[:, :1], epsilon=0.1), ValueError, "agree"),
    (lambda: ot.sinkhorn_divergence(X0[None], Y0, epsilon=0.1), ValueError, "agree"),
    (lambda: ot.sinkhorn_divergence(X0[0], Y0[0], epsilon=0.1), ValueError, "x and y"),
    (lambda: ot.sinkhorn_divergence(X0, Y0, epsilon=0.1, p=3), ValueError, "p must"),
    (lambda: ot.sinkhorn_divergence(X0, Y0, epsilon=0.0), ValueError, "epsilon"),
    (lambda: ot.sinkhorn_divergence(X0, Y0, torch.ones(5), epsilon=0.1), ValueError, "a must sum"),
    (lambda: ot.sinkhorn_divergence(X0, Y0, epsilon=0.1, n_iters=0), ValueError, "n_iters"),
    (lambda: ot.sinkhorn_divergence(X0, Y0, epsilon=0.1, scaling=1.0), ValueError, "scaling"),
    (lambda: ot.sinkhorn_divergence(X0, Y0, epsilon=1e-3, n_iters=3, scaling=0.5), ValueError, "n_iters"),
    (lambda: ot.sinkhorn_divergence(X0[..., :0], Y0[..., :0], epsilon=0.1), ValueError, "d >= 1"),
    (lambda: ot.sinkhorn_divergence(X0, Y0, epsilon=0.1, backend="gpu"), ValueError, "backend"),
    (lambda: ot.sinkhorn_kd_loss(L0, L0[:, :7]), ValueError, "same shape"),
    (lambda: ot.sinkhorn_kd_loss(L0, L0, cost="kl"), ValueError, "cost"),
    (lambda: ot.sinkhorn_kd_loss(L0, L0, gradient="implicit"), ValueError, "gradient"),
    (lambda: ot.sinkhorn_kd_loss(L0, L0, epsilon=0), ValueError, "epsilon"),
    (lambda: ot.sinkhorn_kd_loss(L0, L0, temperature=0), ValueError, "temperature"),
    (lambda: ot.sinkhorn_kd_loss(L0, L0, n_iters=0), ValueError, "n_iters"),
    (lambda: ot.sinkhorn_kd_loss(L0, L0, labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels"),
    (lambda: ot.sinkhorn_kd_loss(L0, L0, labels=torch.zeros(4)), TypeError, "labels"),
    (lambda: ot.sinkhorn_kd_loss(L0, L0.clone().requires_grad_()), ValueError, "teacher_logits"),
    (lambda: ot.sinkhorn_kd_loss(L0.long(), L0), TypeError, "student_logits"),
    (lambda: ot.sinkhorn_kd_loss(L0[:, :0], L0[:, :0]), ValueError, "vocabulary"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------- ε floor

@pytest.mark.parametrize("backend", ["torch"] + fused_backends())
def test_sinkhorn_refuses_an_epsilon_the_dtype_cannot_carry(backend):
    """ε below max|C|·eps(work dtype) gave inf (cpp) or a silently wrong value
    (torch) in float32, and NaN below the smallest normal: now a ValueError
    naming epsilon, the dtype and the floor; just above the floor it is finite."""
    torch.manual_seed(0)
    C = torch.rand(2, 5, 6)
    cmax = float(C.abs().max())
    floor = cmax * torch.finfo(torch.float32).eps
    for eps, match in ((1e-30, r"epsilon=1e-30 .*torch\.float32.*max\|cost\|"),
                       (1e-40, r"epsilon=1e-40 .*smallest normal torch\.float32"),
                       (0.9 * floor, f"epsilon must be >= .* = {floor:.3g}")):
        with pytest.raises(ValueError, match=match):
            ot.sinkhorn(C, epsilon=eps, n_iters=20, backend=backend)
    # the floor scales with the costs: fine at costs ~1, refused at costs ~1000
    ot.sinkhorn(C, epsilon=1e-5, n_iters=5, backend=backend)
    with pytest.raises(ValueError, match="costs up to 9"):
        ot.sinkhorn(C * 1000, epsilon=1e-5, n_iters=5, backend=backend)
    r = ot.sinkhorn(C, epsilon=1.01 * floor, n_iters=50, return_plan=True, backend=backend)
    for t in (r.value, r.f, r.g, r.plan):
        assert torch.isfinite(t).all()
    # a non-finite cost is still the cost's error, an all-zero cost takes any normal ε
    with pytest.raises(ValueError, match="cost must be finite"):
        ot.sinkhorn(torch.full((3, 4), math.nan), epsilon=1e-3, backend=backend)
    z = ot.sinkhorn(torch.zeros(3, 4), epsilon=1e-30, backend=backend)
    assert z.value.abs().max() == 0


def test_float64_has_its_own_epsilon_floor():
    C = torch.rand(4, 5, dtype=F64)
    with pytest.raises(ValueError, match="torch.float64"):
        ot.sinkhorn(C, epsilon=1e-30, n_iters=5)
    r = ot.sinkhorn(C, epsilon=1e-12, n_iters=50, return_plan=True)  # float32 would refuse it
    assert torch.isfinite(r.value) and torch.isfinite(r.plan).all()
    with pytest.raises(ValueError, match="below what torch.float32 resolves"):
        ot.sinkhorn(C.float(), epsilon=1e-12, n_iters=5)


@pytest.mark.parametrize("backend", ["torch"] + fused_backends())
def test_divergence_and_sinkd_refuse_an_epsilon_the_dtype_cannot_carry(backend):
    x, y = torch.randn(5, 2), torch.randn(6, 2)
    for eps in (1e-30, 1e-40):
        with pytest.raises(ValueError, match="epsilon"):
            ot.sinkhorn_divergence(x, y, epsilon=eps, backend=backend)
        with pytest.raises(ValueError, match="epsilon"):
            ot.sinkhorn_divergence(x, y, epsilon=eps, scaling=0.5, n_iters=200, backend=backend)
        with pytest.raises(ValueError, match="epsilon"):
            ot.sinkhorn_kd_loss(L0, L0, epsilon=eps, backend=backend)
    # the divergence's floor is diameter^p/p·eps: here ~1e-6 (p = 2); SinKD's 2·eps(float32)
    assert torch.isfinite(ot.sinkhorn_divergence(x, y, epsilon=1e-4, n_iters=5, backend=backend))
    with pytest.raises(ValueError, match=r"epsilon must be >= max\|cost\|·eps\(torch.float32\) = 2.38e-07"):
        ot.sinkhorn_kd_loss(L0, L0, epsilon=1e-7, backend=backend)
    assert torch.isfinite(ot.sinkhorn_kd_loss(L0, L0, epsilon=1e-6, n_iters=5, backend=backend))
