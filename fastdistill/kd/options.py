"""The keywords every KD loss shares, checked once (``kd_options``), and the
small helpers of their fused autograd functions (kd_loss, the fused-linear,
sparse, packed soft-label and vocab-parallel losses)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _checks, cpu_cache
from ..reference import kd as ref

DIVERGENCES = ref.DIVERGENCES
REDUCTIONS = ("mean", "sum", "none")
VOCAB_MISMATCH = ("error", "pad", "truncate")

# The supported ranges. Outside them a divergence is a difference of O(1)
# terms whose result is orders of magnitude smaller (T → 0 or ∞, a mixture
# weight near an end, TAID's t near 0), which float32 kernels cannot resolve
# (measured relative error > 1e-3 against float64 on N(0, 1) logits: see
# tests/test_numerics.py). So they are errors, not silently inaccurate.
TEMPERATURE_RANGE = _checks.TEMPERATURE_RANGE  # checked by _checks.temperature (shared)
BETA_RANGE = (1e-3, 1.0 - 1e-3)
SKEW_MAX = 0.99
TAID_T_MIN = 0.02  # taid_t is 0 (exactly: the target is the student, loss 0) or in [0.02, 1]


@dataclass(frozen=True)
class KDOptions:
    """The checked keyword arguments every KD loss shares (kd_loss, the fused
    linear loss, the sparse loss): checked once, here, by ``kd_options``."""

    divergence: str
    temperature: float
    beta: float
    skew: float
    taid_t: float | None
    ignore_index: int
    hard_weight: float
    reduction: str
    t2_scale: bool
    vocab_mismatch: str

    @property
    def div_index(self) -> int:
        """The divergence as the kernels number it."""
        return DIVERGENCES.index(self.divergence)

    @property
    def param(self) -> float:
        """The divergence's own parameter: beta (jsd), skew (skew_*), t (taid), else 0."""
        return {"jsd": self.beta, "skew_forward_kl": self.skew, "skew_reverse_kl": self.skew,
                "taid": self.taid_t}.get(self.divergence, 0.0)

    @property
    def soft_scale(self) -> float:
        """T² with t2_scale (Hinton), else 1."""
        return self.temperature * self.temperature if self.t2_scale else 1.0

    def reference_keywords(self) -> dict:
        """The keywords of ``reference.kd.kd_loss_rows``."""
        return dict(divergence=self.divergence, temperature=self.temperature, beta=self.beta,
                    skew=self.skew, taid_t=self.taid_t, ignore_index=self.ignore_index,
                    hard_weight=self.hard_weight, t2_scale=self.t2_scale)


def kd_options(*, divergence="forward_kl", temperature=1.0, beta=0.5, skew=0.1, taid_t=None,
               ignore_index=-100, hard_weight=0.0, reduction="mean", t2_scale=True,
               vocab_mismatch="error") -> KDOptions:
    """Check the shared KD keywords; each error names the argument and the range."""
    _checks.choice("divergence", divergence, DIVERGENCES)
    temperature = _checks.temperature(temperature)
    beta = _checks.real("beta", beta, low=BETA_RANGE[0], high=BETA_RANGE[1])
    skew = _checks.real("skew", skew, low=0.0, high=SKEW_MAX)
    if divergence == "taid":
        if taid_t is None:
            raise ValueError(f"divergence='taid' needs taid_t: 0 or in [{TAID_T_MIN}, 1] (see "
                             "fastdistill.TAIDSchedule)")
        taid_t = _checks.real("taid_t", taid_t, low=0.0, high=1.0)
        if 0.0 < taid_t < TAID_T_MIN:
            raise ValueError(
                f"taid_t must be 0 or in [{TAID_T_MIN}, 1], got {taid_t}: below {TAID_T_MIN} the "
                "TAID loss is O(t²) against O(1) terms and float32 cannot resolve it")
    elif taid_t is not None:
        raise ValueError(f"taid_t is only used by divergence='taid', got divergence={divergence!r}")
    hard_weight = _checks.real("hard_weight", hard_weight, low=0.0, high=1.0)
    _checks.choice("reduction", reduction, REDUCTIONS)
    _checks.choice("vocab_mismatch", vocab_mismatch, VOCAB_MISMATCH)
    _checks.flag("t2_scale", t2_scale)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return KDOptions(divergence, temperature, beta, skew, taid_t, ignore_index, hard_weight,
                     reduction, t2_scale, vocab_mismatch)


def check_label_range(labels: torch.Tensor, V: int, ignore_index: int) -> None:
    """Labels index the vocabulary (or are ignore_index): checked before a kernel reads them."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, {V}) or equal ignore_index={ignore_index}")


def student_labels(labels, student: torch.Tensor, opt: KDOptions) -> torch.Tensor | None:
    """``labels`` for student logits (..., V), checked (shape, device; range
    when the cross-entropy term reads them) and flattened to int64 rows."""
    if labels is None:
        if opt.hard_weight > 0:
            raise ValueError("hard_weight > 0 needs labels for the cross-entropy term")
        return None
    _checks.labels_for("labels", labels, student.shape[:-1], student.device)
    flat = labels.reshape(-1).to(torch.int64)
    if opt.hard_weight > 0 and not torch.compiler.is_compiling():
        check_label_range(flat, student.shape[-1], opt.ignore_index)
    return flat


def check_inplace_target(inplace_backward, student: torch.Tensor) -> None:
    """``inplace_backward=True`` needs logits that are an op's output, not a leaf."""
    _checks.flag("inplace_backward", inplace_backward)
    if inplace_backward and student.requires_grad and student.is_leaf:
        raise ValueError(
            "inplace_backward=True overwrites student_logits with their gradient, so they "
            "must be the output of an op (e.g. the LM head), not a leaf tensor"
        )


def match_vocab(student, teacher, mode):
    """student and teacher logits brought to one vocabulary as ``vocab_mismatch`` says."""
    vs, vt = student.shape[-1], teacher.shape[-1]
    if vs == vt:
        return student, teacher
    if mode == "error":
        raise ValueError(
            f"student_logits has vocabulary size {vs} but teacher_logits has {vt}; pass "
            "vocab_mismatch='pad' (missing tokens get probability 0) or 'truncate'"
        )
    if mode == "truncate":
        v = min(vs, vt)
        return student[..., :v], teacher[..., :v]
    # pad: -inf logits, i.e. probability 0, never 0 logits (weight e^0)
    v = max(vs, vt)
    pad = lambda x: F.pad(x, (0, v - x.shape[-1]), value=float("-inf"))  # noqa: E731
    return (pad(student) if vs < v else student), (pad(teacher) if vt < v else teacher)


def no_double_backward(op: str):
    """The error of a fused op differentiated twice where it cannot be."""
    return RuntimeError(
        f"{op} with inplace_backward=True cannot be differentiated twice: its logits were "
        "overwritten by their gradient. Use inplace_backward=False for higher-order gradients.")


def scaled_gradient(grad: torch.Tensor, grad_out: torch.Tensor, reduction: str,
                    inplace: bool) -> torch.Tensor:
    """The gradient a fused kernel saved, times the loss's incoming gradient.

    The saved tensor itself when that is 1; in place when it is the student's
    own storage; otherwise a new tensor, on CPU from ``cpu_cache`` so that a
    scaled loss (``loss / accumulation_steps``, ``alpha * kd``) reuses
    resident memory step after step too."""
    compiling = torch.compiler.is_compiling()
    if reduction == "none":
        scale = grad_out.to(grad.dtype).unsqueeze(-1)
    else:
        if not compiling and bool(grad_out == 1):
            return grad
        scale = grad_out.to(grad.dtype)
    if inplace:
        return grad.mul_(scale)
    if compiling or grad.device.type != "cpu":
        return grad * scale
    return torch.mul(grad, scale, out=cpu_cache.empty_like(grad))
