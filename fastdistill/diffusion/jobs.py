"""The ``fastdistill diffusion`` job: a digit teacher (trained once, cached),
distilled to few-step students, each evaluated with the download-free digit
metrics next to the two baselines of the same run (the teacher at its full
DDIM step count, and the teacher with DDIM at the student's step count)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..dd.data import load_dataset
from ..dd.trainer import save_image_grid
from .distiller import METHODS, DiffusionDistiller
from .teacher import train_teacher

TEACHER_STEPS = 100  # the teacher's "full" DDIM step count
GUIDANCE = 1.0  # classifier-free guidance scale of the teacher (1: none; 2 trades recall for precision)


def _metrics(samples, labels, data_name, classifier):
    from .metrics import evaluate_samples

    m = evaluate_samples(samples, labels, data_name, classifier=classifier)
    return {k: m[k] for k in ("accuracy", "fd", "kid", "precision", "recall")}


def run(data: str = "digits", methods=METHODS, steps=(1, 4), *, out="diffusion_out",
        iterations: int | None = None, per_class: int = 100, guidance_scale: float = GUIDANCE,
        teacher_steps: int = TEACHER_STEPS, seed: int = 0, progress: bool = True,
        log=print) -> dict:
    """Distill, sample ``per_class`` digits of each class per model, evaluate,
    write ``out``/{results.json, <data>-samples.png}; returns the rows."""
    from .metrics import train_classifier

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = load_dataset(data)
    t0 = time.perf_counter()
    teacher = train_teacher(data, progress=progress)
    classifier = train_classifier(data, progress=progress)
    log(f"teacher and classifier ready ({time.perf_counter() - t0:.0f} s; cached after the "
        f"first run)")
    labels = torch.arange(images.num_classes).repeat_interleave(per_class)

    def noise():
        return teacher.noise_like(len(labels), torch.Generator().manual_seed(seed + 1))

    rows, grids = [], {}

    def add(name, n_steps, samples, seconds):
        row = {"model": name, "steps": n_steps, **_metrics(samples, labels, data, classifier),
               "train_s": seconds}
        rows.append(row)
        grids[name] = samples
        log(f"{name:34s} steps {n_steps:3d}  acc {row['accuracy']:.3f}  FD {row['fd']:8.3f}  "
            f"KID {row['kid']:.4f}  P {row['precision']:.2f}  R {row['recall']:.2f}")

    add(f"teacher DDIM {teacher_steps}", teacher_steps,
        teacher.sample_ddim(labels, teacher_steps, guidance_scale=guidance_scale, noise=noise()),
        None)
    for s in sorted(set(steps)):
        add(f"teacher DDIM {s}", s,
            teacher.sample_ddim(labels, s, guidance_scale=guidance_scale, noise=noise()), None)
    for method in methods:
        for s in steps:
            t1 = time.perf_counter()
            d = DiffusionDistiller(method, teacher, steps=s, iterations=iterations,
                                   guidance_scale=guidance_scale, seed=seed,
                                   checkpoint=out / f"{data}-{method}-{s}step.ckpt",
                                   progress=progress)
            d.fit(images)
            seconds = time.perf_counter() - t1
            add(f"{method} student", s,
                d.sample(labels, generator=torch.Generator().manual_seed(seed + 1)), seconds)
    shown = torch.cat([g.view(images.num_classes, per_class, *g.shape[1:])[:, :1]
                       .reshape(-1, *g.shape[1:]) for g in grids.values()])
    save_image_grid(shown, out / f"{data}-samples.png", nrow=images.num_classes,
                    denormalize=images.denormalize)
    (out / "results.json").write_text(json.dumps({"data": data, "rows": rows,
                                                  "guidance_scale": guidance_scale}, indent=1))
    log(f"written: {out / 'results.json'}, {out / (data + '-samples.png')} (one row per model, "
        f"in the order above)")
    return {"rows": rows}
