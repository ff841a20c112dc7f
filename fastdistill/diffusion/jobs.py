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
from .._backend import ENV_CACHE
from .teacher import train_teacher
from .training import cache_dir, positive_int

TEACHER_STEPS = 100  # the teacher's "full" DDIM step count
TEACHER_ITERATIONS = 4000  # the teacher's training steps (train_teacher's default)
GUIDANCE = 1.0  # classifier-free guidance scale of the teacher (1: none; 2 trades recall for precision)


# What the columns of the table mean: printed under it, saved in results.json.
LEGEND = (
    "acc: the fraction of the samples the digit classifier assigns to the class they were "
    "generated for (higher is better).",
    "FD: the Fréchet distance between Gaussian fits of the classifier's penultimate features of "
    "the samples and of the real held-out digits (FID's formula on this small classifier, not "
    "comparable with Inception FIDs; lower is better, 0 for identical statistics).",
    "KID: the kernel inception distance on the same features, an unbiased estimate of the "
    "squared MMD (lower is better): its expected value is 0 when the two sets come from the "
    "same distribution, so a value near 0, even slightly negative, means the samples cannot be "
    "told from real digits at this sample size (results.json has its spread, kid_std).",
    "P / R: k-NN precision (the share of samples that fall in the real digits' feature "
    "manifold: fidelity) and recall (the share of real digits that fall in the samples' "
    "manifold: diversity), higher is better.",
)


def _metrics(samples, labels, data_name, classifier):
    from .metrics import evaluate_samples

    m = evaluate_samples(samples, labels, data_name, classifier=classifier)
    return {k: m[k] for k in ("accuracy", "fd", "kid", "kid_std", "precision", "recall")}


def _row_label(row: dict) -> str:
    """"teacher, DDIM 4 steps" / "dmd2 student, 1 step": a row of the PNG grid."""
    n = f"{row['steps']} step{'' if row['steps'] == 1 else 's'}"
    return f"teacher, DDIM {n}" if row["model"].startswith("teacher DDIM") else f"{row['model']}, {n}"


def _cached(what: str, path, from_cache: bool) -> str:
    if path is None:
        return f"{what}: not cached"
    return f"{what}: {'loaded from' if from_cache else 'trained now, cached at'} {path}"


def run(data: str = "digits", methods=METHODS, steps=(1, 4), *, out="diffusion_out",
        iterations: int | None = None, per_class: int = 100, guidance_scale: float = GUIDANCE,
        teacher_steps: int = TEACHER_STEPS, teacher_iterations: int = TEACHER_ITERATIONS,
        seed: int = 0, progress: bool = True, log=print) -> dict:
    """Distill, sample ``per_class`` digits of each class per model, evaluate,
    write ``out``/{results.json, <data>-samples.png}; returns the rows.
    ``teacher_iterations``: the teacher's training steps (a teacher of each
    count is cached on its own; fewer make a short run, and a worse teacher)."""
    from .metrics import _cache_path, train_classifier

    teacher_iterations = positive_int("teacher_iterations", teacher_iterations)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = load_dataset(data)
    t0 = time.perf_counter()
    teacher = train_teacher(data, iterations=teacher_iterations, progress=progress)
    classifier = train_classifier(data, progress=progress)
    log(f"teacher ({teacher_iterations} training steps) and digit classifier ready "
        f"({time.perf_counter() - t0:.0f} s); kept under {cache_dir()} "
        f"(${ENV_CACHE} moves the cache root), so a later run loads them:")
    log("  " + _cached("teacher", getattr(teacher, "checkpoint_path", None),
                       getattr(teacher, "from_cache", False)))
    log("  " + _cached("digit classifier", _cache_path(data, 0, None),
                       getattr(classifier, "from_cache", False)))
    tag = "" if teacher_iterations == TEACHER_ITERATIONS else f"-teacher{teacher_iterations}"
    log(f"  students: {out / f'{data}-<method>-<steps>step{tag}.ckpt'} (a rerun with the same "
        f"settings resumes or loads them; delete them to distil again)")
    labels = torch.arange(images.num_classes).repeat_interleave(per_class)

    def noise():
        return teacher.noise_like(len(labels), torch.Generator().manual_seed(seed + 1))

    rows, grids = [], []  # grids: each row's samples (a method has one row per step count)

    def add(name, n_steps, samples, seconds):
        row = {"model": name, "steps": n_steps, **_metrics(samples, labels, data, classifier),
               "train_s": seconds}
        rows.append(row)
        grids.append(samples)
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
                                   checkpoint=out / f"{data}-{method}-{s}step{tag}.ckpt",
                                   progress=progress)
            d.fit(images)
            seconds = time.perf_counter() - t1
            add(f"{method} student", s,
                d.sample(labels, generator=torch.Generator().manual_seed(seed + 1)), seconds)
    log("columns:")
    for line in LEGEND:
        log("  " + line)
    shown = torch.cat([g.view(images.num_classes, per_class, *g.shape[1:])[:, :1]
                       .reshape(-1, *g.shape[1:]) for g in grids])
    save_image_grid(shown, out / f"{data}-samples.png", nrow=images.num_classes,
                    denormalize=images.denormalize,
                    row_labels=[_row_label(r) for r in rows],
                    col_labels=[str(c) for c in range(images.num_classes)],
                    title=f"{data}: one sample per class (columns) of each model (rows)")
    (out / "results.json").write_text(json.dumps({"data": data, "rows": rows,
                                                  "guidance_scale": guidance_scale,
                                                  "teacher_iterations": teacher_iterations,
                                                  "legend": list(LEGEND)}, indent=1))
    log(f"written: {out / 'results.json'}, {out / (data + '-samples.png')} (one row per model, "
        f"in the order above, labelled)")
    return {"rows": rows}
