"""``NoiseSchedule``: the discrete variance-preserving schedule every diffusion op shares.

x_t = α_t x0 + σ_t ε with α_t² + σ_t² = 1 for integer timesteps t = 0..T-1
(DDPM's indexing: t = 0 is the least noise), and t = -1 for the clean end
(α = 1, σ = 0), where a DDIM step lands on its last call. The coefficients
are kept in float64 and handed to the ops in float32 per sample.
"""
from __future__ import annotations

import math
import numbers

import torch

from .. import _checks

KINDS = ("cosine", "linear")


class NoiseSchedule:
    """VP schedule with ``num_steps`` discrete steps.

    ``kind="cosine"`` (Nichol & Dhariwal 2021: ᾱ(t) = f(t)/f(0),
    f(t) = cos²(((t/T) + s)/(1 + s)·π/2), each β capped at 0.999 so the last
    step keeps a little signal) or ``"linear"`` (DDPM: β from ``beta_start``
    to ``beta_end``).
    """

    def __init__(self, kind: str = "cosine", num_steps: int = 1000, *, beta_start: float = 1e-4,
                 beta_end: float = 0.02, cosine_s: float = 0.008):
        _checks.choice("kind", kind, KINDS)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
            raise ValueError(f"num_steps must be an int ≥ 2, got {num_steps!r}")
        if kind == "linear":
            beta_start = _checks.real("beta_start", beta_start, low=0.0, high=1.0, low_open=True,
                                      high_open=True)
            beta_end = _checks.real("beta_end", beta_end, low=beta_start, high=1.0,
                                    high_open=True)
            betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        else:
            cosine_s = _checks.real("cosine_s", cosine_s, low=0.0, high=1.0)
            i = torch.arange(num_steps + 1, dtype=torch.float64)
            f = torch.cos((i / num_steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
            abar = f / f[0]
            betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
        self.kind, self.num_steps = kind, num_steps
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)  # ᾱ_t, float64 (T,)

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.kind!r}, num_steps={self.num_steps})"

    def check_timesteps(self, name: str, t, batch: int | None, *,
                        allow_clean: bool = False) -> torch.Tensor:
        """``t`` as an int64 tensor (batch,): an int (python or numpy) or an integer
        tensor of shape () or (batch,) with values in [0, T) (or -1, the clean end,
        where ``allow_clean``); ``batch=None`` keeps a tensor's own shape (an int
        gives shape ()). A bad value is an error naming ``name``, never clamped
        or wrapped."""
        low = -1 if allow_clean else 0

        def refuse(got: str):
            what = "-1 (clean) or " if allow_clean else ""
            raise ValueError(f"{name} must be {what}in [0, {self.num_steps}), got {got}")

        if isinstance(t, bool):
            raise TypeError(f"{name} must be an int or an integer tensor, got bool")
        if isinstance(t, numbers.Integral):
            v = int(t)
            if not low <= v < self.num_steps:
                refuse(str(v))
            return torch.full(() if batch is None else (batch,), v, dtype=torch.int64)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be an int or an integer tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer timesteps, got {t.dtype}")
        if batch is not None:
            if t.dim() == 0:
                t = t.expand(batch)
            if tuple(t.shape) != (batch,):
                raise ValueError(f"{name} must have shape ({batch},) (one timestep per sample) or "
                                 f"(), got {tuple(t.shape)}")
        source = t.dtype
        t = t.to(torch.int64)  # exact for every integer dtype but uint64 (2**63 and up wrap)
        if t.numel() and not torch.compiler.is_compiling():
            lo, hi = int(t.min()), int(t.max())
            if source == torch.uint64 and lo < 0:
                refuse("uint64 values of 2**63 or more")
            if lo < low or hi >= self.num_steps:
                refuse(f"values in [{lo}, {hi}]")
        return t

    def _abar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ_t in float64 on t's device; 1 at t = -1."""
        table = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod]).to(t.device)
        return table[t + 1]

    def alpha(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """α_t = √ᾱ_t per sample."""
        return self._abar(t).sqrt().to(dtype)

    def sigma(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """σ_t = √(1 − ᾱ_t) per sample."""
        return (1 - self._abar(t)).sqrt().to(dtype)

    def snr(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """α_t²/σ_t² per sample (inf at t = -1)."""
        abar = self._abar(t)
        return (abar / (1 - abar)).to(dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t = α_t x0 + σ_t ε, in x0's dtype (the coefficients in float32)."""
        _checks.tensor("x0", x0, floating=True)
        _checks.tensor("noise", noise, floating=True)
        if noise.shape != x0.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must have x0's shape {tuple(x0.shape)}")
        t = self.check_timesteps("t", t, x0.shape[0]).to(x0.device)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        acc = torch.float64 if x0.dtype == torch.float64 else torch.float32
        a, s = self.alpha(t, acc).view(shape), self.sigma(t, acc).view(shape)
        return (a * x0.to(acc) + s * noise.to(acc)).to(x0.dtype)

    def timesteps(self, steps: int) -> list[int]:
        """The ``steps`` timesteps a sampler visits, from T-1 down, evenly spaced
        ("trailing" spacing, so one step starts from pure noise)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps must be an int in [1, {self.num_steps}], got {steps!r}")
        return [round(self.num_steps * (1 - i / steps)) - 1 for i in range(steps)]

    def consistency_scalings(self, t: torch.Tensor, *, sigma_data: float = 0.5,
                             timestep_scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) of a consistency model's boundary condition
        f = c_skip·x_t + c_out·x̂0 (LCM's choice for discrete schedules):
        c_skip = σ_d²/(u² + σ_d²), c_out = u/√(u² + σ_d²) with u = t·scaling,
        so f(x, t) = x at t = -1 (u set to 0 there) and f ≈ x̂0 at large t.
        ``t``: timesteps in [-1, T) (an int or an integer tensor of any shape)."""
        t = self.check_timesteps("t", t, None, allow_clean=True)
        sigma_data = _checks.real("sigma_data", sigma_data, low=0.0, low_open=True)
        timestep_scaling = _checks.real("timestep_scaling", timestep_scaling, low=0.0,
                                        low_open=True)
        u = (t.to(torch.float64) * timestep_scaling).clamp(min=0)  # t = -1: the clean boundary
        sd2 = sigma_data ** 2
        c_skip = sd2 / (u * u + sd2)
        c_out = u / (u * u + sd2).sqrt()
        return c_skip.float(), c_out.float()
