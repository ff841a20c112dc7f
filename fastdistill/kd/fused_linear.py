"""The LM head fused into the KD loss: ``fused_linear_kd_loss`` and ``FusedLinearKDLoss``.

The student's (and teacher's) logits are computed one chunk of rows at a
time, the fused divergence kernel turns each chunk into its loss rows and its
logit gradient at once, and that gradient goes straight into grad_hidden and
grad_weight (fp32 accumulation). No N×V tensor ever exists: the peak is one
chunk of logits per side. Ignored rows are skipped, not computed.

The teacher is a second LM head, dense logits, or sparse (ids, logprobs) —
then each chunk runs the sparse kernel of ``sparse.py``. With
``process_group`` the heads are vocabulary shards and each chunk runs
``vocab_parallel_forward``; grad_hidden is summed over the ranks once at the end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _checks, cpu_cache
from .._backend import resolve
from ..reference import kd as ref
from ..reference import sparse as ref_sparse
from ..softlabels.codec import SoftLabels, check_soft_labels
from . import sparse as sparse_kd
from . import vocab_parallel as vp
from .loss import _fused_forward
from .options import KDOptions, check_label_range, kd_options, match_vocab

# Bytes of chunk temporaries ``chunk_size=None`` aims for (logits and
# gradient of both sides): big enough that the matmuls run at full speed,
# small next to the N×V tensors it replaces.
DEFAULT_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class _Head:
    """One side's LM head: logits = softcap·tanh(scale·(h Wᵀ + b) / softcap)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    softcap: float | None

    def raw(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """scale·(h Wᵀ + b), before the soft cap; into ``out`` when given."""
        w = self.weight.t()
        y = torch.mm(h, w, out=out) if self.bias is None else torch.addmm(self.bias, h, w, out=out)
        return y.mul_(self.scale) if self.scale != 1.0 else y

    def first_rows(self, v: int) -> "_Head":
        """The head of the first v tokens only (views, no copy)."""
        return _Head(self.weight[:v], None if self.bias is None else self.bias[:v],
                     self.scale, self.softcap)

    def logits(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        y = self.raw(h, out)
        if self.softcap is not None:
            y = y.div_(self.softcap).tanh_().mul_(self.softcap)
        return y


def log_mixture_weights(weights) -> tuple:
    """log(w_i / Σ w) of non-negative mixture weights (−inf for a weight of 0)."""
    total = float(sum(weights))
    return tuple(math.log(w / total) if w > 0 else -math.inf for w in weights)


def mixture_logits(logits, log_weights, temperature: float) -> torch.Tensor:
    """T·log Σ_i w_i softmax(z_i / T) of the teachers' logits ``logits`` (an
    iterable, consumed one at a time): its softmax at T is the weighted mixture of
    the teachers' tempered distributions."""
    mix = None
    for z, log_w in zip(logits, log_weights):
        lp = torch.log_softmax(z.float().div(temperature), dim=-1).add_(log_w)
        mix = lp if mix is None else torch.logaddexp(mix, lp, out=mix)
    return mix.mul_(temperature)


@dataclass(frozen=True)
class _MixtureHead:
    """Several teachers' LM heads as one: the logits T·log Σ_i w_i softmax(y_i / T)
    of a chunk, whose softmax at the distillation temperature T is the weighted
    mixture of the teachers' tempered distributions. The teachers' hidden states
    sit side by side in one (N, ΣH_i) tensor; one chunk × V per teacher exists
    at a time, never N × V."""

    heads: tuple
    widths: tuple
    log_weights: tuple
    temperature: float

    @property
    def weight(self) -> torch.Tensor:  # for the buffer's shape and dtype
        return self.heads[0].weight

    def first_rows(self, v: int) -> "_MixtureHead":
        return _MixtureHead(tuple(h.first_rows(v) for h in self.heads), self.widths,
                            self.log_weights, self.temperature)

    def logits(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        parts = h.split(self.widths, dim=-1)
        mix = mixture_logits((head.logits(part.to(head.weight.dtype))
                              for head, part in zip(self.heads, parts)),
                             self.log_weights, self.temperature)
        if out is None:
            return mix
        return out.copy_(mix)


def _check_mixture(teacher_hidden, teacher_weight, teacher_bias, teacher_logit_scale,
                   teacher_softcap, mixture_weights, temperature, lead):
    """The teachers of a mixture (sequences, one entry per teacher) as one head and
    their hidden states side by side; every teacher has the same vocabulary."""
    n = len(teacher_weight)
    if not isinstance(teacher_hidden, (list, tuple)) or len(teacher_hidden) != n or n == 0:
        raise ValueError("with several teachers, teacher_hidden and teacher_weight must be "
                         f"sequences of the same length > 0, got {type(teacher_hidden).__name__} "
                         f"and {n} weights")

    def per_teacher(name, value):
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"{name} must have one entry per teacher ({n}), got {len(value)}")
            return list(value)
        return [value] * n

    biases = per_teacher("teacher_bias", teacher_bias)
    scales = per_teacher("teacher_logit_scale", teacher_logit_scale)
    caps = per_teacher("teacher_softcap", teacher_softcap)
    if mixture_weights is None:
        mixture_weights = [1.0 / n] * n
    if not isinstance(mixture_weights, (list, tuple)) or len(mixture_weights) != n:
        raise ValueError(f"mixture_weights must be a sequence of {n} weights (one per teacher), "
                         f"got {mixture_weights!r}")
    w = [_checks.real(f"mixture_weights[{i}]", x, low=0.0) for i, x in enumerate(mixture_weights)]
    if not sum(w) > 0:
        raise ValueError(f"mixture_weights must not all be 0, got {mixture_weights!r}")
    heads, widths, hiddens = [], [], []
    for i in range(n):
        head = _check_head(f"teacher[{i}]", teacher_hidden[i], teacher_weight[i], biases[i],
                           scales[i], caps[i], lead_shape=lead)
        if heads and head.weight.shape[0] != heads[0].weight.shape[0]:
            raise ValueError(f"teacher_weight[{i}] has vocabulary {head.weight.shape[0]} but "
                             f"teacher_weight[0] has {heads[0].weight.shape[0]}: the teachers of a "
                             "mixture share one vocabulary")
        heads.append(head)
        widths.append(teacher_hidden[i].shape[-1])
        hiddens.append(teacher_hidden[i].detach().reshape(-1, widths[-1]))
    dtype = hiddens[0].dtype
    for x in hiddens[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    th2 = torch.cat([x.to(dtype) for x in hiddens], dim=1)
    return (_MixtureHead(tuple(heads), tuple(widths), log_mixture_weights(w), float(temperature)),
            th2)


def _check_head(side: str, hidden, weight, bias, scale, softcap, lead_shape=None):
    """Checks one side's hidden states, weight, bias, logit scale and soft cap."""
    hidden = _checks.tensor(f"{side}_hidden", hidden, floating=True)
    weight = _checks.tensor(f"{side}_weight", weight, floating=True)
    if hidden.dim() < 1:
        raise ValueError(f"{side}_hidden must have shape (..., H), got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"{side}_weight must have shape (V, H) with H = {hidden.shape[-1]} "
            f"({side}_hidden's last dimension) and V > 0, got {tuple(weight.shape)}"
        )
    if lead_shape is not None and hidden.shape[:-1] != lead_shape:
        raise ValueError(
            f"{side}_hidden {tuple(hidden.shape)} must have the student's leading shape "
            f"{tuple(lead_shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{side}_weight is {weight.dtype} but {side}_hidden is {hidden.dtype}; "
                        "they must have the same dtype")
    if bias is not None:
        bias = _checks.tensor(f"{side}_bias", bias, floating=True)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{side}_bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{side}_bias is {bias.dtype} but {side}_hidden is {hidden.dtype}")
    _checks.same_device(**{f"{side}_hidden": hidden, f"{side}_weight": weight, f"{side}_bias": bias})
    scale = _checks.real(f"{side}_logit_scale", scale, low=0.0, low_open=True)
    if softcap is not None:
        softcap = _checks.real(f"{side}_softcap", softcap, low=0.0, low_open=True)
    return _Head(weight, bias, scale, softcap)


def default_chunk_size(n_rows: int, vocab: int, element_size: int,
                       budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that the chunk's logits, gradient and teacher logits
    (≈ 3 rows of V each, fp32 for the gradient accumulation) fit the budget."""
    per_row = 3 * vocab * max(element_size, 4)
    return max(1, min(n_rows, budget_bytes // per_row))


@dataclass
class _Plan:
    """Everything the chunk walk needs, fixed once per call."""

    backend: str
    opt: KDOptions
    student: _Head
    teacher: _Head | None          # hidden + weight teacher
    teacher_hidden: torch.Tensor | None
    teacher_logits: torch.Tensor | None
    teacher_sparse: tuple | None   # (ids (N, K) int64, logprobs (N, K), tail index, None) or
                                   # (packed rows (N, row_bytes), None, tail index, layout)
    rows: torch.Tensor | None      # indices of the rows that are not ignored (None: all)
    labels: torch.Tensor | None
    n_rows: int                    # rows that count (not ignored)
    chunk: int
    vocab_out: int                 # rows of student_weight (its gradient's size)
    vs: int                        # student vocabulary computed (after truncation)
    vt: int                        # teacher vocabulary computed (after truncation)
    group: object = None           # process group of a vocabulary-sharded head
    layout: vp.ShardLayout | None = None


def _take(x: torch.Tensor | None, plan: _Plan, a: int, b: int) -> torch.Tensor | None:
    """Rows a..b of the rows that count."""
    if x is None:
        return None
    if plan.rows is None:
        return x[a:b]
    return x.index_select(0, plan.rows[a:b])


class _ChunkBuffers:
    """One logits buffer per side, made at the first chunk and written again by
    every later one: a fresh chunk × V buffer per chunk would first-touch its
    pages every time (here ~0.3–1.7 s per GB with 4 KiB pages), as much as a
    GEMM's worth of time over a step. On CPU they come from ``cpu_cache``, so
    the next step reuses them resident too."""

    def __init__(self, rows: int):
        self.rows = rows
        self.buf: dict[str, torch.Tensor] = {}

    def get(self, side: str, head: _Head, h: torch.Tensor) -> torch.Tensor:
        v = head.weight.shape[0]
        buf = self.buf.get(side)
        if buf is None:
            dtype = torch.result_type(h, head.weight)
            buf = self.buf[side] = cpu_cache.empty((self.rows, v), dtype, h.device)
        return buf[:h.shape[0]]


def _chunk_logits(plan: _Plan, h: torch.Tensor, a: int, b: int, buffers: _ChunkBuffers):
    """(student logits, teacher logits, tanh of the student's cap or None) of one chunk,
    made to one vocabulary per ``vocab_mismatch``; the logits are written into
    ``buffers``, so they are dead once the next chunk starts."""
    s_head = plan.student
    y = s_head.raw(h, buffers.get("student", s_head, h))
    capped = None
    if s_head.softcap is not None:
        capped = y.div_(s_head.softcap).tanh_()          # kept for the chain rule
        y = capped * s_head.softcap
    with torch.no_grad():
        if plan.teacher is not None:
            th = _take(plan.teacher_hidden, plan, a, b)
            t = plan.teacher.logits(th, buffers.get("teacher", plan.teacher, th))
        elif plan.teacher_logits is not None:
            t = _take(plan.teacher_logits, plan, a, b)
        else:  # sparse teacher: no dense teacher rows
            return y.contiguous(), None, capped
    if plan.vs != plan.vt:  # pad: -inf logits on the shorter side
        y, t = match_vocab(y, t, plan.opt.vocab_mismatch)
    return y.contiguous(), t.contiguous(), capped


def _chunk_kernel(plan: _Plan, z, t, lab, a: int, b: int, need_grad: bool):
    """(loss rows, gradient of their sum w.r.t. z) of one chunk, by the teacher's kind.
    The fused kernels may write the gradient over z: z is ours alone."""
    opt = plan.opt
    if plan.teacher_sparse is not None:
        ids, lp, tail, layout = plan.teacher_sparse
        lp = None if lp is None else _take(lp, plan, a, b).contiguous()
        return sparse_kd._sparse_forward(
            plan.backend, z, _take(ids, plan, a, b).contiguous(), lp, lab, opt.ignore_index,
            opt.div_index, tail, opt.param, opt.temperature, opt.hard_weight, opt.soft_scale,
            False, need_grad, plan.backend != "torch", layout)
    if plan.group is not None:
        return vp.vocab_parallel_forward(
            z, t, lab, opt.ignore_index, opt.div_index, opt.param, opt.temperature,
            opt.hard_weight, opt.soft_scale, False, need_grad, plan.group, layout=plan.layout)
    return _fused_forward(plan.backend, z, t, lab, opt.ignore_index, opt.div_index, opt.param,
                          opt.temperature, opt.hard_weight, opt.soft_scale, False,
                          plan.backend != "torch", need_grad=need_grad)


def _walk(plan: _Plan, hidden: torch.Tensor, need_grad: bool, grad_rows=None, *,
          want_hidden=True, want_weight=True, want_bias=True):
    """Walk the chunks: loss rows (of the rows that count) and, with need_grad,
    the gradients of hidden, weight and bias. ``grad_rows`` (per counted row)
    weights each row's gradient (reduction='none' in backward); otherwise the
    gradient is that of the sum, divided by n_rows for 'mean'."""
    opt = plan.opt
    s_head = plan.student
    W = s_head.weight
    acc = torch.float64 if W.dtype == torch.float64 else torch.float32
    losses = []
    gh = gw = gb = None
    if need_grad:
        if want_hidden:  # summed over the ranks at the end: in the accumulation dtype then
            # every row is written when none is ignored: no zero fill needed then
            alloc = torch.empty if plan.rows is None and plan.n_rows > 0 else torch.zeros
            gh = alloc(hidden.shape, dtype=acc if plan.group is not None else hidden.dtype,
                       device=hidden.device)
        if want_weight:  # the first chunk overwrites it (beta=0): zero only what it never writes
            gw = cpu_cache.empty((plan.vocab_out, W.shape[1]), acc, W.device)
            if plan.n_rows == 0:
                gw.zero_()
            elif plan.vs < plan.vocab_out:
                gw[plan.vs:].zero_()
        if want_bias:
            gb = torch.zeros(plan.vocab_out, dtype=acc, device=W.device)
    scale = 1.0 / max(plan.n_rows, 1) if (opt.reduction == "mean" and grad_rows is None) else 1.0
    vs_used = plan.vs
    buffers = _ChunkBuffers(min(plan.chunk, plan.n_rows))
    for a in range(0, plan.n_rows, plan.chunk):
        b = min(a + plan.chunk, plan.n_rows)
        h = _take(hidden, plan, a, b)
        lab = _take(plan.labels, plan, a, b)
        with torch.no_grad():
            z, t, capped = _chunk_logits(plan, h, a, b, buffers)
            rows, g = _chunk_kernel(plan, z, t, lab, a, b, need_grad)
            # drop this chunk's logits now (g may be z itself): any copy made
            # from the buffers (softcap, padding) is never alive beside the next
            del z, t
        losses.append(rows)
        if not need_grad:
            del g, capped
            continue
        with torch.no_grad():
            g = g[:, :vs_used]
            if capped is not None:   # d/dy softcap·tanh(y/softcap) = 1 - tanh²
                g = capped[:, :vs_used].square_().neg_().add_(1).mul_(g)
            if s_head.scale != 1.0:
                g = g.mul_(s_head.scale) if g.is_contiguous() else g * s_head.scale
            if grad_rows is not None:
                w = grad_rows[a:b].to(g.dtype).unsqueeze(1)
                g = g * w
            if gh is not None:
                part = g @ W
                if scale != 1.0:
                    part.mul_(scale)
                if plan.rows is None:
                    gh[a:b] = part
                else:
                    gh.index_copy_(0, plan.rows[a:b], part.to(gh.dtype))
            if gw is not None:
                gw[:vs_used].addmm_(g.t().to(acc), h.to(acc), beta=0.0 if a == 0 else 1.0,
                                    alpha=scale)
            if gb is not None:
                gb[:vs_used].add_(g.sum(0, dtype=acc), alpha=scale)
            del g, capped
    loss_rows = torch.cat(losses) if losses else hidden.new_zeros(0, dtype=acc)
    if gh is not None and plan.group is not None:
        # each rank has its shard's share Σ_j g_j W_j of grad_hidden: sum them
        vp.dist.all_reduce(gh, op=vp.dist.ReduceOp.SUM, group=plan.group)
        gh = gh.to(hidden.dtype)
    return loss_rows, gh, gw, gb


def _full_rows(plan: _Plan, counted: torch.Tensor, n_total: int) -> torch.Tensor:
    """Loss rows of every row (0 at ignored rows) from the rows that count."""
    if plan.rows is None:
        return counted
    out = counted.new_zeros(n_total)
    return out.index_copy_(0, plan.rows, counted)


def _reference_loss(plan: _Plan, hidden, weight, bias, n_total: int) -> torch.Tensor:
    """The loss of the call as the readable reference computes it, with
    differentiable torch ops on the (N, V) logits: for double backward, where
    exactness matters more than memory."""
    if plan.group is not None:
        raise RuntimeError("fused_linear_kd_loss with process_group cannot be differentiated "
                           "twice (the vocabulary-parallel kernel has no second derivative)")
    opt, head = plan.opt, plan.student
    w = weight[:plan.vs]
    y = hidden @ w.t()
    if bias is not None:
        y = y + bias[:plan.vs]
    y = y * head.scale
    if head.softcap is not None:
        y = head.softcap * torch.tanh(y / head.softcap)
    labels = plan.labels
    if plan.teacher_sparse is not None:
        ids, lp, tail, layout = plan.teacher_sparse
        tail_mass = None
        if layout is not None:
            ids, lp, tail_mass = sparse_kd.decode_packed(ids, layout)
        kw = sparse_kd.reference_keywords(opt.div_index, tail, opt.param, opt.temperature,
                                          opt.ignore_index, opt.hard_weight, opt.soft_scale)
        rows = ref_sparse.sparse_kd_loss_rows(y, ids.to(torch.int64), lp, labels=labels,
                                              tail_mass=tail_mass, **kw)
    else:
        with torch.no_grad():
            if plan.teacher is not None:
                t = plan.teacher.logits(plan.teacher_hidden)
            else:
                t = plan.teacher_logits
        if plan.vs != plan.vt:  # pad: -inf logits on the shorter side
            y, t = match_vocab(y, t, opt.vocab_mismatch)
        rows = ref.kd_loss_rows(y, t, labels=labels, **opt.reference_keywords())
    return ref.reduce_rows(rows, labels, opt.ignore_index, opt.reduction)


class _FusedLinearKD(torch.autograd.Function):
    """mean/sum: gradients computed in forward, backward scales them.
    none: forward computes only the loss; backward walks the chunks again,
    weighting each row by its incoming gradient. Differentiated twice
    (``create_graph=True``), backward recomputes the gradients from the
    reference with differentiable torch ops (exact, but the N×V logits exist
    then); the inputs are saved by reference only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan, n_total):
        need = ctx.needs_input_grad
        ctx.plan = plan
        ctx.n_total = n_total
        if plan.opt.reduction == "none":
            rows, *_ = _walk(plan, hidden, need_grad=False)
            ctx.save_for_backward(hidden, weight, bias)
            return _full_rows(plan, rows, n_total)
        rows, gh, gw, gb = _walk(plan, hidden, need_grad=True, want_hidden=need[0],
                                 want_weight=need[1], want_bias=need[2] and bias is not None)
        ctx.save_for_backward(hidden, weight, bias, gh, gw, gb)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        total = rows.sum()
        return total / max(plan.n_rows, 1) if plan.opt.reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        plan = ctx.plan
        need = ctx.needs_input_grad
        hidden, weight, bias = ctx.saved_tensors[:3]
        if torch.is_grad_enabled():  # create_graph: an exact, differentiable gradient
            out = _reference_loss(plan, hidden, weight, bias, ctx.n_total)
            wanted = [x for x, n in zip((hidden, weight, bias), need) if n and x is not None]
            grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True,
                                             allow_unused=True))
            res = [next(grads) if n and x is not None else None
                   for x, n in zip((hidden, weight, bias), need[:3])]
            return (*res, None, None)
        if plan.opt.reduction == "none":
            go = grad_out if plan.rows is None else grad_out.index_select(0, plan.rows)
            _, gh, gw, gb = _walk(plan, hidden, need_grad=True, grad_rows=go,
                                  want_hidden=need[0], want_weight=need[1],
                                  want_bias=need[2])
            wdt = plan.student.weight.dtype
            return (gh, None if gw is None else gw.to(wdt), None if gb is None else gb.to(wdt),
                    None, None)
        gh, gw, gb = ctx.saved_tensors[3:]
        hdt, wdt = ctx.dtypes
        out = []
        for g, dt in ((gh, hdt), (gw, wdt), (gb, wdt)):
            if g is None:
                out.append(None)
                continue
            g = g * grad_out.to(g.dtype) if not bool(grad_out == 1) else g
            out.append(g.to(dt))
        return (*out, None, None)


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    *,
    teacher_logits: torch.Tensor | None = None,
    teacher_sparse=None,
    tail: str | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    taid_t: float | None = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    reduction: str = "mean",
    t2_scale: bool = True,
    vocab_mismatch: str = "error",
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    chunk_size: int | None = None,
    mixture_weights=None,
    process_group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """``kd_loss`` of the logits ``student_hidden @ student_weightᵀ (+ bias)``
    against the teacher's, without ever materializing an N×V tensor.

    The teacher is given as ``teacher_hidden`` + ``teacher_weight`` (its LM
    head, fused the same way), as dense ``teacher_logits`` (..., Vt), or as
    ``teacher_sparse=(ids, logprobs)`` of shape (..., K): top-k or sampled
    log-probabilities at the distillation temperature, with ``tail`` as in
    :func:`fastdistill.sparse_kd_loss` (default "bucket"; its divergences;
    ids index the student's vocabulary), or as packed
    ``fastdistill.softlabels.SoftLabels`` (unpacked inside the cpp kernel;
    ``tail`` defaults to the codec's, and ``temperature`` must be the codec's). The teacher is a
    constant and gets no gradient. Each side's logits are
    ``softcap·tanh(logit_scale·(h Wᵀ + b) / softcap)`` (the scale first, then
    Gemma-style soft capping; ``softcap=None`` skips it). All other keywords
    are those of :func:`fastdistill.kd_loss`. ``chunk_size`` rows are done at a
    time (None: as many as fit ``DEFAULT_CHUNK_BYTES`` of temporaries).
    Gradients flow to ``student_hidden``, ``student_weight`` and
    ``student_bias``; bf16/fp16 weights get their gradient accumulated in fp32.

    Several teachers: ``teacher_hidden`` and ``teacher_weight`` as sequences
    (one entry per teacher, one shared vocabulary; ``teacher_bias``,
    ``teacher_logit_scale`` and ``teacher_softcap`` a sequence or one value for
    all) and ``mixture_weights`` (default uniform, normalized): the target is
    Σ_i w_i softmax(logits_i / T), formed chunk by chunk (one chunk × V per
    teacher at a time).

    ``process_group``: the heads are sharded over the vocabulary across the
    group's ranks (Megatron-style): each rank passes the same hidden states
    and labels (global ids) and its own rows of ``student_weight`` (and
    ``student_bias``, ``teacher_weight``/``teacher_bias`` or columns of
    ``teacher_logits``), the same width for student and teacher. Every rank
    gets the full-vocabulary loss, the gradient of its own weight shard, and
    the full grad_hidden (summed over the ranks). Every rank must make the
    same call; not with ``teacher_sparse`` or ``vocab_mismatch`` other than
    "error".
    """
    opt = kd_options(divergence=divergence, temperature=temperature, beta=beta, skew=skew,
                     taid_t=taid_t, ignore_index=ignore_index, hard_weight=hard_weight,
                     reduction=reduction, t2_scale=t2_scale, vocab_mismatch=vocab_mismatch)
    s_head = _check_head("student", student_hidden, student_weight, student_bias,
                         student_logit_scale, student_softcap)
    lead = student_hidden.shape[:-1]
    head_teacher = teacher_hidden is not None or teacher_weight is not None
    given = head_teacher + (teacher_logits is not None) + (teacher_sparse is not None)
    if given != 1:
        raise ValueError("give the teacher exactly one way: teacher_hidden + teacher_weight, "
                         f"teacher_logits, or teacher_sparse=(ids, logprobs); got {given}")
    if tail is not None and teacher_sparse is None:
        raise ValueError("tail applies to teacher_sparse; a dense teacher has no tail to choose")
    if process_group is not None:
        if teacher_sparse is not None:
            raise ValueError("teacher_sparse is not supported with process_group")
        if opt.vocab_mismatch != "error":
            raise ValueError(
                f"vocab_mismatch={opt.vocab_mismatch!r} is not supported with process_group: the "
                "vocabulary is sharded, so pad or truncate the shards before the call")
    t_head = th2 = tl2 = None
    if not head_teacher:
        for name, value in (("teacher_bias", teacher_bias), ("teacher_softcap", teacher_softcap)):
            if value is not None:
                raise ValueError(f"{name} applies to teacher_weight; with teacher_logits or "
                                 "teacher_sparse give the final values")
        if teacher_logit_scale != 1.0:
            raise ValueError("teacher_logit_scale applies to teacher_weight; with teacher_logits "
                             "or teacher_sparse give the final values")
    several = isinstance(teacher_weight, (list, tuple))
    if mixture_weights is not None and not several:
        raise ValueError("mixture_weights applies to several teachers: give teacher_hidden and "
                         "teacher_weight as sequences, one entry per teacher")
    if head_teacher:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden and teacher_weight go together: give both")
        if several:
            if process_group is not None:
                raise ValueError("several teachers are not supported with process_group")
            t_head, th2 = _check_mixture(teacher_hidden, teacher_weight, teacher_bias,
                                         teacher_logit_scale, teacher_softcap, mixture_weights,
                                         opt.temperature, lead)
        else:
            t_head = _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias,
                                 teacher_logit_scale, teacher_softcap, lead_shape=lead)
            th2 = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
        vt = t_head.weight.shape[0]
    elif teacher_logits is not None:
        tl = _checks.tensor("teacher_logits", teacher_logits, floating=True)
        if tl.shape[:-1] != lead or tl.dim() < 1 or tl.shape[-1] == 0:
            raise ValueError(f"teacher_logits must have shape {tuple(lead)} + (Vt,) with Vt > 0, "
                             f"got {tuple(tl.shape)}")
        vt = tl.shape[-1]
        tl2 = tl.detach().reshape(-1, vt)
    else:
        packed = isinstance(teacher_sparse, SoftLabels)
        if not packed and (not isinstance(teacher_sparse, (tuple, list)) or len(teacher_sparse) != 2):
            raise TypeError("teacher_sparse must be a pair (teacher_ids, teacher_logprobs) or "
                            f"SoftLabels, got {type(teacher_sparse).__name__}")
        if opt.divergence == "taid":
            raise ValueError("divergence='taid' is not supported with teacher_sparse (TAID "
                             "interpolates the dense teacher logits)")
        if opt.vocab_mismatch != "error":
            raise ValueError("vocab_mismatch applies to a dense teacher; teacher_sparse ids "
                             "index the student's vocabulary")
        vt = student_weight.shape[0]
    _checks.same_device(student_hidden=student_hidden, teacher_hidden=th2,
                        teacher_logits=teacher_logits)
    vs = student_weight.shape[0]
    if vs != vt and opt.vocab_mismatch == "error" and process_group is None:
        # (with process_group, shard_layout raises this on every rank alike)
        raise ValueError(
            f"the student's vocabulary ({vs}) differs from the teacher's ({vt}); pass "
            "vocab_mismatch='pad' (missing tokens get probability 0) or 'truncate'"
        )
    v_used = {"pad": max(vs, vt), "truncate": min(vs, vt)}.get(opt.vocab_mismatch, vs)
    if opt.vocab_mismatch == "truncate" and vs != vt:
        # only the shared tokens are ever computed: cut the heads, not the logits
        if vs > vt:
            s_head = s_head.first_rows(vt)
        elif t_head is not None:
            t_head = t_head.first_rows(vs)
        else:
            tl2 = tl2[:, :vs]
        vs = vt = v_used

    h2 = student_hidden.reshape(-1, student_hidden.shape[-1])
    n_total = h2.shape[0]
    l1 = None
    rows = None
    if labels is not None:
        _checks.labels_for("labels", labels, lead, student_hidden.device)
        l1 = labels.reshape(-1).to(torch.int64)
        if opt.hard_weight > 0 and process_group is None:
            check_label_range(l1, v_used, opt.ignore_index)
        keep = l1 != opt.ignore_index
        if not bool(keep.all()):
            rows = keep.nonzero().squeeze(1)
    elif opt.hard_weight > 0:
        raise ValueError("hard_weight > 0 needs labels for the cross-entropy term")
    n_rows = n_total if rows is None else rows.numel()
    if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    sparse = None
    if isinstance(teacher_sparse, SoftLabels):
        tail, _ = check_soft_labels(teacher_sparse, lead, vs, tail, opt.temperature,
                                    opt.divergence, student_hidden=student_hidden)
        if opt.divergence not in sparse_kd.SUPPORTED[tail]:
            raise ValueError(f"divergence={opt.divergence!r} is not supported with tail={tail!r} "
                             f"(supported: {sparse_kd.SUPPORTED[tail]})")
        sparse = (teacher_sparse.rows(), None, sparse_kd.TAILS.index(tail),
                  teacher_sparse.codec.layout())
    elif teacher_sparse is not None:
        tail = "bucket" if tail is None else tail
        ids2, lp2 = sparse_kd.check_sparse_teacher(
            teacher_sparse[0], teacher_sparse[1], lead, vs, tail, opt, l1,
            student_hidden=student_hidden)
        sparse = (ids2, lp2, sparse_kd.TAILS.index(tail), None)
    layout = None
    if process_group is not None:
        # every rank must walk the same chunks: the chunk size joins the agreed plan
        shapes = student_weight.new_empty(1)
        layout = vp.shard_layout(shapes.expand(n_rows, vs), shapes.expand(n_rows, vt),
                                 process_group, plan=vp.collective_plan(
                                     opt, student_hidden.dtype, chunk_size or 0))
        vp.check_global_labels(l1, opt, layout)
        v_used = -(-layout.vocab_size // vp._group_rank_size(process_group)[1])  # alike on every rank
    chunk = chunk_size or default_chunk_size(max(n_rows, 1), v_used, student_hidden.element_size())

    name = resolve(backend, student_hidden.device, student_hidden.dtype)
    if name in ("cpp", "triton") and student_hidden.dtype == torch.float64:
        raise TypeError(f"backend={name!r} takes float32, bfloat16 or float16; "
                        "float64 runs on backend='torch'")
    plan = _Plan(name, opt, s_head, t_head, th2, tl2, sparse, rows, l1, n_rows, chunk,
                 student_weight.shape[0], vs, vt, process_group, layout)
    if torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias)):
        out = _FusedLinearKD.apply(h2, student_weight, student_bias, plan, n_total)
    else:
        with torch.no_grad():
            counted, *_ = _walk(plan, h2, need_grad=False)
        out = ref.reduce_rows(_full_rows(plan, counted, n_total), None, opt.ignore_index, "sum")
        if opt.reduction == "mean":
            out = out / max(n_rows, 1)
        elif opt.reduction == "none":
            out = _full_rows(plan, counted, n_total)
    return out.reshape(lead) if opt.reduction == "none" else out


class FusedLinearKDLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`fused_linear_kd_loss`; keywords fixed at construction.

    ``forward(student_hidden, student_weight, teacher_hidden=None,
    teacher_weight=None, *, teacher_logits=None, teacher_sparse=None,
    student_bias=None, teacher_bias=None, labels=None, taid_t=None)``.
    """

    _CALL_TIME = ("teacher_logits", "teacher_sparse", "student_bias", "teacher_bias", "labels")

    def __init__(self, **kwargs):
        super().__init__()
        import inspect

        allowed = set(inspect.signature(fused_linear_kd_loss).parameters) - {
            "student_hidden", "student_weight", "teacher_hidden", "teacher_weight", *self._CALL_TIME}
        unknown = set(kwargs) - allowed
        if unknown:
            raise TypeError(f"FusedLinearKDLoss got unexpected keyword(s) {sorted(unknown)}; "
                            f"allowed: {sorted(allowed)} (tensors go to forward)")
        self.kwargs = kwargs

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                *, teacher_logits=None, teacher_sparse=None, student_bias=None, teacher_bias=None,
                labels=None, taid_t=None):
        kw = dict(self.kwargs)
        if taid_t is not None:
            kw["taid_t"] = taid_t
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                    teacher_logits=teacher_logits, teacher_sparse=teacher_sparse,
                                    student_bias=student_bias,
                                    teacher_bias=teacher_bias, labels=labels, **kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
