"""A map-style ``Dataset`` over a ``SoftLabelStore``, and its collate_fn.

Training pairs each student input with the teacher's stored soft labels by
key; the dataset does that pairing so any sampler and ``DataLoader``
(workers included) can be used unchanged.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from .. import _checks
from .codec import SoftLabels
from .store import SoftLabelStore, normalize_key

__all__ = ["SoftLabelDataset", "collate_soft_labels"]

_INT_KEY = re.compile(r"0|[1-9][0-9]*")


class SoftLabelDataset(Dataset):
    """Item ``i`` is ``(input, labels)`` for the ``i``-th key (``labels`` alone
    when ``inputs`` is None); ``with_aug=True`` appends the entry's aug
    tensor (None where the entry has none).

    ``keys``: a subset/order of the store's keys (default: all, in
    insertion order); repeats are allowed. ``inputs`` is looked up by key:

    - a ``Mapping``: ``inputs[key]``, or ``inputs[int(key)]`` when the str
      key is absent and the key is a non-negative decimal integer;
    - a sequence or tensor (``len()`` and int indexing, e.g. another
      map-style dataset): ``inputs[int(key)]``; every key must then be a
      non-negative decimal integer below ``len(inputs)``;
    - a callable: ``inputs(key)`` with the str key (store keys are strings).

    Mapping and sequence lookups are checked for every key here, so a
    missing input fails now rather than in a worker mid-epoch. In a
    DataLoader worker the labels are copied out of the shard mapping, so
    sending an item to the main process sends its rows, not its shard.
    """

    def __init__(self, store: SoftLabelStore, inputs=None, *, keys=None, with_aug: bool = False):
        if not isinstance(store, SoftLabelStore):
            raise TypeError(f"store must be a SoftLabelStore, got {type(store).__name__}")
        self.store = store
        self.with_aug = _checks.flag("with_aug", with_aug)
        if keys is None:
            self.keys = store.keys()
        else:
            if isinstance(keys, (str, bytes)) or not hasattr(keys, "__iter__"):
                raise TypeError(f"keys must be a sequence of str/int keys, got {type(keys).__name__}")
            self.keys = [normalize_key(k, "keys[i]") for k in keys]
            missing = [k for k in self.keys if k not in store]
            if missing:
                raise ValueError(f"keys holds {len(missing)} keys that are not in the store "
                                 f"{store.path}, e.g. {missing[:3]}")
        self.inputs = inputs
        self._mode, self._input_index = self._resolve_inputs(inputs)

    def _resolve_inputs(self, inputs):
        """How each key finds its input: ('none'|'index'|'call', per-key index or None)."""
        if inputs is None:
            return "none", None
        if isinstance(inputs, Mapping):
            index = []
            for k in self.keys:
                if k in inputs:
                    index.append(k)
                elif _INT_KEY.fullmatch(k) and int(k) in inputs:
                    index.append(int(k))
                else:
                    raise ValueError(f"inputs (a mapping) has no entry for key {k!r}"
                                     + (f" (nor {int(k)})" if _INT_KEY.fullmatch(k) else ""))
            return "index", index
        if isinstance(inputs, (str, bytes)):
            raise TypeError("inputs must be a mapping, a sequence/tensor or a callable, got "
                            f"{type(inputs).__name__}")
        if hasattr(inputs, "__getitem__") and hasattr(inputs, "__len__"):
            n = len(inputs)
            index = []
            for k in self.keys:
                if not _INT_KEY.fullmatch(k) or int(k) >= n:
                    raise ValueError(f"inputs is a sequence of length {n}, indexed by int(key); "
                                     f"key {k!r} is not a non-negative integer below {n}")
                index.append(int(k))
            return "index", index
        if callable(inputs):
            return "call", None
        raise TypeError("inputs must be a mapping, a sequence/tensor or a callable key -> input, "
                        f"got {type(inputs).__name__}")

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        key = self.keys[i]
        entry = self.store[key]
        labels = entry.labels
        if get_worker_info() is not None:
            labels = SoftLabels(labels.codec, labels.data.clone())
        item = []
        if self._mode == "index":
            item.append(self.inputs[self._input_index[i]])
        elif self._mode == "call":
            item.append(self.inputs(key))
        item.append(labels)
        if self.with_aug:
            item.append(entry.aug)
        return item[0] if len(item) == 1 else tuple(item)

    def __repr__(self) -> str:
        return (f"SoftLabelDataset({len(self)} keys of {self.store!r}, inputs={self._mode}, "
                f"with_aug={self.with_aug})")


def _special(x) -> bool:
    """Whether x (or something nested in a tuple/list/dict) needs this collate, not torch's."""
    if x is None or isinstance(x, SoftLabels):
        return True
    if isinstance(x, (tuple, list)):
        return any(_special(v) for v in x)
    if isinstance(x, Mapping):
        return any(_special(v) for v in x.values())
    return False


def _collate(samples: list, where: str):
    first = samples[0]
    if any(isinstance(s, SoftLabels) for s in samples):
        for j, s in enumerate(samples):
            if not isinstance(s, SoftLabels):
                raise TypeError(f"{where}: sample {j} is {type(s).__name__}, sample 0 is SoftLabels")
            if s.codec != first.codec:
                raise ValueError(f"{where}: sample {j} has codec {s.codec}, sample 0 has "
                                 f"{first.codec}; soft labels of different codecs cannot be batched")
            if s.shape != first.shape:
                raise ValueError(f"{where}: sample {j} has shape {tuple(s.shape)}, sample 0 has "
                                 f"{tuple(first.shape)}; soft labels are stacked, so every sample "
                                 "needs the same shape (pad sequences to one length first)")
        return SoftLabels(first.codec, torch.stack([s.data for s in samples]))
    if any(s is None for s in samples):
        if all(s is None for s in samples):
            return None
        raise ValueError(f"{where}: some samples are None and some are not")
    if not any(_special(s) for s in samples):
        return default_collate(samples)
    if isinstance(first, (tuple, list)):
        for j, s in enumerate(samples):
            if not isinstance(s, (tuple, list)) or len(s) != len(first):
                raise ValueError(f"{where}: sample {j} does not have the {len(first)} fields of "
                                 "sample 0")
        fields = [_collate([s[f] for s in samples], f"{where}[{f}]") for f in range(len(first))]
        if hasattr(first, "_fields"):  # a namedtuple
            return type(first)(*fields)
        return type(first)(fields) if isinstance(first, list) else tuple(fields)
    if isinstance(first, Mapping):
        for j, s in enumerate(samples):
            if not isinstance(s, Mapping) or s.keys() != first.keys():
                raise ValueError(f"{where}: sample {j} does not have the keys of sample 0")
        return {k: _collate([s[k] for s in samples], f"{where}[{k!r}]") for k in first}
    raise TypeError(f"{where}: cannot collate {type(first).__name__} with SoftLabels")


def collate_soft_labels(batch):
    """A DataLoader collate_fn: SoftLabels of one codec and shape are stacked
    into one ``SoftLabels`` (batch dimension first), None fields stay None,
    and everything else goes through ``torch.utils.data.default_collate``."""
    if isinstance(batch, (str, bytes)) or not isinstance(batch, (list, tuple)):
        raise TypeError(f"batch must be a list of samples, got {type(batch).__name__}")
    if not batch:
        raise ValueError("batch is empty")
    return _collate(list(batch), "batch")
