"""kd_loss: the torch reference against the formulas (float64 gradcheck), and
every fused backend against the reference (values and gradients)."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastdistill as fd
from fastdistill.reference import kd as ref

from conftest import fused_backends

DIVS = fd.DIVERGENCES
TAID_T = 0.6
# (where the teacher has -inf entries) divergences that stay finite there
FINITE_WITH_NEG_INF_TEACHER = ("forward_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl", "taid")


def kw_for(div, **extra):
    kw = dict(divergence=div, beta=0.3, skew=0.2)
    if div == "taid":
        kw["taid_t"] = TAID_T
    kw.update(extra)
    return kw


def loss_and_grad(student, teacher, backend, **kw):
    x = student.detach().clone().requires_grad_()
    loss = fd.kd_loss(x, teacher, backend=backend, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), x.grad


def assert_close_rel(actual, expected, rtol, what, floor=None):
    """Element-wise rtol, with an absolute floor of rtol times the largest
    magnitude (never below rtol·floor: a loss that is 0 in exact arithmetic
    is a few fp32 ulps of its terms away from 0 in any fp32 kernel)."""
    actual, expected = actual.float(), expected.float()
    if floor is None:
        floor = 1.0 if "loss" in what else 1e-2
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, floor),
                               msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------- reference vs formulas

@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("temperature,hard_weight", [(1.0, 0.0), (2.5, 0.4)])
def test_reference_gradcheck_float64(div, temperature, hard_weight):
    torch.manual_seed(1)
    s = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, dtype=torch.float64)
    labels = torch.tensor([1, -100, 5, 0])
    kw = kw_for(div, temperature=temperature, hard_weight=hard_weight, labels=labels)
    if div != "taid":
        assert torch.autograd.gradcheck(lambda x: fd.kd_loss(x, t, backend="torch", **kw), (s,))
        return
    # TAID's target sees the student through a stop-gradient: at the point s
    # it is forward KL towards the constant teacher (1 - t)·s + t·z_t, whose
    # gradient gradcheck verifies; TAID must give that value and gradient.
    t_mix = (1 - TAID_T) * s.detach() + TAID_T * t
    kw_fkl = dict(kw, divergence="forward_kl", taid_t=None)
    assert torch.autograd.gradcheck(lambda x: fd.kd_loss(x, t_mix, backend="torch", **kw_fkl), (s,))
    got = fd.kd_loss(s, t, backend="torch", **kw)
    (g_taid,) = torch.autograd.grad(got, s)
    want = fd.kd_loss(s, t_mix, backend="torch", **kw_fkl)
    (g_fkl,) = torch.autograd.grad(want, s)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_taid, g_fkl)


@pytest.mark.parametrize("div", DIVS)
def test_reference_gradient_matches_kd_math_table(div):
    """d D / d u from kd-math.md §1, written out independently of autograd."""
    torch.manual_seed(2)
    u = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 9, dtype=torch.float64)
    kw = kw_for(div)
    ref.divergence_rows(u, v, div, beta=kw["beta"], skew=kw["skew"], taid_t=kw.get("taid_t")).sum().backward()
    q, p = u.detach().softmax(-1), v.softmax(-1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1, keepdim=True)  # noqa: E731
    if div == "forward_kl":
        g = q - p
    elif div == "reverse_kl":
        g = q * (q.log() - p.log() - kl(q, p))
    elif div == "jsd":
        b = kw["beta"]
        m = b * p + (1 - b) * q
        g = (1 - b) * q * (q.log() - m.log() - kl(q, m))
    elif div == "tvd":
        s = 0.5 * torch.sign(q - p)
        g = q * (s - (q * s).sum(-1, keepdim=True))
    elif div == "skew_forward_kl":
        lam = kw["skew"]
        w = p / (lam * p + (1 - lam) * q)
        g = -(1 - lam) * q * (w - (q * w).sum(-1, keepdim=True))
    elif div == "skew_reverse_kl":
        lam = kw["skew"]
        m = (1 - lam) * p + lam * q
        gg = (q / m).log() + 1 - lam * q / m
        g = q * (gg - (q * gg).sum(-1, keepdim=True))
    else:
        t = kw["taid_t"]
        g = q - ((1 - t) * u.detach() + t * v).softmax(-1)
    torch.testing.assert_close(u.grad, g, rtol=1e-10, atol=1e-12)


def test_forward_kl_matches_torch_kl_div():
    s, t = torch.randn(5, 11, dtype=torch.float64), torch.randn(5, 11, dtype=torch.float64)
    expected = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(fd.kd_loss(s, t, backend="torch"), expected)


def test_jsd_has_no_jump_near_endpoints():
    # at the ends of the supported range the JSD is O(beta), not forward/reverse KL
    s, t = torch.randn(4, 30, dtype=torch.float64), torch.randn(4, 30, dtype=torch.float64)
    lo, hi = fd.kd.BETA_RANGE
    kl = fd.kd_loss(s, t, backend="torch")
    near0 = fd.kd_loss(s, t, divergence="jsd", beta=lo, backend="torch")
    near1 = fd.kd_loss(s, t, divergence="jsd", beta=hi, backend="torch")
    assert 0 < near0 < 5 * lo * kl and 0 < near1 < 5 * lo * kl


def test_mixture_log_does_not_underflow():
    # both probabilities underflow in linear space at these logits
    s = torch.tensor([[0.0, -200.0, -1e4]], dtype=torch.float64)
    t = torch.tensor([[0.0, -1e4, -300.0]], dtype=torch.float64)
    for div in ("jsd", "skew_forward_kl", "skew_reverse_kl"):
        x = s.clone().requires_grad_()
        loss = fd.kd_loss(x, t, backend="torch", **kw_for(div))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), div


# ----------------------------------------------------------------- fused backends vs reference

def shapes_for(backend):
    # the Triton interpreter is slow: its large-V case has few rows
    return [(5, 1), (6, 7), (9, 1000), (2 if backend == "triton" else 5, 32003)]


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_fused_matches_reference_fp32(backend, div, temperature):
    torch.manual_seed(3)
    for n, v in shapes_for(backend):
        s, t = torch.randn(n, v) * 4, torch.randn(n, v) * 4
        labels = torch.randint(0, v, (n,))
        labels[0] = -100
        kw = kw_for(div, temperature=temperature, labels=labels)
        want_l, want_g = loss_and_grad(s.double(), t.double(), "torch", **kw)
        got_l, got_g = loss_and_grad(s, t, backend, **kw)
        assert got_l.dtype == torch.float32 and got_g.dtype == torch.float32
        assert_close_rel(got_l, want_l, 1e-5, f"loss V={v}")
        assert_close_rel(got_g, want_g, 1e-5, f"grad V={v}")
        assert (got_g[0] == 0).all()  # the ignored row


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_matches_reference_half(backend, div, dtype):
    torch.manual_seed(4)
    s, t = (torch.randn(6, 777) * 3).to(dtype), (torch.randn(6, 777) * 3).to(dtype)
    kw = kw_for(div, temperature=2.5)
    want_l, want_g = loss_and_grad(s.double(), t.double(), "torch", **kw)
    got_l, got_g = loss_and_grad(s, t, backend, **kw)
    assert got_g.dtype == dtype
    assert_close_rel(got_l, want_l, 2e-2, "loss")
    assert_close_rel(got_g, want_g, 2e-2, "grad")


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_3d_noncontiguous(backend, reduction):
    torch.manual_seed(5)
    base_s, base_t = torch.randn(3, 40, 4), torch.randn(3, 40, 4)
    s = base_s.transpose(1, 2)  # (3, 4, 40), not contiguous
    t = base_t.transpose(1, 2)
    labels = torch.randint(0, 40, (3, 4))
    labels[1, 2] = -100
    assert not s.is_contiguous()
    kw = dict(divergence="jsd", temperature=2.0, labels=labels, hard_weight=0.25, reduction=reduction)
    want_l, want_g = loss_and_grad(s.double(), t.double(), "torch", **kw)
    got_l, got_g = loss_and_grad(s, t, backend, **kw)
    assert got_l.shape == want_l.shape == ((3, 4) if reduction == "none" else ())
    assert_close_rel(got_l, want_l, 1e-5, "loss")
    assert_close_rel(got_g, want_g, 1e-5, "grad")


@pytest.mark.parametrize("backend", ["torch"] + fused_backends())
@pytest.mark.parametrize("div", DIVS)
def test_all_ignored_batch_is_zero(backend, div):
    s, t = torch.randn(4, 50), torch.randn(4, 50)
    labels = torch.full((4,), -100)
    loss, grad = loss_and_grad(s, t, backend, **kw_for(div, labels=labels, hard_weight=0.5))
    assert loss.item() == 0.0
    assert (grad == 0).all()


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("div", DIVS)
def test_extreme_logits(backend, div):
    torch.manual_seed(6)
    s = torch.randn(4, 300) * 3
    t = torch.randn(4, 300) * 3
    s[:, 0], s[:, 1] = 1e4, -1e4
    t[:, 2], t[:, 3] = 1e4, -1e4
    if div in FINITE_WITH_NEG_INF_TEACHER:
        t[1, 10:50] = -math.inf
    kw = kw_for(div, temperature=2.5)
    want_l, want_g = loss_and_grad(s.double(), t.double(), "torch", **kw)
    got_l, got_g = loss_and_grad(s, t, backend, **kw)
    assert torch.isfinite(got_l) and torch.isfinite(got_g).all()
    assert_close_rel(got_l, want_l, 1e-5, "loss")
    assert_close_rel(got_g, want_g, 1e-5, "grad")


@pytest.mark.parametrize("backend", ["torch"] + fused_backends())
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_hard_weight_is_cross_entropy(backend, temperature):
    torch.manual_seed(7)
    s, t = torch.randn(8, 100), torch.randn(8, 100)
    labels = torch.randint(0, 100, (8,))
    labels[3] = -100
    hw = 0.3
    x = s.clone().requires_grad_()
    fd.kd_loss(x, t, labels=labels, hard_weight=hw, temperature=temperature, backend=backend).backward()
    y = s.clone().requires_grad_()
    soft = fd.kd_loss(y, t, labels=labels, temperature=temperature, backend="torch")
    ce = F.cross_entropy(y, labels, ignore_index=-100)
    (hw * ce + (1 - hw) * soft).backward()
    assert_close_rel(x.grad, y.grad, 1e-5, "grad")
    # hard_weight=1 is exactly cross-entropy
    only_ce = fd.kd_loss(s, t, labels=labels, hard_weight=1.0, temperature=temperature, backend=backend)
    torch.testing.assert_close(only_ce, F.cross_entropy(s, labels), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", fused_backends())
def test_t2_scale_scales_value_and_gradient(backend):
    s, t = torch.randn(3, 64), torch.randn(3, 64)
    a_l, a_g = loss_and_grad(s, t, backend, temperature=4.0)
    b_l, b_g = loss_and_grad(s, t, backend, temperature=4.0, t2_scale=False)
    torch.testing.assert_close(a_l, 16 * b_l)
    torch.testing.assert_close(a_g, 16 * b_g)


@pytest.mark.parametrize("backend", ["torch"] + fused_backends())
def test_vocab_mismatch_pad_and_truncate(backend):
    torch.manual_seed(8)
    s, t = torch.randn(4, 50), torch.randn(4, 53)
    padded_s = F.pad(s, (0, 3), value=-math.inf)
    # pad: the student's missing tokens have probability 0 (forward KL is then inf),
    # so compare a divergence that stays finite
    kw = dict(divergence="jsd")
    got_l, got_g = loss_and_grad(s, t, backend, vocab_mismatch="pad", **kw)
    want_l = ref.kd_loss(padded_s.double(), t.double(), **kw)
    assert_close_rel(got_l, want_l, 1e-5, "pad loss")
    assert got_g.shape == s.shape
    got_l, _ = loss_and_grad(s, t, backend, vocab_mismatch="truncate", **kw)
    assert_close_rel(got_l, ref.kd_loss(s.double(), t[:, :50].double(), **kw), 1e-5, "truncate loss")
    # a shorter teacher is padded with -inf too: never with 0 logits
    got_l, _ = loss_and_grad(t, s, backend, vocab_mismatch="pad", divergence="forward_kl")
    want = ref.kd_loss(t.double(), F.pad(s, (0, 3), value=-math.inf).double())
    assert_close_rel(got_l, want, 1e-5, "pad teacher")


# ----------------------------------------------------------------- in place

@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward_matches_default(backend, reduction):
    torch.manual_seed(9)
    h = torch.randn(6, 16)
    w = torch.randn(300, 16, requires_grad=True)
    t = torch.randn(6, 300)
    labels = torch.randint(0, 300, (6,))
    labels[2] = -100
    grads = []
    for inplace in (False, True):
        w.grad = None
        logits = h @ w.t()  # matmul saves h and w, not the logits
        loss = fd.kd_loss(logits, t, labels=labels, hard_weight=0.2, temperature=2.0,
                          reduction=reduction, inplace_backward=inplace, backend=backend)
        (loss.sum() * 3.0).backward()
        grads.append(w.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("backend", ["torch"] + fused_backends())
def test_inplace_backward_misuse_raises(backend):
    x = torch.randn(4, 30, requires_grad=True)
    t = torch.randn(4, 30)
    logits = x.exp()  # exp saves its output for backward
    loss = fd.kd_loss(logits, t, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_backward_on_leaf_is_an_error():
    x = torch.randn(4, 30, requires_grad=True)
    with pytest.raises(ValueError, match="leaf"):
        fd.kd_loss(x, torch.randn(4, 30), inplace_backward=True, backend="cpp")


# ----------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("backend", ["cpp"])
def test_training_step_under_torch_compile_matches_eager(backend):
    if not fd.backends()[backend]:
        pytest.skip(f"{backend} unavailable")
    torch.manual_seed(10)
    h, t = torch.randn(12, 32), torch.randn(12, 257)
    labels = torch.randint(0, 257, (12,))
    labels[4] = -100

    def make():
        torch.manual_seed(11)
        return torch.nn.Linear(32, 257)

    def step(model, opt, fn):
        opt.zero_grad()
        loss = fn(model, h)
        loss.backward()
        opt.step()
        return loss.detach()

    def loss_fn(model, x):
        return fd.kd_loss(model(x), t, labels=labels, hard_weight=0.1, temperature=2.0, backend=backend)

    eager, comp = make(), make()
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(comp.parameters(), lr=0.1)
    compiled = torch.compile(loss_fn, fullgraph=True)
    for _ in range(2):
        le = step(eager, opt_e, loss_fn)
        lc = step(comp, opt_c, compiled)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comp.weight, eager.weight, rtol=1e-5, atol=1e-6)


def test_fullgraph_compile_as_the_first_call_of_a_process():
    # a built extension is loaded at import, so the very first call may be a
    # fullgraph trace (loading it inside the trace would need a lock and a build)
    if not fd.backends()["cpp"]:
        pytest.skip("cpp unavailable")
    import subprocess
    import sys

    code = (
        "import torch, fastdistill as fd, fastdistill._backend as b;"
        "assert b._state.get('cpp'), b._state;"
        "s, t = torch.randn(5, 40, requires_grad=True), torch.randn(5, 40);"
        "f = torch.compile(lambda s, t: fd.kd_loss(s, t, backend='cpp'), fullgraph=True);"
        "torch.testing.assert_close(f(s, t), fd.kd_loss(s, t, backend='torch'));"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# ----------------------------------------------------------------- bad input

def test_bad_input_is_a_clear_error():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    with pytest.raises(ValueError, match="must agree"):
        fd.kd_loss(s, torch.randn(5, 10))
    with pytest.raises(ValueError, match="vocabulary size 10 but teacher_logits has 12"):
        fd.kd_loss(s, torch.randn(4, 12))
    with pytest.raises(TypeError, match="student_logits must be a floating tensor"):
        fd.kd_loss(s.long(), t)
    with pytest.raises(TypeError, match="teacher_logits must be a floating tensor"):
        fd.kd_loss(s, t.int())
    with pytest.raises(ValueError, match="teacher_logits is on meta"):
        fd.kd_loss(s, t.to("meta"))
    with pytest.raises(ValueError, match=r"beta must be in \[0.001, 0.999\]"):
        fd.kd_loss(s, t, divergence="jsd", beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        fd.kd_loss(s, t, divergence="jsd", beta=1.0)
    with pytest.raises(ValueError, match="temperature must be in"):
        fd.kd_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        fd.kd_loss(s, t, temperature=-1.0)
    with pytest.raises(ValueError, match=r"skew must be in \[0.0, 0.99\]"):
        fd.kd_loss(s, t, divergence="skew_forward_kl", skew=1.0)
    with pytest.raises(ValueError, match="skew"):
        fd.kd_loss(s, t, divergence="skew_reverse_kl", skew=-0.1)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        fd.kd_loss(s, t, labels=torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        fd.kd_loss(s, t, labels=torch.zeros(4))
    with pytest.raises(ValueError, match="divergence must be one of"):
        fd.kd_loss(s, t, divergence="kl")
    with pytest.raises(ValueError, match="needs taid_t"):
        fd.kd_loss(s, t, divergence="taid")
    with pytest.raises(ValueError, match="hard_weight > 0 needs labels"):
        fd.kd_loss(s, t, hard_weight=0.5)
    with pytest.raises(ValueError, match="labels must be in"):
        fd.kd_loss(s, t, hard_weight=0.5, labels=torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="reduction must be one of"):
        fd.kd_loss(s, t, reduction="batchmean")
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        fd.kd_loss(s, t.requires_grad_())
    with pytest.raises(ValueError, match="backend must be one of"):
        fd.kd_loss(s, torch.randn(4, 10), backend="numpy")


def test_kdloss_module_and_backends():
    s, t = torch.randn(3, 20), torch.randn(3, 20)
    mod = fd.KDLoss(divergence="taid", taid_t=0.5, temperature=2.0)
    torch.testing.assert_close(mod(s, t), fd.kd_loss(s, t, divergence="taid", taid_t=0.5, temperature=2.0))
    torch.testing.assert_close(mod(s, t, taid_t=0.9), fd.kd_loss(s, t, divergence="taid", taid_t=0.9,
                                                                  temperature=2.0))
    with pytest.raises(TypeError, match="unexpected keyword"):
        fd.KDLoss(temprature=2.0)
    avail = fd.backends()
    assert avail["torch"] is True and set(avail) == {"torch", "cpp", "triton", "cuda"}


def test_env_backend_override(monkeypatch):
    from fastdistill._backend import resolve

    monkeypatch.setenv("FASTDISTILL_BACKEND", "torch")
    assert resolve("auto", torch.device("cpu"), torch.float32) == "torch"
    monkeypatch.setenv("FASTDISTILL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTDISTILL_BACKEND"):
        resolve("auto", torch.device("cpu"), torch.float32)
    monkeypatch.delenv("FASTDISTILL_BACKEND")
    expected = "cpp" if fd.backends()["cpp"] else "torch"
    assert resolve("auto", torch.device("cpu"), torch.float32) == expected
    assert resolve("auto", torch.device("cpu"), torch.float64) == "torch"


# ----------------------------------------------------------------- dtypes, evaluation

@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("sdt,tdt", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                     (torch.float16, torch.bfloat16)])
def test_mixed_dtypes_with_hard_term(backend, sdt, tdt):
    torch.manual_seed(12)
    s, t = (torch.randn(5, 2500) * 3).to(sdt), (torch.randn(5, 2500) * 3).to(tdt)
    labels = torch.randint(0, 2500, (5,))
    kw = dict(divergence="skew_reverse_kl", temperature=2.5, labels=labels, hard_weight=0.3)
    want_l, want_g = loss_and_grad(s.double(), t.double(), "torch", **kw)
    got_l, got_g = loss_and_grad(s, t, backend, **kw)
    assert got_g.dtype == sdt
    assert_close_rel(got_l, want_l, 2e-2, "loss")
    assert_close_rel(got_g, want_g, 2e-2, "grad")


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("div", DIVS)
def test_no_grad_evaluation_matches(backend, div):
    s, t = torch.randn(4, 900), torch.randn(4, 900)
    labels = torch.tensor([3, -100, 5, 7])
    kw = kw_for(div, labels=labels, hard_weight=0.2, temperature=1.5)
    with torch.no_grad():
        got = fd.kd_loss(s, t, backend=backend, **kw)
        got_inplace = fd.kd_loss(s.clone(), t, backend=backend, inplace_backward=True, **kw)
    want = fd.kd_loss(s.double(), t.double(), backend="torch", **kw)
    assert_close_rel(got, want, 1e-5, "loss")
    assert_close_rel(got_inplace, want, 1e-5, "loss")


@pytest.mark.parametrize("backend", ["torch"] + fused_backends())
@pytest.mark.parametrize("taid_t", [0.0, 1.0])
def test_taid_endpoints_with_neg_inf_teacher(backend, taid_t):
    # V=13 is not a multiple of any vector width; -inf teacher entries meet weight 0 at t=0
    torch.manual_seed(13)
    s, t = torch.randn(3, 13), torch.randn(3, 13)
    t[0, 4:9] = -math.inf
    kw = dict(divergence="taid", taid_t=taid_t, temperature=2.0)
    got_l, got_g = loss_and_grad(s, t, backend, **kw)
    assert torch.isfinite(got_l) and torch.isfinite(got_g).all()
    if taid_t == 0.0:  # the target is the student itself: zero loss and gradient
        assert abs(got_l.item()) < 1e-6 and got_g.abs().max() < 1e-6
    else:  # t = 1 is forward KL to the teacher
        want_l, want_g = loss_and_grad(s.double(), t.double(), "torch", divergence="forward_kl",
                                       temperature=2.0)
        assert_close_rel(got_l, want_l, 1e-5, "loss")
        assert_close_rel(got_g, want_g, 1e-5, "grad")


def test_reference_ignored_row_with_infinite_loss_gives_no_nan():
    """reverse KL is +inf where the teacher has -inf and the student has mass;
    an ignored row like that must leave no NaN in the gradient."""
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64)
    t[1, 2] = float("-inf")
    labels = torch.tensor([0, -100, 4])
    loss = fd.kd_loss(s, t, divergence="reverse_kl", labels=labels, backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert torch.count_nonzero(s.grad[1]) == 0


@pytest.mark.parametrize("key,value,exc", [
    ("t_start", 1.4, ValueError), ("t_start", math.nan, ValueError),
    ("total_steps", 0, ValueError), ("total_steps", 2.5, ValueError),
    ("t_end", 0.1, ValueError),  # below t_start
    ("alpha", -1.0, ValueError), ("momentum_decay", 1.0, ValueError),
    ("t", 1.5, ValueError), ("num_steps", -1, ValueError), ("num_steps", True, ValueError),
    ("momentum", math.inf, ValueError), ("prev_loss", math.nan, ValueError),
    ("t_start", "0.4", TypeError),
])
def test_taid_load_state_dict_applies_the_constructor_checks(key, value, exc):
    good = fd.TAIDSchedule(10)
    good.step(1.0)
    state = good.state_dict()
    sched = fd.TAIDSchedule(10)
    before = sched.state_dict()
    with pytest.raises(exc, match=f"^{key} must"):
        sched.load_state_dict(dict(state, **{key: value}))
    assert sched.state_dict() == before  # a refused state changes nothing
    with pytest.raises(ValueError, match="unknown keys"):
        sched.load_state_dict(dict(state, step=3))
    sched.load_state_dict(state)  # and a good one round-trips
    assert sched.state_dict() == state
    assert sched.step(0.5) == good.step(0.5)
