"""Label a token corpus with a teacher: run the model once, keep a few bytes per token.

``label_tokens`` runs a causal LM over batches of token ids and adds each
sequence's packed soft labels (``fastdistill.softlabels.encode`` of the
logits at the positions its attention mask keeps) to a ``SoftLabelWriter``.
Training then reads them from the store instead of running the teacher again.
"""
from __future__ import annotations

import hashlib
import itertools
import numbers
from collections.abc import Iterable, Mapping

import torch

from .. import _checks
from .._progress import Progress
from .codec import METHODS, encode

__all__ = ["label_tokens"]



def _key_name(key) -> str:
    """A key as the store names it (ints are stored as their decimal string)."""
    if isinstance(key, str):
        return key
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        return str(int(key))
    raise TypeError(f"keys must give a str or an int per sequence, got {type(key).__name__}")


def _sequence_seed(seed: int, key) -> int:
    """The sampling seed of one sequence: fixed by (seed, key) alone, so a
    resumed run draws what an uninterrupted one would, whatever the batching,
    and no two sequences share a random stream."""
    digest = hashlib.blake2b(f"{seed}\0{_key_name(key)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _batch_tensors(batch, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids (B, T) int64, attention_mask (B, T) bool or None) of one batch."""
    where = f"batch {index}"
    if isinstance(batch, torch.Tensor):
        ids, mask = batch, None
    elif isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"{where} is a mapping without 'input_ids' (keys: {sorted(batch)})")
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        raise TypeError(f"{where} must be a LongTensor (B, T) or a dict with 'input_ids' and "
                        f"optionally 'attention_mask', got {type(batch).__name__}")
    _checks.tensor(f"{where} input_ids", ids)
    if ids.dtype.is_floating_point or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{where} input_ids must be an integer tensor, got {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{where} input_ids must have shape (B, T), got {tuple(ids.shape)}")
    if mask is not None:
        _checks.tensor(f"{where} attention_mask", mask)
        if mask.shape != ids.shape:
            raise ValueError(f"{where} attention_mask must have the shape of input_ids "
                             f"{tuple(ids.shape)}, got {tuple(mask.shape)}")
        if mask.dtype.is_floating_point or mask.is_complex():
            raise TypeError(f"{where} attention_mask must be a bool or integer 0/1 tensor, "
                            f"got {mask.dtype}")
        if mask.dtype != torch.bool:
            if bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError(f"{where} attention_mask must hold only 0 and 1")
    return ids.to(torch.int64), mask


def _model_device(model, device) -> torch.device | None:
    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch.device or a device string, got {device!r}") from None
    if isinstance(model, torch.nn.Module):
        for p in itertools.chain(model.parameters(), model.buffers()):
            return p.device
    return None  # leave the batches where they are


def _logits_of(out, where: str) -> torch.Tensor:
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model's output for {where} has no .logits tensor "
                        f"(got {type(out).__name__})")
    return logits


class _Progress(Progress):
    """Batches labelled, with the sequences written and those already stored."""

    def __init__(self, enabled: bool, total: int | None):
        super().__init__(enabled, total, "labelling", "batch")
        self.written = self.skipped = 0

    def line(self) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        return (f"labelling: {self.count}{of} batches, {self.written} sequences written, "
                f"{self.skipped} already stored")

    def update(self, written: int, skipped: int) -> None:  # noqa: D102
        self.written += written
        self.skipped += skipped
        super().update(1, written=self.written, skipped=self.skipped)


def label_tokens(model, batches: Iterable, writer, *, method: str = "topk", k: int | None = None,
                 n_samples: int | None = None, value_bits: int = 16, temperature: float = 1.0,
                 seed: int | None = None, keys: Iterable | None = None, progress: bool = True,
                 device=None, whole_batches: bool = False) -> int:
    """Run ``model`` over ``batches`` and add each sequence's packed soft labels
    to ``writer``; returns the number of sequences written.

    ``model(input_ids=..., attention_mask=...)`` must return logits (B, T, V)
    (an object with ``.logits``, e.g. a Hugging Face causal LM, or the tensor
    itself); it runs under ``torch.no_grad()`` and, if an ``nn.Module``, in
    eval mode (restored afterwards), on ``device`` (default: the model's).
    ``batches`` yields LongTensors (B, T) or dicts with ``input_ids`` and
    optionally ``attention_mask``. A sequence's entry holds the rows of the
    positions its mask keeps, shape (T_kept,); pad on the right, since
    positions are whatever the model derives from these two arguments.

    ``method``, ``k`` (top-k, default 32), ``n_samples`` (sampled),
    ``value_bits`` and ``temperature`` are ``encode``'s. Sampled draws use
    a seed per sequence derived from ``seed`` and its key, so reruns and
    resumed runs draw the same tokens.

    Keys are the running sequence index (0, 1, 2, ...) or one per sequence
    from ``keys``. Resumable: a sequence whose key is already ``in writer``
    is skipped, and a batch whose sequences are all stored never reaches the
    model. A batch with some sequences stored runs the model on the missing
    ones alone, or, with ``whole_batches=True``, on the whole batch (only the
    missing entries are added): a sequence's logits then never depend on
    which others were stored, so a resumed run writes bit for bit what an
    uninterrupted one would, also where a backend's results vary with the
    batch's size (``fastdistill.softlabels.parallel`` relies on it).
    ``writer`` is left open (closing it writes the last shard).
    """
    if isinstance(batches, (torch.Tensor, Mapping)) or not isinstance(batches, Iterable):
        raise TypeError(f"batches must be an iterable of batches (wrap a single batch in a "
                        f"list), got {type(batches).__name__}")
    for attr in ("add", "__contains__", "vocab_size"):
        if not hasattr(writer, attr):
            raise TypeError(f"writer must be a SoftLabelWriter (add, `in`, vocab_size), got "
                            f"{type(writer).__name__} without {attr!r}")
    V = writer.vocab_size
    if isinstance(V, bool) or not isinstance(V, numbers.Integral) or V < 1:
        raise TypeError(f"writer.vocab_size must be a positive int, got {V!r}")
    _checks.choice("method", method, METHODS)
    if method == "topk":
        k = 32 if k is None else k
    elif k is not None:
        raise ValueError("k applies to method='topk'; method='sampled' takes n_samples")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    _checks.flag("progress", progress)
    _checks.flag("whole_batches", whole_batches)
    if isinstance(keys, (str, bytes)):
        raise TypeError("keys must be an iterable of keys, one per sequence, not a single string")
    if keys is not None and not isinstance(keys, Iterable):
        raise TypeError(f"keys must be an iterable of keys or None, got {type(keys).__name__}")
    # encode's own checks of the options, on one row, before the model runs
    probe = encode(torch.zeros(1, int(V)), method=method, k=k, n_samples=n_samples,
                   temperature=temperature, value_bits=value_bits, seed=seed)
    stored = getattr(writer, "codec", None)
    if stored is not None and stored != probe.codec:
        raise ValueError(f"the store already holds codec {stored}, these options make "
                         f"{probe.codec}; label into another directory or match its options")
    dev = _model_device(model, device)

    key_iter = iter(keys) if keys is not None else itertools.count()
    seen: set[str] = set()
    total = len(batches) if hasattr(batches, "__len__") else None
    bar = _Progress(progress, total)
    written = 0
    was_training = model.training if isinstance(model, torch.nn.Module) else None
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            for b_index, batch in enumerate(batches):
                ids, mask = _batch_tensors(batch, b_index)
                batch_keys = []
                for row in range(ids.shape[0]):
                    try:
                        key = next(key_iter)
                    except StopIteration:
                        raise ValueError(f"keys ran out at sequence {len(seen)} (batch {b_index}, "
                                         f"row {row}): give one key per sequence") from None
                    name = _key_name(key)
                    if name in seen:
                        raise ValueError(f"key {key!r} is given to two sequences")
                    seen.add(name)
                    batch_keys.append(key)
                todo = [r for r, key in enumerate(batch_keys) if key not in writer]
                if todo:
                    written += _label_batch(model, ids, mask, todo, batch_keys, writer, dev,
                                            b_index, method, k, n_samples, value_bits,
                                            temperature, seed, whole_batches)
                bar.update(len(todo), len(batch_keys) - len(todo))
    finally:
        bar.close()
        if was_training:
            model.train(True)
    return written


def _label_batch(model, ids, mask, todo, batch_keys, writer, dev, b_index, method, k, n_samples,
                 value_bits, temperature, seed, whole_batches=False) -> int:
    """Run the model on the rows ``todo`` of one batch (on all of them with
    ``whole_batches``) and add the entries of ``todo``."""
    if whole_batches:
        rows_run = list(range(ids.shape[0]))  # logits row i is batch row i
    elif len(todo) < ids.shape[0]:  # only the sequences not stored yet
        rows_run = todo
        rows = torch.tensor(todo, dtype=torch.int64, device=ids.device)
        ids = ids.index_select(0, rows)
        mask = None if mask is None else mask.index_select(0, rows)
    else:
        rows_run = todo
    if dev is not None:
        ids = ids.to(dev)
        mask = None if mask is None else mask.to(dev)
    where = f"batch {b_index}"
    logits = _logits_of(model(input_ids=ids, attention_mask=mask), where)
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise ValueError(f"the model's logits for {where} must have shape (B, T, V) = "
                         f"{(*ids.shape, 'V')}, got {tuple(logits.shape)}")
    if logits.shape[-1] != writer.vocab_size:
        raise ValueError(f"the model's vocabulary (logits' last dim, {logits.shape[-1]}) differs "
                         f"from the writer's vocab_size ({writer.vocab_size})")
    keep = None if mask is None else mask.to(device=logits.device, dtype=torch.bool)
    at = {r: i for i, r in enumerate(rows_run)}
    for r in todo:
        i = at[r]
        key = batch_keys[r]
        z = logits[i] if keep is None else logits[i][keep[i]]
        row_seed = None if seed is None or method != "sampled" else _sequence_seed(seed, key)
        labels = encode(z, method=method, k=k, n_samples=n_samples, temperature=temperature,
                        value_bits=value_bits, seed=row_seed)
        writer.add(key, labels)
    return len(todo)
