"""KDTrainer under FSDP1 (``FullyShardedDataParallel``) and FSDP2 (``fully_shard``).

The fused loss runs inside the student's LM head forward, where an FSDP unit
has gathered its weight; these helpers find that forward, shard the teachers the way the student is sharded
(``KDConfig.teacher_sharding="shard"``) and gather a sharded teacher's head
while the fused loss reads it. Every function that runs a collective is called
by every rank at the same point of the step (see KDTrainer)."""
from __future__ import annotations

import contextlib

__all__ = ["engine_of", "head_module", "head_rows", "shard_teacher", "reshard_all",
           "whole_heads", "generation_context", "decoder_layer_classes"]


def _fsdp1():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return ()
    return FullyShardedDataParallel


def _fsdp2():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return ()
    return FSDPModule


def engine_of(model) -> str | None:
    """'fsdp1' or 'fsdp2' when ``model`` (or a module inside it) is already sharded
    by that engine, else None (a whole model: one process, DDP, not prepared yet)."""
    f1, f2 = _fsdp1(), _fsdp2()
    for m in model.modules():
        if f1 and isinstance(m, f1):
            return "fsdp1"
        if f2 and isinstance(m, f2):
            return "fsdp2"
    return None


def head_module(head):
    """The module whose own forward computes the logits. An FSDP1 unit gathers its
    weight in ``FullyShardedDataParallel.forward`` and only then calls the module
    it wraps: a forward pre-hook on the wrapper would see the flat shard (shape
    (0,) or (n,)), one on the wrapped module sees the whole (V, H) weight, with
    use_orig_params=True (a Parameter) or False (a view of the unit's gathered
    FlatParameter, through which the loss's gradient reaches it). FSDP2 and DDP
    do not wrap: the head itself."""
    f1 = _fsdp1()
    while f1 and isinstance(head, f1):
        head = head.module
    return head


def head_rows(model) -> int:
    """The vocabulary (rows of the LM head) of a causal LM, whole or sharded: an
    FSDP1 shard outside its forward is a flat 1-D view, so its config's
    vocab_size is used there; a DTensor (FSDP2) reports the global shape, a
    ZeRO-3 partition its ``ds_shape``."""
    from .zero import full_shape  # a ZeRO-3 placeholder knows its whole shape

    w = model.get_output_embeddings().weight
    shape = full_shape(w)
    if len(shape) == 2 and shape.numel() > 0:
        return shape[0]
    return int(model.config.vocab_size)


def _fsdp1_units(model):
    f1 = _fsdp1()
    return [m for m in model.modules() if f1 and isinstance(m, f1)]


def decoder_layer_classes(model) -> tuple:
    """The classes of the model's repeated blocks: those its ``_no_split_modules``
    names (the HF convention accelerate's auto-wrap reads), found in the model."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def shard_teacher(teacher, engine: str, device=None, plugin=None):
    """``teacher`` sharded like the student, for inference only: FSDP2 -
    ``fully_shard`` on every decoder layer and on the root, all resharded after
    forward (only one layer is whole at a time); FSDP1 - one
    ``FullyShardedDataParallel`` unit per decoder layer and the root,
    ``use_orig_params=True``, full sharding (plugin's strategy where given). The
    teacher is in eval mode with requires_grad False and no optimizer. Its
    forward becomes collective: every rank must run the same teacher forwards.
    A teacher already sharded is returned as it is."""
    if engine_of(teacher) is not None:
        return teacher
    teacher.eval()
    teacher.requires_grad_(False)
    layers = decoder_layer_classes(teacher)
    if engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        if device is not None:
            teacher.to(device)
        for m in list(teacher.modules()):
            if isinstance(m, layers):
                fully_shard(m, reshard_after_forward=True)
        fully_shard(teacher, reshard_after_forward=True)
        return teacher
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        import torch

        if device is not None and torch.device(device).type == "cpu":
            device = torch.device("cpu")  # FSDP1 takes "cpu", not the "cpu:0" HF may name
        strategy = getattr(plugin, "sharding_strategy", None) or ShardingStrategy.FULL_SHARD
        if strategy in (ShardingStrategy.NO_SHARD,):
            strategy = ShardingStrategy.FULL_SHARD
        return FullyShardedDataParallel(
            teacher, auto_wrap_policy=ModuleWrapPolicy(set(layers)) if layers else None,
            sharding_strategy=strategy, use_orig_params=True, device_id=device)
    raise ValueError(f"engine must be 'fsdp1' or 'fsdp2', got {engine!r}")


def reshard_all(model) -> None:
    """Reshard every FSDP2 unit of ``model`` that a forward left unsharded. FSDP2
    keeps the root unit (``reshard_after_forward`` left at its default) gathered
    after a forward, with the unsharded tensors registered as the module's
    parameters: after KDTrainer's head probe (a forward at construction) an
    optimizer built from ``model.parameters()`` would hold the gathered
    embedding/head instead of its DTensor shard (it would never step it, its
    shard's gradient would pile up, and the whole V×H copy would stay alive).
    Not collective; a no-op outside FSDP2."""
    f2 = _fsdp2()
    if not f2:
        return
    for m in model.modules():
        if isinstance(m, f2):
            m.reshard()


def _owner(model, module, cls):
    """The innermost instance of ``cls`` in ``model`` (itself included) that holds
    ``module``: the FSDP unit whose parameters include the head's."""
    best, depth = None, -1
    names = {id(m): n for n, m in model.named_modules()}
    target = names.get(id(module))
    if target is None:
        return None
    for name, m in model.named_modules():
        if isinstance(m, cls) and (name == "" or target == name or target.startswith(name + ".")):
            d = 0 if name == "" else name.count(".") + 1
            if d > depth:
                best, depth = m, d
    return best


@contextlib.contextmanager
def whole_heads(models):
    """Within this context the LM head weight of each sharded model in ``models``
    is whole (its FSDP unit unsharded), so the fused loss reads (V, H) and never
    a shard; resharded on exit. Collective: every rank enters it together (the
    fused loss runs inside the student's forward, which every rank runs). The
    loss keeps no reference to the weight past the context (its gradients are
    computed in forward; a teacher has none)."""
    with contextlib.ExitStack() as stack:
        for model in models:
            engine = engine_of(model)
            if engine is None:
                continue
            head = head_module(model.get_output_embeddings())
            if engine == "fsdp2":
                unit = _owner(model, head, _fsdp2())
                unit.unshard()
                stack.callback(unit.reshard)
            else:
                f1 = _fsdp1()
                unit = _owner(model, head, f1)
                stack.enter_context(f1.summon_full_params(unit, recurse=False, writeback=False))
        yield


@contextlib.contextmanager
def generation_context(model):
    """Around ``generate`` of the module inside ``model``: FSDP1 gathers a unit's
    parameters only in the wrapper's forward, which generate (a method of the
    wrapped module) never calls, so the root unit's parameters (embedding, head)
    are gathered for the whole generation; the decoder layers' own units gather
    theirs in their forwards. FSDP2's forward hooks already gather: nothing."""
    f1 = _fsdp1()
    if f1 and isinstance(model, f1):
        with f1.summon_full_params(model, recurse=False, writeback=False):
            yield
    else:
        yield
