"""KDTrainer vs TRL's GKDTrainer vs a hand-written HF Trainer: steps/s and extra
peak memory of one training step, the same model pair, batch and divergence.

Rows (teacher SmolLM2-135M-Instruct from ``load_teacher()``, student
``small_student(49152)``, forward KL at T=1, fp32, AdamW, no gradient
checkpointing, one process per row and allocator regime):

(1) ``fastdistill.hf.KDTrainer`` (fused_head=True: no N×V logits),
(2) ``trl.experimental.gkd.GKDTrainer`` (lmbda=0, seq_kd=False, beta=0),
(3) the same with ``use_liger_kernel=True``,
(4) a plain ``transformers.Trainer`` whose ``compute_loss`` takes both models'
    full logits and ``F.kl_div(log_target=True)``: what a user writes by hand.

TRL's ``generalized_jsd_loss`` with beta=0 is ``F.kl_div(student_log_probs,
teacher_log_probs, log_target=True)`` = KL(teacher || student) per token, i.e.
fastdistill's ``divergence="forward_kl"`` (beta=1 would be ``reverse_kl``).
A check child computes all the losses (and student gradients) on one batch and
prints how far apart they are before anything is timed.

Each row runs twice in a fresh child: with glibc's default allocator (what a
normal process has; the timing columns) and with the mmap threshold pinned at
128 KiB (``fastdistill.bench.fix_malloc_thresholds``: every freed buffer goes
back to the OS, so the peak RSS sees each allocation; the memory columns). Per
step: extra peak RSS above the RSS at the step's start (optimizer state, data
and models already resident). "Loss-related": that minus the extra peak of the
two models' bodies alone (teacher forward to its last hidden state under
no_grad, student forward to its last hidden state and backward from a trivial
loss on it), i.e. what the LM heads, logits and divergence add.

TRL is a bench-only dependency: install it in a separate venv that borrows
torch/transformers/accelerate/fastdistill from the dev venv::

    python3 -m venv /work/bench-venv
    SP=/work/bench-venv/lib/python3.11/site-packages
    printf '%s\\n' /work/main/.venv/lib/python3.11/site-packages \\
      'import __editable___fastdistill_0_1_0_finder; __editable___fastdistill_0_1_0_finder.install()' \\
      > $SP/zz_devvenv.pth
    /work/bench-venv/bin/pip install --no-deps trl==1.16.0 liger-kernel datasets \\
      pyarrow dill multiprocess xxhash

(check that ``/work/bench-venv/bin/python -c "import torch, trl.experimental.gkd;
print(torch.__file__)"`` names the dev venv's torch). Then::

    /work/bench-venv/bin/python bench/kd_trainer_vs_trl.py [--batch 8 --seq-len 512 --steps 3]

Prints the allocator regime, the loss check and a markdown table (also written
to bench/out/kd_trainer_vs_trl.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROWS = ("kdtrainer", "gkd", "gkd_liger", "plain")
LABEL = {"kdtrainer": "(1) fastdistill KDTrainer (fused_head)",
         "gkd": "(2) TRL GKDTrainer",
         "gkd_liger": "(3) TRL GKDTrainer + use_liger_kernel",
         "plain": "(4) HF Trainer + full logits + F.kl_div"}
MB = 1024 * 1024
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "kd_trainer_vs_trl.md")


# ------------------------------------------------------------------ children

def _data(tok, n: int, seq_len: int):
    """KJV windows as a ``datasets.Dataset`` in torch format (GKDTrainer refuses a
    torch Dataset); the same object type for every row."""
    from datasets import Dataset

    from fastdistill.hf.defaults import kjv_split

    train, _ = kjv_split(tok, n, 1, seq_len)
    ds = Dataset.from_dict({"input_ids": train.tolist(),
                            "attention_mask": _ones_like(train),
                            "labels": train.tolist()})
    ds.set_format("torch")
    return ds


def _ones_like(x):
    return [[1] * x.shape[1] for _ in range(x.shape[0])]


def _common_args(tmp: str, a) -> dict:
    return dict(output_dir=tmp, max_steps=a.steps + a.warmup, per_device_train_batch_size=a.batch,
                learning_rate=1e-4, lr_scheduler_type="constant", weight_decay=0.0,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                disable_tqdm=True, dataloader_num_workers=0, gradient_checkpointing=False,
                bf16=False, fp16=False, max_grad_norm=1.0)


def _plain_trainer_cls():
    import torch
    import torch.nn.functional as F
    from transformers import Trainer

    class PlainKDTrainer(Trainer):
        """What a user writes by hand: both models' full logits, F.kl_div."""

        def __init__(self, *a, teacher_model=None, **kw):
            super().__init__(*a, **kw)
            self.teacher = teacher_model.eval().requires_grad_(False)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            kw = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            s = model(**kw).logits[:, :-1]
            with torch.no_grad():
                t = self.teacher(**kw).logits[:, :-1]
            mask = inputs["labels"][:, 1:] != -100
            kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="none",
                          log_target=True).sum(-1)
            den = num_items_in_batch if num_items_in_batch is not None else mask.sum()
            loss = kl[mask].sum() / den
            return (loss, None) if return_outputs else loss

    return PlainKDTrainer


def _trainer(row: str, student, teacher, tok, data, tmp: str, a):
    from fastdistill.hf.demo import collate

    common = _common_args(tmp, a)
    if row == "kdtrainer":
        from fastdistill.hf import KDConfig, KDTrainer

        return KDTrainer(model=student, teacher_model=teacher, train_dataset=data,
                         data_collator=collate, args=KDConfig(
                             **common, divergence="forward_kl", temperature=1.0,
                             fused_head=True))
    if row in ("gkd", "gkd_liger"):
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        cfg = GKDConfig(**common, lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False,
                        max_length=a.seq_len, use_liger_kernel=row == "gkd_liger")
        return GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=data,
                          data_collator=collate, processing_class=tok)
    if row == "plain":
        from transformers import TrainingArguments

        return _plain_trainer_cls()(model=student, teacher_model=teacher, train_dataset=data,
                                    data_collator=collate, args=TrainingArguments(**common))
    raise ValueError(f"row must be one of {ROWS}, got {row!r}")


def _setup(a, pinned: bool):
    if pinned:
        from fastdistill.bench import fix_malloc_thresholds

        fix_malloc_thresholds()  # before anything large is allocated
    import torch

    torch.set_num_threads(a.threads)
    from fastdistill.hf.defaults import load_teacher, small_student

    teacher, tok = load_teacher()
    V = teacher.get_output_embeddings().weight.shape[0]
    student = small_student(V, seed=0)
    return teacher, tok, student


def child_row(row: str, a, pinned: bool) -> dict:
    import torch
    from transformers import TrainerCallback

    from fastdistill import cpu_cache
    from fastdistill.bench import _reset_peak, _status_kb
    from fastdistill.hf.demo import collate
    from fastdistill.hf.trainer import _hidden_states

    teacher, tok, student = _setup(a, pinned)
    data = _data(tok, a.batch * (a.steps + a.warmup), a.seq_len)
    out = {"row": row, "pinned": pinned, "params_student": sum(p.numel() for p in student.parameters()),
           "params_teacher": sum(p.numel() for p in teacher.parameters())}

    class Probe(TrainerCallback):
        def __init__(self):
            self.steps, self.losses = [], []

        def on_step_begin(self, args, state, control, **kw):
            self.peak_ok = _reset_peak()
            self.held = cpu_cache.idle_bytes()
            self.rss0 = _status_kb("VmRSS")
            self.t0 = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.t1 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            t2 = time.perf_counter()
            hwm = _status_kb("VmHWM")
            extra = None
            if self.peak_ok and hwm is not None and self.rss0 is not None:
                extra = (hwm - self.rss0) * 1024 + self.held
            self.steps.append({"step_s": t2 - self.t0, "fwd_bwd_s": self.t1 - self.t0,
                               "opt_s": t2 - self.t1, "extra_peak": extra})

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as tmp:
        try:
            trainer = _trainer(row, student, teacher, tok, data, tmp, a)
        except Exception as e:  # noqa: BLE001 - the table records why a row has no number
            out["error"] = f"construction: {type(e).__name__}: {e}"
            return out
        probe = Probe()
        trainer.add_callback(probe)
        try:
            trainer.train()
        except Exception as e:  # noqa: BLE001
            import traceback

            where = traceback.extract_tb(e.__traceback__)
            frames = [f for f in where if "liger_kernel" in f.filename] or where
            f0 = frames[0]
            out["error"] = (f"train(): {type(e).__name__}: {str(e).splitlines()[0][:300]} "
                            f"(first raised under {os.path.relpath(f0.filename, os.path.dirname(os.path.dirname(os.path.dirname(f0.filename))))}:"
                            f"{f0.lineno} {f0.name})")
            return out
        timed = probe.steps[a.warmup:]
        out["steps"] = probe.steps
        out["losses"] = probe.losses
        out["step_s"] = statistics.median(s["step_s"] for s in timed)
        out["fwd_bwd_s"] = statistics.median(s["fwd_bwd_s"] for s in timed)
        out["opt_s"] = statistics.median(s["opt_s"] for s in timed)
        peaks = [s["extra_peak"] for s in timed if s["extra_peak"] is not None]
        out["extra_peak"] = max(peaks) if peaks else None

        # the bodies alone on the first batch: the memory and time that are not the loss's
        model = trainer.model
        batch = collate([data[i] for i in range(a.batch)])
        inp = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        body = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            ok = _reset_peak()
            rss0 = _status_kb("VmRSS")
            t0 = time.perf_counter()
            with torch.no_grad():
                th = _hidden_states(teacher, inp)
            t1 = time.perf_counter()
            hs = _hidden_states(model, inp)
            hs.float().pow(2).mean().backward()
            t2 = time.perf_counter()
            hwm = _status_kb("VmHWM")
            body.append({"teacher_s": t1 - t0, "student_s": t2 - t1,
                         "peak": (hwm - rss0) * 1024 if ok and hwm and rss0 else None})
            del th, hs
            model.zero_grad(set_to_none=True)
        out["teacher_body_s"] = min(b["teacher_s"] for b in body)
        out["student_body_s"] = min(b["student_s"] for b in body)
        bp = [b["peak"] for b in body if b["peak"] is not None]
        out["body_peak"] = max(bp) if bp else None
    return out


def child_check(a) -> dict:
    """The loss (and the student's gradient) of every trainer on one batch."""
    import torch

    from fastdistill.hf.demo import collate

    teacher, tok, student = _setup(a, pinned=False)
    data = _data(tok, a.batch, a.seq_len)
    batch = collate([data[i] for i in range(a.batch)])
    n = batch["labels"][:, 1:].ne(-100).sum()
    res = {"n_tokens": int(n)}
    grads = {}
    with tempfile.TemporaryDirectory() as tmp:
        # GKDTrainer patches the student's forward (SFTTrainer's fused LM head): build it last
        for row in ("kdtrainer", "plain", "gkd"):
            try:
                tr = _trainer(row, student, teacher, tok, data, tmp, a)
            except Exception as e:  # noqa: BLE001
                res[row] = f"construction: {type(e).__name__}: {e}"
                continue
            student.zero_grad(set_to_none=True)
            loss = tr.compute_loss(tr.model, dict(batch), num_items_in_batch=n)
            loss.backward()
            res[row] = float(loss)
            grads[row] = student.get_output_embeddings().weight.grad.detach().clone()
            del tr, loss
    # an independent float64 reference on the same logits
    with torch.no_grad():
        total = 0.0
        for b in range(a.batch):  # one sequence at a time: float64 N×V is large
            kw = dict(input_ids=batch["input_ids"][b:b + 1],
                      attention_mask=batch["attention_mask"][b:b + 1])
            lt = teacher(**kw).logits[:, :-1].double().log_softmax(-1)
            ls = student(**kw).logits[:, :-1].double().log_softmax(-1)
            total += float((lt.exp() * (lt - ls)).sum())
            del lt, ls
        res["float64 reference"] = total / float(n)
    ref = grads.get("plain")
    for k, g in grads.items():
        if ref is not None and k != "plain":
            res[f"grad max rel diff {k} vs plain"] = float((g - ref).abs().max() / ref.abs().max())
    return res


# ------------------------------------------------------------------ parent

def regime() -> dict:
    import platform

    import torch

    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read().strip()
    except OSError:
        thp = "unknown"
    vers = {}
    for m in ("transformers", "accelerate", "trl", "liger_kernel", "datasets"):
        try:
            from importlib.metadata import version

            vers[m] = version(m.replace("_", "-"))
        except Exception:  # noqa: BLE001
            vers[m] = "not installed"
    return {"torch": torch.__version__, **vers, "python": platform.python_version(),
            "glibc": os.confstr("CS_GNU_LIBC_VERSION"), "THP enabled": thp,
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def _spawn(kind: str, a, pinned: bool) -> dict:
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--json", path,
           "--batch", str(a.batch), "--seq-len", str(a.seq_len), "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--threads", str(a.threads)] + (["--pinned"] if pinned else [])
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError):
        res = {"row": kind, "error": f"child exited {p.returncode}: "
                                     f"{(p.stderr or p.stdout).strip().splitlines()[-1:]}"}
    finally:
        os.unlink(path)
    res["child_s"] = time.perf_counter() - t0
    if p.returncode and "error" not in res:
        res["error"] = f"child exited {p.returncode}"
    print(f"  [{kind} {'pinned' if pinned else 'glibc'}] {time.perf_counter() - t0:.0f} s"
          + (f" ERROR {res['error']}" if "error" in res else ""), flush=True)
    return res


def _mb(x):
    return "-" if x is None else f"{x / MB:.0f}"


def table(timing: dict, memory: dict, a) -> str:
    peers = [r for r in ROWS if r != "kdtrainer" and "error" not in timing.get(r, {"error": 1})]
    fastest = min(peers, key=lambda r: timing[r]["step_s"]) if peers else None

    def loss_mem(r):
        m = memory.get(r, {})
        if m.get("extra_peak") is None or m.get("body_peak") is None:
            return None
        return m["extra_peak"] - m["body_peak"]

    lines = [f"N = {a.batch} × {a.seq_len} = {a.batch * a.seq_len} tokens per step, V = 49152, "
             f"forward KL T=1, fp32, {a.threads} threads; times: median of {a.steps} steps after "
             f"{a.warmup} warm-up (glibc default allocator); memory: pinned-malloc child; ratios "
             f"vs the fastest peer ({LABEL.get(fastest, '-')}).", "",
             "| trainer | steps/s | x vs fastest peer | step s (fwd+bwd / optim) | steps/s pinned "
             "| extra peak MB | bodies-only peak MB | loss-related MB | loss MB / fastest peer's "
             "| teacher body s | student body fwd+bwd s | heads+loss s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ROWS:
        if r not in timing:
            continue
        t, m = timing[r], memory.get(r, {})
        if "error" in t:
            lines.append(f"| {LABEL[r]} | error: `{t['error']}` |" + " |" * 10)
            continue
        ratio = timing[fastest]["step_s"] / t["step_s"] if fastest else None
        lm = loss_mem(r)
        flm = loss_mem(fastest) if fastest else None
        heads = t["fwd_bwd_s"] - t["teacher_body_s"] - t["student_body_s"]
        pin = f"{1 / m['step_s']:.4f}" if "step_s" in m else "-"
        lines.append(
            f"| {LABEL[r]} | {1 / t['step_s']:.4f} | {'-' if ratio is None else f'{ratio:.2f}'} "
            f"| {t['step_s']:.2f} ({t['fwd_bwd_s']:.2f} / {t['opt_s']:.2f}) | {pin} "
            f"| {_mb(m.get('extra_peak'))} | {_mb(m.get('body_peak'))} | {_mb(lm)} "
            f"| {'-' if lm is None or not flm else f'{lm / flm:.3f}'} "
            f"| {t['teacher_body_s']:.2f} | {t['student_body_s']:.2f} | {heads:.2f} |")
    losses = {r: timing[r].get("losses") for r in ROWS if "losses" in timing.get(r, {})}
    lines += ["", "Training loss per step (same init, data and optimizer in every row): "
              + "; ".join(f"{r}: " + ", ".join(f"{x:.4f}" for x in v) for r, v in losses.items())]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per row (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--pinned", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        res = child_check(a) if a.child == "check" else child_row(a.child, a, a.pinned)
        with open(a.json, "w") as f:
            json.dump(res, f)
        return
    rows = [r for r in a.rows.split(",") if r]
    for r in rows:
        if r not in ROWS:
            raise SystemExit(f"--rows: {r!r} is not one of {ROWS}")
    t0 = time.perf_counter()
    env = regime()
    print("allocator regime / versions:", json.dumps(env), flush=True)
    check = None
    if not a.no_check:
        print("loss check (one batch, num_items_in_batch = its label count):", flush=True)
        check = _spawn("check", a, pinned=False)
        print(json.dumps(check, indent=1), flush=True)
    timing, memory = {}, {}
    for r in rows:
        timing[r] = _spawn(r, a, pinned=False)
        memory[r] = timing[r] if "error" in timing[r] else _spawn(r, a, pinned=True)
    text = table(timing, memory, a)
    print(text)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write("regime: " + json.dumps(env) + "\n\ncheck: " + json.dumps(check) + "\n\n"
                + text + "\n\nraw: " + json.dumps({"timing": timing, "memory": memory}) + "\n")
    print(f"(total {time.perf_counter() - t0:.0f} s; written to {OUT})")


if __name__ == "__main__":
    main()
