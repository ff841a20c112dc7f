"""The ``fastdistill`` console script: doctor, build, bench, dd, kd, label, kd-demo, diffusion."""
from __future__ import annotations

import argparse
import math
import os
import platform
import re
import shutil
import sys

# Light: the package is imported already (this is fastdistill.cli); torch is, transformers is not.
from .diffusion.distiller import DEFAULT_ITERATIONS as DIFFUSION_ITERATIONS
from .diffusion.distiller import METHODS as DIFFUSION_METHODS
from .diffusion.distiller import STEPS as DIFFUSION_STEPS
from .diffusion.teacher import train_teacher as _train_teacher
from .kd import DIVERGENCES, TEMPERATURE_RANGE

# the timesteps of the teacher `fastdistill diffusion` trains (train_teacher's num_steps)
TEACHER_SCHEDULE_STEPS = __import__("inspect").signature(_train_teacher).parameters["num_steps"].default


# ----------------------------------------------------------- argument types
# Every flag is checked by argparse (a one-line "fastdistill <command>: error:
# argument --flag: ..." and exit 2) before anything is loaded; checks that
# need several flags or the file system run in _CHECKS, also before loading.

def int_at_least(low: int, high: int | None = None):
    """argparse type: an int >= ``low`` (and <= ``high``, if given)."""
    want = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {want}, got {value}")
        return value

    parse.valid = want
    parse.__name__ = "integer"  # what argparse names in "invalid <type> value"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def float_in(low: float, high: float = math.inf, *, low_open: bool = False):
    """argparse type: a finite float in [low, high] ((low, high] with low_open)."""
    lo = "(" if low_open else "["
    hi = "]" if math.isfinite(high) else ")"
    interval = f"{lo}{low:g}, {high:g}{hi}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}") from None
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text}")
        return value

    parse.valid = f"a number in {interval}"
    parse.__name__ = "number"
    return parse


temperature_type = float_in(*TEMPERATURE_RANGE)  # the losses' own range
positive_float = float_in(0.0, low_open=True)


def weights_type(text: str) -> list[float]:
    """argparse type: comma-separated non-negative numbers, not all 0."""
    try:
        w = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise argparse.ArgumentTypeError(f"expected non-negative numbers, not all 0, got {text!r}")
    return w


weights_type.valid = "comma-separated non-negative numbers, one per teacher"


def _local_model(part: str, packaged: str) -> None:
    if part == packaged:
        return
    if not os.path.isdir(part):
        raise argparse.ArgumentTypeError(f"{part!r} is not {packaged!r} and no such folder")
    if not os.path.isfile(os.path.join(part, "config.json")):
        raise argparse.ArgumentTypeError(f"{part!r} is not a Hugging Face model folder "
                                         "(no config.json in it)")


def teacher_type(text: str) -> str:
    """argparse type: 'smollm2' or local model folders, comma-separated."""
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"an empty name in {text!r}")
    for part in parts:
        _local_model(part, "smollm2")
    return ",".join(parts)


teacher_type.valid = "'smollm2' or existing model folders"


def student_type(text: str) -> str:
    """argparse type: 'small', a local model folder or a config.json."""
    if text.endswith(".json"):
        if not os.path.isfile(text):
            raise argparse.ArgumentTypeError(f"student config {text!r}: no such file")
        return text
    _local_model(text, "small")
    return text


student_type.valid = "'small', an existing model folder or a config .json"


def data_type(text: str) -> str:
    """argparse type: 'kjv' or an existing text file."""
    if text != "kjv" and not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not 'kjv' and no such file")
    return text


data_type.valid = "'kjv' or an existing UTF-8 text file"


def store_type(text: str) -> str:
    """argparse type: an existing soft-label store folder."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r}: no such folder (fill it with "
                                         "`fastdistill label --out ...` first)")
    return text


store_type.valid = "a folder filled by `fastdistill label`"


def out_type(text: str) -> str:
    """argparse type: an output folder (created once every check passed)."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    return text


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def last_checkpoint(out: str) -> str | None:
    """The ``checkpoint-N`` folder of highest N in ``out`` (HF's naming), or None."""
    if not os.path.isdir(out):
        return None
    steps = [int(m.group(1)) for n in os.listdir(out)
             if (m := _CHECKPOINT.match(n)) and os.path.isdir(os.path.join(out, n))]
    return os.path.join(out, f"checkpoint-{max(steps)}") if steps else None


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help, then its valid values (from its type) and its default
    (unless the help text names it already, or there is none to show)."""

    def _get_help_string(self, action):
        text = action.help or ""
        valid = getattr(action.type, "valid", None)
        if valid and valid not in text:
            text += f" ({valid})"
        if ("default" in text or any(action.default is x for x in (None, False, argparse.SUPPRESS))
                or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def _check_text_job(args, p) -> None:
    n = len(args.teacher.split(","))
    if args.teacher_weights is not None and n == 1:
        p.error(f"argument --teacher-weights: weights a mixture of several teachers; --teacher "
                f"{args.teacher} is one")
    if args.teacher_weights is not None and len(args.teacher_weights) != n:
        p.error(f"argument --teacher-weights: {len(args.teacher_weights)} weights for {n} "
                f"teachers (--teacher {args.teacher})")


def _check_kd(args, p) -> None:
    _check_text_job(args, p)
    if args.resume and last_checkpoint(args.out) is None:
        p.error(f"argument --resume: no checkpoint (checkpoint-N folder) in {args.out}: nothing "
                "to resume; run without --resume to start fresh")


def _check_bench(args, p) -> None:
    device_report = args.device == "cuda" or args.interpret
    if args.divergence:
        cases = args.case or ("kd",)
        if "kd" not in cases:
            p.error("argument --divergence: it limits the kd case, which --case "
                    f"{' '.join(args.case)} does not run")
        if args.quick and not device_report:
            p.error("argument --divergence: --quick runs fixed kd rows (forward_kl and jsd at "
                    "float32, forward_kl at bfloat16); --divergence limits the full run")


_CHECKS = {"kd": _check_kd, "label": _check_text_job, "bench": _check_bench}


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

    if args.divergence:  # the device report's kd rows are its plan's, not every divergence
        plan = report.INTERPRET_PLAN if args.interpret else report.GPU_PLAN
        known = tuple(dict.fromkeys(div for _, div, _ in plan.kd_configs))
        unknown = [d for d in args.divergence if d not in known]
        if unknown:
            args.parser.error(f"argument --divergence: the device report's kd rows are "
                              f"{', '.join(known)}; got {', '.join(unknown)}")
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
    from .dd.trainer import DatasetDistiller, save_class_grid

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
    save_class_grid(images, labels, out / f"{tag}.png", denormalize=data.denormalize,
                    title=f"{args.data} {args.method} IPC {args.ipc}, {args.iterations} iterations")
    res = dist.evaluate(images, labels, test, n_models=args.n_models, epochs=args.eval_epochs)
    base = dist.evaluate_random_real(real, test, n_models=args.n_models, epochs=args.eval_epochs)
    print(f"{args.data} {args.method} IPC {args.ipc}: {res['mean']:.2f} ± {res['std']:.2f} % "
          f"(random real subset: {base['mean']:.2f} ± {base['std']:.2f} %), "
          f"{args.n_models} models, {len(data.test_labels)} test images")
    (out / f"{tag}.json").write_text(json.dumps({"distilled": res, "random_real": base,
                                                 "settings": dist.settings()}, indent=1))
    for warning in dist.run_warnings(res, base):
        print(warning)
    print(f"written: {out / (tag + '.pt')}, {out / (tag + '.png')}, {out / (tag + '.json')}")
    return 0


def kd(args) -> int:
    """Distil --teacher into --student with KDTrainer; held-out CE and KL before/after."""
    from .hf import jobs

    try:
        r = jobs.kd(teacher=args.teacher, student=args.student, data=args.data, out=args.out,
                    max_steps=args.max_steps, divergence=args.divergence,
                    temperature=args.temperature, batch=args.batch, seq_len=args.seq_len,
                    sequences=args.sequences, held_out=args.held_out,
                    learning_rate=args.learning_rate, soft_labels=args.soft_labels,
                    resume=args.resume, teacher_weights=args.teacher_weights,
                    save_steps=args.save_steps, quiet=args.quiet)
    except jobs.SettingsError as e:  # the options against the store or the checkpoints
        args.parser.error(str(e))
    if not _is_rank_zero():
        return 0
    if r["already_done"]:
        print(f"already at max-steps: {r['resumed_from']} is step {r['global_step']} and "
              f"--max-steps is {args.max_steps}; nothing to train (raise --max-steps to go on)")
        return 0
    b, a = r["before"], r["after"]
    print(f"held-out CE {b['ce']:.3f} -> {a['ce']:.3f}, KL to the teacher {b['kl']:.3f} -> "
          f"{a['kl']:.3f} (nats per token); the student is in {args.out}"
          + (f" (resumed from {r['resumed_from']}; now at step {r['global_step']})"
             if r["resumed_from"] else ""))
    return 0


def label(args) -> int:
    """Fill a soft-label store from a teacher (resumable; under torchrun, every rank
    labels a share and rank 0 prints the summary)."""
    from .hf import jobs

    try:
        r = jobs.label(teacher=args.teacher, data=args.data, out=args.out, k=args.k,
                       value_bits=args.value_bits, temperature=args.temperature,
                       sequences=args.sequences, seq_len=args.seq_len, batch=args.batch,
                       teacher_weights=args.teacher_weights, progress=not args.quiet)
    except jobs.SettingsError as e:  # a rerun with other options than the store's
        args.parser.error(str(e))
    if _is_rank_zero():
        print(f"{r['stored_before']} already stored, {r['labelled']} labelled now: "
              f"{r['stored_before'] + r['labelled']} of {args.sequences} sequences in {args.out}")
    return 0


def kd_demo(args) -> int:
    """The main job: SmolLM2-135M into a small Llama; hard labels, online KD and
    offline KD over several seeds, held-out CE and bits per byte, a verdict, a PNG."""
    from .hf import demo

    demo.run(seeds=args.seeds, epochs=args.epochs, n_train=args.train_windows,
             out_dir=args.out, progress=not args.quiet)
    return 0


def diffusion(args) -> int:
    """Distill the digit teacher into few-step students; metrics next to the teacher's."""
    from .diffusion import jobs

    methods = args.method or list(jobs.METHODS)
    jobs.run(args.data, methods, args.steps or [1, 4], out=args.out, iterations=args.iterations,
             per_class=args.per_class, guidance_scale=args.guidance_scale,
             teacher_steps=args.teacher_steps, teacher_iterations=args.teacher_iterations,
             seed=args.seed, progress=not args.quiet)
    return 0


def _text_job_options(p, sequences: int, seq_len: int) -> None:
    p.add_argument("--teacher", default="smollm2", type=teacher_type,
                   help="'smollm2' (packaged SmolLM2-135M-Instruct) or a local HF model folder; "
                        "several, comma-separated, make a mixture")
    p.add_argument("--teacher-weights", type=weights_type,
                   help="the mixture's weights, comma-separated, one per --teacher "
                        "(default: uniform)")
    p.add_argument("--data", default="kjv", type=data_type,
                   help="'kjv' (the packaged King James Bible) or a UTF-8 text file, one passage "
                        "a line")
    p.add_argument("--sequences", type=positive_int, default=sequences,
                   help="token windows to use (the windows depend on this count)")
    p.add_argument("--seq-len", type=int_at_least(2), default=seq_len, help="tokens per window")
    p.add_argument("--batch", type=positive_int, default=8, help="windows per batch")
    p.add_argument("--temperature", type=temperature_type, default=1.0,
                   help="distillation temperature T")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (model loading, training) and no per-step logs")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastdistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="what backends are available here, and why not")
    p.set_defaults(func=doctor)
    p = sub.add_parser("build", help="build the C++ extension now (it is cached)")
    p.add_argument("--verbose", action="store_true", help="print the compiler's commands and output")
    p.set_defaults(func=build)
    p = sub.add_parser("bench", help="side-by-side timings against the reference and torch.compile")
    p.add_argument("--quick", action="store_true", help="small shapes (the demo); under 3 minutes")
    p.add_argument("--out", default="bench/out", type=out_type,
                   help="folder for the table, JSON and PNG chart")
    p.add_argument("--divergence", action="append", choices=DIVERGENCES,
                   help="limit the kd case of the full run to these (repeatable; default: all; "
                        "the device report knows forward_kl and jsd; refused with --quick, whose "
                        "kd rows are fixed)")
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
    p.add_argument("--data", default="mnist", choices=("mnist", "fashion-mnist", "digits"),
                   help="the data set (offline, from installed packages)")
    p.add_argument("--method", default="dc", choices=("dc", "dsa", "dm", "datadam", "mtt"),
                   help="gradient matching (dc), with siamese augmentation (dsa), distribution "
                        "matching (dm), attention matching (datadam), trajectory matching (mtt)")
    p.add_argument("--ipc", type=positive_int, default=10, help="synthetic images per class")
    p.add_argument("--iterations", type=non_negative_int, default=1000,
                   help="outer iterations (default 1000, the papers'; slow on a CPU: at IPC 10 "
                        "DC takes ~200 s per iteration on MNIST on 2 cores, ~2.3 days in all; "
                        "--iterations 30 --batch-real 64 --width 32 runs in minutes)")
    p.add_argument("--batch-real", type=positive_int, default=256,
                   help="real images per class per step")
    p.add_argument("--width", type=positive_int, default=128, help="ConvNet width")
    p.add_argument("--n-models", type=positive_int, default=5,
                   help="networks trained in the evaluation (default 5, the DC protocol); the "
                        "evaluation runs twice, on the distilled set and on the random real "
                        "baseline, and at short --iterations takes most of the run's time")
    p.add_argument("--eval-epochs", type=positive_int, default=300,
                   help="training epochs of each evaluated network (default 300, the DC protocol; "
                        "--n-models 1 --eval-epochs 50 gives a quick, rougher estimate)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed")
    p.add_argument("--out", default="dd_out", type=out_type,
                   help="folder for the set, the PNG grid, the checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=dd)
    p = sub.add_parser("kd", help="distil a causal LM with KDTrainer (HF Trainer), resumable")
    _text_job_options(p, 512, 128)
    p.add_argument("--student", default="small", type=student_type,
                   help="'small' (a ~15 M-parameter Llama), a local model folder or a config.json "
                        "(a fresh model of that config)")
    p.add_argument("--max-steps", type=positive_int, default=100, help="optimizer steps in all")
    p.add_argument("--divergence", default="forward_kl", choices=DIVERGENCES,
                   help="the KD divergence")
    p.add_argument("--learning-rate", type=positive_float, default=3e-3,
                   help="peak learning rate (cosine schedule)")
    p.add_argument("--held-out", type=positive_int, default=32,
                   help="held-out windows (from the last tenth of the text)")
    p.add_argument("--soft-labels", type=store_type,
                   help="train from this soft-label store instead of the online teacher; it "
                        "must be filled by `fastdistill label` with the same --teacher, --data, "
                        "--sequences, --seq-len and --temperature (checked at start; default: "
                        "none, the teacher runs online)")
    p.add_argument("--save-steps", type=positive_int, default=50,
                   help="a checkpoint (checkpoint-N in --out) every this many steps")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint-N in --out (an error if there is none; "
                        "a run at --max-steps already says so and trains nothing)")
    p.add_argument("--out", default="kd_out", type=out_type,
                   help="folder for the checkpoints and the final student")
    p.set_defaults(func=kd)
    p = sub.add_parser("label", help="fill a soft-label store from a teacher, resumable")
    _text_job_options(p, 512, 128)
    p.add_argument("--k", type=positive_int, default=32, help="top-k ids per token")
    p.add_argument("--value-bits", type=int, default=8, choices=(8, 16),
                   help="bits per stored log-probability")
    p.add_argument("--out", required=True, type=out_type,
                   help="the store's folder; a rerun into it resumes (with the same options only)")
    p.set_defaults(func=label)
    p = sub.add_parser("kd-demo", help="the main job: SmolLM2-135M distilled into a small Llama "
                                       "on a small fixed training set (hard labels, online KD, "
                                       "offline KD from a store; several seeds)")
    p.add_argument("--seeds", type=positive_int, default=3,
                   help="seeds per student (initialization and data order)")
    p.add_argument("--epochs", type=positive_int, default=6,
                   help="passes over the training windows")
    p.add_argument("--train-windows", type=positive_int, default=32,
                   help="training windows of 64 tokens (the small fixed training set)")
    p.add_argument("--out", default="kd_demo_out", type=out_type,
                   help="folder for the held-out curves' PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bars: a line per run")
    p.set_defaults(func=kd_demo)
    p = sub.add_parser("diffusion", help="distil a digit diffusion model into 1-4 step students "
                                         "(dmd2, consistency, progressive), evaluated")
    p.add_argument("--data", default="digits", choices=("digits", "mnist"),
                   help="the digits (offline, from installed packages)")
    p.add_argument("--method", action="append", choices=DIFFUSION_METHODS,
                   help="distillation method, repeatable (default: all three)")
    p.add_argument("--steps", type=int, action="append", choices=DIFFUSION_STEPS,
                   help="student step counts, repeatable (default: 1 and 4)")
    p.add_argument("--iterations", type=positive_int,
                   help="distillation iterations (default: per method, "
                        + ", ".join(f"{m} {n}" for m, n in DIFFUSION_ITERATIONS.items()) + ")")
    p.add_argument("--per-class", type=positive_int, default=100,
                   help="samples per class evaluated")
    p.add_argument("--guidance-scale", type=float_in(0.0), default=1.0,
                   help="classifier-free guidance scale of the teacher (1: none)")
    p.add_argument("--teacher-steps", type=int_at_least(1, TEACHER_SCHEDULE_STEPS), default=100,
                   help="the teacher's full DDIM steps")
    p.add_argument("--teacher-iterations", type=positive_int, default=4000,
                   help="the teacher's training steps (default 4000; each count is cached on its "
                        "own, so only the first run pays; fewer make a short run with a worse "
                        "teacher)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed")
    p.add_argument("--out", default="diffusion_out", type=out_type,
                   help="folder for results, PNG grid, checkpoints")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=diffusion)
    for name, p in sub.choices.items():
        p.formatter_class = _Help
    args = parser.parse_args(argv)
    args.parser = sub.choices[args.command]  # for one-line errors: "fastdistill kd: error: ..."
    check = _CHECKS.get(args.command)
    if check is not None:
        check(args, args.parser)
    rc = args.func(args)
    if _leave_process_group():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _leave_process_group() -> bool:
    """Under torchrun, after a job that succeeded: destroy the process group the HF
    Trainer (accelerate) opened, and say whether this process is one of several
    ranks. Such a process then exits without the interpreter's teardown: with
    gloo, a C++ destructor there aborts now and then ("terminate called without
    an active exception", SIGABRT; pytorch#190489), failing the launch after a
    good run, also with the group destroyed. Everything is written by then. Not
    after an error: a rank still in a collective would hang the others."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _is_rank_zero() -> bool:
    """The process that prints a job's summary (every one, outside torchrun)."""
    from .softlabels.parallel import world_from_env

    return world_from_env()[1] == 0


if __name__ == "__main__":
    sys.exit(main())
