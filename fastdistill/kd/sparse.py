"""KD from a sparse teacher: ``sparse_kd_loss`` and ``sample_teacher``.

A sparse teacher gives, per row (token), K token ids and their
log-probabilities instead of V logits: a cached top-k, or ``sample_teacher``'s
draws. The student row stays dense. The fused backends read each student row
twice (log-sum-exp, then the gradient) and gather K entries; they compute the
gradient in the forward pass, and no dense teacher row or N×V temporary
exists besides the gradient itself. The math is ``shared/notes/kd-math.md``
§3; the readable specification is ``fastdistill/reference/sparse.py``.
"""
from __future__ import annotations

import math

import torch

from .. import _checks
from .._backend import load_extension, resolve
from ..reference import kd as ref_kd
from ..reference import sparse as ref
from ..softlabels.codec import METHODS, Codec, SoftLabels, sample_counts
from .options import (DIVERGENCES, check_inplace_target, kd_options, no_double_backward,
                      scaled_gradient, student_labels)

TAILS = ref.TAILS
SUPPORTED = ref.SUPPORTED
LOGPROB_SUM_TOL = ref.LOGPROB_SUM_TOL

def reference_keywords(div, tail, param, temperature, ignore_index, hard_weight, soft_scale) -> dict:
    """The keywords of ``reference.sparse.sparse_kd_loss_rows`` from the fused ops' arguments."""
    name = DIVERGENCES[div]
    return dict(tail=TAILS[tail], divergence=name, temperature=temperature,
                beta=param if name == "jsd" else 0.5,
                skew=param if name.startswith("skew") else 0.1,
                ignore_index=ignore_index, hard_weight=hard_weight,
                t2_scale=soft_scale != 1.0)  # soft_scale is T² or 1, and T² = 1 when T = 1


def _reference_forward(student, ids, logprobs, labels, ignore_index, div, tail, param, temperature,
                       hard_weight, soft_scale, mean_scale, need_grad, tail_mass=None):
    """The fused contract computed by the reference, the gradient by autograd."""
    kw = reference_keywords(div, tail, param, temperature, ignore_index, hard_weight, soft_scale)
    with torch.enable_grad():
        x = student.detach().requires_grad_(need_grad)
        rows = ref.sparse_kd_loss_rows(x, ids, logprobs.detach(), labels=labels,
                                       tail_mass=tail_mass, **kw)
        if not need_grad:
            return rows.detach(), student.new_empty(0)
        total = ref_kd.reduce_rows(rows, labels, ignore_index, "mean" if mean_scale else "sum")
        (grad,) = torch.autograd.grad(total, x)
    return rows.detach(), grad


def _sparse_forward(backend, student, ids, logprobs, labels, ignore_index, div, tail, param,
                    temperature, hard_weight, soft_scale, mean_scale, need_grad, inplace=False,
                    layout=None):
    """(loss_rows, grad) of one backend: the fused op's contract.

    ``student`` (N, V) contiguous; ``ids`` (N, K) integer (converted to int64
    here if needed); ``logprobs`` (N, K) floating (-inf at padding; the
    kernels read them as float32, or float64 on cpp); ``labels`` (N,) int64 or
    None. ``div`` indexes ``DIVERGENCES``, ``tail`` indexes ``TAILS``,
    ``param`` is beta (jsd) or skew (skew_*), ``soft_scale`` is T² or 1.
    ``loss_rows`` is float32 (N,) (0 at ignored rows); ``grad`` is
    d(Σ rows)/d student (divided by the number of kept rows with
    ``mean_scale``) in the student's dtype, or empty without ``need_grad``.
    With ``inplace`` (fused backends) the gradient is written over
    ``student`` and ``grad`` is ``student`` itself. With ``layout``
    (``Codec.layout()``) the teacher is packed soft labels: ``ids`` is the
    uint8 rows (N, row_bytes), ``logprobs`` is None, and the cpp and triton
    kernels unpack them themselves (torch decodes them first). No argument checks beyond
    what the kernels need: the public function checks. backend="torch"
    computes rows with the reference and the gradient with autograd.
    """
    if layout is not None:
        if backend == "cpp":
            return _packed_cpp_forward(student, ids, layout, labels, ignore_index, div, tail, param,
                                       temperature, hard_weight, soft_scale, mean_scale, need_grad,
                                       inplace)
        if backend == "triton":
            from ..kernels import sparse as triton_sparse

            return triton_sparse.sparse_kd_forward(
                student, ids, None, labels, ignore_index, div, tail, param, temperature,
                hard_weight, soft_scale, mean_scale, need_grad=need_grad,
                out=student if inplace and need_grad else None, layout=layout)
        ids, logprobs, tail_mass = decode_packed(ids, layout)
    else:
        tail_mass = None
    if ids.dtype != torch.int64:
        ids = ids.to(torch.int64)
    if backend in ("torch", "cuda"):  # cuda: this family's GPU path is triton
        rows, grad = _reference_forward(student, ids, logprobs, labels, ignore_index, div, tail,
                                        param, temperature, hard_weight, soft_scale, mean_scale,
                                        need_grad, tail_mass)
        if inplace and need_grad:  # one behaviour on every backend: the logits hold the gradient
            return rows, student.copy_(grad)
        return rows, grad
    if not ids.is_contiguous():
        ids = ids.contiguous()
    if backend == "cpp":
        if logprobs.dtype not in (torch.float32, torch.float64):
            logprobs = logprobs.float()
        if not logprobs.is_contiguous():
            logprobs = logprobs.contiguous()
        if not load_extension():  # loaded once per process; a no-op after that
            raise RuntimeError("backend='cpp' is unavailable (see fastdistill.backends())")
        if inplace and need_grad:
            rows = torch.ops.fastdistill.sparse_kd_forward_inplace(
                student, ids, logprobs, labels, ignore_index, div, tail, param, temperature,
                hard_weight, soft_scale, mean_scale)
            return rows, student
        return torch.ops.fastdistill.sparse_kd_forward(
            student, ids, logprobs, labels, ignore_index, div, tail, param, temperature,
            hard_weight, soft_scale, mean_scale, need_grad)
    from ..kernels import sparse as triton_sparse

    if logprobs.dtype != torch.float32:
        logprobs = logprobs.float()
    return triton_sparse.sparse_kd_forward(
        student, ids, logprobs.contiguous(), labels, ignore_index, div, tail, param, temperature,
        hard_weight, soft_scale, mean_scale, need_grad=need_grad,
        out=student if inplace and need_grad else None)


def decode_packed(data, layout):
    """(ids, logprobs, tail_mass) of packed rows (tail_mass None without a stored
    tail): the CUDA unpack on a GPU build, else the readable decoder of the codec."""
    method, V, k, value_bits = layout[:4]
    packed = SoftLabels(Codec(METHODS[method], V, k, value_bits, 1.0), data)  # T: not needed
    tail_mass = packed.tail_mass() if packed.codec.has_tail else None
    if data.is_cuda and load_extension() and torch._C._dispatch_has_kernel_for_dispatch_key(
            "fastdistill::softlabel_decode", "CUDA"):
        return (*torch.ops.fastdistill.softlabel_decode(data, list(layout)), tail_mass)
    return (*packed.decode(), tail_mass)


def _packed_cpp_forward(student, data, layout, labels, ignore_index, div, tail, param, temperature,
                        hard_weight, soft_scale, mean_scale, need_grad, inplace):
    if not load_extension():
        raise RuntimeError("backend='cpp' is unavailable (see fastdistill.backends())")
    ops = torch.ops.fastdistill
    if inplace and need_grad:
        rows = ops.softlabel_kd_forward_inplace(student, data, list(layout), labels, ignore_index,
                                                div, tail, param, temperature, hard_weight,
                                                soft_scale, mean_scale)
        return rows, student
    return ops.softlabel_kd_forward(student, data, list(layout), labels, ignore_index, div, tail,
                                    param, temperature, hard_weight, soft_scale, mean_scale,
                                    need_grad)


class _FusedSparseKD(torch.autograd.Function):
    """Autograd around a fused kernel: the gradient is computed in forward.
    Differentiated twice, backward recomputes the gradient from the reference
    with differentiable torch ops (exact Hessian-vector products), as
    ``kd._FusedKD`` does."""

    @staticmethod
    def forward(ctx, student, ids, logprobs, labels, backend, ignore_index, div, tail, param,
                temperature, hard_weight, soft_scale, reduction, inplace, layout=None):
        version = student._version if inplace else 0
        rows, grad = _sparse_forward(backend, student, ids, logprobs, labels, ignore_index, div,
                                     tail, param, temperature, hard_weight, soft_scale,
                                     reduction == "mean", True, inplace, layout)
        if inplace and student._version == version:
            # the logits now hold the gradient: any other op that saved them
            # for its backward must fail autograd's version check
            torch.autograd.graph.increment_version(student)
        if inplace:
            ctx.save_for_backward(grad)
        else:
            ctx.save_for_backward(grad, student, ids, logprobs, labels)
        ctx.reduction = reduction
        ctx.inplace = inplace
        ctx.layout = layout
        ctx.keywords = reference_keywords(div, tail, param, temperature, ignore_index, hard_weight,
                                          soft_scale)
        return ref_kd.reduce_rows(rows, labels, ignore_index, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph: an exact, differentiable gradient
            if ctx.inplace:
                raise no_double_backward("sparse_kd_loss" if ctx.layout is None
                                         else "softlabels.kd_loss")
            _, student, ids, logprobs, labels = ctx.saved_tensors
            tail_mass = None
            if ctx.layout is not None:
                ids, logprobs, tail_mass = decode_packed(ids, ctx.layout)
            kw = ctx.keywords
            rows = ref.sparse_kd_loss_rows(student, ids.to(torch.int64), logprobs, labels=labels,
                                           tail_mass=tail_mass, **kw)
            out = ref_kd.reduce_rows(rows, labels, kw["ignore_index"], ctx.reduction)
            (g,) = torch.autograd.grad(out, student, grad_out, create_graph=True)
            return (g,) + (None,) * 14
        grad = ctx.saved_tensors[0]
        return (scaled_gradient(grad, grad_out, ctx.reduction, ctx.inplace),) + (None,) * 14


def _integer_tensor(name: str, x) -> torch.Tensor:
    _checks.tensor(name, x)
    if x.dtype.is_floating_point or x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be an integer tensor (int64 or int32), got {x.dtype}")
    return x


def _check_teacher_values(ids, lp, V, tail, keep):
    """Value checks on the rows that count (``keep``, or all): the kernels rely on them."""
    if keep is not None:
        ids, lp = ids[keep], lp[keep]
    if lp.numel() == 0:
        return
    if bool(torch.isnan(lp).any()) or bool((lp == math.inf).any()):
        raise ValueError("teacher_logprobs must be finite log-probabilities or -inf (padding); "
                         "got NaN or +inf")
    finite = lp > -math.inf
    bad = finite & ((ids < 0) | (ids >= V))
    if bool(bad.any()):
        raise ValueError(f"teacher_ids must be in [0, {V}) (the student's vocabulary) wherever "
                         f"teacher_logprobs is finite; got {int(ids[bad][0])}")
    # distinct among the finite entries: padding gets distinct negative stand-ins
    K = ids.shape[-1]
    stand_in = -1 - torch.arange(K, device=ids.device)
    s = torch.where(finite, ids, stand_in).sort(-1).values
    if K > 1 and bool((s[..., 1:] == s[..., :-1]).any()):
        raise ValueError("teacher_ids must be distinct within a row (among the entries whose "
                         "teacher_logprobs are finite); mark repeated slots as padding with -inf")
    if tail == "bucket":
        total = lp.double().exp().sum(-1)
        worst = float(total.max())
        if worst > 1.0 + LOGPROB_SUM_TOL:
            raise ValueError(
                f"teacher_logprobs must be log-probabilities: with tail='bucket' their "
                f"probabilities may sum to at most 1 per row (+{LOGPROB_SUM_TOL} for rounding), "
                f"got a row summing to {worst:.6g}")


def check_sparse_teacher(teacher_ids, teacher_logprobs, lead, V: int, tail: str, opt,
                         labels_flat, **same_device_as):
    """Checks a sparse teacher (ids, logprobs) of leading shape ``lead`` against a
    student vocabulary of V and the checked ``KDOptions``; returns them as
    (rows, K) int64 ids and detached logprobs. Value checks (ids in range and
    distinct, probabilities summing to at most 1 for the bucket tail) cover
    the rows that are not ignored and are skipped under torch.compile."""
    ids = _integer_tensor("teacher_ids", teacher_ids)
    lp = _checks.tensor("teacher_logprobs", teacher_logprobs, floating=True)
    _checks.same_device(**same_device_as, teacher_ids=ids, teacher_logprobs=lp)
    if ids.dim() != len(lead) + 1 or ids.shape[:-1] != lead:
        raise ValueError(
            f"teacher_ids {tuple(ids.shape)} must have shape (..., K) with the student's leading "
            f"dimensions {tuple(lead)}")
    if lp.shape != ids.shape:
        raise ValueError(f"teacher_logprobs {tuple(lp.shape)} must have the shape of teacher_ids "
                         f"{tuple(ids.shape)}")
    K = ids.shape[-1]
    if K == 0:
        raise ValueError("teacher_ids must have at least one entry per row (K ≥ 1)")
    if K > V:
        raise ValueError(f"teacher_ids has K={K} entries per row, more than the vocabulary V={V}")
    _checks.choice("tail", tail, TAILS)
    if opt.divergence not in SUPPORTED[tail]:
        raise ValueError(f"divergence={opt.divergence!r} is not supported with tail={tail!r} "
                         f"(supported: {SUPPORTED[tail]})")
    if lp.requires_grad and torch.is_grad_enabled():
        raise ValueError("teacher_logprobs requires grad, but the teacher is a constant in KD: "
                         "pass teacher_logprobs.detach()")
    ids2 = ids.reshape(-1, K).to(torch.int64)
    lp2 = lp.detach().reshape(-1, K)
    if not torch.compiler.is_compiling():
        keep = None if labels_flat is None else labels_flat != opt.ignore_index
        _check_teacher_values(ids2, lp2, V, tail, keep)
    return ids2, lp2


def sparse_kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    tail: str = "bucket",
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    reduction: str = "mean",
    t2_scale: bool = True,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Distillation loss against a sparse teacher: K (id, log-probability) pairs per row.

    ``student_logits`` (..., V) float32/bfloat16/float16 (float64 on
    backend="torch"); ``teacher_ids`` (..., K) integer; ``teacher_logprobs``
    (..., K) floating, the teacher's log-probabilities *at the distillation
    temperature*, as given (the producer applies T, e.g.
    ``sample_teacher(temperature=T)``); K ≤ V. The student side is
    u = student_logits / T, q = softmax(u) over the full vocabulary.

    ``loss = hard_weight * CE(student_logits, labels) + (1 - hard_weight) * [T²] * soft``
    per row, CE at T = 1; reductions and ``ignore_index`` as in
    :func:`fastdistill.kd_loss` (the mean is over rows that are not ignored;
    "none" gives 0 at ignored rows; an all-ignored batch gives 0).

    ``soft`` by ``tail``:

    - ``"bucket"`` (top-k with a tail): K + 1 bins, the ids and "everything
      else". Teacher P_k = exp(lp_k), P_tail = 1 − Σ P_k (a sum above 1 by
      less than ``LOGPROB_SUM_TOL`` is rounding: tail 0; more is an error);
      student Q_k = q_{i_k}, log Q_tail = log(−expm1(LSE_ids(u) − LSE(u))).
      When the ids cover the whole vocabulary there is no tail bin. Forward
      KL is never negative (unlike truncated KL without a tail).
    - ``"renormalize"``: K bins, both sides renormalized over the ids; the
      gradient is nonzero only at the ids (and the CE term).
    - ``"none"`` (sampled teachers): Σ_k P_k (lp_k − log q_{i_k}), gradient
      q·ΣP − P at the ids; with ``sample_teacher``'s counts its expectation is
      the dense forward-KL gradient q − p. Forward KL only.

    ``divergence`` is any of ``fastdistill.DIVERGENCES`` but "taid" (which
    needs the dense teacher), computed between the bin distributions; ``beta``
    and ``skew`` as in ``kd_loss``.

    Padding: entries whose log-probability is -inf are no bin on either side
    (no teacher mass, and they do not count in the student's gathered mass),
    and their ids are never read (any value is accepted). The ids of finite
    entries must be distinct within a row and in [0, V); rows with no finite
    entry contribute 0 to the soft term. Ids may be any integer dtype (they
    are converted to int64 once). Value checks (ids, log-probabilities)
    cover the rows that are not ignored and are skipped under torch.compile.
    The teacher is a constant: it gets no gradient.

    ``inplace_backward=True`` (as in ``kd_loss``) writes the gradient into the
    student logits' storage on the fused backends, so no N×V buffer is
    allocated; the logits' values are gone after the call, and any other op
    that saved them for its backward raises autograd's in-place error.
    """
    s = _checks.tensor("student_logits", student_logits, floating=True)
    if s.dim() < 1 or s.shape[-1] == 0:
        raise ValueError(f"student_logits must have shape (..., V) with V ≥ 1, got {tuple(s.shape)}")
    if divergence == "taid":
        raise ValueError("divergence='taid' is not supported by sparse_kd_loss (TAID interpolates "
                         "the dense teacher logits); use fastdistill.kd_loss")
    opt = kd_options(divergence=divergence, temperature=temperature, beta=beta, skew=skew,
                     taid_t=None, ignore_index=ignore_index, hard_weight=hard_weight,
                     reduction=reduction, t2_scale=t2_scale)
    check_inplace_target(inplace_backward, s)
    V = s.shape[-1]
    l1 = student_labels(labels, s, opt)
    ids2, lp2 = check_sparse_teacher(teacher_ids, teacher_logprobs, s.shape[:-1], V, tail, opt,
                                     l1, student_logits=s)
    lead = s.shape[:-1]
    s2 = s.reshape(-1, V)

    name = resolve(backend, s.device, s.dtype)
    tail_index = TAILS.index(tail)
    grad_needed = torch.is_grad_enabled() and s2.requires_grad
    if name in ("torch", "cuda") and inplace_backward and grad_needed:
        # in place on the torch backend too: the reference's gradient over the logits
        out = _FusedSparseKD.apply(s2, ids2, lp2, l1, "torch", opt.ignore_index, opt.div_index,
                                   tail_index, opt.param, opt.temperature, opt.hard_weight,
                                   opt.soft_scale, opt.reduction, True)
    elif name in ("torch", "cuda"):  # cuda: this family's GPU path is triton
        rows = ref.sparse_kd_loss_rows(
            s2, ids2, lp2, tail=tail, divergence=opt.divergence, temperature=opt.temperature,
            beta=opt.beta, skew=opt.skew, labels=l1, ignore_index=opt.ignore_index,
            hard_weight=opt.hard_weight, t2_scale=opt.t2_scale)
        out = ref_kd.reduce_rows(rows, l1, opt.ignore_index, opt.reduction)
    else:
        if s2.dtype == torch.float64:
            raise TypeError(f"backend={name!r} takes float32, bfloat16 or float16 logits; "
                            "float64 runs on backend='torch'")
        if not s2.is_contiguous():
            s2 = s2.contiguous()
        ids2 = ids2.contiguous()
        lp2 = lp2.contiguous()
        args = (s2, ids2, lp2, l1, name, opt.ignore_index, opt.div_index, tail_index, opt.param,
                opt.temperature, opt.hard_weight, opt.soft_scale)
        if grad_needed:
            out = _FusedSparseKD.apply(*args, opt.reduction, inplace_backward)
        else:  # evaluation: no gradient computed, no N×V buffer allocated
            rows, _ = _sparse_forward(name, s2, ids2, lp2, l1, *args[5:],
                                      opt.reduction == "mean", False)
            out = ref_kd.reduce_rows(rows, l1, opt.ignore_index, opt.reduction)
    return out.reshape(lead) if opt.reduction == "none" else out


def sample_teacher(teacher_logits: torch.Tensor, n: int, *, temperature: float = 1.0,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` tokens per row from softmax(teacher_logits / temperature), with replacement.

    Returns ``(ids, logprobs)``, int64 and float32 of shape (..., min(n, V)):
    each row lists its distinct drawn ids (ascending) with logprob =
    log(count / n), then padding up to that width: id 0 and logprob -inf (a
    row never has more than V distinct ids, so n > V pads to V, not n). So exp(logprobs) sums
    to 1 per row, and P = count/n is an unbiased estimate of the teacher's
    distribution: ``sparse_kd_loss(..., tail="none")`` on it has the dense
    forward-KL gradient in expectation (Sparse Logit Sampling). Pass the same
    ``temperature`` to ``sparse_kd_loss``.
    ``generator`` (a CPU/CUDA torch.Generator on the logits' device) makes
    the draws reproducible.
    """
    t = _checks.tensor("teacher_logits", teacher_logits, floating=True)
    ids, counts = sample_counts(t, n, temperature=temperature, generator=generator)
    logprobs = torch.where(counts > 0, (counts.double() / n).log(),
                           torch.full((), -math.inf, dtype=torch.float64, device=t.device))
    return ids, logprobs.float()
