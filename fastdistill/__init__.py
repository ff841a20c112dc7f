"""fastdistill: fused, memory-lean losses for distillation.

``kd_loss``/``KDLoss`` (the large-vocabulary divergence family),
``fused_linear_kd_loss``/``FusedLinearKDLoss`` (the LM head fused in),
``sparse_kd_loss``/``sample_teacher`` (sparse teachers), ``softlabels`` (packed
teacher outputs on disk, decoded inside the loss), ``ot`` (Sinkhorn, SinKD),
``dd`` (dataset distillation: grouped/per-sample gradients, matching losses),
``TAIDSchedule``,
``cpu_cache`` (the cpp kernels' recycled gradient buffers),
and ``backends()`` to see what runs here.
"""
from . import cpu_cache, dd, ot, softlabels
from ._backend import backends
from ._backend import load_if_built as _load_if_built
from .fused_linear import FusedLinearKDLoss, fused_linear_kd_loss
from .kd import DIVERGENCES, KDLoss, kd_loss
from .sparse import sample_teacher, sparse_kd_loss
from .taid import TAIDSchedule

_load_if_built()

__version__ = "0.1.0"
__all__ = [
    "DIVERGENCES", "FusedLinearKDLoss", "KDLoss", "TAIDSchedule", "backends", "cpu_cache", "dd",
    "fused_linear_kd_loss", "kd_loss", "ot", "sample_teacher", "softlabels", "sparse_kd_loss",
    "__version__",
]
