"""Property-based checks (hypothesis): every backend of kd_loss, sparse_kd_loss and
softlabels.kd_loss against the float64 reference, over shapes that are not
multiples of any block, input dtypes, ignore masks, temperatures across the
supported range, divergences and their parameters, reductions, and rows made
non-finite (NaN, +inf, all -inf) at random positions.

Derandomized (the same examples every run), so CI never flakes; the example
budgets keep the module near a minute on two cores (the Triton interpreter
gets fewer examples and smaller shapes)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastdistill as fd
import fastdistill._backend as _backend
from fastdistill import softlabels as sl

AVAILABLE = ["torch"] + [n for n, (ok, _) in _backend.backend_status().items()
                         if ok and n in ("cpp", "triton")]
EXAMPLES = {"torch": 80, "cpp": 120, "triton": 25}
MAX_V = {"torch": 700, "cpp": 2100, "triton": 140}  # cpp: past its 2048-element block
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPOILS = ("nan", "posinf", "all_neginf")


def _settings(backend):
    return settings(max_examples=EXAMPLES[backend], deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck), database=None)


@st.composite
def _case(draw, backend, *, teacher_spoils=True):
    """Shapes, dtype, keywords, labels and where the inputs are spoiled."""
    N = draw(st.integers(1, 5))
    V = draw(st.integers(2, MAX_V[backend]))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1.0, 4.0, 30.0]))
    lo, hi = fd.kd.TEMPERATURE_RANGE
    temperature = draw(st.one_of(st.just(1.0), st.floats(lo, hi)))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    ignore = draw(st.lists(st.booleans(), min_size=N, max_size=N))
    hard_weight = draw(st.sampled_from([0.0, 0.0, 0.3]))
    sides = ("s", "t") if teacher_spoils else ("s",)
    spoils = draw(st.lists(st.tuples(st.integers(0, N - 1), st.sampled_from(sides),
                                     st.sampled_from(SPOILS)), max_size=2))
    neg_inf_cols = draw(st.booleans())  # some legitimate -inf teacher logits (probability 0)
    return dict(N=N, V=V, dtype=DTYPES[dtype], seed=seed, scale=scale, temperature=temperature,
                reduction=reduction, ignore=ignore, hard_weight=hard_weight, spoils=spoils,
                neg_inf_cols=neg_inf_cols)


def _inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    N, V = c["N"], c["V"]
    s = (torch.randn(N, V, generator=g) * c["scale"]).to(c["dtype"])
    t = (torch.randn(N, V, generator=g) * c["scale"]).to(c["dtype"])
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.tensor(c["ignore"])] = -100
    for r, side, kind in c["spoils"]:
        x = s if side == "s" else t
        if kind == "all_neginf":
            x[r] = -math.inf
        else:
            x[r, int(torch.randint(0, V, (1,), generator=g))] = math.nan if kind == "nan" else math.inf
    return s, t, labels


def _bad_rows(c):
    """Rows the non-finite rule makes NaN: spoiled and not ignored."""
    bad = torch.zeros(c["N"], dtype=torch.bool)
    for r, _, _ in c["spoils"]:
        bad[r] = not c["ignore"][r]
    return bad


def _compare(loss, grad, want_loss, want_grad, c, rtol):
    """NaN exactly where the reference has NaN (by row), the rest close."""
    half = c["dtype"] != torch.float32
    if c["reduction"] == "none":
        assert torch.equal(torch.isnan(loss), torch.isnan(want_loss))
        keep = ~torch.isnan(want_loss)
        assert_close_rel(loss[keep], want_loss[keep], rtol, "loss")
    else:
        if torch.isnan(want_loss):
            assert torch.isnan(loss)
        else:
            assert_close_rel(loss, want_loss, rtol, "loss")
    nan = torch.isnan(want_grad)  # whole rows by the non-finite rule; single entries where
    assert torch.equal(torch.isnan(grad), nan)  # a finite row's loss is infinite (inf - inf)
    assert_close_rel(grad[~nan], want_grad[~nan], 1e-2 if half else rtol, "grad")


def assert_close_rel(actual, expected, rtol, what):
    """Element-wise rtol with an absolute floor of rtol × the largest finite magnitude
    (a value that is 0 in exact arithmetic is a few ulps of its terms away from 0)."""
    actual, expected = actual.double(), expected.double()
    fin = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), fin), what
    assert torch.equal(actual[~fin], expected[~fin]), what  # the same infinities
    scale = expected[fin].abs().max().item() if fin.any() else 0.0
    floor = 1.0 if what == "loss" else 1e-2
    torch.testing.assert_close(actual[fin], expected[fin], rtol=rtol,
                               atol=rtol * max(scale, floor), msg=lambda m: f"{what}: {m}")


def _run(fn, x):
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    loss.sum().backward() if loss.dim() else loss.backward()
    return loss.detach(), x.grad


def _div_kw(draw_div):
    div, beta, skew, taid_t = draw_div
    return dict(divergence=div, beta=beta, skew=skew, taid_t=taid_t if div == "taid" else None)


_DIVS = st.tuples(st.sampled_from(fd.DIVERGENCES),
                  st.floats(*fd.kd.BETA_RANGE), st.floats(0.0, fd.kd.SKEW_MAX),
                  st.one_of(st.just(0.0), st.floats(fd.kd.TAID_T_MIN, 1.0)))


@pytest.mark.parametrize("backend", AVAILABLE)
def test_kd_loss_matches_float64_reference(backend):
    @_settings(backend)
    @given(c=_case(backend), div=_DIVS)
    def check(c, div):
        s, t, labels = _inputs(c)
        kw = dict(_div_kw(div), temperature=c["temperature"], labels=labels,
                  hard_weight=c["hard_weight"], reduction=c["reduction"])
        want = _run(lambda x: fd.kd_loss(x, t.double(), backend="torch", **kw), s.double())
        got = _run(lambda x: fd.kd_loss(x, t, backend=backend, **kw), s)
        _compare(*got, *want, c, 2e-3)
        if c["reduction"] == "none":
            assert torch.equal(torch.isnan(got[0]), _bad_rows(c))

    check()


def _sparse_teacher(c, s, K, tail):
    g = torch.Generator().manual_seed(c["seed"] + 1)
    t = torch.randn(c["N"], c["V"], generator=g) * c["scale"]
    if tail == "none":
        return fd.sample_teacher(t, K, temperature=c["temperature"], generator=g)
    lp, ids = torch.log_softmax(t / c["temperature"], -1).topk(min(K, c["V"]), -1)
    lp[:, -1:] = torch.where(torch.rand(c["N"], 1, generator=g) < 0.3, -math.inf, lp[:, -1:])
    return ids, lp  # some rows end in a padding entry


@pytest.mark.parametrize("backend", AVAILABLE)
def test_sparse_kd_loss_matches_float64_reference(backend):
    @_settings(backend)
    @given(c=_case(backend, teacher_spoils=False), div=_DIVS,
           tail=st.sampled_from(fd.kd.sparse.TAILS), K=st.integers(1, 40))
    def check(c, div, tail, K):
        s, _, labels = _inputs(c)
        kw = _div_kw(div)
        if kw["divergence"] == "taid" or (tail == "none" and kw["divergence"] != "forward_kl"):
            kw["divergence"] = "forward_kl"
        kw.pop("taid_t")
        ids, lp = _sparse_teacher(c, s, K, tail)
        kw.update(tail=tail, temperature=c["temperature"], labels=labels,
                  hard_weight=c["hard_weight"], reduction=c["reduction"])
        want = _run(lambda x: fd.sparse_kd_loss(x, ids, lp.double(), backend="torch", **kw),
                    s.double())
        got = _run(lambda x: fd.sparse_kd_loss(x, ids, lp, backend=backend, **kw), s)
        _compare(*got, *want, c, 2e-3)

    check()


@pytest.mark.parametrize("backend", AVAILABLE)
def test_softlabels_kd_loss_matches_float64_reference(backend):
    @_settings(backend)
    @given(c=_case(backend, teacher_spoils=False),
           codec=st.sampled_from([("topk", 16), ("topk", 8), ("sampled", None)]),
           K=st.integers(1, 40), div=st.sampled_from(("forward_kl", "reverse_kl", "jsd", "tvd")))
    def check(c, codec, K, div):
        s, _, labels = _inputs(c)
        g = torch.Generator().manual_seed(c["seed"] + 2)
        t = torch.randn(c["N"], c["V"], generator=g) * c["scale"]
        method, bits = codec
        if method == "topk":
            packed = sl.encode(t, k=min(K, c["V"]), value_bits=bits,
                               temperature=c["temperature"])
        else:
            packed = sl.encode(t, method="sampled", n_samples=K, temperature=c["temperature"],
                               seed=c["seed"] % 1000)
            div = "forward_kl"
        kw = dict(divergence=div, labels=labels, hard_weight=c["hard_weight"],
                  reduction=c["reduction"])
        # the float64 reference: decode, then the sparse reference with the stored tail mass
        want = _run(lambda x: sl.kd_loss(x, packed, backend="torch", **kw), s.double())
        got = _run(lambda x: sl.kd_loss(x, packed, backend=backend, **kw), s)
        _compare(*got, *want, c, 2e-3)

    check()
