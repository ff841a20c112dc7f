"""Per-vocabulary facts the alignment needs, computed once per tokenizer.

``token_byte_lengths(tokenizer)``: for each token id, how many UTF-8 bytes of
the text it stands for, or -1 where the vocabulary alone cannot say.

- Byte-level BPE (a ``ByteLevel`` pre-tokenizer or decoder, GPT-2's alphabet):
  each character of a token's string is one byte (GPT-2's byte↔unicode map),
  so the length is exact, also for the tokens that hold part of a multi-byte
  character (HF's offset mapping gives those the whole character's offsets).
- Sentencepiece-style byte fallback: ``<0xNN>`` pieces are one byte.
- Added tokens (``<|im_start|>``...): the UTF-8 length of their content.
- Everything else (WordPiece, Unigram/metaspace pieces, whose strings are
  normalized text or carry a ``▁`` that may or may not be in the text): -1;
  the alignment then uses the character offsets alone and merges the tokens
  that share a character (coarser chunks, never wrong ones).
"""
from __future__ import annotations

import json
import weakref

import torch


def byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character of each byte, inverted: char -> byte.
    Bytes that are printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
    themselves; the other 68 get the code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    keep = set(printable)
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


def backend_of(tokenizer, name: str = "tokenizer"):
    """The ``tokenizers.Tokenizer`` behind a fast tokenizer (or the thing itself).
    A slow tokenizer has no offsets: a TypeError naming the argument."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:  # pragma: no cover - tokenizers comes with transformers
        raise ImportError("fastdistill.xtok needs the 'tokenizers' package") from e
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or not isinstance(backend, Tokenizer):
        raise TypeError(
            f"{name} must be a fast tokenizer (transformers' PreTrainedTokenizerFast or a "
            f"tokenizers.Tokenizer): the alignment needs its offset mapping, which a slow "
            f"tokenizer ({type(tokenizer).__name__}) does not give; load it with use_fast=True")
    return backend


def _has_type(node, kind: str) -> bool:
    """Whether a tokenizer.json component (maybe a Sequence) contains ``kind``."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == kind:
        return True
    parts = node.get("pretokenizers") or node.get("decoders") or node.get("processors") or []
    return any(_has_type(p, kind) for p in parts)


def is_byte_level(tokenizer, name: str = "tokenizer") -> bool:
    spec = json.loads(backend_of(tokenizer, name).to_str())
    return _has_type(spec.get("pre_tokenizer"), "ByteLevel") or _has_type(spec.get("decoder"),
                                                                           "ByteLevel")


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_BYTES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_bytes(tokenizer, name: str = "tokenizer"):
    """(flat uint8 array, start per id) of a byte-level vocabulary: id i spells
    flat[start[i]:start[i] + token_byte_lengths[i]] (added tokens: their UTF-8
    content; ids whose length is unknown spell nothing). Cached per tokenizer."""
    import numpy as np

    backend = backend_of(tokenizer, name)
    try:
        hit = _BYTES.get(backend)
    except TypeError:
        hit = None
    if hit is not None:
        return hit
    lengths = token_byte_lengths(tokenizer, name)
    spec = json.loads(backend.to_str())
    alphabet = byte_alphabet()
    vocab = backend.get_vocab(with_added_tokens=True)
    added = {a["id"]: a["content"].encode("utf-8") for a in spec.get("added_tokens") or ()}
    pieces = [b""] * len(lengths)
    for piece, i in vocab.items():
        if i in added:
            pieces[i] = added[i]
        elif lengths[i] >= 0 and all(c in alphabet for c in piece):
            pieces[i] = bytes(alphabet[c] for c in piece)
    flat = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    start = np.zeros(len(pieces), dtype=np.int64)
    np.cumsum([len(p) for p in pieces[:-1]], out=start[1:])
    out = (flat, start)
    try:
        _BYTES[backend] = out
    except TypeError:
        pass
    return out


def token_byte_lengths(tokenizer, name: str = "tokenizer") -> torch.Tensor:
    """(V,) int64: each id's byte length, -1 where unknown (see the module
    docstring). Cached per tokenizer object."""
    backend = backend_of(tokenizer, name)
    try:
        hit = _CACHE.get(backend)
    except TypeError:  # not weak-referenceable
        hit = None
    if hit is not None:
        return hit
    spec = json.loads(backend.to_str())
    byte_level = _has_type(spec.get("pre_tokenizer"), "ByteLevel") or _has_type(
        spec.get("decoder"), "ByteLevel")
    fallback = bool((spec.get("model") or {}).get("byte_fallback"))
    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(backend.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
    out = torch.full((size,), -1, dtype=torch.int64)
    alphabet = byte_alphabet() if byte_level else None
    for piece, i in vocab.items():
        if alphabet is not None and all(c in alphabet for c in piece):
            out[i] = len(piece)
        elif fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out[i] = 1
    for added in spec.get("added_tokens") or ():  # their content is literal text
        out[added["id"]] = len(added["content"].encode("utf-8"))
    try:
        _CACHE[backend] = out
    except TypeError:
        pass
    return out
