"""Large-vocabulary KD losses on logits: ``kd_loss`` and ``KDLoss``.

The fused backends compute the loss and its gradient in one pass per row
(the gradient is produced in the forward pass; backward only scales it), so
no softmax, log-softmax or mixture tensor of N×V is ever kept. With
``inplace_backward=True`` the gradient is written into the student logits'
own storage and no N×V buffer is allocated at all.
"""
from __future__ import annotations

import torch

from .. import _checks
from .._backend import resolve
from ..reference import kd as ref
from .options import (DIVERGENCES, check_inplace_target, check_label_range, kd_options,
                      match_vocab, no_double_backward, scaled_gradient)
from .vocab_parallel import vocab_parallel_kd_loss
def reference_keywords(div, param, temperature, ignore_index, hard_weight, soft_scale) -> dict:
    """The keywords of ``reference.kd.kd_loss_rows`` from the fused ops' arguments."""
    name = DIVERGENCES[div]
    return dict(divergence=name, temperature=temperature,
                beta=param if name == "jsd" else 0.5,
                skew=param if name.startswith("skew") else 0.1,
                taid_t=param if name == "taid" else None,
                ignore_index=ignore_index, hard_weight=hard_weight,
                t2_scale=soft_scale != 1.0)  # soft_scale is T² or 1, and T² = 1 when T = 1


def _reference_forward(student, teacher, labels, ignore_index, div, param, temperature,
                       hard_weight, soft_scale, mean_scale, need_grad):
    """The fused kernels' contract computed by the reference, the gradient by autograd."""
    kw = reference_keywords(div, param, temperature, ignore_index, hard_weight, soft_scale)
    with torch.enable_grad():
        x = student.detach().requires_grad_(need_grad)
        rows = ref.kd_loss_rows(x, teacher.detach(), labels=labels, **kw)
        if not need_grad:
            return rows.detach(), student.new_empty(0)
        total = ref.reduce_rows(rows, labels, ignore_index, "mean" if mean_scale else "sum")
        (grad,) = torch.autograd.grad(total, x)
    return rows.detach(), grad


def _fused_forward(backend, student, teacher, labels, ignore_index, div, param, temperature,
                   hard_weight, soft_scale, mean_scale, inplace, need_grad=True):
    """(loss_rows, grad) from a fused backend; grad is `student` itself when in
    place, and not computed (empty) without need_grad. backend="torch" gives
    the same contract from the reference and autograd (for chunked callers,
    and for inplace_backward on the torch backend, which then also writes the
    gradient over the logits: one behaviour on every backend)."""
    if backend in ("torch", "cuda"):  # cuda: this family's GPU path is triton
        rows, grad = _reference_forward(student, teacher, labels, ignore_index, div, param,
                                        temperature, hard_weight, soft_scale, mean_scale,
                                        need_grad)
        if inplace and need_grad:
            return rows, student.copy_(grad)
        return rows, grad
    if backend == "cpp":
        ops = torch.ops.fastdistill
        if inplace and need_grad:
            rows = ops.kd_forward_inplace(student, teacher, labels, ignore_index, div, param,
                                          temperature, hard_weight, soft_scale, mean_scale)
            return rows, student
        return ops.kd_forward(student, teacher, labels, ignore_index, div, param, temperature,
                              hard_weight, soft_scale, mean_scale, need_grad)
    from ..kernels import kd as triton_kd

    return triton_kd.kd_forward(student, teacher, labels, ignore_index, div, param, temperature,
                                hard_weight, soft_scale, mean_scale,
                                out=student if inplace and need_grad else None, need_grad=need_grad)


class _FusedKD(torch.autograd.Function):
    """Autograd around a fused kernel: the gradient is computed in forward.

    Differentiated twice (``create_graph=True``), backward recomputes the
    gradient from the reference with differentiable torch ops, so Hessian-vector
    products are exact (the fused first-order gradient is a constant to
    autograd). The inputs are saved by reference only (no copy)."""

    @staticmethod
    def forward(ctx, student, teacher, labels, backend, ignore_index, div, param, temperature,
                hard_weight, soft_scale, reduction, inplace):
        mean = reduction == "mean"
        version = student._version if inplace else 0
        rows, grad = _fused_forward(backend, student, teacher, labels, ignore_index, div, param,
                                    temperature, hard_weight, soft_scale, mean, inplace)
        if inplace and student._version == version:
            # The logits now hold the gradient: any other op that saved them
            # for its backward must fail autograd's version check.
            torch.autograd.graph.increment_version(student)
        if inplace:
            ctx.save_for_backward(grad)
        else:
            ctx.save_for_backward(grad, student, teacher, labels)
        ctx.reduction = reduction
        ctx.inplace = inplace
        ctx.keywords = reference_keywords(div, param, temperature, ignore_index, hard_weight,
                                          soft_scale)
        return ref.reduce_rows(rows, labels, ignore_index, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph: an exact, differentiable gradient
            if ctx.inplace:
                raise no_double_backward("kd_loss")
            _, student, teacher, labels = ctx.saved_tensors
            kw = ctx.keywords
            rows = ref.kd_loss_rows(student, teacher, labels=labels, **kw)
            out = ref.reduce_rows(rows, labels, kw["ignore_index"], ctx.reduction)
            (g,) = torch.autograd.grad(out, student, grad_out, create_graph=True)
            return (g,) + (None,) * 11
        grad = ctx.saved_tensors[0]
        return (scaled_gradient(grad, grad_out, ctx.reduction, ctx.inplace),) + (None,) * 11


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    taid_t: float | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    reduction: str = "mean",
    t2_scale: bool = True,
    vocab_mismatch: str = "error",
    inplace_backward: bool = False,
    process_group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """Distillation loss between student and teacher logits of shape (..., V).

    ``loss = hard_weight * CE(student, labels) + (1 - hard_weight) * [T²] * D(p ‖ q)``
    per row, with q = softmax(student/T), p = softmax(teacher/T); rows whose
    label is ``ignore_index`` count nowhere. ``divergence`` is one of
    ``DIVERGENCES``; ``beta`` is the JSD mixture weight (0 < beta < 1), ``skew``
    the skew-KL mixture weight (0 ≤ skew < 1), ``taid_t`` TAID's interpolation
    (see ``TAIDSchedule``). The teacher is a constant: it gets no gradient.

    ``inplace_backward=True`` writes the gradient into the student logits'
    storage: the logits' values are gone after the call, and any other op that
    saved them for its backward raises autograd's in-place error.

    ``process_group``: the logits are sharded over the vocabulary across the
    group's ranks (each rank passes its own columns of both sides, the same
    width on both, and the same rows); labels are global ids. Every rank gets
    the full-vocabulary loss and the gradient of its own shard
    (``fastdistill/kd/vocab_parallel.py``). Not with ``inplace_backward`` or
    ``vocab_mismatch`` other than "error".
    """
    s = _checks.tensor("student_logits", student_logits, floating=True)
    t = _checks.tensor("teacher_logits", teacher_logits, floating=True)
    _checks.same_device(student_logits=s, teacher_logits=t)
    if s.dim() < 1 or t.dim() < 1:
        raise ValueError("student_logits and teacher_logits must have at least one dimension (V)")
    if s.shape[:-1] != t.shape[:-1]:
        raise ValueError(
            f"student_logits {tuple(s.shape)} and teacher_logits {tuple(t.shape)} must agree "
            "in every dimension but the last (the vocabulary)"
        )
    if s.shape[-1] == 0 or t.shape[-1] == 0:
        raise ValueError("the vocabulary dimension of the logits must not be empty")
    opt = kd_options(divergence=divergence, temperature=temperature, beta=beta, skew=skew,
                     taid_t=taid_t, ignore_index=ignore_index, hard_weight=hard_weight,
                     reduction=reduction, t2_scale=t2_scale, vocab_mismatch=vocab_mismatch)
    _checks.flag("inplace_backward", inplace_backward)
    if labels is not None:
        _checks.labels_for("labels", labels, s.shape[:-1], s.device)
    elif opt.hard_weight > 0:
        raise ValueError("hard_weight > 0 needs labels for the cross-entropy term")
    if process_group is not None:  # vocabulary-parallel: torch ops + collectives, no fused kernel yet
        return vocab_parallel_kd_loss(s, t, labels, opt, inplace_backward=inplace_backward,
                                      process_group=process_group, backend=backend)
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "teacher_logits requires grad, but the teacher is a constant in KD: pass "
            "teacher_logits.detach()"
        )
    check_inplace_target(inplace_backward, s)

    lead = s.shape[:-1]
    s, t = match_vocab(s, t, opt.vocab_mismatch)
    V = s.shape[-1]
    s2 = s.reshape(-1, V)
    t2 = t.reshape(-1, V)
    l1 = None if labels is None else labels.reshape(-1).to(torch.int64)
    if l1 is not None and opt.hard_weight > 0 and not torch.compiler.is_compiling():
        check_label_range(l1, V, opt.ignore_index)

    name = resolve(backend, s.device, s.dtype)
    grad_needed = torch.is_grad_enabled() and s2.requires_grad
    if name in ("torch", "cuda") and not (inplace_backward and grad_needed):
        rows = ref.kd_loss_rows(s2, t2, labels=l1, **opt.reference_keywords())
        out = ref.reduce_rows(rows, l1, opt.ignore_index, opt.reduction)
    elif name in ("torch", "cuda"):  # in place: the reference's gradient over the logits
        out = _FusedKD.apply(s2, t2.detach(), l1, "torch", opt.ignore_index, opt.div_index,
                             opt.param, opt.temperature, opt.hard_weight, opt.soft_scale,
                             opt.reduction, True)
    else:
        if s2.dtype == torch.float64 or t2.dtype == torch.float64:
            raise TypeError(f"backend={name!r} takes float32, bfloat16 or float16 logits; "
                            "float64 runs on backend='torch'")
        if not s2.is_contiguous():
            s2 = s2.contiguous()
        if not t2.is_contiguous():
            t2 = t2.contiguous()
        args = (s2, t2.detach(), l1, name, opt.ignore_index, opt.div_index, opt.param,
                opt.temperature, opt.hard_weight, opt.soft_scale)
        if grad_needed:
            out = _FusedKD.apply(*args, opt.reduction, inplace_backward)
        else:  # evaluation: no gradient computed, no N×V buffer allocated
            rows, _ = _fused_forward(name, s2, t2, l1, *args[4:], opt.reduction == "mean", False,
                                     need_grad=False)
            out = ref.reduce_rows(rows, l1, opt.ignore_index, opt.reduction)
    return out.reshape(lead) if opt.reduction == "none" else out


class KDLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`kd_loss`; keywords as there, fixed at construction.

    ``forward(student_logits, teacher_logits, labels=None, taid_t=None)``;
    ``taid_t`` given at call time overrides the stored one (for TAIDSchedule).
    """

    def __init__(self, **kwargs):
        super().__init__()
        for bad in ("labels",):
            if bad in kwargs:
                raise TypeError(f"KDLoss takes {bad} at call time, not at construction")
        import inspect

        allowed = set(inspect.signature(kd_loss).parameters) - {"student_logits", "teacher_logits"}
        unknown = set(kwargs) - allowed
        if unknown:
            raise TypeError(f"KDLoss got unexpected keyword(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        self.kwargs = kwargs

    def forward(self, student_logits, teacher_logits, labels=None, taid_t=None):
        kw = dict(self.kwargs)
        if taid_t is not None:
            kw["taid_t"] = taid_t
        return kd_loss(student_logits, teacher_logits, labels=labels, **kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())

