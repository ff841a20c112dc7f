"""Vocabulary-parallel KD: ``kd_loss(..., process_group=group)``.

The logits are sharded over the vocabulary across the ranks of a
``torch.distributed`` process group: every rank holds the same rows (tokens)
and its own contiguous slice of columns, rank r (in group-rank order) the
columns ``[offset_r, offset_r + V_r)``; widths may differ between ranks, and a
rank's student and teacher shards have the same width. Labels are *global*
vocabulary ids, identical on every rank. Every rank gets the full-vocabulary
loss, and the gradient with respect to its own shard (gradients stay local).

How (``shared/notes/kd-math.md`` §1): with the global log-sum-exp of each
side known (row max all-reduced with MAX, then the sum of exponentials with
SUM), each rank has the normalized log-probabilities ℓ = u − LSE of its
columns. Every divergence of ``reference/kd.py`` is a sum over the vocabulary
of an elementwise f(ℓ_s, ℓ_t): mixtures (JSD, skew KL) and TVD are
elementwise once both sides are normalized, and TAID's target is the
log-softmax of a mix with the stop-gradient student, elementwise given the
mix's own global LSE. So each rank sums its own terms, and one SUM all-reduce
gives the row loss. The gradient: g_j = ∂f_j/∂ℓ_s,j is local (autograd on the
local elementwise terms, the very expressions of the reference, so the
extreme-value handling is the reference's: p = 0 terms count 0, sign(0) = 0);
with S = Σ_vocab g (all-reduced with the loss), ∂L/∂u_j = g_j − q_j·S, and
∂L/∂z = (∂L/∂u)/T. The cross-entropy term needs the LSE of z at T = 1 (the
same as the soft one when T = 1) and z[label], which the owning rank
contributes to a SUM all-reduce; its gradient is softmax(z)_j − [j = label].

Collectives per call: one all_gather of each rank's shape (which validates
the layout on every rank alike, so a bad shard raises the same ValueError
everywhere instead of deadlocking), one all_reduce MAX and two all_reduce SUM,
all of O(rows) size. They are plain ``torch.distributed`` collectives, so the
same code runs on gloo (CPU) and nccl (GPU).

This path is torch ops plus collectives on any device: it does not use the
fused kernels (cpp/triton) yet, whatever ``backend`` says.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .._backend import BACKENDS
from ..reference import kd as ref
from .options import scaled_gradient

DIVERGENCES = ref.DIVERGENCES


# ----------------------------------------------------------------- layout

class ShardLayout(tuple):
    """(offset, vocab_size): this rank's first global column, and the global V."""

    __slots__ = ()

    def __new__(cls, offset: int, vocab_size: int):
        return super().__new__(cls, (int(offset), int(vocab_size)))

    @property
    def offset(self) -> int:
        return self[0]

    @property
    def vocab_size(self) -> int:
        return self[1]


def _group_rank_size(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialized; "
                         "call torch.distributed.init_process_group first")
    return dist.get_rank(group), dist.get_world_size(group)


def shard_layout(student: torch.Tensor, teacher: torch.Tensor, group, *, plan: tuple = ()) -> ShardLayout:
    """Gather every rank's (rows, student width, teacher width, *plan) with one
    all_gather; check them identically on every rank (so all ranks raise the
    same ValueError together) and return this rank's ``ShardLayout``.

    ``plan`` is a tuple of ints that decide the shapes of the later collectives
    (accumulation dtype, divergence, ...): ranks that disagree would deadlock,
    so they raise instead."""
    rank, world = _group_rank_size(group)
    mine = torch.tensor([student.shape[0], student.shape[-1], teacher.shape[-1], *plan],
                        dtype=torch.int64, device=student.device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    table = torch.stack(everyone).cpu().tolist()
    bad = [r for r, (_, vs, vt, *_) in enumerate(table) if vs != vt]
    if bad:
        detail = ", ".join(f"rank {r}: student {table[r][1]}, teacher {table[r][2]}" for r in bad)
        raise ValueError("with process_group, the student_logits and teacher_logits shards on a "
                         f"rank must have the same vocabulary width; got {detail}")
    rows = {row[0] for row in table}
    if len(rows) != 1:
        raise ValueError("with process_group, every rank must hold the same rows (the vocabulary "
                         f"is sharded, not the tokens); got row counts {[row[0] for row in table]}")
    plans = {tuple(row[3:]) for row in table}
    if len(plans) != 1:
        raise ValueError("with process_group, every rank must call the loss with the same "
                         "options and logits dtype; the ranks disagree")
    if any(row[1] <= 0 for row in table):
        raise ValueError("with process_group, every rank's vocabulary shard must be non-empty; "
                         f"got widths {[row[1] for row in table]}")
    widths = [row[1] for row in table]
    return ShardLayout(sum(widths[:rank]), sum(widths))


def collective_plan(opt, dtype: torch.dtype, *extra: int) -> tuple:
    """The ints that fix the shapes of ``vocab_parallel_forward``'s collectives
    for these options (and any ``extra`` a caller adds, such as its chunk
    size): ``shard_layout(plan=...)`` makes every rank agree on them."""
    return (int(dtype == torch.float64), opt.div_index,
            int(opt.divergence == "taid" and opt.param not in (0.0, 1.0)),
            int(opt.hard_weight > 0 and opt.temperature != 1.0), *extra)


def check_global_labels(labels, opt, layout: ShardLayout) -> None:
    """Labels of the cross-entropy term are global vocabulary ids (same on every rank)."""
    if labels is None or opt.hard_weight <= 0:
        return
    bad = (labels != opt.ignore_index) & ((labels < 0) | (labels >= layout.vocab_size))
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, {layout.vocab_size}) (global vocabulary ids "
                         f"across the process group) or equal ignore_index={opt.ignore_index}")


# ----------------------------------------------------------------- elementwise divergences

def _kl_terms(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Elementwise p (log p − log q); terms with p = 0 count 0 (both logs
    masked before they meet: no NaN value or gradient at p = 0)."""
    p = logp.exp()
    live = p > 0
    zero = torch.zeros_like(p)
    return p * (torch.where(live, logp, zero) - torch.where(live, logq, zero))


def _log_mix(log_a: torch.Tensor, weight_a: float, log_b: torch.Tensor) -> torch.Tensor:
    """log(w a + (1 − w) b) as a logaddexp, which never underflows."""
    la = log_a + math.log(weight_a) if weight_a > 0 else torch.full_like(log_a, -math.inf)
    lb = log_b + math.log1p(-weight_a) if weight_a < 1 else torch.full_like(log_b, -math.inf)
    return torch.logaddexp(la, lb)


def _terms(name: str, ls: torch.Tensor, lt: torch.Tensor, lpt: torch.Tensor | None,
           param: float) -> torch.Tensor:
    """f(ℓ_s, ℓ_t) per vocabulary entry; the row divergence is its sum over the vocabulary."""
    if name == "forward_kl":
        return _kl_terms(lt, ls)
    if name == "reverse_kl":
        return _kl_terms(ls, lt)
    if name == "jsd":
        lm = _log_mix(lt, param, ls)
        return param * _kl_terms(lt, lm) + (1 - param) * _kl_terms(ls, lm)
    if name == "tvd":
        return 0.5 * (ls.exp() - lt.exp()).abs()
    if name == "skew_forward_kl":  # m = λ p + (1 − λ) q
        return _kl_terms(lt, _log_mix(lt, param, ls))
    if name == "skew_reverse_kl":  # m = (1 − λ) p + λ q
        return _kl_terms(ls, _log_mix(ls, param, lt))
    if name == "taid":
        return _kl_terms(lpt, ls)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {name!r}")


# ----------------------------------------------------------------- the fused contract, sharded

def vocab_parallel_forward(student, teacher, labels, ignore_index, div, param, temperature,
                           hard_weight, soft_scale, mean_scale, need_grad, group, *,
                           row_count: int | None = None, layout: ShardLayout | None = None):
    """``(loss_rows, grad)`` of ``kd._fused_forward`` for vocabulary shards.

    ``student``, ``teacher``: this rank's (N, V_local) shards, the same N on
    every rank; ``labels``: (N,) int64 *global* vocabulary ids or None, the
    same on every rank (ids of rows that count must be in [0, V) when
    ``hard_weight > 0``: checked by the public function, not here). ``div``
    indexes ``DIVERGENCES``; ``param`` is beta (jsd), skew (skew_*), t (taid);
    ``soft_scale`` is T² or 1. Computes in float32 (float64 stays float64).

    Returns ``loss_rows`` (N,) in the accumulation dtype, the full-vocabulary
    loss of each row (0 at ignored rows), identical on every rank; and
    ``grad`` = d(Σ rows)/d(this rank's student shard) in the student's dtype
    (0 at ignored rows), or an empty tensor without ``need_grad``.

    With ``mean_scale`` the gradient is divided by the number of rows that
    count: those of this call, or ``row_count`` when given — a chunked caller
    passes the count of the whole batch so that each chunk's gradient is
    already that of the batch mean. ``layout`` (from ``shard_layout``) skips
    the all_gather that finds this rank's column offset, for callers that
    computed it once for many chunks.

    Every rank must make the same call (a collective): 3 or 4 collectives of
    O(N) size. No fused kernel is used.
    """
    name = DIVERGENCES[div]
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    ce = hard_weight > 0
    if ce and labels is None:
        raise ValueError("hard_weight > 0 needs labels for the cross-entropy term")
    # the extra log-sum-exps this call needs, beyond the student's and the teacher's
    taid_mix = name == "taid" and param not in (0.0, 1.0)
    ce_own_lse = ce and temperature != 1.0
    if layout is None:
        layout = shard_layout(student, teacher, group,
                              plan=(int(acc == torch.float64), div, int(taid_mix), int(ce_own_lse)))
    N, V = student.shape
    z = student.detach().to(acc)
    zt = teacher.detach().to(acc)
    valid = None
    if labels is not None:
        valid = labels != ignore_index
        # ignored rows count nowhere: harmless logits there, as in the reference
        dropped = ~valid.unsqueeze(-1)
        z = torch.where(dropped, torch.zeros_like(z), z)
        zt = torch.where(dropped, torch.zeros_like(zt), zt)
    u = z / temperature
    v = zt / temperature

    sides = [u, v]
    if taid_mix:
        sides.append((1 - param) * u + param * v)
    if ce_own_lse:
        sides.append(z)
    extra = []
    if ce:  # z[label] from the rank that owns the label; 0 from the others
        local = labels - layout.offset
        own = valid & (local >= 0) & (local < V)
        picked = z.gather(1, local.clamp(0, V - 1).unsqueeze(1)).squeeze(1)
        extra.append(torch.where(own, picked, torch.zeros_like(picked)))

    # global log-sum-exps: row max (MAX), then the sum of exponentials (SUM)
    top = torch.stack([x.amax(-1) for x in sides])
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack([(x - top[i].unsqueeze(-1)).exp().sum(-1) for i, x in enumerate(sides)]
                       + extra)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    lse = top + sums[: len(sides)].log()

    ls = u - lse[0].unsqueeze(-1)
    lt = v - lse[1].unsqueeze(-1)
    lpt = None
    if name == "taid":
        lpt = ls if param == 0.0 else lt if param == 1.0 else sides[2] - lse[2].unsqueeze(-1)

    with torch.enable_grad():
        leaf = ls.detach().requires_grad_(need_grad)
        f = _terms(name, leaf, lt, lpt, param)
        part = f.sum(-1)
        g = torch.autograd.grad(f.sum(), leaf)[0] if need_grad else None
    part = part.detach()
    total = torch.stack([part, g.sum(-1) if need_grad else torch.zeros_like(part)])
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    soft, S = total[0], total[1]

    loss = (1.0 - hard_weight) * (soft * soft_scale)
    if ce:
        lse_z = lse[-1] if ce_own_lse else lse[0]  # at T = 1, u = z
        loss = loss + hard_weight * (lse_z - sums[len(sides)])
    if valid is not None:
        loss = torch.where(valid, loss, torch.zeros_like(loss))
    if not need_grad:
        return loss, student.new_empty(0)

    q = ls.exp()
    grad = (g - q * S.unsqueeze(-1)) * ((1.0 - hard_weight) * soft_scale / temperature)
    if ce:
        pz = (z - lse_z.unsqueeze(-1)).exp() if ce_own_lse else q
        grad = grad + hard_weight * pz
        rows = own.nonzero().squeeze(1)
        grad.index_put_((rows, local[rows]), grad.new_tensor(-hard_weight), accumulate=True)
    if valid is not None:
        grad = torch.where(valid.unsqueeze(-1), grad, torch.zeros_like(grad))
    if mean_scale:
        if row_count is not None:
            count = int(row_count)
        else:
            count = N if valid is None else int(valid.sum())
        grad = grad / max(count, 1)
    return loss, grad.to(student.dtype)


class _VocabParallelKD(torch.autograd.Function):
    """The gradient is computed in forward (one pass of collectives); backward
    scales it by the incoming gradient (per row for reduction='none'). It has
    no second derivative: differentiated twice it raises, never a wrong HVP."""

    @staticmethod
    def forward(ctx, student, teacher, labels, ignore_index, div, param, temperature,
                hard_weight, soft_scale, reduction, group, layout):
        rows, grad = vocab_parallel_forward(student, teacher, labels, ignore_index, div, param,
                                            temperature, hard_weight, soft_scale,
                                            reduction == "mean", True, group, layout=layout)
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        return ref.reduce_rows(rows, labels, ignore_index, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError("kd_loss with process_group cannot be differentiated twice (the "
                               "vocabulary-parallel kernel has no second derivative)")
        (grad,) = ctx.saved_tensors
        return (scaled_gradient(grad, grad_out, ctx.reduction, False),) + (None,) * 11


def vocab_parallel_kd_loss(s: torch.Tensor, t: torch.Tensor, labels, opt, *,
                           inplace_backward: bool, process_group, backend: str) -> torch.Tensor:
    """``kd_loss`` with ``process_group``: called by ``kd_loss`` after its own
    argument checks, with ``opt`` its checked ``KDOptions``. Shapes (..., V_local)."""
    if opt.vocab_mismatch != "error":
        raise ValueError(
            f"vocab_mismatch={opt.vocab_mismatch!r} is not supported with process_group: the "
            "vocabulary is sharded, so pad or truncate the shards before the call "
            "(pad with -inf logits, never 0)"
        )
    if inplace_backward:
        raise ValueError("inplace_backward=True is not supported with process_group yet")
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "teacher_logits requires grad, but the teacher is a constant in KD: pass "
            "teacher_logits.detach()"
        )
    lead = s.shape[:-1]
    s2 = s.reshape(-1, s.shape[-1])
    t2 = t.reshape(-1, t.shape[-1])
    l1 = None if labels is None else labels.reshape(-1).to(torch.int64)
    layout = shard_layout(s2, t2, process_group, plan=collective_plan(opt, s2.dtype))
    check_global_labels(l1, opt, layout)
    args = (s2, t2.detach(), l1, opt.ignore_index, opt.div_index, opt.param, opt.temperature,
            opt.hard_weight, opt.soft_scale)
    if torch.is_grad_enabled() and s2.requires_grad:
        out = _VocabParallelKD.apply(*args, opt.reduction, process_group, layout)
    else:  # evaluation: no gradient computed
        rows, _ = vocab_parallel_forward(*args, opt.reduction == "mean", False, process_group,
                                         layout=layout)
        out = ref.reduce_rows(rows, l1, opt.ignore_index, opt.reduction)
    return out.reshape(lead) if opt.reduction == "none" else out
