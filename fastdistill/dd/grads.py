"""Grouped and per-sample gradients from ONE forward and backward pass
(``shared/notes/kd-math.md`` §5).

A layer's weight gradient is a sum over samples of per-sample pieces built from
what the layer saw (its input a_i) and what came back (b_i = ∂loss_i/∂output_i):
Linear b_iᵀ a_i, Conv2d b_i unfold(a_i)ᵀ, a norm layer's affine Σ b_i x̂_i. So
one pass that records a and b per layer gives every group's gradient (sum the
pieces of the group's samples), and per-sample norms and Gram matrices
without forming the B per-sample gradients where the factored form is
cheaper. Layer types with parameters that are not known here fall back to
``torch.func`` (vmap of a vjp over the layer alone, with the recorded a and b).

The model must treat samples independently (no batch norm in training mode):
then ∂(Σ_i loss_i)/∂output restricted to row i is ∂loss_i/∂output_i.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks

__all__ = ["grouped_gradients", "per_sample_grad_norms", "per_sample_grad_gram"]


@dataclass
class _Call:
    """One call of a module with parameters: its input and output."""

    module: nn.Module
    input: torch.Tensor
    output: torch.Tensor
    version: int


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(f"model.{name} is a {type(m).__name__} in training mode: it mixes the "
                             "samples of a batch, so per-sample and per-group gradients are not "
                             "defined by one pass; call model.eval() or use instance/group norm")


def _record(model: nn.Module, inputs: torch.Tensor):
    """model(inputs) with every call of a module that owns parameters recorded."""
    calls: list[_Call] = []

    def hook(module, args, output):
        if len(args) != 1 or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            raise TypeError(f"{type(module).__name__} takes or returns something other than one "
                            "tensor; grouped/per-sample gradients need layers with one tensor "
                            "input and one tensor output")
        calls.append(_Call(module, args[0], output, output._version))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if any(True for _ in m.parameters(recurse=False))]
    try:
        outputs = model(inputs)
    finally:
        for h in handles:
            h.remove()
    return outputs, calls


def _checked_losses(loss_fn, outputs, targets, B: int) -> torch.Tensor:
    losses = loss_fn(outputs, targets)
    if not isinstance(losses, torch.Tensor) or losses.shape != (B,):
        raise ValueError(f"loss_fn(outputs, targets) must return per-sample losses of shape ({B},), "
                         f"got {getattr(losses, 'shape', type(losses).__name__)} (use reduction='none')")
    return losses


def _backward_pass(model, loss_fn, inputs, targets, create_graph):
    """One forward, one backward: the recorded calls and b = ∂Σloss/∂output per call."""
    _check_model(model)
    _checks.tensor("inputs", inputs)
    if inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must have a non-empty batch dimension, got {tuple(inputs.shape)}")
    B = inputs.shape[0]
    outputs, calls = _record(model, inputs)
    losses = _checked_losses(loss_fn, outputs, targets, B)
    for c in calls:
        if c.output._version != c.version:
            raise ValueError(f"the output of a {type(c.module).__name__} was modified in place after "
                             "the layer ran (e.g. ReLU(inplace=True)): use out-of-place ops")
        if c.input.shape[:1] != (B,) or c.output.shape[:1] != (B,):
            raise ValueError(f"a {type(c.module).__name__} saw a tensor without the batch of {B} "
                             "in front")
    live = [c for c in calls if c.output.requires_grad]
    grads = torch.autograd.grad(losses.sum(), [c.output for c in live], create_graph=create_graph,
                                allow_unused=True)
    out = []
    for c, b in zip(live, grads):
        out.append((c, torch.zeros_like(c.output) if b is None else b))
    return out, B


# ----------------------------------------------------------------- per-sample pieces
# Each known layer gives, per parameter, a factored per-sample gradient: for a
# weight, g_i = B_iᵀ A_i with A (B, T, k) and B (B, T, m) (g_i is m × k); for a
# vector (bias, norm affine), the per-sample gradients themselves (B, n).

def _parts(t: torch.Tensor, members: dict) -> dict:
    """{group id: t's rows of that group} for members {group id: slice or index
    tensor}. Consecutive slices covering t become ONE split: under create_graph
    its backward is one concatenation, where a slice per group would give each
    group a zero-filled gradient the size of t."""
    idx = list(members.values())
    if idx and all(isinstance(i, slice) for i in idx):
        sizes = [i.stop - i.start for i in idx]
        if idx[0].start == 0 and all(i.stop == j.start for i, j in zip(idx, idx[1:])) \
                and sum(sizes) == t.shape[0]:
            return dict(zip(members, torch.split(t, sizes)))
    return {k: t[i] for k, i in members.items()}


@dataclass
class _Outer:
    """g_i = B_iᵀ A_i: A (B, T, k), Bm (B, T, m); the parameter has shape ``shape`` (numel m·k)."""

    A: torch.Tensor
    Bm: torch.Tensor
    shape: torch.Size

    def materialize(self) -> torch.Tensor:  # (B, numel)
        return torch.bmm(self.Bm.transpose(1, 2), self.A).reshape(self.A.shape[0], -1)

    def group_sums(self, members: dict) -> dict:
        A, Bm = _parts(self.A, members), _parts(self.Bm, members)
        return {k: (Bm[k].reshape(-1, Bm[k].shape[-1]).T @ A[k].reshape(-1, A[k].shape[-1])).reshape(self.shape)
                for k in members}

    def _factored_cheaper(self) -> bool:
        _, T, k = self.A.shape
        m = self.Bm.shape[-1]
        return T * T * (k + m) < k * m  # kd-math §5: T² < k·m/(k+m)

    def sqnorms(self) -> torch.Tensor:
        if self.A.shape[1] == 1:
            return self.A.pow(2).sum((1, 2)) * self.Bm.pow(2).sum((1, 2))
        if self._factored_cheaper():
            aa = torch.bmm(self.A, self.A.transpose(1, 2))
            bb = torch.bmm(self.Bm, self.Bm.transpose(1, 2))
            return (aa * bb).sum((1, 2))
        return torch.linalg.vector_norm(self.materialize(), dim=1).square()

    def gram(self) -> torch.Tensor:
        if self.A.shape[1] == 1:
            a, b = self.A[:, 0], self.Bm[:, 0]
            return (a @ a.T) * (b @ b.T)
        if self._factored_cheaper():
            # ⟨g_i, g_j⟩ = Σ_{t,s} (a_it·a_js)(b_it·b_js)
            aa = torch.einsum("itk,jsk->ijts", self.A, self.A)
            bb = torch.einsum("itm,jsm->ijts", self.Bm, self.Bm)
            return (aa * bb).sum((2, 3))
        g = self.materialize()
        return g @ g.T


@dataclass
class _Dense:
    """Per-sample gradients as they are, (B, numel) (bias, norm affine, fallback)."""

    G: torch.Tensor
    shape: torch.Size

    def materialize(self) -> torch.Tensor:
        return self.G

    def group_sums(self, members: dict) -> dict:
        return {k: g.sum(0).reshape(self.shape) for k, g in _parts(self.G, members).items()}

    def sqnorms(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.G, dim=1).square()

    def gram(self) -> torch.Tensor:
        return self.G @ self.G.T


def _linear(m: nn.Linear, a, b):
    Bn = a.shape[0]
    A = a.reshape(Bn, -1, a.shape[-1])
    Bm = b.reshape(Bn, -1, b.shape[-1])
    out = {"weight": _Outer(A, Bm, m.weight.shape)}
    if m.bias is not None:
        out["bias"] = _Dense(Bm.sum(1), m.bias.shape)
    return out


class _ConvWeight:
    """A Conv2d weight: group sums by the convolution's own weight-gradient
    kernel on the group's samples (no unfold); per-sample forms through the
    unfolded outer product, built only when asked for."""

    def __init__(self, m: nn.Conv2d, a, b):
        self.m, self.a, self.b = m, a, b

    def group_sums(self, members: dict) -> dict:
        m = self.m
        a, b = _parts(self.a, members), _parts(self.b, members)
        return {k: torch.nn.grad.conv2d_weight(a[k], m.weight.shape, b[k], m.stride, m.padding,
                                               m.dilation, m.groups) for k in members}

    def _outer(self) -> _Outer:
        m, a, b = self.m, self.a, self.b
        cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        Bm = b.reshape(b.shape[0], b.shape[1], -1).transpose(1, 2)  # (B, L, Cout)
        return _Outer(cols.transpose(1, 2), Bm, m.weight.shape)  # A: (B, L, Cin·kh·kw)

    def materialize(self):
        return self._outer().materialize()

    def _shifted_gram_cheaper(self) -> bool:
        m, a, b = self.m, self.a, self.b
        T = b.shape[2] * b.shape[3]
        P = a.shape[2] * a.shape[3]
        k = m.kernel_size[0] * m.kernel_size[1]
        direct = m.out_channels * a.shape[1] * k * T
        return T * T * (m.out_channels + k) + P * P * a.shape[1] < direct

    def _shifted_gram_sqnorms(self) -> torch.Tensor:
        """‖g_i‖² without the unfolded columns: every patch is a shifted window
        of the same input, so with X_pq = x_p·x_q over input positions (Cin
        channels, not Cin·kh·kw) and B_ts = b_t·b_s over output positions,
        ‖g‖² = Σ_offsets Σ_{t,s} B_ts X_{pos(t,δ),pos(s,δ)}, and the
        X entries for one kernel offset δ are a strided window of X."""
        m, a, b = self.m, self.a, self.b
        Bn, Cin, H, W = a.shape
        Ho, Wo = b.shape[2:]
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
        xa = a.reshape(Bn, Cin, H * W)
        X = torch.bmm(xa.transpose(1, 2), xa).reshape(Bn, H, W, H, W)
        X = F.pad(X, (pw, pw, ph, ph, pw, pw, ph, ph))  # zero rows/columns for the padding
        bm = b.reshape(Bn, b.shape[1], Ho * Wo)
        Bg = torch.bmm(bm.transpose(1, 2), bm).reshape(Bn, Ho, Wo, Ho, Wo)
        # Σ_δ ⟨Bg, X_δ⟩ = ⟨Bg, Σ_δ X_δ⟩: the windows summed into one buffer
        # in place, then one dot per sample (no product temporaries)
        S = None
        for i in range(kh):
            rows = slice(i * dh, i * dh + sh * (Ho - 1) + 1, sh)
            for j in range(kw):
                cols = slice(j * dw, j * dw + sw * (Wo - 1) + 1, sw)
                window = X[:, rows, cols, rows, cols]
                S = window.clone(memory_format=torch.contiguous_format) if S is None else S.add_(window)
        return torch.bmm(Bg.reshape(Bn, 1, -1), S.reshape(Bn, -1, 1)).reshape(Bn)

    def sqnorms(self):
        if self._shifted_gram_cheaper():
            return self._shifted_gram_sqnorms()
        return self._outer().sqnorms()

    def gram(self):
        return self._outer().gram()


def _conv2d(m: nn.Conv2d, a, b):
    out = {"weight": _ConvWeight(m, a, b)}
    if m.bias is not None:
        out["bias"] = _Dense(b.sum((2, 3)), m.bias.shape)
    return out


def _conv2d_known(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def _dots(u: torch.Tensor, v: torch.Tensor, over_rows: bool, create_graph: bool) -> torch.Tensor:
    """Per-sample sums of u·v, (B, S, R) -> (B, S) over R, or over S when
    over_rows. A contraction (no u·v temporary) when no graph is kept; under
    create_graph the product and sum, whose backward is two plain products
    (the contraction's backward is an outer product per row, much slower)."""
    if create_graph:
        return (u * v).sum(1 if over_rows else 2)
    return torch.einsum("isr,isr->ir" if over_rows else "isr,isr->is", u, v)


def _affine(m: nn.Module, b, create_graph: bool, *, y=None, xhat=None):
    """γ, β of a norm layer y = γ·x̂ + β: Σ b·x̂, from x̂ when given, else from
    the output as (Σ b·y − β·Σ b)/γ (γ without zeros): reductions only, no
    x̂ tensor (which would be two more full-size passes, and two more in the
    backward under create_graph)."""
    Bn = b.shape[0]
    w, bias = m.weight, m.bias
    if not create_graph:
        w = None if w is None else w.detach()
        bias = None if bias is None else bias.detach()
    channel_dim = type(m) is not nn.LayerNorm
    if channel_dim:  # (B, C, *spatial): per-channel affine, reduce the positions
        shape = (Bn, b.shape[1], -1)
    else:  # LayerNorm: affine over the trailing normalized_shape, reduce the rest
        shape = (Bn, -1, w.numel() if w is not None else bias.numel())
    b3 = b.reshape(shape)
    gb = b3.sum(1 if not channel_dim else 2)
    out = {}
    if w is not None:
        if xhat is not None:
            gw = _dots(b3, xhat.reshape(shape), not channel_dim, create_graph)
        else:
            gw = _dots(b3, y.reshape(shape), not channel_dim, create_graph)
            wf = w.reshape(1, -1)
            if bias is not None:
                gw = gw - bias.reshape(1, -1) * gb
            gw = gw / wf
        out["weight"] = _Dense(gw, m.weight.shape)
    if bias is not None:
        out["bias"] = _Dense(gb, m.bias.shape)
    return out


def _norm_known(m: nn.Module) -> bool:
    if type(m) in (nn.GroupNorm, nn.LayerNorm):
        return m.weight is not None or m.bias is not None
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return m.affine and not (m.track_running_stats and not m.training)
    return False


def _norm(m: nn.Module, a, y, b, create_graph: bool):
    """The affine's per-sample gradients from the output y when no γ is 0,
    else from x̂ = the input normalized again."""
    w = m.weight
    if w is None or bool((w != 0).all()):
        return _affine(m, b, create_graph, y=y)
    if type(m) is nn.GroupNorm:
        xhat = F.group_norm(a, m.num_groups, None, None, m.eps)
    elif type(m) is nn.LayerNorm:
        xhat = F.layer_norm(a, m.normalized_shape, None, None, m.eps)
    else:
        xhat = F.instance_norm(a, eps=m.eps)
    return _affine(m, b, create_graph, xhat=xhat)


def _fallback(m: nn.Module, a, b, create_graph: bool):
    """Per-sample gradients of the layer's own parameters by torch.func
    (first order: from detached parameters, so the results hold no graph)."""
    from torch.func import functional_call, vjp, vmap

    names = [n for n, p in m.named_parameters(recurse=False) if p.requires_grad]
    params = {n: getattr(m, n) if create_graph else getattr(m, n).detach() for n in names}

    def one(p, a_i, b_i):
        _, pull = vjp(lambda pp: functional_call(m, pp, (a_i.unsqueeze(0),)), p)
        return pull(b_i.unsqueeze(0))[0]

    per = vmap(one, in_dims=(None, 0, 0))(params, a, b)
    return {n: _Dense(per[n].reshape(a.shape[0], -1), params[n].shape) for n in names}


def _pieces(model, loss_fn, inputs, targets, create_graph):
    """{parameter: [per-sample pieces]} over every recorded call, and B."""
    calls, B = _backward_pass(model, loss_fn, inputs, targets, create_graph)
    pieces: dict[int, list] = {}
    for c, b in calls:
        m, a, y = c.module, c.input, c.output
        if not create_graph:  # first order: the pieces need no graph of their own
            a, y, b = a.detach(), y.detach(), b.detach()
        if type(m) is nn.Linear:
            got = _linear(m, a, b)
        elif _conv2d_known(m):
            got = _conv2d(m, a, b)
        elif _norm_known(m):
            got = _norm(m, a, y, b, create_graph)
        else:
            got = _fallback(m, a, b, create_graph)
        for name, piece in got.items():
            p = getattr(m, name)
            if p is not None and p.requires_grad:
                pieces.setdefault(id(p), []).append(piece)
    return pieces, B


def _chunks(g: torch.Tensor, chunk_size: int | None) -> list[tuple[int, int]]:
    """[start, stop) chunks of at most chunk_size samples over group-sorted ids:
    whole small groups packed together, a group larger than chunk_size split
    into chunks of its own (so each is one plain gradient). Unsorted ids or
    chunk_size None: one chunk."""
    B = g.shape[0]
    if chunk_size is None or B <= chunk_size or not bool((g[1:] >= g[:-1]).all()):
        return [(0, B)]
    _, counts = torch.unique_consecutive(g, return_counts=True)
    out, start, pos = [], 0, 0
    for c in counts.tolist():
        if pos + c - start > chunk_size and pos > start:  # flush the packed small groups
            out.append((start, pos))
            start = pos
        if c > chunk_size:
            out += [(i, min(pos + c, i + chunk_size)) for i in range(pos, pos + c, chunk_size)]
            start = pos + c
        pos += c
    if pos > start:
        out.append((start, pos))
    return out


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")


def _group_ids(groups, B: int, device, num_groups):
    if B == 0:
        raise ValueError("inputs must have a non-empty batch dimension")
    g = _checks.tensor("groups", groups)
    if g.dtype in (torch.bool,) or g.dtype.is_floating_point or g.is_complex():
        raise TypeError(f"groups must be an integer tensor, got {g.dtype}")
    if g.shape != (B,):
        raise ValueError(f"groups must have shape ({B},) (one group id per sample), got {tuple(g.shape)}")
    if g.device != device:
        raise ValueError(f"groups is on {g.device}, inputs on {device}")
    if (g < 0).any():
        raise ValueError("groups must be >= 0")
    G = int(g.max()) + 1
    if num_groups is not None:
        if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral) or num_groups < 1:
            raise ValueError(f"num_groups must be an int >= 1, got {num_groups!r}")
        if G > num_groups:
            raise ValueError(f"groups has id {G - 1}, not below num_groups={num_groups}")
        G = int(num_groups)
    return g, G


def grouped_gradients(model: nn.Module, loss_fn, inputs: torch.Tensor, targets, groups: torch.Tensor,
                      *, create_graph: bool = False, num_groups: int | None = None,
                      chunk_size: int | None = 64) -> list[list[torch.Tensor]]:
    """Gradient of each group's summed loss, for every parameter, from ONE pass.

    loss_fn(outputs, targets) returns per-sample losses (B,); groups (B,) gives
    each sample's group id. Returns, for each group 0..G−1 (G = max id + 1, or
    ``num_groups``), one tensor per parameter in ``model.parameters()`` order:
    ∇_θ Σ_{i in group} loss_i (zeros for an empty group and for parameters
    that do not require grad or are not used). With ``create_graph=True`` the
    results are differentiable (second order: w.r.t. the inputs, e.g. the
    synthetic images of DC, and the parameters). A gradient that is zero in
    exact arithmetic (ConvNet's conv biases: instance norm removes them) comes
    back as round-off, as from autograd: compare results with a tolerance
    scaled to the group's gradient, not per-parameter relative error.

    The samples are sorted by group (so each group is a contiguous slice) and
    walked in chunks of at most ``chunk_size`` samples (None: all at once):
    on CPUs one pass over a large batch runs slower than several that stay in
    cache. Chunking needs ``targets`` to be a tensor with the batch in front.
    """
    _checks.flag("create_graph", create_graph)
    _checks.tensor("inputs", inputs)
    _check_chunk_size(chunk_size)
    g, G = _group_ids(groups, inputs.shape[0] if inputs.dim() else 0, inputs.device, num_groups)
    B = g.shape[0]
    sliceable = isinstance(targets, torch.Tensor) and targets.shape[:1] == g.shape
    if not bool((g[1:] >= g[:-1]).all()) and sliceable:
        # samples are independent: sorting them by group makes every group a
        # contiguous slice, so its pieces are views, not gathered copies
        order = torch.argsort(g, stable=True)
        inputs, targets, g = inputs[order], targets[order], g[order]
    params = list(model.parameters())
    sums: list[list[torch.Tensor | None]] = [[None] * len(params) for _ in range(G)]

    def add(k, j, t):
        sums[k][j] = t if sums[k][j] is None else sums[k][j] + t

    for start, stop in _chunks(g, None if not sliceable else chunk_size):
        gc = g[start:stop]
        part = (inputs, targets) if (start, stop) == (0, B) else (inputs[start:stop], targets[start:stop])
        present = torch.unique(gc).tolist()
        if len(present) == 1:
            # one group: its gradient is the chunk's plain gradient (what a
            # per-group loop computes), no per-layer decomposition needed
            _check_model(model)
            live = [(j, p) for j, p in enumerate(params) if p.requires_grad]
            if not live:
                continue
            losses = _checked_losses(loss_fn, model(part[0]), part[1], stop - start)
            grads = torch.autograd.grad(losses.sum(), [p for _, p in live], create_graph=create_graph,
                                        allow_unused=True)
            for (j, _), gr in zip(live, grads):
                if gr is not None:
                    add(present[0], j, gr)
            continue
        pieces, _ = _pieces(model, loss_fn, *part, create_graph)
        if bool((gc[1:] >= gc[:-1]).all()):
            first = torch.searchsorted(gc, torch.tensor(present, device=gc.device)).tolist()
            counts = torch.bincount(gc - gc.min()).tolist()
            members = {k: slice(f, f + counts[k - present[0]]) for k, f in zip(present, first)}
        else:
            members = {k: torch.nonzero(gc == k).flatten() for k in present}
        for j, p in enumerate(params):
            for piece in pieces.get(id(p), ()):
                for k, t in piece.group_sums(members).items():
                    add(k, j, t)
    return [[torch.zeros_like(p) if sums[k][j] is None else sums[k][j].to(p.dtype)
             for j, p in enumerate(params)] for k in range(G)]


def _combined(ps: list):
    """One piece per parameter: several calls' pieces summed per sample."""
    if len(ps) == 1:
        return ps[0]
    G = ps[0].materialize()
    for extra in ps[1:]:
        G = G + extra.materialize()
    return _Dense(G, ps[0].shape)


def per_sample_grad_norms(model: nn.Module, loss_fn, inputs: torch.Tensor, targets, *,
                          chunk_size: int | None = 32) -> torch.Tensor:
    """‖∇_θ loss_i‖ over all parameters, (B,), without forming the per-sample
    gradients where a factored form is cheaper (kd-math.md §5; for a Conv2d,
    the Gram matrices of its input and output positions).

    The samples are walked in chunks of at most ``chunk_size`` (None: all at
    once; chunking needs ``targets`` to be a tensor with the batch in front):
    each chunk's activations stay in cache and its buffers are reused by the
    allocator, where one pass over a large batch keeps touching fresh memory.
    """
    _checks.tensor("inputs", inputs)
    _check_chunk_size(chunk_size)
    if inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must have a non-empty batch dimension, got {tuple(inputs.shape)}")
    B = inputs.shape[0]
    sliceable = isinstance(targets, torch.Tensor) and targets.shape[:1] == (B,)
    step = B if chunk_size is None or not sliceable else chunk_size
    out = torch.empty(B, dtype=torch.float64 if inputs.dtype == torch.float64 else torch.float32,
                      device=inputs.device)
    for start in range(0, B, step):
        part = (inputs, targets) if step >= B else (inputs[start:start + step], targets[start:start + step])
        pieces, n = _pieces(model, loss_fn, *part, False)
        total = torch.zeros(n, dtype=out.dtype, device=out.device)
        for ps in pieces.values():
            total += _combined(ps).sqnorms().to(total.dtype)
        out[start:start + n] = total.sqrt()
    return out


def per_sample_grad_gram(model: nn.Module, loss_fn, inputs: torch.Tensor, targets) -> torch.Tensor:
    """Gram matrix ⟨∇_θ loss_i, ∇_θ loss_j⟩ over all parameters, (B, B)."""
    pieces, B = _pieces(model, loss_fn, inputs, targets, False)
    total = torch.zeros(B, B, dtype=torch.float64 if inputs.dtype == torch.float64 else torch.float32,
                        device=inputs.device)
    for ps in pieces.values():
        total = total + _combined(ps).gram().to(total.dtype)
    return total
