"""``fastdistill.softlabels.kd_loss``: the sparse-teacher loss straight from packed rows.

The cpp kernel is the sparse loss's own row kernel with a teacher source that
unpacks each row's ids and values into its scratch (csrc/softlabels/): no
int64 id tensor and no dense teacher row exists. The torch backend (the
reference) decodes with ``SoftLabels.decode()`` and runs the sparse
reference; so does triton for now (decode, then the sparse Triton kernel).
"""
from __future__ import annotations

import torch

from .. import _checks
from .._backend import resolve
from ..kd import sparse as sparse_kd  # the module: kd imports the codec, so this may load first
from ..kd.options import check_inplace_target, kd_options, student_labels
from ..reference import kd as ref_kd
from ..reference import sparse as ref_sparse
from .codec import SoftLabels, check_soft_labels


def kd_loss(
    student_logits: torch.Tensor,
    soft_labels: SoftLabels,
    *,
    tail: str | None = None,
    divergence: str = "forward_kl",
    temperature: float | None = None,
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
    """KD loss of ``student_logits`` (..., V) against packed ``soft_labels`` of
    the same leading shape and vocabulary.

    The same loss as :func:`fastdistill.sparse_kd_loss` on
    ``soft_labels.decode()``, with its keywords. ``tail`` defaults to the
    codec's (``"bucket"`` for top-k, which stores the tail mass; ``"none"``
    for sampled). ``temperature`` defaults to the codec's — the teacher's
    log-probabilities were taken at it — and another value is an error.
    A corrupt packed row (see ``SoftLabels.check_rows``) is a ValueError
    naming the row and the fault, the same on every backend.
    """
    s = _checks.tensor("student_logits", student_logits, floating=True)
    if s.dim() < 1:
        raise ValueError(f"student_logits must have shape (..., V), got {tuple(s.shape)}")
    V = s.shape[-1]
    tail, temperature = check_soft_labels(soft_labels, s.shape[:-1], V, tail, temperature,
                                          divergence, student_logits=s)
    codec = soft_labels.codec
    opt = kd_options(divergence=divergence, temperature=temperature, beta=beta, skew=skew,
                     taid_t=None, ignore_index=ignore_index, hard_weight=hard_weight,
                     reduction=reduction, t2_scale=t2_scale)
    if opt.divergence not in ref_sparse.SUPPORTED[tail]:
        raise ValueError(f"divergence={divergence!r} is not supported with tail={tail!r} "
                         f"(supported: {ref_sparse.SUPPORTED[tail]})")
    check_inplace_target(inplace_backward, s)
    l1 = student_labels(labels, s, opt)
    if not torch.compiler.is_compiling():  # one check, one message, every backend
        soft_labels.check_rows(None if l1 is None else l1 != opt.ignore_index)

    lead = s.shape[:-1]
    s2 = s.reshape(-1, V)
    data = soft_labels.rows()
    name = resolve(backend, s.device, s.dtype)
    tail_index = ref_sparse.TAILS.index(tail)
    grad_needed = torch.is_grad_enabled() and s2.requires_grad
    if name in ("torch", "cuda") and inplace_backward and grad_needed:
        # in place on the torch backend too: the reference's gradient over the logits
        out = sparse_kd._FusedSparseKD.apply(s2, data, None, l1, "torch", opt.ignore_index,
                                             opt.div_index, tail_index, opt.param,
                                             opt.temperature, opt.hard_weight, opt.soft_scale,
                                             opt.reduction, True, codec.layout())
    elif name in ("torch", "cuda"):  # the reference: decode, then the sparse reference
        ids, lp = soft_labels.decode()
        rows = ref_sparse.sparse_kd_loss_rows(
            s2, ids.reshape(-1, codec.k), lp.reshape(-1, codec.k), tail=tail,
            divergence=opt.divergence, temperature=opt.temperature, beta=opt.beta, skew=opt.skew,
            labels=l1, ignore_index=opt.ignore_index, hard_weight=opt.hard_weight,
            t2_scale=opt.t2_scale, tail_mass=soft_labels.tail_mass() if codec.has_tail else None)
        out = ref_kd.reduce_rows(rows, l1, opt.ignore_index, opt.reduction)
    else:
        if s2.dtype == torch.float64:
            raise TypeError(f"backend={name!r} takes float32, bfloat16 or float16 logits; "
                            "float64 runs on backend='torch'")
        if not s2.is_contiguous():
            s2 = s2.contiguous()
        args = (s2, data, None, l1, name, opt.ignore_index, opt.div_index, tail_index, opt.param,
                opt.temperature, opt.hard_weight, opt.soft_scale)
        if grad_needed:
            out = sparse_kd._FusedSparseKD.apply(*args, opt.reduction, inplace_backward,
                                                 codec.layout())
        else:  # evaluation: no gradient computed, no N×V buffer allocated
            rows, _ = sparse_kd._sparse_forward(name, s2, data, None, l1, *args[5:],
                                                opt.reduction == "mean", False,
                                                layout=codec.layout())
            out = ref_kd.reduce_rows(rows, l1, opt.ignore_index, opt.reduction)
    return out.reshape(lead) if opt.reduction == "none" else out
