"""``train_teacher``: the diffusion model every distillation here starts
from, trained with ``denoising_loss`` on real data, cached on disk and
resumable (a run stopped half-way continues where it was)."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from .. import _checks
from .._progress import Progress
from ..reference.diffusion import PREDICTIONS, WEIGHTINGS
from .model import DiffusionModel
from .nets import DigitUNet, MLPDenoiser
from .ops import denoising_loss
from .schedule import KINDS, NoiseSchedule
from .training import (Checkpointed, as_data, cache_dir, ema_update, frozen_copy, positive_int,
                       seeded)


def build_net(image_shape, num_classes, num_steps: int, width: int):
    """A DigitUNet for images (C, H, W), an MLPDenoiser for points (D,)."""
    if len(image_shape) == 3:
        return DigitUNet(image_shape, num_classes, num_steps=num_steps, width=width)
    if len(image_shape) == 1:
        return MLPDenoiser(image_shape[0], num_classes, num_steps=num_steps, width=width)
    raise ValueError(f"samples must be images (N, C, H, W) or points (N, D), got shape "
                     f"(N, {', '.join(map(str, image_shape))})")


class _TeacherRun(Checkpointed):
    kind = "teacher"

    def __init__(self, settings: dict, checkpoint, checkpoint_every):
        super().__init__(checkpoint, checkpoint_every)
        self._settings = settings

    def settings(self) -> dict:
        return self._settings


def train_teacher(data, *, iterations: int = 4000, batch_size: int = 128, lr: float = 1e-3,
                  width: int = 32, prediction: str = "v", weighting: str = "uniform",
                  schedule: str = "cosine", num_steps: int = 1000, label_dropout: float = 0.1,
                  ema: float = 0.999, seed: int = 0, checkpoint=None, cache: bool = True,
                  checkpoint_every: int = 500, progress: bool = True) -> DiffusionModel:
    """A class-conditional diffusion model of ``data`` (see ``training.as_data``).

    Adam at ``lr`` (cosine-decayed to 0), ``iterations`` batches of
    ``batch_size``; labels dropped to the null class with probability
    ``label_dropout`` (for classifier-free guidance); the returned model is the
    EMA of the weights (``ema`` decay). With ``cache`` the run is kept at
    ``cache_dir()/teacher-<data>-<key>.ckpt`` (key: a hash of the settings
    and the data), so a second call loads it and an interrupted one resumes;
    ``checkpoint`` names the file instead. The returned model's
    ``checkpoint_path`` is that file (None without one), ``from_cache`` says
    whether it was loaded whole (no training in this call).
    """
    x, y, name = as_data("data", data)
    iterations = positive_int("iterations", iterations)
    batch_size = positive_int("batch_size", batch_size)
    lr = _checks.real("lr", lr, low=0.0, low_open=True)
    _checks.choice("prediction", prediction, PREDICTIONS)
    _checks.choice("weighting", weighting, WEIGHTINGS)
    _checks.choice("schedule", schedule, KINDS)
    label_dropout = _checks.real("label_dropout", label_dropout, low=0.0, high=1.0, high_open=True)
    ema = _checks.real("ema", ema, low=0.0, high=1.0, high_open=True)
    _checks.flag("cache", cache)
    num_classes = None if y is None else int(y.max()) + 1
    settings = dict(iterations=iterations, batch_size=batch_size, lr=lr, width=width,
                    prediction=prediction, weighting=weighting, schedule=schedule,
                    num_steps=num_steps, label_dropout=label_dropout, ema=ema, seed=seed,
                    num_classes=num_classes, data=name, shape=list(x.shape))
    if checkpoint is None and cache:
        digest = hashlib.sha256(repr(sorted(settings.items())).encode())
        digest.update(x.numpy().tobytes())
        if y is not None:
            digest.update(y.numpy().tobytes())
        checkpoint = cache_dir() / f"teacher-{name}-{digest.hexdigest()[:16]}.ckpt"
    run = _TeacherRun(settings, checkpoint, checkpoint_every)
    sched = NoiseSchedule(schedule, num_steps)
    gen = torch.Generator().manual_seed(seed)
    net = seeded(gen, lambda: build_net(tuple(x.shape[1:]), num_classes, num_steps, width))
    model = DiffusionModel(net, sched, prediction)
    ema_model = frozen_copy(model)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched_lr = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, iterations) / iterations)))
    modules = {"net": net, "ema": ema_model}
    optimizers = {"opt": opt, "lr": sched_lr}
    state = run.load()
    start = 0
    if state is not None:
        run.restore(state, modules, optimizers, gen)
        start = state["iteration"]
    bar = Progress(progress and start < iterations, iterations, f"teacher {name}", "step",
                   initial=start)
    try:
        for it in range(start, iterations):
            idx = torch.randint(len(x), (batch_size,), generator=gen)
            x0 = x[idx]
            labels = None
            if y is not None:
                drop = torch.rand(batch_size, generator=gen) < label_dropout
                labels = torch.where(drop, num_classes, y[idx])
            t = torch.randint(num_steps, (batch_size,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            x_t = sched.add_noise(x0, noise, t)
            loss = denoising_loss(net(x_t, t, labels), x0, noise, t, sched,
                                  prediction=prediction, weighting=weighting)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched_lr.step()
            ema_update(ema_model, model, ema)
            bar.update(1, loss=f"{float(loss.detach()):.4f}")
            if (it + 1) % run.checkpoint_every == 0 and it + 1 < iterations:
                run.save(it + 1, modules, optimizers, gen, {})
    finally:
        bar.close()
    if state is None or start < iterations:
        run.save(iterations, modules, optimizers, gen, {})
    # where the run is kept, and whether this call trained (part of) it
    ema_model.checkpoint_path = None if checkpoint is None else Path(checkpoint)
    ema_model.from_cache = state is not None and start >= iterations
    ema_model.iterations = iterations
    return ema_model
