"""KDTrainer under DeepSpeed ZeRO-3: several cases in ONE launch (DeepSpeed's
start-up is paid once), and the same cases as one plain process for the
reference. tests/test_hf_zero3.py runs both and compares what rank 0 writes.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/_kd_zero3_worker.py zero3 OUT.pt        # the ZeRO-3 cases, then the bad input
    python tests/_kd_zero3_worker.py plain OUT.pt     # the same cases, no DeepSpeed

The DeepSpeed config is examples/zero3.json with one change: the persistence
threshold 0, so that even these tiny models' parameters are partitioned (its
"auto" keeps parameters under 10·hidden whole). Optimizer: HF's torch SGD
(``optim="sgd"``, no ``optimizer`` section, so no DeepSpeed optimizer), lr 0.5,
no clipping: a gradient counted twice or averaged wrongly changes the weights
at once. DeepSpeed on CPU: ``DS_ACCELERATOR=cpu`` and accelerate's state made
with gloo first (``zero.init_cpu_state``). Without FASTDISTILL_DS_SHM=1 the
shared-memory comm op is left out (gloo does every collective): building it
takes ~50 s per clean cache and changes nothing compared here.
FASTDISTILL_TEST_DEVICE=cuda (bench/gpu_check.sh): both runs on the GPU, the
ZeRO-3 one with DeepSpeed's CUDA accelerator (launch it with 1 rank there).
"""
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers
from _kd_ranks_worker import V, collate, examples, llama, leave  # this script's folder

from fastdistill.hf import KDConfig, KDTrainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "zero3.json"

# name: (fused_head, tie student and teacher, teacher_sharding, accumulation, zero.Init student)
CASES = {
    "fused-tied-shard": (True, True, "shard", 1, False),
    "fused-untied-replicate-accum2-init": (True, False, "replicate", 2, True),
    "fused-untied-shard": (True, False, "shard", 1, False),
    "unfused-tied-shard": (False, True, "shard", 1, False),
}
GLOBAL_BATCH = 8
CUDA = os.environ.get("FASTDISTILL_TEST_DEVICE") == "cuda"


def ds_config() -> dict:
    cfg = json.loads(CONFIG.read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return cfg


def kd_args(out, world, fused, accum, sharding, deepspeed=None):
    if deepspeed is None:
        extra = dict(use_cpu=not CUDA)
    elif CUDA:  # accelerate finds the GPU and its backend itself
        extra = dict(deepspeed=deepspeed)
    else:  # the process state made beforehand (zero.init_cpu_state)
        extra = dict(deepspeed=deepspeed, accelerator_config={"use_configured_state": True})
    return KDConfig(output_dir=out, max_steps=3,
                    per_device_train_batch_size=GLOBAL_BATCH // (world * accum),
                    per_device_eval_batch_size=2, gradient_accumulation_steps=accum,
                    learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                    weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, save_strategy="no",
                    report_to=[], seed=0, data_seed=0, disable_tqdm=True,
                    dataloader_pin_memory=False, fused_head=fused, divergence="jsd",
                    temperature=2.0, hard_weight=0.25, teacher_sharding=sharding, **extra)


def reset_accelerate():
    """A fresh accelerate state for the next case in this process (its
    DeepSpeed plugin holds the previous case's config); the process state (the
    gloo group) stays."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def partitioned_student(tie, cfg):
    """llama(0) built under deepspeed.zero.Init (partitioned from the start, as
    from_pretrained after a ZeRO-3 KDConfig makes it), holding llama(0)'s values."""
    import deepspeed

    whole = llama(0, tie).state_dict()
    with deepspeed.zero.Init(config_dict_or_path=cfg):
        model = llama(0, tie)
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(whole[name])
    return model


def whole_weights(trainer) -> dict:
    """The final weights gathered from the partitions the way HF's save does it
    (accelerate's get_state_dict: the engine's consolidated state dict, on rank
    0; collective)."""
    sd = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return {k: v.detach().clone() for k, v in (sd or {}).items()}  # other ranks: None


def head_numel(model) -> list:
    """[this rank's elements, whole elements] of the LM head weight."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    w = model.get_output_embeddings().weight
    return [w.numel(), int(getattr(w, "ds_numel", w.numel()))]


class _HeadDuringTraining(transformers.TrainerCallback):
    """The student's LM head weight after each optimizer step (outside any forward)."""

    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.append(head_numel(model))


def run_case(name, out_dir, deepspeed):
    fused, tie, sharding, accum, init = CASES[name]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = ds_config() if deepspeed else None
    args = kd_args(f"{out_dir}/{name}-{world}", world, fused, accum, sharding, cfg)
    # zero.Init with the config as HF resolved it (batch sizes filled in), as from_pretrained
    student = (partitioned_student(tie, args.hf_deepspeed_config.config) if init and deepspeed
               else llama(0, tie))
    teacher = llama(1, tie)
    trainer = KDTrainer(model=student, teacher_model=teacher, args=args, data_collator=collate,
                        train_dataset=examples(24, 0), eval_dataset=examples(7, 1))
    during = _HeadDuringTraining()
    trainer.add_callback(during)
    t0 = time.time()
    trainer.train()
    metrics = trainer.evaluate()
    model = trainer.model
    res = {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
           "metrics": metrics, "world": world, "seconds": time.time() - t0,
           "student_head": during.seen, "teacher_head": head_numel(trainer.teachers[0]),
           "weights": whole_weights(trainer) if deepspeed else
           {k: v.detach().clone() for k, v in model.state_dict().items()}}
    del trainer
    if deepspeed:
        reset_accelerate()
    return res


def bad_input(out_dir):
    """Construction-time refusals, on every rank alike (no collective runs)."""
    import deepspeed

    got = {}
    cfg = ds_config()
    args = kd_args(f"{out_dir}/bad", int(os.environ.get("WORLD_SIZE", "1")), True, 1,
                   "replicate", cfg)
    with deepspeed.zero.Init(config_dict_or_path=args.hf_deepspeed_config.config):
        teacher = llama(1)
    try:
        KDTrainer(model=llama(0), teacher_model=teacher, args=args, data_collator=collate,
                  train_dataset=examples(8, 0))
    except ValueError as e:
        got["replicate_partitioned_teacher"] = str(e)
    reset_accelerate()
    return got


def main():
    mode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    deepspeed = mode == "zero3"
    if deepspeed and not CUDA:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed as ds

        if os.environ.get("FASTDISTILL_DS_SHM") != "1":  # gloo only: no op to build
            ds.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        from fastdistill.hf import zero

        zero.init_cpu_state("gloo")
    results = {name: run_case(name, os.path.dirname(out), deepspeed) for name in CASES}
    if deepspeed:
        results["bad_input"] = bad_input(os.path.dirname(out))
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main()
    leave()  # out without the interpreter's teardown (see _kd_ranks_worker.leave)
