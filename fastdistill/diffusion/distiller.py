"""``DiffusionDistiller``: a teacher diffusion model distilled into a 1-4 step
student by DMD2, consistency distillation or progressive distillation, on
fastdistill's fused ops, with resumable atomic checkpoints.

- "dmd2" (Yin et al. 2024): a generator G (initialized from the teacher) maps
  noise to x̂0 in ``steps`` calls; a fake score net (also from the teacher)
  learns the generator's distribution with ``denoising_loss``, and G follows
  ``dmd_loss`` (the teacher's x̂0 minus the fake net's at a noised sample),
  ``fake_updates`` fake-net steps per generator step (two time-scale updates).
  ``regression_warmup`` first regresses G onto the teacher's DDIM outputs.
  Multi-step generators are trained on their own backward simulation.
- "consistency" (Song et al. 2023, LCM's skipping-step solver): a student with
  the boundary condition f(x, t) = c_skip x + c_out x̂0 is pulled, with the
  pseudo-Huber ``consistency_loss``, towards its EMA copy evaluated one
  teacher DDIM step (``skip`` timesteps) earlier.
- "progressive" (Salimans & Ho 2022): rounds that halve the sampler's steps,
  from ``progressive_start`` down to ``steps``; each round's student matches
  two DDIM steps of the previous one in one step (``denoising_loss`` with the
  truncated-SNR weighting).
"""
from __future__ import annotations

import math
import numbers
import os

import torch

from .. import _checks
from .._progress import Progress
from .model import DiffusionModel
from .ops import consistency_loss, ddim_step, denoising_loss, dmd_loss
from .training import Checkpointed, as_data, ema_update, frozen_copy, positive_int

METHODS = ("dmd2", "consistency", "progressive")
STEPS = (1, 2, 4)
DEFAULT_ITERATIONS = {"dmd2": 300, "consistency": 1000, "progressive": 1000}
DEFAULT_LR = {"dmd2": 1e-4, "consistency": 1e-4, "progressive": 2e-4}


class DiffusionDistiller(Checkpointed):
    """Distills ``teacher`` (a ``DiffusionModel``) with ``method`` into a student
    sampling in ``steps`` network calls. ``fit(data)`` trains; ``sample``
    draws. ``checkpoint``: a file written every ``checkpoint_every``
    iterations and at the end, resumed by ``fit`` when it exists."""

    kind = "distiller"

    def __init__(self, method: str, teacher: DiffusionModel, *, steps: int = 1,
                 iterations: int | None = None, batch_size: int = 64, lr: float | None = None,
                 guidance_scale: float = 1.0, fake_updates: int = 5, regression_warmup: int = 0,
                 ema: float = 0.95, skip: int = 20, progressive_start: int = 32,
                 seed: int = 0, checkpoint: str | os.PathLike | None = None,
                 checkpoint_every: int = 200, progress: bool = True):
        super().__init__(checkpoint, checkpoint_every)
        self.method = _checks.choice("method", method, METHODS)
        if not isinstance(teacher, DiffusionModel):
            raise TypeError(f"teacher must be a fastdistill.diffusion.DiffusionModel, got "
                            f"{type(teacher).__name__}")
        if teacher.boundary:
            raise ValueError("teacher must be a diffusion model, not a consistency model")
        self.teacher = frozen_copy(teacher)
        self.steps = _steps(steps)
        self.iterations = (DEFAULT_ITERATIONS[method] if iterations is None
                           else positive_int("iterations", iterations))
        self.batch_size = positive_int("batch_size", batch_size)
        self.lr = DEFAULT_LR[method] if lr is None else _checks.real("lr", lr, low=0.0,
                                                                     low_open=True)
        self.guidance_scale = _checks.real("guidance_scale", guidance_scale, low=0.0)
        self.fake_updates = positive_int("fake_updates", fake_updates)
        self.regression_warmup = positive_int("regression_warmup", regression_warmup, 0)
        self.ema = _checks.real("ema", ema, low=0.0, high=1.0, high_open=True)
        T = teacher.schedule.num_steps
        self.skip = positive_int("skip", skip)
        if self.skip >= T:
            raise ValueError(f"skip must be < the schedule's {T} steps, got {skip}")
        self.progressive_start = positive_int("progressive_start", progressive_start, 2)
        if method == "progressive" and (self.progressive_start & (self.progressive_start - 1)
                                        or self.progressive_start <= steps):
            raise ValueError(f"progressive_start must be a power of 2 above steps={steps}, got "
                             f"{progressive_start}")
        self.seed = positive_int("seed", seed, 0)
        self.progress = _checks.flag("progress", progress)
        self.student: DiffusionModel | None = None

    def settings(self) -> dict:
        keep = ("method", "steps", "iterations", "batch_size", "lr", "guidance_scale",
                "fake_updates", "regression_warmup", "ema", "skip", "progressive_start", "seed")
        out = {k: getattr(self, k) for k in keep}
        # the teacher is part of the run: a fingerprint of its weights
        out["teacher"] = float(sum(p.double().sum() for p in self.teacher.parameters()))
        return out

    # ------------------------------------------------------------------ helpers
    def _labels(self, y, gen):
        if y is None:
            return None
        return y[torch.randint(len(y), (self.batch_size,), generator=gen)]

    def _noise(self, shape, gen):
        return torch.randn(shape, generator=gen)

    def _sample_t(self, n, gen, low=0.02, high=0.98):
        T = self.teacher.schedule.num_steps
        return torch.randint(int(low * T), int(high * T), (n,), generator=gen)

    # ------------------------------------------------------------------ fit
    def _prepare(self, data):
        """(x, labels, generator, modules, optimizers) of a fresh run."""
        x, y, _ = as_data("data", data)
        if tuple(x.shape[1:]) != self.teacher.image_shape:
            raise ValueError(f"data samples {tuple(x.shape[1:])} differ from the teacher's "
                             f"{self.teacher.image_shape}")
        if (y is None) != (self.teacher.num_classes is None):
            raise ValueError("data must have labels exactly when the teacher is class-conditional")
        gen = torch.Generator().manual_seed(self.seed)
        student = DiffusionModel(frozen_copy(self.teacher.net).requires_grad_(True).train(),
                                 self.teacher.schedule, self.teacher.prediction,
                                 boundary=self.method == "consistency")
        modules = {"student": student}
        optimizers = {"student": torch.optim.Adam(student.parameters(), lr=self.lr,
                                                  betas=(0.0 if self.method == "dmd2" else 0.9,
                                                         0.99))}
        if self.method == "dmd2":
            fake = DiffusionModel(frozen_copy(self.teacher.net).requires_grad_(True).train(),
                                  self.teacher.schedule, self.teacher.prediction)
            modules["fake"] = fake
            optimizers["fake"] = torch.optim.Adam(fake.parameters(), lr=self.lr, betas=(0.0, 0.99))
        elif self.method == "consistency":
            modules["target"] = frozen_copy(student)
        else:
            modules["previous"] = frozen_copy(self.teacher)
        return x, y, gen, modules, optimizers

    def fit(self, data) -> "DiffusionDistiller":
        """Distill on ``data`` (see ``training.as_data``: real samples are used
        by consistency and progressive distillation, labels by every method
        of a class-conditional teacher); resumes from ``checkpoint``."""
        x, y, gen, modules, optimizers = self._prepare(data)
        student = modules["student"]
        state = self.load()
        start = 0
        if state is not None:
            self.restore(state, modules, optimizers, gen)
            start = state["iteration"]
        total = self.iterations + (self.regression_warmup if self.method == "dmd2" else 0)
        bar = Progress(self.progress and start < total, total,
                       f"{self.method} {self.steps}-step", "iteration", initial=start)
        step = getattr(self, f"_step_{self.method}")
        try:
            for it in range(start, total):
                loss = step(it, x, y, gen, modules, optimizers)
                bar.update(1, loss=f"{loss:.4f}")
                if (it + 1) % self.checkpoint_every == 0 and it + 1 < total:
                    self.save(it + 1, modules, optimizers, gen, {})
        finally:
            bar.close()
        if start < total or state is None:
            self.save(total, modules, optimizers, gen, {})
        self.student = frozen_copy(student)
        return self

    # ------------------------------------------------------------------ dmd2
    def _generate(self, student, z, labels, gen, *, grad: bool):
        """A generator output as it is sampled: for several steps, a step
        index drawn at random and the input at it made by the generator's own
        earlier steps (backward simulation, without gradient)."""
        sched = self.teacher.schedule
        ts = sched.timesteps(self.steps)
        k = int(torch.randint(len(ts), (1,), generator=gen)) if len(ts) > 1 else 0
        x = z
        with torch.no_grad():
            for i in range(k):
                x0 = student.x0(x, torch.full((len(z),), ts[i], dtype=torch.int64), labels)
                x = sched.add_noise(x0, self._noise(z.shape, gen), ts[i + 1])
        tk = torch.full((len(z),), ts[k], dtype=torch.int64)
        with torch.set_grad_enabled(grad):
            return student.x0(x, tk, labels), x, tk

    def _step_dmd2(self, it, x, y, gen, modules, optimizers):
        student, fake = modules["student"], modules["fake"]
        sched = self.teacher.schedule
        shape = (self.batch_size,) + tuple(x.shape[1:])
        if it < self.regression_warmup:  # regress the generator on the teacher's DDIM outputs
            labels, z = self._labels(y, gen), self._noise(shape, gen)
            with torch.no_grad():
                target = self.teacher.sample_ddim(labels, 25, guidance_scale=self.guidance_scale,
                                                  noise=z)
            loss = consistency_loss(student.x0(z, torch.full((len(z),), sched.timesteps(1)[0]),
                                               labels), target, metric="l2")
            _apply(optimizers["student"], loss)
            return float(loss.detach())
        # the fake score net follows the generator's current distribution
        for _ in range(self.fake_updates):
            labels, z = self._labels(y, gen), self._noise(shape, gen)
            gx, _, _ = self._generate(student, z, labels, gen, grad=False)
            t, noise = self._sample_t(len(gx), gen, 0.0, 1.0), self._noise(shape, gen)
            pred = fake.output(sched.add_noise(gx, noise, t), t, labels)
            _apply(optimizers["fake"], denoising_loss(pred, gx, noise, t, sched,
                                                      prediction=fake.prediction))
        labels, z = self._labels(y, gen), self._noise(shape, gen)
        gx, _, _ = self._generate(student, z, labels, gen, grad=True)
        t, noise = self._sample_t(len(gx), gen), self._noise(shape, gen)
        with torch.no_grad():
            x_t = sched.add_noise(gx.detach(), noise, t)
            real = self.teacher.x0(x_t, t, labels, self.guidance_scale)
            fake_x0 = fake.x0(x_t, t, labels)
        loss = dmd_loss(gx, real, fake_x0)
        _apply(optimizers["student"], loss)
        return float(loss.detach())

    # ------------------------------------------------------------------ consistency
    def _step_consistency(self, it, x, y, gen, modules, optimizers):
        student, target_model = modules["student"], modules["target"]
        sched = self.teacher.schedule
        T, k = sched.num_steps, self.skip
        idx = torch.randint(len(x), (self.batch_size,), generator=gen)
        x0, labels = x[idx], (None if y is None else y[idx])
        t = torch.randint(k, T, (self.batch_size,), generator=gen)  # t - k ≥ 0
        t_prev = t - k
        x_t = sched.add_noise(x0, self._noise(x0.shape, gen), t)
        with torch.no_grad():
            out = self.teacher.output(x_t, t, labels, self.guidance_scale)
            x_prev = ddim_step(x_t, out, t, t_prev, sched, prediction=self.teacher.prediction)
            target = target_model.x0(x_prev, t_prev, labels)
        net_x0 = student.net_x0(x_t, t, labels)  # the boundary is folded into the loss
        c_skip, c_out = sched.consistency_scalings(t)
        loss = consistency_loss(net_x0, target, metric="pseudo_huber", x_t=x_t, c_skip=c_skip,
                                c_out=c_out)
        _apply(optimizers["student"], loss)
        ema_update(target_model, student, self.ema)
        return float(loss.detach())

    # ------------------------------------------------------------------ progressive
    def _rounds(self) -> list[int]:
        """The student's step counts, round by round: start/2, ..., steps."""
        n, out = self.progressive_start, []
        while n > self.steps:
            n //= 2
            out.append(n)
        return out

    def _step_progressive(self, it, x, y, gen, modules, optimizers):
        student, previous = modules["student"], modules["previous"]
        sched = self.teacher.schedule
        rounds = self._rounds()
        per_round = math.ceil(self.iterations / len(rounds))
        r = min(it // per_round, len(rounds) - 1)
        if it > 0 and it % per_round == 0 and it // per_round < len(rounds):
            # a new round: this round's teacher is the last round's student
            previous.load_state_dict(student.state_dict())
            optimizers["student"].state.clear()
        n = rounds[r]  # the student's steps this round; its teacher takes 2n
        grid = sched.timesteps(2 * n) + [-1]  # the teacher's timesteps, then the clean end
        j = torch.randint(n, (self.batch_size,), generator=gen) * 2
        g = torch.tensor(grid)
        t, t_mid, t_next = g[j], g[j + 1], g[j + 2]
        idx = torch.randint(len(x), (self.batch_size,), generator=gen)
        x0, labels = x[idx], (None if y is None else y[idx])
        noise = self._noise(x0.shape, gen)
        x_t = sched.add_noise(x0, noise, t)
        pred_kind = previous.prediction
        with torch.no_grad():
            gs = self.guidance_scale if r == 0 else None  # guidance is distilled in round 0
            mid = ddim_step(x_t, previous.output(x_t, t, labels, gs), t, t_mid, sched,
                            prediction=pred_kind)
            x_next = ddim_step(mid, previous.output(mid, t_mid, labels, gs), t_mid, t_next, sched,
                               prediction=pred_kind)
            # the x0 that takes x_t to x_next in one DDIM step, and its noise
            shape = (-1,) + (1,) * (x_t.dim() - 1)
            a, s = sched.alpha(t).view(shape), sched.sigma(t).view(shape)
            an, sn = sched.alpha(t_next).view(shape), sched.sigma(t_next).view(shape)
            ratio = sn / s
            x0_target = (x_next - ratio * x_t) / (an - ratio * a)
            eps_target = (x_t - a * x0_target) / s
        loss = denoising_loss(student.output(x_t, t, labels), x0_target, eps_target, t, sched,
                              prediction=student.prediction, weighting="snr_trunc")
        _apply(optimizers["student"], loss)
        return float(loss.detach())

    # ------------------------------------------------------------------ sample
    def sample(self, labels=None, steps: int | None = None, generator=None, *, n: int | None = None):
        """Samples of the student in the data's range: one per label (or ``n``
        for an unconditional teacher), in ``steps`` calls (default: the trained
        count; a progressive student samples with DDIM, the others re-noise)."""
        if self.student is None:
            raise RuntimeError("fit() the distiller before sampling")
        steps = self.steps if steps is None else steps
        if labels is None:
            if n is None:
                raise ValueError("pass labels (class-conditional) or n (unconditional)")
            noise = self.student.noise_like(n, generator)
        else:
            _checks.tensor("labels", labels)
            noise = self.student.noise_like(len(labels), generator)
        if self.method == "progressive":
            return self.student.sample_ddim(labels, steps, noise=noise)
        return self.student.sample_renoise(labels, steps, generator=generator, noise=noise)


def _steps(steps) -> int:
    """The student's sampling steps: an int in ``STEPS`` (not a bool or a float
    that compares equal to one)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int, one of {STEPS}, got {type(steps).__name__} "
                        f"{steps!r}")
    if int(steps) not in STEPS:
        raise ValueError(f"steps must be one of {STEPS}, got {steps!r}")
    return int(steps)


def _apply(opt, loss):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
