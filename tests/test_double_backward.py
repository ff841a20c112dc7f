"""Differentiating twice through the KD losses: the fused autograd Functions
(kd_loss, sparse_kd_loss, softlabels.kd_loss, fused_linear_kd_loss on every
backend) give the exact Hessian-vector product of the float64 reference, or a
clear error where there is none (in place; vocabulary-parallel)."""
import pytest
import torch
import torch.distributed as dist

import fastdistill as fd
from fastdistill import softlabels as sl

from conftest import fused_backends, inplace_kd_loss

BACKENDS = ["torch"] + fused_backends()


def hvp(loss_fn, x, v):
    """∂/∂x ⟨∇(loss + 0.01‖x‖²), v⟩: the issue's probe (the quadratic keeps the
    second backward connected even where the loss's own part were lost)."""
    x = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(loss_fn(x) + 0.01 * (x ** 2).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad((g * v.to(x.dtype)).sum(), x)
    return h


def assert_hvp(got, want, tol=1e-5):
    err = float((got.double() - want).norm() / want.norm())
    assert err < tol, err


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", fd.DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_kd_loss_hvp(backend, div, reduction):
    torch.manual_seed(0)
    z, t, v = torch.randn(5, 43), torch.randn(5, 43), torch.randn(5, 43)
    labels = torch.tensor([3, -100, 0, 7, 42])
    kw = dict(divergence=div, taid_t=0.5 if div == "taid" else None, temperature=2.0,
              labels=labels, hard_weight=0.2, reduction=reduction)
    red = (lambda y: y.sum()) if reduction == "none" else (lambda y: y)
    want = hvp(lambda x: red(fd.kd_loss(x, t.double(), backend="torch", **kw)), z.double(), v)
    got = hvp(lambda x: red(fd.kd_loss(x, t, backend=backend, **kw)), z, v)
    assert_hvp(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail,div", [("bucket", "jsd"), ("bucket", "reverse_kl"),
                                      ("bucket", "skew_forward_kl"), ("renormalize", "tvd"),
                                      ("none", "forward_kl")])
def test_sparse_kd_loss_hvp(backend, tail, div):
    torch.manual_seed(1)
    z, v = torch.randn(4, 37), torch.randn(4, 37)
    lp, ids = torch.log_softmax(torch.randn(4, 37), -1).topk(6, -1)
    if tail == "none":
        ids, lp = fd.sample_teacher(torch.randn(4, 37), 10)
    kw = dict(tail=tail, divergence=div, temperature=1.5)
    want = hvp(lambda x: fd.sparse_kd_loss(x, ids, lp.double(), backend="torch", **kw),
               z.double(), v)
    got = hvp(lambda x: fd.sparse_kd_loss(x, ids, lp, backend=backend, **kw), z, v)
    assert_hvp(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("codec", [dict(k=5), dict(method="sampled", n_samples=9)],
                         ids=["topk", "sampled"])
def test_softlabels_kd_loss_hvp(backend, codec):
    torch.manual_seed(2)
    z, v = torch.randn(4, 37), torch.randn(4, 37)
    labels = sl.encode(torch.randn(4, 37), **codec)
    ids, lp = labels.decode()
    tail = labels.codec.tail
    want = hvp(lambda x: fd.sparse_kd_loss(x, ids, lp.double(), tail=tail, backend="torch"),
               z.double(), v)
    got = hvp(lambda x: sl.kd_loss(x, labels, backend=backend), z, v)
    assert_hvp(got, want)


def _fused_case(teacher):
    torch.manual_seed(3)
    h, w, b = torch.randn(6, 8), torch.randn(31, 8), torch.randn(31)
    th, tw = torch.randn(6, 5), torch.randn(29, 5)
    labels = torch.tensor([1, -100, 2, 28, 0, 5])
    kw = dict(labels=labels, divergence="jsd", temperature=2.0, hard_weight=0.1,
              student_softcap=20.0, student_logit_scale=0.7, chunk_size=2)
    if teacher == "head":
        kw.update(teacher_hidden=th, teacher_weight=tw, vocab_mismatch="pad")
    elif teacher == "logits":
        kw.update(teacher_logits=th @ tw.t(), vocab_mismatch="truncate")
    else:
        lp, ids = torch.log_softmax(th @ tw.t(), -1).topk(4, -1)
        kw.update(teacher_sparse=(ids, lp) if teacher == "sparse" else sl.encode(th @ tw.t(), k=4),
                  divergence="forward_kl")
        if teacher == "packed":
            kw["temperature"] = 1.0
    return h, w, b, kw


def _as64(kw):
    out = dict(kw)
    for k in ("teacher_hidden", "teacher_weight", "teacher_logits"):
        if k in out:
            out[k] = out[k].double()
    if isinstance(out.get("teacher_sparse"), tuple):
        ids, lp = out["teacher_sparse"]
        out["teacher_sparse"] = (ids, lp.double())
    if isinstance(out.get("teacher_sparse"), sl.SoftLabels):
        ids, lp = out["teacher_sparse"].decode()
        out["teacher_sparse"] = (ids, lp.double())
        out["temperature"] = 1.0
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher", ["head", "logits", "sparse", "packed"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_hvp_in_hidden_weight_and_bias(backend, teacher, reduction):
    h, w, b, kw = _fused_case(teacher)
    if teacher == "packed" and w.shape[0] != 29:
        w, b = w[:29].contiguous(), b[:29].contiguous()  # packed labels index the student vocab
    kw["reduction"] = reduction
    red = (lambda y: y.sum()) if reduction == "none" else (lambda y: y)
    vh, vw, vb = torch.randn_like(h), torch.randn_like(w), torch.randn_like(b)

    def probe(h, w, b, kw, be):
        xs = [t.detach().clone().requires_grad_() for t in (h, w, b)]
        loss = red(fd.fused_linear_kd_loss(xs[0], xs[1], student_bias=xs[2], backend=be, **kw))
        grads = torch.autograd.grad(loss + 0.01 * sum((x ** 2).sum() for x in xs), xs,
                                    create_graph=True)
        dot = sum((g * v.to(g.dtype)).sum() for g, v in zip(grads, (vh, vw, vb)))
        return torch.autograd.grad(dot, xs)

    want = probe(h.double(), w.double(), b.double(), _as64(kw), "torch")
    got = probe(h, w, b, kw, backend)
    for g, wnt in zip(got, want):
        assert_hvp(g, wnt, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["kd", "sparse", "softlabels"])
def test_inplace_backward_twice_is_a_clear_error(backend, op):
    torch.manual_seed(4)
    h, w = torch.randn(4, 6, requires_grad=True), torch.randn(30, 6)
    t = torch.randn(4, 30)
    z = h @ w.t()
    loss = inplace_kd_loss(op, z, t, backend)
    with pytest.raises(RuntimeError, match="inplace_backward=True cannot be differentiated twice"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_vocab_parallel_twice_is_a_clear_error(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        group = dist.new_group([0])
        h, w = torch.randn(3, 4, requires_grad=True), torch.randn(12, 4)
        loss = fd.kd_loss(h @ w.t(), torch.randn(3, 12), process_group=group)
        with pytest.raises(RuntimeError, match="process_group cannot be differentiated twice"):
            torch.autograd.grad(loss, h, create_graph=True)
        (g,) = torch.autograd.grad(fd.kd_loss(h @ w.t(), torch.randn(3, 12), process_group=group), h)
        assert torch.isfinite(g).all()  # first order still works
    finally:
        dist.destroy_process_group()


# =====================================================================================
# dd and ot (issue 20.1; added by the dd/ot helper, this block only): every custom
# autograd Function of fastdistill/ot.py and fastdistill/dd either differentiates
# twice exactly (dd's 2×2 pooling, which DC's gradient matching differentiates
# through) or raises the clear once_differentiable error; float64 gradcheck of
# every such op that accepts float64 (issue 15.8). The float32-only kernels
# (_TiledDivergence, _TiledL1Cost, _FusedL1Cost, _SegmentCosine) are checked
# against float64 references in tests/test_ot.py and tests/test_dd.py.
# =====================================================================================
import copy  # noqa: E402

import torch.nn.functional as _F  # noqa: E402
from torch import nn as _nn  # noqa: E402

from fastdistill import dd as _dd  # noqa: E402
from fastdistill import ot as _ot  # noqa: E402
from fastdistill.dd import nets as _nets  # noqa: E402

_TWICE = "first-order only"
_F64 = torch.float64


def _ot_twice_cases():
    torch.manual_seed(4)
    C0 = torch.rand(5, 6)
    x0, y0 = torch.randn(6, 2), torch.randn(5, 2)
    z0, t0 = torch.randn(6, 9), torch.randn(6, 9)
    cases = [
        ("sinkhorn_value", lambda C: _ot.sinkhorn(C, epsilon=0.3, n_iters=40).value.sum(), C0, None),
        ("sinkhorn_divergence_torch",
         lambda x: _ot.sinkhorn_divergence(x, y0, epsilon=0.5, n_iters=30, backend="torch"), x0, None),
        ("sinkd_envelope_torch",
         lambda z: _ot.sinkhorn_kd_loss(z, t0, n_iters=10, backend="torch"), z0, None),
    ]
    for b in fused_backends():
        name = b.values[0]
        cases += [
            (f"sinkhorn_divergence_{name}",  # _TiledDivergence
             lambda x, n=name: _ot.sinkhorn_divergence(x, y0, epsilon=0.5, n_iters=30, backend=n), x0, b),
            (f"sinkd_l1_envelope_{name}",  # _FusedL1Cost (cpp) / _TiledL1Cost (triton), then _Envelope
             lambda z, n=name: _ot.sinkhorn_kd_loss(z, t0, n_iters=10, backend=n), z0, b),
            (f"sinkd_l1_unrolled_{name}",  # the cost Function alone (the iterations are autograd)
             lambda z, n=name: _ot.sinkhorn_kd_loss(z, t0, n_iters=10, backend=n, gradient="unrolled"),
             z0, b),
        ]
    out = []
    for name, fn, x, b in cases:
        marks = b.marks if b is not None else ()
        out.append(pytest.param(fn, x, id=name, marks=marks))
    return out


@pytest.mark.parametrize("fn,x", _ot_twice_cases())
def test_ot_functions_twice_are_a_clear_error(fn, x):
    """_Envelope, _TiledDivergence, _TiledL1Cost and _FusedL1Cost are
    first-order only (envelope gradients, tiled kernels): differentiating
    twice raises, naming the op. Before, their backward (once_differentiable)
    returned constants when the incoming gradient was a constant (a scalar
    loss), so the issue's probe gave the quadratic's 0.02·v alone, silently."""
    with pytest.raises(RuntimeError, match="first-order only"):
        hvp(fn, x, torch.randn_like(x))
    xx = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(xx), xx, create_graph=True)  # the first backward works
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad((g * torch.randn_like(g)).sum(), xx)
    (g1,) = torch.autograd.grad(fn(xx), xx)  # and without create_graph it is a plain tensor
    assert not g1.requires_grad
    torch.testing.assert_close(g.detach(), g1)


@pytest.mark.parametrize("backend", fused_backends())
def test_segment_cosine_twice_is_a_clear_error(backend):
    torch.manual_seed(5)
    ga = [[torch.randn(4, 6, requires_grad=True), torch.randn(3, 2, 2, requires_grad=True)]]
    gb = [[torch.randn(4, 6), torch.randn(3, 2, 2)]]
    for metric in ("dc", "cos"):
        loss = _dd.gradient_match_loss(ga, gb, metric, backend=backend)
        g = torch.autograd.grad(loss, ga[0], create_graph=True)
        with pytest.raises(RuntimeError, match=_TWICE):
            torch.autograd.grad(sum((t * t).sum() for t in g), ga[0])


def test_envelope_gradcheck_float64_against_its_definition():
    """_Envelope's backward is the gradient of OT_ε = ⟨a, f⟩ + ⟨b, g⟩ at
    convergence: gradcheck of that output w.r.t. the cost and (through a
    softmax, so they stay on the simplex) the weights; ``value``'s backward
    is the same gradient by definition (sinkhorn's docstring)."""
    torch.manual_seed(6)
    C = torch.rand(2, 4, 5, dtype=_F64, requires_grad=True)
    u = torch.randn(2, 4, dtype=_F64, requires_grad=True)
    w = torch.randn(2, 5, dtype=_F64, requires_grad=True)

    def objective(C, u, w):
        return _ot._solve(C, u.softmax(-1), w.softmax(-1), 0.4, 5000, 1e-14, False)[1]

    assert torch.autograd.gradcheck(objective, (C, u, w), eps=1e-6, atol=1e-7, rtol=1e-5)
    d = torch.randn(2, dtype=_F64)
    g_obj = torch.autograd.grad((objective(C, u, w) * d).sum(), (C, u, w))
    value = _ot._solve(C, u.softmax(-1), w.softmax(-1), 0.4, 5000, 1e-14, False)[0]
    g_val = torch.autograd.grad((value * d).sum(), (C, u, w))
    for a, b in zip(g_val, g_obj):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_sinkd_unrolled_float64_gradcheck_and_gradgradcheck():
    """The unrolled SinKD path on torch is autograd through the iterations:
    exact at every order in float64."""
    torch.manual_seed(7)
    z = torch.randn(4, 5, dtype=_F64, requires_grad=True)
    t = torch.randn(4, 5, dtype=_F64)
    for cost in _ot.KD_COSTS:
        fn = lambda z, c=cost: _ot.sinkhorn_kd_loss(z, t, n_iters=8, cost=c, gradient="unrolled",  # noqa: E731
                                                    backend="torch")
        assert torch.autograd.gradcheck(fn, (z,))
        if cost != "l1":  # |·| has no second derivative to check
            assert torch.autograd.gradgradcheck(fn, (z,))


@pytest.mark.parametrize("shape", [(2, 3, 6, 8), (1, 2, 7, 5), (3, 5, 4)])
def test_pool_and_spread_gradcheck_and_gradgradcheck(shape):
    """_Pool2x2 and _Spread2x2 (each the other's backward) in float64, odd
    edges included: first and second order against finite differences."""
    torch.manual_seed(8)
    x = torch.randn(*shape, dtype=_F64, requires_grad=True)
    assert torch.autograd.gradcheck(_nets._Pool2x2.apply, (x,))
    assert torch.autograd.gradgradcheck(_nets._Pool2x2.apply, (x,))
    h, w = shape[-2:]
    g = torch.randn(*shape[:-2], h // 2, w // 2, dtype=_F64, requires_grad=True)
    spread = lambda g: _nets._Spread2x2.apply(g, h, w)  # noqa: E731
    assert spread(g).shape == x.shape
    assert torch.autograd.gradcheck(spread, (g,))
    assert torch.autograd.gradgradcheck(spread, (g,))
    # the adjoint pair: <pool(x), g> = <x, spread(g)>
    torch.testing.assert_close((_nets._Pool2x2.apply(x) * g).sum(), (x * spread(g)).sum())


def _plain_twin(net):
    """The same ConvNet with nn.AvgPool2d(2) (ATen's op) in place of AvgPool2x2."""
    twin = copy.deepcopy(net)
    for i, m in enumerate(twin.features):
        if isinstance(m, _nets.AvgPool2x2):
            twin.features[i] = _nn.AvgPool2d(2)
    assert not any(isinstance(m, _nets.AvgPool2x2) for m in twin.modules())
    return twin


def test_convnet_hvp_equals_the_plain_avg_pool_net():
    """Hessian-vector products of a loss through ConvNet (its custom pooling)
    equal the plain-op net's, w.r.t. the images and w.r.t. the parameters."""
    torch.manual_seed(9)
    net = _dd.ConvNet(2, 3, 6, 2, (7, 9)).double()
    twin = _plain_twin(net)
    x = torch.randn(4, 2, 7, 9, dtype=_F64)
    y = torch.tensor([0, 2, 1, 2])
    v = torch.randn_like(x)
    loss_x = lambda m: (lambda xx: _F.cross_entropy(m(xx), y))  # noqa: E731
    assert_hvp(hvp(loss_x(net), x, v), hvp(loss_x(twin), x, v), tol=1e-12)
    out = []
    for model in (net, twin):
        ps = list(model.parameters())
        g = torch.autograd.grad(_F.cross_entropy(model(x), y), ps, create_graph=True)
        vs = [torch.randn(p.shape, dtype=_F64, generator=torch.Generator().manual_seed(j))
              for j, p in enumerate(ps)]
        out.append(torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, vs)), ps))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def _dc_reference(ga, gb):
    """DC's distance written out: per layer, rows of the (out, rest) reshape."""
    total = 0
    for ra, rb in zip(ga, gb):
        for a, b in zip(ra, rb):
            if a.dim() <= 1:
                continue
            a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            total = total + (1 - (a2 * b2).sum(1) / (a2.norm(dim=1) * b2.norm(dim=1) + 1e-6)).sum()
    return total


@pytest.mark.parametrize("backend", ["torch"] + fused_backends())
def test_dc_image_gradient_equals_a_pure_torch_matching_loss(backend):
    """DC's path: grouped gradients of the synthetic images (create_graph) and
    the matching loss (the fused backends' _SegmentCosine, whose backward
    runs once), backpropagated to the images. Equals, in float64, a per-class
    autograd loop through the plain-op ConvNet and the written-out loss."""
    torch.manual_seed(10)
    net = _dd.ConvNet(1, 3, 6, 2, (8, 8)).double()
    twin = _plain_twin(net)
    xr, yr = torch.randn(12, 1, 8, 8, dtype=_F64), torch.arange(3).repeat(4)
    xs0, ys = torch.randn(6, 1, 8, 8, dtype=_F64), torch.arange(3).repeat_interleave(2)
    ce = lambda o, t: _F.cross_entropy(o, t, reduction="none")  # noqa: E731

    # reference: float64, plain ops, a loop per class, the written-out distance
    params = list(twin.parameters())
    g_real = [list(torch.autograd.grad(ce(twin(xr[yr == c]), yr[yr == c]).sum(), params))
              for c in range(3)]
    xs_ref = xs0.clone().requires_grad_()
    g_syn = [list(torch.autograd.grad(ce(twin(xs_ref[ys == c]), ys[ys == c]).sum(), params,
                                      create_graph=True)) for c in range(3)]
    want = torch.autograd.grad(_dc_reference(g_real, g_syn), xs_ref)[0]

    # the library: float64 on torch; float32 on the fused backends (float32 only)
    dt = _F64 if backend == "torch" else torch.float32
    model = copy.deepcopy(net).to(dt)
    gr = _dd.grouped_gradients(model, ce, xr.to(dt), yr, yr, num_groups=3)
    xs = xs0.to(dt).clone().requires_grad_()
    gs = _dd.grouped_gradients(model, ce, xs, ys, ys, create_graph=True, num_groups=3)
    loss = _dd.gradient_match_loss(gr, gs, "dc", backend=backend)
    torch.testing.assert_close(loss.double(), _dc_reference(g_real, g_syn).detach(),
                               rtol=1e-12 if dt == _F64 else 1e-4, atol=0)
    (got,) = torch.autograd.grad(loss, xs)
    err = float((got.double() - want).norm() / want.norm())
    assert err < (1e-10 if dt == _F64 else 1e-3), err
