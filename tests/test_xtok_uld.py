"""fd.xtok.uld_loss (top-k sorted-L1) and fd.xtok.mapped_kd_loss (exact vocabulary
map) against the float64 references of fastdistill/reference/xtok.py: k = V
exactness, the bound 0 ≤ exact − top-k ≤ 2·min(tail_T, tail_S) on random
(peaked, flat) and SmolLM2-shaped distributions, values and gradients over odd
shapes, pairs, ignore rows, temperatures, low precision, non-contiguous inputs,
gradcheck, double backward, NaN propagation, errors; chunk_pairs and vocab_map."""
import pytest
import torch

import fastdistill as fd
from fastdistill.reference import xtok as ref

from conftest import fused_backends

D = torch.float64


def teacher_top(zt, K, T=1.0):
    """(top-k log-probs, true tail mass) of teacher logits at T."""
    lp = torch.log_softmax(zt.double() / T, -1)
    top = lp.topk(K, -1).values
    return top, 1 - top.exp().sum(-1)


def student_tail(z, K, T=1.0):
    return 1 - torch.softmax(z.double() / T, -1).topk(min(K, z.shape[-1]), -1).values.sum(-1)


@pytest.mark.parametrize("Vs,Vt", [(11, 11), (7, 13), (13, 7)])
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_k_equal_v_is_the_exact_sorted_l1(Vs, Vt, T):
    g = torch.Generator().manual_seed(Vs * 100 + Vt)
    z = torch.randn(9, Vs, generator=g, dtype=D) * 3
    zt = torch.randn(9, Vt, generator=g, dtype=D) * 3
    p = torch.softmax(zt / T, -1)
    exact = ref.uld_exact(z, p, T)
    # the whole teacher row (K = Vt), or the student's full vocabulary (K >= Vs)
    got = fd.xtok.uld_loss(p.log(), student_logits=z, temperature=T, reduction="none",
                           t2_scale=False)
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-12)
    H = 5
    h = torch.randn(9, H, generator=g, dtype=D)
    W = torch.randn(Vs, H, generator=g, dtype=D)
    got_h = fd.xtok.uld_loss(p.log(), student_hidden=h, student_weight=W, temperature=T,
                             reduction="none", t2_scale=False, chunk_size=4)
    torch.testing.assert_close(got_h, ref.uld_exact(h @ W.t(), p, T), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0, 12.0], ids=["flat", "normal", "peaked",
                                                                "very-peaked"])
@pytest.mark.parametrize("K", [1, 3, 17, 60])
def test_topk_error_bound_on_random_distributions(scale, K):
    g = torch.Generator().manual_seed(int(scale * 10) + K)
    Vs, Vt = 64, 97
    # mixed rows: the teacher and the student each drawn at their own sharpness
    z = torch.randn(40, Vs, generator=g, dtype=D) * scale * torch.rand(40, 1, generator=g, dtype=D)
    zt = torch.randn(40, Vt, generator=g, dtype=D) * scale
    for T in (1.0, 2.0):
        top, tail_t = teacher_top(zt, K, T)
        approx = fd.xtok.uld_loss(top, student_logits=z, temperature=T, reduction="none",
                                  t2_scale=False)
        torch.testing.assert_close(approx, ref.uld_topk(z, top.exp(), tail_t, T), rtol=0,
                                   atol=1e-12)
        err = ref.uld_exact(z, torch.softmax(zt / T, -1), T) - approx
        Kh = min(K, Vs)
        tail_t_k = 1 - torch.softmax(zt / T, -1).topk(Kh, -1).values.sum(-1)
        bound = 2 * torch.minimum(tail_t_k, student_tail(z, Kh, T))
        assert bool((err >= -1e-12).all()), float(err.min())
        assert bool((err <= bound + 1e-12).all()), float((err - bound).max())
    # the bound is not vacuous: somewhere the top-k form really errs (for K < V)
    if K < 17 and scale <= 1.0:
        assert float(err.max()) > 1e-3


def test_topk_error_bound_on_smollm2_shaped_distributions():
    """A random tiny model with SmolLM2's vocabulary (49152) as the teacher, a
    V = 8192 student, float32 as in training; the bound holds for K = 16..1024."""
    g = torch.Generator().manual_seed(7)
    H, N = 32, 12
    ht, Wt = torch.randn(N, H, generator=g), torch.randn(49152, H, generator=g) * 0.4
    hs, Ws = torch.randn(N, H, generator=g), torch.randn(8192, H, generator=g) * 0.4
    zt, zs = ht @ Wt.t(), hs @ Ws.t()
    exact = ref.uld_exact(zs.double(), torch.softmax(zt.double(), -1))
    for K in (16, 128, 1024):
        top, _ = teacher_top(zt, K)
        approx = fd.xtok.uld_loss(top.float(), student_hidden=hs, student_weight=Ws,
                                  reduction="none", t2_scale=False, chunk_size=5).double()
        bound = 2 * torch.minimum(1 - top.exp().sum(-1), student_tail(zs, K))
        err = exact - approx
        assert bool((err >= -1e-5).all()) and bool((err <= bound + 1e-5).all())


def pair_chunks(B, Ls, Lt, seed):
    g = torch.Generator().manual_seed(seed)
    cs = torch.full((B, Ls), -1, dtype=torch.int64)
    ct = torch.full((B, Lt), -1, dtype=torch.int64)
    c = 0
    for b in range(B):
        s, t = 0, b % 2
        while True:
            ns, nt = (int(torch.randint(1, 4, (1,), generator=g)) for _ in range(2))
            if s + ns > Ls - 1 or t + nt > Lt:
                break
            cs[b, s:s + ns], ct[b, t:t + nt] = c, c
            s, t, c = s + ns, t + nt, c + 1
    return cs, ct, c


def test_chunk_pairs_are_the_last_token_of_each_chunk():
    cs, ct, C = pair_chunks(3, 13, 11, 0)
    sp, tp = fd.xtok.chunk_pairs(cs, ct, C)
    assert sp.numel() == C == tp.numel()
    for c in range(C):
        assert int(sp[c]) == max(i for i, x in enumerate(cs.reshape(-1).tolist()) if x == c)
        assert int(tp[c]) == max(i for i, x in enumerate(ct.reshape(-1).tolist()) if x == c)
    assert torch.equal(fd.xtok.chunk_pairs(cs, ct)[0], sp)


def test_chunk_pairs_from_real_alignment():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from fastdistill.hf.defaults import load_tokenizer

    teacher = load_tokenizer()
    text = ["And God said, Let there be light: and there was light. Ünïcödé 世界"]
    student = Tokenizer(models.BPE())
    student.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    student.decoder = decoders.ByteLevel()
    student.train_from_iterator(text * 3, trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    batch = fd.xtok.align_batch(text, student, teacher)
    sp, tp = fd.xtok.chunk_pairs(batch["student_chunks"], batch["teacher_chunks"],
                                 batch["num_chunks"])
    assert sp.numel() == batch["num_chunks"]
    # the paired tokens end at the same byte: both have read the same text
    sb = batch["student_offsets"].reshape(-1, 2)[sp, 1]
    tb = batch["teacher_offsets"].reshape(-1, 2)[tp, 1]
    assert torch.equal(sb, tb)


def make_case(B, Ls, Lt, Vs, Vt, H, K, seed, dtype=D):
    g = torch.Generator().manual_seed(seed)
    cs, ct, C = pair_chunks(B, Ls, Lt, seed)
    sp, tp = fd.xtok.chunk_pairs(cs, ct, C)
    h = torch.randn(B, Ls, H, generator=g, dtype=D)
    W = torch.randn(Vs, H, generator=g, dtype=D) * 0.8
    bias = torch.randn(Vs, generator=g, dtype=D) * 0.3
    zt = torch.randn(B, Lt, Vt, generator=g, dtype=D) * 2
    labels = torch.randint(0, Vs, (B, Ls), generator=g)
    labels[torch.rand(B, Ls, generator=g) < 0.3] = -100
    return dict(h=h.to(dtype), W=W.to(dtype), bias=bias.to(dtype), zt=zt, labels=labels, sp=sp,
                tp=tp, K=K)


def uld_reference(c, T, reduction, t2, use_bias=True):
    z = c["h"].double() @ c["W"].double().t() + (c["bias"].double() if use_bias else 0)
    zs = z.reshape(-1, z.shape[-1])[c["sp"]]
    top, tail = teacher_top(c["zt"].reshape(-1, c["zt"].shape[-1])[c["tp"]], c["K"], T)
    rows = ref.uld_topk(zs, top.exp(), tail, T) * (T * T if t2 else 1.0)
    keep = c["labels"].reshape(-1)[c["sp"]] != -100
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / max(int(keep.sum()), 1)


@pytest.mark.parametrize("path", ["logits", "hidden"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("T", [1.0, 0.7, 3.0])
def test_uld_vs_reference_values_and_gradients(path, reduction, T):
    c = make_case(3, 13, 11, 37, 53, 6, 9, seed=int(T * 10))
    top, _ = teacher_top(c["zt"], c["K"], T)
    h = c["h"].clone().requires_grad_()
    W = c["W"].clone().requires_grad_()
    b = c["bias"].clone().requires_grad_()
    kw = dict(student_positions=c["sp"], teacher_positions=c["tp"], labels=c["labels"],
              temperature=T, reduction=reduction)
    if path == "logits":
        got = fd.xtok.uld_loss(top, student_logits=h @ W.t() + b, **kw)
    else:
        got = fd.xtok.uld_loss(top, student_hidden=h, student_weight=W, student_bias=b,
                               chunk_size=3, **kw)
    want_in = [x.clone().requires_grad_() for x in (c["h"], c["W"], c["bias"])]
    want = uld_reference(dict(c, h=want_in[0], W=want_in[1], bias=want_in[2]), T, reduction, True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    w = torch.randn(got.shape, dtype=D) if reduction == "none" else torch.tensor(1.7, dtype=D)
    g1 = torch.autograd.grad((got * w).sum(), (h, W, b))
    g2 = torch.autograd.grad((want * w).sum(), want_in)
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


def test_same_length_pairs_reduction_none_shape_and_ignore():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 5, 19, generator=g, dtype=D, requires_grad=True)
    top, tail = teacher_top(torch.randn(2, 5, 23, generator=g, dtype=D), 4)
    labels = torch.tensor([[1, -100, 2, 3, -100], [0, 0, -100, 1, 1]])
    out = fd.xtok.uld_loss(top, student_logits=z, labels=labels, reduction="none")
    assert out.shape == (2, 5) and bool((out[labels == -100] == 0).all())
    want = ref.uld_topk(z.reshape(-1, 19), top.reshape(-1, 4).exp(), tail.reshape(-1))
    torch.testing.assert_close(out[labels != -100], want.reshape(2, 5)[labels != -100])
    mean = fd.xtok.uld_loss(top, student_logits=z, labels=labels)
    torch.testing.assert_close(mean, out.sum() / 7)
    # all ignored: 0 with a zero gradient, not NaN
    zero = fd.xtok.uld_loss(top, student_logits=z, labels=torch.full_like(labels, -100))
    (gz,) = torch.autograd.grad(zero, z)
    assert float(zero.detach()) == 0 and bool((gz == 0).all())


def test_gradcheck_and_double_backward():
    c = make_case(2, 9, 8, 13, 17, 4, 5, seed=1)
    top, _ = teacher_top(c["zt"], c["K"], 1.5)
    kw = dict(student_positions=c["sp"], teacher_positions=c["tp"], labels=c["labels"],
              temperature=1.5)
    h, W, b = (x.clone().requires_grad_() for x in (c["h"], c["W"], c["bias"]))

    def head(h, W, b):
        return fd.xtok.uld_loss(top, student_hidden=h, student_weight=W, student_bias=b,
                                chunk_size=2, reduction="none", **kw)

    def logits(z):
        return fd.xtok.uld_loss(top, student_logits=z, reduction="sum", **kw)

    assert torch.autograd.gradcheck(head, (h, W, b))
    assert torch.autograd.gradgradcheck(head, (h, W, b))
    z = (c["h"] @ c["W"].t()).requires_grad_()
    assert torch.autograd.gradcheck(logits, (z,))
    assert torch.autograd.gradgradcheck(logits, (z,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_and_non_contiguous(dtype):
    c = make_case(2, 12, 10, 40, 30, 8, 6, seed=5)
    top, _ = teacher_top(c["zt"], c["K"])
    h = c["h"].to(dtype).transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous
    W = c["W"].to(dtype).t().contiguous().t()
    assert not h.is_contiguous() and not W.is_contiguous()
    h.requires_grad_()
    W.requires_grad_()
    kw = dict(student_positions=c["sp"], teacher_positions=c["tp"], labels=c["labels"])
    got = fd.xtok.uld_loss(top.to(dtype), student_hidden=h, student_weight=W, chunk_size=4, **kw)
    gh, gW = torch.autograd.grad(got, (h, W))
    assert got.dtype == torch.float32 and gh.dtype == dtype and gW.dtype == dtype
    hd, Wd = (x.detach().double().requires_grad_() for x in (h, W))
    want = fd.xtok.uld_loss(top.to(dtype).double(), student_hidden=hd, student_weight=Wd, **kw)
    wh, wW = torch.autograd.grad(want, (hd, Wd))
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(gh.double(), wh, rtol=tol * 10, atol=tol)
    torch.testing.assert_close(gW.double(), wW, rtol=tol * 10, atol=tol)
    z = (h.detach() @ W.detach().t())[:, ::1].transpose(0, 1).contiguous().transpose(0, 1)
    got_z = fd.xtok.uld_loss(top.to(dtype), student_logits=z, **kw)
    torch.testing.assert_close(got_z.double(), want, rtol=tol, atol=tol)


def test_non_finite_propagates():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 10, generator=g)
    top, _ = teacher_top(torch.randn(4, 12, generator=g), 3)
    z[1, 4] = float("nan")
    out = fd.xtok.uld_loss(top.float(), student_logits=z, reduction="none")
    assert torch.isnan(out[1]) and bool(torch.isfinite(out[[0, 2, 3]]).all())
    top2 = top.float().clone()
    top2[2, 0] = float("nan")
    assert torch.isnan(fd.xtok.uld_loss(top2, student_logits=torch.randn(4, 10)))
    W = torch.randn(10, 3)
    W[0, 0] = float("inf")
    assert torch.isnan(fd.xtok.uld_loss(top.float(), student_hidden=torch.randn(4, 3),
                                        student_weight=W))


def test_uld_errors_name_the_argument():
    z = torch.randn(4, 10)
    top, _ = teacher_top(torch.randn(4, 12), 3)
    top = top.float()
    cases = [
        (dict(student_logits=z.long()), TypeError, "student_logits"),
        (dict(), ValueError, "exactly one way"),
        (dict(student_logits=z, student_hidden=z), ValueError, "exactly one way"),
        (dict(student_hidden=z), ValueError, "student_weight"),
        (dict(student_hidden=z, student_weight=torch.randn(10, 3)), ValueError, "student_weight"),
        (dict(student_logits=z[:3]), ValueError, "student_positions"),
        (dict(student_logits=z, student_positions=torch.arange(2)), ValueError, "go together"),
        (dict(student_logits=z, student_positions=torch.tensor([0, 9]),
              teacher_positions=torch.tensor([0, 1])), ValueError, "student_positions"),
        (dict(student_logits=z, student_positions=torch.tensor([0.0]),
              teacher_positions=torch.tensor([0])), TypeError, "student_positions"),
        (dict(student_logits=z, temperature=0.0), ValueError, "temperature"),
        (dict(student_logits=z, reduction="avg"), ValueError, "reduction"),
        (dict(student_logits=z, labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels"),
        (dict(student_logits=z, teacher_tail=torch.full((4,), 2.0)), ValueError, "teacher_tail"),
        (dict(student_logits=z, chunk_size=0), ValueError, "chunk_size"),
    ]
    for kw, exc, word in cases:
        with pytest.raises(exc, match=word):
            fd.xtok.uld_loss(top, **kw)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        fd.xtok.uld_loss(torch.zeros(4, 3), student_logits=z)  # probabilities sum to 3
    with pytest.raises(ValueError, match="teacher_logprobs"):
        fd.xtok.uld_loss(top.clone().requires_grad_(), student_logits=z)


# ---- mapped_kd_loss -----------------------------------------------------------------

def random_map(Vt, Vs, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.full((Vt,), -1, dtype=torch.int64)
    hit = torch.randperm(Vt, generator=g)[: (2 * Vt) // 3]
    m[hit] = torch.randperm(Vs, generator=g)[: hit.numel()]
    return m


@pytest.mark.parametrize("path", ["logits", "hidden"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_mapped_vs_dense_reference(path, divergence, T):
    c = make_case(3, 11, 10, 29, 31, 5, 7, seed=11)
    m = random_map(31, 29, 4)
    zt = c["zt"]
    lp, ids = torch.log_softmax(zt / T, -1).topk(c["K"], -1)
    h, W = c["h"].clone().requires_grad_(), c["W"].clone().requires_grad_()
    kw = dict(student_positions=c["sp"], teacher_positions=c["tp"], labels=c["labels"],
              temperature=T, divergence=divergence, reduction="none", backend="torch")
    if path == "logits":
        got = fd.xtok.mapped_kd_loss(ids, lp, m, student_logits=h @ W.t(), **kw)
    else:
        got = fd.xtok.mapped_kd_loss(ids, lp, m, student_hidden=h, student_weight=W,
                                     chunk_size=4, **kw)
    hr, Wr = c["h"].clone().requires_grad_(), c["W"].clone().requires_grad_()
    zs = (hr @ Wr.t()).reshape(-1, 29)[c["sp"]]
    want = ref.mapped_kd(zs, zt.reshape(-1, 31)[c["tp"]], m, c["K"], temperature=T,
                         divergence=divergence)
    keep = c["labels"].reshape(-1)[c["sp"]] != -100
    want = torch.where(keep, want, torch.zeros_like(want))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    w = torch.randn(got.shape, dtype=D)
    for x, y in zip(torch.autograd.grad((got * w).sum(), (h, W)),
                    torch.autograd.grad((want * w).sum(), (hr, Wr))):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mapped_fused_backends_vs_reference(backend, dtype):
    c = make_case(2, 12, 9, 45, 50, 8, 6, seed=21)
    m = random_map(50, 45, 9)
    lp, ids = torch.log_softmax(c["zt"], -1).topk(c["K"], -1)
    h = c["h"].to(dtype).transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    W = c["W"].to(dtype).requires_grad_()
    kw = dict(student_positions=c["sp"], teacher_positions=c["tp"], labels=c["labels"])
    got = fd.xtok.mapped_kd_loss(ids, lp.float(), m, student_hidden=h, student_weight=W,
                                 backend=backend, **kw)
    gh, gW = torch.autograd.grad(got, (h, W))
    hr, Wr = (x.detach().double().requires_grad_() for x in (h, W))
    zs = (hr @ Wr.t()).reshape(-1, 45)[c["sp"]]
    rows = ref.mapped_kd(zs, c["zt"].reshape(-1, 50)[c["tp"]], m, c["K"])
    keep = c["labels"].reshape(-1)[c["sp"]] != -100
    want = rows[keep].sum() / keep.sum()
    wh, wW = torch.autograd.grad(want, (hr, Wr))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(gh.double(), wh, rtol=tol * 10, atol=tol)
    torch.testing.assert_close(gW.double(), wW, rtol=tol * 10, atol=tol)


def test_mapped_gradcheck_nan_and_errors():
    g = torch.Generator().manual_seed(8)
    m = random_map(15, 12, 1)
    zt = torch.randn(5, 15, generator=g, dtype=D)
    lp, ids = torch.log_softmax(zt, -1).topk(4, -1)
    z = torch.randn(5, 12, generator=g, dtype=D, requires_grad=True)

    def f(z):
        return fd.xtok.mapped_kd_loss(ids, lp, m, student_logits=z, reduction="sum",
                                      backend="torch")

    assert torch.autograd.gradcheck(f, (z,))
    assert torch.autograd.gradgradcheck(f, (z,))
    zn = z.detach().clone()
    zn[2, 0] = float("nan")
    out = fd.xtok.mapped_kd_loss(ids, lp, m, student_logits=zn, reduction="none")
    assert torch.isnan(out[2]) and bool(torch.isfinite(out[[0, 1, 3, 4]]).all())
    with pytest.raises(TypeError, match="vocab_map"):
        fd.xtok.mapped_kd_loss(ids, lp, m.float(), student_logits=z)
    with pytest.raises(ValueError, match="teacher_ids"):
        fd.xtok.mapped_kd_loss(ids + 20, lp, m, student_logits=z)
    with pytest.raises(ValueError, match="vocab_map"):
        fd.xtok.mapped_kd_loss(ids, lp, m, student_logits=z[:, :5])
    with pytest.raises(TypeError, match="teacher_ids"):
        fd.xtok.mapped_kd_loss(ids.double(), lp, m, student_logits=z)


def test_vocab_map_on_real_tokenizers():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from fastdistill.hf.defaults import load_tokenizer

    teacher = load_tokenizer()
    student = Tokenizer(models.BPE())
    student.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    student.decoder = decoders.ByteLevel()
    student.train_from_iterator(["In the beginning God created the heaven. Ünï 世界"] * 3,
                                trainers.BpeTrainer(vocab_size=290, show_progress=False,
                                                    initial_alphabet=pre_tokenizers.ByteLevel
                                                    .alphabet(), special_tokens=["<|im_start|>"]))
    m = fd.xtok.vocab_map(student, teacher)
    assert m.shape == (len(teacher),)
    hit = (m >= 0).nonzero().squeeze(1)
    assert hit.numel() >= 256  # every single byte has a twin, and some merges
    assert torch.unique(m[hit]).numel() == hit.numel()  # injective
    for i in hit[torch.randperm(hit.numel())[:200]].tolist():
        a = teacher.convert_ids_to_tokens(i)
        b = student.id_to_token(int(m[i]))
        assert a == b  # both byte-level: the same bytes are the same alphabet string
    im = teacher.convert_tokens_to_ids("<|im_start|>")
    assert int(m[im]) == student.token_to_id("<|im_start|>")
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "the": 1, "##e": 2}, unk_token="[UNK]"))
    wp.normalizer = normalizers.Lowercase()
    with pytest.raises(ValueError, match="covers nothing"):
        fd.xtok.vocab_map(wp, teacher)
