"""Readable cross-tokenizer references: the specification the vectorized
``fastdistill.xtok`` is tested against.

- ``byte_level_spans``: the byte span of each token of a byte-level BPE
  encoding, by decoding each token's string through GPT-2's byte alphabet and
  walking the text's UTF-8 bytes (a Python loop; exact by construction).
- ``align_spans``: the classic two-pointer chunking of two tilings of the same
  bytes: advance whichever side is behind; a chunk closes where both sides'
  ends meet.
- ``uld_exact``/``uld_topk``: ULD by full sorts; ``mapped_kd``: the mapped-mass KD, dense.
- ``alm_loss``: ALM on full (B, L, V) logits in float64-capable torch: token
  log-probs by log_softmax + gather, chunk sums by a loop over chunks, the
  binarised divergences straight from their formulas (xlogy: 0·log 0 = 0).
"""
from __future__ import annotations

import torch


def byte_level_spans(text: str, tokens: list[str], alphabet: dict[str, int],
                     special: set[int] = frozenset()) -> list[tuple[int, int] | None]:
    """Byte spans of byte-level tokens (their strings, in order) that spell ``text``
    exactly; positions in ``special`` (zero-length tokens) get None."""
    data = text.encode("utf-8")
    pos = 0
    out = []
    for i, tok in enumerate(tokens):
        if i in special:
            out.append(None)
            continue
        raw = bytes(alphabet[c] for c in tok)
        if data[pos:pos + len(raw)] != raw:
            raise ValueError(f"token {i} {tok!r} does not spell the text at byte {pos}")
        out.append((pos, pos + len(raw)))
        pos += len(raw)
    if pos != len(data):
        raise ValueError(f"the tokens spell {pos} of the text's {len(data)} bytes")
    return out


def align_spans(a: list[tuple[int, int] | None], b: list[tuple[int, int] | None]):
    """Chunk ids (lists, -1 for None) of two tilings of the same bytes: a chunk is
    the shortest run of tokens on each side that ends at the same byte."""
    ca, cb = [-1] * len(a), [-1] * len(b)
    ia = [i for i, s in enumerate(a) if s is not None]
    ib = [i for i, s in enumerate(b) if s is not None]
    i = j = 0
    chunk = 0
    while i < len(ia) and j < len(ib):
        ca[ia[i]] = chunk
        cb[ib[j]] = chunk
        end_a, end_b = a[ia[i]][1], b[ib[j]][1]
        while end_a != end_b:
            if end_a < end_b:
                i += 1
                ca[ia[i]] = chunk
                end_a = a[ia[i]][1]
            else:
                j += 1
                cb[ib[j]] = chunk
                end_b = b[ib[j]][1]
        i += 1
        j += 1
        chunk += 1
    return ca, cb, chunk


def binary_divergence(x: torch.Tensor, y: torch.Tensor, divergence: str) -> torch.Tensor:
    """The binarised divergence of teacher probability p = eˣ and student q = eʸ."""
    p, q = torch.exp(x), torch.exp(y)
    if divergence == "binary_ce":
        return -(torch.xlogy(p, q) + torch.xlogy(1 - p, 1 - q))
    if divergence == "binary_kl":
        return (torch.xlogy(p, p) - torch.xlogy(p, q)
                + torch.xlogy(1 - p, 1 - p) - torch.xlogy(1 - p, 1 - q))
    if divergence == "reverse_binary_kl":
        return (torch.xlogy(q, q) - torch.xlogy(q, p)
                + torch.xlogy(1 - q, 1 - q) - torch.xlogy(1 - q, 1 - p))
    raise ValueError(divergence)


def observed_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, L): log p(ids[:, i] | logits[:, i - 1]); column 0 is NaN (nothing predicts it)."""
    lp = torch.log_softmax(logits.double() if logits.dtype == torch.float64 else logits.float(), -1)
    out = torch.full(ids.shape, float("nan"), dtype=lp.dtype)
    for b in range(ids.shape[0]):
        for i in range(1, ids.shape[1]):
            out[b, i] = lp[b, i - 1, max(int(ids[b, i]), 0)]
    return out


def alm_loss(student_lp, student_chunks, teacher_lp, teacher_chunks, num_chunks, *,
             student_labels=None, teacher_labels=None, divergence="binary_ce",
             temperature=1.0, ignore_index=-100, reduction="mean"):
    """ALM from per-token log-probs (B, L) of each side (``observed_logprobs``).

    A chunk counts when both sides have tokens in it, none of them at position 0
    and none labelled ``ignore_index``."""
    rows = []
    kept = []
    for c in range(num_chunks):
        ok = True
        totals = []
        for lp, ch, lab in ((teacher_lp, teacher_chunks, teacher_labels),
                            (student_lp, student_chunks, student_labels)):
            where = (ch == c).nonzero().tolist()
            if not where or any(i == 0 for _, i in where):
                ok = False
            if lab is not None and any(int(lab[b, i]) == ignore_index for b, i in where):
                ok = False
            total = lp.new_zeros(())
            for b, i in where:
                total = total + lp[b, i]
            totals.append(total)
        if ok:
            x, y = totals[0] / temperature, totals[1] / temperature
            rows.append(binary_divergence(x, y, divergence))
        else:
            rows.append(student_lp.new_zeros(()))
        kept.append(ok)
    out = torch.stack(rows) if rows else student_lp.new_zeros(0)
    if reduction == "none":
        return out
    if reduction == "sum":
        return out.sum()
    return out.sum() / max(sum(kept), 1)


def uld_exact(student_logits, teacher_probs, temperature=1.0):
    """(P,) exact ULD (Boizard et al. 2024): Σ_r |p_(r) − q_(r)| with both rows
    sorted in decreasing order over their full vocabularies and the shorter padded
    with zeros; q = softmax(student_logits / T), ``teacher_probs`` dense (P, V_t)."""
    q = torch.softmax(student_logits / temperature, -1).sort(-1, descending=True).values
    p = teacher_probs.sort(-1, descending=True).values
    V = max(q.shape[-1], p.shape[-1])
    q = torch.nn.functional.pad(q, (0, V - q.shape[-1]))
    p = torch.nn.functional.pad(p, (0, V - p.shape[-1]))
    return (p - q).abs().sum(-1)


def uld_topk(student_logits, teacher_top, teacher_tail, temperature=1.0):
    """(P,) the top-k form from its formula, the student's side by a full sort:
    K = min(K_t, V_s) ranks, Σ_{r≤K} |a_r − b_r| + |tail_T − tail_S| with tail_T =
    ``teacher_tail`` + the teacher's ranks beyond K and tail_S = Σ_{r>K} q_(r)."""
    q = torch.softmax(student_logits / temperature, -1).sort(-1, descending=True).values
    a = teacher_top.sort(-1, descending=True).values
    K = min(a.shape[-1], q.shape[-1])
    tail_t = teacher_tail + a[:, K:].sum(-1)
    tail_s = q[:, K:].sum(-1)
    return (a[:, :K] - q[:, :K]).abs().sum(-1) + (tail_t - tail_s).abs()


def mapped_kd(student_logits, teacher_logits, vocab_map, k, *, temperature=1.0,
              divergence="forward_kl", beta=0.5):
    """(P,) KD over the mapped top-k mass, dense: the teacher's top-k ids at T
    whose ``vocab_map`` entry is ≥ 0 become bins at their student ids (a dense
    V_s mask); everything else is one tail bin on each side (none when the bins
    cover the student's vocabulary). Divergence (forward_kl or jsd) between the
    bin distributions, times T²."""
    T = temperature
    q = torch.softmax(student_logits / T, -1)
    p = torch.softmax(teacher_logits / T, -1)
    rows = []
    for n in range(q.shape[0]):
        top = p[n].topk(k).indices
        mask = torch.zeros(q.shape[-1], dtype=torch.bool)
        P = torch.zeros(q.shape[-1], dtype=p.dtype)
        for i in top.tolist():
            j = int(vocab_map[i])
            if j >= 0:
                mask[j] = True
                P[j] = p[n, i]
        Pb, Qb = P[mask], q[n][mask]
        if not bool(mask.all()):
            Pb = torch.cat([Pb, (1 - Pb.sum()).clamp_min(0).reshape(1)])
            Qb = torch.cat([Qb, (1 - Qb.sum()).reshape(1)])
        if divergence == "forward_kl":
            d = (torch.xlogy(Pb, Pb) - torch.xlogy(Pb, Qb)).sum()
        elif divergence == "jsd":
            M = beta * Pb + (1 - beta) * Qb
            d = (beta * (torch.xlogy(Pb, Pb) - torch.xlogy(Pb, M)).sum()
                 + (1 - beta) * (torch.xlogy(Qb, Qb) - torch.xlogy(Qb, M)).sum())
        else:
            raise ValueError(divergence)
        rows.append(d * T * T)
    return torch.stack(rows)
