"""ALM: approximate likelihood matching of chunk log-likelihoods across tokenizers.

Minixhofer, Vulić & Ponti (2025), "Universal Cross-Tokenizer Distillation via
Approximate Likelihood Matching". For a chunk c (``align``), each side's
log-likelihood is the sum of its observed tokens' log-probs over the chunk,
log p(c) = Σ_{i ∈ c} log p(x_i | x_<i) (token i's log-prob read at position
i − 1, as a causal LM predicts it). With x = log p_T(c)/τ and y = log p_S(c)/τ
(the log of p^{1/τ}) and p' = eˣ, q' = eʸ, the binarised divergences are

- ``binary_ce``: −p' y − (1 − p') log(1 − q')
- ``binary_kl``: p'(x − y) + (1 − p')(log(1 − p') − log(1 − q'))  (same gradient, 0 at a match)
- ``reverse_binary_kl``: q'(y − x) + (1 − q')(log(1 − q') − log(1 − p'))

log(1 − eᵘ) is computed as log1mexp (−expm1 near 0, log1p(−exp) below −ln 2).
A term whose weight 1 − p' (or 1 − q') is exactly 0 counts 0.

The student's token log-probs come from its hidden states and LM head through
``fused_linear_kd_loss`` with ``hard_weight=1`` (per-row cross-entropy; its
soft part is weighted 0 and is itself 0: a one-id sparse teacher at the label,
``tail="renormalize"``), so no tokens × vocabulary tensor exists; or directly
as a tensor. The teacher is a constant: log-probs (a stored 2-4 bytes per
token) or hidden + head through the same fused op under no_grad. Chunk sums
are one ``index_add``.
"""
from __future__ import annotations

import math

import torch

from .. import _checks
from ..kd.fused_linear import fused_linear_kd_loss

ALM_DIVERGENCES = ("binary_ce", "binary_kl", "reverse_binary_kl")
REDUCTIONS = ("mean", "sum", "none")
_LN2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x ≤ 0, accurate at both ends; each branch only ever sees
    inputs where it is finite, so the unused one leaks no NaN into the gradient."""
    near = x > -_LN2
    a = torch.where(near, x, torch.full_like(x, -1.0))
    b = torch.where(near, torch.full_like(x, -1.0), x)
    return torch.where(near, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


def _weighted_log1mexp(w_from: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(1 − e^w_from) · log(1 − eᵘ), 0 where the weight 1 − e^w_from is 0 (w_from = 0)."""
    dead = w_from == 0
    u_safe = torch.where(dead, torch.full_like(u, -1.0), u)
    w_safe = torch.where(dead, torch.full_like(w_from, -1.0), w_from)
    return torch.where(dead, torch.zeros_like(u), -torch.expm1(w_safe) * log1mexp(u_safe))


def alm_divergence(x: torch.Tensor, y: torch.Tensor, divergence: str) -> torch.Tensor:
    """Per-chunk binarised divergence of teacher x = log p_T/τ and student y = log p_S/τ."""
    if divergence == "binary_ce":
        return -(torch.exp(x) * y) - _weighted_log1mexp(x, y)
    if divergence == "binary_kl":
        return torch.exp(x) * (x - y) + _weighted_log1mexp(x, x) - _weighted_log1mexp(x, y)
    if divergence == "reverse_binary_kl":
        return torch.exp(y) * (y - x) + _weighted_log1mexp(y, y) - _weighted_log1mexp(y, x)
    raise ValueError(f"divergence must be one of {ALM_DIVERGENCES}, got {divergence!r}")


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, L) log-probs of the observed tokens from (B, L, V) causal-LM logits:
    entry i is log softmax(logits[:, i − 1])[ids[:, i]]; entry 0 (no
    prediction) is 0 and is never read by ``alm_loss``. Builds the full
    log-softmax: for users who have the logits anyway (the fused path of
    ``alm_loss`` never does)."""
    _checks.tensor("logits", logits, floating=True)
    _checks.tensor("ids", ids)
    if logits.dim() != 3 or ids.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, L, V) and ids (B, L), got {tuple(logits.shape)} and "
                         f"{tuple(ids.shape)}")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lp = torch.log_softmax(logits[:, :-1].to(acc), -1)
    picked = lp.gather(-1, ids[:, 1:].clamp_min(0).long().unsqueeze(-1)).squeeze(-1)
    return torch.cat([picked.new_zeros(ids.shape[0], 1), picked], 1)


def chunk_logprobs(token_lp: torch.Tensor, chunks: torch.Tensor, num_chunks: int,
                   use: torch.Tensor | None = None) -> torch.Tensor:
    """(num_chunks,) Σ of ``token_lp`` over each chunk's tokens (``chunks`` -1:
    none). ``use`` (bool, like chunks): only those tokens (others are not read,
    so a NaN there stays out)."""
    flat_c = chunks.reshape(-1)
    sel = flat_c >= 0 if use is None else use.reshape(-1) & (flat_c >= 0)
    idx = sel.nonzero().squeeze(1)
    vals = token_lp.reshape(-1).index_select(0, idx)
    return vals.new_zeros(num_chunks).index_add(0, flat_c.index_select(0, idx), vals)


def _chunks_arg(name: str, x, device=None) -> torch.Tensor:
    x = _checks.tensor(name, x)
    if x.dtype.is_floating_point or x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be an integer tensor (from fastdistill.xtok.align), got "
                        f"{x.dtype}")
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (B, L) or (L,), got {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but the inputs are on {device}")
    return x.long()


def _labels_arg(name: str, labels, shape, device) -> torch.Tensor | None:
    if labels is None:
        return None
    _checks.tensor(name, labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.dim() == 1:
        labels = labels.unsqueeze(0)
    if labels.shape != shape:
        raise ValueError(f"{name} must have the chunks' shape {tuple(shape)}, got "
                         f"{tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the chunks are on {device}")
    return labels.long()


class _Side:
    """One side's token log-probs, checked: from a tensor, or hidden + head (fused)."""

    def __init__(self, side, chunks, logprobs, hidden, weight, bias, labels, ignore_index,
                 chunk_size, backend, teacher):
        self.side, self.teacher = side, teacher
        self.chunks = _chunks_arg(f"{side}_chunks", chunks)
        shape = self.chunks.shape
        head = hidden is not None or weight is not None
        if head == (logprobs is not None):
            raise ValueError(f"give the {side} exactly one way: {side}_logprobs, or "
                             f"{side}_hidden + {side}_weight")
        self.labels = _labels_arg(f"{side}_labels", labels, shape, self.chunks.device)
        self.ignore_index = ignore_index
        self.chunk_size, self.backend = chunk_size, backend
        if head:
            if hidden is None or weight is None:
                raise ValueError(f"{side}_hidden and {side}_weight go together: give both")
            hidden = _checks.tensor(f"{side}_hidden", hidden, floating=True)
            if hidden.dim() == 2 and shape[0] == 1:
                hidden = hidden.unsqueeze(0)
            if hidden.dim() != 3 or hidden.shape[:2] != shape:
                raise ValueError(f"{side}_hidden must have shape {tuple(shape)} + (H,) (the "
                                 f"chunks' shape), got {tuple(hidden.shape)}")
            if self.labels is None:
                raise ValueError(f"{side}_hidden needs {side}_labels: the observed token ids "
                                 f"whose log-probs the head gives ({ignore_index} where ignored)")
            _checks.tensor(f"{side}_weight", weight, floating=True)
            if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
                raise ValueError(f"{side}_weight must have shape (V, {hidden.shape[-1]}), got "
                                 f"{tuple(weight.shape)}")
            keep = self.labels != ignore_index
            bad = keep & ((self.labels < 0) | (self.labels >= weight.shape[0]))
            if bool(bad.any()):
                raise ValueError(f"{side}_labels must be in [0, {weight.shape[0]}) (the rows of "
                                 f"{side}_weight) or equal ignore_index={ignore_index}")
            if hidden.device != self.chunks.device:
                raise ValueError(f"{side}_hidden is on {hidden.device} but {side}_chunks is on "
                                 f"{self.chunks.device}")
            if teacher:
                hidden, weight = hidden.detach(), weight.detach()
                bias = None if bias is None else bias.detach()
            self.device = hidden.device
            self.acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        else:
            if bias is not None:
                raise ValueError(f"{side}_bias applies to {side}_weight")
            logprobs = _checks.tensor(f"{side}_logprobs", logprobs, floating=True)
            if logprobs.dim() == 1 and shape[0] == 1:
                logprobs = logprobs.unsqueeze(0)
            if logprobs.shape != shape:
                raise ValueError(f"{side}_logprobs must have the chunks' shape {tuple(shape)}, "
                                 f"got {tuple(logprobs.shape)}")
            if logprobs.device != self.chunks.device:
                raise ValueError(f"{side}_logprobs is on {logprobs.device} but {side}_chunks is "
                                 f"on {self.chunks.device}")
            if teacher and logprobs.requires_grad and torch.is_grad_enabled():
                raise ValueError("teacher_logprobs requires grad, but the teacher is a constant: "
                                 "pass teacher_logprobs.detach()")
            self.device = logprobs.device
            self.acc = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
        self.logprobs, self.hidden, self.weight, self.bias = logprobs, hidden, weight, bias

    def bad_tokens(self) -> torch.Tensor:
        """Tokens in a chunk that cannot count: position 0 (nothing predicts it) or ignored."""
        bad = torch.zeros_like(self.chunks, dtype=torch.bool)
        bad[:, 0] = True
        if self.labels is not None:
            bad |= self.labels == self.ignore_index
        return bad & (self.chunks >= 0)

    def token_lp(self, use: torch.Tensor) -> torch.Tensor:
        """(B, L) log-probs of the observed tokens (read only where ``use``)."""
        if self.logprobs is not None:
            return self.logprobs.to(self.acc)
        B, L = self.chunks.shape
        # row i - 1 predicts token i: the label of row j is token j + 1, where it is used
        shifted = torch.full_like(self.labels, self.ignore_index)
        shifted[:, :-1] = torch.where(use[:, 1:], self.labels[:, 1:], self.ignore_index)
        ids = shifted.clamp_min(0).unsqueeze(-1)
        zero = torch.zeros(ids.shape, dtype=self.hidden.dtype, device=self.device)
        ce = fused_linear_kd_loss(self.hidden, self.weight, student_bias=self.bias,
                                  teacher_sparse=(ids, zero), tail="renormalize", labels=shifted,
                                  hard_weight=1.0, reduction="none", ignore_index=self.ignore_index,
                                  chunk_size=self.chunk_size, backend=self.backend)
        return torch.cat([ce.new_zeros(B, 1), -ce[:, :-1]], 1).to(self.acc)


def alm_loss(student_chunks: torch.Tensor, teacher_chunks: torch.Tensor, *,
             student_logprobs: torch.Tensor | None = None,
             student_hidden: torch.Tensor | None = None,
             student_weight: torch.Tensor | None = None,
             student_bias: torch.Tensor | None = None,
             student_labels: torch.Tensor | None = None,
             teacher_logprobs: torch.Tensor | None = None,
             teacher_hidden: torch.Tensor | None = None,
             teacher_weight: torch.Tensor | None = None,
             teacher_bias: torch.Tensor | None = None,
             teacher_labels: torch.Tensor | None = None,
             num_chunks: int | None = None,
             divergence: str = "binary_ce",
             temperature: float = 1.0,
             ignore_index: int = -100,
             reduction: str = "mean",
             chunk_size: int | None = None,
             backend: str = "auto") -> torch.Tensor:
    """ALM chunk-likelihood matching loss (module docstring: the formula).

    ``student_chunks`` (B, Ls) / ``teacher_chunks`` (B, Lt): each position's
    chunk from :func:`fastdistill.xtok.align` (-1: none), numbered
    0..num_chunks-1 over the batch (``num_chunks``: the alignment's; None reads
    the largest id, one host sync). Each side is given one way:

    - ``*_logprobs`` (B, L): entry i = log p(token i | tokens < i) (entry 0
      unread; :func:`token_logprobs` makes it from logits), or
    - ``*_hidden`` (B, L, H) + ``*_weight`` (V, H) (+ ``*_bias``) with
      ``*_labels`` (B, L) the observed token ids: the LM head fused in
      (``fused_linear_kd_loss``, ``chunk_size``/``backend`` as there); row
      i − 1 gives token i's log-prob; no (L, V) tensor exists.

    ``*_labels`` with ``ignore_index`` mark tokens that must not count (a
    prompt, padding): a chunk with any such token, or with the token at
    position 0 (nothing predicts it), on either side, is dropped. Gradients
    reach the student only; the teacher is a constant (teacher log-probs that
    require grad are an error). ``reduction``: "mean" over the chunks kept (0
    when none is), "sum", "none" ((num_chunks,), 0 at dropped chunks).
    Non-finite: a NaN in a counted token's input makes its chunk's loss NaN.
    """
    _checks.choice("divergence", divergence, ALM_DIVERGENCES)
    _checks.choice("reduction", reduction, REDUCTIONS)
    tau = _checks.temperature(temperature)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    s = _Side("student", student_chunks, student_logprobs, student_hidden, student_weight,
              student_bias, student_labels, ignore_index, chunk_size, backend, teacher=False)
    t = _Side("teacher", teacher_chunks, teacher_logprobs, teacher_hidden, teacher_weight,
              teacher_bias, teacher_labels, ignore_index, chunk_size, backend, teacher=True)
    if s.chunks.shape[0] != t.chunks.shape[0]:
        raise ValueError(f"student_chunks has {s.chunks.shape[0]} sequences but teacher_chunks "
                         f"has {t.chunks.shape[0]}")
    if s.device != t.device:
        raise ValueError(f"the student's inputs are on {s.device} but the teacher's on {t.device}")
    biggest = int(torch.maximum(s.chunks.max(), t.chunks.max())) if s.chunks.numel() else -1
    if num_chunks is None:
        num_chunks = biggest + 1
    elif isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 0:
        raise ValueError(f"num_chunks must be an int >= 0 or None, got {num_chunks!r}")
    elif biggest >= num_chunks:
        raise ValueError(f"the chunks go up to {biggest} but num_chunks={num_chunks}")
    for side in (s, t):
        if bool((side.chunks < -1).any()):
            raise ValueError(f"{side.side}_chunks must be -1 (no chunk) or a chunk id >= 0")
    C = num_chunks
    dev = s.device
    count = torch.zeros(C, dtype=torch.int64, device=dev)
    kept = torch.ones(C, dtype=torch.bool, device=dev)
    for side in (s, t):
        c = side.chunks.reshape(-1)
        live = c >= 0
        has = count.index_add(0, c[live], torch.ones_like(c[live])) > 0
        bad = side.bad_tokens().reshape(-1)
        dropped = count.index_add(0, c[bad], torch.ones_like(c[bad])) > 0
        kept &= has & ~dropped
    sums = []
    for side in (s, t):
        use = (side.chunks >= 0) & kept[side.chunks.clamp_min(0)]
        if side.teacher:
            with torch.no_grad():
                lp = side.token_lp(use)
        else:
            lp = side.token_lp(use)
        sums.append(chunk_logprobs(lp, side.chunks, C, use))
    acc = torch.promote_types(s.acc, t.acc)
    keep_idx = kept.nonzero().squeeze(1)
    y = sums[0].to(acc).index_select(0, keep_idx) / tau
    x = sums[1].to(acc).index_select(0, keep_idx) / tau
    per_chunk = alm_divergence(x, y, divergence)
    if reduction == "none":
        return per_chunk.new_zeros(C).index_copy(0, keep_idx, per_chunk)
    total = per_chunk.sum()
    if reduction == "sum":
        return total
    return total / max(keep_idx.numel(), 1)
