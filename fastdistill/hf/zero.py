"""DeepSpeed ZeRO-3 for ``KDTrainer``: the few places where an engine that
partitions every parameter changes what the trainer may read.

Under ZeRO-3 a parameter outside its module's forward is an empty placeholder
(``p.numel() == 0``, its true shape in ``p.ds_shape``). The student's fused
loss already runs inside its LM head's forward (``_in_head_forward``), where
the engine has gathered the weight; its gradient flows into that gathered
parameter and the engine's own hook reduces it into the partitions (once: a
tied embedding and head are one parameter, one gradient accumulator). What is
left is here: whole shapes for the construction checks, the teacher (shard or
replicate), the teacher's head gathered while the loss reads it, and the
construction probe of a student that ``deepspeed.zero.Init`` partitioned
before any engine exists. Nothing here imports deepspeed unless ZeRO-3 is in
use.
"""
from __future__ import annotations

import contextlib
import copy
import os

import torch

__all__ = ["check_state", "check_student", "deepspeed_config", "full_shape", "init_cpu_state",
           "is_partitioned", "is_zero3", "place_teacher", "teacher_heads_whole"]


def deepspeed_config(args) -> dict | None:
    """The DeepSpeed config ``args`` (a TrainingArguments) trains under: HF's
    ``deepspeed=`` argument, or the one ``accelerate launch`` names in its config
    file (then HF leaves ``args.deepspeed`` empty and keeps accelerate's
    ``DeepSpeedPlugin`` in ``args.deepspeed_plugin``); None without DeepSpeed."""
    hf = getattr(args, "hf_deepspeed_config", None)
    if getattr(args, "deepspeed", None) and hf is not None:
        return hf.config
    plugin = getattr(args, "deepspeed_plugin", None)
    return None if plugin is None else plugin.deepspeed_config


def is_zero3(args) -> bool:
    """Whether ``args`` (a TrainingArguments) trains under a DeepSpeed ZeRO-3 config."""
    cfg = deepspeed_config(args)
    return cfg is not None and cfg.get("zero_optimization", {}).get("stage") == 3


def full_shape(weight: torch.Tensor) -> torch.Size:
    """A parameter's whole shape, also when it is a ZeRO-3 placeholder."""
    return getattr(weight, "ds_shape", None) or weight.shape


def is_partitioned(module: torch.nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ZeRO-3 partition (``zero.Init``
    or an engine) that is not gathered now."""
    for p in module.parameters():
        if hasattr(p, "ds_id") and p.numel() != p.ds_numel:
            return True
    return False


def _zero_section(args, model) -> dict:
    """The student's ``zero_optimization`` section for an inference-only
    teacher: no optimizer state to place, and the ``auto`` sizes filled from
    the teacher's hidden size the way HF fills the student's."""
    zo = copy.deepcopy(deepspeed_config(args).get("zero_optimization", {}))
    zo.pop("offload_optimizer", None)
    zo["stage"] = 3
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    sizes = {"reduce_bucket_size": lambda h: h * h,
             "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
             "stage3_param_persistence_threshold": lambda h: 10 * h}
    for key, size in sizes.items():
        if zo.get(key) == "auto":
            if hidden is None:
                del zo[key]  # DeepSpeed's default
            else:
                zo[key] = size(int(hidden))
    return zo


def _shard_teacher(teacher, args):
    """The teacher as a ZeRO-3 inference engine (``deepspeed.initialize`` with
    no optimizer): each rank keeps 1/world of its parameters, its forward
    gathers them layer by layer and frees them again. The teacher keeps its own
    dtype (no fp16/bf16 section: DeepSpeed would cast it)."""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": _zero_section(args, teacher),
              "bf16": {"enabled": next(teacher.parameters()).dtype == torch.bfloat16},
              "fp16": {"enabled": False}}
    if next(teacher.parameters()).dtype == torch.float16:
        raise ValueError("teacher_sharding='shard' under ZeRO-3: an fp16 teacher would be run by "
                         "DeepSpeed's fp16 engine (loss scaling, casts); load it in bfloat16 or "
                         "float32, or use teacher_sharding='replicate'")
    if not is_partitioned(teacher):
        teacher.to(args.device)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


def place_teacher(teacher, args):
    """The teacher as the trainer runs it: under ZeRO-3 with
    ``teacher_sharding="shard"`` partitioned by its own inference engine (its
    forward is then collective: every rank must run the same teacher
    forwards, which the trainer does); otherwise whole on this rank's device.
    A teacher that ``zero.Init`` already partitioned cannot be replicated."""
    if is_zero3(args) and args.teacher_sharding == "shard":
        return _shard_teacher(teacher, args)
    if is_partitioned(teacher):
        why = ("args has no ZeRO-3 DeepSpeed config" if not is_zero3(args)
               else "teacher_sharding='replicate'")
        raise ValueError(f"the teacher's parameters are ZeRO-3 partitions (built under "
                         f"deepspeed.zero.Init, e.g. from_pretrained after a ZeRO-3 KDConfig) but "
                         f"{why} wants it whole on every rank: use teacher_sharding='shard' with "
                         "a ZeRO-3 config, or load the teacher before creating the KDConfig")
    return teacher.to(args.device)


def check_student(model, args) -> bool:
    """Whether the student's construction probe must wait for the engine: a
    student partitioned by ``zero.Init`` has no gathering hooks until
    ``deepspeed.initialize`` (in ``train``/``evaluate``); without a ZeRO-3
    config nothing would ever gather it."""
    if not is_partitioned(model):
        return False
    if not is_zero3(args):
        raise ValueError("the student's parameters are ZeRO-3 partitions (built under "
                         "deepspeed.zero.Init) but args has no ZeRO-3 DeepSpeed config, so no "
                         "engine would gather them: pass KDConfig(deepspeed=<a ZeRO-3 config>, "
                         "e.g. examples/zero3.json) or build the student outside zero.Init")
    return True


def teacher_heads_whole(teachers):
    """A context in which the teachers' LM head weights are whole while the
    fused loss reads them (``GatheredParameters``: one all-gather of each
    distinct head, collective; a no-op for teachers that are not
    partitioned). The loss needs them in its forward only: for mean/sum the
    gradients are computed there, and the teacher has none."""
    weights = []
    for t in teachers:
        w = _unwrap_head_weight(t)
        if hasattr(w, "ds_id"):
            weights.append(w)
    if not weights:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(weights)


def _unwrap_head_weight(model):
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model.get_output_embeddings().weight


def check_state(args, accelerator) -> None:
    """Under DeepSpeed with several ranks, accelerate must see them. On a
    CPU-only machine accelerate 1.16 finds no device backend and leaves
    ``num_processes`` at 1 (every rank then reads the whole dataset and
    gathers fail): refuse that at construction."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if deepspeed_config(args) is not None and world > 1 and accelerator.num_processes != world:
        raise ValueError(f"DeepSpeed: WORLD_SIZE={world} but accelerate sees "
                         f"{accelerator.num_processes} process(es) (no distributed backend: a "
                         "CPU-only machine?). Call fastdistill.hf.zero.init_cpu_state() before "
                         "creating the KDConfig and pass "
                         "accelerator_config={'use_configured_state': True}")


def init_cpu_state(backend: str = "gloo"):
    """Set up accelerate's process state for DeepSpeed on CPU (``DS_ACCELERATOR=cpu``)
    with ``backend``: HF's TrainingArguments passes no backend under DeepSpeed, and
    without a device accelerate picks none. Use with
    ``KDConfig(..., accelerator_config={"use_configured_state": True})``."""
    from accelerate import PartialState

    was = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        return PartialState(backend=backend)
    finally:
        if was is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = was
