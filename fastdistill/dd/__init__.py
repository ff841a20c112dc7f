"""Dataset distillation (``fd.dd``): grouped and per-sample gradients from one
pass, the matching losses of DC/DSA, DM, DataDAM and MTT, differentiable
siamese augmentation, and the standard ConvNet."""
from .augment import dsa
from .grads import grouped_gradients, per_sample_grad_gram, per_sample_grad_norms
from .losses import (attention_match_loss, distribution_match_loss, gradient_match_loss,
                     trajectory_match_loss)
from .nets import ConvNet

__all__ = ["grouped_gradients", "per_sample_grad_norms", "per_sample_grad_gram",
           "gradient_match_loss", "distribution_match_loss", "attention_match_loss",
           "trajectory_match_loss", "dsa", "ConvNet"]
