"""Compact teacher soft labels: codecs, the on-disk store, and the loss
computed straight from the packed rows (``fastdistill.softlabels.kd_loss``)."""
from .codec import METHODS, VALUE_BITS, Codec, SoftLabels, encode
from .loss import kd_loss
from .dataset import SoftLabelDataset, collate_soft_labels
from .store import CorruptShardError, Entry, SoftLabelStore, SoftLabelWriter
from .teacher import label_tokens
from .parallel import label_windows

__all__ = ["METHODS", "VALUE_BITS", "Codec", "SoftLabels", "encode", "kd_loss", "label_tokens",
           "label_windows"]
__all__ += ["CorruptShardError", "Entry", "SoftLabelDataset", "SoftLabelStore",
            "SoftLabelWriter", "collate_soft_labels"]
