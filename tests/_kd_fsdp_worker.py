"""KDTrainer.train() and evaluate() under FSDP1/FSDP2 on 2 gloo ranks (CPU)
against one process on the same global batch; tests/test_hf_fsdp.py runs it
twice, and compares what rank 0 writes for every case:

    python tests/_kd_fsdp_worker.py OUT.pt                       # the one-process references
    python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        tests/_kd_fsdp_worker.py OUT.pt                          # every sharded case

One launch runs every case in a loop (the CI budget), on the tiny Llamas of
_kd_ranks_worker.py. Per case: the logged losses of 3 plain-SGD steps, the
final weights (gathered whole), evaluate()'s metrics, and on each rank the
teacher's local parameter count.

The test-only switch to HF's own FSDP path on CPU (``FSDPOnCPU``): accelerate
1.16 under ``torchrun`` with ``use_cpu=True`` builds a MULTI_CPU state and sets
``DistributedType.FSDP`` only for accelerator device types (AcceleratorState
.__init__), so ``KDConfig(fsdp=..., fsdp_config=...)`` silently trains under
DDP. ``FSDPOnCPU.create_accelerator_and_postprocess`` lets HF create the
accelerator, then does what AcceleratorState does on a GPU: sets the shared
state's ``distributed_type`` to FSDP (AcceleratorState's and PartialState's,
which AcceleratorState mirrors) and its ``fsdp_plugin`` to the plugin HF builds
from ``args.fsdp_plugin_args``, names the device ``cpu`` (MULTI_CPU names it
``cpu:0``, which FSDP1's ``device_id`` check finds inconsistent with
``torch.cpu.current_device()``), and sets the Trainer's ``is_fsdp_enabled``.
From there HF and accelerate run their FSDP code unchanged: no optimizer
before ``prepare``, ``fsdp2_prepare_model`` (fully_shard per the plugin's
auto-wrap policy) or ``FullyShardedDataParallel(...)``, FSDP gradient clipping
and state dicts. FSDP1 needs ``sync_module_states=False`` on CPU (it refuses a
broadcast from a CPU device). The switch is for tests only: on GPUs accelerate
selects FSDP itself.
"""
import functools
import os
import sys

import torch
import torch.distributed as dist
from _kd_ranks_worker import examples, llama, leave  # the same tiny Llamas (this script's folder)

from fastdistill.hf import KDConfig, KDTrainer


class FSDPOnCPU(KDTrainer):
    """KDTrainer on HF's FSDP path on CPU (test-only; see the module docstring)."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is None or not dist.is_initialized():
            return
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        assert state.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP)
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        if state.device.type == "cpu":  # FSDP1 compares its device_id with "cpu", not "cpu:0"
            PartialState._shared_state["device"] = state.device = torch.device("cpu")
        assert AcceleratorState().is_fsdp2 == (state.fsdp_plugin.fsdp_version == 2)
        self.is_fsdp_enabled = True


# name: (engine, layout, fused, accum, lmbda, teacher_sharding)
#   engine: "fsdp2" / "fsdp1" (HF's path, FSDPOnCPU); layout: "root" (HF's auto-wrap of
#   the decoder layers, tied; FSDP1: the head in the root unit; FSDP2: accelerate 1.16
#   puts the embedding, final norm and head in one unit of their own and leaves the root
#   none), "rootunit" (fully_shard here on the layers and the root: the head in the root
#   unit, tied) or "head" (sharded here, the head its own unit: untied); HF's FSDP path
#   takes a student that comes sharded as it is
CASES = {
    "fsdp2-root-fused": ("fsdp2", "root", True, 1, 0.0, "shard"),
    "fsdp2-root-unfused": ("fsdp2", "root", False, 1, 0.0, "shard"),
    "fsdp2-root-fused-accum2": ("fsdp2", "root", True, 2, 0.0, "shard"),
    "fsdp2-root-fused-replicate": ("fsdp2", "root", True, 1, 0.0, "replicate"),
    "fsdp2-root-fused-onpolicy": ("fsdp2", "root", True, 1, 1.0, "shard"),
    "fsdp2-rootunit-fused": ("fsdp2", "rootunit", True, 1, 0.0, "shard"),
    "fsdp2-head-fused": ("fsdp2", "head", True, 1, 0.0, "shard"),
    "fsdp2-head-unfused": ("fsdp2", "head", False, 1, 0.0, "shard"),
    "fsdp1-root-fused": ("fsdp1", "root", True, 1, 0.0, "shard"),
    "fsdp1-root-unfused": ("fsdp1", "root", False, 2, 0.0, "shard"),
    "fsdp1-root-fused-replicate": ("fsdp1", "root", True, 1, 0.0, "replicate"),
    "fsdp1-root-fused-onpolicy": ("fsdp1", "root", True, 1, 1.0, "shard"),
    "fsdp1-head-fused": ("fsdp1", "head", True, 1, 0.0, "shard"),
    "fsdp1-head-unfused": ("fsdp1", "head", False, 1, 0.0, "shard"),
    "fsdp1-root-fused-flat": ("fsdp1", "root", True, 1, 0.0, "shard"),
    "fsdp1-head-fused-flat": ("fsdp1", "head", True, 1, 0.0, "shard"),
}
FLAT = {"fsdp1-root-fused-flat", "fsdp1-head-fused-flat"}  # use_orig_params=False


def reference_key(case):
    """The one-process run a case is compared with: what changes the numbers."""
    _, layout, fused, accum, lmbda, _ = CASES[case]
    return f"tie{int(layout != 'head')}-fused{int(fused)}-accum{accum}-lmbda{lmbda}"


def config(out_dir, world, fused, accum, lmbda, engine=None, sharding="shard", wrap=True,
           orig_params=True):
    """wrap: HF wraps the student (its decoder layers, then the root); else the
    student comes sharded and HF's FSDP path takes it as it is."""
    extra = {}
    if engine is not None:
        extra["fsdp"] = "full_shard auto_wrap" if wrap else "full_shard"
        extra["fsdp_config"] = {"fsdp_version": 2 if engine == "fsdp2" else 1}
        if wrap:
            extra["fsdp_config"]["transformer_layer_cls_to_wrap"] = ["LlamaDecoderLayer"]
        elif engine == "fsdp1":  # HF reads the columns off FullyShardedDataParallel.forward's
            extra["remove_unused_columns"] = False  # signature (*args, **kwargs): keep them all
        if engine == "fsdp1":
            extra["fsdp_config"].update(use_orig_params=orig_params, sync_module_states=False)
    return KDConfig(output_dir=out_dir, max_steps=3,
                    per_device_train_batch_size=8 // (world * accum),
                    per_device_eval_batch_size=2, gradient_accumulation_steps=accum,
                    learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                    weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[],
                    use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
                    dataloader_pin_memory=False, fused_head=fused, divergence="jsd",
                    temperature=2.0, hard_weight=0.25, lmbda=lmbda, max_new_tokens=4,
                    generation_temperature=1e-4, teacher_sharding=sharding, **extra)


def student_of(layout, engine, orig_params=True):
    student = llama(0, tie=layout != "head")
    student.generation_config.eos_token_id = None  # on-policy: every completion 4 tokens
    if layout == "head" and engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in student.model.layers:
            fully_shard(layer)
        fully_shard(student.lm_head)
        fully_shard(student)
    elif layout == "rootunit" and engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in student.model.layers:
            fully_shard(layer)
        fully_shard(student)
    elif layout == "head" and engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        head = student.lm_head
        policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: m is head
                                   or isinstance(m, LlamaDecoderLayer))
        student = FSDP(student, auto_wrap_policy=policy, use_orig_params=orig_params,
                       device_id=torch.device("cpu"))
    return student


def _clean(name):
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def whole_weights(model):
    """Every parameter whole (collective under FSDP), by its unwrapped name."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP):
        with FSDP.summon_full_params(model, writeback=False):
            return {_clean(n): p.detach().clone() for n, p in model.named_parameters()}
    return {_clean(n): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def local_numel(model):
    """(this rank's stored parameter elements, the whole model's): FSDP2 - each
    DTensor's local shard; FSDP1 - each unit's FlatParameter's local shard (its
    storage between forwards), whatever is gathered at the moment."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units = [u for u in FSDP.fsdp_modules(model) if u._has_params] if isinstance(model, FSDP) \
        else []
    if units:
        local = sum(u._flat_param._local_shard.numel() for u in units)
        whole = sum(u._flat_param._unpadded_unsharded_size.numel() for u in units)
        return local, whole
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                for p in model.parameters())
    return local, sum(p.numel() for p in model.parameters())


def run(case, out_dir, world):
    if case in CASES:
        engine, layout, fused, accum, lmbda, sharding = CASES[case]
    else:  # a reference: "tie1-fused1-accum1-lmbda0.0"
        tie, fu, ac, lm = case.split("-")
        engine, layout, fused, accum, lmbda, sharding = (
            None, "root" if tie == "tie1" else "head", fu == "fused1", int(ac[5:]),
            float(lm[5:]), "replicate")
    args = config(f"{out_dir}/{case}", world, fused, accum, lmbda, engine, sharding,
                  wrap=layout == "root", orig_params=case not in FLAT)
    student = student_of(layout, engine if world > 1 else None, case not in FLAT)
    cls = FSDPOnCPU if world > 1 else KDTrainer
    trainer = cls(model=student, teacher_model=llama(1), args=args,
                  data_collator=lambda f: {k: torch.stack([x[k] for x in f]) for k in f[0]},
                  train_dataset=examples(24, 0), eval_dataset=examples(7, 1))
    teacher = trainer.teachers[0]
    # what an optimizer built now would hold: the head probe's forward must leave no FSDP2
    # unit gathered (the root's parameters the shards, DTensors), or no engine at all
    built_on = sorted({type(p).__name__ for p in trainer.model.parameters()})
    trainer.train()
    metrics = trainer.evaluate()
    got = {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
           "metrics": metrics, "weights": whole_weights(trainer.model)}
    if world > 1:
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DistributedType

        every = [None] * world
        dist.all_gather_object(every, local_numel(teacher))
        got["teacher_numel"] = every
        got["teacher_type"] = type(teacher).__name__
        got["student_head"] = type(trainer.model.get_output_embeddings()).__name__
        got["teacher_head"] = type(teacher.get_output_embeddings()).__name__
        got["params_after_init"] = built_on
        got["is_fsdp"] = bool(trainer.is_fsdp_enabled and
                              trainer.accelerator.distributed_type == DistributedType.FSDP)
        # the next case builds its own accelerator state from a clean one
        AcceleratorState._reset_state()
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU
    return got


def main():
    out = sys.argv[1]
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo")
        cases = [c for c in CASES if only is None or c in only]
    else:
        cases = sorted({reference_key(c) for c in CASES if only is None or c in only})
    results = {}
    for case in cases:
        results[case] = run(case, os.path.dirname(os.path.abspath(out)), world)
        if world == 1 or dist.get_rank() == 0:
            print(f"case {case}: losses {results[case]['losses']}", flush=True)
    if world == 1 or dist.get_rank() == 0:
        torch.save({"world": world, "results": results}, out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave()  # out without the interpreter's teardown (see _kd_ranks_worker.leave)
