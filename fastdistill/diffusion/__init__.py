"""Diffusion distillation: fused DMD, denoising and consistency ops, one DDIM
step, the ``NoiseSchedule`` they share, small digit denoisers, the teacher's
training (``train_teacher``) and ``DiffusionDistiller`` (DMD2, consistency,
progressive), and ``metrics`` (a digit classifier's accuracy, FD, KID,
precision/recall of generated digits)."""
from . import metrics
from .distiller import METHODS, DiffusionDistiller
from .model import DiffusionModel
from .nets import DigitUNet, MLPDenoiser
from .ops import consistency_loss, ddim_step, denoising_loss, dmd_loss
from .schedule import KINDS, NoiseSchedule
from .teacher import cache_dir, train_teacher

__all__ = ["KINDS", "METHODS", "DiffusionDistiller", "DiffusionModel", "DigitUNet", "MLPDenoiser",
           "NoiseSchedule", "cache_dir", "consistency_loss", "ddim_step", "denoising_loss",
           "dmd_loss", "metrics", "train_teacher"]
