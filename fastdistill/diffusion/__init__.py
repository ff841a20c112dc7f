"""Diffusion distillation: fused DMD, denoising and consistency ops, one DDIM
step, the ``NoiseSchedule`` they share, small digit denoisers, the teacher's
training and ``DiffusionDistiller`` (DMD2, consistency, progressive)."""
from .schedule import KINDS, NoiseSchedule

__all__ = ["KINDS", "NoiseSchedule"]
