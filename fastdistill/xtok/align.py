"""Byte-level alignment of two tokenizations of the same text: ``align`` and ``align_batch``.

Both tokenizers' offset mappings (in characters of the Python string) are
turned into UTF-8 byte spans, one per token; a *chunk* is a stretch of bytes
that both tokenizations cut at its two ends and nowhere in between
consistently, i.e. the span between two consecutive byte positions where both
sides have a token boundary. Every token maps to the chunk that holds it
(student position → chunk, teacher position → chunk), -1 for a token in no chunk.

Rules (docs/xtok.md states them for users):

1. **Bytes, not characters.** Character offsets become byte offsets through
   the text's UTF-8 prefix lengths. Tokens whose character spans overlap
   (byte-level BPE pieces of one multi-byte character share its offsets;
   so do byte-fallback ``<0xNN>`` pieces) form a group. A group is split
   into its tokens' exact byte spans when the vocabulary gives every token's
   byte length (``token_byte_lengths``) and they add up to the group's bytes;
   otherwise the group is one unit (no chunk boundary inside it: coarser, never wrong).
2. **Zero-length tokens** (a BOS/EOS added by the post-processor, offsets
   (0, 0)) and padding (mask 0) belong to no chunk (-1). Special tokens that
   are *in* the text (a chat template's ``<|im_start|>`` typed as text) are
   text like any other and get their bytes.
3. **Gaps.** Bytes one side does not cover (whitespace a WordPiece
   pre-tokenizer drops) join the next chunk: a chunk that would hold tokens
   of one side only is merged into its right neighbour (the last one into its
   left). Chunks end at the last byte boundary both sides share: tokens past
   it (the tail of a side that was truncated, a trailing space only one side
   covers) are in no chunk.
4. **Normalization.** Offsets always refer to the original text, so a
   normalizing tokenizer (lowercase, NFKC) aligns by them; its tokens' byte
   lengths are not used unless it is byte-level.

The work is vectorized with numpy over the tokens of a sequence (cumulative
sums, ``searchsorted``, ``intersect1d``); the only Python loops are over the
sequences of a batch and a merge pass over chunks that repeats only while
one-sided chunks remain (usually once).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from .. import _checks
from .vocab import backend_of, token_byte_lengths, token_bytes


@dataclass
class Alignment:
    """The chunks of a batch (or of one sequence: then the batch dimension is absent).

    student_chunks (B, Ls) / teacher_chunks (B, Lt) int64: each position's
    chunk, numbered 0..num_chunks-1 over the whole batch in order (sequence,
    then bytes), -1 for a token in no chunk. chunk_bytes (C, 2): each chunk's
    byte span [start, end) in its text's UTF-8 (the bytes its tokens cover
    on either side). chunk_seq (C,): the sequence each chunk belongs to.
    student_bytes (B, Ls, 2) / teacher_bytes (B, Lt, 2): each token's byte
    span (a merged group's tokens all carry the group's span; -1 for
    zero-length and padded tokens).
    """

    student_chunks: torch.Tensor
    teacher_chunks: torch.Tensor
    num_chunks: int
    chunk_bytes: torch.Tensor
    chunk_seq: torch.Tensor
    student_bytes: torch.Tensor
    teacher_bytes: torch.Tensor


def utf8_prefix(text: str, name: str = "texts") -> np.ndarray:
    """(len(text) + 1,) int64: the UTF-8 byte offset of each character boundary."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    try:
        raw = text.encode("utf-32-le")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} does not round-trip through UTF-8 (a lone surrogate at "
                         f"character {e.start}): no tokenizer can give byte offsets for it") from e
    cp = np.frombuffer(raw, dtype=np.uint32).astype(np.int64)
    n = 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)
    out = np.zeros(len(cp) + 1, dtype=np.int64)
    np.cumsum(n, out=out[1:])
    return out


def token_spans(prefix: np.ndarray, ids: np.ndarray, offsets: np.ndarray, valid: np.ndarray,
                nbytes: np.ndarray | None):
    """Byte spans (L, 2) of one sequence's tokens (-1 where not valid), and how
    many tokens sit in groups that could not be split exactly.

    ``valid``: tokens with a non-empty character span that are not padding."""
    L = len(ids)
    spans = np.full((L, 2), -1, dtype=np.int64)
    idx = np.flatnonzero(valid)
    if idx.size == 0:
        return spans, 0
    s, e = offsets[idx, 0], offsets[idx, 1]
    bs, be = prefix[s], prefix[e]
    # a new group starts where a token begins at or after every earlier token's end
    reach = np.maximum.accumulate(e)
    new = np.ones(idx.size, dtype=bool)
    new[1:] = s[1:] >= reach[:-1]
    first = np.flatnonzero(new)
    gid = np.cumsum(new) - 1
    g_lo = np.minimum.reduceat(bs, first)
    g_hi = np.maximum.reduceat(be, first)
    if nbytes is None:
        n = np.full(idx.size, -1, dtype=np.int64)
    else:
        n = np.where(ids[idx] < len(nbytes), nbytes[np.minimum(ids[idx], len(nbytes) - 1)], -1)
    known = np.minimum.reduceat((n >= 0).astype(np.int64), first) > 0
    total = np.add.reduceat(np.maximum(n, 0), first)
    exact = known & (total == g_hi - g_lo)
    excl = np.cumsum(np.maximum(n, 0)) - np.maximum(n, 0)
    lo = g_lo[gid] + excl - excl[first][gid]
    hi = lo + n
    ex = exact[gid]
    spans[idx, 0] = np.where(ex, lo, g_lo[gid])
    spans[idx, 1] = np.where(ex, hi, g_hi[gid])
    group_size = np.diff(np.append(first, idx.size))
    inexact = int((~exact & (group_size > 1)).astype(np.int64) @ group_size)
    return spans, inexact


def chunk_tokens(s_spans: np.ndarray, t_spans: np.ndarray):
    """(student chunk (Ls,), teacher chunk (Lt,), chunk spans (C, 2)) of one
    sequence from its tokens' byte spans (-1 rows: no token)."""
    s_ok, t_ok = s_spans[:, 0] >= 0, t_spans[:, 0] >= 0
    cs = np.full(len(s_spans), -1, dtype=np.int64)
    ct = np.full(len(t_spans), -1, dtype=np.int64)
    if not s_ok.any() or not t_ok.any():
        return cs, ct, np.zeros((0, 2), dtype=np.int64)
    ss, ts = s_spans[s_ok], t_spans[t_ok]
    common = np.intersect1d(np.unique(ss.ravel()), np.unique(ts.ravel()))
    if common.size == 0:
        return cs, ct, np.zeros((0, 2), dtype=np.int64)
    end = common[-1]   # the last boundary both sides have: beyond it one side is cut off
    s_in = ss[:, 1] <= end
    t_in = ts[:, 1] <= end
    if not s_in.any() or not t_in.any():
        return cs, ct, np.zeros((0, 2), dtype=np.int64)
    start = min(ss[s_in, 0].min(), ts[t_in, 0].min())
    cuts = np.union1d(common[(common > start) & (common < end)], [start, end])
    while True:
        a = np.searchsorted(cuts, ss[s_in, 0], side="right") - 1
        b = np.searchsorted(cuts, ts[t_in, 0], side="right") - 1
        k = len(cuts) - 1
        na = np.bincount(a, minlength=k)
        nb = np.bincount(b, minlength=k)
        one_sided = (na == 0) != (nb == 0)
        if not one_sided.any():
            break
        live = np.flatnonzero((na + nb) > 0)
        last = live[-1]
        drop = np.flatnonzero(one_sided[:last]) + 1          # their end cut: merge right
        if one_sided[last]:
            prev = live[live < last]
            drop = np.append(drop, last if prev.size == 0 else prev[-1] + 1)  # merge left
        keep = np.ones(len(cuts), dtype=bool)
        keep[drop] = False
        keep[0] = keep[-1] = True
        if keep.all():  # only one chunk and one side is empty in it: nothing to align
            return cs, ct, np.zeros((0, 2), dtype=np.int64)
        cuts = cuts[keep]
    both = (na > 0) & (nb > 0)
    number = np.cumsum(both) - 1
    s_idx, t_idx = np.flatnonzero(s_ok)[s_in], np.flatnonzero(t_ok)[t_in]
    cs[s_idx] = number[a]
    ct[t_idx] = number[b]
    C = int(both.sum())
    lo = np.full(C, np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.full(C, -1, dtype=np.int64)
    for chunk, sp in ((number[a], ss[s_in]), (number[b], ts[t_in])):
        np.minimum.at(lo, chunk, sp[:, 0])
        np.maximum.at(hi, chunk, sp[:, 1])
    return cs, ct, np.stack([lo, hi], 1)


def _as_array(name: str, x, dims: int, integer: bool = True) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.is_complex():
            raise TypeError(f"{name} must hold integers, got {x.dtype}")
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.size and integer and not np.issubdtype(x.dtype, np.integer) and x.dtype != bool:
        raise TypeError(f"{name} must hold integers, got {x.dtype}")
    if x.ndim != dims:
        raise ValueError(f"{name} must have {dims} dimensions here, got shape {x.shape}")
    return x.astype(np.int64)


def _lengths(name: str, x):
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 1 or not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must be a 1-d integer tensor (token_byte_lengths), got "
                        f"{x.dtype} of shape {x.shape}")
    return x.astype(np.int64)


def align(texts, student_ids, student_offsets, teacher_ids, teacher_offsets, *,
          student_byte_lengths=None, teacher_byte_lengths=None, student_mask=None,
          teacher_mask=None) -> Alignment:
    """The chunks of two tokenizations of the same text(s).

    ``texts``: a str (then ids (L,), offsets (L, 2)) or a list of B str (ids
    (B, L), offsets (B, L, 2), padded). Offsets are the fast tokenizers'
    ``return_offsets_mapping=True`` output, in characters of the text.
    ``*_byte_lengths``: ``token_byte_lengths(tokenizer)`` (per id; optional,
    without it tokens that share a character are merged). ``*_mask``: the
    attention masks (0 = padding). Returns an :class:`Alignment`; see the
    module docstring for the rules.
    """
    single = isinstance(texts, str)
    if single:
        texts = [texts]
    elif not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a str or a list of str")
    dims = 1 if single else 2
    sides = {}
    for side, ids, offs, mask, nb in (("student", student_ids, student_offsets, student_mask,
                                       student_byte_lengths),
                                      ("teacher", teacher_ids, teacher_offsets, teacher_mask,
                                       teacher_byte_lengths)):
        ids = _as_array(f"{side}_ids", ids, dims)
        offs = _as_array(f"{side}_offsets", offs, dims + 1)
        if single:
            ids, offs = ids[None], offs[None]
        if offs.shape != ids.shape + (2,):
            raise ValueError(f"{side}_offsets must have shape {ids.shape + (2,)} ({side}_ids' "
                             f"shape + (2,)), got {offs.shape}")
        if ids.shape[0] != len(texts):
            raise ValueError(f"{side}_ids has {ids.shape[0]} sequences but texts has "
                             f"{len(texts)}: one text per sequence")
        if mask is None:
            m = np.ones(ids.shape, dtype=bool)
        else:
            m = _as_array(f"{side}_mask", mask, dims)
            m = (m[None] if single else m) != 0
            if m.shape != ids.shape:
                raise ValueError(f"{side}_mask must have {side}_ids' shape {ids.shape}, got "
                                 f"{m.shape}")
        sides[side] = (ids, offs, m, _lengths(f"{side}_byte_lengths", nb))
    chunks = {"student": [], "teacher": []}
    spans_out = {"student": [], "teacher": []}
    bounds, seq = [], []
    base = 0
    for b, text in enumerate(texts):
        prefix = utf8_prefix(text, f"texts[{b}]")
        per = {}
        for side, (ids, offs, m, nb) in sides.items():
            o = offs[b]
            live = m[b]
            if ((o[live] < 0) | (o[live] > len(text)) | (o[live, 0:1] > o[live, 1:2])).any():
                raise ValueError(
                    f"{side}_offsets[{b}] do not refer to texts[{b}] ({len(text)} characters): "
                    "offsets must satisfy 0 <= start <= end <= len(text); was the text "
                    "tokenized as given?")
            valid = live & (o[:, 1] > o[:, 0])
            per[side], _ = token_spans(prefix, ids[b], o, valid, nb)
        cs, ct, cb = chunk_tokens(per["student"], per["teacher"])
        for side, c in (("student", cs), ("teacher", ct)):
            chunks[side].append(np.where(c >= 0, c + base, -1))
            spans_out[side].append(per[side])
        bounds.append(cb)
        seq.append(np.full(len(cb), b, dtype=np.int64))
        base += len(cb)

    def out(x):
        t = torch.from_numpy(np.stack(x))
        return t[0] if single else t

    return Alignment(out(chunks["student"]), out(chunks["teacher"]), base,
                     torch.from_numpy(np.concatenate(bounds)).reshape(-1, 2),
                     torch.from_numpy(np.concatenate(seq)),
                     out(spans_out["student"]), out(spans_out["teacher"]))


def _encode(tok, texts, name, add_special_tokens, max_length):
    """(ids, offsets, mask) lists of one tokenizer, transformers' or tokenizers'."""
    backend = backend_of(tok, name)
    if backend is tok:  # a bare tokenizers.Tokenizer
        enc = backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        ids = [e.ids for e in enc]
        offs = [e.offsets for e in enc]
        if max_length is not None:
            ids, offs = [i[:max_length] for i in ids], [o[:max_length] for o in offs]
        return ids, offs
    kw = {} if max_length is None else dict(truncation=True, max_length=max_length)
    enc = tok(list(texts), add_special_tokens=add_special_tokens, return_offsets_mapping=True,
              padding=False, **kw)
    return enc["input_ids"], enc["offset_mapping"]


def _strict(tok, name) -> bool:
    """A byte-level tokenizer that neither normalizes nor adds a prefix space: its
    tokens' bytes must be exactly the text's (else the text does not round-trip)."""
    spec = json.loads(backend_of(tok, name).to_str())
    pre = spec.get("pre_tokenizer") or {}
    return ((spec.get("normalizer") is None) and pre.get("type") == "ByteLevel"
            and not pre.get("add_prefix_space", False))


def _pad(rows, value, length):
    out = np.full((len(rows), length) + np.asarray(rows[0] if rows else []).shape[1:], value,
                  dtype=np.int64)
    for i, r in enumerate(rows):
        if len(r):
            out[i, :len(r)] = np.asarray(r, dtype=np.int64)
    return out


def align_batch(texts, student_tokenizer, teacher_tokenizer, *, add_special_tokens=True,
                max_length=None, ignore_index=-100, pad_to_multiple_of=None,
                strict=True) -> dict:
    """Tokenize ``texts`` with both tokenizers and align them: a collator's work.

    ``texts``: a list of str (render chat messages with each side's
    ``apply_chat_template(..., tokenize=False)`` first: the alignment needs
    one text, so both sides must render the same string — give them the same
    template). Tokenizers: transformers fast tokenizers or
    ``tokenizers.Tokenizer``. Returns a dict of tensors, right-padded:
    ``student_input_ids``/``teacher_input_ids`` (B, L) (padding id 0),
    ``*_attention_mask``, ``*_labels`` (the ids, ``ignore_index`` at padding),
    ``*_offsets`` (B, L, 2) character offsets, ``*_chunks`` (B, L) and
    ``num_chunks``, ``chunk_bytes``, ``chunk_seq`` of :class:`Alignment`.
    Byte lengths per vocabulary are computed once per tokenizer and cached.

    ``strict`` (default): a byte-level tokenizer that neither normalizes nor
    adds a prefix space must spell the text byte for byte; a token whose
    vocabulary bytes differ from the bytes its offsets cover (a byte its
    vocabulary lacks was dropped: SmolLM2 has no token for b"\\xf1") is a
    ValueError naming the text. ``strict=False`` aligns such a text anyway,
    by that token's characters (coarser chunks there).
    """
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
        utf8_prefix(t, f"texts[{i}]")  # before the tokenizers see it: a lone surrogate
    _checks.flag("strict", strict)
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    out = {}
    arrays = {}
    for side, tok in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
        name = f"{side}_tokenizer"
        ids, offs = _encode(tok, texts, name, add_special_tokens, max_length)
        L = max((len(i) for i in ids), default=0)
        if pad_to_multiple_of:
            L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
        ids_a = _pad(ids, 0, L)
        offs_a = np.zeros((len(texts), L, 2), dtype=np.int64)
        mask = np.zeros((len(texts), L), dtype=np.int64)
        for i, o in enumerate(offs):
            if len(o):
                offs_a[i, :len(o)] = np.asarray(o, dtype=np.int64)
            mask[i, :len(o)] = 1
        arrays[side] = (ids_a, offs_a, mask, token_byte_lengths(tok, name), _strict(tok, name))
    al = align(list(texts), arrays["student"][0], arrays["student"][1], arrays["teacher"][0],
               arrays["teacher"][1], student_byte_lengths=arrays["student"][3],
               teacher_byte_lengths=arrays["teacher"][3], student_mask=arrays["student"][2],
               teacher_mask=arrays["teacher"][2])
    for side, (ids_a, offs_a, mask, nb, strict_side) in arrays.items():
        spans = (al.student_bytes if side == "student" else al.teacher_bytes).numpy()
        if strict and strict_side:
            tok = student_tokenizer if side == "student" else teacher_tokenizer
            _check_round_trip(texts, ids_a, offs_a, mask, spans, nb.numpy(), side,
                              token_bytes(tok, f"{side}_tokenizer"))
        ids_t = torch.from_numpy(ids_a)
        mask_t = torch.from_numpy(mask)
        out[f"{side}_input_ids"] = ids_t
        out[f"{side}_attention_mask"] = mask_t
        out[f"{side}_labels"] = ids_t.masked_fill(mask_t == 0, ignore_index)
        out[f"{side}_offsets"] = torch.from_numpy(offs_a)
    out["student_chunks"] = al.student_chunks
    out["teacher_chunks"] = al.teacher_chunks
    out["num_chunks"] = al.num_chunks
    out["chunk_bytes"] = al.chunk_bytes
    out["chunk_seq"] = al.chunk_seq
    return out


def _check_round_trip(texts, ids, offs, mask, spans, nbytes, side, vocab_bytes):
    """A strict byte-level side: each token's vocabulary bytes are the text's
    bytes at its span (vectorized: one gather per side of the batch)."""
    flat, start = vocab_bytes
    live = (mask != 0) & (offs[..., 1] > offs[..., 0])
    n = nbytes[np.clip(ids, 0, len(nbytes) - 1)]
    width = spans[..., 1] - spans[..., 0]
    bad = live & ((n < 0) | (width != n))
    for b, text in enumerate(texts):
        if bad[b].any():
            break
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        sel = np.flatnonzero(live[b])
        k = n[b, sel]
        within = np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k)
        got = data[np.repeat(spans[b, sel, 0], k) + within]
        want = flat[np.repeat(start[ids[b, sel]], k) + within]
        wrong = got != want
        if wrong.any():
            bad[b, sel[np.repeat(np.arange(len(sel)), k)[wrong]]] = True
            break
    if bad.any():
        b, i = map(int, np.argwhere(bad)[0])
        raise ValueError(
            f"texts[{b}] does not round-trip through {side}_tokenizer: token {i} (id "
            f"{int(ids[b, i])}, {int(n[b, i])} bytes) does not spell the text's bytes "
            f"[{int(spans[b, i, 0])}, {int(spans[b, i, 1])}) (a byte its vocabulary lacks "
            "was dropped, or the offsets are not of this text); strict=False aligns it by "
            "characters")
