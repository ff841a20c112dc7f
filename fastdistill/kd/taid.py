"""TAID's adaptive interpolation schedule (kd-math.md §2).

TAID distils towards p_t = softmax((1 - t)·stopgrad(z_s/T) + t·z_t/T) and moves
t from t_start to t_end: never slower than a linear ramp, faster while the
loss is still dropping quickly (momentum of its relative decrease).
"""
from __future__ import annotations

import math
import numbers

import torch

from .. import _checks


def _settings(total_steps, t_start, t_end, alpha, momentum, *, momentum_name="momentum"):
    """The checked settings of a schedule (the constructor's and ``load_state_dict``'s):
    (total_steps, t_start, t_end, alpha, momentum decay)."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) \
            or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    t_start = _checks.real("t_start", t_start, low=0.0, high=1.0)
    t_end = _checks.real("t_end", t_end, low=t_start, high=1.0)
    alpha = _checks.real("alpha", alpha, low=0.0)
    decay = _checks.real(momentum_name, momentum, low=0.0, high=1.0, high_open=True)
    return int(total_steps), t_start, t_end, alpha, decay


class TAIDSchedule:
    """``t = schedule.t`` for the next ``kd_loss(..., divergence="taid", taid_t=t)``;
    ``schedule.step(loss)`` after each optimizer step returns the next t."""

    def __init__(self, total_steps: int, *, t_start: float = 0.4, t_end: float = 1.0,
                 alpha: float = 5e-4, momentum: float = 0.99):
        (self.total_steps, self.t_start, self.t_end, self.alpha,
         self.momentum_decay) = _settings(total_steps, t_start, t_end, alpha, momentum)
        self.t = self.t_start
        self.num_steps = 0
        self.momentum = 0.0
        self.prev_loss: float | None = None

    def step(self, loss) -> float:
        """Record this step's loss; returns t for the next step."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            raise ValueError(f"loss must be finite, got {value}")
        if self.prev_loss is not None and self.prev_loss != 0.0:
            rel = (self.prev_loss - value) / self.prev_loss
            self.momentum = self.momentum_decay * self.momentum + (1 - self.momentum_decay) * rel
        self.prev_loss = value
        self.num_steps += 1
        frac = min(1.0, self.num_steps / self.total_steps)
        t_lin = self.t_start + (self.t_end - self.t_start) * frac
        sig = 1.0 / (1.0 + math.exp(-self.momentum))
        delta = self.alpha * sig * (1.0 - self.t)
        self.t = min(self.t_end, max(t_lin, self.t + delta))
        return self.t

    def state_dict(self) -> dict:
        return {
            "total_steps": self.total_steps, "t_start": self.t_start, "t_end": self.t_end,
            "alpha": self.alpha, "momentum_decay": self.momentum_decay, "t": self.t,
            "num_steps": self.num_steps, "momentum": self.momentum, "prev_loss": self.prev_loss,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``. The settings get the constructor's checks and
        the running state its own (t in [t_start, t_end], num_steps an int >= 0,
        momentum finite, prev_loss finite or None); a bad state raises ValueError or
        TypeError naming the key and leaves the schedule unchanged."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict (a TAIDSchedule.state_dict()), got "
                            f"{type(state).__name__}")
        keys = set(self.state_dict())
        missing, extra = keys - set(state), set(state) - keys
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}")
        if extra:
            raise ValueError(f"state has unknown keys {sorted(extra)} (expected {sorted(keys)})")
        total, t_start, t_end, alpha, decay = _settings(
            state["total_steps"], state["t_start"], state["t_end"], state["alpha"],
            state["momentum_decay"], momentum_name="momentum_decay")
        t = _checks.real("t", state["t"], low=t_start, high=t_end)
        num = state["num_steps"]
        if isinstance(num, bool) or not isinstance(num, numbers.Integral) or num < 0:
            raise ValueError(f"num_steps must be an int >= 0, got {num!r}")
        momentum = _checks.real("momentum", state["momentum"])
        prev = state["prev_loss"]
        prev = None if prev is None else _checks.real("prev_loss", prev)
        self.total_steps, self.t_start, self.t_end, self.alpha, self.momentum_decay = (
            total, t_start, t_end, alpha, decay)
        self.t, self.num_steps, self.momentum, self.prev_loss = t, int(num), momentum, prev

    def __repr__(self) -> str:
        return f"TAIDSchedule(t={self.t:.4f}, step={self.num_steps}/{self.total_steps})"
