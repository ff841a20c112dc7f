"""fused_linear_kd_loss against the naive computation that materializes the
logits and calls the reference kd_loss (values and gradients of hidden,
weight and bias), on every backend."""
import pytest
import torch
import torch.nn.functional as F

import fastdistill as fd

from conftest import fused_backends
from test_kd import assert_close_rel, kw_for

DIVS = fd.DIVERGENCES
ALL_BACKENDS = [pytest.param("torch", id="torch")] + fused_backends()


def head_logits(h, w, b=None, scale=1.0, cap=None):
    z = F.linear(h, w, b) * scale
    return cap * torch.tanh(z / cap) if cap is not None else z


def naive(sh, sw, th=None, tw=None, *, teacher_logits=None, student_bias=None, teacher_bias=None,
          student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None,
          teacher_softcap=None, chunk_size=None, **kw):
    """The materialized computation: full logits, then the reference kd_loss."""
    z = head_logits(sh, sw, student_bias, student_logit_scale, student_softcap)
    if teacher_logits is None:
        with torch.no_grad():
            teacher_logits = head_logits(th, tw, teacher_bias, teacher_logit_scale, teacher_softcap)
    return fd.kd_loss(z, teacher_logits.detach(), backend="torch", **kw)


def run(fn, sh, sw, sb, *args, **kw):
    """loss and the gradients (hidden, weight, bias) of fn's loss (summed if 'none')."""
    x = sh.detach().clone().requires_grad_()
    w = sw.detach().clone().requires_grad_()
    b = None if sb is None else sb.detach().clone().requires_grad_()
    loss = fn(x, w, *args, student_bias=b, **kw)
    if loss.dim():
        weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        (loss * weights).sum().backward()
    else:
        loss.backward()
    return loss.detach(), x.grad, w.grad, None if b is None else b.grad


def make(n=13, hs=16, ht=12, vs=37, vt=37, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(sh=r(n, hs).to(dtype), sw=(r(vs, hs) / hs**0.5).to(dtype), sb=r(vs).to(dtype) * 0.3,
                th=r(n, ht).to(dtype), tw=(r(vt, ht) * 2 / ht**0.5).to(dtype),
                tb=r(vt).to(dtype) * 0.3)


def compare(backend, d, *, rtol=1e-4, use_bias=True, teacher_as_logits=False, **kw):
    """Fused (in d's dtype) against naive in float64."""
    sb = d["sb"] if use_bias else None
    f64 = {k: v.double() for k, v in d.items()}
    if teacher_as_logits:
        tl = head_logits(d["th"], d["tw"], d["tb"])
        got = run(fd.fused_linear_kd_loss, d["sh"], d["sw"], sb, teacher_logits=tl,
                  backend=backend, **kw)
        want = run(naive, f64["sh"], f64["sw"], None if sb is None else f64["sb"],
                   teacher_logits=tl.double(), **kw)
    else:
        tb = d["tb"] if use_bias else None
        got = run(fd.fused_linear_kd_loss, d["sh"], d["sw"], sb, d["th"], d["tw"],
                  teacher_bias=tb, backend=backend, **kw)
        want = run(naive, f64["sh"], f64["sw"], None if sb is None else f64["sb"], f64["th"],
                   f64["tw"], teacher_bias=None if tb is None else f64["tb"], **kw)
    for what, a, e in zip(("loss", "grad hidden", "grad weight", "grad bias"), got, want):
        if e is None:
            assert a is None, what
            continue
        assert a.dtype == (d["sh"].dtype if what != "loss" else a.dtype)
        assert torch.isfinite(a.float()).all(), what
        assert_close_rel(a, e, rtol, f"{backend} {what}")
    return got


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("div", DIVS)
def test_every_divergence_with_bias_softcap_scale_and_ignored_rows(backend, div):
    d = make(seed=1)
    labels = torch.tensor([3, -100, 0, 36, -100, 5, 7, 8, 9, -100, 11, 1, 2])
    compare(backend, d, labels=labels, chunk_size=4, temperature=2.5,
            student_logit_scale=0.7, student_softcap=3.0, teacher_logit_scale=1.3,
            teacher_softcap=5.0, **kw_for(div))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 5, None, 100])
def test_hard_weight_reductions_and_chunks(backend, reduction, chunk_size):
    d = make(seed=2)
    labels = torch.tensor([3, -100, 0, 36, 4, 5, 7, -100, 9, 10, 11, 1, 2])
    compare(backend, d, labels=labels, hard_weight=0.4, reduction=reduction,
            chunk_size=chunk_size, divergence="jsd", beta=0.3)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("mode,vs,vt", [("pad", 29, 37), ("pad", 37, 29),
                                        ("truncate", 29, 37), ("truncate", 37, 29)])
@pytest.mark.parametrize("teacher_as_logits", [False, True])
def test_vocab_mismatch(backend, mode, vs, vt, teacher_as_logits):
    d = make(vs=vs, vt=vt, seed=3)
    compare(backend, d, vocab_mismatch=mode, chunk_size=6, teacher_as_logits=teacher_as_logits,
            divergence="jsd", student_softcap=4.0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_teacher_logits_3d_and_no_bias(backend):
    d = make(n=12, seed=4)
    d3 = {k: (v.reshape(3, 4, -1) if k in ("sh", "th") else v) for k, v in d.items()}
    labels = torch.tensor([[1, 2, -100, 4], [5, 6, 7, 8], [-100, -100, 0, 1]])
    compare(backend, d3, use_bias=False, teacher_as_logits=True, labels=labels,
            reduction="none", chunk_size=5, hard_weight=0.2)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    d = make(n=11, hs=32, vs=301, vt=301, dtype=dtype, seed=5)
    labels = torch.tensor([3, -100, 0, 300, 4, 5, 7, -100, 9, 10, 11])
    compare(backend, d, rtol=2e-2, labels=labels, chunk_size=4, temperature=2.0,
            student_softcap=10.0, hard_weight=0.3, divergence="forward_kl")


@pytest.mark.parametrize("backend", [pytest.param("torch", id="torch")] + fused_backends()[:1])
def test_larger_vocab_not_a_multiple_of_blocks(backend):
    d = make(n=70, hs=24, ht=20, vs=32003, vt=32003, seed=6)
    labels = torch.randint(0, 32003, (70,), generator=torch.Generator().manual_seed(0))
    labels[::7] = -100
    compare(backend, d, labels=labels, chunk_size=33, hard_weight=0.1, divergence="tvd")


def test_float64_torch_backend_is_exact():
    d = make(dtype=torch.float64, seed=7)
    labels = torch.tensor([3, -100, 0, 36, -100, 5, 7, 8, 9, -100, 11, 1, 2])
    compare("torch", d, rtol=1e-10, labels=labels, chunk_size=3, divergence="skew_reverse_kl",
            student_softcap=2.0, hard_weight=0.5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_all_ignored_gives_zero_without_nan(backend):
    d = make(seed=8)
    labels = torch.full((13,), -100)
    loss, gh, gw, gb = run(fd.fused_linear_kd_loss, d["sh"], d["sw"], d["sb"], d["th"], d["tw"],
                           labels=labels, backend=backend)
    assert loss.item() == 0.0
    for g in (gh, gw, gb):
        assert torch.count_nonzero(g) == 0


def test_grads_only_where_asked_and_no_grad_eval():
    d = make(seed=9)
    w = d["sw"].clone().requires_grad_()
    loss = fd.fused_linear_kd_loss(d["sh"], w, d["th"], d["tw"])
    loss.backward()
    assert w.grad is not None
    with torch.no_grad():
        for red in ("mean", "sum", "none"):
            got = fd.fused_linear_kd_loss(d["sh"], d["sw"], d["th"], d["tw"], reduction=red,
                                          chunk_size=4)
            want = naive(d["sh"], d["sw"], d["th"], d["tw"], reduction=red)
            assert_close_rel(got, want, 1e-5, f"eval loss {red}")


def test_module_form_and_taid_at_call_time():
    d = make(seed=10)
    mod = fd.FusedLinearKDLoss(divergence="taid", taid_t=0.2, chunk_size=4)
    assert "taid" in repr(mod)
    a = mod(d["sh"], d["sw"], d["th"], d["tw"], taid_t=0.7)
    b = fd.fused_linear_kd_loss(d["sh"], d["sw"], d["th"], d["tw"], divergence="taid", taid_t=0.7)
    assert_close_rel(a, b, 1e-6, "module loss")
    with pytest.raises(TypeError, match="labels"):
        fd.FusedLinearKDLoss(labels=torch.zeros(3))


def test_no_logits_sized_tensor_is_kept_for_backward():
    """Memory: the autograd graph holds only hidden/weight-sized gradients."""
    d = make(n=64, hs=8, vs=4096, vt=4096, seed=11)
    x = d["sh"].clone().requires_grad_()
    loss = fd.fused_linear_kd_loss(x, d["sw"], d["th"], d["tw"], chunk_size=16)
    saved = [t for t in loss.grad_fn.saved_tensors if t is not None]
    assert all(t.numel() <= max(x.numel(), d["sw"].numel()) for t in saved)


def test_bad_input():
    d = make(seed=12)
    sh, sw, th, tw = d["sh"], d["sw"], d["th"], d["tw"]
    f = fd.fused_linear_kd_loss
    with pytest.raises(ValueError, match="student_weight"):
        f(sh, sw[:, :5], th, tw)
    with pytest.raises(ValueError, match="teacher_hidden"):
        f(sh, sw, th[:5], tw)
    with pytest.raises(ValueError, match="exactly one"):
        f(sh, sw)
    with pytest.raises(ValueError, match="exactly one"):
        f(sh, sw, th, tw, teacher_logits=torch.randn(13, 37))
    with pytest.raises(ValueError, match="give both"):
        f(sh, sw, th)
    with pytest.raises(ValueError, match="vocab"):
        f(sh, sw, th, tw[:30])
    with pytest.raises(TypeError, match="student_weight"):
        f(sh, sw.double(), th, tw)
    with pytest.raises(TypeError, match="student_hidden"):
        f(sh.long(), sw, th, tw)
    with pytest.raises(ValueError, match="student_bias"):
        f(sh, sw, th, tw, student_bias=torch.zeros(5))
    with pytest.raises(ValueError, match="student_softcap"):
        f(sh, sw, th, tw, student_softcap=0.0)
    with pytest.raises(ValueError, match="teacher_logit_scale"):
        f(sh, sw, th, tw, teacher_logit_scale=-1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        f(sh, sw, th, tw, chunk_size=0)
    with pytest.raises(ValueError, match="labels"):
        f(sh, sw, th, tw, labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be in"):
        f(sh, sw, th, tw, labels=torch.full((13,), 37), hard_weight=0.5)
    with pytest.raises(ValueError, match="teacher_softcap"):
        f(sh, sw, teacher_logits=torch.randn(13, 37), teacher_softcap=3.0)
    with pytest.raises(ValueError, match="temperature"):
        f(sh, sw, th, tw, temperature=0.0)
    with pytest.raises(ValueError, match="divergence"):
        f(sh, sw, th, tw, divergence="kl")


# ----------------------------------------------------------------- sparse teacher

SPARSE_CASES = [("bucket", "forward_kl"), ("bucket", "reverse_kl"), ("bucket", "skew_forward_kl"),
                ("bucket", "skew_reverse_kl"), ("bucket", "jsd"), ("renormalize", "forward_kl"),
                ("renormalize", "tvd"), ("none", "forward_kl")]


def sparse_teacher(d, k, temperature=1.0, sampled=False):
    """Top-k (or sampled) teacher log-probs at the temperature, from d's teacher head."""
    tl = head_logits(d["th"].double(), d["tw"].double(), d["tb"].double())
    if sampled:
        return fd.sample_teacher(tl, k, temperature=temperature,
                                 generator=torch.Generator().manual_seed(5))
    lp, ids = torch.log_softmax(tl / temperature, -1).topk(k, -1)
    return ids, lp.float()


def naive_sparse(sh, sw, *, teacher_sparse, student_bias=None, student_logit_scale=1.0,
                 student_softcap=None, chunk_size=None, **kw):
    """The materialized computation: full student logits, then the reference sparse_kd_loss."""
    z = head_logits(sh, sw, student_bias, student_logit_scale, student_softcap)
    return fd.sparse_kd_loss(z, *teacher_sparse, backend="torch", **kw)


def compare_sparse(backend, d, teacher_sparse, *, rtol=1e-4, **kw):
    f64 = {k: v.double() for k, v in d.items()}
    got = run(fd.fused_linear_kd_loss, d["sh"], d["sw"], d["sb"], teacher_sparse=teacher_sparse,
              backend=backend, **kw)
    want = run(naive_sparse, f64["sh"], f64["sw"], f64["sb"], teacher_sparse=teacher_sparse, **kw)
    for what, a, e in zip(("loss", "grad hidden", "grad weight", "grad bias"), got, want):
        assert torch.isfinite(a.float()).all(), what
        assert_close_rel(a, e, rtol, f"{backend} sparse {what}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("tail,div", SPARSE_CASES)
def test_sparse_teacher_matches_materialized(backend, tail, div):
    from fastdistill.kd.sparse import SUPPORTED

    if div not in SUPPORTED[tail]:
        pytest.skip(f"{div} is not supported with tail={tail}")
    d = make(seed=13)
    labels = torch.tensor([3, -100, 0, 36, -100, 5, 7, 8, 9, -100, 11, 1, 2])
    ts = sparse_teacher(d, 6, temperature=2.0, sampled=tail == "none")
    compare_sparse(backend, d, ts, tail=tail, divergence=div, labels=labels, chunk_size=4,
                   temperature=2.0, hard_weight=0.3, student_softcap=3.0,
                   student_logit_scale=0.8, skew=0.2, beta=0.3)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_sparse_teacher_reductions_3d_and_padding(backend, reduction):
    d = make(n=12, seed=14)
    ids, lp = sparse_teacher(d, 5)
    lp[2, 3:] = float("-inf")            # padded slots (their ids are never read)
    ids[2, 3:] = 10**6
    d3 = {k: (v.reshape(3, 4, -1) if k in ("sh", "th") else v) for k, v in d.items()}
    compare_sparse(backend, d3, (ids.reshape(3, 4, 5), lp.reshape(3, 4, 5)), reduction=reduction,
                   chunk_size=5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sparse_teacher_bf16(backend):
    d = make(n=11, hs=32, vs=301, vt=301, dtype=torch.bfloat16, seed=15)
    labels = torch.tensor([3, -100, 0, 300, 4, 5, 7, -100, 9, 10, 11])
    compare_sparse(backend, d, sparse_teacher(d, 16), rtol=2e-2, labels=labels, chunk_size=4,
                   hard_weight=0.2)


def test_sparse_teacher_bad_input():
    d = make(seed=16)
    sh, sw, th, tw = d["sh"], d["sw"], d["th"], d["tw"]
    ids, lp = sparse_teacher(d, 4)
    f = fd.fused_linear_kd_loss
    with pytest.raises(ValueError, match="exactly one"):
        f(sh, sw, th, tw, teacher_sparse=(ids, lp))
    with pytest.raises(TypeError, match="teacher_sparse must be a pair"):
        f(sh, sw, teacher_sparse=ids)
    with pytest.raises(ValueError, match="taid"):
        f(sh, sw, teacher_sparse=(ids, lp), divergence="taid", taid_t=0.5)
    with pytest.raises(ValueError, match="not supported with tail='none'"):
        f(sh, sw, teacher_sparse=(ids, lp), tail="none", divergence="reverse_kl")
    with pytest.raises(ValueError, match="tail"):
        f(sh, sw, teacher_sparse=(ids, lp), tail="drop")
    with pytest.raises(ValueError, match="vocab_mismatch"):
        f(sh, sw, teacher_sparse=(ids, lp), vocab_mismatch="pad")
    with pytest.raises(ValueError, match="teacher_bias"):
        f(sh, sw, teacher_sparse=(ids, lp), teacher_bias=d["tb"])
    with pytest.raises(ValueError, match="teacher_ids"):
        f(sh, sw, teacher_sparse=(ids[:5], lp[:5]))
    with pytest.raises(ValueError, match=r"teacher_ids must be in \[0, 37\)"):
        f(sh, sw, teacher_sparse=(ids + 37, lp))
    with pytest.raises(TypeError, match="teacher_ids must be an integer"):
        f(sh, sw, teacher_sparse=(ids.float(), lp))
    with pytest.raises(ValueError, match="sum to at most 1"):
        f(sh, sw, teacher_sparse=(ids, lp + 1.0))
    with pytest.raises(ValueError, match="tail applies to teacher_sparse"):
        f(sh, sw, th, tw, tail="bucket")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("codec", [dict(k=6, value_bits=8), dict(method="sampled", n_samples=12, seed=2)],
                         ids=["topk8", "sampled"])
def test_packed_soft_labels_teacher(backend, codec):
    """teacher_sparse=SoftLabels equals the decoded (ids, logprobs) teacher."""
    from fastdistill import softlabels as sl

    d = make(seed=17)
    labels = torch.tensor([3, -100, 0, 36, -100, 5, 7, 8, 9, -100, 11, 1, 2])
    tl = head_logits(d["th"].double(), d["tw"].double(), d["tb"].double())
    packed = sl.encode(tl, temperature=2.0, **codec)
    kw = dict(labels=labels, chunk_size=4, temperature=2.0, hard_weight=0.3, student_softcap=3.0)
    got = run(fd.fused_linear_kd_loss, d["sh"], d["sw"], d["sb"], teacher_sparse=packed,
              backend=backend, **kw)
    f64 = {k: v.double() for k, v in d.items()}
    want = run(naive_sparse, f64["sh"], f64["sw"], f64["sb"], teacher_sparse=packed.decode(),
               tail=packed.codec.tail, **kw)
    for what, a, e in zip(("loss", "grad hidden", "grad weight", "grad bias"), got, want):
        assert_close_rel(a, e, 1e-4, f"{backend} packed {what}")
    with pytest.raises(ValueError, match="temperature=1.0 differs"):
        fd.fused_linear_kd_loss(d["sh"], d["sw"], teacher_sparse=packed)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("div", ["forward_kl", "jsd", "reverse_kl", "taid"])
def test_several_teachers_are_their_weighted_mixture(backend, div):
    """teacher_hidden/teacher_weight as sequences: the target is Σ w_i softmax(y_i/T),
    chunk by chunk, equal to kd_loss against T·log of the materialized mixture."""
    torch.manual_seed(3)
    N, Hs, V, T = 37, 12, 101, 2.0
    hs = torch.randn(N, Hs, requires_grad=True)
    ws = torch.randn(V, Hs, requires_grad=True)
    h = [torch.randn(N, 16), torch.randn(N, 24).bfloat16()]
    w = [torch.randn(V, 16), torch.randn(V, 24).bfloat16()]
    b = [torch.randn(V), None]
    lab = torch.randint(0, V, (N,))
    lab[::5] = -100
    kw = dict(labels=lab, temperature=T, divergence=div, taid_t=0.6 if div == "taid" else None)
    loss = fd.fused_linear_kd_loss(hs, ws, h, w, teacher_bias=b, teacher_softcap=[None, 5.0],
                                   mixture_weights=[1.0, 3.0], chunk_size=8, backend=backend, **kw)
    got = torch.autograd.grad(loss, (hs, ws))
    y0 = h[0] @ w[0].T + b[0]
    y1 = (5.0 * torch.tanh((h[1] @ w[1].T) / 5.0)).float()  # in bf16, as the head computes
    p = 0.25 * torch.softmax(y0 / T, -1) + 0.75 * torch.softmax(y1 / T, -1)
    want_loss = fd.kd_loss(hs @ ws.T, T * p.log(), backend="torch", **kw)
    want = torch.autograd.grad(want_loss, (hs, ws))
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-6)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-5)


def test_several_teachers_bad_input():
    hs, ws = torch.randn(5, 4), torch.randn(9, 4)
    h, w = [torch.randn(5, 3), torch.randn(5, 3)], [torch.randn(9, 3), torch.randn(8, 3)]
    with pytest.raises(ValueError, match="share one vocabulary"):
        fd.fused_linear_kd_loss(hs, ws, h, w, vocab_mismatch="pad")
    with pytest.raises(ValueError, match="one entry per teacher"):
        fd.fused_linear_kd_loss(hs, ws, h, [w[0], w[0]], teacher_bias=[None])
    with pytest.raises(ValueError, match="mixture_weights"):
        fd.fused_linear_kd_loss(hs, ws, h, [w[0], w[0]], mixture_weights=[1.0])
    with pytest.raises(ValueError, match="mixture_weights.*must not all be 0"):
        fd.fused_linear_kd_loss(hs, ws, h, [w[0], w[0]], mixture_weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="mixture_weights applies to several teachers"):
        fd.fused_linear_kd_loss(hs, ws, h[0], w[0], mixture_weights=[1.0])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_several_teachers_nan_propagates_and_second_order_is_exact(backend):
    """A NaN in one teacher's hidden row makes that row NaN (the non-finite rule);
    the HVP through a mixture equals the reference's on the materialized mixture."""
    torch.manual_seed(5)
    N, Hs, V, T = 13, 6, 29, 2.0
    hs = torch.randn(N, Hs, requires_grad=True)
    ws = torch.randn(V, Hs)
    h = [torch.randn(N, 5), torch.randn(N, 7)]
    w = [torch.randn(V, 5), torch.randn(V, 7)]
    spoiled = [h[0], h[1].clone()]
    spoiled[1][4, 2] = float("nan")
    rows = fd.fused_linear_kd_loss(hs, ws, spoiled, w, temperature=T, reduction="none",
                                   chunk_size=4, backend=backend)
    assert torch.isnan(rows[4]) and torch.isfinite(rows[torch.arange(N) != 4]).all()
    (g,) = torch.autograd.grad(rows.sum(), hs)
    assert torch.isnan(g[4]).all() and torch.isfinite(g[torch.arange(N) != 4]).all()

    v = torch.randn_like(hs)
    loss = fd.fused_linear_kd_loss(hs, ws, h, w, mixture_weights=[2.0, 1.0], temperature=T,
                                   chunk_size=4, backend=backend)
    (g,) = torch.autograd.grad(loss, hs, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), hs)
    p = (2 * torch.softmax(h[0] @ w[0].T / T, -1) + torch.softmax(h[1] @ w[1].T / T, -1)) / 3
    x = hs.detach().double().requires_grad_()
    ref = fd.kd_loss(x @ ws.double().T, (T * p.log()).double(), temperature=T, backend="torch")
    (gr,) = torch.autograd.grad(ref, x, create_graph=True)
    (hv_ref,) = torch.autograd.grad((gr * v.double()).sum(), x)
    torch.testing.assert_close(hv.double(), hv_ref, rtol=1e-3, atol=1e-6)
