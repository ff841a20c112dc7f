"""``fastdistill bench --device cuda``: one table of device timings, every row checked.

The CPU report (``fastdistill.bench``) times the cpp kernels; this one runs the
triton kernels where they are meant to run, next to the torch reference, its
``torch.compile`` and the peers a user would pick instead (Liger-Kernel's
Triton kernels, POT, GeomLoss's KeOps-free tensorized backend, torch.func).
Each row is the median of several forward+backward runs after a warm-up,
timed with CUDA events; "extra peak" is ``torch.cuda.max_memory_allocated()``
during the run minus what was allocated before it. The first call of every
row is also a correctness check: its value and gradients against the torch
reference computed on the same device in float32 ("check": OK or WRONG with
the max relative error). A WRONG or crashing fastdistill row makes the
command fail after the whole table is printed; a peer that disagrees is
reported, not fatal.

``--device cpu --interpret`` runs the same report on CPU tensors through
``TRITON_INTERPRET=1`` at tiny shapes, so that the code path, the checks and
the exit code are exercised on a machine without a GPU (times then mean
nothing).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import _backend
from .bench import (MB, PEERS, DIFFUSION_OPS, Report, Row, _dd_loss, _ot_divergence_impls,
                    _ot_sinkhorn_impls, _ratios, dc_step_grouped, dc_step_per_class_loop,
                    diffusion_fused_op, diffusion_inputs, diffusion_reference_op, format_table,
                    gemm_floor, sinkd_reference, streaming_floor)
from .reference import kd as ref

DEVICE_CASES = ("kd", "fused_linear", "sparse", "softlabels", "ot", "dd", "diffusion")
# kd_loss's peer is Liger's Triton kernels on the device (the CPU report has none)
DEVICE_PEERS = {"kd_loss[": "Liger-Kernel", **PEERS}
PIP_NAMES = {"liger_kernel": "liger-kernel", "ot": "pot", "geomloss": "geomloss"}

# (value, gradient) tolerances on the max relative error, by input dtype.
# bf16 (spacing 2^-7 at 1): the gradient comes back rounded to bf16 and a
# fused LM head rounds its logits to bf16 too (grad_weight ~1.3e-2 off,
# measured); a loss computed from bf16 log-probabilities (Liger's chunked
# loss) is ~6e-3 off, however many rows.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-2, 5e-2),
             torch.float16: (2e-3, 2e-2)}
# 100 Sinkhorn rounds and second-order DC gradients carry more float32
# rounding than one pass does (measured: ~1e-5 to 1e-4 on the gradients).
OT_TOLERANCE = (1e-4, 1e-3)
DD_TOLERANCE = (1e-4, 1e-3)


class DeviceUnavailable(RuntimeError):
    """--device cuda on a machine without a usable CUDA device."""


@dataclass
class DeviceRow(Row):
    check: str = ""            # "OK 1.2e-07", "WRONG ...", "ERROR: ...", "-" (nothing ran)
    max_rel_err: float | None = None
    ours: bool = False         # fastdistill's code: a WRONG or crashing row fails the command


@dataclass
class Impl:
    """One row of a case: fn(state) runs forward+backward and returns the
    outputs to check, (value, *gradients); fn None: a peer that cannot run here."""
    label: str
    fn: Callable | None
    ours: bool
    truth: str = "ref"         # which of the case's truths the outputs are checked against
    warmup: int = 1            # calls before the timed ones; the first is the checked one
    notes: str = ""
    dtype: str | None = None   # the row's dtype where it is not the case's
    tol: tuple[float, float] | None = None  # (value, gradient) where not the case's


@dataclass(frozen=True)
class Plan:
    """The sizes of one run: the GPU's (about 4 minutes on an H200, compiles
    included) or the interpreter's (tiny: seconds on a CPU)."""
    kd: tuple[int, int]
    kd_configs: tuple            # (dtype, divergence, with torch.compile)
    fused_linear: tuple          # (N, H, V, dtype) each
    sparse: tuple[int, int, int]
    softlabels: tuple[int, int, int]
    sinkhorn: tuple[int, int]    # (N, iterations), a given N×N cost
    divergence: tuple[int, int, int]  # (N, d, iterations)
    sinkd: tuple[int, int, int]  # (B, V, iterations)
    dd: dict
    diffusion: tuple[int, ...]
    repeat: int
    compile_backend: str
    check_is_timed: bool = False  # the interpreter: one call a row, checked and timed


GPU_PLAN = Plan(
    kd=(4096, 128256),
    kd_configs=((torch.float32, "forward_kl", True), (torch.float32, "jsd", False),
                (torch.bfloat16, "forward_kl", False), (torch.bfloat16, "jsd", False)),
    fused_linear=((8192, 2048, 128256, torch.bfloat16),),
    sparse=(4096, 128256, 64), softlabels=(4096, 128256, 64),
    sinkhorn=(4096, 100), divergence=(4096, 64, 100), sinkd=(128, 32000, 20),
    dd=dict(per_class=256, ipc=10, batch=256, width=128),
    diffusion=(64, 3, 64, 64), repeat=5, compile_backend="inductor")

# Vocabularies that are no power of two (masked tails); torch.compile with the
# "eager" backend still traces the reference with dynamo, without inductor's
# minute of C++ compiles on a CPU.
INTERPRET_PLAN = Plan(
    kd=(8, 1000),
    kd_configs=((torch.float32, "forward_kl", True), (torch.float32, "jsd", False),
                (torch.bfloat16, "forward_kl", False), (torch.bfloat16, "jsd", False)),
    fused_linear=((16, 32, 1000, torch.float32), (12, 32, 1000, torch.bfloat16)),  # shapes name floors
    sparse=(8, 1000, 8), softlabels=(8, 1000, 8),
    # 50 rounds: GeomLoss's averaged symmetric updates agree with the others to 1e-4 from
    # about there on these clouds (at 20 its gradient is 6e-3 off; at 100, 6e-6)
    sinkhorn=(32, 50), divergence=(32, 64, 50), sinkd=(8, 100, 5),
    dd=dict(per_class=4, ipc=1, batch=8, width=8),
    diffusion=(2, 1, 8, 8), repeat=1, compile_backend="eager", check_is_timed=True)


@dataclass
class _Ctx:
    device: torch.device
    plan: Plan
    interpret: bool
    log: Callable
    start: float = field(default_factory=time.perf_counter)
    failures: list[str] = field(default_factory=list)
    case_seconds: dict[str, float] = field(default_factory=dict)

    def say(self, text: str) -> None:
        self.log(f"[{time.perf_counter() - self.start:7.1f} s] {text}")


def _print(*args) -> None:
    print(*args, flush=True)  # a run cut off by a time limit still shows where it was


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------- measuring

def _measure(fn, prep, ctx: _Ctx, warmup: int, on_first: Callable) -> tuple[float, float | None]:
    """Median seconds of ``ctx.plan.repeat`` calls fn(prep()) after ``warmup``
    calls, and the largest extra peak device memory (bytes; None on CPU). The
    first call's outputs go to ``on_first`` (the check) and are dropped; it is
    a warm-up call, except where the plan times it (the interpreter)."""
    cuda = ctx.device.type == "cuda"
    times, extra = [], None
    warmup = 0 if ctx.plan.check_is_timed else max(warmup, 1)
    for i in range(warmup + ctx.plan.repeat):
        state = prep()
        if cuda:
            torch.cuda.synchronize(ctx.device)
            torch.cuda.reset_peak_memory_stats(ctx.device)
            before = torch.cuda.memory_allocated(ctx.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(state)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
            peak = torch.cuda.max_memory_allocated(ctx.device) - before
        else:
            t0 = time.perf_counter()
            out = fn(state)
            seconds, peak = time.perf_counter() - t0, None
        if i == 0:
            on_first(out)
        del out, state
        if i < warmup:
            continue
        times.append(seconds)
        if peak is not None:
            extra = max(extra or 0, peak)
    return statistics.median(times), extra


def relative_error(got: torch.Tensor | None, want: torch.Tensor) -> float:
    """max |got − want| / max |want| (absolute where want is all zero; inf when
    got is missing, not finite or of another shape), computed in float32."""
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
        return math.inf
    a = got.detach().float()
    b = want.detach().float().to(a.device)
    if not bool(torch.isfinite(a).all()):
        return math.inf
    if a.numel() == 0:
        return 0.0
    scale = float(b.abs().max())
    diff = float((a - b).abs().max())
    return diff / scale if scale > 0 else diff


def check_outputs(got: Sequence, want: Sequence, tol: tuple[float, float]) -> tuple[bool, float, str]:
    """(ok, max relative error, text) of outputs (value, *gradients) against
    the truth, the value with tol[0] and each gradient with tol[1]."""
    if len(got) != len(want):
        return False, math.inf, f"WRONG: {len(got)} outputs, expected {len(want)}"
    worst, bad = 0.0, None
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            continue
        err = relative_error(g, w)
        limit = tol[0] if i == 0 else tol[1]
        worst = max(worst, err)
        if not err <= limit and bad is None:  # NaN counts as bad
            what = "value" if i == 0 else f"gradient {i}"
            if not isinstance(g, torch.Tensor):
                bad = f"WRONG {what} missing"
            elif tuple(g.shape) != tuple(w.shape):
                bad = f"WRONG {what} shape {tuple(g.shape)}, expected {tuple(w.shape)}"
            else:
                bad = f"WRONG {what} {err:.1e} > {limit:.0e}"
    if bad is not None:
        return False, worst, bad
    return True, worst, f"OK {worst:.1e}"


# ----------------------------------------------------------------- running a case

def _run_case(ctx: _Ctx, report: Report, op: str, shape: str, dtype: str, prep, impls: list[Impl],
              truths: dict[str, Callable], tol: tuple[float, float], reference: str) -> None:
    """Every implementation of one case: timed, measured and checked; then the ratios."""
    cache: dict[str, object] = {}

    def truth(name):
        if name not in cache:
            try:
                cache[name] = tuple(truths[name]())
            except Exception as exc:  # noqa: BLE001 - reported in the rows that need it
                cache[name] = exc
        return cache[name]

    rows = []
    for impl in impls:
        row = DeviceRow(op, shape, impl.dtype or dtype, impl.label, None, None, notes=impl.notes,
                        ours=impl.ours)
        rows.append(row)
        if impl.fn is None:
            row.check = "-"
            ctx.say(f"{op} {shape} {row.dtype}  {impl.label}: {impl.notes}")
            continue

        def on_first(out, row=row, impl=impl):
            want = truth(impl.truth)
            if isinstance(want, Exception):
                row.check = f"ERROR: reference failed: {type(want).__name__}: {_first_line(want)}"
                return
            ok, err, text = check_outputs(out, want, impl.tol or tol)
            row.check, row.max_rel_err = text, err

        try:
            secs, extra = _measure(impl.fn, prep, ctx, impl.warmup, on_first)
        except Exception as exc:  # noqa: BLE001 - a crash is a row, then the next one runs
            row.check = f"ERROR: {type(exc).__name__}: {_first_line(exc)}"
        else:
            row.seconds = secs
            row.extra_peak_mb = None if extra is None else extra / MB
        if row.ours and not row.check.startswith("OK"):
            ctx.failures.append(f"{op} {shape} {row.dtype} {impl.label}: {row.check}")
        _recover(ctx)
        took = "-" if row.seconds is None else f"{row.seconds * 1e3:.3f} ms"
        ctx.say(f"{op} {shape} {row.dtype}  {impl.label}: {took}  {row.check}")
    _ratios(report, rows, shape, peers=DEVICE_PEERS, reference=reference)
    cache.clear()
    _recover(ctx)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _recover(ctx: _Ctx) -> None:
    """Hand freed blocks back between rows and cases, so one case's caching
    does not push the next into an out-of-memory."""
    if ctx.device.type == "cuda":
        try:
            torch.cuda.synchronize(ctx.device)
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - a sticky CUDA error: the next rows will say so
            pass


def _guard(ctx: _Ctx, report: Report, what: str, build: Callable) -> None:
    """Run one case builder; a crash outside the rows (inputs, setup) is a
    failed case: an ERROR row and a FAILED line, then the next case."""
    try:
        build()
    except Exception as exc:  # noqa: BLE001
        msg = f"ERROR: {type(exc).__name__}: {_first_line(exc)}"
        report.rows.append(DeviceRow(what, "-", "-", "(case setup)", None, None, check=msg, ours=True))
        ctx.failures.append(f"{what}: {msg}")
        ctx.say(f"{what}: {msg}")
        _recover(ctx)


def _import_peer(module: str, attr: str):
    """(object, None) or (None, why): a peer is optional, a missing one is a row."""
    top = module.split(".")[0]
    try:
        return getattr(importlib.import_module(module), attr), None
    except ModuleNotFoundError as exc:
        if exc.name is None or not module.startswith(exc.name):  # a dependency of the peer's
            return None, f"import failed: {type(exc).__name__}: {_first_line(exc)}"
        return None, f"not installed (pip install --no-deps {PIP_NAMES.get(top, top)})"
    except Exception as exc:  # noqa: BLE001 - e.g. built against another triton
        return None, f"import failed: {type(exc).__name__}: {_first_line(exc)}"


def _peer_impl(label: str, module: str, attr: str, make: Callable, **kw) -> Impl:
    """An Impl for a peer's ``module.attr``: make(obj) gives the run function."""
    obj, why = _import_peer(module, attr)
    if obj is None:
        return Impl(f"{label}", None, False, notes=why)
    try:
        return Impl(label, make(obj), False, **kw)
    except Exception as exc:  # noqa: BLE001 - a constructor that rejects our arguments
        return Impl(label, None, False, notes=f"could not be set up: {type(exc).__name__}: "
                                              f"{_first_line(exc)}")


def _missing_peers(impls: list[Impl], expected: dict[str, str]) -> list[Impl]:
    """Rows for the peers (label prefix → module) a shared builder left out."""
    out = []
    for prefix, module in expected.items():
        if not any(i.label.startswith(prefix) for i in impls):
            _, why = _import_peer(module, "__name__")
            out.append(Impl(prefix, None, False, notes=why or "imports, but without the API "
                                                               "the report calls (another version?)"))
    return out


def _loss_and_grads(loss_fn):
    """run(state) for a state that is a leaf or a tuple of leaves: the loss
    (of the leaves, in order) backward, then (loss, *their gradients)."""
    def run(state):
        leaves = state if isinstance(state, tuple) else (state,)
        loss = loss_fn(*leaves)
        loss.backward()
        return (loss.detach(),) + tuple(x.grad for x in leaves)
    return run


def _randn(shape, gen, device, scale=1.0):
    return torch.randn(shape, generator=gen, device=device) * scale


# ----------------------------------------------------------------- cases

def case_kd(ctx: _Ctx, report: Report, n: int, v: int, dtype: torch.dtype, divergence: str,
            with_compile: bool, beta: float = 0.5) -> None:
    """kd_loss on fresh student logits (a non-leaf view, as an LM head gives):
    the reference eager (and compiled), the triton kernel (and in place), and
    Liger's Triton kernels on log-probabilities (the log_softmax of both sides
    timed with them: a user has logits)."""
    from .kd import kd_loss

    dev = ctx.device
    g = torch.Generator(device=dev).manual_seed(0)
    base = _randn((n, v), g, dev, 2.0).to(dtype)
    teacher = _randn((n, v), g, dev, 2.0).to(dtype)
    kw = dict(divergence=divergence, beta=beta) if divergence == "jsd" else dict(divergence=divergence)

    def reference(s):
        return ref.kd_loss(s, teacher, **kw)

    def view(fn):  # the logits a loss sees: a view of the leaf, not the leaf
        return _loss_and_grads(lambda leaf: fn(leaf.view(n, v)))

    impls = [Impl("torch eager (reference)", view(reference), True)]
    if with_compile:
        compiled = torch.compile(reference, backend=ctx.plan.compile_backend)
        impls.append(Impl("torch.compile (reference)", view(compiled), False, warmup=2,
                          notes="" if ctx.plan.compile_backend == "inductor"
                          else f"backend={ctx.plan.compile_backend!r} under the interpreter"))
    impls += [
        Impl("fastdistill triton", view(lambda s: kd_loss(s, teacher, backend="triton", **kw)), True),
        Impl("fastdistill triton inplace_backward",
             view(lambda s: kd_loss(s, teacher, backend="triton", inplace_backward=True, **kw)), True,
             notes="gradient written into the logits"),
    ]

    def on_logprobs(module):  # Liger's losses take log-probabilities (student first)
        return view(lambda s: module(torch.log_softmax(s, -1), torch.log_softmax(teacher, -1)))

    if divergence == "forward_kl":
        impls.append(_peer_impl(
            "Liger-Kernel LigerKLDIVLoss (log_softmax both sides first)",
            "liger_kernel.transformers", "LigerKLDIVLoss",
            lambda cls: on_logprobs(cls(reduction="batchmean", log_target=True)),
            notes="batchmean over log-probabilities = kd_loss's token mean"))
    elif divergence == "jsd":
        impls.append(_peer_impl(
            "Liger-Kernel LigerJSD (log_softmax both sides first)",
            "liger_kernel.transformers", "LigerJSD", lambda cls: on_logprobs(cls(beta=beta)),
            notes=f"beta={beta} weights the teacher in M = beta·p + (1-beta)·q, as kd_loss's does"))
    shape = f"{n}x{v}"
    _run_case(ctx, report, f"kd_loss[{divergence}]", shape, _dtype_name(dtype),
              lambda: base.clone().requires_grad_(), impls,
              {"ref": _truth_of(base, lambda x: ref.kd_loss(x, teacher.float(), **kw))},
              TOLERANCE[dtype], "torch eager (reference)")


def case_fused_linear(ctx: _Ctx, report: Report, n: int, h: int, v: int, dtype: torch.dtype,
                      beta: float = 0.5) -> None:
    """JSD through the LM head: materialized logits (eager), Liger's Triton
    LigerFusedLinearJSD and chunked LigerFusedLinearJSDLoss, fastdistill's
    fused_linear_kd_loss; gradients to the hidden states and the weight."""
    from .kd import fused_linear_kd_loss

    dev = ctx.device
    g = torch.Generator(device=dev).manual_seed(0)
    hid, th = _randn((n, h), g, dev).to(dtype), _randn((n, h), g, dev).to(dtype)
    w = _randn((v, h), g, dev, 1 / h**0.5).to(dtype)
    tw = _randn((v, h), g, dev, 2 / h**0.5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g, device=dev)

    def naive(x, wx, th=th, tw=tw):
        with torch.no_grad():
            t = th @ tw.t()
        return ref.kd_loss(x @ wx.t(), t, divergence="jsd", beta=beta)

    def truth():
        x = hid.to(torch.float32, copy=True).requires_grad_()  # copies, also when fp32
        wx = w.to(torch.float32, copy=True).requires_grad_()
        loss = naive(x, wx, th.float(), tw.float())
        loss.backward()
        return loss.detach(), x.grad, wx.grad

    def triton_head(cls):
        m = cls(jsd_beta=beta)
        return _loss_and_grads(lambda x, wx: m(x, wx, th, tw, None))

    def chunked(cls):
        try:
            m = cls(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=not ctx.interpret)
        except TypeError:  # an older Liger without the compiled switch
            m = cls(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta)
        return _loss_and_grads(lambda x, wx: m(x, wx, th, tw, labels))

    shape = f"{n}x{h}x{v}"
    report.floor_seconds[shape] = gemm_floor(n, h, v, 3, device=dev, dtype=dtype)
    impls = [
        Impl("torch eager (materialized logits)", _loss_and_grads(naive), True),
        _peer_impl("Liger-Kernel LigerFusedLinearJSD (Triton)", "liger_kernel.transformers",
                   "LigerFusedLinearJSD", triton_head, warmup=2),
        _peer_impl("Liger-Kernel LigerFusedLinearJSDLoss (chunked)", "liger_kernel.chunked_loss",
                   "LigerFusedLinearJSDLoss", chunked, warmup=2,
                   notes="torch.compile'd chunks" if not ctx.interpret
                   else "compiled=False under the interpreter"),
        Impl("fastdistill fused_linear_kd_loss triton",
             _loss_and_grads(lambda x, wx: fused_linear_kd_loss(x, wx, th, tw, divergence="jsd",
                                                                beta=beta, backend="triton")), True),
    ]
    _run_case(ctx, report, "fused_linear_kd[jsd]", shape, _dtype_name(dtype),
              lambda: (hid.clone().requires_grad_(), w.clone().requires_grad_()), impls,
              {"ref": truth}, TOLERANCE[dtype], "torch eager (materialized logits)")


def _student_view(n, v, fn):
    return _loss_and_grads(lambda leaf: fn(leaf.view(n, v)))


def _truth_of(base: torch.Tensor, fn):
    """A truth: fn on a float32 leaf copy of ``base`` (a copy also when base is
    float32: it must not touch the inputs), (loss, its gradient)."""
    def compute():
        x = base.to(torch.float32, copy=True).requires_grad_()
        loss = fn(x)
        loss.backward()
        return loss.detach(), x.grad
    return compute


def case_sparse(ctx: _Ctx, report: Report, n: int, v: int, k: int) -> None:
    """Forward KL against a top-k teacher with its tail bucket: the sparse
    reference, densifying the teacher for the dense kd_loss (what users do
    today; it computes the top-k renormalized loss, so it is checked against
    kd_loss's reference on that dense teacher), and the sparse triton kernel."""
    from .kd import kd_loss, sparse_kd_loss
    from .reference import sparse as ref_sparse

    dev = ctx.device
    g = torch.Generator(device=dev).manual_seed(0)
    base = _randn((n, v), g, dev, 2.0)
    lp, ids = torch.log_softmax(_randn((n, v), g, dev, 2.0), -1).topk(k, -1)

    def densify():
        return torch.full((n, v), float("-inf"), device=dev).scatter_(1, ids, lp)

    dense_note = "checked against kd_loss's reference on the densified teacher (top-k renormalized)"
    impls = [
        Impl("torch eager (sparse reference)",
             _student_view(n, v, lambda s: sparse_kd_loss(s, ids, lp, backend="torch")), True),
        Impl("densify + kd_loss triton", _student_view(n, v, lambda s: kd_loss(s, densify(), backend="triton")),
             True, truth="dense", notes=dense_note),
        Impl("densify + kd_loss triton inplace_backward",
             _student_view(n, v, lambda s: kd_loss(s, densify(), backend="triton", inplace_backward=True)),
             True, truth="dense", notes=dense_note),
        Impl("fastdistill sparse_kd_loss triton",
             _student_view(n, v, lambda s: sparse_kd_loss(s, ids, lp, backend="triton")), True),
        Impl("fastdistill sparse_kd_loss triton inplace_backward",
             _student_view(n, v, lambda s: sparse_kd_loss(s, ids, lp, backend="triton",
                                                          inplace_backward=True)), True),
    ]
    truths = {"ref": _truth_of(base, lambda x: ref_sparse.sparse_kd_loss(x, ids, lp)),
              "dense": _truth_of(base, lambda x: ref.kd_loss(x, densify()))}
    _run_case(ctx, report, f"sparse_kd[forward_kl top-{k}]", f"{n}x{v}", "float32",
              lambda: base.clone().requires_grad_(), impls, truths, TOLERANCE[torch.float32],
              "torch eager (sparse reference)")


def case_softlabels(ctx: _Ctx, report: Report, n: int, v: int, k: int) -> None:
    """Forward KL from packed top-k soft labels (8-bit values): the reference
    (decode + sparse reference), decoding to a dense teacher for the dense
    kd_loss (checked against kd_loss's reference on that teacher), and the
    triton kernel that unpacks the rows itself."""
    from .kd import kd_loss
    from .softlabels import encode
    from .softlabels import kd_loss as packed_kd_loss

    dev = ctx.device
    g = torch.Generator(device=dev).manual_seed(0)
    base = _randn((n, v), g, dev, 2.0)
    labels = encode(_randn((n, v), g, dev, 2.0), k=k, value_bits=8)

    dense_note = "checked against kd_loss's reference on the decoded dense teacher"
    impls = [
        Impl("torch eager (decode + sparse reference)",
             _student_view(n, v, lambda s: packed_kd_loss(s, labels, backend="torch")), True),
        Impl("decode to dense + kd_loss triton",
             _student_view(n, v, lambda s: kd_loss(s, labels.to_dense(), backend="triton")), True,
             truth="dense", notes=dense_note),
        Impl("decode to dense + kd_loss triton inplace_backward",
             _student_view(n, v, lambda s: kd_loss(s, labels.to_dense(), backend="triton",
                                                   inplace_backward=True)), True,
             truth="dense", notes=dense_note),
        Impl("fastdistill softlabels.kd_loss triton",
             _student_view(n, v, lambda s: packed_kd_loss(s, labels, backend="triton")), True),
        Impl("fastdistill softlabels.kd_loss triton inplace_backward",
             _student_view(n, v, lambda s: packed_kd_loss(s, labels, backend="triton",
                                                          inplace_backward=True)), True),
    ]
    truths = {"ref": _truth_of(base, lambda x: packed_kd_loss(x, labels, backend="torch")),
              "dense": _truth_of(base, lambda x: ref.kd_loss(x, labels.to_dense()))}
    _run_case(ctx, report, f"softlabel_kd[top-{k} 8-bit]", f"{n}x{v}", "float32",
              lambda: base.clone().requires_grad_(), impls, truths, TOLERANCE[torch.float32],
              "torch eager (decode + sparse reference)")


def _clouds(n: int, d: int, device):
    """The point clouds of the CPU report's OT cases (seeded on the CPU: the same points on every device)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g) / d**0.5
    y = torch.randn(n, d, generator=g) / d**0.5 * 0.8 + 0.5 / d**0.5
    return x.to(device), y.to(device)


def case_sinkhorn(ctx: _Ctx, report: Report, n: int, n_iters: int, epsilon: float = 0.05) -> None:
    """``sinkhorn`` on a given n×n fp32 cost C = ½|x − y|² (forward: solve +
    ⟨P, C⟩), the torch reference, POT's sinkhorn_log and GeomLoss's loop on
    the device's tensors, the triton kernels (fp32 and a bf16 cost)."""
    from .ot import sinkhorn

    dev = ctx.device
    x, y = _clouds(n, 64, dev)
    C = (0.5 * torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist") ** 2).contiguous()
    a = torch.full((n,), 1.0 / n, device=dev)
    b = torch.full((n,), 1.0 / n, device=dev)
    C16 = C.to(torch.bfloat16)
    built = _ot_sinkhorn_impls(epsilon, n_iters, lambda *_: None, fast="triton")
    reference = next(label for label, _ in built if " torch " in label)
    impls = []
    for label, fn in built:
        half = "bf16" in label  # checked against the fp32 cost's value: its rounding is the error
        cost = C16 if half else C  # the conversion is not timed
        impls.append(Impl(label, lambda _s, fn=fn, cost=cost: (fn(cost, a, b),),
                          label.startswith("fastdistill"), dtype="bfloat16" if half else None,
                          tol=TOLERANCE[torch.bfloat16] if half else None))
    impls += _missing_peers(impls, {"POT": "ot", "GeomLoss": "geomloss"})

    def truth():
        return (sinkhorn(C, a, b, epsilon=epsilon, n_iters=n_iters, backend="torch").value,)

    _run_case(ctx, report, f"sinkhorn[given cost, eps={epsilon} {n_iters} it, fwd]", f"{n}x{n}",
              "float32", lambda: None, impls, {"ref": truth}, OT_TOLERANCE, reference)


def case_divergence(ctx: _Ctx, report: Report, n: int, d: int, n_iters: int,
                    epsilon: float = 0.05) -> None:
    """Forward+backward (both clouds) of the debiased Sinkhorn divergence:
    torch reference (dense cost), POT ×3 (envelope), GeomLoss tensorized,
    fastdistill triton online and auto (tensorized)."""
    from .ot import sinkhorn_divergence

    x0, y0 = _clouds(n, d, ctx.device)
    built = _ot_divergence_impls(epsilon, n_iters, lambda *_: None, fast="triton")
    reference = next(label for label, _ in built if " torch " in label)
    impls = [Impl(label, _loss_and_grads(fn), label.startswith("fastdistill")) for label, fn in built]
    impls += _missing_peers(impls, {"POT": "ot", "GeomLoss": "geomloss"})

    def truth():
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        out = sinkhorn_divergence(x, y, epsilon=epsilon, p=2, n_iters=n_iters, backend="torch")
        out.backward()
        return out.detach(), x.grad, y.grad

    _run_case(ctx, report, f"sinkhorn_divergence[p=2 eps={epsilon} {n_iters} it]", f"{n}x{n}x{d}",
              "float32", lambda: (x0.clone().requires_grad_(), y0.clone().requires_grad_()), impls,
              {"ref": truth}, OT_TOLERANCE, reference)


def case_sinkd(ctx: _Ctx, report: Report, b: int, v: int, n_iters: int, temperature: float = 2.0,
               epsilon: float = 0.1) -> None:
    """SinKD (L1 cost across the batch): the reference port (autograd through
    the iterations), fastdistill torch and triton with the envelope gradient
    (checked against the torch envelope) and unrolled (against the port)."""
    from .ot import sinkhorn_kd_loss

    dev = ctx.device
    g = torch.Generator(device=dev).manual_seed(0)
    base, teacher = _randn((b, v), g, dev, 2.0), _randn((b, v), g, dev, 2.0)
    kw = dict(temperature=temperature, epsilon=epsilon, n_iters=n_iters)

    def port(s):
        return sinkd_reference(s, teacher, temperature, epsilon, n_iters) / b

    reference = "torch eager (SinKD reference port)"
    impls = [Impl(reference, _student_view(b, v, port), True, truth="unrolled")]
    for name in ("torch", "triton"):
        for mode in ("envelope", "unrolled"):
            impls.append(Impl(f"fastdistill sinkhorn_kd_loss {name} {mode}",
                              _student_view(b, v, lambda s, name=name, mode=mode: sinkhorn_kd_loss(
                                  s, teacher, gradient=mode, backend=name, **kw)),
                              True, truth=mode))
    truths = {"unrolled": _truth_of(base, port),
              "envelope": _truth_of(base, lambda x: sinkhorn_kd_loss(x, teacher, gradient="envelope",
                                                              backend="torch", **kw))}
    _run_case(ctx, report, f"sinkhorn_kd[l1 T={temperature:g} eps={epsilon:g} {n_iters} it]",
              f"{b}x{v}", "float32", lambda: base.clone().requires_grad_(), impls, truths,
              OT_TOLERANCE, reference)


def case_dd(ctx: _Ctx, report: Report, per_class: int, ipc: int, batch: int, width: int) -> None:
    """One DC outer step (ConvNet-3 on 28×28, 10 classes): the per-class loop
    on the torch gradient_match_loss (the reference) against grouped_gradients
    + the triton gradient_match_loss (loss and the synthetic images'
    gradient); per-sample gradient norms against torch.func vmap(grad)."""
    from torch.func import functional_call, grad, vmap

    from .dd import ConvNet, per_sample_grad_norms

    dev = ctx.device
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = ConvNet(1, 10, width=width).to(dev)
    real = torch.randn(10 * per_class, 1, 28, 28, generator=g).to(dev)
    real_y = torch.arange(10).repeat_interleave(per_class).to(dev)
    syn0 = torch.randn(10 * ipc, 1, 28, 28, generator=g).to(dev)
    syn_y = torch.arange(10).repeat_interleave(ipc).to(dev)

    def step(fn, backend):
        def run(syn):
            loss = fn(net, real, real_y, syn, syn_y, 10, backend=backend)
            return loss, syn.grad
        return run

    loop = "per-class loop (autograd.grad per class), torch gradient_match_loss"
    impls = [Impl(loop, step(dc_step_per_class_loop, "torch"), True),
             Impl("fastdistill grouped_gradients + gradient_match_loss triton",
                  step(dc_step_grouped, "triton"), True)]
    _run_case(ctx, report, f"dc_outer_step[ipc={ipc}]", f"{10 * per_class}+{10 * ipc}x28x28 w{width}",
              "float32", lambda: syn0.clone().requires_grad_(), impls,
              {"ref": lambda: step(dc_step_per_class_loop, "torch")(syn0.clone().requires_grad_())},
              DD_TOLERANCE, loop)

    x = torch.randn(batch, 1, 28, 28, generator=g).to(dev)
    y = torch.randint(0, 10, (batch,), generator=g).to(dev)
    params = {k: p.detach() for k, p in net.named_parameters()}

    def one(p, xi, yi):
        return _dd_loss(functional_call(net, p, (xi[None],)), yi[None]).sum()

    def func_norms(_=None):
        per = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
        return (torch.stack([t.reshape(batch, -1).pow(2).sum(1) for t in per.values()]).sum(0).sqrt(),)

    func = "torch.func vmap(grad)"
    impls = [Impl(func, func_norms, False),
             Impl("fastdistill per_sample_grad_norms",
                  lambda _: (per_sample_grad_norms(net, _dd_loss, x, y),), True)]
    _run_case(ctx, report, "per_sample_grad_norms", f"{batch}x1x28x28 w{width}", "float32",
              lambda: None, impls, {"ref": func_norms}, DD_TOLERANCE, func)


def case_diffusion(ctx: _Ctx, report: Report, shape: tuple[int, ...]) -> None:
    """Each fused diffusion op fwd+bwd: the reference eager against the triton kernels."""
    from .diffusion import NoiseSchedule

    dev = ctx.device
    schedule = NoiseSchedule("cosine", 1000)
    d = {k: (v.to(dev) if isinstance(v, torch.Tensor) else
             [c.to(dev) for c in v] if isinstance(v, list) else v)
         for k, v in diffusion_inputs(shape, schedule).items()}
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dev)
    tag = "x".join(map(str, shape))
    for op in DIFFUSION_OPS:
        src = d["b"] if op == "ddim_eps_cfg" else d["c"]

        def run_of(fn):
            def run(leaf):
                out = fn(leaf)
                out.backward(grad_out if out.dim() else None)
                return out.detach(), leaf.grad
            return run

        reference = run_of(diffusion_reference_op(op, d))
        impls = [Impl("torch reference (eager)", reference, True),
                 Impl("fastdistill triton (fused)",
                      run_of(diffusion_fused_op(op, d, schedule, backend="triton")), True)]
        _run_case(ctx, report, op, tag, "float32", lambda src=src: src.clone().requires_grad_(),
                  impls, {"ref": lambda src=src, reference=reference: reference(
                      src.clone().requires_grad_())},
                  TOLERANCE[torch.float32], "torch reference (eager)")


# ----------------------------------------------------------------- the run

@contextlib.contextmanager
def _exact_fp32(device: torch.device):
    """float32 means float32 on the GPU for the whole run (cuDNN convolutions
    default to TF32): the checks compare against a float32 reference, and
    every implementation is timed under the same rule. Restored afterwards.
    The legacy flags only: torch 2.9+ raises on reading them once the new
    per-backend fp32_precision API has set conv and RNN apart."""
    if device.type != "cuda":
        yield "n/a (CPU)"
        return
    flags = (torch.backends.cudnn, torch.backends.cuda.matmul)
    try:
        old = tuple(f.allow_tf32 for f in flags)
    except RuntimeError as exc:  # the caller mixed the two APIs: leave its settings alone
        yield f"as the caller set it ({_first_line(exc)[:60]}...)"
        return
    for f in flags:
        f.allow_tf32 = False
    try:
        yield "TF32 off (matmul and cuDNN)"
    finally:
        for f, value in zip(flags, old):
            f.allow_tf32 = value


@contextlib.contextmanager
def _one_thread(interpret: bool):
    """The interpreter's tiny tensors gain nothing from intra-op threads, and
    on a loaded machine their spin-waits stall each op (measured: a tiny DC
    step 5 s with 2 threads, 0.1 s with 1)."""
    if not interpret:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _no_extension_build(device: torch.device):
    """On the GPU nothing here needs the C++ extension, and a first build (with
    its CUDA sources) takes minutes: unless it is loaded already, or the caller
    set FASTDISTILL_NO_BUILD, no call of this run may start one."""
    if device.type != "cuda" or "cpp" in _backend._state or "FASTDISTILL_NO_BUILD" in os.environ:
        yield False
        return
    os.environ["FASTDISTILL_NO_BUILD"] = "1"
    try:
        yield True
    finally:
        os.environ.pop("FASTDISTILL_NO_BUILD", None)


def _version(module: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(PIP_NAMES.get(module, module))
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device, interpret: bool, fp32: str, no_build: bool) -> dict[str, str]:
    env = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
        env["CUDA"] = str(torch.version.cuda)
    else:
        env["device"] = f"CPU ({platform.machine()}), TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
    env["float32"] = fp32
    for mod in ("liger_kernel", "ot", "geomloss"):
        env[PIP_NAMES[mod]] = _version(mod)
    cpp = _backend._state.get("cpp")
    env["C++ extension"] = ("loaded" if cpp else "not loaded") + (
        " (FASTDISTILL_NO_BUILD=1 for this run: nothing here needs it)" if no_build else "")
    return env


def _steps(ctx: _Ctx, report: Report, plan: Plan, cases, divergences, jsd_beta):
    """(case, what it says first, [(what, builder)]) for each case asked for, in order."""
    dev = ctx.device
    if "kd" in cases:
        n, v = plan.kd
        build = [("floor", lambda: report.floor_seconds.__setitem__(
            f"{n}x{v}", streaming_floor(n, v, plan.repeat + 2, device=dev)))]
        build += [(f"kd_loss[{div}] {_dtype_name(dtype)}",
                   lambda dtype=dtype, div=div, c=c: case_kd(ctx, report, n, v, dtype, div, c, jsd_beta))
                  for dtype, div, c in plan.kd_configs if not divergences or div in divergences]
        yield "kd", f"kd_loss: N={n}, V={v}", build
    if "fused_linear" in cases:
        for n, h, v, dtype in plan.fused_linear:
            yield "fused_linear", f"fused linear JSD: N={n}, H={h}, V={v}, {_dtype_name(dtype)}", [
                (f"fused_linear_kd[jsd] {_dtype_name(dtype)}",
                 lambda n=n, h=h, v=v, dtype=dtype: case_fused_linear(ctx, report, n, h, v, dtype,
                                                                       jsd_beta))]
    if "sparse" in cases:
        yield "sparse", "sparse KD: N={}, V={}, K={}".format(*plan.sparse), [
            ("sparse_kd", lambda: case_sparse(ctx, report, *plan.sparse))]
    if "softlabels" in cases:
        yield "softlabels", "packed soft labels: N={}, V={}, k={}".format(*plan.softlabels), [
            ("softlabel_kd", lambda: case_softlabels(ctx, report, *plan.softlabels))]
    if "ot" in cases:
        yield "ot", ("Sinkhorn on a given {0}x{0} cost and {1} iterations; the divergence at N=M={2}, "
                     "d={3}, {4} iterations; SinKD B={5}, V={6}, {7} iterations").format(
                         *plan.sinkhorn, *plan.divergence, *plan.sinkd), [
            ("sinkhorn", lambda: case_sinkhorn(ctx, report, *plan.sinkhorn)),
            ("sinkhorn_divergence", lambda: case_divergence(ctx, report, *plan.divergence)),
            ("sinkhorn_kd", lambda: case_sinkd(ctx, report, *plan.sinkd))]
    if "dd" in cases:
        yield "dd", ("dataset distillation: DC step {per_class} real + {ipc} synthetic per class, "
                     "width {width}; per-sample norms of {batch}").format(**plan.dd), [
            ("dd", lambda: case_dd(ctx, report, **plan.dd))]
    if "diffusion" in cases:
        yield "diffusion", f"diffusion ops: fwd+bwd at {'x'.join(map(str, plan.diffusion))}", [
            ("diffusion", lambda: case_diffusion(ctx, report, plan.diffusion))]


def _write(report: Report, ctx: _Ctx, out_dir) -> str:
    """device_bench.md and device_bench.json under out_dir; returns the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(report, peers=DEVICE_PEERS, unit="ms", reference="reference")
    (out / "device_bench.md").write_text(table + "\n")
    (out / "device_bench.json").write_text(json.dumps(
        {"rows": [asdict(r) for r in report.rows], "floor_seconds": report.floor_seconds,
         "env": report.env, "failures": ctx.failures, "case_seconds": ctx.case_seconds,
         "seconds": time.perf_counter() - ctx.start}, indent=1))
    return table


def run(device: str | torch.device = "cuda", *, interpret: bool = False,
        out_dir: str | os.PathLike = "bench/out", cases: Sequence[str] = DEVICE_CASES,
        divergences: Sequence[str] | None = None, jsd_beta: float = 0.5,
        log: Callable = _print) -> tuple[Report, list[str]]:
    """The device report: (report, failures). ``failures`` lists every
    fastdistill row that was WRONG or crashed (empty: all checks passed).
    Writes device_bench.md and device_bench.json under ``out_dir``."""
    dev = torch.device(device)
    unknown = set(cases) - set(DEVICE_CASES)
    if unknown:
        raise ValueError(f"cases must be among {DEVICE_CASES}, got {sorted(unknown)}")
    if dev.type == "cuda":
        if interpret:
            raise ValueError("interpret runs the triton kernels on CPU tensors: use device='cpu'")
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"--device cuda: no CUDA device is available here (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}); the CPU report is `fastdistill bench`, "
                "the device report's code path on CPU is `fastdistill bench --device cpu --interpret`")
        plan = GPU_PLAN
    elif dev.type == "cpu":
        if not interpret:
            raise ValueError("the device report on CPU runs the triton kernels through the "
                             "interpreter: pass interpret=True (the CPU report is fastdistill.bench)")
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("interpret=True needs TRITON_INTERPRET=1 set before triton is imported "
                               "(`fastdistill bench --device cpu --interpret` sets it)")
        plan = INTERPRET_PLAN
    else:
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")

    ctx = _Ctx(dev, plan, interpret, log)
    report = Report()
    with _exact_fp32(dev) as fp32, _no_extension_build(dev) as no_build, _one_thread(interpret):
        report.env = environment(dev, interpret, fp32, no_build)
        ctx.say("fastdistill device bench: " + ", ".join(f"{k}={v}" for k, v in report.env.items()))
        ctx.say(f"median of {plan.repeat} forward+backward runs after a warm-up; the first call "
                "of each row is checked against the float32 torch reference")
        for case, intro, build in _steps(ctx, report, plan, cases, divergences, jsd_beta):
            ctx.say(intro)
            t0 = time.perf_counter()
            for what, thunk in build:
                _guard(ctx, report, what, thunk)
            ctx.case_seconds[case] = ctx.case_seconds.get(case, 0.0) + time.perf_counter() - t0
            _write(report, ctx, out_dir)  # a run cut off later still leaves the table so far

    table = _write(report, ctx, out_dir)
    log("")
    log(table)
    log(f"\nwritten: {Path(out_dir) / 'device_bench.md'}, {Path(out_dir) / 'device_bench.json'} "
        f"({time.perf_counter() - ctx.start:.0f} s in all: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in ctx.case_seconds.items()) + ")")
    if ctx.failures:
        log(f"\nFAILED: {len(ctx.failures)} fastdistill row(s) wrong or crashed:")
        for f in ctx.failures:
            log(f"FAILED: {f}")
    else:
        log("\nevery fastdistill row agrees with the float32 reference")
    return report, ctx.failures
