"""KDTrainer across tokenizers: the student and the teacher each read the text
in their own tokens, and the loss compares them over the chunks of bytes both
tokenizations cut at (``fastdistill.xtok``).

The collator keeps each example's text, tokenizes it for both sides and aligns
the two (``fd.xtok.align_batch``: once per batch, on the CPU, vectorized). The
teacher runs on its own ids; the student's loss runs inside its LM head's
forward, as in the same-tokenizer mode, so neither side's tokens × vocabulary
logits exist (with ``fused_head=True``).
"""
from __future__ import annotations

import torch

from ..kd.fused_linear import fused_linear_kd_loss
from ..xtok import align_batch, alm_loss, chunk_pairs, token_logprobs, uld_loss

__all__ = ["CROSS_TOKENIZER_LOSSES", "CrossTokenizerCollator", "teacher_top_k"]

# bytes of teacher logits one chunk of paired rows may take (teacher_top_k)
TOP_K_CHUNK_BYTES = 64 * 2**20

# what the collator hands the trainer besides the student's input_ids/attention_mask/labels
TEACHER_KEYS = ("teacher_input_ids", "teacher_attention_mask", "teacher_labels",
                "student_chunks", "teacher_chunks", "num_chunks")


class CrossTokenizerCollator:
    """Examples ``{text_column: str, ...}`` → one batch for both tokenizers: the
    student's ``input_ids``/``attention_mask``/``labels`` (what the HF Trainer
    and the student read), the teacher's ``teacher_*`` and the alignment's
    ``student_chunks``/``teacher_chunks``/``num_chunks``."""

    def __init__(self, student_tokenizer, teacher_tokenizer, *, text_column: str = "text",
                 max_length: int | None = None):
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.text_column, self.max_length = text_column, max_length

    def __call__(self, features):
        texts = []
        for i, f in enumerate(features):
            if not isinstance(f, dict) or self.text_column not in f:
                raise ValueError(f"cross-tokenizer KD: example {i} of the batch has no "
                                 f"{self.text_column!r} column (the text both tokenizers read; "
                                 "KDConfig.text_column names it)")
            texts.append(f[self.text_column])
        b = align_batch(texts, self.student_tokenizer, self.teacher_tokenizer,
                        max_length=self.max_length)
        out = {"input_ids": b["student_input_ids"], "attention_mask": b["student_attention_mask"],
               "labels": b["student_labels"]}
        out.update({k: b[k] for k in TEACHER_KEYS})
        return out


def check_heads(student_head, teacher_head) -> None:
    """The ALM loss reads plain heads: logits = h Wᵀ + b."""
    for name, head in (("the student", student_head), ("the teacher", teacher_head)):
        if head.logit_scale != 1.0 or head.softcap is not None:
            raise ValueError(f"cross-tokenizer KD: {name}'s LM head has a logit scale "
                             f"({head.logit_scale}) or a soft cap ({head.softcap}) that the ALM "
                             "loss does not apply; not supported yet")


def student_ce(hidden, head, labels, reduction: str) -> torch.Tensor:
    """The student's next-token cross-entropy from hidden states + head, fused (the
    one-id sparse teacher at the label with the tail renormalized is exactly 0:
    the soft part vanishes and ``hard_weight=1`` leaves the CE)."""
    ids = labels.clamp_min(0).unsqueeze(-1)
    zero = torch.zeros(ids.shape, dtype=hidden.dtype, device=hidden.device)
    return fused_linear_kd_loss(hidden, head.weight, student_bias=head.bias,
                                teacher_sparse=(ids, zero), tail="renormalize", labels=labels,
                                hard_weight=1.0, reduction=reduction)


def eval_rows_of(labels):
    """``fn(hidden, head)`` for ``_in_head_forward`` giving evaluate()'s per-token
    (CE, KL) rows across tokenizers: the student's CE; KL between two vocabularies
    is not defined (NaN)."""
    def rows(hidden, head):
        ce = student_ce(hidden[:, :-1].to(head.weight.dtype), head, labels, "none")
        return ce, torch.full_like(ce, float("nan"))
    return rows


def teacher_top_k(rows: torch.Tensor, head, k: int, temperature: float,
                  logits: bool = False) -> torch.Tensor:
    """The teacher's k largest log-probabilities at ``temperature`` for each of
    ``rows`` (P, H) hidden states (or (P, V) logits with ``logits=True``), a
    chunk of rows at a time: at most ``TOP_K_CHUNK_BYTES`` of logits exist."""
    V = rows.shape[-1] if logits else head.weight.shape[0]
    step = max(1, TOP_K_CHUNK_BYTES // (4 * V))
    out = []
    for a in range(0, rows.shape[0], step):
        z = rows[a:a + step].float() if logits else torch.nn.functional.linear(
            rows[a:a + step], head.weight, head.bias).float()
        out.append(torch.log_softmax(z / temperature, -1).topk(min(k, V), -1).values)
    return torch.cat(out) if out else rows.new_zeros(0, min(k, V), dtype=torch.float32)


def _hard(loss, s_hidden, s_head, inputs, args):
    if args.hard_weight > 0:
        hs = s_hidden[:, :-1].to(s_head.weight.dtype)
        loss = loss + args.hard_weight * student_ce(hs, s_head, inputs["labels"][:, 1:], "mean")
    return loss


def uld_of(inputs: dict, student_hidden, student_head, teacher_hidden, teacher_head, args):
    """ULD at the aligned pairs (``fd.xtok.chunk_pairs``: each chunk's last token on
    each side) from the teacher's top ``args.uld_top_k`` (its tail mass joins the
    sorted-L1 as ``uld_loss`` states), plus ``hard_weight`` × the student's CE."""
    s_pos, t_pos = chunk_pairs(inputs["student_chunks"], inputs["teacher_chunks"],
                               int(inputs["num_chunks"]))
    rows = teacher_hidden.flatten(0, 1).index_select(0, t_pos).to(teacher_head.weight.dtype)
    t_lp = teacher_top_k(rows, teacher_head, args.uld_top_k, args.temperature)
    hs = student_hidden.to(student_head.weight.dtype)
    loss = uld_loss(t_lp, student_hidden=hs.flatten(0, 1), student_weight=student_head.weight,
                    student_bias=student_head.bias, student_positions=s_pos,
                    teacher_positions=torch.arange(s_pos.numel(), device=s_pos.device),
                    temperature=args.temperature, t2_scale=args.t2_scale,
                    chunk_size=args.chunk_size)
    return _hard(loss, student_hidden, student_head, inputs, args)


def uld_of_logits(inputs: dict, student_logits, teacher_logits, args):
    """``uld_of`` from full logits (``fused_head=False``)."""
    s_pos, t_pos = chunk_pairs(inputs["student_chunks"], inputs["teacher_chunks"],
                               int(inputs["num_chunks"]))
    rows = teacher_logits.flatten(0, 1).index_select(0, t_pos)
    t_lp = teacher_top_k(rows, None, args.uld_top_k, args.temperature, logits=True)
    loss = uld_loss(t_lp, student_logits=student_logits.flatten(0, 1), student_positions=s_pos,
                    teacher_positions=torch.arange(s_pos.numel(), device=s_pos.device),
                    temperature=args.temperature, t2_scale=args.t2_scale)
    return loss + args.hard_weight * _logits_ce(student_logits, inputs) \
        if args.hard_weight > 0 else loss


def _logits_ce(student_logits, inputs) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(),
                                             inputs["labels"][:, 1:].flatten(), ignore_index=-100)


def alm_of(inputs: dict, student_hidden, student_head, teacher_hidden, teacher_head, args):
    """The ALM loss of a batch (chunk mean) plus ``hard_weight`` × the student's
    token-mean CE, both sides as hidden states + heads (fused)."""
    loss = alm_loss(inputs["student_chunks"], inputs["teacher_chunks"],
                    student_hidden=student_hidden.to(student_head.weight.dtype),
                    student_weight=student_head.weight, student_bias=student_head.bias,
                    student_labels=inputs["labels"],
                    teacher_hidden=teacher_hidden.to(teacher_head.weight.dtype),
                    teacher_weight=teacher_head.weight, teacher_bias=teacher_head.bias,
                    teacher_labels=inputs["teacher_labels"], num_chunks=int(inputs["num_chunks"]),
                    divergence=args.alm_divergence, temperature=args.temperature,
                    chunk_size=args.chunk_size)
    return _hard(loss, student_hidden, student_head, inputs, args)


def alm_of_logits(inputs: dict, student_logits, teacher_logits, args):
    """``alm_of`` from full logits (``fused_head=False``)."""
    s_lp = token_logprobs(student_logits, inputs["input_ids"])
    t_lp = token_logprobs(teacher_logits.float(), inputs["teacher_input_ids"]).detach()
    loss = alm_loss(inputs["student_chunks"], inputs["teacher_chunks"], student_logprobs=s_lp,
                    student_labels=inputs["labels"], teacher_logprobs=t_lp,
                    teacher_labels=inputs["teacher_labels"], num_chunks=int(inputs["num_chunks"]),
                    divergence=args.alm_divergence, temperature=args.temperature)
    return loss + args.hard_weight * _logits_ce(student_logits, inputs) \
        if args.hard_weight > 0 else loss


# cross_tokenizer_loss: (from hidden states + heads, from full logits)
LOSSES = {"alm": (alm_of, alm_of_logits), "uld": (uld_of, uld_of_logits)}
CROSS_TOKENIZER_LOSSES = tuple(LOSSES)


def teacher_inputs(inputs: dict) -> dict:
    return {"input_ids": inputs["teacher_input_ids"],
            "attention_mask": inputs["teacher_attention_mask"]}

