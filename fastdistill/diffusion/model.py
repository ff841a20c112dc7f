"""``DiffusionModel``: a denoiser network with its schedule and
parameterization, and the samplers every model here uses (the teacher's
DDIM, the few-step students' re-noising sampler)."""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from ..reference.diffusion import PREDICTIONS, to_x0
from .ops import ddim_step
from .schedule import NoiseSchedule


class DiffusionModel(nn.Module):
    """``net(x_t, t, labels)`` predicting ``prediction`` ("eps", "x0" or "v")
    on ``schedule``. ``boundary=True`` makes it a consistency model: its x̂0 is
    c_skip(t)·x_t + c_out(t)·x̂0_net (``NoiseSchedule.consistency_scalings``)."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction: str = "v", *,
                 boundary: bool = False):
        super().__init__()
        self.net, self.schedule = net, schedule
        self.prediction = _checks.choice("prediction", prediction, PREDICTIONS)
        self.boundary = _checks.flag("boundary", boundary)
        self.num_classes = getattr(net, "num_classes", None)
        self.image_shape = tuple(getattr(net, "image_shape", ()))

    def _coef(self, t, x):
        shape = (-1,) + (1,) * (x.dim() - 1)
        return (self.schedule.alpha(t).to(x.device).view(shape),
                self.schedule.sigma(t).to(x.device).view(shape))

    def output(self, x_t, t, labels=None, guidance_scale=None):
        """The network's prediction, guided (uncond + s·(cond − uncond)) when
        ``guidance_scale`` is given."""
        out = self.net(x_t, t, labels)
        if guidance_scale is None or guidance_scale == 1.0:
            return out
        if self.num_classes is None or labels is None:
            raise ValueError("guidance_scale needs a class-conditional model and labels")
        uncond = self.net(x_t, t, None)
        return uncond + guidance_scale * (out - uncond)

    def net_x0(self, x_t, t, labels=None, guidance_scale=None):
        """The network's x̂0: its output with the parameterization undone (no
        consistency boundary)."""
        a, s = self._coef(t, x_t)
        return to_x0(x_t, self.output(x_t, t, labels, guidance_scale), a, s, self.prediction)

    def x0(self, x_t, t, labels=None, guidance_scale=None):
        """x̂0(x_t, t): ``net_x0`` with the consistency boundary applied."""
        x0 = self.net_x0(x_t, t, labels, guidance_scale)
        if self.boundary:
            shape = (-1,) + (1,) * (x_t.dim() - 1)
            c_skip, c_out = (c.to(x_t.device).view(shape)
                             for c in self.schedule.consistency_scalings(t))
            x0 = c_skip * x_t + c_out * x0
        return x0

    def noise_like(self, n: int, generator=None, device="cpu"):
        return torch.randn((n,) + self.image_shape, generator=generator, device=device)

    @torch.no_grad()
    def sample_ddim(self, labels, steps: int, *, guidance_scale=None, generator=None,
                    noise=None) -> torch.Tensor:
        """Deterministic DDIM from pure noise in ``steps`` network calls."""
        if self.boundary:
            raise ValueError("a consistency model samples with sample_renoise")
        n = len(labels) if labels is not None else len(noise)
        x = self.noise_like(n, generator) if noise is None else noise
        ts = self.schedule.timesteps(steps)
        for i, t in enumerate(ts):
            tt = torch.full((n,), t, dtype=torch.int64)
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            out = self.output(x, tt, labels, guidance_scale)
            x = ddim_step(x, out, tt, t_prev, self.schedule, prediction=self.prediction)
        return x

    @torch.no_grad()
    def sample_renoise(self, labels, steps: int, *, generator=None, noise=None) -> torch.Tensor:
        """The few-step students' sampler (DMD2's and consistency models'):
        x̂0 at each of ``steps`` timesteps, fresh noise added back to the next."""
        n = len(labels) if labels is not None else len(noise)
        x = self.noise_like(n, generator) if noise is None else noise
        ts = self.schedule.timesteps(steps)
        for i, t in enumerate(ts):
            x0 = self.x0(x, torch.full((n,), t, dtype=torch.int64), labels)
            if i + 1 == len(ts):
                return x0
            x = self.schedule.add_noise(x0, self.noise_like(n, generator), ts[i + 1])
        return x
