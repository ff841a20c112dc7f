"""fastdistill: fused, memory-lean losses for distillation.

``kd`` (the KD family: ``kd_loss``/``KDLoss`` on logits,
``fused_linear_kd_loss``/``FusedLinearKDLoss`` with the LM head fused in,
``sparse_kd_loss``/``sample_teacher`` for sparse teachers, ``TAIDSchedule``;
each also here), ``softlabels`` (packed
teacher outputs on disk, decoded inside the loss), ``ot`` (Sinkhorn, SinKD),
``dd`` (dataset distillation: grouped/per-sample gradients, matching losses),
``diffusion`` (DMD2/consistency/progressive distillation of diffusion models
and their fused ops), ``hf`` (``KDConfig``/``KDTrainer`` on the Hugging Face
Trainer; imported on first use, it needs transformers and accelerate),
``xtok`` (cross-tokenizer KD: byte-exact ``align`` of two tokenizations
into chunks, ``alm_loss`` on chunk likelihoods),
``cpu_cache`` (the cpp kernels' recycled gradient buffers),
and ``backends()`` to see what runs here.
"""
import importlib.util as _ilu
import sys as _sys
import types as _types
from pathlib import Path as _Path


def _source_tree_kernels() -> None:
    """kernels/ (the Triton kernels, one module per op family) is installed as
    ``fastdistill.kernels`` (a wheel, or the editable finder); a bare checkout
    on sys.path has neither, so bind the sibling kernels/ folder under that
    name, or the triton backend's imports fail. The folder has no
    ``__init__.py`` on purpose: a checkout's root on sys.path (``python -m``
    from it) must not shadow another distribution's top-level ``kernels``
    (Hugging Face's, which transformers ≥ 5.25 imports)."""
    if _ilu.find_spec(__name__ + ".kernels") is not None:
        return
    root = _Path(__file__).resolve().parent.parent / "kernels"
    if not root.is_dir():
        return
    module = _types.ModuleType(__name__ + ".kernels", "fastdistill's Triton kernels (kernels/)")
    module.__path__ = [str(root)]
    module.__package__ = module.__name__
    _sys.modules[module.__name__] = module


_source_tree_kernels()

from . import cpu_cache, dd, diffusion, kd, ot, softlabels, xtok  # noqa: E402
from ._backend import backends  # noqa: E402
from ._backend import load_if_built as _load_if_built  # noqa: E402
from .kd import (DIVERGENCES, FusedLinearKDLoss, KDLoss, TAIDSchedule,  # noqa: E402
                 fused_linear_kd_loss, kd_loss, sample_teacher, sparse_kd_loss)

_load_if_built()

__version__ = "0.1.0"


def __getattr__(name):
    """``fd.hf`` on first use: transformers is imported only by those who use it."""
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DIVERGENCES", "FusedLinearKDLoss", "KDLoss", "TAIDSchedule", "backends", "cpu_cache", "dd",
    "diffusion", "fused_linear_kd_loss", "kd", "kd_loss", "ot", "sample_teacher", "softlabels",
    "sparse_kd_loss", "xtok", "__version__",
]
