"""Matching losses of dataset distillation (``shared/notes/kd-math.md`` §5):
gradient matching (DC/DSA), distribution matching (DM), attention matching
(DataDAM) and trajectory matching (MTT). Pure torch: the readable reference
that fused kernels are checked against."""
from __future__ import annotations

import torch

from .. import _checks
from .._backend import resolve
from ..ot import _first_order_only

METRICS = ("dc", "mse", "cos")
DC_EPS = 1e-6  # in the cosine denominators, as in the DC reference code

__all__ = ["gradient_match_loss", "distribution_match_loss", "attention_match_loss",
           "trajectory_match_loss", "METRICS"]


def _grad_lists(grads_a, grads_b):
    if not isinstance(grads_a, (list, tuple)) or not isinstance(grads_b, (list, tuple)):
        raise TypeError("grads_a and grads_b must be lists (one entry per group) of lists of "
                        "tensors (one per parameter), as grouped_gradients returns")
    if len(grads_a) != len(grads_b):
        raise ValueError(f"grads_a has {len(grads_a)} groups, grads_b {len(grads_b)}")
    if len(grads_a) == 0:
        raise ValueError("grads_a and grads_b must hold at least one group")
    for k, (ra, rb) in enumerate(zip(grads_a, grads_b)):
        if not isinstance(ra, (list, tuple)) or not isinstance(rb, (list, tuple)) or len(ra) != len(rb):
            raise ValueError(f"group {k}: grads_a and grads_b must list the same number of parameters")
        for j, (a, b) in enumerate(zip(ra, rb)):
            _checks.tensor(f"grads_a[{k}][{j}]", a, floating=True)
            _checks.tensor(f"grads_b[{k}][{j}]", b, floating=True)
            if a.shape != b.shape:
                raise ValueError(f"grads_a[{k}][{j}] {tuple(a.shape)} and grads_b[{k}][{j}] "
                                 f"{tuple(b.shape)} must have the same shape")
            if a.device != b.device:
                raise ValueError(f"grads_a[{k}][{j}] and grads_b[{k}][{j}] are on different devices")


def _dc_layer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_out (1 − cos(a_o, b_o)) over the rows of the (out, rest) reshape; 1-D: 0."""
    if a.dim() <= 1:
        return a.new_zeros(())
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    cos = (a2 * b2).sum(-1) / (a2.norm(dim=-1) * b2.norm(dim=-1) + DC_EPS)
    return (1 - cos).sum()


class _SegmentCosine(torch.autograd.Function):
    """Σ_s (1 − ⟨a_s, b_s⟩ / (|a_s||b_s| + eps)) over the segments of flat a, b,
    by a fused backend (ops: forward, backward), with the analytic backward."""

    @staticmethod
    def forward(ctx, a, b, offsets, ops):
        stats = ops[0](a, b, offsets)
        ctx.save_for_backward(a, b, offsets, stats)
        ctx.ops = ops
        dist = (1 - stats[:, 0] / (stats[:, 1] * stats[:, 2] + DC_EPS)).sum()
        return dist.to(a.dtype)

    @staticmethod
    @_first_order_only("gradient_match_loss on the cpp/triton backends (the fused cosine's "
                      "backward; backend='torch' differentiates twice)")
    def backward(ctx, grad):
        a, b, offsets, stats = ctx.saved_tensors
        da, db = ctx.ops[1](a, b, offsets, stats, grad, DC_EPS)
        return da, db, None, None


def _segment_ops(name: str):
    if name == "cpp":
        return (torch.ops.fastdistill.segment_cosine_forward,
                torch.ops.fastdistill.segment_cosine_backward)
    from fastdistill.kernels import dd as triton_dd  # CUDA only; imported on demand

    return triton_dd.segment_cosine_forward, triton_dd.segment_cosine_backward


def _fused(grads_a, grads_b, metric: str, name: str) -> torch.Tensor:
    """Every group and layer packed into two flat buffers, one op over them."""
    keep = (lambda t: t.dim() > 1) if metric == "dc" else (lambda t: True)
    flat_a = [t.reshape(-1) for row in grads_a for t in row if keep(t)]
    flat_b = [t.reshape(-1) for row in grads_b for t in row if keep(t)]
    ref = grads_a[0][0]
    if not flat_a:  # "dc" with only 1-D parameters
        return sum(t.sum() * 0 for row in grads_a + grads_b for t in row)
    a, b = torch.cat(flat_a).float(), torch.cat(flat_b).float()
    if metric == "mse":
        return ((a - b) ** 2).sum().to(ref.dtype)
    if metric == "dc":  # one segment per output row of every multi-dimensional gradient
        lengths = [n for row in grads_a for t in row if keep(t)
                   for n in [t.numel() // t.shape[0]] * t.shape[0]]
    else:  # "cos": one segment per group
        lengths = [sum(t.numel() for t in row) for row in grads_a]
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return _SegmentCosine.apply(a, b, offsets.to(a.device), _segment_ops(name)).to(ref.dtype)


def gradient_match_loss(grads_a, grads_b, metric: str = "dc", *, backend: str = "auto") -> torch.Tensor:
    """Distance between two sets of per-group gradients, summed over groups and layers.

    grads_a, grads_b: lists shaped like ``grouped_gradients``' result.
    "dc": per layer Σ_out (1 − ⟨a_o, b_o⟩ / (‖a_o‖‖b_o‖ + 1e-6)) over the rows of
    the gradient reshaped to (out, rest); 1-D parameters contribute 0.
    "mse": Σ ‖a − b‖². "cos": per group 1 − ⟨a, b⟩ / (‖a‖‖b‖ + 1e-6) with all
    parameters flattened together. Differentiable in both arguments.

    backend="torch" is the per-layer reference below; "cpp" (CPU) and
    "triton" (CUDA) pack all groups and layers into two flat buffers and
    compute every cosine (or the squared error) in one fused op with an
    analytic backward; "auto" picks per ``fastdistill.backends()`` (float64: torch).
    """
    _checks.choice("metric", metric, METRICS)
    _grad_lists(grads_a, grads_b)
    ref = grads_a[0][0] if grads_a[0] else None
    if ref is not None:
        dtypes = {t.dtype for row in list(grads_a) + list(grads_b) for t in row}
        wd = torch.float64 if torch.float64 in dtypes else torch.float32
        name = resolve(backend, ref.device, wd)
        if name != "torch":
            if wd == torch.float64:
                raise TypeError(f"backend={name!r} takes float32, bfloat16 or float16 gradients; "
                                "float64 runs on backend='torch'")
            return _fused(grads_a, grads_b, metric, name)
    total = None
    for ra, rb in zip(grads_a, grads_b):
        if metric == "dc":
            terms = [_dc_layer(a, b) for a, b in zip(ra, rb)]
            d = torch.stack(terms).sum() if terms else torch.zeros(())
        elif metric == "mse":
            d = sum(((a - b) ** 2).sum() for a, b in zip(ra, rb))
        else:
            fa = torch.cat([a.reshape(-1) for a in ra])
            fb = torch.cat([b.reshape(-1) for b in rb])
            d = 1 - (fa * fb).sum() / (fa.norm() * fb.norm() + DC_EPS)
        total = d if total is None else total + d
    return total


def _features(name: str, x) -> torch.Tensor:
    _checks.tensor(name, x, floating=True)
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, ...) with N >= 1, got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def _class_means(x: torch.Tensor, labels, name: str, classes: torch.Tensor) -> torch.Tensor:
    if labels.shape != x.shape[:1]:
        raise ValueError(f"{name} must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
    return torch.stack([x[labels == c].mean(0) for c in classes.tolist()])


def distribution_match_loss(real_features: torch.Tensor, syn_features: torch.Tensor,
                            real_labels: torch.Tensor | None = None,
                            syn_labels: torch.Tensor | None = None) -> torch.Tensor:
    """DM: Σ_c ‖mean φ(real_c) − mean φ(syn_c)‖² over the classes of the synthetic
    set (one class without labels). Features (N, ...) are flattened per sample;
    every synthetic class must have real samples."""
    r = _features("real_features", real_features)
    s = _features("syn_features", syn_features)
    if r.shape[1] != s.shape[1]:
        raise ValueError(f"real_features and syn_features must have the same feature size, got "
                         f"{r.shape[1]} and {s.shape[1]}")
    if (real_labels is None) != (syn_labels is None):
        raise ValueError("give both real_labels and syn_labels, or neither")
    if real_labels is None:
        return ((r.mean(0) - s.mean(0)) ** 2).sum()
    _checks.tensor("real_labels", real_labels)
    _checks.tensor("syn_labels", syn_labels)
    classes = torch.unique(syn_labels)
    missing = [c for c in classes.tolist() if not bool((real_labels == c).any())]
    if missing:
        raise ValueError(f"syn_labels has classes {missing} with no real sample")
    mr = _class_means(r, real_labels, "real_labels", classes)
    ms = _class_means(s, syn_labels, "syn_labels", classes)
    return ((mr - ms) ** 2).sum()


def _attention(f: torch.Tensor, p: float) -> torch.Tensor:
    """DataDAM's spatial attention of a (N, C, *spatial) feature map: Σ_c |f|^p
    over channels, flattened and L2-normalized per sample."""
    a = f.abs().pow(p).sum(1).reshape(f.shape[0], -1)
    return a / (a.norm(dim=1, keepdim=True) + DC_EPS)


def attention_match_loss(real_maps, syn_maps, *, p: float = 4.0,
                         real_embed: torch.Tensor | None = None,
                         syn_embed: torch.Tensor | None = None,
                         mmd_weight: float = 0.01) -> torch.Tensor:
    """DataDAM for one class: Σ_layers ‖mean_i a(real)_i − mean_i a(syn)_i‖² over
    the given feature maps (lists, one (N, C, H, W) map per layer), plus
    ``mmd_weight`` · ‖mean φ(real) − mean φ(syn)‖² of the final embeddings
    when they are given (linear-kernel MMD)."""
    if not isinstance(real_maps, (list, tuple)) or not isinstance(syn_maps, (list, tuple)):
        raise TypeError("real_maps and syn_maps must be lists of (N, C, ...) feature maps")
    if len(real_maps) != len(syn_maps) or not real_maps:
        raise ValueError(f"real_maps and syn_maps must list the same layers (got {len(real_maps)} "
                         f"and {len(syn_maps)}), at least one")
    p = _checks.real("p", p, low=0.0, low_open=True)
    mmd_weight = _checks.real("mmd_weight", mmd_weight, low=0.0)
    total = None
    for k, (fr, fs) in enumerate(zip(real_maps, syn_maps)):
        _checks.tensor(f"real_maps[{k}]", fr, floating=True)
        _checks.tensor(f"syn_maps[{k}]", fs, floating=True)
        if fr.dim() < 3 or fr.shape[1:] != fs.shape[1:]:
            raise ValueError(f"real_maps[{k}] {tuple(fr.shape)} and syn_maps[{k}] {tuple(fs.shape)} "
                             "must be (N, C, ...) with the same C and spatial size")
        d = ((_attention(fr, p).mean(0) - _attention(fs, p).mean(0)) ** 2).sum()
        total = d if total is None else total + d
    if (real_embed is None) != (syn_embed is None):
        raise ValueError("give both real_embed and syn_embed, or neither")
    if real_embed is not None:
        total = total + mmd_weight * distribution_match_loss(real_embed, syn_embed)
    return total


def _flat(name: str, params) -> torch.Tensor:
    if isinstance(params, torch.Tensor):
        _checks.tensor(name, params, floating=True)
        return params.reshape(-1)
    if not isinstance(params, (list, tuple)) or not params:
        raise TypeError(f"{name} must be a tensor or a non-empty list of tensors")
    for j, t in enumerate(params):
        _checks.tensor(f"{name}[{j}]", t, floating=True)
    return torch.cat([t.reshape(-1) for t in params])


def trajectory_match_loss(student_params, expert_start, expert_target) -> torch.Tensor:
    """MTT: ‖θ̂ − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖², θ̂ the student's parameters
    after its N unrolled steps from θ*_t. Each argument is a tensor or a list of
    tensors (flattened and concatenated in order)."""
    s = _flat("student_params", student_params)
    a = _flat("expert_start", expert_start)
    b = _flat("expert_target", expert_target)
    if not (s.numel() == a.numel() == b.numel()):
        raise ValueError(f"student_params, expert_start and expert_target hold {s.numel()}, "
                         f"{a.numel()} and {b.numel()} numbers: they must match")
    denom = ((a - b) ** 2).sum()
    if not bool(denom > 0):
        raise ValueError("expert_start equals expert_target: the normalizer ‖θ*_t − θ*_{t+M}‖² is 0")
    return ((s - b) ** 2).sum() / denom
