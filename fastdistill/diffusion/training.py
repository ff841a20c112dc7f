"""What the teacher's training and every distillation share: the data as
(images, labels), one seeded ``torch.Generator`` for every random draw (saved
with the checkpoint, so a resumed run equals an uninterrupted one), EMA
copies, and sealed atomic checkpoints (``fastdistill._checkpoint``) holding
modules, optimizers and that generator."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from .. import _checkpoint, _checks
from .._backend import cache_root

CHECKPOINT_MAGIC = b"FDDFCKPT"
CHECKPOINT_VERSION = 1
def cache_dir() -> Path:
    """Where trained teachers (and the metrics' classifiers) are kept:
    ``_backend.cache_root()/diffusion`` ($FASTDISTILL_CACHE overrides the root)."""
    return cache_root() / "diffusion"


_STATE_TYPES = {"version": int, "kind": str, "settings": dict, "iteration": int, "modules": dict,
                "optimizers": dict, "rng": torch.Tensor, "extra": dict}


def as_data(name: str, data) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(x, labels or None, a name) from "digits"/"mnist" (their train split), an
    ``ImageData``, an (x, labels) pair, or a tensor x (unconditional)."""
    from ..dd.data import ImageData, load_dataset

    label = "tensor"
    if isinstance(data, str):
        if data not in ("digits", "mnist"):
            raise ValueError(f"{name} must be 'digits', 'mnist', an ImageData, an (x, labels) pair "
                             f"or a tensor, got {data!r}")
        label, data = data, load_dataset(data)
    if isinstance(data, ImageData):
        label = data.name
        x, y = data.train_images, data.train_labels
    elif isinstance(data, torch.Tensor):
        x, y = data, None
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    else:
        raise TypeError(f"{name} must be 'digits', 'mnist', an ImageData, an (x, labels) pair or a "
                        f"tensor, got {type(data).__name__}")
    _checks.tensor(f"{name} samples", x, floating=True)
    if x.dim() < 2 or len(x) == 0:
        raise ValueError(f"{name} samples must be a non-empty batch (N, ...), got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} samples hold NaN or inf")
    if y is not None:
        _checks.tensor(f"{name} labels", y)
        if y.dtype.is_floating_point or tuple(y.shape) != (len(x),):
            raise ValueError(f"{name} labels must be integers of shape ({len(x)},), got "
                             f"{y.dtype} {tuple(y.shape)}")
        y = y.to(torch.int64)
        if int(y.min()) < 0:
            raise ValueError(f"{name} labels must be ≥ 0")
    return x.float(), y, label


def positive_int(name: str, v, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an int ≥ {low}, got {v!r}")
    return v


def seeded(gen: torch.Generator, build):
    """``build()`` with torch's global RNG seeded from ``gen`` (network
    initializations), the global state left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
        return build()


def frozen_copy(module: nn.Module) -> nn.Module:
    out = copy.deepcopy(module)
    out.requires_grad_(False)
    out.eval()
    return out


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    for pt, ps in zip(target.parameters(), source.parameters()):
        pt.lerp_(ps.detach(), 1 - decay)
    for bt, bs in zip(target.buffers(), source.buffers()):
        bt.copy_(bs)


class Checkpointed:
    """A run of ``iterations`` steps over named modules and optimizers, saved
    to ``checkpoint`` every ``checkpoint_every`` steps and at the end, and
    resumed from it when it exists (the same ``settings`` required)."""

    kind = "run"

    def __init__(self, checkpoint, checkpoint_every: int):
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.checkpoint_every = positive_int("checkpoint_every", checkpoint_every)

    def settings(self) -> dict:
        raise NotImplementedError

    def save(self, iteration: int, modules: dict, optimizers: dict, gen: torch.Generator,
             extra: dict) -> None:
        if self.checkpoint is None:
            return
        state = {"version": CHECKPOINT_VERSION, "kind": self.kind, "settings": self.settings(),
                 "iteration": iteration,
                 "modules": {k: m.state_dict() for k, m in modules.items()},
                 "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                 "rng": gen.get_state(), "extra": extra}
        _checkpoint.write(self.checkpoint, state, CHECKPOINT_MAGIC, CHECKPOINT_VERSION)

    def load(self) -> dict | None:
        """The checkpoint's state, checked, or None when there is none."""
        if self.checkpoint is None or not self.checkpoint.exists():
            return None
        return load_checkpoint(self.checkpoint, self.kind, self.settings())

    def restore(self, state: dict, modules: dict, optimizers: dict, gen: torch.Generator) -> None:
        path = self.checkpoint
        try:
            for k, m in modules.items():
                m.load_state_dict(state["modules"][k])
            for k, o in optimizers.items():
                o.load_state_dict(state["optimizers"][k])
            gen.set_state(state["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: checkpoint does not fit this run ({e})") from e


def load_checkpoint(path: str | os.PathLike, kind: str, settings: dict | None = None) -> dict:
    """A diffusion checkpoint's state: sealed-file checks, fields, finite
    values, its kind and (when given) the same settings."""
    state = _checkpoint.read(path, CHECKPOINT_MAGIC, CHECKPOINT_VERSION, "diffusion")
    _checkpoint.check_fields(path, state, _STATE_TYPES)
    if state["kind"] != kind:
        raise ValueError(f"{path}: a {state['kind']!r} checkpoint, not a {kind!r} one")
    _checkpoint.check_finite(path, {k: state[k] for k in ("modules", "optimizers", "extra")})
    if settings is not None and state["settings"] != settings:
        diff = sorted(k for k in set(state["settings"]) | set(settings)
                      if state["settings"].get(k) != settings.get(k))
        raise ValueError(f"{path} was written with other settings ({', '.join(diff)}); use another "
                         "checkpoint path or the same settings")
    return state
