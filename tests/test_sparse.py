"""sparse_kd_loss and sample_teacher: the torch reference against autograd
(float64 gradcheck) and against the dense kd_loss, every fused backend against
the reference (values and gradients), the properties of the tails, and the
unbiasedness of sampled teachers."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastdistill as fd
from fastdistill.kd import sparse as fs
from fastdistill.reference import sparse as ref

from conftest import fused_backends

NEG_INF = -math.inf
PAIRS = [(tail, div) for tail, divs in ref.SUPPORTED.items() for div in divs]
PAIR_IDS = [f"{t}-{d}" for t, d in PAIRS]
ALL_BACKENDS = ["torch"] + fused_backends()

pytestmark = [  # the Triton interpreter evaluates masked-off lanes too
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def teacher(n, v, k, temperature=1.0, *, pad=True, scale=3.0, dtype=torch.float32, gen=None):
    """Dense teacher logits and a sparse view of them: k distinct random ids per
    row with their log-probabilities at the temperature; with ``pad``, the last
    entry of row 0 is padding (-inf) whose id repeats another one."""
    t = torch.randn(n, v, generator=gen, dtype=torch.float64) * scale
    lpf = torch.log_softmax(t / temperature, -1)
    ids = torch.rand(n, v, generator=gen).argsort(-1)[:, :k]
    lp = lpf.gather(-1, ids)
    if pad and k > 1:
        lp[0, -1] = NEG_INF
        ids[0, -1] = ids[0, 0]
    return t.to(dtype), ids, lp.to(dtype)


def kw_for(tail, div, **extra):
    kw = dict(tail=tail, divergence=div, beta=0.3, skew=0.2)
    kw.update(extra)
    return kw


def loss_and_grad(student, ids, lp, backend, **kw):
    x = student.detach().clone().requires_grad_()
    loss = fd.sparse_kd_loss(x, ids, lp, backend=backend, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), x.grad


def assert_close_rel(actual, expected, rtol, what, floor=None):
    """Element-wise rtol with an absolute floor of rtol times the largest magnitude."""
    actual, expected = actual.double(), expected.double()
    if floor is None:
        floor = 1.0 if "loss" in what else 1e-2
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, floor),
                               msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------- the reference

@pytest.mark.parametrize("tail,div", PAIRS, ids=PAIR_IDS)
def test_reference_gradcheck_float64(tail, div):
    torch.manual_seed(1)
    T = 2.5
    s = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    _, ids, lp = teacher(5, 9, 4, T, dtype=torch.float64)
    lp[3] = NEG_INF  # a row of padding only
    labels = torch.tensor([1, -100, 5, 0, 8])
    kw = kw_for(tail, div, temperature=T, hard_weight=0.3, labels=labels)
    assert torch.autograd.gradcheck(lambda x: fd.sparse_kd_loss(x, ids, lp, backend="torch", **kw), (s,))
    out = fd.sparse_kd_loss(s, ids, lp, backend="torch", reduction="none", **kw)
    assert torch.isfinite(out).all()


def test_reference_bucket_forward_kl_formula():
    """K + 1 bins written out by hand: Σ P (log P − log q) + P_tail log(P_tail / Q_tail)."""
    torch.manual_seed(2)
    s = torch.randn(4, 11, dtype=torch.float64)
    _, ids, lp = teacher(4, 11, 3, pad=False, dtype=torch.float64)
    got = fd.sparse_kd_loss(s, ids, lp, backend="torch", reduction="none")
    q = s.softmax(-1)
    qk, pk = q.gather(-1, ids), lp.exp()
    pt, qt = 1 - pk.sum(-1), 1 - qk.sum(-1)
    want = (pk * (pk.log() - qk.log())).sum(-1) + pt * (pt.log() - qt.log())
    torch.testing.assert_close(got, want)
    # renormalize: KL between the two distributions restricted to the ids
    got = fd.sparse_kd_loss(s, ids, lp, tail="renormalize", backend="torch", reduction="none")
    pr, qr = pk / pk.sum(-1, keepdim=True), qk / qk.sum(-1, keepdim=True)
    torch.testing.assert_close(got, (pr * (pr.log() - qr.log())).sum(-1))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("div", ref.SUPPORTED["bucket"])
def test_full_vocabulary_equals_dense_kd_loss(backend, div):
    """K = V with tail="bucket": no tail bin, exactly the dense divergence."""
    torch.manual_seed(3)
    T, V = 2.0, 13
    s = torch.randn(6, V) * 3
    t = torch.randn(6, V) * 3
    ids = torch.rand(6, V).argsort(-1)
    lp = torch.log_softmax(t / T, -1).gather(-1, ids)
    labels = torch.randint(0, V, (6,))
    labels[2] = -100
    kw = dict(divergence=div, temperature=T, beta=0.3, skew=0.2, labels=labels, hard_weight=0.2)
    got_l, got_g = loss_and_grad(s, ids, lp, backend, **kw)
    x = s.double().requires_grad_()
    want_l = fd.kd_loss(x, t.double(), backend="torch", **kw)
    want_l.backward()
    assert_close_rel(got_l, want_l.detach(), 1e-5, "loss")
    assert_close_rel(got_g, x.grad, 1e-5, "grad")


# ----------------------------------------------------------------- fused backends vs reference

def shapes_for(backend):
    # (rows, V, K); the Triton interpreter is slow: small shapes there
    if backend == "triton":
        return [(3, 1, 1), (4, 7, 1), (4, 7, 5), (3, 7, 7), (3, 300, 5), (2, 1000, 40)]
    return [(5, 1, 1), (6, 7, 1), (6, 7, 5), (4, 7, 7), (9, 1000, 5), (9, 1000, 64), (3, 32003, 5)]


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("tail,div", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_fused_matches_reference_fp32(backend, tail, div, temperature):
    torch.manual_seed(4)
    for n, v, k in shapes_for(backend):
        s = torch.randn(n, v) * 4
        _, ids, lp = teacher(n, v, k, temperature)
        labels = torch.randint(0, v, (n,))
        labels[-1] = -100
        hw = 0.3 if temperature != 1.0 else 0.0
        kw = kw_for(tail, div, temperature=temperature, labels=labels, hard_weight=hw)
        want_l, want_g = loss_and_grad(s.double(), ids, lp.double(), "torch", **kw)
        got_l, got_g = loss_and_grad(s, ids, lp, backend, **kw)
        assert got_l.dtype == torch.float32 and got_g.dtype == torch.float32
        assert_close_rel(got_l, want_l, 1e-5, f"loss V={v} K={k}")
        assert_close_rel(got_g, want_g, 1e-5, f"grad V={v} K={k}")
        assert (got_g[-1] == 0).all()  # the ignored row


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("tail,div", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_matches_reference_half(backend, tail, div, dtype):
    torch.manual_seed(5)
    s = (torch.randn(5, 777) * 3).to(dtype)
    _, ids, lp = teacher(5, 777, 16, 2.5)
    labels = torch.randint(0, 777, (5,))
    kw = kw_for(tail, div, temperature=2.5, labels=labels, hard_weight=0.2)
    want_l, want_g = loss_and_grad(s.double(), ids, lp.double(), "torch", **kw)
    got_l, got_g = loss_and_grad(s, ids, lp.to(dtype), backend, **kw)
    assert got_g.dtype == dtype
    assert_close_rel(got_l, want_l, 2e-2, "loss")
    assert_close_rel(got_g, want_g, 2e-2, "grad")


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("tail,div", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_matches_default(backend, tail, div, dtype):
    """The gradient written over the logits equals the default path's, bit for
    bit: z at the ids and the label is read before the row is overwritten
    (CE at T != 1 reads z itself there)."""
    torch.manual_seed(11)
    n, v, k = 7, 203, 9
    h = torch.randn(n, 16, dtype=dtype)
    w = torch.randn(v, 16, dtype=dtype, requires_grad=True)
    _, ids, lp = teacher(n, v, k, 2.0)
    labels = torch.randint(0, v, (n,))
    labels[2] = -100
    labels[3] = ids[3, 1]  # the label is one of the ids
    kw = kw_for(tail, div, temperature=2.0, labels=labels, hard_weight=0.3)
    got = []
    for inplace in (False, True):
        w.grad = None
        logits = h @ w.t()  # matmul saves h and w, not the logits
        loss = fd.sparse_kd_loss(logits, ids, lp, inplace_backward=inplace, backend=backend, **kw)
        (loss * 3.0).backward()
        got.append((loss.detach(), w.grad.clone()))
    assert torch.equal(got[0][0], got[1][0])
    assert torch.equal(got[0][1], got[1][1])


@pytest.mark.parametrize("backend", fused_backends())
def test_inplace_backward_reduction_none(backend):
    torch.manual_seed(12)
    x = torch.randn(5, 64)
    _, ids, lp = teacher(5, 64, 6)
    weights = torch.rand(5)
    grads = []
    for inplace in (False, True):
        leaf = x.clone().requires_grad_()
        loss = fd.sparse_kd_loss(leaf * 1.0, ids, lp, reduction="none", inplace_backward=inplace,
                                 backend=backend)
        (loss * weights).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch"] + fused_backends())
def test_inplace_backward_misuse_raises(backend):
    x = torch.randn(4, 30, requires_grad=True)
    _, ids, lp = teacher(4, 30, 5)
    logits = x.exp()  # exp saves its output for backward
    loss = fd.sparse_kd_loss(logits, ids, lp, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_backward_on_leaf_is_an_error():
    x = torch.randn(4, 30, requires_grad=True)
    _, ids, lp = teacher(4, 30, 5)
    with pytest.raises(ValueError, match="leaf"):
        fd.sparse_kd_loss(x, ids, lp, inplace_backward=True, backend="cpp")
    with pytest.raises(TypeError, match="inplace_backward"):
        fd.sparse_kd_loss(x, ids, lp, inplace_backward=1)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("tail", ref.TAILS)
def test_small_tail_keeps_its_precision(backend, tail):
    """A confident student: the ids hold all but ~1e-6 of its mass, while the
    teacher's tail is large. The student's tail must not come from 1 − Σ q_k."""
    torch.manual_seed(6)
    V, K = 200, 3
    s = torch.randn(4, V)
    s[:, :K] += 16.0
    t = torch.randn(4, V)
    ids = torch.arange(K).expand(4, K).contiguous()
    lp = torch.log_softmax(t.double(), -1)[:, :K]
    kw = kw_for(tail, "forward_kl", temperature=1.0)
    want_l, want_g = loss_and_grad(s.double(), ids, lp, "torch", **kw)
    got_l, got_g = loss_and_grad(s, ids, lp.float(), backend, **kw)
    assert_close_rel(got_l, want_l, 1e-5, "loss")
    assert_close_rel(got_g, want_g, 1e-5, "grad")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_3d_noncontiguous(backend, reduction):
    torch.manual_seed(7)
    V, K = 40, 6
    s = torch.randn(3, V, 4).transpose(1, 2)  # (3, 4, V), not contiguous
    assert not s.is_contiguous()
    _, ids, lp = teacher(12, V, K, 2.0)
    ids = ids.reshape(3, 4, K).transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous too
    lp = lp.reshape(3, 4, K).transpose(0, 1).contiguous().transpose(0, 1)
    assert not ids.is_contiguous()
    labels = torch.randint(0, V, (3, 4))
    labels[1, 2] = -100
    kw = dict(divergence="jsd", temperature=2.0, labels=labels, hard_weight=0.25, reduction=reduction)
    want_l, want_g = loss_and_grad(s.double(), ids, lp.double(), "torch", **kw)
    got_l, got_g = loss_and_grad(s, ids, lp, backend, **kw)
    assert got_l.shape == want_l.shape == ((3, 4) if reduction == "none" else ())
    assert got_g.shape == s.shape
    assert_close_rel(got_l, want_l, 1e-5, "loss")
    assert_close_rel(got_g, want_g, 1e-5, "grad")
    if reduction == "none":
        assert got_l[1, 2] == 0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("tail,div", [("bucket", "reverse_kl"), ("renormalize", "tvd"),
                                      ("none", "forward_kl")])
def test_all_ignored_batch_is_zero(backend, tail, div):
    s = torch.randn(4, 50)
    _, ids, lp = teacher(4, 50, 5)
    labels = torch.full((4,), -100)
    loss, grad = loss_and_grad(s, ids, lp, backend, **kw_for(tail, div, labels=labels, hard_weight=0.5))
    assert loss.item() == 0.0
    assert (grad == 0).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_hard_weight_is_cross_entropy(backend, temperature):
    torch.manual_seed(8)
    s = torch.randn(8, 100)
    _, ids, lp = teacher(8, 100, 7, temperature)
    labels = torch.randint(0, 100, (8,))
    labels[3] = -100
    labels[5] = int(ids[5, 2])  # a label that is also a teacher id
    hw = 0.3
    x = s.clone().requires_grad_()
    fd.sparse_kd_loss(x, ids, lp, labels=labels, hard_weight=hw, temperature=temperature,
                      backend=backend).backward()
    y = s.clone().requires_grad_()
    soft = fd.sparse_kd_loss(y, ids, lp, labels=labels, temperature=temperature, backend="torch")
    ce = F.cross_entropy(y, labels, ignore_index=-100)
    (hw * ce + (1 - hw) * soft).backward()
    assert_close_rel(x.grad, y.grad, 1e-5, "grad")
    only_ce = fd.sparse_kd_loss(s, ids, lp, labels=labels, hard_weight=1.0, temperature=temperature,
                                backend=backend)
    torch.testing.assert_close(only_ce, F.cross_entropy(s, labels), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_t2_scale_scales_value_and_gradient(backend):
    s = torch.randn(3, 64)
    _, ids, lp = teacher(3, 64, 8, 4.0)
    a_l, a_g = loss_and_grad(s, ids, lp, backend, temperature=4.0)
    b_l, b_g = loss_and_grad(s, ids, lp, backend, temperature=4.0, t2_scale=False)
    torch.testing.assert_close(a_l, 16 * b_l)
    torch.testing.assert_close(a_g, 16 * b_g)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("tail", ref.TAILS)
def test_padding_entries_are_ignored(backend, tail):
    """Padding (-inf) entries count nowhere, whatever their ids; int32 ids work."""
    torch.manual_seed(9)
    s = torch.randn(5, 30)
    _, ids, lp = teacher(5, 30, 4, pad=False)
    pad_ids = torch.tensor([[0, 29, 7], [-5, 999, 3], [1, 1, 1], [2, 3, 4], [5, 6, 7]])
    pad_ids[2] = ids[2, :3]  # repeats of real ids
    ids_p = torch.cat([ids[:, :2], pad_ids[:, :1], ids[:, 2:], pad_ids[:, 1:]], -1)
    lp_p = torch.cat([lp[:, :2], torch.full((5, 1), NEG_INF), lp[:, 2:], torch.full((5, 2), NEG_INF)], -1)
    want_l, want_g = loss_and_grad(s, ids, lp, backend, tail=tail, temperature=1.5, reduction="none")
    got_l, got_g = loss_and_grad(s, ids_p.to(torch.int32), lp_p, backend, tail=tail, temperature=1.5,
                                 reduction="none")
    torch.testing.assert_close(got_l, want_l, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_g, want_g, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", fused_backends())
def test_extreme_logits(backend):
    torch.manual_seed(10)
    s = torch.randn(4, 300) * 3 + 1000.0  # large offset: u − max must stay exact
    _, ids, lp = teacher(4, 300, 10, 2.5)
    s[:, 0] = -1e4  # far below everything (probability 0 in float32)
    lp[1, 3] = -300.0  # a teacher entry of negligible mass
    for tail, div in PAIRS:
        kw = kw_for(tail, div, temperature=2.5)
        want_l, want_g = loss_and_grad(s.double(), ids, lp.double(), "torch", **kw)
        got_l, got_g = loss_and_grad(s, ids, lp, backend, **kw)
        assert torch.isfinite(got_l) and torch.isfinite(got_g).all(), (tail, div)
        assert_close_rel(got_l, want_l, 1e-5, f"loss {tail} {div}")
        assert_close_rel(got_g, want_g, 1e-5, f"grad {tail} {div}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_no_grad_evaluation_matches(backend):
    s = torch.randn(6, 80)
    _, ids, lp = teacher(6, 80, 9, 2.0)
    with torch.no_grad():
        ev = fd.sparse_kd_loss(s, ids, lp, temperature=2.0, divergence="jsd", backend=backend)
    tr, _ = loss_and_grad(s, ids, lp, backend, temperature=2.0, divergence="jsd")
    torch.testing.assert_close(ev, tr)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_internal_forward_contract(backend):
    """_sparse_forward, as the fused-linear loss calls it per chunk of rows."""
    if backend != "torch" and not fd.backends()[backend]:
        pytest.skip(f"{backend} unavailable")
    torch.manual_seed(11)
    s = torch.randn(5, 60)
    _, ids, lp = teacher(5, 60, 6, 2.0)
    labels = torch.randint(0, 60, (5,))
    labels[1] = -100
    div, tail = fd.DIVERGENCES.index("skew_reverse_kl"), fs.TAILS.index("bucket")
    args = (labels, -100, div, tail, 0.2, 2.0, 0.1, 4.0)
    rows, grad = fs._sparse_forward(backend, s, ids, lp, *args, False, True)
    x = s.double().requires_grad_()
    want = ref.sparse_kd_loss_rows(x, ids, lp.double(), tail="bucket", divergence="skew_reverse_kl",
                                   temperature=2.0, skew=0.2, labels=labels, hard_weight=0.1)
    want.sum().backward()
    assert rows.shape == (5,) and rows.dtype == torch.float32 and grad.shape == s.shape
    assert_close_rel(rows, want.detach(), 1e-5, "loss rows")
    assert_close_rel(grad, x.grad, 1e-5, "grad")
    rows_m, grad_m = fs._sparse_forward(backend, s, ids, lp, *args, True, True)
    assert_close_rel(grad_m, x.grad / 4, 1e-5, "grad (mean over 4 kept rows)")
    rows_e, grad_e = fs._sparse_forward(backend, s, ids, lp, *args, False, False)
    assert grad_e.numel() == 0
    assert_close_rel(rows_e, rows, 1e-6, "loss rows without grad")


def test_training_step_under_torch_compile_matches_eager():
    if not fd.backends()["cpp"]:
        pytest.skip("cpp unavailable")
    torch.manual_seed(13)
    h = torch.randn(12, 32)
    _, ids, lp = teacher(12, 257, 8, 2.0)
    labels = torch.randint(0, 257, (12,))
    labels[4] = -100

    def make():
        torch.manual_seed(14)
        return torch.nn.Linear(32, 257)

    def loss_fn(model, x):
        return fd.sparse_kd_loss(model(x), ids, lp, labels=labels, hard_weight=0.1, temperature=2.0,
                                 divergence="jsd", backend="cpp")

    eager, comp = make(), make()
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(comp.parameters(), lr=0.1)
    compiled = torch.compile(loss_fn, fullgraph=True)
    for _ in range(2):
        for model, opt, fn in ((comp, opt_c, compiled), (eager, opt_e, loss_fn)):
            opt.zero_grad()
            fn(model, h).backward()
            opt.step()
    torch.testing.assert_close(comp.weight, eager.weight, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- properties

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), v=st.integers(1, 50), k_frac=st.floats(0.0, 1.0),
       s_scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]), t_scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]),
       temperature=st.sampled_from([0.5, 1.0, 3.0]), n_pad=st.integers(0, 3))
def test_bucket_forward_kl_is_never_negative(seed, v, k_frac, s_scale, t_scale, temperature, n_pad):
    gen = torch.Generator().manual_seed(seed)
    k = max(1, round(k_frac * v))
    s = torch.randn(3, v, generator=gen, dtype=torch.float64) * s_scale
    t = torch.randn(3, v, generator=gen, dtype=torch.float64) * t_scale
    ids = torch.rand(3, v, generator=gen).argsort(-1)[:, :k]
    lp = torch.log_softmax(t / temperature, -1).gather(-1, ids)
    lp[:, : min(n_pad, k - 1)] = NEG_INF  # padding: its mass joins nothing
    want = fd.sparse_kd_loss(s, ids, lp, temperature=temperature, reduction="none", backend="torch")
    assert not torch.isnan(want).any() and (want >= -1e-12).all(), want
    if fd.backends()["cpp"]:
        got = fd.sparse_kd_loss(s.float(), ids, lp.float(), temperature=temperature, reduction="none",
                                backend="cpp")
        assert not torch.isnan(got).any() and (got >= -1e-6).all(), got


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sampled_teacher_gradient_is_unbiased(backend):
    """E[∇ sparse_kd_loss(tail="none") on sample_teacher draws] = q − p, the dense
    forward-KL gradient: each draw is one row, so the rows' mean estimates it."""
    gen = torch.Generator().manual_seed(12)
    V, n = 12, 8
    draws = 120 if backend == "triton" else 600  # the interpreter runs one program per row
    z = torch.randn(V, generator=gen) * 2
    t = torch.randn(V, generator=gen) * 2
    ids, lp = fd.sample_teacher(t.expand(draws, V), n, generator=gen)
    x = z.expand(draws, V).clone().requires_grad_()
    fd.sparse_kd_loss(x, ids, lp, tail="none", reduction="sum", backend=backend).backward()
    g = x.grad.double()
    want = z.double().softmax(-1) - t.double().softmax(-1)
    err = (g.mean(0) - want).abs()
    bound = 5 * g.std(0) / math.sqrt(draws) + 1e-6
    assert (err <= bound).all(), (err, bound)
    # each row's gradient sums to 0 (Σ p̂ = 1), and it is q − p̂ exactly
    p_hat = torch.zeros(draws, V, dtype=torch.float64).scatter_add_(1, ids, lp.double().exp())
    torch.testing.assert_close(g, z.double().softmax(-1) - p_hat, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- sample_teacher

def test_sample_teacher_output():
    gen = torch.Generator().manual_seed(13)
    t = torch.randn(2, 3, 20, generator=gen)
    t[0, 0, :] = -math.inf
    t[0, 0, 4] = 0.0  # a one-hot teacher: one distinct id
    ids, lp = fd.sample_teacher(t, 10, temperature=2.0, generator=gen)
    assert ids.shape == lp.shape == (2, 3, 10)
    assert ids.dtype == torch.int64 and lp.dtype == torch.float32
    finite = lp > NEG_INF
    torch.testing.assert_close(torch.where(finite, lp.double().exp(), 0.0).sum(-1),
                               torch.ones(2, 3, dtype=torch.float64))
    counts = (lp.double().exp() * 10).round()
    torch.testing.assert_close(torch.where(finite, lp.double(), 0.0),
                               torch.where(finite, (counts / 10).log(), 0.0))
    # the finite entries come first, ids ascending and distinct; padding is id 0, -inf
    assert (finite[..., :-1] | ~finite[..., 1:]).all()
    srt = torch.where(finite, ids, torch.iinfo(torch.int64).max)
    assert ((srt[..., 1:] > srt[..., :-1]) | ~finite[..., 1:]).all()
    assert (ids[~finite] == 0).all() and ((ids >= 0) & (ids < 20)).all()
    assert ids[0, 0, 0] == 4 and lp[0, 0, 0] == 0.0 and (lp[0, 0, 1:] == NEG_INF).all()
    # usable as a sparse teacher straight away
    fd.sparse_kd_loss(torch.randn(2, 3, 20), ids, lp, tail="none", temperature=2.0)


def test_sample_teacher_generator_reproducible_and_frequencies():
    t = torch.randn(4, 7)
    a = fd.sample_teacher(t, 16, generator=torch.Generator().manual_seed(3))
    b = fd.sample_teacher(t, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # many draws: the empirical distribution approaches softmax(t / T)
    ids, lp = fd.sample_teacher(t, 20000, temperature=0.7, generator=torch.Generator().manual_seed(4))
    p_hat = torch.zeros(4, 7, dtype=torch.float64).scatter_add_(1, ids, lp.double().exp())
    torch.testing.assert_close(p_hat, (t.double() / 0.7).softmax(-1), rtol=0, atol=0.02)
    # n > V: a row has at most V distinct ids, so the width is V, and the draws are a
    # sparse teacher as they are: KL(p̂ ‖ q) summed over rows
    assert ids.shape == lp.shape == (4, 7)
    s = torch.randn(4, 7, dtype=torch.float64)
    got = fd.sparse_kd_loss(s, ids, lp.double(), tail="none", temperature=0.7, t2_scale=False,
                            reduction="sum")
    q = (s / 0.7).log_softmax(-1)
    want = torch.where(p_hat > 0, p_hat * (p_hat.log() - q), 0.0).sum()
    torch.testing.assert_close(got, want)


def test_sample_teacher_bad_input():
    t = torch.randn(3, 9)
    with pytest.raises(ValueError, match="n must be"):
        fd.sample_teacher(t, 0)
    with pytest.raises(TypeError, match="n must be an int"):
        fd.sample_teacher(t, 2.0)
    with pytest.raises(TypeError, match="n must be an int"):
        fd.sample_teacher(t, True)
    with pytest.raises(ValueError, match="temperature must be in"):
        fd.sample_teacher(t, 4, temperature=0.0)
    with pytest.raises(TypeError, match="teacher_logits must be a floating tensor"):
        fd.sample_teacher(t.long(), 4)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        fd.sample_teacher(t, 4, generator=3)
    with pytest.raises(ValueError, match="teacher_logits must have shape"):
        fd.sample_teacher(torch.randn(3, 0), 4)


# ----------------------------------------------------------------- bad input

def test_bad_input_is_a_clear_error():
    s = torch.randn(4, 10)
    _, ids, lp = teacher(4, 10, 3, pad=False)
    with pytest.raises(ValueError, match="teacher_ids .* must have shape"):
        fd.sparse_kd_loss(s, ids[:3], lp[:3])
    with pytest.raises(ValueError, match="teacher_logprobs .* must have the shape of teacher_ids"):
        fd.sparse_kd_loss(s, ids, lp[:, :2])
    with pytest.raises(ValueError, match="more than the vocabulary"):
        fd.sparse_kd_loss(torch.randn(4, 2), ids, lp)
    with pytest.raises(ValueError, match="at least one entry"):
        fd.sparse_kd_loss(s, ids[:, :0], lp[:, :0])
    with pytest.raises(TypeError, match="teacher_ids must be an integer tensor"):
        fd.sparse_kd_loss(s, ids.float(), lp)
    with pytest.raises(TypeError, match="teacher_logprobs must be a floating tensor"):
        fd.sparse_kd_loss(s, ids, ids)
    with pytest.raises(TypeError, match="student_logits must be a floating tensor"):
        fd.sparse_kd_loss(s.long(), ids, lp)
    with pytest.raises(ValueError, match="teacher_logprobs is on meta"):
        fd.sparse_kd_loss(s, ids, lp.to("meta"))
    with pytest.raises(ValueError, match="taid"):
        fd.sparse_kd_loss(s, ids, lp, divergence="taid")
    with pytest.raises(ValueError, match="divergence='jsd' is not supported with tail='none'"):
        fd.sparse_kd_loss(s, ids, lp, divergence="jsd", tail="none")
    with pytest.raises(ValueError, match="tail must be one of"):
        fd.sparse_kd_loss(s, ids, lp, tail="topk")
    with pytest.raises(ValueError, match="divergence must be one of"):
        fd.sparse_kd_loss(s, ids, lp, divergence="kl")
    with pytest.raises(ValueError, match="temperature must be in"):
        fd.sparse_kd_loss(s, ids, lp, temperature=0.0)
    with pytest.raises(ValueError, match=r"beta must be in \[0.001, 0.999\]"):
        fd.sparse_kd_loss(s, ids, lp, divergence="jsd", beta=1.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fd.sparse_kd_loss(s, ids, lp, reduction="batchmean")
    dup = ids.clone()
    dup[1, 2] = dup[1, 0]
    with pytest.raises(ValueError, match="teacher_ids must be distinct"):
        fd.sparse_kd_loss(s, dup, lp)
    out = ids.clone()
    out[2, 1] = 10
    with pytest.raises(ValueError, match=r"teacher_ids must be in \[0, 10\)"):
        fd.sparse_kd_loss(s, out, lp)
    with pytest.raises(ValueError, match="teacher_logprobs must be log-probabilities"):
        fd.sparse_kd_loss(s, ids, torch.zeros(4, 3))  # three entries of probability 1
    fd.sparse_kd_loss(s, ids, torch.zeros(4, 3), tail="renormalize")  # fine: renormalized
    nan = lp.clone()
    nan[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        fd.sparse_kd_loss(s, ids, nan)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        fd.sparse_kd_loss(s, ids, lp, labels=torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="hard_weight > 0 needs labels"):
        fd.sparse_kd_loss(s, ids, lp, hard_weight=0.5)
    with pytest.raises(ValueError, match="labels must be in"):
        fd.sparse_kd_loss(s, ids, lp, hard_weight=0.5, labels=torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="teacher_logprobs requires grad"):
        fd.sparse_kd_loss(s, ids, lp.clone().requires_grad_())
    with pytest.raises(ValueError, match="backend must be one of"):
        fd.sparse_kd_loss(s, ids, lp, backend="numpy")
    if fd.backends()["cpp"]:
        with pytest.raises(TypeError, match="float64 runs on backend='torch'"):
            fd.sparse_kd_loss(s.double(), ids, lp, backend="cpp")
    # ignored rows are not checked: they may hold anything
    labels = torch.tensor([0, -100, 2, 3])
    junk_ids, junk_lp = dup.clone(), lp.clone()
    junk_ids[1] = torch.tensor([5, 5, 99])
    junk_lp[1] = 0.0
    fd.sparse_kd_loss(s, junk_ids, junk_lp, labels=labels)
