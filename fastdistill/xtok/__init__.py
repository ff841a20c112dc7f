"""Cross-tokenizer KD (issue 29): the teacher and the student tokenize the same
text differently, so their rows are compared over byte-aligned *chunks*.

``align``/``align_batch`` (``align.py``: two tokenizations' offsets → chunks),
``token_byte_lengths`` (``vocab.py``: per-vocabulary byte lengths, cached),
``alm_loss`` (``alm.py``: approximate likelihood matching of chunk
log-likelihoods, the student's LM head fused in) and ``token_logprobs``
(the observed tokens' log-probs from logits, for users who have them),
``uld_loss`` (``uld.py``: sorted-L1 of Boizard et al. from top-k, with its
error bound; ``chunk_pairs``: the position pairs of the aligned chunks) and
``mapped_kd_loss`` / ``vocab_map`` (``mapped.py``: exact byte-string id map,
KD over the mapped top-k mass with a tail bucket). The
readable reference is ``fastdistill.reference.xtok``; docs/xtok.md states the rules.
"""
from .vocab import byte_alphabet, is_byte_level, token_byte_lengths
from .align import Alignment, align, align_batch
from .alm import ALM_DIVERGENCES, alm_loss, chunk_logprobs, token_logprobs
from .uld import chunk_pairs, uld_loss
from .mapped import mapped_kd_loss, vocab_map

__all__ = ["ALM_DIVERGENCES", "Alignment", "align", "align_batch", "alm_loss", "byte_alphabet",
           "chunk_logprobs", "chunk_pairs", "is_byte_level", "mapped_kd_loss", "token_byte_lengths",
           "token_logprobs", "uld_loss", "vocab_map"]
