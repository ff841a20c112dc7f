"""Exact-match cross-tokenizer KD: a teacher→student id map and the KD loss over mapped mass.

``vocab_map(student_tokenizer, teacher_tokenizer)`` is built once: teacher id
i maps to the student id j whose token spells the same bytes (byte-level
canonicalization: GPT-2's byte alphabet decoded to raw bytes, ``<0xNN>``
pieces, added tokens by their UTF-8 content), else -1. The map is injective:
where several ids of one side spell the same bytes, the lowest id is used and
the others are unmapped.

``mapped_kd_loss`` gathers through the map on the teacher's top-k ids: the
teacher's top-k entries whose id maps become bins at their student ids; the
mass of unmapped ids, with the teacher's mass outside its top-k, goes to the
**tail bucket**, compared with the student's mass outside the mapped ids,
exactly ``sparse_kd_loss(tail="bucket")`` (unmapped entries are its −inf
padding): P_tail = 1 − Σ_{mapped} P, Q_tail = 1 − Σ_{mapped} q. Any divergence
the bucket tail supports. Multi-token pieces (X-Token's projection of one
teacher token onto several student tokens) are not handled: such a teacher
token is unmapped and its mass is in the tail.
"""
from __future__ import annotations

import torch

from .. import _checks
from ..kd.fused_linear import fused_linear_kd_loss
from ..kd.sparse import sparse_kd_loss
from .uld import pair_labels, pair_rows, student_side
from .vocab import token_byte_lengths, token_bytes


def _spellings(tokenizer, name):
    lengths = token_byte_lengths(tokenizer, name).numpy()
    flat, start = token_bytes(tokenizer, name)
    data = flat.tobytes()
    return [data[start[i]:start[i] + lengths[i]] if lengths[i] > 0 else None
            for i in range(len(lengths))]


def vocab_map(student_tokenizer, teacher_tokenizer) -> torch.Tensor:
    """(V_t,) int64: each teacher id's student id with the same bytes, -1 where
    none (module docstring: the rule). Both must be fast tokenizers; a map that
    covers nothing (e.g. tokenizers whose byte spellings are unknown: WordPiece,
    Unigram) is a ValueError."""
    student = _spellings(student_tokenizer, "student_tokenizer")
    teacher = _spellings(teacher_tokenizer, "teacher_tokenizer")
    index: dict[bytes, int] = {}
    for j, b in enumerate(student):
        if b is not None and b not in index:
            index[b] = j
    out = torch.full((len(teacher),), -1, dtype=torch.int64)
    taken: set[int] = set()
    for i, b in enumerate(teacher):
        j = index.get(b) if b is not None else None
        if j is not None and j not in taken:
            out[i] = j
            taken.add(j)
    if not taken:
        raise ValueError("teacher_tokenizer and student_tokenizer share no token spelling (the map "
                         "covers nothing): exact matching needs byte-level or byte-fallback "
                         "vocabularies")
    return out


def map_teacher(teacher_ids, teacher_logprobs, vocab_map_, V_s):
    """(student ids (N, K), logprobs (N, K)) of a teacher top-k through the map:
    unmapped entries get id 0 and log-prob −inf (no bin: their mass is in the tail)."""
    ids = _checks.tensor("teacher_ids", teacher_ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"teacher_ids must be an integer tensor, got {ids.dtype}")
    lp = _checks.tensor("teacher_logprobs", teacher_logprobs, floating=True)
    m = _checks.tensor("vocab_map", vocab_map_)
    if m.dtype != torch.int64 or m.dim() != 1:
        raise TypeError(f"vocab_map must be a 1-D int64 tensor (fastdistill.xtok.vocab_map), got "
                        f"{m.dtype} of shape {tuple(m.shape)}")
    _checks.same_device(teacher_ids=ids, teacher_logprobs=lp, vocab_map=m)
    if ids.dim() < 1 or ids.shape != lp.shape or ids.shape[-1] == 0:
        raise ValueError(f"teacher_ids and teacher_logprobs must have one shape (..., K), K >= 1, "
                         f"got {tuple(ids.shape)} and {tuple(lp.shape)}")
    if m.numel() and int(m.max()) >= V_s:
        raise ValueError(f"vocab_map points at student id {int(m.max())}, outside the student's "
                         f"vocabulary of {V_s}")
    K = ids.shape[-1]
    ids2, lp2 = ids.reshape(-1, K).long(), lp.reshape(-1, K)
    finite = lp2 > -float("inf")
    bad = finite & ((ids2 < 0) | (ids2 >= m.numel()))
    if bool(bad.any()):
        raise ValueError(f"teacher_ids must be in [0, {m.numel()}) (vocab_map's teacher "
                         f"vocabulary), got {int(ids2[bad][0])}")
    mapped = m[ids2.clamp(0, max(m.numel() - 1, 0))]
    hit = finite & (mapped >= 0)
    neg = torch.full((), -float("inf"), dtype=lp2.dtype, device=lp2.device)
    return torch.where(hit, mapped, 0), torch.where(hit, lp2, neg)


def mapped_kd_loss(teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                   vocab_map: torch.Tensor, *,
                   student_logits: torch.Tensor | None = None,
                   student_hidden: torch.Tensor | None = None,
                   student_weight: torch.Tensor | None = None,
                   student_bias: torch.Tensor | None = None,
                   student_positions: torch.Tensor | None = None,
                   teacher_positions: torch.Tensor | None = None,
                   divergence: str = "forward_kl",
                   temperature: float = 1.0,
                   beta: float = 0.5,
                   skew: float = 0.1,
                   labels: torch.Tensor | None = None,
                   ignore_index: int = -100,
                   reduction: str = "mean",
                   t2_scale: bool = True,
                   chunk_size: int | None = None,
                   backend: str = "auto") -> torch.Tensor:
    """KD over the teacher's mapped top-k mass (module docstring: the rule).

    ``teacher_ids``/``teacher_logprobs`` (..., K): the teacher's top-k in its own
    vocabulary, log-probabilities at the distillation temperature (−inf:
    padding); ``vocab_map`` (V_t,) from :func:`vocab_map`. The student:
    ``student_logits`` (..., V_s), or ``student_hidden`` (..., H) +
    ``student_weight`` (V_s, H) (+ bias) through ``fused_linear_kd_loss`` (no
    pairs × V tensor; ``chunk_size``). Pairs, ``labels``/``ignore_index`` and
    ``reduction`` as in :func:`fastdistill.xtok.uld_loss` ("mean" over the kept
    pairs). ``divergence`` (and ``beta``/``skew``), ``temperature``, ``t2_scale``,
    ``backend``, the non-finite and double-backward rules are
    ``sparse_kd_loss``'s with ``tail="bucket"``.
    """
    kind, x, W, bias = student_side(student_logits, student_hidden, student_weight, student_bias)
    V_s = x.shape[-1] if kind == "logits" else W.shape[0]
    ids, lp = map_teacher(teacher_ids, teacher_logprobs, vocab_map, V_s)
    _checks.same_device(student=x, teacher_ids=ids)
    lead = x.shape[:-1]
    s_rows, t_rows = pair_rows(lead, ids.shape[0], student_positions, teacher_positions, x.device)
    lab = pair_labels(labels, lead, x.device, s_rows)
    flat = x.reshape(-1, x.shape[-1])
    if s_rows is not None:
        flat = flat.index_select(0, s_rows)
        ids, lp = ids.index_select(0, t_rows), lp.index_select(0, t_rows)
    kw = dict(tail="bucket", divergence=divergence, temperature=temperature, beta=beta, skew=skew,
              labels=lab, ignore_index=ignore_index, reduction=reduction, t2_scale=t2_scale,
              backend=backend)
    if kind == "logits":
        out = sparse_kd_loss(flat, ids, lp, **kw)
    else:
        out = fused_linear_kd_loss(flat, W, student_bias=bias, teacher_sparse=(ids, lp),
                                   chunk_size=chunk_size, **kw)
    if reduction == "none" and s_rows is None:
        return out.reshape(lead)
    return out
