"""The library's main job: distil SmolLM2-135M into a small Llama on KJV text.

Two students from the same initialization, the same data, steps and optimizer:
one trained on the hard labels only (a plain ``transformers.Trainer``, what a
user would run without a teacher), one by ``KDTrainer`` (fused heads, online
teacher). Both are measured on held-out text before and after: cross-entropy
on the next token and forward KL to the teacher at T=1 (token means), the KL
from the teacher's held-out hidden states, computed once.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import torch

from ..kd import fused_linear_kd_loss
from .defaults import kjv_split, load_teacher, small_student
from .trainer import KDConfig, KDTrainer, _hidden_states, lm_head_of


class TokenWindows(torch.utils.data.Dataset):
    """Fixed-length token windows as causal-LM examples (labels = input ids)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        x = self.ids[i]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def collate(features):
    return {k: torch.stack([f[k] for f in features]) for k in features[0]}


@torch.no_grad()
def held_out_metrics(student, ids: torch.Tensor, teacher_hidden: torch.Tensor, teacher_head,
                     batch: int = 8) -> dict:
    """Token-mean next-token CE and forward KL (T=1) to the teacher on ``ids``."""
    was = student.training
    student.eval()
    head = lm_head_of(student)
    ce = kl = 0.0
    n = 0
    try:
        for a in range(0, ids.shape[0], batch):
            x = ids[a:a + batch].to(head.weight.device)
            hs = _hidden_states(student, {"input_ids": x})[:, :-1]
            th = teacher_hidden[a:a + batch].to(head.weight.device)
            labels = x[:, 1:]
            kw = dict(student_bias=head.bias, teacher_bias=teacher_head.bias, labels=labels,
                      reduction="sum", teacher_softcap=teacher_head.softcap,
                      teacher_logit_scale=teacher_head.logit_scale)
            ce += float(fused_linear_kd_loss(hs, head.weight, th, teacher_head.weight,
                                             hard_weight=1.0, **kw))
            kl += float(fused_linear_kd_loss(hs, head.weight, th, teacher_head.weight, **kw))
            n += labels.numel()
    finally:
        student.train(was)
    return {"ce": ce / n, "kl": kl / n}


def _args(out: str, steps: int, batch: int, lr: float, **kw):
    return dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10),
                weight_decay=0.0, logging_steps=max(1, steps // 5), save_strategy="no",
                report_to=[], use_cpu=True, seed=0, disable_tqdm=False, **kw)


def train_student(arm: str, teacher, data, V: int, *, steps: int, batch: int, lr: float,
                  out: str, store=None, **kd):
    """A fresh student (the same initialization for every arm) trained by ``arm``:
    "hard" (plain ``transformers.Trainer`` on the labels), "kd" (``KDTrainer``
    with the online teacher; ``kd`` holds its KDConfig options) or "store"
    (``KDTrainer`` from the soft-label store ``store``). Returns (student, seconds)."""
    from transformers import Trainer, TrainingArguments

    student = small_student(V, seed=0)
    start = time.perf_counter()
    if arm == "hard":
        trainer = Trainer(model=student, args=TrainingArguments(**_args(out, steps, batch, lr)),
                          train_dataset=data, data_collator=collate)
    else:
        cfg = KDConfig(**_args(out, steps, batch, lr), **kd)
        trainer = KDTrainer(model=student, teacher_model=None if arm == "store" else teacher,
                            soft_labels=store, args=cfg, train_dataset=data,
                            data_collator=collate)
    trainer.train()
    return student, time.perf_counter() - start


def setup(n_train: int, n_eval: int, seq_len: int, batch: int):
    """(teacher, tokenizer, train windows, held-out windows, the teacher's held-out
    hidden states and head, its held-out CE)."""
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 2)))
    teacher, tok = load_teacher()
    train_ids, eval_ids = kjv_split(tok, n_train, n_eval, seq_len)
    with torch.no_grad():
        t_hidden = torch.cat([_hidden_states(teacher, {"input_ids": eval_ids[a:a + batch]})[:, :-1]
                              for a in range(0, n_eval, batch)])
    t_head = lm_head_of(teacher)
    teacher_ce = held_out_metrics(teacher, eval_ids, t_hidden, t_head)["ce"]
    return teacher, tok, train_ids, eval_ids, t_hidden, t_head, teacher_ce


def print_table(rows: list[dict], title: str, out=sys.stdout) -> None:
    print(title, file=out)
    print(f"{'student':<28} {'CE before':>9} {'CE after':>9} {'KL before':>10} {'KL after':>9} "
          f"{'train s':>8}", file=out)
    for r in rows:
        print(f"{r['student']:<28} {r['ce_before']:>9.3f} {r['ce_after']:>9.3f} "
              f"{r['kl_before']:>10.3f} {r['kl_after']:>9.3f} {r['seconds']:>8.1f}", file=out)
    print("(CE: next-token cross-entropy on held-out text, nats; KL: forward KL to the teacher "
          "at T=1, nats per token)", file=out)


def run(steps: int = 60, batch: int = 8, seq_len: int = 64, n_train: int = 512, n_eval: int = 32,
        lr: float = 3e-3, divergence: str = "forward_kl", temperature: float = 1.0,
        out=sys.stdout) -> list[dict]:
    """Train both students; print and return one row per student."""
    t0 = time.perf_counter()
    teacher, _, train_ids, eval_ids, t_hidden, t_head, teacher_ce = setup(
        n_train, n_eval, seq_len, batch)
    V = t_head.weight.shape[0]
    data = TokenWindows(train_ids)
    rows = []
    before = held_out_metrics(small_student(V, seed=0), eval_ids, t_hidden, t_head)
    with tempfile.TemporaryDirectory() as tmp:
        for name, arm in (("hard labels only", "hard"), (f"KDTrainer {divergence}", "kd")):
            kd = {} if arm == "hard" else dict(divergence=divergence, temperature=temperature)
            student, seconds = train_student(arm, teacher, data, V, steps=steps, batch=batch,
                                             lr=lr, out=tmp, **kd)
            after = held_out_metrics(student, eval_ids, t_hidden, t_head)
            rows.append(dict(student=name, ce_before=before["ce"], kl_before=before["kl"],
                             ce_after=after["ce"], kl_after=after["kl"], seconds=seconds))
    n_params = sum(p.numel() for p in student.parameters())
    print_table(rows, f"\nDistilling SmolLM2-135M-Instruct (held-out CE {teacher_ce:.3f}) into a "
                f"{n_params / 1e6:.1f} M-parameter Llama on King James Bible text: {steps} steps "
                f"× {batch} × {seq_len} tokens, lr {lr}, the same init and data for both; "
                f"held-out: {n_eval} windows from the last tenth of the text "
                f"(total {time.perf_counter() - t0:.0f} s).", out)
    return rows


if __name__ == "__main__":
    run()
