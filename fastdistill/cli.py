"""The ``fastdistill`` console script: doctor, build, bench, dd, kd, label, kd-demo, diffusion."""
from __future__ import annotations

import argparse
import platform
import shutil
import sys


def doctor(_args) -> int:
    import torch

    from . import __version__, _backend

    print(f"fastdistill {__version__}")
    print(f"python      {platform.python_version()} ({sys.executable})")
    print(f"torch       {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
          f"threads: {torch.get_num_threads()})")
    print(f"cpu         {platform.machine()}, vector capability {_backend.cpu_capability()}")
    try:
        import triton

        print(f"triton      {triton.__version__}")
    except ImportError:
        print("triton      not installed")
    print(f"nvcc        {shutil.which('nvcc') or 'not found'}")
    print(f"ninja       {shutil.which('ninja') or 'not found (the cpp backend needs it: pip install ninja)'}")
    try:
        print(f"sources     {_backend.csrc_dir()}")
        print(f"cache       {_backend.cache_dir()}")
    except FileNotFoundError as exc:
        print(f"sources     {exc}")
    print(f"cflags      {' '.join(_backend.compile_flags())}")
    print("backends:")
    for name, (ok, why) in _backend.backend_status().items():
        print(f"  {name:7s} {'yes' if ok else 'no ':3s}  {why}")
    return 0


def build(args) -> int:
    """Build (or find in the cache) the C++ extension; non-zero exit if it fails."""
    from . import _backend

    ok = _backend.load_extension(verbose=args.verbose)
    print(f"cpp backend: {'ready' if ok else 'UNAVAILABLE'} ({_backend._state.get('cpp_reason')})")
    return 0 if ok else 1


def bench(args) -> int:
    if args.device == "cuda" or args.interpret:
        return bench_device(args)
    from . import bench as report

    report.run(quick=args.quick, out_dir=args.out, divergences=args.divergence,
               cases_to_run=args.case or (report.QUICK_CASES if args.quick else report.CASES),
               malloc=args.malloc)
    return 0


def bench_device(args) -> int:
    """The device report (fastdistill.bench_device): 1 when any fastdistill row is
    wrong or crashed, 2 when it cannot run here at all."""
    import os

    if args.quick:
        print("error: --quick sizes the CPU report; the device report has one size per device",
              file=sys.stderr)
        return 2
    if args.interpret:
        if args.device != "cpu":
            print("error: --interpret runs the triton kernels on CPU tensors: use it with "
                  "--device cpu", file=sys.stderr)
            return 2
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("error: --interpret needs TRITON_INTERPRET=1 before triton is imported, and "
                  "triton is imported already: run it in a fresh process", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels' modules are imported
    from . import bench_device as report

    try:
        _, failures = report.run(args.device, interpret=args.interpret, out_dir=args.out,
                                 cases=args.case or report.DEVICE_CASES,
                                 divergences=args.divergence)
    except report.DeviceUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if failures else 0


def dd(args) -> int:
    """Distill a data set, evaluate it (DC protocol) next to a random real subset
    of the same IPC, save the synthetic set (.pt) and a PNG grid."""
    import json
    from pathlib import Path

    import torch

    from .dd.data import load_dataset
    from .dd.trainer import DatasetDistiller, save_image_grid

    data = load_dataset(args.data)
    real = (data.train_images, data.train_labels)
    test = (data.test_images, data.test_labels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.data}-{args.method}-ipc{args.ipc}"
    dist = DatasetDistiller(args.method, args.ipc, iterations=args.iterations,
                            batch_real=args.batch_real, width=args.width, seed=args.seed,
                            checkpoint=out / f"{tag}.ckpt", progress=not args.quiet)
    images, labels = dist.fit(real)
    torch.save({"images": images, "labels": labels, "mean": data.mean, "std": data.std},
               out / f"{tag}.pt")
    save_image_grid(images, out / f"{tag}.png", nrow=args.ipc if args.ipc > 1 else 10,
                    denormalize=data.denormalize)
    res = dist.evaluate(images, labels, test, n_models=args.n_models, epochs=args.eval_epochs)
    base = dist.evaluate(*dist.random_real_subset(real), test, n_models=args.n_models,
                         epochs=args.eval_epochs)
    print(f"{args.data} {args.method} IPC {args.ipc}: {res['mean']:.2f} ± {res['std']:.2f} % "
          f"(random real subset: {base['mean']:.2f} ± {base['std']:.2f} %), "
          f"{args.n_models} models, {len(data.test_labels)} test images")
    (out / f"{tag}.json").write_text(json.dumps({"distilled": res, "random_real": base,
                                                 "settings": dist.settings()}, indent=1))
    print(f"written: {out / (tag + '.pt')}, {out / (tag + '.png')}, {out / (tag + '.json')}")
    return 0


def _weights(text):
    return None if text is None else [float(x) for x in text.split(",")]


def kd(args) -> int:
    """Distil --teacher into --student with KDTrainer; held-out CE and KL before/after."""
    from .hf import jobs

    r = jobs.kd(teacher=args.teacher, student=args.student, data=args.data, out=args.out,
                max_steps=args.max_steps, divergence=args.divergence,
                temperature=args.temperature, batch=args.batch, seq_len=args.seq_len,
                sequences=args.sequences, held_out=args.held_out,
                learning_rate=args.learning_rate, soft_labels=args.soft_labels,
                resume=args.resume, teacher_weights=_weights(args.teacher_weights),
                save_steps=args.save_steps, disable_tqdm=args.quiet)
    b, a = r["before"], r["after"]
    print(f"held-out CE {b['ce']:.3f} -> {a['ce']:.3f}, KL to the teacher {b['kl']:.3f} -> "
          f"{a['kl']:.3f} (nats per token); the student is in {args.out}"
          + (f" (resumed from {r['resumed_from']})" if r["resumed_from"] else ""))
    return 0


def label(args) -> int:
    """Fill a soft-label store from a teacher (resumable)."""
    from .hf import jobs

    n = jobs.label(teacher=args.teacher, data=args.data, out=args.out, k=args.k,
                   value_bits=args.value_bits, temperature=args.temperature,
                   sequences=args.sequences, seq_len=args.seq_len, batch=args.batch,
                   teacher_weights=_weights(args.teacher_weights), progress=not args.quiet)
    print(f"{n} sequences labelled into {args.out}")
    return 0


def kd_demo(args) -> int:
    """The main job: SmolLM2-135M into a small Llama, next to a hard-label student."""
    from .hf import demo

    demo.run(steps=args.steps)
    return 0


def diffusion(args) -> int:
    """Distill the digit teacher into few-step students; metrics next to the teacher's."""
    from .diffusion import jobs

    methods = args.method or list(jobs.METHODS)
    jobs.run(args.data, methods, args.steps or [1, 4], out=args.out, iterations=args.iterations,
             per_class=args.per_class, guidance_scale=args.guidance_scale,
             teacher_steps=args.teacher_steps, seed=args.seed, progress=not args.quiet)
    return 0


def _text_job_options(p, sequences: int, seq_len: int) -> None:
    p.add_argument("--teacher", default="smollm2",
                   help="'smollm2' (packaged) or a local HF model folder; several, comma-separated, "
                        "make a mixture")
    p.add_argument("--teacher-weights", help="mixture weights, comma-separated (default uniform)")
    p.add_argument("--data", default="kjv", help="'kjv' (packaged) or a UTF-8 text file")
    p.add_argument("--sequences", type=int, default=sequences, help="token windows to use")
    p.add_argument("--seq-len", type=int, default=seq_len, help="tokens per window")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastdistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="what backends are available here, and why not")
    p.set_defaults(func=doctor)
    p = sub.add_parser("build", help="build the C++ extension now (it is cached)")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=build)
    p = sub.add_parser("bench", help="side-by-side timings against the reference and torch.compile")
    p.add_argument("--quick", action="store_true", help="small shapes (the demo); under 3 minutes")
    p.add_argument("--out", default="bench/out", help="folder for the table, JSON and PNG chart")
    p.add_argument("--divergence", action="append", help="limit the full run to these (repeatable)")
    p.add_argument("--case", action="append", choices=("kd", "fused_linear", "sparse", "softlabels", "ot", "dd", "diffusion"),
                   help="run only these cases (repeatable; default: all; --quick never runs ot)")
    p.add_argument("--malloc", default="pinned", choices=("pinned", "glibc"),
                   help="pinned: glibc returns every freed buffer over 128 KiB to the OS, so "
                        "each allocation is fresh memory and shows in the extra-peak column; "
                        "glibc: the allocator as a normal process has it (no memory column); "
                        "CPU report only")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cuda: the device report (triton kernels next to the reference, "
                        "torch.compile and Liger/POT/GeomLoss, each row checked against the "
                        "float32 reference; exit 1 if a fastdistill row is wrong); "
                        "cpu (default): the CPU report")
    p.add_argument("--interpret", action="store_true",
                   help="with --device cpu: the device report on CPU tensors through "
                        "TRITON_INTERPRET=1 at tiny shapes (the code path and the checks; "
                        "the times mean nothing)")
    p.set_defaults(func=bench)
    p = sub.add_parser("dd", help="dataset distillation on offline data, evaluated against a "
                                  "random real subset")
    p.add_argument("--data", default="mnist", choices=("mnist", "fashion-mnist", "digits"))
    p.add_argument("--method", default="dc", choices=("dc", "dsa", "dm", "datadam", "mtt"))
    p.add_argument("--ipc", type=int, default=10, help="synthetic images per class")
    p.add_argument("--iterations", type=int, default=1000,
                   help="outer iterations (default 1000, the papers'; slow on a CPU: at IPC 10 "
                        "DC takes ~200 s per iteration on MNIST on 2 cores, ~2.3 days in all; "
                        "--iterations 30 --batch-real 64 --width 32 runs in minutes)")
    p.add_argument("--batch-real", type=int, default=256, help="real images per class per step")
    p.add_argument("--width", type=int, default=128, help="ConvNet width")
    p.add_argument("--n-models", type=int, default=5, help="networks trained in the evaluation")
    p.add_argument("--eval-epochs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="dd_out", help="folder for the set, the PNG grid, the checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=dd)
    p = sub.add_parser("kd", help="distil a causal LM with KDTrainer (HF Trainer), resumable")
    _text_job_options(p, 512, 128)
    p.add_argument("--student", default="small",
                   help="'small' (a ~15 M-parameter Llama), a local model folder or a config.json")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--divergence", default="forward_kl")
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--held-out", type=int, default=32, help="held-out windows (last tenth of the text)")
    p.add_argument("--soft-labels", help="train from this soft-label store (see `label`)")
    p.add_argument("--save-steps", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--out", default="kd_out")
    p.set_defaults(func=kd)
    p = sub.add_parser("label", help="fill a soft-label store from a teacher, resumable")
    _text_job_options(p, 512, 128)
    p.add_argument("--k", type=int, default=32, help="top-k ids per token")
    p.add_argument("--value-bits", type=int, default=8, choices=(8, 16))
    p.add_argument("--out", required=True, help="the store's directory")
    p.set_defaults(func=label)
    p = sub.add_parser("kd-demo", help="the main job: distil SmolLM2-135M next to a hard-label "
                                       "student, held-out CE and KL")
    p.add_argument("--steps", type=int, default=60)
    p.set_defaults(func=kd_demo)
    p = sub.add_parser("diffusion", help="distil a digit diffusion model into 1-4 step students "
                                         "(dmd2, consistency, progressive), evaluated")
    p.add_argument("--data", default="digits", choices=("digits", "mnist"))
    p.add_argument("--method", action="append", choices=("dmd2", "consistency", "progressive"),
                   help="repeatable; default: all three")
    p.add_argument("--steps", type=int, action="append", choices=(1, 2, 4),
                   help="student step counts, repeatable; default: 1 and 4")
    p.add_argument("--iterations", type=int, help="distillation iterations (default: per method)")
    p.add_argument("--per-class", type=int, default=100, help="samples per class evaluated")
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--teacher-steps", type=int, default=100, help="the teacher's full DDIM steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="diffusion_out", help="folder for results, PNG grid, checkpoints")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=diffusion)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
