"""Differentiating twice through the KD losses: the fused autograd Functions
(kd_loss, sparse_kd_loss, softlabels.kd_loss, fused_linear_kd_loss on every
backend) give the exact Hessian-vector product of the float64 reference, or a
clear error where there is none (in place; vocabulary-parallel)."""
import pytest
import torch
import torch.distributed as dist

import fastdistill as fd
from fastdistill import softlabels as sl

from conftest import fused_backends

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
    if op == "kd":
        loss = fd.kd_loss(z, t, inplace_backward=True, backend=backend)
    elif op == "sparse":
        lp, ids = torch.log_softmax(t, -1).topk(5, -1)
        loss = fd.sparse_kd_loss(z, ids, lp, inplace_backward=True, backend=backend)
    else:
        loss = sl.kd_loss(z, sl.encode(t, k=5), inplace_backward=True, backend=backend)
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
