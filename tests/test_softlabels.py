"""Soft-label codecs and the loss from packed rows: sizes, fidelity, the C++
unpack against the readable decoder, and softlabels.kd_loss against the sparse
reference on the decoded labels (values and gradients) on every backend."""
import math

import pytest
import torch

import fastdistill as fd
from fastdistill import softlabels as sl
from fastdistill._backend import load_extension

from conftest import fused_backends

ALL_BACKENDS = ["torch"] + fused_backends()
CODECS = [dict(k=16, value_bits=8), dict(k=16, value_bits=16),
          dict(method="sampled", n_samples=24, seed=3)]
CODEC_IDS = ["topk8", "topk16", "sampled"]

pytestmark = [  # the Triton interpreter evaluates masked-off lanes too
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def teacher_logits(n, v, *, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * scale


def kl_bins(lp_exact_k, tail_exact, lp_dec_k, tail_dec):
    """KL(exact ‖ decoded) over the k + 1 bins (top-k and tail), per row."""
    p = torch.cat([lp_exact_k.exp(), tail_exact.unsqueeze(-1)], -1)
    q = torch.cat([lp_dec_k.double().exp(), tail_dec.double().unsqueeze(-1)], -1)
    terms = torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p))
    return terms.sum(-1)


# ----------------------------------------------------------------- the codec

@pytest.mark.parametrize("V", [1, 3, 1000, 49152, 128256])
@pytest.mark.parametrize("bits", [8, 16])
def test_row_size_bound(V, bits):
    k = min(32, V)
    codec = sl.Codec("topk", V, k, bits, 1.0)
    bound = math.ceil(k * (math.ceil(math.log2(V)) + bits) / 8) + 8 if V > 1 else math.ceil(k * (1 + bits) / 8) + 8
    assert codec.row_bytes <= bound
    if V == 49152 and bits == 8:
        assert codec.row_bytes == 100  # 4 tail + 32 codes + 64 id bytes; dense fp16: 98,304


@pytest.mark.parametrize("kw", CODECS, ids=CODEC_IDS)
@pytest.mark.parametrize("V", [7, 1000, 49152])
def test_encode_decode_round_trip(kw, V):
    t = teacher_logits(5, V, seed=V)
    t[1, :3] = -math.inf  # masked tokens
    if "k" in kw:
        kw = dict(kw, k=min(kw["k"], V))
    labels = sl.encode(t, temperature=1.7, **kw)
    k = labels.codec.k
    assert labels.shape == (5,) and labels.nbytes == 5 * labels.codec.row_bytes
    ids, lp = labels.decode()
    assert ids.shape == lp.shape == (5, k) and ids.dtype == torch.int64 and lp.dtype == torch.float32
    exact = torch.log_softmax(t / 1.7, -1)
    if labels.codec.method == "topk":
        top, top_ids = exact.topk(k, -1)
        keep = top > -math.inf  # a masked token's id is not stored (probability 0)
        assert torch.equal(ids[keep], top_ids[keep]) and torch.equal(lp > -math.inf, keep)
        tail = (1 - top.exp().sum(-1)).clamp_min(0) if k < V else torch.zeros(5, dtype=torch.float64)
        torch.testing.assert_close(labels.tail_mass().double(), tail, rtol=1e-6, atol=1e-7)
        # decoded masses + tail sum to 1
        torch.testing.assert_close(lp.double().exp().sum(-1) + labels.tail_mass().double(),
                                   torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-5)
        kl = kl_bins(top, tail, lp, labels.tail_mass())
        assert kl.max() <= (1e-3 if labels.codec.value_bits == 8 else 1e-5), kl
    else:
        finite = lp > -math.inf
        counts = (lp.double().exp() * k).round()
        assert counts.sum(-1).eq(k).all() and (counts[finite] >= 1).all()
        assert (exact.gather(-1, torch.where(finite, ids, 0))[finite] > -math.inf).all()
        for r in range(5):  # distinct drawn ids
            assert ids[r][finite[r]].unique().numel() == int(finite[r].sum())
    # the C++ unpack equals the readable decoder exactly
    if load_extension():
        i2, l2 = torch.ops.fastdistill.softlabel_decode(labels.rows(), list(labels.codec.layout()))
        keep = lp > -math.inf
        assert torch.equal(l2, lp) and torch.equal(i2[keep], ids[keep])


def test_eight_bit_kl_bound_on_peaked_and_flat_rows():
    """The 8-bit code's KL over the k+1 bins stays under its bound (and the
    issue's 1e-3 nats) whatever the row's log-prob range: peaked rows (one
    token near 1), flat rows, wide ranges, one token and many tiny ones."""
    V, k = 5000, 64
    rows = [teacher_logits(8, V, seed=1, scale=0.1), teacher_logits(8, V, seed=2, scale=8.0),
            teacher_logits(8, V, seed=3, scale=3.0)]
    peaked = teacher_logits(8, V, seed=4)
    peaked[:, 0] += 25.0
    rows.append(peaked)
    # one dominant token and 63 tiny ones (P/P_max ~ 1e-7): the case where a
    # square-root code's smallest step inflated every tiny entry (~9e-4 nats)
    spike = torch.full((8, V), -40.0, dtype=torch.float64)
    spike[:, :k] = -16.0 + torch.rand(8, k, generator=torch.Generator().manual_seed(5))
    spike[:, 0] = 0.0
    rows.append(spike)
    t = torch.cat(rows)
    labels = sl.encode(t, k=k, value_bits=8)
    top, _ = torch.log_softmax(t, -1).topk(k, -1)
    tail = (1 - top.exp().sum(-1)).clamp_min(0)
    _, lp = labels.decode()
    kl = kl_bins(top, tail, lp, labels.tail_mass())
    # the code's worst case at k = 64: 2·(1/255)²·√64 ≈ 2.5e-4 nats
    assert kl.max() <= 2.5e-4, kl.max()


def test_container_indexing_state_dict_to_dense_and_device():
    t = teacher_logits(12, 300).reshape(3, 4, 300)
    labels = sl.encode(t, k=8, value_bits=8, temperature=2.0)
    assert labels.shape == (3, 4) and len(labels) == 3
    ids, lp = labels.decode()
    sub = labels[1, 2:]
    assert sub.shape == (2,)
    assert torch.equal(sub.decode()[0], ids[1, 2:]) and torch.equal(sub.decode()[1], lp[1, 2:])
    back = sl.SoftLabels.from_state_dict(labels.state_dict())
    assert back.codec == labels.codec and torch.equal(back.data, labels.data)
    assert all(isinstance(v, torch.Tensor) for v in labels.state_dict().values())
    dense = labels.to_dense(310)
    assert dense.shape == (3, 4, 310)
    assert torch.equal(dense.gather(-1, ids), lp)
    assert torch.isinf(dense).sum() == 12 * (310 - 8)
    assert labels.to("cpu").device.type == "cpu"
    assert "topk" in repr(labels)


def test_encode_bad_input():
    t = torch.randn(4, 50)
    with pytest.raises(ValueError, match="k must be in"):
        sl.encode(t, k=51)
    with pytest.raises(TypeError, match="k must be an int"):
        sl.encode(t)
    with pytest.raises(ValueError, match="value_bits"):
        sl.encode(t, k=4, value_bits=4)
    with pytest.raises(ValueError, match="method"):
        sl.encode(t, method="dense", k=4)
    with pytest.raises(ValueError, match="n_samples"):
        sl.encode(t, method="sampled", n_samples=0)
    with pytest.raises(ValueError, match="value_bits applies"):
        sl.encode(t, method="sampled", n_samples=8, value_bits=8)
    with pytest.raises(ValueError, match="temperature"):
        sl.encode(t, k=4, temperature=0.0)
    bad = t.clone()
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        sl.encode(bad, k=4)
    with pytest.raises(ValueError, match="at least one finite"):
        sl.encode(torch.full((2, 5), -math.inf), k=2)
    with pytest.raises(TypeError, match="logits"):
        sl.encode(torch.zeros(2, 5, dtype=torch.long), k=2)
    with pytest.raises(ValueError, match="uint8"):
        sl.SoftLabels(sl.Codec("topk", 50, 4, 8, 1.0), torch.zeros(3, 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match="format"):
        sl.Codec.from_json('{"format": 99, "method": "topk"}')


# ----------------------------------------------------------------- the loss

def loss_and_grad(fn, student, *args, **kw):
    x = student.detach().clone().requires_grad_()
    loss = fn(x * 1.0, *args, **kw)  # a non-leaf, as an LM head gives
    (loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)).sum().backward() \
        if loss.dim() else loss.backward()
    return loss.detach(), x.grad


def assert_close_rel(a, e, rtol, what):
    scale = max(e.abs().max().item(), 1e-2)
    torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=rtol * scale,
                               msg=lambda m: f"{what}: {m}")


LOSS_CASES = [(kw, div) for kw in CODECS[:2]
              for div in ("forward_kl", "reverse_kl", "jsd", "skew_reverse_kl")]
LOSS_CASES.append((CODECS[2], "forward_kl"))  # sampled labels (tail 'none'): forward KL


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kw,div", LOSS_CASES,
                         ids=[f"{CODEC_IDS[CODECS.index(kw)]}-{div}" for kw, div in LOSS_CASES])
def test_loss_equals_sparse_reference_on_decoded(backend, kw, div):
    V = 1003
    t = teacher_logits(9, V, seed=5)
    labels = sl.encode(t, temperature=2.0, **kw)
    ids, lp = labels.decode()
    s = torch.randn(9, V, generator=torch.Generator().manual_seed(6)) * 2
    y = torch.randint(0, V, (9,), generator=torch.Generator().manual_seed(7))
    y[4] = -100
    common = dict(divergence=div, labels=y, hard_weight=0.25, beta=0.3, skew=0.2)
    got = loss_and_grad(sl.kd_loss, s, labels, backend=backend, **common)
    want = loss_and_grad(fd.sparse_kd_loss, s.double(), ids, lp.double(), tail=labels.codec.tail,
                         temperature=2.0, backend="torch", **common)
    assert_close_rel(got[0], want[0], 1e-5, "loss")
    assert_close_rel(got[1], want[1], 1e-5, "grad")
    assert (got[1][4] == 0).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sampled_equals_dense_kd_loss_on_the_decoded_distribution(backend):
    """tail='none' on sampled labels is the dense forward KL against the decoded
    distribution (zero off the drawn ids): values and gradients."""
    V = 517
    t = teacher_logits(6, V, seed=8)
    labels = sl.encode(t, method="sampled", n_samples=40, seed=1)
    s = torch.randn(6, V, generator=torch.Generator().manual_seed(9)) * 2
    got = loss_and_grad(sl.kd_loss, s, labels, backend=backend, reduction="sum")
    want = loss_and_grad(fd.kd_loss, s.double(), labels.to_dense().double(), backend="torch",
                         reduction="sum")
    assert_close_rel(got[0], want[0], 1e-5, "loss")
    assert_close_rel(got[1], want[1], 1e-5, "grad")


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("kw", CODECS, ids=CODEC_IDS)
def test_bf16_3d_noncontiguous_reductions_and_inplace(backend, kw):
    V = 300
    t = teacher_logits(12, V, seed=10).reshape(3, 4, V)
    labels = sl.encode(t, **kw)
    ids, lp = labels.decode()
    base = torch.randn(4, 3, V, generator=torch.Generator().manual_seed(11)).transpose(0, 1)
    for reduction in ("mean", "sum", "none"):
        got = loss_and_grad(sl.kd_loss, base.bfloat16(), labels, backend=backend,
                            reduction=reduction)
        want = loss_and_grad(fd.sparse_kd_loss, base.double(), ids, lp.double(),
                             tail=labels.codec.tail, backend="torch", reduction=reduction)
        assert got[1].dtype == torch.bfloat16
        assert_close_rel(got[0], want[0], 2e-2, f"bf16 loss {reduction}")
        assert_close_rel(got[1], want[1], 2e-2, f"bf16 grad {reduction}")
    plain = loss_and_grad(sl.kd_loss, base, labels, backend=backend)
    inplace = loss_and_grad(sl.kd_loss, base, labels, backend=backend, inplace_backward=True)
    assert torch.equal(plain[0], inplace[0]) and torch.equal(plain[1], inplace[1])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_no_grad_evaluation_matches(backend):
    labels = sl.encode(teacher_logits(5, 200), k=8, value_bits=8)
    s = torch.randn(5, 200)
    with torch.no_grad():
        got = sl.kd_loss(s, labels, backend=backend, reduction="none")
    want = sl.kd_loss(s.double(), labels, backend="torch", reduction="none")
    assert_close_rel(got, want, 1e-5, "eval rows")


def test_loss_bad_input():
    labels = sl.encode(teacher_logits(4, 100), k=8, value_bits=8, temperature=2.0)
    s = torch.randn(4, 100)
    with pytest.raises(ValueError, match=r"vocabulary \(101\) differs"):
        sl.kd_loss(torch.randn(4, 101), labels)
    with pytest.raises(ValueError, match="leading shape"):
        sl.kd_loss(torch.randn(5, 100), labels)
    with pytest.raises(ValueError, match="temperature=1.0 differs"):
        sl.kd_loss(s, labels, temperature=1.0)
    with pytest.raises(TypeError, match="SoftLabels"):
        sl.kd_loss(s, labels.decode())
    with pytest.raises(ValueError, match="taid"):
        sl.kd_loss(s, labels, divergence="taid")
    with pytest.raises(ValueError, match="not supported with tail='none'"):
        sl.kd_loss(s, labels, tail="none", divergence="reverse_kl")
    sampled = sl.encode(teacher_logits(4, 100), method="sampled", n_samples=8)
    with pytest.raises(ValueError, match="no tail mass"):
        sl.kd_loss(s, sampled, tail="bucket")
    with pytest.raises(ValueError, match="leaf"):
        sl.kd_loss(s.clone().requires_grad_(), labels, inplace_backward=True, backend="cpp")


@pytest.mark.skipif(not load_extension(), reason="cpp backend unavailable")
def test_corrupt_packed_row_is_a_clear_error():
    labels = sl.encode(teacher_logits(3, 100), k=4, value_bits=8)
    data = labels.rows().clone()
    c = labels.codec
    data[1, c.ids_offset:] = 0xFF  # ids of all ones: 127 ≥ V = 100
    bad = sl.SoftLabels(c, data)
    with pytest.raises(ValueError, match="row 1 entry 0: id 127 is not below the vocabulary"):
        sl.kd_loss(torch.randn(3, 100), bad, backend="cpp")
    data = labels.rows().clone()
    data[2, 0:4] = torch.tensor([0, 0, 0x80, 0x7F], dtype=torch.uint8)  # tail = +inf... not in [0, 1]
    with pytest.raises(ValueError, match="row 2: tail mass"):
        sl.kd_loss(torch.randn(3, 100), sl.SoftLabels(c, data), backend="cpp")


@pytest.mark.parametrize("kw", CODECS, ids=CODEC_IDS)
def test_single_row_and_empty_labels_decode(kw):
    t = teacher_logits(3, 200)
    labels = sl.encode(t, **kw)
    ids, lp = labels.decode()
    one = labels[1]  # a one-row slice of a bigger tensor (row stride kept)
    assert one.shape == ()
    assert torch.equal(one.decode()[0], ids[1]) and torch.equal(one.decode()[1], lp[1])
    assert torch.equal(sl.encode(t[:1], **kw).decode()[1], lp[:1])
    assert one.tail_mass().shape == ()
    empty = sl.encode(t[:0], **kw)
    assert empty.shape == (0,) and empty.decode()[0].shape == (0, labels.codec.k)
