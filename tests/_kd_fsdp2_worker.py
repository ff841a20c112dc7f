"""KDTrainer's fused loss on an FSDP2 student (``fully_shard`` on every decoder
layer, on the LM head as its own unit and on the root), under ``torchrun``
with gloo: each rank computes the loss of its half of a global batch and
backpropagates; the gradients FSDP reduces into the shards must equal, once
gathered, those of one unsharded student on the whole batch (rank 0 writes
the largest differences). tests/test_hf_distributed.py runs it.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/_kd_fsdp2_worker.py OUT.pt FUSED_HEAD
"""
import sys

import torch
import torch.distributed as dist
from _kd_ranks_worker import SEQ, V, llama, leave  # the same tiny Llamas (this script's folder)
from torch.distributed.fsdp import fully_shard

from fastdistill.hf import KDConfig, KDTrainer


def batch(rows):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (4, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # the same number of kept tokens in every row: per-rank means average
    return {"input_ids": ids[rows], "attention_mask": torch.ones_like(ids[rows]),
            "labels": labels[rows]}


def main():
    out, fused = sys.argv[1], sys.argv[2] == "1"
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    args = KDConfig(output_dir="fsdp2_out", report_to=[], use_cpu=True, fused_head=fused,
                    divergence="jsd", temperature=2.0, hard_weight=0.25, disable_tqdm=True)
    teacher = llama(1, tie=False)

    reference = llama(0, tie=False)  # the head its own unit: not tied to the root's embedding
    ref_trainer = KDTrainer(model=reference, teacher_model=teacher, args=args)
    ref_trainer.compute_loss(reference, batch(slice(None))).backward()

    student = llama(0, tie=False)
    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student.lm_head)  # the head as its own unit: sharded outside its forward
    fully_shard(student)
    trainer = KDTrainer(model=student, teacher_model=teacher, args=args)
    per_rank = 4 // world
    loss = trainer.compute_loss(student, batch(slice(rank * per_rank, (rank + 1) * per_rank)))
    loss.backward()
    diffs = {}
    for (name, p), (_, q) in zip(student.named_parameters(), reference.named_parameters()):
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        diffs[name] = float((grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-30))
    if rank == 0:
        torch.save({"diffs": diffs, "world": world,
                    "head_sharded": type(student.lm_head.weight).__name__}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave()  # out without the interpreter's teardown (see _kd_ranks_worker.leave)
