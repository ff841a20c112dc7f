"""KDTrainer with tensor-parallel (vocabulary-sharded) LM heads.

A head parallelized with ``parallelize_module(model, mesh, {"lm_head":
ColwiseParallel(...)})`` holds a DTensor weight ``Shard(0)`` on a 1-D mesh:
each rank owns a contiguous block of vocabulary rows (DTensor's torch.chunk
split: ceil(V / n) rows per rank, the last ranks fewer). That is the layout
``fused_linear_kd_loss(..., process_group=...)`` takes, so with
``fused_head=True`` the loss runs on the local rows and the mesh's group and
the head is never gathered. Everything here exists to keep that exact:

- the hidden states the head receives are replicated over the mesh (every TP
  rank runs the same batch); a DTensor input is redistributed to Replicate and
  taken local, so the gradient the loss returns (already summed over the
  shards, once) flows back untouched;
- the local rows are ``weight.to_local()``: its backward wraps the shard's
  gradient as a DTensor of the parameter's own placement, so ``.grad`` is a
  Shard(0) DTensor like the parameter;
- a whole (replicated) teacher head is cut to the student's rows; a teacher
  sharded the same way passes its own rows;
- every layout the loss cannot take exactly (a head sharded along another
  dimension or on a 2-D mesh, Partial, a sharded teacher under a whole student,
  soft labels, several teachers, vocabularies of different sizes, on-policy
  sampling) is refused at KDTrainer construction, by ``check_heads``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = Replicate = Shard = None

__all__ = ["VocabShard", "check_heads", "check_unfused_logits", "head_shard", "local_hidden",
           "empty_input", "local_tensor", "check_same_batch", "shard_teacher", "probe_logits",
           "any_rank"]


def is_dtensor(x) -> bool:
    return DTensor is not None and isinstance(x, DTensor)


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows of a vocabulary-sharded head: ``weight``/``bias`` are the
    local tensors (autograd reaches the DTensor parameters through them),
    ``group`` the mesh's process group, rows [offset, offset + width) of ``vocab``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    group: object
    offset: int
    vocab: int


def chunk_widths(vocab: int, n: int) -> list[int]:
    """Rows per rank of DTensor's Shard(0) split (torch.chunk: ceil(V/n) each, the rest last)."""
    c = -(-vocab // n)
    return [max(0, min(c, vocab - i * c)) for i in range(n)]


def _layout(weight, where: str):
    """(mesh, offset, width) of a vocabulary-sharded DTensor head weight; None for a
    plain tensor. Raises ValueError, naming the layout, for any other DTensor."""
    if not is_dtensor(weight):
        return None
    mesh, placements = weight.device_mesh, tuple(weight.placements)
    way_out = ("shard the head along the vocabulary on a 1-D tensor-parallel mesh "
               "(parallelize_module(model, tp_mesh, {'lm_head': ColwiseParallel()})), or use "
               "fused_head=False")
    if mesh.ndim != 1:
        raise ValueError(f"fused_head=True: {where}'s LM head weight is a DTensor on a "
                         f"{mesh.ndim}-D mesh with placements {placements}: only a head sharded "
                         f"on a 1-D mesh is supported; {way_out}")
    (p,) = placements
    if type(p) is not Shard or p.dim != 0:
        raise ValueError(f"fused_head=True: {where}'s LM head weight is a DTensor with placements "
                         f"{placements} (not sharded along the vocabulary, Shard(0): "
                         "RowwiseParallel shards the hidden dimension, Replicate copies it); "
                         f"{way_out}")
    n = mesh.size()
    group = mesh.get_group()
    coord = mesh.get_local_rank()
    if dist.get_rank(group) != coord:
        raise ValueError(f"fused_head=True: {where}'s tensor-parallel mesh orders its ranks "
                         "otherwise than its process group; use a mesh from init_device_mesh")
    vocab = weight.shape[0]
    widths = chunk_widths(vocab, n)
    if weight.to_local().shape[0] != widths[coord]:
        raise ValueError(f"fused_head=True: {where}'s LM head shard has "
                         f"{weight.to_local().shape[0]} rows, not DTensor's even split "
                         f"{widths} of {vocab} rows over {n} ranks")
    if min(widths) == 0:
        raise ValueError(f"fused_head=True: {where}'s vocabulary of {vocab} rows over {n} "
                         f"tensor-parallel ranks leaves a rank no rows ({widths}); use fewer "
                         "ranks or fused_head=False")
    return mesh, sum(widths[:coord]), widths[coord]


def head_shard(module, where: str) -> VocabShard | None:
    """The local rows of a vocabulary-sharded head module (None: not a DTensor head).
    Called inside the head's forward, where an engine has gathered what it shards."""
    weight = module.weight
    layout = _layout(weight, where)
    if layout is None:
        return None
    mesh, offset, width = layout
    bias = getattr(module, "bias", None)
    if bias is not None:
        if not is_dtensor(bias) or tuple(bias.placements) != tuple(weight.placements) \
                or bias.device_mesh != mesh:
            raise ValueError(f"fused_head=True: {where}'s LM head bias is not sharded like its "
                             f"weight (Shard(0) on the same mesh), got "
                             f"{tuple(bias.placements) if is_dtensor(bias) else 'a whole tensor'}")
        bias = bias.to_local()
    return VocabShard(weight.to_local(), bias, mesh.get_group(), offset, weight.shape[0])


def local_hidden(h):
    """The head's input as one plain tensor, the same on every TP rank: a DTensor is
    redistributed to Replicate first (its backward then returns the gradient the
    loss computed, already summed over the vocabulary shards, without reducing it
    again). A plain tensor is taken as it is (replicated by the caller's plan)."""
    if not is_dtensor(h):
        return h
    if any(not isinstance(p, Replicate) for p in h.placements):
        h = h.redistribute(h.device_mesh, [Replicate()] * h.device_mesh.ndim)
    return h.to_local()


def local_tensor(x):
    """A DTensor's local part (autograd flows through), any other tensor as it is:
    what KDTrainer adds of the model's (empty) logits to the loss must stay a plain
    tensor, or the loss would become a DTensor (use_local_output=False)."""
    return x.to_local() if is_dtensor(x) else x


def empty_input(h):
    """What a sharded head is handed instead of its input: no rows, as (0, H).
    DTensor's sharding propagation cannot view an empty (B, 0, V) output back to
    3-D (it divides by the empty dimension), a 2-D empty one it can."""
    return h.reshape(-1, h.shape[-1])[:0]


def check_same_batch(head, *batch) -> None:
    """Every rank of a sharded head's group must hold the same batch (the vocabulary
    is sharded, not the tokens): an exact integer fingerprint of ``batch`` (input
    ids, labels) is gathered over the group, and differing ones raise on every rank
    alike. This is what HF's Trainer gets wrong where it does not know the model is
    tensor-parallel: it gives each rank its own batches (DDP data sharding), which
    would otherwise be a silently wrong loss."""
    if head.process_group is None:
        return
    parts = []
    for x in batch:
        x = x.reshape(-1).to(torch.int64)
        w = torch.arange(1, x.numel() + 1, dtype=torch.int64, device=x.device)
        parts += [x.numel(), int((x * w).sum()), int((x * w * w).sum())]
    mine = torch.tensor(parts, dtype=torch.int64, device=head.weight.device)
    n = dist.get_world_size(head.process_group)
    every = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(every, mine, group=head.process_group)
    if any(not torch.equal(e, every[0]) for e in every):
        raise ValueError("a tensor-parallel LM head: the ranks of its mesh hold different "
                         "batches, but every tensor-parallel rank must see the same batch (the "
                         "vocabulary is sharded, not the tokens); under HF's Trainer this "
                         "needs a TP-aware accelerate (parallelism_config with tp_size; not "
                         "on CPU), in your own loop give each TP rank the same batch")


def shard_teacher(head, t_args: tuple, t_kw: dict):
    """The teacher arguments of ``fused_linear_kd_loss`` for a student head sharded
    over ``head.process_group``: the teacher's own local rows if its head is sharded
    the same way (checked at construction), else the rows [offset, offset + width)
    of its whole head; and vocab_mismatch='error' (the vocabularies are equal, checked
    at construction; the sharded loss takes no other). A student that is not sharded:
    the arguments as they are."""
    if head.process_group is None:
        return t_args, t_kw
    hidden, weight = t_args
    bias = t_kw.get("teacher_bias")
    width = head.weight.shape[0]
    rows = slice(head.vocab_offset, head.vocab_offset + width)
    if is_dtensor(weight):
        weight = weight.to_local()
        bias = bias.to_local() if is_dtensor(bias) else bias
    else:
        weight = weight[rows]
        bias = None if bias is None else bias[rows]
    return (hidden, weight), dict(t_kw, teacher_bias=bias, vocab_mismatch="error")


def probe_logits(want, y, head):
    """(the model's logits, head(hidden)) made comparable for the construction probe:
    with a sharded head ``y`` is this rank's columns, so ``want`` is cut to them
    (a DTensor is gathered with full_tensor(); logits already local, as
    ColwiseParallel(output_layouts=Shard(-1)) leaves them, are compared as they are)."""
    if is_dtensor(want):
        want = want.full_tensor()
    want = want.float()
    if head.process_group is not None and want.shape[-1] != y.shape[-1]:
        want = want[..., head.vocab_offset:head.vocab_offset + y.shape[-1]]
    return want, y


def any_rank(flag: bool, group, device=None) -> bool:
    """``flag`` or'ed over the ranks of ``group`` (None: this process alone), so that
    every rank raises together instead of the others hanging in a collective."""
    if group is None:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _head_of(model):
    return model.get_output_embeddings()


def check_heads(student, teachers, args, soft_labels) -> None:
    """Refuse, at construction, what the vocabulary-parallel path cannot compute
    exactly. Nothing to check when no head is a DTensor."""
    s_weight = _head_of(student).weight
    t_weights = [_head_of(t).weight for t in teachers]
    if not is_dtensor(s_weight) and not any(is_dtensor(w) for w in t_weights):
        return
    if not args.fused_head:
        return  # the models' own logits: checked by check_unfused_logits
    s_layout = _layout(s_weight, "the student")
    if s_layout is not None:  # the bias too
        head_shard(_head_of(student), "the student")
    for i, w in enumerate(t_weights):
        t_layout = _layout(w, f"teacher {i}")
        if t_layout is None:
            continue
        if s_layout is None:
            raise ValueError(f"fused_head=True: teacher {i}'s LM head is tensor-parallel "
                             f"(DTensor {tuple(w.placements)}) but the student's is whole: the "
                             "student's gradient would cover only its rows; shard the student's "
                             "head the same way, give an unsharded teacher, or use "
                             "fused_head=False")
        head_shard(_head_of(teachers[i]), f"teacher {i}")
        same = dist.get_process_group_ranks(t_layout[0].get_group()) == \
            dist.get_process_group_ranks(s_layout[0].get_group())
        if not same or t_layout[1:] != s_layout[1:]:
            raise ValueError(f"fused_head=True: teacher {i}'s LM head is sharded over other ranks "
                             "or rows than the student's; shard both on one tensor-parallel mesh")
    if s_layout is None:
        return
    what = (f"the student's LM head is tensor-parallel (DTensor Shard(0) over "
            f"{s_layout[0].size()} ranks)")
    if soft_labels is not None:
        raise ValueError(f"fused_head=True: {what}, and soft labels (a sparse teacher) are not "
                         "supported by the vocabulary-parallel loss; use fused_head=False with "
                         "ColwiseParallel(output_layouts=Replicate()), or an unsharded head")
    if len(teachers) > 1:
        raise ValueError(f"fused_head=True: {what}, and a mixture of {len(teachers)} teachers is "
                         "not supported by the vocabulary-parallel loss; distil one teacher, or "
                         "use an unsharded head")
    vocab = s_weight.shape[0]
    for i, w in enumerate(t_weights):
        if w.shape[0] != vocab:
            raise ValueError(f"fused_head=True: {what}, and teacher {i}'s vocabulary "
                             f"({w.shape[0]}) differs from the student's ({vocab}): "
                             "vocab_mismatch is not supported by the vocabulary-parallel loss; "
                             "pad both heads to one vocabulary, or use an unsharded head")
    if args.lmbda > 0:
        raise ValueError(f"lmbda={args.lmbda}: {what}; on-policy generation would have to "
                         "sample the same completions on every tensor-parallel rank, which is "
                         "not supported; use lmbda=0")


def check_unfused_logits(model, name: str) -> None:
    """fused_head=False with a DTensor head: the model's logits must come out as one
    plain tensor over the whole vocabulary (ColwiseParallel(output_layouts=Replicate())),
    or the loss would read a shard as the distribution."""
    head = _head_of(model)
    if not is_dtensor(head.weight):
        return
    vocab = head.weight.shape[0]
    ids = torch.arange(2, device=head.weight.device).unsqueeze(0)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        model.train(was)
    if is_dtensor(logits) or logits.shape[-1] != vocab:
        kind = (f"DTensor {tuple(logits.placements)}" if is_dtensor(logits)
                else f"{logits.shape[-1]} of the {vocab} columns")
        raise ValueError(f"fused_head=False: {name}'s tensor-parallel head gives logits as "
                         f"{kind}, not one tensor over the whole vocabulary; use "
                         "ColwiseParallel(output_layouts=Replicate()) (use_local_output=True), "
                         "or fused_head=True")

