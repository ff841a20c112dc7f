"""The prepared GPU check: every Triton op (and the CUDA soft-label decode) on
ONE device against the torch reference in float64 on that same device.

``make gpu-check`` runs this file with ``FASTDISTILL_TEST_DEVICE=cuda`` (and
``TRITON_INTERPRET=0``): the kernels are compiled for the GPU, the inputs
live there, and the reference runs there too, so a launcher that allocates
on the wrong device, a pointer that overflows int32 at a real vocabulary,
or a block size the interpreter forgives fails here. In the normal suite it
runs on CPU tensors through the Triton interpreter with small shapes, which
keeps the check itself tested where no GPU is lent.

Every case is (op, inputs, names that get a gradient, keywords): inputs are
made on the CPU from a seeded generator and moved to the device, so both
sides see the same values whatever the device's random generator does.
"""
import math
import os

import pytest
import torch

import fastdistill as fd
from fastdistill import diffusion as dif
from fastdistill import softlabels as sl
from fastdistill.dd.losses import gradient_match_loss

REQUESTED = os.environ.get("FASTDISTILL_TEST_DEVICE", "cpu")
DEVICE = torch.device(REQUESTED)
ON_GPU = DEVICE.type == "cuda"
F64 = torch.float64


@pytest.fixture(autouse=True)
def _requested_device_present():
    """Every case fails at once (not after a slow CUDA initialisation each)
    where the requested device is missing."""
    if ON_GPU and not torch.cuda.is_available():
        pytest.fail("FASTDISTILL_TEST_DEVICE=cuda but torch sees no CUDA device")


def test_the_requested_device_is_usable():
    """``make gpu-check`` must never pass by running nothing: a requested CUDA
    device that is missing, or Triton unavailable there, is a failure."""
    if ON_GPU:
        assert torch.cuda.is_available(), "FASTDISTILL_TEST_DEVICE=cuda but torch sees no CUDA device"
        assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET for the GPU check"
    ok, why = fd._backend.backend_status(build=False)["triton"]
    assert ok, f"the triton backend is unavailable on {DEVICE}: {why}"


# Shapes off every block size: small on CPU (the interpreter is slow), a real
# vocabulary on the GPU (V·N past 2³¹ elements would need a 139 GiB card; this
# stays at 4096 × 50257 for the loss kernels).
if ON_GPU:
    KD_ROWS, VOCAB, TOPK = 4096, 50257, 64
    OT_N, OT_M, OT_ROUNDS = 1000, 1537, 60
    FL_ROWS, FL_HIDDEN, FL_VOCAB = 1031, 257, 32003
    DIFF_SHAPE = (7, 3, 33, 29)
else:
    KD_ROWS, VOCAB, TOPK = 13, 203, 7
    OT_N, OT_M, OT_ROUNDS = 35, 70, 6
    FL_ROWS, FL_HIDDEN, FL_VOCAB = 21, 19, 203
    DIFF_SHAPE = (3, 2, 7, 5)

# (dtype, rtol): the kernels accumulate in float32; the reference is float64 on
# the same (rounded) input values.
DTYPES = [pytest.param(torch.float32, 2e-4, id="fp32"), pytest.param(torch.bfloat16, 3e-2, id="bf16"),
          pytest.param(torch.float16, 5e-3, id="fp16")]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def on_device(value, dtype=None):
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        return value.to(DEVICE)
    if isinstance(value, (list, tuple)):
        return type(value)(on_device(v, dtype) for v in value)
    if isinstance(value, sl.SoftLabels):
        return value.to(DEVICE)
    return value


def evaluate(fn, inputs: dict, diff: tuple, kw: dict, backend: str, dtype=None):
    """(output, {name: gradient}) on DEVICE; the floating inputs in ``dtype``,
    the gradient against a ramp of output gradients (1 for a scalar)."""
    ins = {}
    for k, v in inputs.items():
        v = on_device(v, dtype)
        if k in diff:
            v = v.detach().clone().requires_grad_()
        ins[k] = v
    out = fn(**ins, backend=backend, **kw)
    if isinstance(out, tuple):  # SinkhornResult: its value carries the gradient
        out = out.value
    if out.dim():
        out.backward(torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=DEVICE).view(out.shape))
    else:
        out.backward()
    return out.detach(), {k: ins[k].grad for k in diff}


def assert_close_rel(actual, expected, rtol, what):
    """Element-wise rtol with an absolute floor of rtol times the largest
    magnitude: terms that cancel to ~0 keep float32 rounding of their parts."""
    assert actual.device.type == DEVICE.type, f"{what} came back on {actual.device}, not {DEVICE}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double().cpu(), expected.double().cpu()
    scale = e.abs().max().item() if e.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * max(scale, 1e-12), equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def check(fn, inputs, diff, kw, dtype=torch.float32, rtol=2e-4, ref_kw=None):
    """triton in ``dtype`` against torch in float64 on the same rounded values."""
    got, got_g = evaluate(fn, inputs, diff, kw, "triton", dtype)
    rounded = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
               for k, v in inputs.items()}
    want, want_g = evaluate(fn, rounded, diff, {**kw, **(ref_kw or {})}, "torch", F64)
    assert_close_rel(got, want, rtol, "value")
    for k in diff:
        assert got_g[k] is not None, f"no gradient for {k}"
        assert got_g[k].dtype == on_device(inputs[k], dtype).dtype, f"grad {k} dtype {got_g[k].dtype}"
        assert_close_rel(got_g[k], want_g[k], rtol, f"grad {k}")


def logits_pair(rows, vocab, seed, scale=3.0):
    g = _gen(seed)
    return torch.randn(rows, vocab, generator=g) * scale, torch.randn(rows, vocab, generator=g) * scale


def row_labels(rows, vocab, seed):
    labels = torch.randint(0, vocab, (rows,), generator=_gen(seed))
    labels[::5] = -100
    return labels


# ----------------------------------------------------------------- kd_loss

@pytest.mark.parametrize("div", fd.DIVERGENCES)
@pytest.mark.parametrize("dtype,rtol", DTYPES)
def test_kd_loss(div, dtype, rtol):
    s, t = logits_pair(KD_ROWS, VOCAB, 1)
    kw = dict(divergence=div, beta=0.3, skew=0.2, temperature=2.0, hard_weight=0.25,
              labels=on_device(row_labels(KD_ROWS, VOCAB, 2)))
    if div == "taid":
        kw["taid_t"] = 0.6
    check(fd.kd_loss, dict(student_logits=s, teacher_logits=t), ("student_logits",), kw, dtype, rtol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kd_loss_reductions_and_noncontiguous_inputs(reduction):
    """Row views with a stride past V (a slice of a wider buffer), a
    transposed-then-viewed teacher, and every reduction."""
    s, t = logits_pair(KD_ROWS, VOCAB + 9, 3)
    s_view = on_device(s)[:, 4:VOCAB + 4]
    t_view = on_device(t.t().contiguous()).t()[:, :VOCAB]
    assert not s_view.is_contiguous() and not t_view.is_contiguous()
    kw = dict(divergence="jsd", reduction=reduction, labels=on_device(row_labels(KD_ROWS, VOCAB, 4)))
    got, got_g = evaluate(fd.kd_loss, dict(student_logits=s_view, teacher_logits=t_view),
                          ("student_logits",), kw, "triton")
    want, want_g = evaluate(fd.kd_loss, dict(student_logits=s_view.double(), teacher_logits=t_view.double()),
                            ("student_logits",), kw, "torch")
    assert_close_rel(got, want, 2e-4, "value")
    assert_close_rel(got_g["student_logits"], want_g["student_logits"], 2e-4, "grad")


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_loss_inplace_backward(div):
    """The gradient written into the logits' own storage equals the reference's."""
    s, t = logits_pair(KD_ROWS, VOCAB, 5)
    leaf = on_device(s).clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, like an LM head's output
    loss = fd.kd_loss(logits, on_device(t), divergence=div, inplace_backward=True, backend="triton")
    loss.backward()
    sd = on_device(s).double().detach().requires_grad_()
    want = fd.kd_loss(sd, on_device(t).double(), divergence=div, backend="torch")
    want.backward()
    assert_close_rel(loss.detach(), want.detach(), 2e-4, "value")
    assert_close_rel(leaf.grad, sd.grad, 2e-4, "grad")


def test_kd_loss_infinite_teacher_entries_and_nan_propagation():
    """-inf teacher logits (masked vocabulary) stay finite for forward KL, as
    the reference; a NaN in the student propagates, it is not masked."""
    s, t = logits_pair(KD_ROWS, VOCAB, 6)
    t[:, ::7] = -math.inf
    check(fd.kd_loss, dict(student_logits=s, teacher_logits=t), ("student_logits",),
          dict(divergence="forward_kl"))
    s[1, 3] = math.nan
    out = fd.kd_loss(on_device(s), on_device(t), reduction="none", backend="triton")
    assert torch.isnan(out[1]).item() and torch.isfinite(out[0]).item()


@pytest.mark.parametrize("op", ["kd", "sparse"])
def test_second_backward_is_the_reference(op):
    """create_graph=True through the triton kernels: a Hessian-vector product
    equal to the float64 reference's; with inplace_backward (the logits are
    gone) a clear error instead."""
    s, t = logits_pair(KD_ROWS, VOCAB, 33)
    ids, lp = topk_teacher(KD_ROWS, VOCAB, TOPK, 34)
    u = torch.randn(KD_ROWS, VOCAB, generator=_gen(35))

    def loss(x, backend, **kw):
        if op == "kd":
            return fd.kd_loss(x, on_device(t).to(x.dtype), divergence="jsd", backend=backend, **kw)
        return fd.sparse_kd_loss(x, on_device(ids), on_device(lp).to(x.dtype), backend=backend, **kw)

    hvps = []
    for backend, dtype in (("triton", torch.float32), ("torch", F64)):
        x = on_device(s).to(dtype).requires_grad_()
        (g,) = torch.autograd.grad(loss(x, backend), x, create_graph=True)
        (hvp,) = torch.autograd.grad((g * on_device(u).to(dtype)).sum(), x)
        hvps.append(hvp)
    assert_close_rel(hvps[0], hvps[1], 2e-4, "hessian-vector product")
    x = on_device(s).clone().requires_grad_()
    with pytest.raises(RuntimeError, match="inplace_backward"):
        torch.autograd.grad(loss(x * 1.0, "triton", inplace_backward=True), x, create_graph=True)


# ----------------------------------------------------------------- fused linear

@pytest.mark.parametrize("div", ["forward_kl", "jsd", "reverse_kl"])
@pytest.mark.parametrize("dtype,rtol", DTYPES[:2])
def test_fused_linear_kd_loss(div, dtype, rtol):
    g = _gen(7)
    h, th = torch.randn(FL_ROWS, FL_HIDDEN, generator=g), torch.randn(FL_ROWS, FL_HIDDEN, generator=g)
    w = torch.randn(FL_VOCAB, FL_HIDDEN, generator=g) / FL_HIDDEN ** 0.5
    tw = torch.randn(FL_VOCAB, FL_HIDDEN, generator=g) * 2 / FL_HIDDEN ** 0.5
    bias = torch.randn(FL_VOCAB, generator=g) * 0.1
    labels = on_device(row_labels(FL_ROWS, FL_VOCAB, 8))
    kw = dict(divergence=div, temperature=1.5, hard_weight=0.2, labels=labels,
              chunk_size=max(8, FL_ROWS // 3))  # several chunks, the last one partial
    # bf16: the head GEMMs round their outputs to bf16 before the loss reads them
    check(fd.fused_linear_kd_loss,
          dict(student_hidden=h, student_weight=w, teacher_hidden=th, teacher_weight=tw, student_bias=bias),
          ("student_hidden", "student_weight", "student_bias"), kw, dtype, rtol if dtype == torch.float32 else 6e-2)


def test_fused_linear_kd_loss_with_teacher_logits():
    g = _gen(9)
    h = torch.randn(FL_ROWS, FL_HIDDEN, generator=g)
    w = torch.randn(FL_VOCAB, FL_HIDDEN, generator=g) / FL_HIDDEN ** 0.5
    t = torch.randn(FL_ROWS, FL_VOCAB, generator=g) * 2
    check(fd.fused_linear_kd_loss, dict(student_hidden=h, student_weight=w, teacher_logits=t),
          ("student_hidden", "student_weight"), dict(divergence="forward_kl", chunk_size=max(8, FL_ROWS // 2)))


# ----------------------------------------------------------------- sparse and packed teachers

def topk_teacher(rows, vocab, k, seed):
    t = torch.randn(rows, vocab, generator=_gen(seed)) * 3
    lp, ids = torch.log_softmax(t, -1).topk(k, -1)
    return ids, lp


# tail="none" (a sampled teacher) takes forward KL only
@pytest.mark.parametrize("tail,div", [(tail, div) for tail in fd.kd.sparse.TAILS
                                      for div in ("forward_kl", "reverse_kl", "jsd")
                                      if tail != "none" or div == "forward_kl"])
@pytest.mark.parametrize("dtype,rtol", DTYPES)
def test_sparse_kd_loss(tail, div, dtype, rtol):
    s = torch.randn(KD_ROWS, VOCAB, generator=_gen(10)) * 3
    ids, lp = topk_teacher(KD_ROWS, VOCAB, TOPK, 11)
    if tail == "none":  # a sampled teacher: the kept mass renormalized
        lp = lp - torch.logsumexp(lp, -1, keepdim=True)
    kw = dict(tail=tail, divergence=div, temperature=1.5, labels=on_device(row_labels(KD_ROWS, VOCAB, 12)),
              hard_weight=0.1)
    check(fd.sparse_kd_loss, dict(student_logits=s, teacher_ids=ids, teacher_logprobs=lp),
          ("student_logits",), kw, dtype, rtol)


@pytest.mark.parametrize("method,enc", [("topk", dict(k=TOPK, value_bits=8)), ("topk", dict(k=TOPK, value_bits=16)),
                                        ("sampled", dict(n_samples=TOPK, seed=14))],
                         ids=["topk-8bit", "topk-16bit", "sampled"])
def test_packed_soft_labels(method, enc):
    s, t = logits_pair(KD_ROWS, VOCAB, 13)
    labels = sl.encode(t, method=method, **enc)
    check(sl.kd_loss, dict(student_logits=s, soft_labels=labels), ("student_logits",),
          dict(divergence="forward_kl", labels=on_device(row_labels(KD_ROWS, VOCAB, 15))))


def test_cuda_soft_label_decode_matches_the_readable_decoder():
    """The hand-written CUDA unpack (``fastdistill::softlabel_decode``, the
    `cuda` backend; what the losses call on CUDA rows) against the codec's
    readable decoder on the CPU, bit for bit (ids where the probability is
    not 0); on CPU the check has nothing to run."""
    if not ON_GPU:
        pytest.skip("the CUDA decode runs on a CUDA device only")
    status = fd._backend.backend_status()
    assert status["cuda"][0], f"the cuda backend is unavailable: {status['cuda'][1]}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastdistill::softlabel_decode", "CUDA")
    t = torch.randn(KD_ROWS, VOCAB, generator=_gen(16)) * 3
    for method, enc in (("topk", dict(k=TOPK, value_bits=8)), ("topk", dict(k=TOPK, value_bits=16)),
                        ("sampled", dict(n_samples=TOPK, seed=3))):
        labels = sl.encode(t, method=method, **enc)
        want_ids, want_lp = labels.decode()
        keep = want_lp > -math.inf
        rows, layout = labels.rows().to(DEVICE), list(labels.codec.layout())
        ids, lp = torch.ops.fastdistill.softlabel_decode(rows, layout)
        assert ids.is_cuda and lp.is_cuda
        assert torch.equal(lp.cpu(), want_lp), method
        assert torch.equal(ids.cpu()[keep], want_ids[keep]), method
        ids2, lp2, _ = fd.kd.sparse.decode_packed(rows, layout)  # the losses' path
        assert torch.equal(lp2.cpu(), want_lp) and torch.equal(ids2.cpu()[keep], want_ids[keep])


# ----------------------------------------------------------------- optimal transport

def simplex(*shape, zeros=0, seed=0):
    w = torch.rand(*shape, generator=_gen(seed), dtype=F64) + 0.1
    if zeros:
        w[..., 1:1 + zeros] = 0
    return (w / w.sum(-1, keepdim=True)).float()


@pytest.mark.parametrize("batch", [(), (2,)], ids=["single", "batched"])
@pytest.mark.parametrize("dtype,rtol", DTYPES)
def test_sinkhorn_on_a_given_cost(batch, dtype, rtol):
    C = torch.rand(*batch, OT_N, OT_M, generator=_gen(17)) * 2
    a, b = simplex(*batch, OT_N, zeros=3, seed=18), simplex(*batch, OT_M, zeros=2, seed=19)
    kw = dict(epsilon=0.1, n_iters=OT_ROUNDS)
    # the weights stay float32 (cpp/triton take float32 weights); only the cost is lowered
    got, got_g = evaluate(fd.ot.sinkhorn, dict(cost=C.to(dtype), a=a, b=b), ("cost", "a", "b"), kw, "triton")
    want, want_g = evaluate(fd.ot.sinkhorn, dict(cost=C.to(dtype), a=a, b=b), ("cost", "a", "b"), kw,
                            "torch", F64)
    assert_close_rel(got, want, 2e-4, "value")
    assert_close_rel(got_g["a"], want_g["a"], 2e-4, "grad a")
    assert_close_rel(got_g["b"], want_g["b"], 2e-4, "grad b")
    assert got_g["cost"].dtype == dtype
    assert_close_rel(got_g["cost"], want_g["cost"], max(rtol, 2e-4), "grad cost")


def test_sinkhorn_tiny_epsilon_plan_and_potentials():
    """ε = 1e-3: the linear-domain kernel would underflow; the log-domain plan
    and potentials stay finite and match the float64 reference."""
    C = torch.rand(2, OT_N, OT_M, generator=_gen(20)) * 2
    a, b = simplex(2, OT_N, seed=21), simplex(2, OT_M, seed=22)
    kw = dict(epsilon=1e-3, n_iters=OT_ROUNDS * 3, return_plan=True)
    got = fd.ot.sinkhorn(on_device(C), on_device(a), on_device(b), backend="triton", **kw)
    want = fd.ot.sinkhorn(on_device(C).double(), on_device(a).double(), on_device(b).double(),
                          backend="torch", **kw)
    for name in ("f", "g"):
        assert_close_rel(getattr(got, name), getattr(want, name), 1e-4, name)
    assert torch.isfinite(got.plan).all()
    assert_close_rel(got.plan, want.plan, 5e-3, "plan")


def cloud_case(batch, seed):
    g = _gen(seed)
    x = torch.randn(*batch, OT_N, 5, generator=g)
    y = torch.randn(*batch, OT_M, 5, generator=g) * 0.8 + 0.3
    return dict(x=x, y=y, a=simplex(*batch, OT_N, seed=seed + 1), b=simplex(*batch, OT_M, seed=seed + 2))


@pytest.mark.parametrize("mode", ["online", "tensorized"])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("batch", [(), (2,)], ids=["single", "batched"])
def test_sinkhorn_divergence(mode, p, batch):
    check(fd.ot.sinkhorn_divergence, cloud_case(batch, 23), ("x", "y", "a", "b"),
          dict(epsilon=0.1, p=p, n_iters=OT_ROUNDS, mode=mode), ref_kw=dict(mode="auto"))


@pytest.mark.parametrize("mode", ["online", "tensorized"])
@pytest.mark.parametrize("p", [1, 2])
def test_sinkhorn_divergence_scaling_and_not_debiased(mode, p):
    """ε-scaling from the clouds' diameter, the schedule on the device (online:
    each half-step on clouds rescaled by ε^(1/p))."""
    check(fd.ot.sinkhorn_divergence, cloud_case((), 27), ("x", "y"),
          dict(epsilon=0.05, p=p, n_iters=max(OT_ROUNDS, 14), scaling=0.5, debias=False, mode=mode),
          ref_kw=dict(mode="auto"))


@pytest.mark.parametrize("cost", fd.ot.KD_COSTS)
@pytest.mark.parametrize("gradient", fd.ot.KD_GRADIENTS)
def test_sinkhorn_kd_loss(cost, gradient):
    rows = min(KD_ROWS, 509)
    s, t = logits_pair(rows, min(VOCAB, 4099), 30)
    check(fd.ot.sinkhorn_kd_loss, dict(student_logits=s, teacher_logits=t), ("student_logits",),
          dict(cost=cost, gradient=gradient, n_iters=10, labels=on_device(row_labels(rows, min(VOCAB, 4099), 31))),
          rtol=1e-3)


# ----------------------------------------------------------------- dataset distillation

@pytest.mark.parametrize("metric", ["dc", "cos", "mse"])
@pytest.mark.parametrize("dtype,rtol", DTYPES[:2])
def test_gradient_match_loss(metric, dtype, rtol):
    """Two groups of a conv + linear net's gradients (odd sizes)."""
    g = _gen(32)
    width = 37 if ON_GPU else 5
    shapes = [(width, 3, 3, 3), (width,), (10, width * 7), (10,)]
    grads_a = [[torch.randn(*s, generator=g) for s in shapes] for _ in range(3)]
    grads_b = [[torch.randn(*s, generator=g) * 0.5 + x for s, x in zip(shapes, row)] for row in grads_a]
    got_in = [[on_device(t, dtype).detach().clone().requires_grad_() for t in row] for row in grads_a]
    got = gradient_match_loss(got_in, [[on_device(t, dtype) for t in row] for row in grads_b], metric,
                              backend="triton")
    got.backward()
    want_in = [[on_device(t, dtype).double().detach().requires_grad_() for t in row] for row in grads_a]
    want = gradient_match_loss(want_in, [[on_device(t, dtype).double() for t in row] for row in grads_b],
                               metric, backend="torch")
    want.backward()
    assert_close_rel(got.detach(), want.detach(), rtol, "value")
    for ga, wa in zip(got_in, want_in):
        for x, y in zip(ga, wa):
            if metric == "dc" and x.dim() == 1:  # 1-D parameters take no part in "dc"
                assert x.grad is None or not x.grad.any()
                continue
            assert x.grad.dtype == dtype
            assert_close_rel(x.grad, y.grad, rtol, "grad")


# ----------------------------------------------------------------- diffusion

SCHEDULE = dif.NoiseSchedule("cosine", 1000)


def timesteps(batch, seed, high=1000):
    t = torch.randint(0, high, (batch,), generator=_gen(seed))
    t[0] = high - 1
    return t


@pytest.mark.parametrize("dtype,rtol", DTYPES)
def test_dmd_loss(dtype, rtol):
    g = _gen(40)
    x = torch.randn(DIFF_SHAPE, generator=g)
    real = x + 0.5 * torch.randn(DIFF_SHAPE, generator=g)
    fake = real + 0.3 * torch.randn(DIFF_SHAPE, generator=g)
    w = torch.rand(DIFF_SHAPE[0], generator=g) + 0.5
    check(dif.dmd_loss, dict(x=x, x0_real=real, x0_fake=fake), ("x",), dict(weight=on_device(w)), dtype, rtol)


@pytest.mark.parametrize("prediction", dif.ops.PREDICTIONS)
@pytest.mark.parametrize("weighting", dif.ops.WEIGHTINGS)
def test_denoising_loss(prediction, weighting):
    g = _gen(41)
    ins = dict(pred=torch.randn(DIFF_SHAPE, generator=g), x0=torch.randn(DIFF_SHAPE, generator=g),
               noise=torch.randn(DIFF_SHAPE, generator=g))
    check(dif.denoising_loss, ins, ("pred",),
          dict(t=on_device(timesteps(DIFF_SHAPE[0], 42)), schedule=SCHEDULE, prediction=prediction,
               weighting=weighting, reduction="none"))


@pytest.mark.parametrize("metric", dif.ops.METRICS)
def test_consistency_loss(metric):
    g = _gen(43)
    c_skip, c_out = SCHEDULE.consistency_scalings(timesteps(DIFF_SHAPE[0], 44, 100) - 1)
    ins = dict(pred=torch.randn(DIFF_SHAPE, generator=g), target=torch.randn(DIFF_SHAPE, generator=g),
               x_t=torch.randn(DIFF_SHAPE, generator=g))
    check(dif.consistency_loss, ins, ("pred",),
          dict(metric=metric, c_skip=on_device(c_skip), c_out=on_device(c_out),
               weight=on_device(torch.rand(DIFF_SHAPE[0], generator=g) + 0.5)))


@pytest.mark.parametrize("prediction", dif.ops.PREDICTIONS)
@pytest.mark.parametrize("guidance", [None, 3.0], ids=["plain", "cfg3"])
def test_ddim_step(prediction, guidance):
    g = _gen(45)
    t = timesteps(DIFF_SHAPE[0], 46)
    ins = dict(x_t=torch.randn(DIFF_SHAPE, generator=g), pred=torch.randn(DIFF_SHAPE, generator=g))
    kw = dict(t=on_device(t), t_prev=on_device((t - 37).clamp(min=-1)), schedule=SCHEDULE,
              prediction=prediction)
    diff = ("x_t", "pred")
    if guidance is not None:
        ins["uncond"] = torch.randn(DIFF_SHAPE, generator=g)
        kw["guidance_scale"] = guidance
        diff += ("uncond",)
    # the step's terms cancel: the floor is the size of A·x_t + B·pred, ~|x|
    check(dif.ddim_step, ins, diff, kw, rtol=1e-4)
