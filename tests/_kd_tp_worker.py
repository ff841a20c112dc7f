"""KDTrainer with a tensor-parallel LM head, under ``torchrun`` with gloo (CPU):
2 ranks on one TP mesh of size 2, the head parallelized with ``ColwiseParallel``
(vocabulary 61: DTensor splits it 31 + 30). Every rank sees the whole batch;
``KDTrainer.compute_loss`` + backward must give, on every rank, the loss and
(gathered from the shards) the gradients of one unsharded student on the same
batch, computed here in the same process. Then the layouts KDTrainer refuses,
each at construction with a ValueError. tests/test_hf_tensor_parallel.py runs
it once and reads what rank 0 writes.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/_kd_tp_worker.py OUT.pt STORE_DIR
"""
import os
import sys
import traceback

import torch
import torch.distributed as dist
from _kd_ranks_worker import SEQ, V, llama, leave  # the same tiny Llamas (this script's folder)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from fastdistill.hf import KDConfig, KDTrainer


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (4, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100           # a prompt
    labels[1, 6:8] = -100          # and ignored tokens inside a row
    labels[3, 9] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def student(bias=False):
    m = llama(0, tie=False)
    if bias:  # a head with a bias (ColwiseParallel shards it with the rows)
        torch.manual_seed(5)
        head = torch.nn.Linear(m.config.hidden_size, V, bias=True)
        head.weight.data.copy_(m.lm_head.weight.data)
        m.lm_head = head
    return m


def config(**kw):
    base = dict(output_dir="tp_out", report_to=[], use_cpu=True, disable_tqdm=True)
    return KDConfig(**dict(base, **kw))


def full(x):
    return x.full_tensor() if isinstance(x, DTensor) else x


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------- equal to one process

CASES = {
    # ColwiseParallel's default output: Shard(-1) logits, local (never read: fused)
    "student-tp-whole-teacher": dict(s_plan={}, t_plan=None, step=True,
                                     args=dict(divergence="forward_kl")),
    "both-tp": dict(s_plan=dict(output_layouts=Replicate()), t_plan={},
                    args=dict(divergence="reverse_kl", temperature=1.5)),
    # hard labels at T != 1, ignored rows, a sharded bias, chunks of 3 rows, DTensor
    # logits (use_local_output=False), and HF's num_items_in_batch scaling under TP
    "hard-T2-ignored-bias-chunks": dict(
        s_plan=dict(use_local_output=False), t_plan=None, bias=True, num_items=True,
        args=dict(divergence="jsd", temperature=2.0, hard_weight=0.25, chunk_size=3)),
    "both-tp-skew-hard": dict(s_plan={}, t_plan=dict(output_layouts=Replicate()),
                              args=dict(divergence="skew_reverse_kl", temperature=0.7,
                                        hard_weight=0.5)),
    # fused_head=False: the model's own (DTensor-computed) logits, gathered by the plan
    "unfused-replicated-logits": dict(s_plan=dict(output_layouts=Replicate()), t_plan=None,
                                      args=dict(divergence="jsd", temperature=2.0,
                                                hard_weight=0.25, fused_head=False)),
}


def equal_case(mesh, spec):
    args = config(**spec["args"])
    b = batch()
    teacher_ref = llama(1, tie=False)
    ref = student(spec.get("bias", False))
    ref_trainer = KDTrainer(model=ref, teacher_model=teacher_ref, args=args)
    ref_loss = ref_trainer.compute_loss(ref, b)
    ref_loss.backward()

    st = student(spec.get("bias", False))
    parallelize_module(st, mesh, {"lm_head": ColwiseParallel(**spec["s_plan"])})
    teacher = llama(1, tie=False)
    if spec["t_plan"] is not None:
        parallelize_module(teacher, mesh, {"lm_head": ColwiseParallel(**spec["t_plan"])})
    trainer = KDTrainer(model=st, teacher_model=teacher, args=args)
    if spec.get("num_items"):
        # what HF's Trainer does for a model it knows is tensor-parallel: the kept
        # tokens gathered over every rank, divided by the TP size (both ranks hold
        # this batch), and a summed loss; KDTrainer must scale it like HF does
        trainer.model._tp_size = 2
        trainer.args.average_tokens_across_devices = True
        n = (b["labels"][:, 1:] != -100).sum() * dist.get_world_size() / 2
        loss = trainer.compute_loss(st, b, num_items_in_batch=n)
    else:
        loss = trainer.compute_loss(st, b)
    loss.backward()
    w = st.lm_head.weight
    out = {"ref_loss": float(ref_loss), "loss": float(loss),
           "head_weight": type(w).__name__, "head_grad": type(w.grad).__name__,
           "grad_placements": [str(p) for p in getattr(w.grad, "placements", ())],
           "local_rows": int(w.to_local().shape[0]) if isinstance(w, DTensor) else None,
           "teacher_head": type(teacher.lm_head.weight).__name__, "diffs": {}}
    for (name, p), (_, q) in zip(st.named_parameters(), ref.named_parameters()):
        out["diffs"][name] = rel(full(p.grad), q.grad)
    if spec.get("step"):  # one plain-SGD step on the sharded and the whole student
        for model in (st, ref):
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            opt.step()
        out["after_step"] = {name: rel(full(p.detach()), q.detach())
                             for (name, p), (_, q) in zip(st.named_parameters(),
                                                          ref.named_parameters())}
        out["moved"] = rel(full(st.lm_head.weight.detach()), student().lm_head.weight.detach())
    return out


# ---------------------------------------------------------------- refused at construction

def tiny_store(path):
    from fastdistill.softlabels import SoftLabelStore, SoftLabelWriter, label_tokens

    with SoftLabelWriter(path, vocab_size=V) as writer:
        label_tokens(llama(1), [batch()["input_ids"][:2]], writer, k=8, value_bits=16,
                     keys=["0", "1"], progress=False)
    return SoftLabelStore(path)


def tp(model, mesh, style=None):
    parallelize_module(model, mesh, {"lm_head": style or ColwiseParallel()})
    return model


def refusals(mesh, store_dir):
    """name -> (build the trainer, substrings its ValueError must contain)."""
    rank = dist.get_rank()

    def replicated_head():
        m = student()
        m.lm_head.weight = torch.nn.Parameter(distribute_tensor(m.lm_head.weight.data, mesh,
                                                                [Replicate()]))
        return m

    ds = [{k: v[i] for k, v in batch().items()} for i in range(2)]
    return {
        "rowwise-head": (lambda: KDTrainer(model=tp(student(), mesh, RowwiseParallel()),
                                           teacher_model=llama(1, tie=False), args=config()),
                         ["the student", "Shard(dim=1)", "not sharded along the vocabulary"]),
        "replicated-head": (lambda: KDTrainer(model=replicated_head(),
                                              teacher_model=llama(1, tie=False), args=config()),
                            ["Replicate()", "not sharded along the vocabulary"]),
        "soft-labels": (lambda: KDTrainer(model=tp(student(), mesh), soft_labels=tiny_store(
                            os.path.join(store_dir, f"store{rank}")), args=config(),
                            train_dataset=ds),
                        ["tensor-parallel", "soft labels", "fused_head=False"]),
        "two-teachers": (lambda: KDTrainer(model=tp(student(), mesh),
                                           teacher_model=[llama(1, tie=False), llama(2, tie=False)],
                                           args=config()),
                         ["mixture of 2 teachers"]),
        "sharded-teacher-whole-student": (
            lambda: KDTrainer(model=student(), teacher_model=tp(llama(1, tie=False), mesh),
                              args=config()),
            ["teacher 0", "tensor-parallel", "the student's is whole"]),
        "vocab-mismatch": (lambda: KDTrainer(model=tp(student(), mesh),
                                             teacher_model=llama(1, tie=False, vocab=64),
                                             args=config(vocab_mismatch="pad")),
                           ["vocabulary (64) differs", "vocab_mismatch"]),
        "on-policy": (lambda: KDTrainer(model=tp(student(), mesh),
                                        teacher_model=llama(1, tie=False),
                                        args=config(lmbda=0.5)),
                      ["lmbda=0.5", "on-policy"]),
        "unfused-sharded-logits": (lambda: KDTrainer(model=tp(student(), mesh),
                                                     teacher_model=llama(1, tie=False),
                                                     args=config(fused_head=False)),
                                   ["fused_head=False",
                                    "not one tensor over the whole vocabulary"]),
    }


def refused(build, words):
    try:
        build()
    except ValueError as e:
        msg = str(e)
        return {"raised": True, "message": msg, "missing": [w for w in words if w not in msg]}
    except Exception as e:  # any other error is a failure of the case, with its message
        return {"raised": False, "message": f"{type(e).__name__}: {e}", "missing": words}
    return {"raised": False, "message": "", "missing": words}


def different_batches(mesh):
    """Each rank with its own batch (as HF's Trainer would give them under plain DDP
    data sharding): refused at the loss, on every rank, never a loss of mixed rows."""
    st = tp(student(), mesh)
    trainer = KDTrainer(model=st, teacher_model=llama(1, tie=False), args=config())
    b = batch()
    rows = slice(2 * dist.get_rank(), 2 * dist.get_rank() + 2)
    try:
        trainer.compute_loss(st, {k: v[rows] for k, v in b.items()})
    except ValueError as e:
        return {"raised": True, "message": str(e),
                "missing": [w for w in ("different batches", "same batch") if w not in str(e)]}
    return {"raised": False, "message": "", "missing": []}


def main():
    out, store_dir = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    result = {"world": dist.get_world_size(), "equal": {}, "refused": {}}
    for name, spec in CASES.items():
        try:
            result["equal"][name] = equal_case(mesh, spec)
        except Exception:
            result["equal"][name] = {"error": traceback.format_exc()}
    for name, (build, words) in refusals(mesh, store_dir).items():
        result["refused"][name] = refused(build, words)
    result["refused"]["different-batches"] = different_batches(mesh)
    every = [None] * dist.get_world_size()  # every rank's result: the loss on each rank
    dist.all_gather_object(every, result)
    if dist.get_rank() == 0:
        torch.save({"ranks": every}, out)


if __name__ == "__main__":
    main()
    leave()  # out without the interpreter's teardown (see _kd_ranks_worker.leave)
