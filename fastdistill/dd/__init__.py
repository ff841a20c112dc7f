"""Dataset distillation (``fd.dd``): grouped and per-sample gradients from one
pass, the matching losses of DC/DSA, DM, DataDAM and MTT, differentiable
siamese augmentation, the standard ConvNet, the offline data sets and the
trainer (``DatasetDistiller``), so ``from fastdistill import dd`` reaches
everything README.md and DESIGN.md name."""
from .augment import dsa
from .data import DATASETS, ImageData, load_dataset
from .grads import grouped_gradients, per_sample_grad_gram, per_sample_grad_norms
from .losses import (attention_match_loss, distribution_match_loss, gradient_match_loss,
                     trajectory_match_loss)
from .nets import ConvNet
from .trainer import METHODS, DatasetDistiller, save_image_grid

__all__ = ["grouped_gradients", "per_sample_grad_norms", "per_sample_grad_gram",
           "gradient_match_loss", "distribution_match_loss", "attention_match_loss",
           "trajectory_match_loss", "dsa", "ConvNet", "DatasetDistiller", "METHODS", "save_image_grid",
           "load_dataset", "DATASETS", "ImageData"]
