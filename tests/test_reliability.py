"""The reliability rules of the KD losses, each tried as a user would meet it:
non-finite inputs surface as NaN (never a finite loss), supported ranges are
errors outside and float64-accurate inside, one packed-row fault gives one
message on every backend, in-place misuse raises, and the extremes the
reference used to lose precision at."""
import math

import pytest
import torch

import fastdistill as fd
import fastdistill._backend as _backend
from fastdistill import softlabels as sl

from conftest import fused_backends, inplace_kd_loss

BACKENDS = ["torch"] + fused_backends()
# the backends that run here, by name (for checks that compare all of them in one test)
AVAILABLE = ["torch"] + [n for n, (ok, _) in _backend.backend_status().items()
                         if ok and n in ("cpp", "triton")]
NAN, INF = float("nan"), float("inf")
# (name, how to spoil row 1 of the student (s) or teacher (t) logits)
SPOILS = {
    "student_nan": ("s", lambda x: x.__setitem__((1, 5), NAN)),
    "student_posinf": ("s", lambda x: x.__setitem__((1, 5), INF)),
    "student_all_neginf": ("s", lambda x: x[1].fill_(-INF)),
    "teacher_nan": ("t", lambda x: x.__setitem__((1, 7), NAN)),
    "teacher_posinf": ("t", lambda x: x.__setitem__((1, 7), INF)),
    "teacher_all_neginf": ("t", lambda x: x[1].fill_(-INF)),
}


def _kw(div):
    return dict(divergence=div, taid_t=0.5 if div == "taid" else None, temperature=2.0)


def _check_row1_nan(loss_rows, grad):
    """Row 1 has a NaN loss and a NaN in every gradient entry; rows 0 and 2 are finite."""
    assert torch.isnan(loss_rows[1]), loss_rows
    assert torch.isnan(grad[1]).all(), grad[1]
    assert torch.isfinite(loss_rows[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()


# ----------------------------------------------------------------- 1. non-finite inputs

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", fd.DIVERGENCES)
@pytest.mark.parametrize("spoil", sorted(SPOILS))
def test_kd_loss_nonfinite_row_is_nan(backend, div, spoil):
    torch.manual_seed(0)
    s, t = torch.randn(3, 37), torch.randn(3, 37)
    side, f = SPOILS[spoil]
    f(s if side == "s" else t)
    x = s.clone().requires_grad_()
    rows = fd.kd_loss(x, t, reduction="none", backend=backend, **_kw(div))
    rows.sum().backward()
    _check_row1_nan(rows.detach(), x.grad)
    # the mean is NaN too: a training run sees it
    assert torch.isnan(fd.kd_loss(s, t, backend=backend, **_kw(div)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_in_an_ignored_row_counts_nowhere(backend):
    s, t = torch.randn(3, 20), torch.randn(3, 20)
    s[1, 3], t[1, 4] = NAN, INF
    labels = torch.tensor([0, -100, 2])
    x = s.clone().requires_grad_()
    loss = fd.kd_loss(x, t, labels=labels, hard_weight=0.3, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert (x.grad[1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail,div", [("bucket", d) for d in fd.kd.sparse.SUPPORTED["bucket"]]
                         + [("renormalize", "jsd"), ("renormalize", "forward_kl"),
                            ("none", "forward_kl")])
@pytest.mark.parametrize("spoil", ["student_nan", "student_posinf", "student_all_neginf"])
def test_sparse_nonfinite_student_row_is_nan(backend, tail, div, spoil):
    torch.manual_seed(1)
    s = torch.randn(3, 41)
    lp, ids = torch.log_softmax(torch.randn(3, 41), -1).topk(6, -1)
    if tail == "none":
        ids, lp = fd.sample_teacher(torch.randn(3, 41), 8)
    SPOILS[spoil][1](s)
    x = s.clone().requires_grad_()
    rows = fd.sparse_kd_loss(x, ids, lp, tail=tail, divergence=div, reduction="none",
                             backend=backend)
    rows.sum().backward()
    _check_row1_nan(rows.detach(), x.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("codec", [dict(k=6, value_bits=8), dict(method="sampled", n_samples=9)],
                         ids=["topk8", "sampled"])
@pytest.mark.parametrize("spoil", ["student_nan", "student_posinf", "student_all_neginf"])
def test_softlabels_nonfinite_student_row_is_nan(backend, codec, spoil):
    torch.manual_seed(2)
    labels = sl.encode(torch.randn(3, 41), **codec)
    s = torch.randn(3, 41)
    SPOILS[spoil][1](s)
    x = s.clone().requires_grad_()
    rows = sl.kd_loss(x, labels, reduction="none", backend=backend)
    rows.sum().backward()
    _check_row1_nan(rows.detach(), x.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher", ["head", "logits", "sparse"])
def test_fused_linear_nonfinite_hidden_row_is_nan(backend, teacher):
    torch.manual_seed(3)
    h, w = torch.randn(3, 8), torch.randn(29, 8)
    th, tw = torch.randn(3, 5), torch.randn(29, 5)
    h[1, 2] = NAN
    kw = dict(teacher_hidden=th, teacher_weight=tw) if teacher == "head" else {}
    if teacher == "logits":
        kw["teacher_logits"] = th @ tw.t()
    if teacher == "sparse":
        lp, ids = torch.log_softmax(th @ tw.t(), -1).topk(4, -1)
        kw["teacher_sparse"] = (ids, lp)
    x, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
    rows = fd.fused_linear_kd_loss(x, wx, reduction="none", chunk_size=2, backend=backend, **kw)
    rows.sum().backward()
    _check_row1_nan(rows.detach(), x.grad)
    assert torch.isnan(wx.grad).all()  # every vocabulary row saw the NaN row


def test_sparse_teacher_nan_is_an_error_naming_the_argument():
    s = torch.randn(2, 10)
    lp, ids = torch.log_softmax(torch.randn(2, 10), -1).topk(3, -1)
    lp[0, 1] = NAN
    with pytest.raises(ValueError, match="teacher_logprobs must be finite"):
        fd.sparse_kd_loss(s, ids, lp)


@pytest.mark.parametrize("bad", ["nan", "posinf", "all_neginf"])
def test_sample_teacher_nonfinite_row_is_an_error_naming_it(bad):
    t = torch.randn(3, 10)
    if bad == "nan":
        t[2, 1] = NAN
    elif bad == "posinf":
        t[2, 1] = INF
    else:
        t[2] = -INF
    with pytest.raises(ValueError, match="teacher_logits row 2 holds a NaN or \\+inf, or is all"):
        fd.sample_teacher(t, 4)


# ----------------------------------------------------------------- 2. supported ranges

@pytest.mark.parametrize("kw,match", [
    (dict(temperature=1e-3), r"temperature must be in \[0.1, 20.0\]"),
    (dict(temperature=1e3), r"temperature must be in \[0.1, 20.0\]"),
    (dict(temperature=3e19), r"temperature must be in"),  # T² overflows float32
    (dict(temperature=NAN), r"temperature must be in"),
    (dict(divergence="jsd", beta=1e-6), r"beta must be in \[0.001, 0.999\]"),
    (dict(divergence="skew_reverse_kl", skew=0.999999), r"skew must be in \[0.0, 0.99\]"),
    (dict(divergence="taid", taid_t=1e-3), r"taid_t must be 0 or in \[0.02, 1\]"),
])
def test_out_of_range_is_a_clear_error_on_every_loss(kw, match):
    s, t = torch.randn(2, 10), torch.randn(2, 10)
    with pytest.raises(ValueError, match=match):
        fd.kd_loss(s, t, **kw)
    if kw.get("divergence") != "taid":
        lp, ids = torch.log_softmax(t, -1).topk(3, -1)
        with pytest.raises(ValueError, match=match):
            fd.sparse_kd_loss(s, ids, lp, **kw)
    with pytest.raises(ValueError, match=match):
        fd.fused_linear_kd_loss(torch.randn(2, 4), torch.randn(10, 4), teacher_logits=t, **kw)
    if "temperature" in kw:
        with pytest.raises(ValueError, match=match):
            fd.sample_teacher(t, 3, **kw)
        with pytest.raises(ValueError, match=match):
            sl.encode(t, k=3, **kw)


def _rel(a, b):
    """Relative error of the norm; below 1e-20 (float32 underflows near 1e-38) counts absolute."""
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-20))


# every divergence at the ends of every supported range, float32 vs float64
_EDGES = [(div, dict(temperature=T)) for div in fd.DIVERGENCES for T in fd.kd.TEMPERATURE_RANGE]
_EDGES += [("jsd", dict(beta=b)) for b in fd.kd.BETA_RANGE]
_EDGES += [(d, dict(skew=fd.kd.SKEW_MAX)) for d in ("skew_forward_kl", "skew_reverse_kl")]
_EDGES += [("taid", dict(taid_t=fd.kd.TAID_T_MIN))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div,extra", _EDGES, ids=[f"{d}-{e}" for d, e in _EDGES])
def test_range_ends_match_float64(backend, div, extra):
    torch.manual_seed(4)
    V = 300 if backend == "triton" else 1000
    z, t = torch.randn(8, V), torch.randn(8, V)  # N(0, 1) logits
    kw = dict(divergence=div, reduction="none", **extra)
    if div == "taid":
        kw.setdefault("taid_t", 0.5)
    x64 = z.double().requires_grad_()
    want = fd.kd_loss(x64, t.double(), backend="torch", **kw)
    want.sum().backward()
    x = z.clone().requires_grad_()
    got = fd.kd_loss(x, t, backend=backend, **kw)
    got.sum().backward()
    assert _rel(got.detach(), want.detach()) < 1e-3 and _rel(x.grad, x64.grad) < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_taid_at_zero_is_exactly_zero(backend):
    z, t = torch.randn(4, 50), torch.randn(4, 50)
    for dtype in (torch.float32,) + ((torch.float64,) if backend == "torch" else ()):
        x = z.to(dtype).detach().requires_grad_()
        loss = fd.kd_loss(x, t.to(dtype), divergence="taid", taid_t=0.0, backend=backend)
        loss.backward()
        assert loss.item() == 0.0 and (x.grad == 0).all()


# ----------------------------------------------------------------- numerics at the extremes

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", fd.kd.sparse.SUPPORTED["bucket"])
@pytest.mark.parametrize("scale", [1e2, 1e4])
def test_sparse_ids_covering_the_vocabulary_with_huge_logits(backend, div, scale):
    """K = V (no tail bin), V = 2049, logits ±scale: near one-hot rows whose gradient is tiny
    and must keep its relative precision (the reference used to lose it: 0.41-870)."""
    torch.manual_seed(5)
    V = 2049
    N = 2 if backend == "triton" else 6
    z = torch.where(torch.rand(N, V) < 0.5, torch.randn(N, V).sign(), torch.randn(N, V)) * scale
    lp = torch.log_softmax(torch.randn(N, V), -1)
    ids = torch.arange(V).expand(N, V).contiguous()
    x64 = z.double().requires_grad_()  # the float32 inputs, exactly
    want = fd.sparse_kd_loss(x64, ids, lp.double(), divergence=div, reduction="none",
                             backend="torch")
    want.sum().backward()
    x = z.clone().requires_grad_()
    got = fd.sparse_kd_loss(x, ids, lp, divergence=div, reduction="none", backend=backend)
    got.sum().backward()
    assert _rel(got.detach(), want.detach()) < 1e-4
    assert _rel(x.grad, x64.grad) < 1e-3


# ----------------------------------------------------------------- 3./4. packed rows

def _packed(method="topk"):
    torch.manual_seed(6)
    kw = dict(k=5, value_bits=16) if method == "topk" else dict(method="sampled", n_samples=7)
    return sl.encode(torch.randn(4, 100) * 3, **kw)


def _with_ids(labels, row, new_ids):
    """A copy of ``labels`` whose row ``row`` stores ``new_ids`` (re-packed bit by bit)."""
    c = labels.codec
    data = labels.rows().clone()
    packed = sl.codec.pack_bits(torch.tensor([new_ids]), c.id_bits)
    data[row, c.ids_offset:c.ids_offset + packed.shape[1]] = packed[0]
    return sl.SoftLabels(c, data)


def test_the_encoder_never_writes_repeated_ids():
    t = torch.zeros(6, 50)  # every logit tied
    t[:, :3] = 1.0
    for labels in (sl.encode(t, k=8), sl.encode(t, k=8, value_bits=8),
                   sl.encode(t, method="sampled", n_samples=40)):
        ids, lp = labels.decode()
        for r in range(ids.shape[0]):
            live = ids[r][lp[r] > -math.inf]
            assert live.unique().numel() == live.numel()
        labels.check_rows()


@pytest.mark.parametrize("method", ["topk", "sampled"])
def test_repeated_ids_are_one_error_on_every_backend(method):
    labels = _packed(method)
    ids, lp = labels.decode()
    dup = ids[2].tolist()
    live = [i for i in range(len(dup)) if lp[2, i] > -math.inf]
    dup[live[1]] = dup[live[0]]
    bad = _with_ids(labels, 2, dup)
    messages = set()
    for backend in AVAILABLE:
        with pytest.raises(ValueError, match=f"soft labels row 2: id {dup[live[0]]} is stored "
                                             f"twice \\(entries {live[0]} and {live[1]}\\)") as e:
            sl.kd_loss(torch.randn(4, 100), bad, backend=backend)
        messages.add(str(e.value))
    assert len(messages) == 1
    with pytest.raises(ValueError, match="stored twice"):  # the store's entries come through here
        bad.check_rows()


def _corruptions():
    labels = _packed()
    c = labels.codec
    out = {}
    data = labels.rows().clone()
    data[1, c.ids_offset:] = 0xFF  # ids of all ones: 127 ≥ V = 100
    out["id"] = (data, "soft labels row 1 entry 0: id 127 is not below the vocabulary size 100")
    data = labels.rows().clone()
    data[2, 0:4] = torch.tensor([0, 0, 0x80, 0x7F], dtype=torch.uint8)  # tail = +inf
    out["tail"] = (data, "soft labels row 2: tail mass inf is not in [0, 1]")
    data = labels.rows().clone()
    data[3, c.values_offset:c.values_offset + 2] = torch.tensor([0, 0x7E], dtype=torch.uint8)
    out["value"] = (data, "soft labels row 3 entry 0: value is NaN or +inf")  # float16 NaN
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, labels.rows().shape, dtype=torch.uint8, generator=g)
    out["random"] = (data, None)  # random bytes: whichever fault comes first, the same one
    return c, out


@pytest.mark.parametrize("fault", ["id", "tail", "value", "random"])
def test_one_fault_one_message_on_every_backend(fault):
    codec, faults = _corruptions()
    data, want = faults[fault]
    bad = sl.SoftLabels(codec, data)
    messages = set()
    for backend in AVAILABLE:
        with pytest.raises(ValueError) as e:
            sl.kd_loss(torch.randn(4, 100), bad, backend=backend)
        messages.add(str(e.value))
    assert len(messages) == 1, messages
    (msg,) = messages
    assert msg.startswith("soft labels row ")
    if want is not None:
        assert msg.startswith(want), msg


def test_the_cpp_op_checks_rows_with_the_same_messages():
    if not fd.backends()["cpp"]:
        pytest.skip("no cpp backend here")
    codec, faults = _corruptions()
    for data, _ in faults.values():
        bad = sl.SoftLabels(codec, data)
        with pytest.raises(ValueError) as py:
            bad.check_rows()
        with pytest.raises(ValueError) as cpp:
            torch.ops.fastdistill.softlabel_kd_forward(
                torch.randn(4, 100), bad.rows(), list(codec.layout()), None, -100, 0, 0, 0.0,
                1.0, 0.0, 1.0, True, True)
        assert str(py.value) in str(cpp.value)


# ----------------------------------------------------------------- 6. in place when z is saved

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["kd", "sparse", "softlabels"])
def test_inplace_backward_with_logits_saved_elsewhere_raises(backend, op):
    torch.manual_seed(7)
    h, w = torch.randn(4, 6), torch.randn(30, 6, requires_grad=True)
    t = torch.randn(4, 30)
    z = h @ w.t()
    other = 0.01 * (z ** 2).sum()  # pow saves z for its backward
    kd = inplace_kd_loss(op, z, t, backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (kd + other).backward()


@pytest.mark.parametrize("op", ["kd", "sparse", "softlabels"])
def test_inplace_backward_on_torch_matches_out_of_place(op):
    torch.manual_seed(8)
    h, t = torch.randn(5, 6), torch.randn(5, 30)
    lp, ids = torch.log_softmax(t, -1).topk(5, -1)
    packed = sl.encode(t, k=5)
    grads = []
    for inplace in (False, True):
        w = torch.randn(30, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
        z = h @ w.t()
        kw = dict(inplace_backward=inplace, backend="torch", temperature=2.0)
        loss = (fd.kd_loss(z, t, **kw) if op == "kd" else
                fd.sparse_kd_loss(z, ids, lp, **kw) if op == "sparse" else
                sl.kd_loss(z, packed, **dict(kw, temperature=None)))
        (2.0 * loss).backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[1], grads[0])


# ----------------------------------------------------------------- 8. float64 gradcheck

@pytest.mark.parametrize("codec", [dict(k=4), dict(k=4, value_bits=8),
                                   dict(method="sampled", n_samples=6)],
                         ids=["topk16", "topk8", "sampled"])
@pytest.mark.parametrize("div", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_softlabels_kd_loss_gradcheck_float64(codec, div):
    torch.manual_seed(9)
    labels = sl.encode(torch.randn(3, 11), **codec)
    if labels.codec.tail == "none" and div != "forward_kl":
        pytest.skip("sampled labels take forward_kl only")
    s = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([2, -100, 7])
    f = lambda x: sl.kd_loss(x, labels, divergence=div, labels=target, hard_weight=0.3,  # noqa: E731
                             backend="torch")
    assert torch.autograd.gradcheck(f, (s,))
    assert torch.autograd.gradgradcheck(f, (s,))


@pytest.mark.parametrize("teacher", ["head", "logits", "sparse"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_gradcheck_float64(teacher, reduction):
    """hidden, weight and bias, with a logit scale, a soft cap, padding of a
    smaller teacher vocabulary, ignored rows and chunks that split the rows."""
    torch.manual_seed(10)
    d = dict(dtype=torch.float64)
    h, w, b = (torch.randn(5, 4, **d), torch.randn(9, 4, **d), torch.randn(9, **d))
    th, tw = torch.randn(5, 3, **d), torch.randn(7, 3, **d)
    kw = dict(labels=torch.tensor([1, -100, 8, 0, 3]), hard_weight=0.2, divergence="jsd",
              temperature=1.5, student_logit_scale=0.8, student_softcap=5.0, chunk_size=2,
              reduction=reduction, backend="torch")
    if teacher == "head":
        kw.update(teacher_hidden=th, teacher_weight=tw, vocab_mismatch="pad")
    elif teacher == "logits":
        kw.update(teacher_logits=th @ tw.t(), vocab_mismatch="pad")
    else:
        lp, ids = torch.log_softmax(th @ tw.t(), -1).topk(3, -1)
        kw.update(teacher_sparse=(ids, lp))
    f = lambda h, w, b: fd.fused_linear_kd_loss(h, w, student_bias=b, **kw)  # noqa: E731
    args = tuple(x.requires_grad_() for x in (h, w, b))
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("div", fd.DIVERGENCES)
def test_kd_loss_gradgradcheck_float64(div):
    """The second derivative of the reference (what the fused backends' double
    backward recomputes) against finite differences."""
    torch.manual_seed(11)
    s = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 7, dtype=torch.float64)
    if div != "taid":
        f = lambda x: fd.kd_loss(x, t, backend="torch", **_kw(div))  # noqa: E731
        assert torch.autograd.gradgradcheck(f, (s,))
        return
    # TAID's target sees the student through a stop-gradient, by design: its
    # derivatives of every order are forward KL's towards the target held fixed
    # at the point (finite differences of its gradient would move the target too).
    t_mix = (0.5 * s + 0.5 * t).detach()
    v = torch.randn_like(s)
    hv = []
    for f in (lambda x: fd.kd_loss(x, t, backend="torch", **_kw("taid")),
              lambda x: fd.kd_loss(x, t_mix, backend="torch", temperature=2.0)):
        (g,) = torch.autograd.grad(f(s), s, create_graph=True)
        hv.append(torch.autograd.grad((g * v).sum(), s)[0])
    torch.testing.assert_close(hv[0], hv[1])


@pytest.mark.parametrize("backend", [pytest.param("torch", id="torch")] + fused_backends())
def test_softlabels_backends_use_the_stored_tail_mass(backend):
    """A top-k row whose tail (1.5e-21) is far below the float32 rounding of its
    top mass: 1 − Σ exp(lp) of the decoded row is 0 or negative, which made the
    torch backend's reverse KL infinite; the stored tail gives the true ≈1e-8."""
    from fastdistill import softlabels as sl

    g = torch.Generator().manual_seed(2)
    t = torch.randn(1, 4, generator=g) * 30
    packed = sl.encode(t, k=3, value_bits=16)
    s = torch.tensor([[46.25, -8.8125, -65.5, 17.0]])
    tail = float(packed.tail_mass())
    assert 0 < tail < 1e-12
    ids, lp = packed.decode()
    p = torch.cat([lp.double().exp(), torch.tensor([[tail]], dtype=torch.float64)], -1)
    q_all = torch.softmax(s.double(), -1)
    q = torch.cat([q_all[:, ids[0]], q_all[:, [3]]], -1)
    want = float((q * (q.log() - p.log())).sum())  # reverse KL over the 4 bins
    for dtype in (torch.float32, torch.float64) if backend == "torch" else (torch.float32,):
        x = s.to(dtype).clone().requires_grad_()
        loss = sl.kd_loss(x, packed, divergence="reverse_kl", backend=backend)
        loss.backward()
        assert math.isclose(float(loss), want, rel_tol=1e-3), (dtype, float(loss))
        assert torch.isfinite(x.grad).all(), (dtype, x.grad)
