"""The KD loss family: one concern, one package.

``loss`` (``kd_loss``/``KDLoss`` on logits), ``fused_linear`` (the LM head
fused in: ``fused_linear_kd_loss``), ``sparse`` (top-k or sampled teachers:
``sparse_kd_loss``, ``sample_teacher``), ``vocab_parallel`` (logits sharded
over the vocabulary across ranks), ``taid`` (``TAIDSchedule``) and
``options`` (the keywords they share, checked once). The public functions are
also ``fastdistill.*``; the packed soft-label loss is
``fastdistill.softlabels.kd_loss`` (it reads the codec's rows), and the
Hugging Face trainer that calls these is ``fastdistill.hf``.

Imports run one way: options ← vocab_parallel ← loss ← sparse ← fused_linear;
sparse and fused_linear read ``softlabels.codec``, which imports nothing of
this package.
"""
from .options import (BETA_RANGE, DIVERGENCES, REDUCTIONS, SKEW_MAX, TAID_T_MIN, TEMPERATURE_RANGE,
                      VOCAB_MISMATCH, KDOptions, kd_options)
from .loss import KDLoss, kd_loss
from .taid import TAIDSchedule
from .sparse import sample_teacher, sparse_kd_loss
from .fused_linear import FusedLinearKDLoss, fused_linear_kd_loss

__all__ = [
    "BETA_RANGE", "DIVERGENCES", "FusedLinearKDLoss", "KDLoss", "KDOptions", "REDUCTIONS",
    "SKEW_MAX", "TAID_T_MIN", "TAIDSchedule", "TEMPERATURE_RANGE", "VOCAB_MISMATCH",
    "fused_linear_kd_loss", "kd_loss", "kd_options", "sample_teacher", "sparse_kd_loss",
]
