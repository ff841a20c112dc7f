"""The ``fastdistill bench`` report: side-by-side timings in ONE process.

Each case runs forward+backward of a loss on fresh student logits (a non-leaf
view, as an LM head would produce) against the same teacher, for every
implementation: the torch reference in eager mode, the reference under
``torch.compile`` (what a user would write instead), and fastdistill's fused
backends. Times are the best of several runs after a warm-up; "extra peak" is
the process's peak resident memory during the timed call minus what was
resident before it (Linux: /proc/self/clear_refs resets the peak). The
streaming floor is one pass reading two N×V fp32 tensors and writing one,
measured in the same run: no kernel that reads both logits and writes a
gradient can beat it.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import _backend
from .kd import kd_loss
from .reference import kd as ref

MB = 1024 * 1024


# ----------------------------------------------------------------- measuring

def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def fix_malloc_thresholds() -> None:
    """Make glibc return every large freed buffer to the OS (fixed mmap threshold),
    so the RSS peak sees each allocation instead of reused, already-resident heap."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD; also stops its dynamic growth
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def measure(fn: Callable[[], None], prep: Callable[[], object], *, repeat: int, warmup: int):
    """Best wall time of fn(prep()) and the largest extra peak RSS (bytes) seen."""
    times, extra = [], None
    for i in range(warmup + repeat):
        state = prep()
        can_peak = _reset_peak()
        rss0 = _status_kb("VmRSS")
        t0 = time.perf_counter()
        fn(state)
        dt = time.perf_counter() - t0
        hwm = _status_kb("VmHWM")
        del state
        if i < warmup:
            continue
        times.append(dt)
        if can_peak and rss0 is not None and hwm is not None:
            extra = max(extra or 0, (hwm - rss0) * 1024)
    return min(times), extra


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    impl: str
    seconds: float
    extra_peak_mb: float | None
    vs_eager: float | None = None
    vs_compile: float | None = None
    vs_floor: float | None = None
    notes: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    floor_seconds: dict[str, float] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def streaming_floor(n: int, v: int, repeat: int) -> float:
    """Best time of c = a + b over (n, v) fp32: reads two N×V tensors, writes one."""
    a, b = torch.randn(n, v), torch.randn(n, v)
    c = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        torch.add(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return best


# ----------------------------------------------------------------- cases

def _kd_impls(divergence: str, with_compile: bool, with_inplace: bool):
    """(label, loss function, in place?) for the kd_loss case."""
    kw = dict(divergence=divergence)
    if divergence == "taid":
        kw["taid_t"] = 0.5

    def reference(s, t):
        return ref.kd_loss(s, t, **kw)

    impls = [("torch eager (reference)", reference, False)]
    if with_compile:
        impls.append(("torch.compile (reference)", torch.compile(reference), False))
    avail = _backend.backends()
    if avail["cpp"]:
        impls.append(("fastdistill cpp", lambda s, t: kd_loss(s, t, backend="cpp", **kw), False))
        if with_inplace:
            impls.append(("fastdistill cpp inplace_backward",
                          lambda s, t: kd_loss(s, t, backend="cpp", inplace_backward=True, **kw), True))
    return impls


def bench_kd(report: Report, n: int, v: int, dtype: torch.dtype, divergence: str, *,
             repeat: int, with_compile: bool = True, with_inplace: bool = True, log=print) -> None:
    torch.manual_seed(0)
    base = (torch.randn(n, v) * 2).to(dtype)
    teacher = (torch.randn(n, v) * 2).to(dtype)
    shape = f"{n}x{v}"
    rows = []
    for label, loss_fn, inplace in _kd_impls(divergence, with_compile, with_inplace):
        def prep():
            leaf = base.clone().requires_grad_()
            return leaf, leaf.view(n, v)  # a non-leaf, like an LM head's output

        def run(state):
            leaf, logits = state
            loss_fn(logits, teacher).backward()

        warm = 2 if "compile" in label else 1
        secs, extra = measure(run, prep, repeat=repeat, warmup=warm)
        notes = "gradient written into the logits" if inplace else ""
        row = Row(f"kd_loss[{divergence}]", shape, str(dtype).replace("torch.", ""), label, secs,
                  None if extra is None else extra / MB, notes=notes)
        rows.append(row)
        log(f"  {row.op:28s} {shape:>12s} {row.dtype:9s} {label:34s} {secs:8.3f} s")
    eager = next((r.seconds for r in rows if "eager" in r.impl), None)
    comp = next((r.seconds for r in rows if "compile" in r.impl), None)
    floor = report.floor_seconds.get(shape)
    for r in rows:
        r.vs_eager = eager / r.seconds if eager else None
        r.vs_compile = comp / r.seconds if comp else None
        r.vs_floor = r.seconds / floor if floor else None
    report.rows.extend(rows)


# ----------------------------------------------------------------- output

def format_table(report: Report) -> str:
    head = ("op", "shape", "dtype", "implementation", "fwd+bwd s", "extra peak MB",
            "x faster than eager", "x faster than compile", "x floor")
    lines = []
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    for r in report.rows:
        lines.append((r.op, r.shape, r.dtype, r.impl, fmt(r.seconds, ".3f"), fmt(r.extra_peak_mb, ".0f"),
                      fmt(r.vs_eager, ".2f"), fmt(r.vs_compile, ".2f"), fmt(r.vs_floor, ".1f")))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(str(x).ljust(w) for x, w in zip(line, widths)) + " |" for line in lines]
    floors = ", ".join(f"{k}: {v * 1e3:.1f} ms" for k, v in report.floor_seconds.items())
    out.append(f"streaming floor (read two N×V fp32, write one): {floors}")
    out.append("environment: " + ", ".join(f"{k}={v}" for k, v in report.env.items()))
    return "\n".join(out)


def save_chart(report: Report, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cases = list(dict.fromkeys((r.op, r.shape, r.dtype) for r in report.rows))
    fig, axes = plt.subplots(len(cases), 1, figsize=(9, 1.1 + 0.55 * 5 * len(cases)), squeeze=False)
    for ax, case in zip(axes[:, 0], cases):
        rows = [r for r in report.rows if (r.op, r.shape, r.dtype) == case]
        ax.barh([r.impl for r in rows], [r.seconds for r in rows],
                color=["#c44" if "fastdistill" in r.impl else "#888" for r in rows])
        floor = report.floor_seconds.get(case[1])
        if floor:
            ax.axvline(floor, color="k", ls="--", lw=1, label="streaming floor")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{case[0]}  {case[1]}  {case[2]}  (forward+backward, lower is better)", fontsize=9)
        ax.set_xlabel("seconds")
        ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def environment() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "cpu": platform.processor() or platform.machine(),
        "capability": _backend.cpu_capability(),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
    }


def run(quick: bool = False, out_dir: str | os.PathLike = "bench/out", divergences=None,
        log=print) -> Report:
    """The whole report; quick is the `make demo` size (well under 3 minutes)."""
    fix_malloc_thresholds()
    report = Report(env=environment())
    if quick:
        n, v, repeat = 256, 32000, 3
        cases = [(torch.float32, "forward_kl", True), (torch.float32, "jsd", True),
                 (torch.bfloat16, "forward_kl", False)]
    else:
        n, v, repeat = 1024, 128256, 3
        divs = divergences or ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl",
                               "skew_reverse_kl", "taid"]
        cases = [(torch.float32, d, True) for d in divs] + [(torch.bfloat16, "forward_kl", False)]
    log(f"fastdistill bench: N={n}, V={v}, best of {repeat} after warm-up, "
        f"{torch.get_num_threads()} threads")
    report.floor_seconds[f"{n}x{v}"] = streaming_floor(n, v, repeat + 2)
    for dtype, div, compile_it in cases:
        bench_kd(report, n, v, dtype, div, repeat=repeat, with_compile=compile_it,
                 with_inplace=dtype == torch.float32, log=log)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(report)
    (out / "kd_bench.md").write_text(table + "\n")
    (out / "kd_bench.json").write_text(json.dumps(
        {"rows": [asdict(r) for r in report.rows], "floor_seconds": report.floor_seconds,
         "env": report.env}, indent=1))
    chart = save_chart(report, out / "kd_bench.png")
    log("")
    log(table)
    log(f"\nwritten: {out / 'kd_bench.md'}, {out / 'kd_bench.json'}" + (f", {chart}" if chart else ""))
    return report
