"""Per-rank memory of KDTrainer's fused loss under FSDP2 (issue 28): a
SmolLM2-135M-shaped student and teacher (hidden 576, 30 layers, 9 heads, 3 kv
heads, intermediate 1536, V 49152, tied; random init), one AdamW step after a
warm-up step. Two gloo ranks on 1024 tokens each (student ``fully_shard`` on
its layers and root, the teacher sharded by KDTrainer, teacher_sharding
"shard"; and "replicate") against one process on all 2048 tokens.

    python bench/kd_fsdp_memory.py          # all three runs, then the table

Memory: glibc's mmap threshold fixed (fastdistill.bench.fix_malloc_thresholds:
freed large buffers go back to the OS, so the high-water mark sees every
allocation), /proc/self/clear_refs reset to the current RSS after the warm-up
step, VmHWM read after the measured step: the peak of that step, per process.

No N×V tensor: a TorchDispatchMode on the warm-up step (the same shapes as the
measured one) records the largest output of every dispatched op (what the C++
kernels allocate inside themselves is not dispatched; its chunks are bounded
by chunk_size × V, and the RSS peak covers it), checked against
tokens-of-this-process × V.
"""
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
V, TOKENS, SEQ = 49152, 2048, 1024


def shape():
    import transformers

    return transformers.LlamaConfig(
        vocab_size=V, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=SEQ,
        tie_word_embeddings=True, attn_implementation="sdpa")


def measure(sharding):
    import torch
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastdistill.bench import _reset_peak, _status_kb, fix_malloc_thresholds
    from fastdistill.hf import KDConfig, KDTrainer

    fix_malloc_thresholds()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    import transformers

    torch.manual_seed(0)
    student = transformers.LlamaForCausalLM(shape())
    torch.manual_seed(1)
    teacher = transformers.LlamaForCausalLM(shape())
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in student.model.layers:
            fully_shard(layer)
        fully_shard(student)
    args = KDConfig(output_dir="/tmp/kd_fsdp_memory", report_to=[], use_cpu=True,
                    fused_head=True, divergence="forward_kl", temperature=2.0,
                    hard_weight=0.25, teacher_sharding=sharding, disable_tqdm=True)
    trainer = KDTrainer(model=student, teacher_model=teacher, args=args)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    rows = TOKENS // SEQ // world
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (TOKENS // SEQ, SEQ), generator=g)[rank * rows:(rank + 1) * rows]
    labels = ids.clone()
    labels[:, 0] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    tokens = ids.numel()

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel, self.op = 0, None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                    self.numel, self.op = t.numel(), str(func)
            return out

    def step(mode=None):
        t0 = time.perf_counter()
        if mode is None:
            loss = trainer.compute_loss(student, batch)
            loss.backward()
        else:
            with mode:
                loss = trainer.compute_loss(student, batch)
                loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss), time.perf_counter() - t0

    largest = Largest()
    step(largest)  # warm-up: AdamW's states exist from here on
    before = _status_kb("VmRSS")
    ok = _reset_peak()
    loss, seconds = step()
    peak = _status_kb("VmHWM")
    t_local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                  for p in trainer.teachers[0].parameters())
    out = {"rank": rank, "world": world, "sharding": sharding, "tokens": tokens,
           "rss_before_kb": before, "peak_kb": peak if ok else None, "loss": loss,
           "largest_numel": largest.numel, "largest_op": largest.op,
           "nxv": tokens * V, "teacher_local_numel": t_local,
           "teacher_numel": sum(p.numel() for p in teacher.parameters()),
           "step_s": seconds}
    every = [out]
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, out)
        dist.destroy_process_group()
    if rank == 0:
        print("RESULT " + json.dumps(every), flush=True)


def launch(nproc, sharding):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable] + ([] if nproc == 1 else [
        "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"])
    res = subprocess.run(cmd + [__file__, "--worker", sharding], env=env, capture_output=True,
                         text=True, timeout=3600)
    if res.returncode:
        raise SystemExit(res.stderr[-4000:])
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return measure(sys.argv[2])
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = f.read().strip()
    print(f"THP: {thp}; {os.confstr('CS_GNU_LIBC_VERSION')}; mmap threshold fixed at 128 KiB")
    one = launch(1, "replicate")[0]
    runs = [("1 process, 2048 tokens", one)]
    for sharding in ("shard", "replicate"):
        for r in launch(2, sharding):
            runs.append((f"2 ranks x 1024, teacher {sharding}, rank {r['rank']}", r))
    print(f"| run | RSS before step MiB | peak RSS MiB | vs 1 process | largest tensor "
          f"(elements) | tokens×V | teacher params on the rank |")
    print("|---|---|---|---|---|---|---|")
    for name, r in runs:
        print(f"| {name} | {r['rss_before_kb'] / 1024:.0f} | {r['peak_kb'] / 1024:.0f} | "
              f"{r['peak_kb'] / one['peak_kb']:.2f}x | {r['largest_numel']:,} "
              f"({r['largest_op']}) | {r['nxv']:,} | "
              f"{r['teacher_local_numel'] / r['teacher_numel']:.2f} |")
    bad = [name for name, r in runs if r["largest_numel"] >= r["nxv"]]
    print("no N×V tensor" if not bad else f"N×V tensors in: {bad}")


if __name__ == "__main__":
    main()
