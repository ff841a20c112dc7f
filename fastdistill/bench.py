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
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import _backend, cpu_cache
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


_MALLOC = {"pinned": False}


def fix_malloc_thresholds() -> None:
    """Make glibc return every large freed buffer to the OS (fixed mmap threshold),
    so the RSS peak sees each allocation instead of reused, already-resident heap.
    The price: every buffer over 128 KiB is fresh memory, first touched in the
    timed region (``--malloc glibc`` leaves the allocator as a normal process has
    it, and then reports no memory column)."""
    _MALLOC["pinned"] = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD; also stops its dynamic growth
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def measure(fn: Callable[[], None], prep: Callable[[], object], *, repeat: int, warmup: int):
    """Best wall time of fn(prep()) and the largest extra peak RSS (bytes) seen.

    The cpp kernels keep their gradient buffers resident between steps
    (``fastdistill.cpu_cache``): the cache starts empty for each measured
    implementation, and its idle bytes at the start of a run count as that
    run's memory, so the extra peak is measured from a baseline without them."""
    times, extra = [], None
    cpu_cache.empty_cache()
    for i in range(warmup + repeat):
        state = prep()
        can_peak = _reset_peak()
        held = cpu_cache.idle_bytes()
        rss0 = _status_kb("VmRSS")
        t0 = time.perf_counter()
        fn(state)
        dt = time.perf_counter() - t0
        hwm = _status_kb("VmHWM")
        del state
        if i < warmup:
            continue
        times.append(dt)
        if _MALLOC["pinned"] and can_peak and rss0 is not None and hwm is not None:
            extra = max(extra or 0, (hwm - rss0) * 1024 + held)
    cpu_cache.empty_cache()
    return min(times), extra


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    impl: str
    seconds: float | None  # None: a peer that is not installed here (the row says how to get it)
    extra_peak_mb: float | None
    vs_eager: float | None = None
    vs_compile: float | None = None
    vs_floor: float | None = None
    vs_peer: float | None = None   # the peer's time / this row's (see PEERS)
    notes: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    floor_seconds: dict[str, float] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def _sync(device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so wall time means device time."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def streaming_floor(n: int, v: int, repeat: int, device="cpu") -> float:
    """Best time of c = a + b over (n, v) fp32: reads two N×V tensors, writes one."""
    a, b = torch.randn(n, v, device=device), torch.randn(n, v, device=device)
    c = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeat + 1):
        _sync(device)
        t0 = time.perf_counter()
        torch.add(a, b, out=c)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _timed(log, rows: list[Row], started: float) -> None:
    """One progress line per case (its times are in the table printed at the end)."""
    if rows:
        r = rows[0]
        log(f"  {r.op} {r.shape} {r.dtype}: {len(rows)} implementation"
            f"{'' if len(rows) == 1 else 's'} timed ({time.perf_counter() - started:.0f} s)")


# ----------------------------------------------------------------- cases

# What a user would pick instead of fastdistill in each case, for the
# "x faster than peer" column: (op prefix, label prefix of the peer rows).
LIGER_MISSING = "Liger-Kernel: liger-kernel not installed (pip install liger-kernel)"

PEERS = {
    "fused_linear_kd": "Liger-Kernel",
    "sparse_kd": "densify + kd_loss",
    "softlabel_kd": "decode to dense + kd_loss",
    # issue 5's target is "3x faster than both": the ratio is to the faster peer
    "sinkhorn_divergence": ("POT", "GeomLoss"),
    "sinkhorn[": ("POT", "GeomLoss"),
    "sinkhorn_kd": "torch eager (SinKD reference port)",
    "dc_outer_step": "per-class loop",
    "per_sample_grad_norms": "torch.func",
}

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
    rows, t0 = [], time.perf_counter()
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
    _timed(log, rows, t0)
    _ratios(report, rows, shape)


def gemm_floor(n: int, h: int, v: int, repeat: int, *, reuse_outputs: bool = False,
               device="cpu", dtype: torch.dtype = torch.float32) -> float:
    """Best time of the four GEMMs every fused-linear KD step needs: student and
    teacher logits, grad_hidden and grad_weight (fp32 unless ``dtype``). Each into
    a fresh output (what a step allocates), or with ``reuse_outputs`` into outputs
    written by the warm-up already (the GEMMs' arithmetic alone, no page faults)."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, h, generator=g, device=device).to(dtype)
    w = torch.randn(v, h, generator=g, device=device).to(dtype)
    if reuse_outputs:
        outs = tuple(torch.empty(shape, device=device, dtype=dtype)
                     for shape in ((n, v), (n, v), (n, h), (v, h)))
    best = float("inf")
    for _ in range(repeat + 1):
        _sync(device)
        t0 = time.perf_counter()
        if reuse_outputs:
            z, t, gh, gw = outs
            torch.mm(x, w.t(), out=z)
            torch.mm(x, w.t(), out=t)
            torch.mm(z, w, out=gh)
            torch.mm(t.t(), x, out=gw)
        else:
            z = x @ w.t()
            t = x @ w.t()
            _ = z @ w
            _ = t.t() @ x
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        del z, t
    return best


def _fused_linear_impls(divergence: str, with_compile: bool):
    """(label, loss(h, W, th, tW, labels)) for the fused-linear case."""
    from .kd import fused_linear_kd_loss

    def naive(h, w, th, tw, labels):
        with torch.no_grad():
            t = th @ tw.t()
        return ref.kd_loss(h @ w.t(), t, divergence=divergence)

    impls = [("torch eager (materialized logits)", naive)]
    if with_compile:
        impls.append(("torch.compile (materialized logits)", torch.compile(naive)))
    if divergence == "jsd":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        except ImportError:
            impls.append((LIGER_MISSING, None))  # a row that says so, not a silent gap
        else:
            liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5)
            impls.append(("Liger-Kernel LigerFusedLinearJSDLoss", liger))
    impls.append(("fastdistill fused_linear_kd_loss",
                  lambda h, w, th, tw, labels: fused_linear_kd_loss(h, w, th, tw,
                                                                   divergence=divergence)))
    return impls


def bench_fused_linear(report: Report, n: int, h: int, v: int, divergence: str, *, repeat: int,
                       with_compile: bool = True, log=print) -> None:
    """Forward+backward of the LM head + KD loss; the floor is the four GEMMs alone."""
    g = torch.Generator().manual_seed(0)
    hid, th = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) / h**0.5
    tw = torch.randn(v, h, generator=g) * 2 / h**0.5
    labels = torch.randint(0, v, (n,), generator=g)
    shape = f"{n}x{h}x{v}"
    report.floor_seconds[shape] = gemm_floor(n, h, v, repeat)
    report.floor_seconds[f"{shape} GEMMs into reused outputs"] = gemm_floor(n, h, v, repeat,
                                                                            reuse_outputs=True)
    rows, missing, t0 = [], [], time.perf_counter()
    for label, loss_fn in _fused_linear_impls(divergence, with_compile):
        if loss_fn is None:
            missing.append(Row(f"fused_linear_kd[{divergence}]", shape, "float32", label, None, None))
            log(f"  skipped {label}")
            continue

        def prep():
            return hid.clone().requires_grad_(), w.clone().requires_grad_()

        def run(state):
            x, wx = state
            loss_fn(x, wx, th, tw, labels).backward()

        warm = 2 if ("compile" in label or "Liger" in label) else 1
        secs, extra = measure(run, prep, repeat=repeat, warmup=warm)
        row = Row(f"fused_linear_kd[{divergence}]", shape, "float32", label, secs,
                  None if extra is None else extra / MB,
                  notes="grad_weight (V×H fp32) is part of every implementation's peak")
        rows.append(row)
    _timed(log, rows, t0)
    reused = report.floor_seconds[f"{shape} GEMMs into reused outputs"]
    for r in rows:
        if reused:
            r.notes += f"; {r.seconds / reused:.1f}x the GEMMs into reused outputs"
    _ratios(report, rows, shape)
    report.rows.extend(missing)


def _bench_student_losses(report: Report, op: str, base: torch.Tensor, impls, *, repeat: int,
                          log=print) -> None:
    """Forward+backward of each (label, loss(student logits)) on fresh student
    logits (a non-leaf view of a fresh copy of ``base``, as an LM head gives)."""
    n, v = base.shape
    shape = f"{n}x{v}"
    rows, t0 = [], time.perf_counter()
    for label, loss_fn in impls:
        def prep():
            leaf = base.clone().requires_grad_()
            return leaf, leaf.view(n, v)

        def run(state):
            loss_fn(state[1]).backward()

        secs, extra = measure(run, prep, repeat=repeat, warmup=1)
        row = Row(op, shape, "float32", label, secs, None if extra is None else extra / MB)
        rows.append(row)
    _timed(log, rows, t0)
    _ratios(report, rows, shape)


def bench_sparse(report: Report, n: int, v: int, k: int, *, repeat: int, with_eager: bool = True,
                 log=print) -> None:
    """Forward KL against a top-k teacher (tail bucket), against densifying that
    teacher (a -inf-filled N×V row with the k log-probabilities scattered in,
    what users do today) and the dense kd_loss, each with and without
    inplace_backward. The densify step is timed and its N×V buffer counts in
    the peak: it is the cost a sparse kernel avoids."""
    from .kd import sparse_kd_loss

    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, v, generator=g) * 2
    lp, ids = torch.log_softmax(torch.randn(n, v, generator=g) * 2, -1).topk(k, -1)

    def densify():
        return torch.full((n, v), float("-inf")).scatter_(1, ids, lp)

    impls = []
    if with_eager:
        impls.append(("torch eager (sparse reference)",
                      lambda s: sparse_kd_loss(s, ids, lp, backend="torch")))
    if _backend.backends()["cpp"]:
        impls += [
            ("densify + kd_loss cpp", lambda s: kd_loss(s, densify(), backend="cpp")),
            ("densify + kd_loss cpp inplace_backward",
             lambda s: kd_loss(s, densify(), backend="cpp", inplace_backward=True)),
            ("fastdistill sparse_kd_loss cpp", lambda s: sparse_kd_loss(s, ids, lp, backend="cpp")),
            ("fastdistill sparse_kd_loss cpp inplace_backward",
             lambda s: sparse_kd_loss(s, ids, lp, backend="cpp", inplace_backward=True)),
        ]
    _bench_student_losses(report, f"sparse_kd[forward_kl top-{k}]", base, impls, repeat=repeat,
                          log=log)


def bench_softlabels(report: Report, n: int, v: int, k: int, *, repeat: int,
                     with_eager: bool = True, log=print) -> None:
    """Forward KL from packed top-k soft labels (8-bit values), against decoding
    them to a dense N×V teacher (``SoftLabels.to_dense()``) and the dense
    kd_loss, each with and without inplace_backward; the decode is timed."""
    from .softlabels import encode
    from .softlabels import kd_loss as packed_kd_loss

    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, v, generator=g) * 2
    labels = encode(torch.randn(n, v, generator=g) * 2, k=k, value_bits=8)
    impls = []
    if with_eager:
        impls.append(("torch eager (decode + sparse reference)",
                      lambda s: packed_kd_loss(s, labels, backend="torch")))
    if _backend.backends()["cpp"]:
        impls += [
            ("decode to dense + kd_loss cpp", lambda s: kd_loss(s, labels.to_dense(), backend="cpp")),
            ("decode to dense + kd_loss cpp inplace_backward",
             lambda s: kd_loss(s, labels.to_dense(), backend="cpp", inplace_backward=True)),
            ("fastdistill softlabels.kd_loss cpp", lambda s: packed_kd_loss(s, labels, backend="cpp")),
            ("fastdistill softlabels.kd_loss cpp inplace_backward",
             lambda s: packed_kd_loss(s, labels, backend="cpp", inplace_backward=True)),
        ]
    _bench_student_losses(report, f"softlabel_kd[top-{k} 8-bit]", base, impls, repeat=repeat,
                          log=log)


def _ratios(report: Report, rows: list[Row], shape: str, *, peers: dict | None = None,
            reference: str | None = None) -> None:
    """Fill in each row's ratio to eager (or to the row labelled ``reference``),
    to torch.compile, to the floor and to its peer (``peers``, default PEERS: of
    the same in-place mode when the peer has one, else the fastest peer). Rows
    without a time (a peer not installed, a crash) get no ratios."""
    timed = [r for r in rows if r.seconds]
    if reference is None:
        eager = next((r.seconds for r in timed if "eager" in r.impl), None)
    else:
        eager = next((r.seconds for r in timed if r.impl == reference), None)
    comp = next((r.seconds for r in timed if "compile" in r.impl), None)
    floor = report.floor_seconds.get(shape)
    table = PEERS if peers is None else peers
    peer_label = next((v for k, v in table.items() if rows and rows[0].op.startswith(k)), None)
    if isinstance(peer_label, str):
        peer_label = (peer_label,)
    found = sorted((r for r in timed if peer_label and r.impl.startswith(peer_label)),
                   key=lambda r: r.seconds)  # the fastest peer first
    for r in timed:
        r.vs_eager = eager / r.seconds if eager else None
        r.vs_compile = comp / r.seconds if comp else None
        r.vs_floor = r.seconds / floor if floor else None
        inplace = "inplace" in r.impl
        peer = next((p for p in found if ("inplace" in p.impl) == inplace), found[0] if found else None)
        if peer is not None and peer is not r and "fastdistill" in r.impl:
            r.vs_peer = peer.seconds / r.seconds
    report.rows.extend(rows)


# ----------------------------------------------------------------- Sinkhorn (issue 5)

def sinkd_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0,
                    epsilon: float = 0.1, n_iters: int = 20) -> torch.Tensor:
    """A faithful torch port of the SinKD formulation (Cui et al. 2024), as in
    tests/test_ot.py: softmax(z/T) rows, the B×B L1 cost from the B×B×V
    differences, the Gibbs kernel exp(−W/ε), n_iters linear-domain
    normalizations (rows, then columns), Σ P⊙W; autograd through it all.
    Divided by B, it is fastdistill's value (uniform marginals 1/B)."""
    p_s = torch.softmax(student / temperature, dim=1)
    p_t = torch.softmax(teacher / temperature, dim=1)
    W = (p_s[:, None, :] - p_t[None, :, :]).abs().sum(-1)
    P = torch.exp(-W / epsilon)
    for _ in range(n_iters):
        P = P / P.sum(dim=1, keepdim=True)
        P = P / P.sum(dim=0, keepdim=True)
    return (P * W).sum()


def geomloss_iterations(diameter: float, blur: float, scaling: float, p: int = 2) -> int:
    """Sinkhorn updates GeomLoss's ε-schedule runs (geomloss.epsilon_schedule:
    diameter^p, then ×scaling^p down to blur^p, then blur^p), not counting
    its final extrapolation step (the one autograd sees)."""
    import numpy as np

    return 2 + len(np.arange(p * np.log(diameter), p * np.log(blur), p * np.log(scaling)))


def geomloss_fixed_eps(n_iters: int, epsilon: float, p: int = 2, spread: float = 1e-3):
    """(blur, diameter, scaling) for GeomLoss to run n_iters updates all within
    a factor (1 + spread)^p of ε = blur^p: no annealing to speak of, so the
    same work as n_iters fixed-ε iterations. GeomLoss always starts its
    schedule at diameter^p; a diameter just above blur makes that start ε."""
    blur = epsilon ** (1 / p)
    diameter = blur * (1 + spread)
    scaling = (1 + spread) ** (-1 / (n_iters - 2.5))
    assert geomloss_iterations(diameter, blur, scaling, p) == n_iters
    return blur, diameter, scaling


def _fast_available(backend: str, log=print) -> bool:
    """Whether fastdistill's ``backend`` runs here (triton without loading the
    C++ extension: a GPU machine need not build it for the triton rows)."""
    ok = _backend._triton_status()[0] if backend == "triton" else _backend.backends().get(backend)
    if not ok:
        log(f"  skipped fastdistill {backend}: unavailable (fastdistill doctor says why)")
    return bool(ok)


def _ot_divergence_impls(epsilon: float, n_iters: int, log=print, fast: str = "cpp"):
    """(label, loss(x, y)) for the point-cloud Sinkhorn divergence, cost |x − y|²/2;
    ``fast`` is the fastdistill backend of the online and auto rows."""
    from .ot import sinkhorn_divergence

    impls = []
    try:
        import warnings

        import ot as pot
    except ImportError as e:
        log(f"  skipped POT: {e} (pip install pot)")
    else:
        def pot_div(x, y):
            # POT's log-domain solver with its envelope gradient (grad="envelope");
            # its other choice, autodiff through 100 iterations, would keep
            # ~2 N×M buffers per iteration (~38 GB here). value = the entropic
            # objective <P, C> + ε KL(P | a⊗b), as fastdistill and GeomLoss use.
            def ot_eps(u, v):
                M = pot.dist(u, v, metric="sqeuclidean") / 2
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return pot.solve(M, reg=epsilon, reg_type="KL", max_iter=n_iters, tol=0.0,
                                     grad="envelope").value
            return ot_eps(x, y) - 0.5 * ot_eps(x, x) - 0.5 * ot_eps(y, y)

        impls.append((f"POT ot.solve sinkhorn_log x3 (envelope, {n_iters} it)", pot_div))
    try:
        from geomloss import SamplesLoss
    except ImportError as e:
        log(f"  skipped GeomLoss: {e} (pip install --no-deps geomloss)")
    else:
        blur, diameter, scaling = geomloss_fixed_eps(n_iters, epsilon)
        gl = SamplesLoss("sinkhorn", p=2, blur=blur, diameter=diameter, scaling=scaling,
                         debias=True, backend="tensorized")
        impls.append((f"GeomLoss SamplesLoss tensorized ({n_iters} it at ε)", gl))
    for backend, mode, what in (("torch", "auto", "dense cost"),
                                (fast, "online", "online: cost tiles rebuilt every half-step"),
                                (fast, "auto", "auto: tensorized, the 3 costs built once")):
        if backend != "torch" and not _fast_available(backend, log):
            continue
        impls.append((f"fastdistill sinkhorn_divergence {backend} ({what})",
                      lambda x, y, backend=backend, mode=mode: sinkhorn_divergence(
                          x, y, epsilon=epsilon, p=2, n_iters=n_iters, mode=mode, backend=backend)))
    return impls


def _geomloss_loop():
    """GeomLoss's Sinkhorn loop and its dense softmin (0.3's _legacy modules,
    0.2's top-level ones), or None."""
    for mod in ("geomloss._legacy", "geomloss"):
        try:
            import importlib

            loop = importlib.import_module(f"{mod}.sinkhorn_divergence").sinkhorn_loop
            softmin = importlib.import_module(f"{mod}.sinkhorn_samples").softmin_tensorized
            return loop, softmin
        except (ImportError, AttributeError):
            continue
    return None


def _ot_sinkhorn_impls(epsilon: float, n_iters: int, log=print, fast: str = "cpp"):
    """(label, value(C, a, b)) for entropic OT on a given cost: ⟨P, C⟩ after
    n_iters (row, column) log-domain updates, forward only (a cost given as
    such has no upstream graph in POT's or GeomLoss's own usage); ``fast`` is
    the fastdistill backend of the fp32 and bf16 rows."""
    import warnings

    from .ot import sinkhorn

    impls = []
    try:
        import ot as pot
    except ImportError as e:
        log(f"  skipped POT: {e} (pip install pot)")
    else:
        def pot_fn(C, a, b):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "did not converge": tol 0 runs every iteration
                P = pot.bregman.sinkhorn_log(a, b, C, epsilon, numItermax=n_iters, stopThr=0.0)
            return (P * C).sum()

        impls.append((f"POT ot.bregman.sinkhorn_log ({n_iters} it)", pot_fn))
    gl = _geomloss_loop()
    if gl is None:
        log("  skipped GeomLoss: not installed (pip install --no-deps geomloss)")
    else:
        loop, softmin = gl

        def gl_fn(C, a, b):
            # the loop runs 1 + len(eps_list) + 1 (extrapolation) symmetric updates
            la, lb = a.log()[None], b.log()[None]
            _, _, g_ab, f_ba = loop(softmin, [la], [lb], [None], [None], [C[None]], [C.T[None]],
                                    [epsilon] * (n_iters - 2), None, debias=False)
            P = torch.exp((f_ba[0][:, None] + g_ab[0][None, :] - C) / epsilon + la[0][:, None] + lb[0][None, :])
            return (P * C).sum()

        impls.append((f"GeomLoss sinkhorn_loop softmin_tensorized ({n_iters} it)", gl_fn))
    how = {"cpp": "one op", "triton": "one kernel per half-step"}.get(fast, fast)
    for backend, dtype in (("torch", torch.float32), (fast, torch.float32), (fast, torch.bfloat16)):
        if backend != "torch" and not _fast_available(backend, log):
            continue
        what = "reference" if backend == "torch" else how + (", cost in bf16" if dtype != torch.float32 else "")
        impls.append((f"fastdistill sinkhorn {backend} ({what})",
                      lambda C, a, b, backend=backend, dtype=dtype: sinkhorn(
                          C.to(dtype), a, b, epsilon=epsilon, n_iters=n_iters, backend=backend).value))
    return impls


def bench_ot_sinkhorn(report: Report, n: int, *, epsilon: float = 0.05, n_iters: int = 100,
                      repeat: int = 1, warmup: int = 0, log=print) -> None:
    """``sinkhorn`` on a given n×n fp32 cost C = ½|x − y|² ~ O(1) (the clouds of
    bench_ot_divergence with d = 64), forward: solve + ⟨P, C⟩."""
    g = torch.Generator().manual_seed(0)
    d = 64
    x = torch.randn(n, d, generator=g) / d**0.5
    y = torch.randn(n, d, generator=g) / d**0.5 * 0.8 + 0.5 / d**0.5
    C = (0.5 * torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist") ** 2).contiguous()
    a = torch.full((n,), 1.0 / n)
    b = torch.full((n,), 1.0 / n)
    C16 = C.to(torch.bfloat16)
    shape = f"{n}x{n}"
    rows, t0 = [], time.perf_counter()
    for label, fn in _ot_sinkhorn_impls(epsilon, n_iters, log):
        value = []
        cost = C16 if "bf16" in label else C  # the conversion is not timed

        def run(_state, fn=fn, cost=cost):
            value.append(float(fn(cost, a, b)))

        secs, extra = measure(run, lambda: None, repeat=repeat, warmup=warmup)
        row = Row(f"sinkhorn[given cost, eps={epsilon} {n_iters} it, fwd]", shape,
                  "bfloat16" if "bf16" in label else "float32", label, secs,
                  None if extra is None else extra / MB, notes=f"<P, C> = {value[-1]:.6f}")
        rows.append(row)
    _timed(log, rows, t0)
    _ratios(report, rows, shape)


def bench_ot_divergence(report: Report, n: int, d: int, *, epsilon: float = 0.05, n_iters: int = 100,
                        repeat: int = 1, warmup: int = 0, log=print) -> None:
    """Forward+backward (w.r.t. both clouds) of the debiased Sinkhorn divergence
    between two clouds of n points in d dimensions, cost |x − y|²/2 ~ O(1)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, d, generator=g) / d**0.5
    y0 = torch.randn(n, d, generator=g) / d**0.5 * 0.8 + 0.5 / d**0.5
    shape = f"{n}x{n}x{d}"
    rows, t0 = [], time.perf_counter()
    for label, loss_fn in _ot_divergence_impls(epsilon, n_iters, log):
        def prep():
            return x0.clone().requires_grad_(), y0.clone().requires_grad_()

        value = []

        def run(state):
            out = loss_fn(*state)
            out.backward()
            value.append(float(out.detach()))

        secs, extra = measure(run, prep, repeat=repeat, warmup=warmup)
        val = value[-1]
        row = Row(f"sinkhorn_divergence[p=2 eps={epsilon} {n_iters} it]", shape, "float32", label,
                  secs, None if extra is None else extra / MB, notes=f"S_eps = {val:.6f}")
        rows.append(row)
    _timed(log, rows, t0)
    _ratios(report, rows, shape)


def bench_sinkd(report: Report, b: int, v: int, *, temperature: float = 2.0, epsilon: float = 0.1,
                n_iters: int = 20, repeat: int = 3, log=print) -> None:
    """Forward+backward of the SinKD loss (L1 cost) on a B×V batch."""
    from .ot import sinkhorn_kd_loss

    g = torch.Generator().manual_seed(0)
    base = torch.randn(b, v, generator=g) * 2
    teacher = torch.randn(b, v, generator=g) * 2
    kw = dict(temperature=temperature, epsilon=epsilon, n_iters=n_iters)
    impls = [
        ("torch eager (SinKD reference port)",
         lambda s: sinkd_reference(s, teacher, temperature, epsilon, n_iters) / b),
    ]
    names = ["torch"] + (["cpp"] if _backend.backends()["cpp"] else [])
    for name in names:
        for mode in ("envelope", "unrolled"):
            impls.append((f"fastdistill sinkhorn_kd_loss {name} {mode}",
                          lambda s, name=name, mode=mode: sinkhorn_kd_loss(
                              s, teacher, gradient=mode, backend=name, **kw)))
    _bench_student_losses(report, f"sinkhorn_kd[l1 T={temperature:g} eps={epsilon:g} {n_iters} it]",
                          base, impls, repeat=repeat, log=log)


# ----------------------------------------------------------------- dataset distillation (issue 6)

def _dd_loss(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


def dc_step_per_class_loop(net, real, real_y, syn, syn_y, classes, backend="auto"):
    """The reference DC outer step: per class, the real gradient and the
    synthetic one (create_graph) by sequential autograd.grad, then the
    per-layer distance; backward into the synthetic images. Returns the loss."""
    from .dd import gradient_match_loss

    params = list(net.parameters())
    total = 0
    for c in range(classes):
        xr, yr = real[real_y == c], real_y[real_y == c]
        gr = torch.autograd.grad(_dd_loss(net(xr), yr).sum(), params)
        gr = [g.detach() for g in gr]
        gs = torch.autograd.grad(_dd_loss(net(syn[syn_y == c]), syn_y[syn_y == c]).sum(), params,
                                 create_graph=True)
        total = total + gradient_match_loss([gr], [list(gs)], "dc", backend=backend)
    total.backward()
    return total.detach()


def dc_step_grouped(net, real, real_y, syn, syn_y, classes, backend="auto"):
    """The same step with fd.dd.grouped_gradients (one pass per side) and one
    gradient_match_loss over all classes and layers. Returns the loss."""
    from .dd import gradient_match_loss, grouped_gradients

    gr = grouped_gradients(net, _dd_loss, real, real_y, real_y, num_groups=classes)
    gs = grouped_gradients(net, _dd_loss, syn, syn_y, syn_y, create_graph=True, num_groups=classes)
    total = gradient_match_loss(gr, gs, "dc", backend=backend)
    total.backward()
    return total.detach()


def bench_dd(report: Report, *, per_class: int = 256, ipc: int = 10, batch: int = 256,
             width: int = 128, repeat: int = 3, log=print) -> None:
    """One DC outer step (ConvNet-3 on 28×28, 10 classes) grouped vs per-class
    loop; per-sample gradient norms of a batch against torch.func vmap(grad)."""
    from torch.func import functional_call, grad, vmap

    from .dd import ConvNet, per_sample_grad_norms

    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = ConvNet(1, 10, width=width)
    real = torch.randn(10 * per_class, 1, 28, 28, generator=g)
    real_y = torch.arange(10).repeat_interleave(per_class)
    syn0 = torch.randn(10 * ipc, 1, 28, 28, generator=g)
    syn_y = torch.arange(10).repeat_interleave(ipc)
    shape = f"{10 * per_class}+{10 * ipc}x28x28 w{width}"
    rows, t0 = [], time.perf_counter()
    for label, fn in (("per-class loop (autograd.grad per class)", dc_step_per_class_loop),
                      ("fastdistill grouped_gradients + gradient_match_loss", dc_step_grouped)):
        secs, extra = measure(lambda s: fn(net, real, real_y, s, syn_y, 10),
                              lambda: syn0.clone().requires_grad_(), repeat=repeat, warmup=1)
        rows.append(Row("dc_outer_step[ipc=%d]" % ipc, shape, "float32", label, secs,
                        None if extra is None else extra / MB))
    _timed(log, rows, t0)
    _ratios(report, rows, shape)

    x = torch.randn(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def one(p, xi, yi):
        return _dd_loss(functional_call(net, p, (xi[None],)), yi[None]).sum()

    def func_norms(_):
        per = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
        return torch.stack([v.reshape(batch, -1).pow(2).sum(1) for v in per.values()]).sum(0).sqrt()

    shape = f"{batch}x1x28x28 w{width}"
    rows, t0 = [], time.perf_counter()
    for label, fn in (("torch.func vmap(grad)", func_norms),
                      ("fastdistill per_sample_grad_norms", lambda _: per_sample_grad_norms(net, _dd_loss, x, y))):
        secs, extra = measure(fn, lambda: None, repeat=repeat, warmup=1)
        rows.append(Row("per_sample_grad_norms", shape, "float32", label, secs,
                        None if extra is None else extra / MB))
    _timed(log, rows, t0)
    _ratios(report, rows, shape)


# ----------------------------------------------------------------- diffusion (issue 17)

DIFFUSION_OPS = ("dmd", "denoising_v_min_snr", "consistency_l2", "consistency_huber",
                 "ddim_eps_cfg")


def diffusion_inputs(shape, schedule):
    """One batch of inputs for every diffusion op (float32, seeded)."""
    g = torch.Generator().manual_seed(0)
    B = shape[0]
    t = torch.randint(0, schedule.num_steps, (B,), generator=g)
    c_skip, c_out = schedule.consistency_scalings(t)
    return dict(a=torch.randn(shape, generator=g), b=torch.randn(shape, generator=g),
                c=torch.randn(shape, generator=g), t=t, c_skip=c_skip, c_out=c_out,
                w=torch.rand(B, generator=g) + 0.5, alpha=schedule.alpha(t),
                sigma=schedule.sigma(t), snr=schedule.snr(t),
                # DDIM: one sampler step for the whole batch, t = 500 -> 450
                ddim_t=500, ddim_t_prev=450,
                ddim_coefs=[f(torch.full((B,), v)) for v in (500, 450)
                            for f in (schedule.alpha, schedule.sigma)])


def diffusion_reference_op(op, d):
    """The op as the reference computes it: f(leaf) -> tensor."""
    from .reference import diffusion as ref

    if op == "dmd":
        return lambda x: ref.dmd_loss(x, d["a"], d["b"], weight=d["w"])
    if op == "denoising_v_min_snr":
        return lambda x: ref.denoising_loss(x, d["a"], d["b"], d["alpha"], d["sigma"], d["snr"],
                                            prediction="v", weighting="min_snr")
    if op.startswith("consistency"):
        metric = "l2" if op.endswith("l2") else "pseudo_huber"
        return lambda x: ref.consistency_loss(x, d["a"], metric=metric, x_t=d["b"],
                                              c_skip=d["c_skip"], c_out=d["c_out"], weight=d["w"])
    return lambda x: ref.ddim_step(d["a"], x, *d["ddim_coefs"], prediction="eps",
                                   guidance_scale=3.0, uncond=d["c"])


def diffusion_fused_op(op, d, schedule, backend="cpp"):
    """The same op through fastdistill.diffusion (one fused pass)."""
    from .diffusion import consistency_loss, ddim_step, denoising_loss, dmd_loss

    if op == "dmd":
        return lambda x: dmd_loss(x, d["a"], d["b"], weight=d["w"], backend=backend)
    if op == "denoising_v_min_snr":
        return lambda x: denoising_loss(x, d["a"], d["b"], d["t"], schedule, prediction="v",
                                        weighting="min_snr", backend=backend)
    if op.startswith("consistency"):
        metric = "l2" if op.endswith("l2") else "pseudo_huber"
        return lambda x: consistency_loss(x, d["a"], metric=metric, x_t=d["b"], c_skip=d["c_skip"],
                                          c_out=d["c_out"], weight=d["w"], backend=backend)
    return lambda x: ddim_step(d["a"], x, d["ddim_t"], d["ddim_t_prev"], schedule,
                               prediction="eps", guidance_scale=3.0, uncond=d["c"],
                               backend=backend)


def _fwd_bwd(fn, leaf, grad_out):
    out = fn(leaf)
    out.backward(grad_out if out.dim() else None)


def bench_diffusion(report: Report, shapes=((64, 3, 64, 64), (64, 1, 28, 28)), *, repeat: int = 5,
                    with_compile: bool = True, log=print) -> None:
    """Each fused op fwd+bwd against the reference eager and torch.compile'd,
    then one DMD2 iteration (digits UNet) with the reference ops and the fused ones."""
    from .diffusion import NoiseSchedule

    schedule = NoiseSchedule("cosine", 1000)
    for shape in shapes:
        d = diffusion_inputs(shape, schedule)
        grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        tag = "x".join(map(str, shape))
        for op in DIFFUSION_OPS:
            impls = [("torch reference (eager)", diffusion_reference_op(op, d))]
            if with_compile:
                impls.append(("torch.compile(reference)",
                              torch.compile(diffusion_reference_op(op, d), dynamic=False)))
            impls.append(("fastdistill cpp (fused)", diffusion_fused_op(op, d, schedule)))
            rows, t0 = [], time.perf_counter()
            for label, fn in impls:
                src = d["b"] if op == "ddim_eps_cfg" else d["c"]
                secs, extra = measure(lambda leaf: _fwd_bwd(fn, leaf, grad_out),
                                      lambda: src.clone().requires_grad_(), repeat=repeat,
                                      warmup=2)
                rows.append(Row(op, tag, "float32", label, secs,
                                None if extra is None else extra / MB))
            _timed(log, rows, t0)
            _ratios(report, rows, tag)
    bench_dmd2_step(report, repeat=repeat, log=log)


def bench_dmd2_step(report: Report, *, batch: int = 64, repeat: int = 5, log=print) -> None:
    """One DMD2 iteration (5 fake-score updates + 1 generator update, digits
    UNet on 8×8, batch 64) with the ops on the torch reference and fused, and
    the share of the iteration the ops themselves take (their isolated
    fwd+bwd at the iteration's shapes: 5 denoising_loss + 1 dmd_loss)."""
    from .diffusion import DiffusionDistiller, DiffusionModel, DigitUNet, NoiseSchedule

    schedule = NoiseSchedule("cosine", 1000)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = DiffusionModel(DigitUNet((1, 8, 8), 10), schedule, "v")
    x = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(256) % 10
    shape = (batch, 1, 8, 8)
    d = diffusion_inputs(shape, schedule)
    tag = f"{batch}x1x8x8 UNet"
    rows, t0 = [], time.perf_counter()
    for label, backend in (("DMD2 step, ops on torch reference", "torch"),
                           ("DMD2 step, fastdistill fused ops", "cpp")):
        old = os.environ.get(_backend.ENV_BACKEND)
        os.environ[_backend.ENV_BACKEND] = backend
        try:
            dist = DiffusionDistiller("dmd2", teacher, iterations=repeat + 2, batch_size=batch,
                                      progress=False)
            state = dist._prepare((x, y))
            secs, _ = measure(lambda _: dist._step_dmd2(0, *state), lambda: None, repeat=repeat,
                              warmup=2)
        finally:
            if old is None:
                os.environ.pop(_backend.ENV_BACKEND)
            else:
                os.environ[_backend.ENV_BACKEND] = old
        grad_out = torch.ones(())
        if backend == "torch":
            ops = [diffusion_reference_op("dmd", d)] + [diffusion_reference_op(
                "denoising_v_min_snr", d)] * 5
        else:
            ops = [diffusion_fused_op("dmd", d, schedule)] + [diffusion_fused_op(
                "denoising_v_min_snr", d, schedule)] * 5
        op_secs, _ = measure(lambda leaf: [_fwd_bwd(f, leaf.clone(), grad_out) for f in ops],
                             lambda: d["c"].clone().requires_grad_(), repeat=repeat, warmup=2)
        rows.append(Row("dmd2_iteration", tag, "float32", label, secs, None,
                        notes=f"ops {op_secs * 1e3:.2f} ms = {100 * op_secs / secs:.1f}% of it"))
    _timed(log, rows, t0)
    eager = rows[0].seconds
    for r in rows:
        r.vs_eager = eager / r.seconds
    report.rows.extend(rows)


# ----------------------------------------------------------------- output

def format_table(report: Report, *, peers: dict | None = None, unit: str = "s",
                 reference: str = "eager") -> str:
    """The markdown table, its floors, peers and environment; times in ``unit``
    ("s" or "ms"); the ratio column "x faster than <reference>"; a "check"
    column when the rows carry one (the device report's correctness checks)."""
    scale = {"s": 1.0, "ms": 1e3}[unit]
    head = ("op", "shape", "dtype", "implementation", f"fwd+bwd {unit}", "extra peak MB",
            f"x faster than {reference}", "x faster than compile", "x faster than peer", "x floor")
    with_check = any(getattr(r, "check", "") for r in report.rows)
    if with_check:
        head += ("check",)
    with_notes = any(r.notes for r in report.rows)
    if with_notes:
        head += ("notes",)
    lines = []
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    for r in report.rows:
        # 4 significant digits: seconds for the large cases, still readable for millisecond ops
        line = (r.op, r.shape, r.dtype, r.impl,
                fmt(None if r.seconds is None else r.seconds * scale, ".4g"),
                fmt(r.extra_peak_mb, ".0f"),
                fmt(r.vs_eager, ".2f"), fmt(r.vs_compile, ".2f"), fmt(r.vs_peer, ".2f"),
                fmt(r.vs_floor, ".1f"))
        line += (getattr(r, "check", "") or "-",) if with_check else ()
        lines.append(line + ((r.notes,) if with_notes else ()))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(str(x).ljust(w) for x, w in zip(line, widths)) + " |" for line in lines]
    places = 1 if unit == "s" else 3  # a GPU's floors are fractions of a millisecond
    floors = ", ".join(f"{k}: {v * 1e3:.{places}f} ms" for k, v in report.floor_seconds.items())
    out.append(f"floors (NxV: one streaming pass reading two N×V fp32 tensors and writing one; "
               f"NxHxV: the four GEMMs of a fused-linear step): {floors}")
    out.append(FLOOR_NOTE + (FUSED_FLOOR_NOTE if any("GEMMs into reused outputs" in k
                                                     for k in report.floor_seconds) else ""))
    out.append(peer_footer(report, peers))
    out.append("environment: " + ", ".join(f"{k}={v}" for k, v in report.env.items()))
    return "\n".join(out)


FLOOR_NOTE = "x floor: the row's time / its case's floor (1.0: as fast as the floor)."
FUSED_FLOOR_NOTE = (
    " The NxHxV floor is the four bare GEMMs of a fused-linear step (student and teacher "
    "logits, grad_hidden, grad_weight), each into a fresh output as an unfused step allocates "
    "them, first-touch page faults included. A fused pass can come in under 1.0: it writes its "
    "logits chunk by chunk into one buffer it reuses, its logit gradient over those logits and "
    "grad_weight into a resident accumulator (addmm_ in place; fastdistill.cpu_cache keeps both "
    "buffers between steps), so it pays no fresh-memory page faults. The \"GEMMs into reused "
    "outputs\" floor is the arithmetic alone: the one a fused pass cannot go below.")


def peer_footer(report: Report, peers: dict | None = None) -> str:
    """The footer line naming each case's peer (``peers``, default PEERS) by the
    op of the table's rows; a peer with no timed row here (not installed, or
    failed) is named as not measured."""
    table = PEERS if peers is None else peers
    parts = []
    for op in dict.fromkeys(r.op for r in report.rows):
        # the longest matching prefix: "sinkhorn[" is not "sinkhorn_kd"'s
        key = max((k for k in table if op.startswith(k)), key=len, default=None)
        if key is None:
            continue
        labels = (table[key],) if isinstance(table[key], str) else tuple(table[key])
        rows = [r for r in report.rows if r.op == op]
        timed = [lab for lab in labels if any(r.impl.startswith(lab) and r.seconds for r in rows)]
        absent = []
        for lab in labels:
            if lab in timed:
                continue
            said = " ".join(f"{r.impl} {r.notes}" for r in rows if r.impl.startswith(lab))
            why = "not installed" if "not installed" in said else "no timing"
            absent.append(f"{lab}: not measured here, {why}")
        text = " / ".join(timed) if timed else "no peer timed, so no ratio"
        parts.append(f"{op} → {text}" + (f" ({'; '.join(absent)})" if absent else ""))
    return ("peer (what a user would pick instead; the same inplace_backward mode; "
            "the faster of several): " + ("; ".join(parts) if parts else "none in this report"))


def save_chart(report: Report, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cases = list(dict.fromkeys((r.op, r.shape, r.dtype) for r in report.rows))
    if not cases:
        return None
    fig, axes = plt.subplots(len(cases), 1, figsize=(11, 1.1 + 0.6 * 5 * len(cases)), squeeze=False)
    for ax, case in zip(axes[:, 0], cases):
        rows = [r for r in report.rows if (r.op, r.shape, r.dtype) == case and r.seconds is not None]
        ax.barh([r.impl for r in rows], [r.seconds for r in rows],
                color=["#c44" if "fastdistill" in r.impl else "#888" for r in rows])
        ax.tick_params(axis="y", labelsize=8)
        floor = report.floor_seconds.get(case[1])
        if floor:
            ax.axvline(floor, color="k", ls="--", lw=1, label="floor")
            ax.legend(loc="lower right", fontsize=8)
        # two lines, from the axes' left edge: one centred line ran off the figure's right
        # edge once the implementation labels had taken the left part of the width
        ax.set_title(f"{case[0]}  {case[1]}  {case[2]}\nforward+backward, lower is better",
                     fontsize=9, loc="left")
        ax.set_xlabel("seconds")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.canvas.draw()
    for ax in axes[:, 0]:  # a title still too wide for the figure: smaller, until it fits
        title = ax._left_title
        while title.get_fontsize() > 5 and \
                title.get_window_extent().x1 > fig.bbox.x1 - 2:
            title.set_fontsize(title.get_fontsize() - 0.5)
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
        "malloc": "pinned 128 KiB mmap threshold" if _MALLOC["pinned"] else "glibc default",
    }


CASES = ("kd", "fused_linear", "sparse", "softlabels", "ot", "dd", "diffusion")
QUICK_CASES = ("kd", "fused_linear", "sparse", "softlabels")  # `make demo`: no ot


# The one message of torch.utils.cpp_extension's import on a machine with a
# CUDA toolkit but no GPU; torch.compile imports it mid-run, which dropped the
# line in among the table's rows.
_NO_CUDA_RUNTIME = "No CUDA runtime is found"


class _DropNoCudaRuntime(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_NO_CUDA_RUNTIME)


def quiet_cpp_extension_import() -> None:
    """Import torch.utils.cpp_extension now, with its "No CUDA runtime is found"
    warning filtered (it says nothing about a CPU benchmark), before anything is
    printed; the filter stays on its logger for later imports' sake."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _DropNoCudaRuntime) for f in logger.filters):
        logger.addFilter(_DropNoCudaRuntime())
    import torch.utils.cpp_extension  # noqa: F401


def run(quick: bool = False, out_dir: str | os.PathLike = "bench/out", divergences=None,
        log=print, cases_to_run=CASES, malloc: str = "pinned") -> Report:
    """The whole report (or the cases named); quick is the `make demo` size
    (well under 3 minutes). malloc: "pinned" (every large buffer fresh, so the
    extra-peak column sees it) or "glibc" (the allocator left as it is)."""
    if malloc not in ("pinned", "glibc"):
        raise ValueError(f'malloc must be "pinned" or "glibc", got {malloc!r}')
    quiet_cpp_extension_import()
    _backend.load_extension()  # a build (or its warning) now, not inside the first timed row
    if malloc == "pinned":
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
    log(f"fastdistill bench: {'N=%d, V=%d, ' % (n, v) if 'kd' in cases_to_run else ''}"
        f"best of {repeat} after warm-up, {torch.get_num_threads()} threads")
    if "kd" in cases_to_run:
        report.floor_seconds[f"{n}x{v}"] = streaming_floor(n, v, repeat + 2)
        for dtype, div, compile_it in cases:
            bench_kd(report, n, v, dtype, div, repeat=repeat, with_compile=compile_it,
                     with_inplace=dtype == torch.float32, log=log)
    if "fused_linear" in cases_to_run:
        fl_n, fl_h, fl_v = (512, 512, 16000) if quick else (2048, 1024, 32000)
        log(f"fused linear KD: N={fl_n}, H={fl_h}, V={fl_v}")
        bench_fused_linear(report, fl_n, fl_h, fl_v, "jsd", repeat=repeat,
                           with_compile=not quick, log=log)
    if "sparse" in cases_to_run:
        sp_n, sp_v, sp_k = (256, 32000, 64) if quick else (4096, 128256, 64)
        log(f"sparse KD: N={sp_n}, V={sp_v}, K={sp_k}")
        bench_sparse(report, sp_n, sp_v, sp_k, repeat=repeat, log=log)
    if "softlabels" in cases_to_run:
        sl_n, sl_v, sl_k = (256, 32000, 64) if quick else (4096, 128256, 64)
        log(f"packed soft labels: N={sl_n}, V={sl_v}, k={sl_k}")
        bench_softlabels(report, sl_n, sl_v, sl_k, repeat=repeat, log=log)
    if "ot" in cases_to_run and quick:
        log("ot: not part of --quick (each point-cloud run takes tens of seconds); skipped")
    if "ot" in cases_to_run and not quick:
        log("Sinkhorn on a given 4096x4096 cost: eps=0.05, 100 iterations, forward (one timed run each)")
        bench_ot_sinkhorn(report, 4096, epsilon=0.05, n_iters=100, log=log)
        log("Sinkhorn divergence: N=M=4096, d=64, eps=0.05, 100 iterations (one timed run each)")
        bench_ot_divergence(report, 4096, 64, epsilon=0.05, n_iters=100, log=log)
        log("SinKD: B=128, V=32000, T=2, eps=0.1, 20 iterations")
        bench_sinkd(report, 128, 32000, repeat=repeat, log=log)
    if "dd" in cases_to_run:
        if quick:
            log("dataset distillation: DC step 10x32 real + 10 synthetic images, width 32")
            bench_dd(report, per_class=32, ipc=1, batch=64, width=32, repeat=repeat, log=log)
        else:
            log("dataset distillation: DC step 10x256 real + 10x10 synthetic, per-sample norms of 256")
            bench_dd(report, repeat=repeat, log=log)
    if "diffusion" in cases_to_run:
        log("diffusion ops: fwd+bwd at 64x3x64x64 and 64x1x28x28; one DMD2 iteration")
        bench_diffusion(report, repeat=repeat, with_compile=not quick, log=log)
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
