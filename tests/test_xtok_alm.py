"""fd.xtok.alm_loss against the float64 reference (fastdistill/reference/xtok.py)
and the formulas: the log-prob and fused (hidden + LM head) paths, every
divergence and reduction, ignore rows, temperatures, low precision,
non-contiguous inputs, gradcheck, double backward, the non-finite rule, errors."""
import math

import pytest
import torch

import fastdistill as fd
from fastdistill.reference import xtok as ref
from fastdistill.xtok.alm import alm_divergence, log1mexp

from conftest import fused_backends

DIVS = fd.xtok.ALM_DIVERGENCES


def pair_chunks(B, Ls, Lt, seed):
    """Student and teacher chunk ids over the same chunks: every chunk has at
    least one token on each side; row b has a BOS (-1) on the teacher side when
    b is odd, and padding (-1) at the end."""
    g = torch.Generator().manual_seed(seed)
    cs = torch.full((B, Ls), -1, dtype=torch.int64)
    ct = torch.full((B, Lt), -1, dtype=torch.int64)
    base = 0
    for b in range(B):
        s_pos, t_pos = 0, 1 if b % 2 else 0
        c = base
        while True:
            ns = int(torch.randint(1, 4, (1,), generator=g))
            nt = int(torch.randint(1, 4, (1,), generator=g))
            if s_pos + ns > Ls - (b % 3) or t_pos + nt > Lt:
                break
            cs[b, s_pos:s_pos + ns] = c
            ct[b, t_pos:t_pos + nt] = c
            s_pos, t_pos, c = s_pos + ns, t_pos + nt, c + 1
        base = c
    return cs, ct, base


def logits_case(B, Ls, Lt, V_s, V_t, H, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, Ls, H, generator=g, dtype=dtype)
    Ws = torch.randn(V_s, H, generator=g, dtype=dtype) * 0.7
    ht = torch.randn(B, Lt, H, generator=g, dtype=dtype)
    Wt = torch.randn(V_t, H, generator=g, dtype=dtype) * 0.7
    ids_s = torch.randint(0, V_s, (B, Ls), generator=g)
    ids_t = torch.randint(0, V_t, (B, Lt), generator=g)
    return hs, Ws, ht, Wt, ids_s, ids_t


def test_reference_divergences_match_their_formulas():
    p, q = 0.5, 0.25
    x, y = torch.tensor(math.log(p), dtype=torch.float64), torch.tensor(math.log(q),
                                                                         dtype=torch.float64)
    bce = -(p * math.log(q) + (1 - p) * math.log(1 - q))
    bkl = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    rkl = q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))
    for div, want in (("binary_ce", bce), ("binary_kl", bkl), ("reverse_binary_kl", rkl)):
        assert ref.binary_divergence(x, y, div).item() == pytest.approx(want, rel=1e-12)
        assert alm_divergence(x, y, div).item() == pytest.approx(want, rel=1e-12)
    # binary_kl = binary_ce − H_b(p): the same gradient in the student
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert bce - h == pytest.approx(bkl, rel=1e-12)


@pytest.mark.parametrize("div", DIVS)
def test_stable_divergence_equals_reference_and_stays_finite(div):
    # where the naive log(1 − eʸ) of the reference is itself accurate (|y| ≥ 1e-3)
    vals = torch.tensor([-1e-3, -0.3, -math.log(2), -0.9, -5.0, -40.0], dtype=torch.float64)
    x, y = torch.meshgrid(vals, vals, indexing="ij")
    got = alm_divergence(x, y, div)
    want = ref.binary_divergence(x, y, div)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # near y = 0 the stable form follows log(1 − eʸ) = log(−y) + y/2 + O(y²), which the
    # naive form loses to the rounding of 1 − eʸ
    tiny = torch.tensor([-1e-12, -1e-9], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(tiny), torch.log(-tiny) + tiny / 2, rtol=1e-12, atol=0)
    # in float32 the log1mexp form keeps tiny chunk probabilities' complements exact
    x32 = torch.tensor([-1e-7, -30.0]), torch.tensor([-2e-7, -31.0])
    out = alm_divergence(*x32, div)
    assert torch.isfinite(out).all()
    if div != "binary_ce":
        assert (out >= -1e-6).all()
    # a certain teacher and student (p = q = 1): 0 for the KLs, no NaN (0·log 0 = 0)
    z = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    one = alm_divergence(torch.zeros(1, dtype=torch.float64), z, div)
    assert one.item() == 0.0
    (g,) = torch.autograd.grad(one.sum(), z)
    assert not torch.isnan(g).any()


def test_binary_kl_is_zero_at_a_match_and_positive_elsewhere():
    x = torch.linspace(-8, -1e-3, 50, dtype=torch.float64)
    assert alm_divergence(x, x, "binary_kl").abs().max() < 1e-12
    assert alm_divergence(x, x, "reverse_binary_kl").abs().max() < 1e-12
    assert (alm_divergence(x, x.flip(0), "binary_kl") >= 0).all()


def _ref_call(hs, Ws, ht, Wt, ids_s, ids_t, cs, ct, C, labels_s=None, labels_t=None, **kw):
    lp_s = ref.observed_logprobs(hs @ Ws.t(), ids_s)
    lp_t = ref.observed_logprobs(ht @ Wt.t(), ids_t)
    return ref.alm_loss(lp_s, cs, lp_t, ct, C, student_labels=labels_s, teacher_labels=labels_t,
                        **kw)


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_logprob_path_equals_reference(div, reduction, temperature):
    B, Ls, Lt = 3, 9, 8
    cs, ct, C = pair_chunks(B, Ls, Lt, seed=1)
    hs, Ws, ht, Wt, ids_s, ids_t = logits_case(B, Ls, Lt, 13, 11, 6, seed=2)
    labels_s = ids_s.clone()
    labels_s[1, 3] = -100                         # an ignored token drops its chunk
    hs.requires_grad_()
    lp_s = fd.xtok.token_logprobs(hs @ Ws.t(), ids_s)
    lp_t = fd.xtok.token_logprobs(ht @ Wt.t(), ids_t)
    kw = dict(divergence=div, temperature=temperature, reduction=reduction)
    got = fd.xtok.alm_loss(cs, ct, student_logprobs=lp_s, teacher_logprobs=lp_t,
                           student_labels=labels_s, num_chunks=C, **kw)
    want = _ref_call(hs, Ws, ht, Wt, ids_s, ids_t, cs, ct, C, labels_s=labels_s, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    w = torch.randn(want.shape, dtype=torch.float64) if reduction == "none" else 1.0
    g1, = torch.autograd.grad((got * w).sum(), hs)
    g2, = torch.autograd.grad((want * w).sum(), hs)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", *fused_backends()])
@pytest.mark.parametrize("div", DIVS)
def test_fused_head_path_equals_reference(backend, div):
    """Student hidden + LM head (fused CE, no (L, V) tensor) and a teacher given
    as hidden + head too, against the reference on full logits."""
    B, Ls, Lt, H = 2, 11, 7, 5
    cs, ct, C = pair_chunks(B, Ls, Lt, seed=3)
    dtype = torch.float64 if backend == "torch" else torch.float32
    hs, Ws, ht, Wt, ids_s, ids_t = logits_case(B, Ls, Lt, 17, 9, H, seed=4, dtype=dtype)
    labels_t = ids_t.clone()
    labels_t[0, 2] = -100
    hs.requires_grad_()
    Ws.requires_grad_()
    for temperature in (1.0, 1.7):
        got = fd.xtok.alm_loss(cs, ct, student_hidden=hs, student_weight=Ws, student_labels=ids_s,
                               teacher_hidden=ht, teacher_weight=Wt, teacher_labels=labels_t,
                               divergence=div, temperature=temperature, num_chunks=C,
                               chunk_size=4, backend=backend)
        hd, Wd = hs.detach().double().requires_grad_(), Ws.detach().double().requires_grad_()
        want = _ref_call(hd, Wd, ht.double(), Wt.double(), ids_s, ids_t, cs, ct, C,
                         labels_t=labels_t, divergence=div, temperature=temperature)
        tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(got.double(), want, **tol)
        g1 = torch.autograd.grad(got, (hs, Ws))
        g2 = torch.autograd.grad(want, (hd, Wd))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a.double(), b, **tol)


def test_teacher_head_equals_teacher_logprobs_and_gets_no_gradient():
    B, Ls, Lt = 2, 8, 9
    cs, ct, C = pair_chunks(B, Ls, Lt, seed=5)
    hs, Ws, ht, Wt, ids_s, ids_t = logits_case(B, Ls, Lt, 10, 12, 4, seed=6)
    ht.requires_grad_()
    lp_s = fd.xtok.token_logprobs(hs @ Ws.t(), ids_s)
    a = fd.xtok.alm_loss(cs, ct, student_logprobs=lp_s, teacher_hidden=ht, teacher_weight=Wt,
                         teacher_labels=ids_t, backend="torch")
    b = fd.xtok.alm_loss(cs, ct, student_logprobs=lp_s,
                         teacher_logprobs=fd.xtok.token_logprobs(ht @ Wt.t(), ids_t).detach())
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert not a.requires_grad  # nothing of the student requires grad; the teacher never counts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_and_non_contiguous_inputs(dtype):
    B, Ls, Lt, H = 2, 10, 6, 8
    cs, ct, C = pair_chunks(B, Ls, Lt, seed=7)
    hs, Ws, ht, Wt, ids_s, ids_t = logits_case(B, Ls, Lt, 19, 7, H, seed=8, dtype=torch.float32)
    # non-contiguous: a transposed buffer, and every other column of a wider weight
    hs_nc = hs.to(dtype).transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    wide = torch.randn(19, 2 * H).to(dtype)
    wide[:, ::2] = Ws.to(dtype)
    Ws_nc = wide[:, ::2].detach().requires_grad_()
    assert not hs_nc.is_contiguous() and not Ws_nc.is_contiguous()
    lp_t = fd.xtok.token_logprobs(ht @ Wt.t(), ids_t).to(dtype)
    got = fd.xtok.alm_loss(cs, ct, student_hidden=hs_nc, student_weight=Ws_nc,
                           student_labels=ids_s, teacher_logprobs=lp_t, temperature=2.0)
    assert got.dtype == torch.float32
    hd = hs_nc.detach().double().requires_grad_()
    want = ref.alm_loss(ref.observed_logprobs(hd @ Ws_nc.detach().double().t(), ids_s), cs,
                        lp_t.double(), ct, C, temperature=2.0)
    torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-3)
    g1, = torch.autograd.grad(got, hs_nc)
    g2, = torch.autograd.grad(want, hd)
    assert g1.dtype == dtype
    torch.testing.assert_close(g1.double(), g2, rtol=5e-2, atol=5e-3)


def test_gradcheck_and_double_backward_float64():
    B, Ls, Lt, H = 2, 5, 4, 2
    cs, ct, C = pair_chunks(B, Ls, Lt, seed=9)
    hs, Ws, ht, Wt, ids_s, ids_t = logits_case(B, Ls, Lt, 7, 5, H, seed=10)
    lp_t = fd.xtok.token_logprobs(ht @ Wt.t(), ids_t)
    for div in DIVS:
        def from_logprobs(h):
            lp = fd.xtok.token_logprobs(h @ Ws.t(), ids_s)
            return fd.xtok.alm_loss(cs, ct, student_logprobs=lp, teacher_logprobs=lp_t,
                                    divergence=div, temperature=1.3, reduction="none")

        def fused(h, w):
            return fd.xtok.alm_loss(cs, ct, student_hidden=h, student_weight=w,
                                    student_labels=ids_s, teacher_logprobs=lp_t, divergence=div,
                                    temperature=1.3, backend="torch")

        h = hs.clone().requires_grad_()
        w = Ws.clone().requires_grad_()
        assert torch.autograd.gradcheck(from_logprobs, (h,))
        assert torch.autograd.gradcheck(fused, (h, w))
        if div == "binary_kl":  # double backward: exact through autograd and the fused op's
            assert torch.autograd.gradgradcheck(from_logprobs, (h,))
            assert torch.autograd.gradgradcheck(fused, (h, w))  # create_graph reference


def test_ignore_rows_reductions_and_an_all_dropped_batch():
    B, Ls, Lt = 2, 8, 8
    cs, ct, C = pair_chunks(B, Ls, Lt, seed=11)
    g = torch.Generator().manual_seed(12)
    lp_s = (-torch.rand(B, Ls, generator=g, dtype=torch.float64)).requires_grad_()
    lp_t = -torch.rand(B, Lt, generator=g, dtype=torch.float64)
    none = fd.xtok.alm_loss(cs, ct, student_logprobs=lp_s, teacher_logprobs=lp_t, reduction="none")
    first = {int(cs[b, 0]) for b in range(B) if cs[b, 0] >= 0} | {
        int(ct[b, 0]) for b in range(B) if ct[b, 0] >= 0}
    kept = [c for c in range(C) if c not in first]
    assert all(none[c] == 0 for c in first) and all(none[c] > 0 for c in kept)
    mean = fd.xtok.alm_loss(cs, ct, student_logprobs=lp_s, teacher_logprobs=lp_t)
    total = fd.xtok.alm_loss(cs, ct, student_logprobs=lp_s, teacher_logprobs=lp_t, reduction="sum")
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(mean, none.sum() / len(kept))
    everything = torch.full_like(cs, -100)
    zero = fd.xtok.alm_loss(cs, ct, student_logprobs=lp_s, teacher_logprobs=lp_t,
                            student_labels=everything)
    assert zero.item() == 0.0
    (gz,) = torch.autograd.grad(zero, lp_s)
    assert (gz == 0).all()


def test_nonfinite_inputs_propagate_and_unread_ones_do_not():
    B, Ls, Lt = 1, 8, 7
    cs, ct, C = pair_chunks(B, Ls, Lt, seed=13)
    lp_s = -torch.rand(B, Ls, dtype=torch.float64)
    lp_t = -torch.rand(B, Lt, dtype=torch.float64)
    counted = int((cs[0] >= 0).nonzero()[-1])
    bad = lp_s.clone()
    bad[0, counted] = math.nan
    out = fd.xtok.alm_loss(cs, ct, student_logprobs=bad, teacher_logprobs=lp_t, reduction="none")
    assert torch.isnan(out[cs[0, counted]]) and torch.isfinite(out[: cs[0, counted]]).all()
    assert torch.isnan(fd.xtok.alm_loss(cs, ct, student_logprobs=bad, teacher_logprobs=lp_t))
    unread = lp_s.clone()
    unread[0, 0] = math.nan       # position 0: nothing predicts it, never read
    assert torch.isfinite(fd.xtok.alm_loss(cs, ct, student_logprobs=unread, teacher_logprobs=lp_t))
    # hidden path: a NaN in the hidden state that predicts a counted token
    hs, Ws, _, _, ids_s, _ = logits_case(B, Ls, Lt, 9, 9, 4, seed=14)
    hs[0, counted - 1, 0] = math.nan
    out = fd.xtok.alm_loss(cs, ct, student_hidden=hs, student_weight=Ws, student_labels=ids_s,
                           teacher_logprobs=lp_t, backend="torch")
    assert torch.isnan(out)


def test_bad_arguments_name_themselves():
    cs, ct, C = pair_chunks(1, 6, 6, seed=15)
    lp = -torch.rand(1, 6)
    ok = dict(student_logprobs=lp, teacher_logprobs=lp)
    with pytest.raises(ValueError, match="temperature"):
        fd.xtok.alm_loss(cs, ct, temperature=0.0, **ok)
    with pytest.raises(ValueError, match="divergence"):
        fd.xtok.alm_loss(cs, ct, divergence="kl", **ok)
    with pytest.raises(ValueError, match="reduction"):
        fd.xtok.alm_loss(cs, ct, reduction="avg", **ok)
    with pytest.raises(ValueError, match="teacher_logprobs requires grad"):
        fd.xtok.alm_loss(cs, ct, student_logprobs=lp, teacher_logprobs=lp.clone().requires_grad_())
    with pytest.raises(ValueError, match="exactly one way"):
        fd.xtok.alm_loss(cs, ct, student_hidden=torch.randn(1, 6, 3), student_weight=torch.randn(5, 3),
                         **ok)
    with pytest.raises(ValueError, match="student_labels"):
        fd.xtok.alm_loss(cs, ct, student_hidden=torch.randn(1, 6, 3),
                         student_weight=torch.randn(5, 3), teacher_logprobs=lp)
    with pytest.raises(ValueError, match=r"student_labels must be in \[0, 5\)"):
        fd.xtok.alm_loss(cs, ct, student_hidden=torch.randn(1, 6, 3),
                         student_weight=torch.randn(5, 3), student_labels=torch.full((1, 6), 7),
                         teacher_logprobs=lp)
    with pytest.raises(ValueError, match="student_logprobs must have the chunks' shape"):
        fd.xtok.alm_loss(cs, ct, student_logprobs=-torch.rand(1, 5), teacher_logprobs=lp)
    with pytest.raises(TypeError, match="student_chunks must be an integer tensor"):
        fd.xtok.alm_loss(cs.float(), ct, **ok)
    with pytest.raises(ValueError, match="num_chunks"):
        fd.xtok.alm_loss(cs, ct, num_chunks=1, **ok)
