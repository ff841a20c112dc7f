"""The ``fastdistill`` console script: doctor, build, bench."""
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
    from . import bench as report

    report.run(quick=args.quick, out_dir=args.out, divergences=args.divergence,
               cases_to_run=args.case or (report.QUICK_CASES if args.quick else report.CASES))
    return 0


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
    p.add_argument("--case", action="append", choices=("kd", "fused_linear", "sparse", "softlabels", "ot"),
                   help="run only these cases (repeatable; default: all; --quick never runs ot)")
    p.set_defaults(func=bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
