"""ULD: the Universal Logit Distillation loss across tokenizers, without a sort over V.

Boizard et al. (2024), "Towards Cross-Tokenizer Distillation: the Universal
Logit Distillation Loss". For a pair of positions (student s, teacher t) with
p = the teacher's distribution and q = softmax(z_s / T) the student's, both
sorted in decreasing order and padded with zeros to the longer vocabulary,

    ULD(p, q) = Σ_r |p_(r) − q_(r)|                        (sorted-L1 = sorted-W1)

Top-k form (what this module computes). The teacher gives its K_t largest
probabilities a_1 ≥ … (a stored top-k; −inf log-probs are probability 0) and
its tail mass tail_T = 1 − Σ_r a_r; the student's K = min(K_t, V_s) largest
probabilities b_r come from ``torch.topk`` on chunks of rows, each over its
full-vocabulary log-sum-exp, and tail_S = 1 − Σ_{r≤K} b_r (computed as
−expm1(LSE_topK − LSE), exactly 0 when K = V_s). With the teacher's ranks
beyond K folded into its tail,

    ULD_K = Σ_{r≤K} |a_r − b_r| + |tail_T − tail_S|.

Bound. Write the exact loss as head + R with R = Σ_{r>K} |p_(r) − q_(r)|.
The triangle inequality gives |Σ_{r>K}(p_(r) − q_(r))| ≤ R ≤ Σ_{r>K} p_(r) +
Σ_{r>K} q_(r), i.e. |tail_T − tail_S| ≤ R ≤ tail_T + tail_S, so

    0 ≤ ULD − ULD_K ≤ tail_T + tail_S − |tail_T − tail_S| = 2·min(tail_T, tail_S).

The top-k form never overestimates, and it is exact when either side's tail is
0: K = V_s (the student's full vocabulary), or a teacher whose top-k holds all
its mass. (tail_T is the teacher's true mass outside its K largest
probabilities; with a ``teacher_tail`` given, that number.)

Gradient: to the student only, through the selected probabilities and the
full-vocabulary log-sum-exp (piecewise: the top-k selection is fixed where it
is differentiated; |0| has subgradient 0). The student is given as logits, or
as hidden states + LM head, processed ``chunk_size`` rows at a time: the head
path keeps only (rows, K) per chunk and never builds a pairs × V tensor.
"""
from __future__ import annotations

import math

import torch

from .. import _checks
from ..kd.fused_linear import default_chunk_size

REDUCTIONS = ("mean", "sum", "none")
# A teacher row's top-k probabilities may sum above 1 by this much (rounding).
PROB_SUM_TOL = 1e-3


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def uld_rows(u: torch.Tensor, a: torch.Tensor, tail_t: torch.Tensor) -> torch.Tensor:
    """ULD_K of each row: student scaled logits u (n, V) (differentiable),
    teacher's sorted top probabilities a (n, K) with K ≤ V and tail mass tail_t (n,)."""
    K, V = a.shape[-1], u.shape[-1]
    lse = torch.logsumexp(u, -1, keepdim=True)
    vals = u.topk(K, dim=-1, sorted=True).values
    b = torch.exp(vals - lse)
    head = (a - b).abs().sum(-1)
    if K >= V:
        tail_s = torch.zeros_like(head)
    else:
        tail_s = (-torch.expm1(torch.logsumexp(vals, -1) - lse.squeeze(-1))).clamp_min(0)
    return head + (tail_t - tail_s).abs()


def chunk_pairs(student_chunks: torch.Tensor, teacher_chunks: torch.Tensor,
                num_chunks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The position pairs of the cross-tokenizer losses: for each chunk (from
    :func:`fastdistill.xtok.align`) present on both sides, the **last** token of
    the chunk on each side, as flat row indices into the (B·Ls) student rows and
    the (B·Lt) teacher rows, in chunk order. Both positions have read the same
    text, up to the chunk's end, and both predict the token that starts the next
    chunk: the distributions compared are conditioned on the same bytes."""
    cs = _pos_tensor("student_chunks", student_chunks).reshape(-1)
    ct = _pos_tensor("teacher_chunks", teacher_chunks).reshape(-1)
    if cs.device != ct.device:
        raise ValueError(f"student_chunks is on {cs.device} but teacher_chunks on {ct.device}")
    if bool((cs < -1).any()) or bool((ct < -1).any()):
        raise ValueError("student_chunks and teacher_chunks must be -1 (no chunk) or chunk "
                         "ids >= 0")
    if num_chunks is None:
        num_chunks = int(torch.maximum(cs.max(), ct.max())) + 1 if cs.numel() and ct.numel() else 0
    last = []
    for c in (cs, ct):
        live = (c >= 0).nonzero().squeeze(1)
        end = torch.full((num_chunks,), -1, dtype=torch.int64, device=c.device)
        end.scatter_reduce_(0, c[live], live, reduce="amax")
        last.append(end)
    both = ((last[0] >= 0) & (last[1] >= 0)).nonzero().squeeze(1)
    return last[0][both], last[1][both]


def _pos_tensor(name, x) -> torch.Tensor:
    _checks.tensor(name, x)
    if x.dtype.is_floating_point or x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    return x.long()


def pair_rows(student_lead, n_teacher: int, student_positions, teacher_positions, device):
    """(student rows, teacher rows) of the pairs, checked; None, None: row i ↔ row i."""
    n_student = math.prod(student_lead)
    if (student_positions is None) != (teacher_positions is None):
        raise ValueError("student_positions and teacher_positions go together: give both (e.g. "
                         "fastdistill.xtok.chunk_pairs) or neither (row i ↔ row i)")
    if student_positions is None:
        if n_student != n_teacher:
            raise ValueError(f"without positions the rows pair one to one, but the student has "
                             f"{n_student} rows and the teacher {n_teacher}; pass "
                             "student_positions/teacher_positions (fastdistill.xtok.chunk_pairs)")
        return None, None
    out = []
    for name, x, n in (("student_positions", student_positions, n_student),
                       ("teacher_positions", teacher_positions, n_teacher)):
        x = _pos_tensor(name, x)
        if x.dim() != 1:
            raise ValueError(f"{name} must be 1-D (flat row indices), got {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the inputs are on {device}")
        if x.numel() and (bool((x < 0).any()) or bool((x >= n).any())):
            raise ValueError(f"{name} must be row indices in [0, {n})")
        out.append(x)
    if out[0].shape != out[1].shape:
        raise ValueError(f"student_positions has {out[0].numel()} pairs but teacher_positions "
                         f"{out[1].numel()}")
    return out[0], out[1]


def pair_labels(labels, student_lead, device, s_rows):
    """The student's labels at the pairs ((P,) int64), or None."""
    if labels is None:
        return None
    _checks.labels_for("labels", labels, student_lead, device)
    flat = labels.reshape(-1).long()
    return flat if s_rows is None else flat.index_select(0, s_rows)


class _ULDHead(torch.autograd.Function):
    """ULD_K rows of the student's LM head h Wᵀ + b, chunk by chunk. The gradient
    is computed in forward for uniform incoming row gradients (mean/sum) and
    recomputed, chunk by chunk, for any other; twice differentiated, backward
    goes through the differentiable form (it builds the rows × V logits)."""

    @staticmethod
    def forward(ctx, h, W, bias, a, tail_t, T, chunk, precompute):
        need = precompute and (h.requires_grad or W.requires_grad
                               or (bias is not None and bias.requires_grad))
        rows, grads = _head_pass(h, W, bias, a, tail_t, T, chunk, None if need else False)
        ctx.save_for_backward(h, W, bias, a, tail_t)
        ctx.grads, ctx.T, ctx.chunk = grads, T, chunk
        return rows

    @staticmethod
    def backward(ctx, g_rows):
        h, W, bias, a, tail_t = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: exact, through the differentiable form
            with torch.enable_grad():
                z = h @ W.t() if bias is None else torch.addmm(bias, h, W.t())
                rows = uld_rows(z.to(_acc(z.dtype)) / ctx.T, a, tail_t)
                inputs = [x for x in (h, W, bias) if x is not None and x.requires_grad]
                got = iter(torch.autograd.grad(rows, inputs, g_rows, create_graph=True,
                                               allow_unused=True))
            gh, gW, gb = (next(got) if x is not None and x.requires_grad else None
                          for x in (h, W, bias))
            return gh, gW, gb, None, None, None, None, None
        uniform = ctx.grads is not None and g_rows.numel() > 0 and bool((g_rows == g_rows[0]).all())
        if uniform:
            gh, gW, gb = ctx.grads
            s = g_rows[0]
            gh, gW = (gh * s).to(h.dtype), (gW * s).to(W.dtype)
            gb = None if gb is None else (gb * s).to(bias.dtype)
        else:
            _, (gh, gW, gb) = _head_pass(h, W, bias, a, tail_t, ctx.T, ctx.chunk, g_rows)
            gh, gW = gh.to(h.dtype), gW.to(W.dtype)
            gb = None if gb is None else gb.to(bias.dtype)
        return gh, gW, gb, None, None, None, None, None


def _head_pass(h, W, bias, a, tail_t, T, chunk, weights):
    """Rows of ULD_K over chunks of ``chunk`` rows; the gradients (h, W, b) of
    Σ weights·rows too unless ``weights`` is False (None: weights 1)."""
    n = h.shape[0]
    acc = _acc(h.dtype)
    rows = torch.empty(n, dtype=acc, device=h.device)
    want = weights is not False
    gh = torch.zeros(h.shape, dtype=acc, device=h.device) if want else None
    gW = torch.zeros(W.shape, dtype=acc, device=W.device) if want else None
    gb = torch.zeros(bias.shape, dtype=acc, device=W.device) if want and bias is not None else None
    hd, Wd = h.detach(), W.detach()
    bd = None if bias is None else bias.detach()
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        hc = hd[lo:hi]
        z = hc @ Wd.t() if bd is None else torch.addmm(bd, hc, Wd.t())
        with torch.enable_grad():
            z = z.to(acc).requires_grad_(want)
            r = uld_rows(z / T, a[lo:hi], tail_t[lo:hi])
            if want:
                w = torch.ones_like(r) if weights is None else weights[lo:hi].to(acc)
                (gz,) = torch.autograd.grad(r, z, w)
        rows[lo:hi] = r.detach()
        if want:
            gh[lo:hi] = gz @ Wd.to(acc)
            gW.addmm_(gz.t(), hc.to(acc))
            if gb is not None:
                gb += gz.sum(0)
    return rows, (gh, gW, gb) if want else None


def teacher_topk(teacher_logprobs, teacher_tail):
    """(rows (N, K) sorted decreasing probabilities in the accumulation dtype,
    tail (N,)) of a checked teacher top-k."""
    lp = _checks.tensor("teacher_logprobs", teacher_logprobs, floating=True)
    if lp.dim() < 1 or lp.shape[-1] == 0:
        raise ValueError(f"teacher_logprobs must have shape (..., K) with K >= 1, got "
                         f"{tuple(lp.shape)}")
    if lp.requires_grad and torch.is_grad_enabled():
        raise ValueError("teacher_logprobs requires grad, but the teacher is a constant: pass "
                         "teacher_logprobs.detach()")
    acc = _acc(lp.dtype)
    K = lp.shape[-1]
    a = lp.detach().reshape(-1, K).to(acc).exp().sort(-1, descending=True).values
    total = a.sum(-1)
    if bool((total > 1 + PROB_SUM_TOL).any()):
        raise ValueError(f"teacher_logprobs must be log-probabilities: their probabilities may "
                         f"sum to at most 1 per row (+{PROB_SUM_TOL}), got "
                         f"{float(total[total > 1 + PROB_SUM_TOL][0]):.6g}")
    if teacher_tail is None:
        tail = (1 - total).clamp_min(0)
    else:
        tt = _checks.tensor("teacher_tail", teacher_tail, floating=True)
        if tt.shape != lp.shape[:-1]:
            raise ValueError(f"teacher_tail must have shape {tuple(lp.shape[:-1])} "
                             f"(teacher_logprobs without K), got {tuple(tt.shape)}")
        if tt.device != lp.device:
            raise ValueError(f"teacher_tail is on {tt.device} but teacher_logprobs on {lp.device}")
        tail = tt.detach().reshape(-1).to(acc)
        if bool((tail < 0).any()) or bool((tail > 1).any()):
            raise ValueError("teacher_tail must be a probability mass in [0, 1]")
    return a, tail


def student_side(student_logits, student_hidden, student_weight, student_bias):
    """(kind, tensor (..., V or H), weight, bias) of the student, checked."""
    if (student_logits is None) == (student_hidden is None and student_weight is None):
        raise ValueError("give the student exactly one way: student_logits, or student_hidden + "
                         "student_weight")
    if student_logits is not None:
        if student_bias is not None:
            raise ValueError("student_bias applies to student_weight, not to student_logits")
        z = _checks.tensor("student_logits", student_logits, floating=True)
        if z.dim() < 1 or z.shape[-1] == 0:
            raise ValueError(f"student_logits must have shape (..., V) with V >= 1, got "
                             f"{tuple(z.shape)}")
        return "logits", z, None, None
    if student_hidden is None or student_weight is None:
        raise ValueError("student_hidden and student_weight go together: give both")
    h = _checks.tensor("student_hidden", student_hidden, floating=True)
    W = _checks.tensor("student_weight", student_weight, floating=True)
    if h.dim() < 1 or W.dim() != 2 or W.shape[1] != h.shape[-1] or W.shape[0] == 0:
        raise ValueError(f"student_weight must have shape (V, H) with H = student_hidden's last "
                         f"dimension {h.shape[-1] if h.dim() else None}, got {tuple(W.shape)}")
    if student_bias is not None:
        _checks.tensor("student_bias", student_bias, floating=True)
        if student_bias.shape != (W.shape[0],):
            raise ValueError(f"student_bias must have shape ({W.shape[0]},), got "
                             f"{tuple(student_bias.shape)}")
    _checks.same_device(student_hidden=h, student_weight=W, student_bias=student_bias)
    if W.dtype != h.dtype or (student_bias is not None and student_bias.dtype != h.dtype):
        raise TypeError(f"student_weight/student_bias must have student_hidden's dtype {h.dtype}")
    return "hidden", h, W, student_bias


def _chunk_arg(chunk_size, n, V, elem):
    if chunk_size is None:
        return default_chunk_size(max(n, 1), V, elem)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    return chunk_size


def reduce_pairs(rows, keep_idx, n_pairs, reduction, lead_shape):
    """'mean' over the kept pairs (0 when none), 'sum', 'none' (0 at dropped pairs)."""
    if reduction == "none":
        out = rows.new_zeros(n_pairs).index_copy(0, keep_idx, rows)
        return out.reshape(lead_shape)
    total = rows.sum()
    return total if reduction == "sum" else total / max(keep_idx.numel(), 1)


def uld_loss(teacher_logprobs: torch.Tensor, *,
             student_logits: torch.Tensor | None = None,
             student_hidden: torch.Tensor | None = None,
             student_weight: torch.Tensor | None = None,
             student_bias: torch.Tensor | None = None,
             teacher_tail: torch.Tensor | None = None,
             student_positions: torch.Tensor | None = None,
             teacher_positions: torch.Tensor | None = None,
             temperature: float = 1.0,
             labels: torch.Tensor | None = None,
             ignore_index: int = -100,
             reduction: str = "mean",
             t2_scale: bool = True,
             chunk_size: int | None = None) -> torch.Tensor:
    """ULD (sorted-L1 / sorted-W1) between teacher and student, top-k form
    (module docstring: the formula and the bound 0 ≤ exact − ULD_K ≤ 2·min(tail_T, tail_S)).

    ``teacher_logprobs`` (..., K): the teacher's K largest log-probabilities per
    row *at the distillation temperature* (any order; −inf = probability 0),
    e.g. ``torch.log_softmax(z_t / T, -1).topk(K).values`` or a store's top-k
    rows; ``teacher_tail`` (...,): its mass outside them (default
    1 − Σ exp(teacher_logprobs), clamped at 0). The token ids do not matter to
    ULD. K may exceed V_s: the head is K' = min(K, V_s) ranks, the teacher's
    ranks beyond K' join its tail.

    The student: ``student_logits`` (..., V) or ``student_hidden`` (..., H) +
    ``student_weight`` (V, H) (+ ``student_bias``), its LM head applied
    ``chunk_size`` pair rows at a time (no pairs × V tensor); q = softmax(z / T).

    Pairs: ``student_positions``/``teacher_positions`` (P,) flat row indices
    into the student's and the teacher's rows (:func:`chunk_pairs`: the last
    token of each aligned chunk on each side); neither: row i ↔ row i (same
    number of rows). ``labels`` (the student's leading shape): a pair whose
    student row is labelled ``ignore_index`` is dropped. ``reduction``: "mean"
    over the kept pairs (0 when none), "sum", "none" (one value per pair, 0
    when dropped; the student's leading shape without positions).
    ``t2_scale`` multiplies by T². Gradient to the student only. NaN or inf in
    a kept pair's inputs gives NaN for it. Twice differentiable (exactly, almost
    everywhere; the head path then builds the pairs × V logits).
    """
    _checks.choice("reduction", reduction, REDUCTIONS)
    T = _checks.temperature(temperature)
    _checks.flag("t2_scale", t2_scale)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    kind, x, W, bias = student_side(student_logits, student_hidden, student_weight, student_bias)
    _checks.same_device(student=x, teacher_logprobs=_checks.tensor("teacher_logprobs",
                                                                   teacher_logprobs))
    a, tail_t = teacher_topk(teacher_logprobs, teacher_tail)
    V = x.shape[-1] if kind == "logits" else W.shape[0]
    lead = x.shape[:-1]
    s_rows, t_rows = pair_rows(lead, a.shape[0], student_positions, teacher_positions, x.device)
    lab = pair_labels(labels, lead, x.device, s_rows)
    n_pairs = a.shape[0] if s_rows is None else s_rows.numel()
    out_shape = lead if s_rows is None else (n_pairs,)
    keep = (torch.ones(n_pairs, dtype=torch.bool, device=x.device) if lab is None
            else lab != ignore_index)
    keep_idx = keep.nonzero().squeeze(1)
    s_idx = keep_idx if s_rows is None else s_rows.index_select(0, keep_idx)
    t_idx = keep_idx if t_rows is None else t_rows.index_select(0, keep_idx)
    K = min(a.shape[1], V)
    a_k = a.index_select(0, t_idx)
    tail_k = tail_t.index_select(0, t_idx) + a_k[:, K:].sum(-1)
    a_k = a_k[:, :K].contiguous()
    flat = x.reshape(-1, x.shape[-1])
    chunk = _chunk_arg(chunk_size, s_idx.numel(), V, x.element_size())
    acc = torch.promote_types(_acc(x.dtype), a.dtype)
    a_k, tail_k = a_k.to(acc), tail_k.to(acc)
    if kind == "logits":
        parts = []
        for lo in range(0, s_idx.numel(), chunk):
            zc = flat.index_select(0, s_idx[lo:lo + chunk]).to(acc)
            parts.append(uld_rows(zc / T, a_k[lo:lo + chunk], tail_k[lo:lo + chunk]))
        rows = torch.cat(parts) if parts else flat[:0].to(acc).sum(-1)  # keeps the graph
    else:
        h = flat.index_select(0, s_idx)
        rows = _ULDHead.apply(h, W, bias, a_k, tail_k, T, chunk, reduction != "none")
    if t2_scale:
        rows = rows * (T * T)
    return reduce_pairs(rows, keep_idx, n_pairs, reduction, out_shape)
