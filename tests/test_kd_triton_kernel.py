"""The Triton KD kernel (kernels/kd.py) against the pure-torch reference.

Runs on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1), so
shapes stay small. The reference is ``fastdistill.reference.kd.kd_loss_rows``
in float64 with autograd for the gradient, scaled like the kernel's.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

import fastdistill.kernels.kd as kd  # noqa: E402
from fastdistill.reference.kd import DIVERGENCES, kd_loss_rows  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

# The interpreter evaluates masked-out lanes too (-inf - -inf etc.); numpy warns.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

IGNORE = -100
PARAM = {"jsd": 0.3, "skew_forward_kl": 0.1, "skew_reverse_kl": 0.2, "taid": 0.4}
FP32_TOL = dict(rtol=1e-5, atol=1e-6)
LOWP_TOL = dict(rtol=2e-2, atol=1e-5)


def _inputs(n, v, seed, dtype=torch.float32, tdtype=None, scale=3.0, ignored=(1,)):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g) * scale).to(dtype)
    zt = (torch.randn(n, v, generator=g) * scale).to(tdtype or dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    for i in ignored:
        if i < n:
            labels[i] = IGNORE
    return z.to(DEVICE), zt.to(DEVICE), labels.to(DEVICE)


def _reference(z, zt, labels, name, temperature, hard_weight=0.0, t2_scale=True, mean_scale=True):
    """(loss_rows, grad) of the reference in float64; grad scaled like the kernel's."""
    zz = z.detach().cpu().double().requires_grad_()
    lab = labels.cpu() if labels is not None else None
    p = PARAM.get(name, 0.5)
    rows = kd_loss_rows(
        zz, zt.detach().cpu().double(), divergence=name, temperature=temperature, beta=p, skew=p,
        taid_t=p, labels=lab, ignore_index=IGNORE, hard_weight=hard_weight, t2_scale=t2_scale,
    )
    scale = 1.0
    if mean_scale:
        count = z.shape[0] if lab is None else int((lab != IGNORE).sum())
        scale = 1.0 / max(count, 1)
    (rows.sum() * scale).backward()
    return rows.detach(), zz.grad


def _kernel(z, zt, labels, name, temperature, hard_weight=0.0, t2_scale=True, mean_scale=True, out=None):
    soft_scale = temperature * temperature if t2_scale else 1.0
    return kd.kd_forward(
        z, zt, labels, IGNORE, DIVERGENCES.index(name), PARAM.get(name, 0.5), temperature,
        hard_weight, soft_scale, mean_scale, out=out,
    )


def _tvd_near_ties(z, zt, temperature):
    """Where q and p are too close for float32 to agree with float64 on sign(q - p).

    TVD's gradient jumps there (q_j times a unit step), so such elements are
    taken from the reference; every other element still sees the K = sum q s
    that the kernel computed with its own signs.
    """
    q = torch.softmax(z.cpu().double() / temperature, -1)
    p = torch.softmax(zt.cpu().double() / temperature, -1)
    return (q - p).abs() <= 1e-5 * (q + p)


def _ties(name, z, zt, temperature):
    return _tvd_near_ties(z, zt, temperature) if name == "tvd" else None


def _check(loss, grad, ref_loss, ref_grad, z, tol, ties=None):
    assert loss.dtype == torch.float32 and loss.shape == (z.shape[0],)
    assert grad.dtype == z.dtype and grad.shape == z.shape
    assert torch.isfinite(loss).all() and torch.isfinite(grad.float()).all()
    torch.testing.assert_close(loss.cpu(), ref_loss.float(), **tol)
    got = grad.cpu().float()
    if ties is not None:
        got = torch.where(ties, ref_grad.float(), got)
    torch.testing.assert_close(got, ref_grad.float(), **tol)


def test_divergence_table_matches_reference():
    assert kd.DIVERGENCES == DIVERGENCES


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("V", [1, 7, 1000])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_fp32_matches_reference(name, V, temperature):
    z, zt, labels = _inputs(4, V, seed=V + int(10 * temperature))
    loss, grad = _kernel(z, zt, labels, name, temperature)
    ref_loss, ref_grad = _reference(z, zt, labels, name, temperature)
    _check(loss, grad, ref_loss, ref_grad, z, FP32_TOL, _ties(name, z, zt, temperature))
    assert loss[1] == 0 and (grad[1] == 0).all()  # the ignored row


@pytest.mark.parametrize("name", DIVERGENCES)
def test_large_vocab_several_blocks(name):
    # 32003 = 7 full blocks of 4096 + a masked tail.
    z, zt, labels = _inputs(2, 32003, seed=3, ignored=())
    loss, grad = _kernel(z, zt, labels, name, 2.5, hard_weight=0.25)
    ref_loss, ref_grad = _reference(z, zt, labels, name, 2.5, hard_weight=0.25)
    _check(loss, grad, ref_loss, ref_grad, z, FP32_TOL, _ties(name, z, zt, 2.5))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_hard_weight(name, temperature):
    z, zt, labels = _inputs(5, 300, seed=11, ignored=(2,))
    loss, grad = _kernel(z, zt, labels, name, temperature, hard_weight=0.4)
    ref_loss, ref_grad = _reference(z, zt, labels, name, temperature, hard_weight=0.4)
    _check(loss, grad, ref_loss, ref_grad, z, FP32_TOL, _ties(name, z, zt, temperature))


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "taid"])
def test_hard_weight_one_is_cross_entropy(name):
    z, zt, labels = _inputs(3, 50, seed=12, ignored=())
    loss, grad = _kernel(z, zt, labels, name, 2.0, hard_weight=1.0, mean_scale=False)
    ce = torch.nn.functional.cross_entropy(z.double().cpu(), labels.cpu(), reduction="none")
    torch.testing.assert_close(loss.cpu(), ce.float(), **FP32_TOL)
    onehot = torch.nn.functional.one_hot(labels.cpu(), 50).double()
    torch.testing.assert_close(grad.cpu(), (z.double().cpu().softmax(-1) - onehot).float(), **FP32_TOL)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_no_labels_sum_scale(name):
    z, zt, _ = _inputs(3, 129, seed=5)
    loss, grad = _kernel(z, zt, None, name, 1.5, t2_scale=False, mean_scale=False)
    ref_loss, ref_grad = _reference(z, zt, None, name, 1.5, t2_scale=False, mean_scale=False)
    _check(loss, grad, ref_loss, ref_grad, z, FP32_TOL, _ties(name, z, zt, 1.5))
    # mean_scale without labels divides by N.
    _, grad_mean = _kernel(z, zt, None, name, 1.5, t2_scale=False, mean_scale=True)
    torch.testing.assert_close(grad_mean, grad / 3, **FP32_TOL)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_all_rows_ignored(name):
    z, zt, labels = _inputs(3, 100, seed=6, ignored=(0, 1, 2))
    for hw in (0.0, 0.5):
        loss, grad = _kernel(z, zt, labels, name, 2.0, hard_weight=hw)
        assert torch.equal(loss, torch.zeros_like(loss))
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize(
    "dtype,tdtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
     (torch.float32, torch.float16)],
)
@pytest.mark.parametrize("name", DIVERGENCES)
def test_low_precision(name, dtype, tdtype):
    z, zt, labels = _inputs(4, 1000, seed=7, dtype=dtype, tdtype=tdtype)
    loss, grad = _kernel(z, zt, labels, name, 2.0, hard_weight=0.2)
    # The reference sees exactly the same (rounded) logits, upcast.
    ref_loss, ref_grad = _reference(z, zt, labels, name, 2.0, hard_weight=0.2)
    _check(loss, grad, ref_loss, ref_grad, z, LOWP_TOL, _ties(name, z, zt, 2.0))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("name", ["forward_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl", "taid"])
def test_teacher_minus_inf(name, temperature):
    # -inf teacher logits (e.g. vocabulary padding): p = 0 there, terms count 0, no NaN.
    z, zt, labels = _inputs(4, 1000, seed=8)
    g = torch.Generator().manual_seed(9)
    drop = torch.rand(4, 1000, generator=g) < 0.3
    drop[:, 0] = False
    drop[2, 500:] = True  # a whole -inf tail, across the block boundary of the masked tail
    zt = zt.masked_fill(drop.to(zt.device), float("-inf"))
    loss, grad = _kernel(z, zt, labels, name, temperature, hard_weight=0.1)
    ref_loss, ref_grad = _reference(z, zt, labels, name, temperature, hard_weight=0.1)
    _check(loss, grad, ref_loss, ref_grad, z, FP32_TOL, _ties(name, z, zt, temperature))


@pytest.mark.parametrize("name", ["jsd", "skew_forward_kl", "skew_reverse_kl", "reverse_kl"])
def test_extreme_logits_no_nan(name):
    # Probabilities underflow in float32: the mixture log must stay finite.
    z, zt, labels = _inputs(3, 257, seed=10, scale=60.0)
    loss, grad = _kernel(z, zt, labels, name, 1.0)
    ref_loss, ref_grad = _reference(z, zt, labels, name, 1.0)
    # Large values: compare with a relative bound on the row scale.
    _check(loss, grad, ref_loss, ref_grad, z, dict(rtol=1e-5, atol=1e-5))


@pytest.mark.parametrize("name", DIVERGENCES)
def test_large_logit_offset(name):
    # Logits around 1000: log-probabilities must not go through a rounded lse
    # (whose float32 ulp there is 6e-5). T = 1 so that u = z exactly; TAID's
    # mixture (1-t) u + t v itself rounds at this size, hence its looser bound.
    z, zt, labels = _inputs(3, 500, seed=18)
    z, zt = z + 1000.0, zt + 1000.0
    loss, grad = _kernel(z, zt, labels, name, 1.0, hard_weight=0.2)
    ref_loss, ref_grad = _reference(z, zt, labels, name, 1.0, hard_weight=0.2)
    tol = dict(rtol=2e-4, atol=1e-6) if name == "taid" else FP32_TOL
    _check(loss, grad, ref_loss, ref_grad, z, tol, _ties(name, z, zt, 1.0))


def test_tvd_ties_have_zero_subgradient():
    z, _, labels = _inputs(3, 64, seed=13)
    loss, grad = _kernel(z, z.clone(), labels, "tvd", 2.0)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_taid_endpoints():
    z, zt, labels = _inputs(3, 77, seed=14)
    fwd_loss, fwd_grad = kd.kd_forward(z, zt, labels, IGNORE, 0, 0.0, 2.0, 0.0, 4.0, True)
    loss1, grad1 = kd.kd_forward(z, zt, labels, IGNORE, 6, 1.0, 2.0, 0.0, 4.0, True)  # t = 1: the teacher
    torch.testing.assert_close(loss1, fwd_loss, **FP32_TOL)
    torch.testing.assert_close(grad1, fwd_grad, **FP32_TOL)
    loss0, grad0 = kd.kd_forward(z, zt, labels, IGNORE, 6, 0.0, 2.0, 0.0, 4.0, True)  # t = 0: itself
    torch.testing.assert_close(loss0, torch.zeros_like(loss0), rtol=0, atol=1e-6)
    torch.testing.assert_close(grad0, torch.zeros_like(grad0), rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1000, 5000])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "skew_reverse_kl", "taid"])
def test_inplace_matches_out_of_place(name, V, dtype):
    z, zt, labels = _inputs(3, V, seed=15, dtype=dtype)
    loss, grad = _kernel(z, zt, labels, name, 2.5, hard_weight=0.3)
    buf = z.clone()
    loss_ip, grad_ip = _kernel(buf, zt, labels, name, 2.5, hard_weight=0.3, out=buf)
    assert grad_ip is buf
    assert torch.equal(loss_ip, loss)
    assert torch.equal(grad_ip, grad)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_need_grad_false_is_loss_only(name):
    z, zt, labels = _inputs(3, 700, seed=19)
    loss, _ = _kernel(z, zt, labels, name, 2.0, hard_weight=0.3)
    z_before = z.clone()
    p = PARAM.get(name, 0.5)
    loss_eval, grad = kd.kd_forward(
        z, zt, labels, IGNORE, DIVERGENCES.index(name), p, 2.0, 0.3, 4.0, True, need_grad=False
    )
    assert grad.numel() == 0
    assert torch.equal(loss_eval, loss)
    assert torch.equal(z, z_before)


def test_out_buffer():
    z, zt, labels = _inputs(2, 300, seed=16)
    out = torch.full_like(z, float("nan"))
    loss, grad = _kernel(z, zt, labels, "jsd", 2.0, out=out)
    assert grad is out
    ref_loss, ref_grad = _reference(z, zt, labels, "jsd", 2.0)
    _check(loss, grad, ref_loss, ref_grad, z, FP32_TOL)


def test_empty_batch():
    z = torch.empty(0, 10, device=DEVICE)
    loss, grad = kd.kd_forward(z, z.clone(), None, IGNORE, 0, 0.0, 1.0, 0.0, 1.0, True)
    assert loss.shape == (0,) and grad.shape == (0, 10)


def test_input_errors():
    z, zt, labels = _inputs(2, 10, seed=17)
    with pytest.raises(ValueError, match="needs labels"):
        kd.kd_forward(z, zt, None, IGNORE, 0, 0.0, 1.0, 0.5, 1.0, True)
    bad = labels.clone()
    bad[0] = 10
    with pytest.raises(ValueError, match="labels"):
        kd.kd_forward(z, zt, bad, IGNORE, 0, 0.0, 1.0, 0.5, 1.0, True)
    with pytest.raises(ValueError, match="divergence"):
        kd.kd_forward(z, zt, labels, IGNORE, 7, 0.0, 1.0, 0.0, 1.0, True)
    with pytest.raises(ValueError, match="temperature"):
        kd.kd_forward(z, zt, labels, IGNORE, 0, 0.0, 0.0, 0.0, 1.0, True)
    with pytest.raises(ValueError, match="shape"):
        kd.kd_forward(z, zt[:, :5].contiguous(), labels, IGNORE, 0, 0.0, 1.0, 0.0, 1.0, True)
    with pytest.raises(TypeError, match="need_grad"):  # the C++ op's positional need_grad
        kd.kd_forward(z, zt, labels, IGNORE, 0, 0.0, 1.0, 0.0, 1.0, True, True)
    with pytest.raises(TypeError):
        kd.kd_forward(z.double(), zt.double(), labels, IGNORE, 0, 0.0, 1.0, 0.0, 1.0, True)
