"""fd.ot.sinkhorn on a given cost with the cpp and triton kernels against the
float64 torch reference (values, potentials, plan, gradients w.r.t. the cost
and the weights; batched, tiny ε, fp16/bf16 costs, tol), the tensorized
sinkhorn_divergence against the online one, and torch.compile(fullgraph=True)
of a step through both."""
import math

import pytest
import torch

import fastdistill as fd
from conftest import fused_backends

ot = fd.ot
F64 = torch.float64


def simplex(*shape, zeros=0, dtype=torch.float32):
    w = torch.rand(*shape, dtype=F64) + 0.1
    if zeros:
        w[..., 1:1 + zeros] = 0
    return (w / w.sum(-1, keepdim=True)).to(dtype)


def shapes(backend):
    """Off the blocks: cpp rows of 16 and vectors of 8, triton tiles of 32 x 64."""
    return (37, 53) if backend == "cpp" else (35, 70)


def rounds(backend, n):
    """The interpreter runs each triton launch slowly: fewer rounds there (the
    comparisons are at equal rounds, convergence is not needed)."""
    return n if backend == "cpp" else max(4, n // 8)


def reference(C, a, b, eps, n_iters, tol=None, w=None):
    """float64 torch backend: (value, f, g, plan, dC, da, db) of value·w."""
    Cd, ad, bd = (t.detach().double().requires_grad_() for t in (C, a, b))
    r = ot.sinkhorn(Cd, ad, bd, epsilon=eps, n_iters=n_iters, tol=tol, return_plan=True, backend="torch")
    (r.value * (1 if w is None else w.double())).sum().backward()
    return r.value.detach(), r.f, r.g, r.plan, Cd.grad, ad.grad, bd.grad


def run(backend, C, a, b, eps, n_iters, tol=None, w=None):
    Cg, ag, bg = (t.detach().clone().requires_grad_() for t in (C, a, b))
    r = ot.sinkhorn(Cg, ag, bg, epsilon=eps, n_iters=n_iters, tol=tol, return_plan=True, backend=backend)
    (r.value * (1 if w is None else w)).sum().backward()
    return r.value.detach(), r.f, r.g, r.plan, Cg.grad, ag.grad, bg.grad


def assert_matches(got, want, rtol, atol, plan_rtol=None):
    names = ("value", "f", "g", "plan", "grad cost", "grad a", "grad b")
    for name, x, y in zip(names, got, want):
        rt = plan_rtol if plan_rtol is not None and name in ("plan", "grad cost") else rtol
        at = atol * (1 + y.abs().max().item())
        torch.testing.assert_close(x.double(), y, rtol=rt, atol=at, msg=lambda m, n=name: f"{n}: {m}")


# --------------------------------------------------------------------------- kernels vs reference

@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("batch", [(), (2, 3)])
def test_kernels_match_the_float64_reference(backend, batch):
    torch.manual_seed(0)
    N, M = shapes(backend)
    C = torch.rand(*batch, N, M) * 2
    a, b = simplex(*batch, N, zeros=3), simplex(*batch, M, zeros=2)  # zero weights too
    w = torch.rand(batch) + 0.5
    n = rounds(backend, 60)
    want = reference(C, a, b, 0.1, n, w=w)
    got = run(backend, C, a, b, 0.1, n, w=w)
    for t, shape in zip(got, [batch, batch + (N,), batch + (M,), batch + (N, M)]):
        assert t.shape == shape and t.dtype == torch.float32
    assert_matches(got, want, rtol=1e-5, atol=1e-6)
    assert (got[3][..., a == 0, :] == 0).all() if not batch else (got[3][a == 0] == 0).all()


@pytest.mark.parametrize("backend", [p for p in fused_backends() if p.values[0] == "cpp"])
def test_cpp_column_pass_over_several_row_slices(backend):
    """The cpp column pass sums each fixed slice of 256 rows in its own task
    and combines them: N = 600 is two full slices and a partial one (the other
    tests stay inside one slice)."""
    torch.manual_seed(3)
    C = torch.rand(600, 45) * 2
    a, b = simplex(600, zeros=5), simplex(45, zeros=1)
    want = reference(C, a, b, 0.05, 40)
    got = run(backend, C, a, b, 0.05, 40)
    assert_matches(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", fused_backends())
def test_tiny_epsilon(backend):
    """ε = 1e-3 with costs in [0, 2]: the linear-domain kernel exp(−C/ε) would
    underflow to 0 almost everywhere; float32 potentials carry ~|f|·2⁻²⁴ of
    rounding, which the plan sees magnified by 1/ε."""
    torch.manual_seed(1)
    N, M = shapes(backend)
    C = torch.rand(2, N, M) * 2
    a, b = simplex(2, N), simplex(2, M)
    n = rounds(backend, 200)
    want = reference(C, a, b, 1e-3, n)
    got = run(backend, C, a, b, 1e-3, n)
    assert (torch.exp(-C / 1e-3) == 0).float().mean() > 0.5
    for t in got:
        assert torch.isfinite(t).all()
    assert_matches(got, want, rtol=1e-4, atol=1e-5, plan_rtol=5e-3)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_costs(backend, dtype):
    """Read in their dtype, accumulated in float32: the float64 result on the
    rounded cost; the gradient w.r.t. the cost comes back in its dtype."""
    torch.manual_seed(2)
    N, M = shapes(backend)
    C = (torch.rand(3, N, M) * 2).to(dtype)
    a, b = simplex(3, N), simplex(3, M)
    n = rounds(backend, 80)
    want = reference(C, a, b, 0.05, n)  # the rounded cost, in float64
    got = run(backend, C, a, b, 0.05, n)
    assert got[4].dtype == dtype and got[0].dtype == torch.float32
    grad_tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert_matches(got[:4], want[:4], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[4].double(), want[4], rtol=grad_tol, atol=1e-3 * want[4].abs().max().item())
    assert_matches(got[5:], want[5:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", fused_backends())
def test_tol_stops_each_problem_at_its_own_round(backend):
    """Each problem of a batch stops at its first round below tol, exactly as
    it would alone; the same rounds as the float64 reference."""
    torch.manual_seed(3)
    N, M = shapes(backend)
    C = torch.rand(3, N, M)
    C[1] *= 4  # converges more slowly
    a, b = simplex(3, N), simplex(3, M)
    # the interpreter runs each launch slowly: a problem that converges in tens of rounds
    eps, tol = (0.05, 1e-4) if backend == "cpp" else (1.0, 1e-3)
    n = 1000 if backend == "cpp" else 40
    kw = dict(epsilon=eps, n_iters=n, tol=tol)
    r = ot.sinkhorn(C, a, b, return_plan=True, backend=backend, **kw)
    assert ((r.plan.sum(-1) - a).abs().sum(-1) < tol).all()
    for i in range(3):
        s = ot.sinkhorn(C[i], a[i], b[i], backend=backend, **kw)
        torch.testing.assert_close(r.f[i], s.f, rtol=0, atol=0)
        torch.testing.assert_close(r.g[i], s.g, rtol=0, atol=0)
    ref = ot.sinkhorn(C.double(), a.double(), b.double(), backend="torch", **kw)
    torch.testing.assert_close(r.f.double(), ref.f, rtol=1e-5, atol=1e-6)
    # fewer rounds than without tol
    full = ot.sinkhorn(C, a, b, epsilon=eps, n_iters=n, backend=backend)
    assert not torch.equal(full.f, r.f)


def test_tol_result_does_not_depend_on_the_check_interval(monkeypatch):
    """The early-exit check (every TOL_CHECK_EVERY rounds, host read) only
    ends the loop: the stopped problems are frozen on device, so the result
    is the same for any interval."""
    torch.manual_seed(4)
    C = torch.rand(3, 9, 11, dtype=F64)
    C[2] *= 3
    outs = []
    for every in (1, 7, 10_000):
        monkeypatch.setattr(ot, "TOL_CHECK_EVERY", every)
        outs.append(ot.sinkhorn(C, epsilon=0.05, n_iters=2000, tol=1e-5, backend="torch"))
    for o in outs[1:]:
        torch.testing.assert_close(o.f, outs[0].f, rtol=0, atol=0)
        torch.testing.assert_close(o.g, outs[0].g, rtol=0, atol=0)


@pytest.mark.parametrize("backend", fused_backends())
def test_views_single_row_and_column(backend):
    torch.manual_seed(5)
    base = torch.rand(40, 30)
    C = base.T[:, ::2]  # a non-contiguous view (30, 20)
    a, b = simplex(30), simplex(20)
    n = rounds(backend, 30)
    want = reference(C.contiguous(), a, b, 0.2, n)
    assert_matches(run(backend, C, a, b, 0.2, n), want, rtol=1e-5, atol=1e-6)
    for shape in ((1, 7), (7, 1), (1, 1)):
        Cs = torch.rand(*shape)
        u, v = simplex(shape[0]), simplex(shape[1])
        assert_matches(run(backend, Cs, u, v, 0.1, 5), reference(Cs, u, v, 0.1, 5), rtol=1e-5, atol=1e-6)


def test_cpp_half_steps_match_the_formulas():
    if not fd.backends()["cpp"]:
        pytest.skip("the C++ extension is unavailable")
    torch.manual_seed(6)
    C = torch.rand(2, 21, 45) * 3
    h_cols = torch.randn(2, 45)
    h_rows = torch.randn(2, 21)
    h_cols[0, :5] = -math.inf  # zero weights
    h_rows[1, 17:] = -math.inf
    Cd, eps = C.double(), 0.07
    ops = torch.ops.fastdistill
    want = -eps * torch.logsumexp(h_cols.double().unsqueeze(-2) - Cd / eps, -1)
    torch.testing.assert_close(ops.sinkhorn_softmin(C, h_cols, eps, 2).double(), want, rtol=1e-6, atol=1e-6)
    want = -eps * torch.logsumexp(h_rows.double().unsqueeze(-1) - Cd / eps, -2)
    torch.testing.assert_close(ops.sinkhorn_softmin(C, h_rows, eps, 1).double(), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.sinkhorn_softmin(C.transpose(1, 2), h_rows, eps, 2)
    with pytest.raises(RuntimeError, match="float32"):
        ops.sinkhorn_softmin(C, h_cols.double(), eps, 2)
    with pytest.raises(RuntimeError, match="ε must be finite and > 0"):
        ops.sinkhorn_solve(C, h_rows, h_cols, torch.tensor([0.1, -1.0], dtype=F64), 0.0)


# --------------------------------------------------------------------------- divergence modes

@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("p,debias,scaling", [(2, True, None), (1, True, None), (2, False, None),
                                              (2, True, 0.6), (1, True, 0.6)])
def test_tensorized_divergence_equals_online(backend, p, debias, scaling):
    torch.manual_seed(7)
    shape = (2,)
    N, M, d = (70, 45, 5) if backend == "cpp" else (21, 18, 3)
    x = torch.randn(*shape, N, d)
    y = 0.7 * torch.randn(*shape, M, d) + 0.4
    a, b = simplex(*shape, N, zeros=2), simplex(*shape, M)
    w = torch.randn(shape)
    kw = dict(epsilon=0.1, p=p, debias=debias, n_iters=rounds(backend, 30) if scaling is None else 20,
              scaling=scaling, backend=backend)
    out = []
    for mode in ("online", "tensorized", "auto"):
        xs, ys, as_, bs = (t.clone().requires_grad_() for t in (x, y, a, b))
        s = ot.sinkhorn_divergence(xs, ys, as_, bs, mode=mode, **kw)
        (s * w).sum().backward()
        out.append((s.detach(), xs.grad, ys.grad, as_.grad, bs.grad))
    for want, got, auto in zip(*out):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * (1 + want.abs().max().item()))
        torch.testing.assert_close(auto, got, rtol=0, atol=0)  # small clouds: auto is tensorized


def test_auto_mode_follows_the_memory_budget(monkeypatch):
    if not fd.backends()["cpp"]:
        pytest.skip("the C++ extension is unavailable")
    built = []
    real = ot._dense_point_cost
    monkeypatch.setattr(ot, "_dense_point_cost", lambda *a: built.append(a[0].shape) or real(*a))
    x, y = torch.randn(3, 20, 2), torch.randn(3, 30, 2)
    ot.sinkhorn_divergence(x, y, epsilon=0.1, n_iters=5, backend="cpp")
    assert len(built) == 3  # N×M, N×N, M×M
    need = ot._tensorized_bytes(3, 20, 30, True)
    assert need == 4 * 3 * (20 * 30 + 20 * 20 + 30 * 30)
    monkeypatch.setattr(ot, "TENSORIZED_BUDGET_BYTES", need - 1)
    built.clear()
    ot.sinkhorn_divergence(x, y, epsilon=0.1, n_iters=5, backend="cpp")
    assert not built  # online
    ot.sinkhorn_divergence(x, y, epsilon=0.1, n_iters=5, backend="cpp", debias=False)
    assert len(built) == 1  # N×M alone fits
    assert ot.TENSORIZED_BUDGET_BYTES == need - 1 and ot.DIVERGENCE_MODES == ("auto", "online", "tensorized")


def test_scaling_schedule_stays_on_device():
    """ε-scaling from the clouds' diameter as a tensor: the torch reference
    gives the same divergence as with the schedule read back as floats."""
    torch.manual_seed(8)
    x, y = torch.randn(12, 3, dtype=F64), torch.randn(9, 3, dtype=F64) + 1
    sched = ot._eps_schedule(0.05, 60, 0.7, x, y, 2)
    assert isinstance(sched, torch.Tensor) and sched.dtype == F64 and sched[-1].item() == 0.05
    pts = torch.cat([x, y])
    e0 = (pts.amax(0) - pts.amin(0)).norm().item() ** 2 / 2
    torch.testing.assert_close(sched, torch.tensor([max(0.05, e0 * 0.7 ** k) for k in range(60)], dtype=F64))
    got = ot.sinkhorn_divergence(x, y, epsilon=0.05, n_iters=60, scaling=0.7)
    C = 0.5 * torch.cdist(x, y) ** 2
    r = ot._Envelope.apply(C, torch.full((12,), 1 / 12, dtype=F64), torch.full((9,), 1 / 9, dtype=F64),
                           0.05, "torch", sched.tolist(), 60, None, False, False)[1]
    assert got.item() < r.item()  # debiased: below OT_ε(a, b)


# --------------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("backend", ["torch"] + fused_backends()[:1])
def test_fullgraph_compile_of_a_step(backend):
    """A training step through sinkhorn (with tol: frozen on device, no early
    exit under compile) and sinkhorn_divergence (with ε-scaling too: the
    schedule never leaves the device) compiles with fullgraph=True
    (cpp: registered ops with Meta kernels) and matches eager."""
    torch.manual_seed(9)
    C0 = torch.rand(2, 12, 10)
    x0, y0 = torch.randn(15, 3), torch.randn(13, 3) + 0.5

    def loss_fn(C, x, y):
        r = ot.sinkhorn(C, epsilon=0.1, n_iters=6, tol=1e-3, backend=backend)
        s = ot.sinkhorn_divergence(x, y, epsilon=0.2, n_iters=5, backend=backend)
        # ε-scaling from the clouds' diameter, on device (online: the tiled kernels)
        s2 = ot.sinkhorn_divergence(x, y, epsilon=0.2, n_iters=12, scaling=0.5, backend=backend,
                                    mode="auto" if backend == "torch" else "online")
        return r.value.sum() + s + s2

    outs = []
    # aot_eager: the whole capture (dynamo with fake tensors through the ops' Meta
    # kernels, AOT autograd's joint graph) without inductor's code generation
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        C, x, y = (t.clone().requires_grad_() for t in (C0, x0, y0))
        loss = fn(C, x, y)
        loss.backward()  # through the compiled graph's backward
        outs.append((loss.detach(), C.grad, x.grad, y.grad))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- bad input

def test_bad_input():
    C = torch.rand(3, 4)
    with pytest.raises(ValueError, match="backend"):
        ot.sinkhorn(C, epsilon=0.1, backend="gpu")
    with pytest.raises(TypeError, match="backend"):
        ot.sinkhorn(C, epsilon=0.1, backend=1)
    x, y = torch.randn(5, 2), torch.randn(6, 2)
    with pytest.raises(ValueError, match="mode"):
        ot.sinkhorn_divergence(x, y, epsilon=0.1, mode="dense")
    with pytest.raises(ValueError, match="online"):
        ot.sinkhorn_divergence(x, y, epsilon=0.1, mode="online", backend="torch")
    for name in [b.values[0] for b in fused_backends() if not b.marks or fd.backends()[b.values[0]]]:
        with pytest.raises(TypeError, match="float64"):
            ot.sinkhorn(C.double(), epsilon=0.1, backend=name)
        with pytest.raises(ValueError, match="cost must be finite"):
            ot.sinkhorn(torch.full((3, 4), math.nan), epsilon=0.1, backend=name)
