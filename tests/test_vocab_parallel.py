"""kd_loss(..., process_group=...): vocabulary-parallel KD on 2 gloo ranks (CPU).

One spawn of two processes runs every case (process start-up dominates the
cost); each rank writes its loss and its shard's gradient per case to a file,
and the parent compares them, per case, with the single-process
``kd_loss(..., backend="torch")`` on the full vocabulary: the same loss on
every rank, and the concatenated shard gradients equal to the full gradient.
"""
from __future__ import annotations

import math
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastdistill as fd

WORLD = 2
DIVS = fd.DIVERGENCES
FINITE_WITH_NEG_INF_TEACHER = ("forward_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl", "taid")


# ----------------------------------------------------------------- the cases (built alike in every process)

def _case(id, div="forward_kl", *, temperature=1.0, hard_weight=0.0, reduction="mean",
          dtype=torch.float64, widths=(20, 17), lead=(6,), labels="some", neg_inf=False,
          extreme=False, grad_scale=1.0, no_grad=False, taid_t=0.3, all_ignored=False):
    kw = dict(divergence=div, temperature=temperature, hard_weight=hard_weight, reduction=reduction,
              beta=0.3, skew=0.2)
    if div == "taid":
        kw["taid_t"] = taid_t
    return dict(id=id, kw=kw, dtype=dtype, widths=widths, lead=lead, labels=labels,
                neg_inf=neg_inf, extreme=extreme, grad_scale=grad_scale, no_grad=no_grad,
                all_ignored=all_ignored)


def _build_cases():
    cases = []
    # the full grid in float64: every divergence, T, hard weight and reduction
    for div in DIVS:
        for T in (1.0, 2.5):
            for hw in (0.0, 0.4):
                for red in ("mean", "sum", "none"):
                    cases.append(_case(f"f64-{div}-T{T}-hw{hw}-{red}", div, temperature=T,
                                       hard_weight=hw, reduction=red,
                                       grad_scale=1.0 if red == "mean" else 1.7))
    for div in DIVS:
        for T in (1.0, 2.5):
            cases.append(_case(f"f32-{div}-T{T}", div, temperature=T, hard_weight=0.4,
                               dtype=torch.float32))
        # 3-D inputs, other splits (the first shard narrow, the two nearly equal)
        cases.append(_case(f"3d-{div}-none", div, temperature=2.0, hard_weight=0.25,
                           reduction="none", lead=(2, 3), widths=(5, 32)))
        cases.append(_case(f"3d-{div}-mean", div, temperature=1.5, lead=(3, 4), widths=(18, 19),
                           labels="none"))
        cases.append(_case(f"extreme-f32-{div}", div, temperature=2.5, dtype=torch.float32,
                           extreme=True, widths=(150, 150), lead=(4,), labels="none",
                           neg_inf=div in FINITE_WITH_NEG_INF_TEACHER))
        cases.append(_case(f"eval-{div}", div, temperature=1.5, hard_weight=0.2, no_grad=True))
        cases.append(_case(f"all-ignored-{div}", div, hard_weight=0.5, all_ignored=True))
    for div in FINITE_WITH_NEG_INF_TEACHER:
        for hw in (0.0, 0.4):
            cases.append(_case(f"neg-inf-{div}-hw{hw}", div, temperature=2.5, hard_weight=hw,
                               neg_inf=True))
    for taid_t in (0.0, 1.0):
        cases.append(_case(f"taid-endpoint-{taid_t}", "taid", temperature=2.0, taid_t=taid_t,
                           neg_inf=True, hard_weight=0.3))
    # reverse KL is +inf at a row whose teacher has -inf where the student has
    # mass; ignored, that row must leave no NaN anywhere
    cases.append(_case("ignored-infinite-reverse-kl", "reverse_kl", neg_inf=True, labels="ignore-inf"))
    cases.append(_case("bf16", "jsd", temperature=2.0, hard_weight=0.3, dtype=torch.bfloat16))
    return cases


CASES = _build_cases()


def _fused_case(id, div="forward_kl", *, teacher="head", reduction="mean", dtype=torch.float64,
                widths=(23, 18), chunk_size=4, **kw):
    base = dict(divergence=div, temperature=2.0, hard_weight=0.3, reduction=reduction, beta=0.3,
                skew=0.2, student_softcap=3.0, student_logit_scale=0.8, chunk_size=chunk_size)
    if div == "taid":
        base["taid_t"] = 0.4
    if teacher == "head":
        base.update(teacher_softcap=4.0, teacher_logit_scale=1.2)
    base.update(kw)
    return dict(id=id, kw=base, teacher=teacher, dtype=dtype, widths=widths)


FUSED_CASES = (
    [_fused_case(f"fused-{div}", div) for div in DIVS]
    + [_fused_case("fused-logits-none", "jsd", teacher="logits", reduction="none"),
       _fused_case("fused-sum-auto-chunk", "reverse_kl", reduction="sum", chunk_size=None,
                   widths=(30, 11)),
       _fused_case("fused-f32-cpp", "skew_forward_kl", dtype=torch.float32, backend="cpp"),
       _fused_case("fused-bf16", "forward_kl", dtype=torch.bfloat16)]
)
ROW_COUNT_KW = dict(divergence="skew_reverse_kl", temperature=2.0, hard_weight=0.3, skew=0.2)


def _inputs(case, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    V = sum(case["widths"])
    shape = (*case["lead"], V)
    s = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    t = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    s2, t2 = s.view(-1, V), t.view(-1, V)
    w0 = case["widths"][0]
    if case["extreme"]:
        s2[:, 0], s2[:, w0 + 1] = 1e4, -1e4
        t2[:, w0 + 2], t2[:, 3] = 1e4, -1e4
    if case["neg_inf"]:
        t2[1, w0:] = -math.inf   # all of rank 1's shard of row 1: a shard whose max is -inf
        t2[2, 3:8] = -math.inf
    n = s2.shape[0]
    labels = torch.randint(0, V, (n,), generator=g)
    labels[0] = 2            # owned by rank 0
    labels[-1] = V - 1       # owned by rank 1
    if case["labels"] == "none" and case["kw"]["hard_weight"] == 0:
        labels = None
    elif case["labels"] == "ignore-inf":
        labels[1:3] = -100   # the rows with -inf teacher entries
    else:
        labels[min(3, n - 2)] = -100
    if case["all_ignored"]:
        labels.fill_(-100)
    if labels is not None:
        labels = labels.view(case["lead"])
    weights = torch.rand(case["lead"], generator=g, dtype=torch.float64) + 0.5
    return s.to(case["dtype"]), t.to(case["dtype"]), labels, weights


def _loss_and_grad(s, t, labels, weights, case, **extra):
    """The case's loss and d(objective)/d student: objective = weighted row sum
    for reduction='none', grad_scale · loss otherwise."""
    x = s.detach().clone().requires_grad_(not case["no_grad"])
    with torch.set_grad_enabled(not case["no_grad"]):
        loss = fd.kd_loss(x, t, labels=labels, **case["kw"], **extra)
        if case["no_grad"]:
            return loss.detach(), None
        obj = (loss * weights.to(loss.dtype)).sum() if loss.dim() else loss * case["grad_scale"]
        obj.backward()
    return loss.detach(), x.grad


# ----------------------------------------------------------------- the worker (one per rank)

def _shard(x, widths, rank):
    off = sum(widths[:rank])
    return x[..., off:off + widths[rank]]


def _catch(fn):
    try:
        return {"ok": fn()}
    except Exception as exc:  # reported to the parent, which asserts
        return {"error": type(exc).__name__, "message": str(exc), "trace": traceback.format_exc()}


def _bad_inputs(rank, group):
    """Each entry: what rank `rank` saw; every rank must raise the same ValueError."""
    out = {}
    s, t = torch.randn(4, 20 - 3 * rank), torch.randn(4, 20 - 4 * rank)   # rank 1: 17 vs 16
    out["width-mismatch"] = _catch(lambda: fd.kd_loss(s, t, process_group=group))
    s, t = torch.randn(4 + rank, 10), torch.randn(4 + rank, 10)
    out["row-mismatch"] = _catch(lambda: fd.kd_loss(s, t, process_group=group))
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    out["pad"] = _catch(lambda: fd.kd_loss(s, t, vocab_mismatch="pad", process_group=group))
    out["truncate"] = _catch(lambda: fd.kd_loss(s, t, vocab_mismatch="truncate", process_group=group))
    out["inplace"] = _catch(lambda: fd.kd_loss(s * 1, t, inplace_backward=True, process_group=group))
    # labels are global ids: 15 is fine (rank 1 owns it), 20 is past the global V
    ok = torch.tensor([0, 15, -100, 9])
    out["global-label"] = _catch(lambda: fd.kd_loss(s, t, labels=ok, hard_weight=0.5,
                                                    process_group=group).item())
    bad = torch.tensor([0, 20, -100, 9])
    out["label-range"] = _catch(lambda: fd.kd_loss(s, t, labels=bad, hard_weight=0.5,
                                                   process_group=group))
    out["dtype-mismatch"] = _catch(lambda: fd.kd_loss(s.double() if rank else s, t,
                                                      process_group=group))
    out["still-in-sync"] = _catch(lambda: fd.kd_loss(s, t, process_group=group).item())
    return out


def _row_count_chunks(rank, group):
    """vocab_parallel_forward on two row chunks with row_count = the batch's count."""
    from fastdistill.kd import kd_options
    from fastdistill.kd.vocab_parallel import vocab_parallel_forward

    case = _case("row-count", ROW_COUNT_KW["divergence"], temperature=2.0, hard_weight=0.3)
    s, t, labels, _ = _inputs(case, seed=-1)
    opt = kd_options(**ROW_COUNT_KW)
    s, t = _shard(s, case["widths"], rank), _shard(t, case["widths"], rank)
    count = int((labels != -100).sum())
    rows, grads = [], []
    for a, b in ((0, 4), (4, 6)):
        r, g = vocab_parallel_forward(s[a:b], t[a:b], labels[a:b], -100, opt.div_index, opt.param,
                                      opt.temperature, opt.hard_weight, opt.soft_scale, True, True,
                                      group, row_count=count)
        rows.append(r)
        grads.append(g)
    return torch.cat(rows), torch.cat(grads)


def _fused_inputs(case, seed):
    """Full-vocabulary heads (float64) of a fused-linear case, and its labels."""
    g = torch.Generator().manual_seed(2000 + seed)
    N, H, V = 9, 8, sum(case["widths"])
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    d = dict(sh=r(N, H), sw=r(V, H) / H**0.5, sb=r(V) * 0.3, th=r(N, 6), tw=r(V, 6) * 2 / 6**0.5,
             tb=r(V) * 0.3)
    d["tl"] = torch.nn.functional.linear(d["th"], d["tw"], d["tb"]) * 1.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[0], labels[1], labels[4] = 2, V - 1, -100   # owned by rank 0, rank 1; ignored
    return d, labels


def _fused_call(d, labels, case, shard=lambda x: x, **extra):
    """loss and gradients (hidden, weight, bias) of the case's fused_linear_kd_loss;
    ``shard`` cuts a full-vocabulary tensor (dim 0 of weights, last of logits)."""
    dt = case["dtype"]
    x = d["sh"].to(dt).requires_grad_()
    w = shard(d["sw"]).to(dt).requires_grad_()
    b = shard(d["sb"]).to(dt).requires_grad_()
    if case["teacher"] == "head":
        teacher = dict(teacher_hidden=d["th"].to(dt), teacher_weight=shard(d["tw"]).to(dt),
                       teacher_bias=shard(d["tb"]).to(dt))
    else:
        teacher = dict(teacher_logits=shard(d["tl"].t()).t().to(dt))
    loss = fd.fused_linear_kd_loss(x, w, student_bias=b, labels=labels, **teacher,
                                   **{**case["kw"], **extra})
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype)
    (loss * weights).sum().backward() if loss.dim() else (loss * 1.7).backward()
    return loss.detach(), x.grad, w.grad, b.grad


def _fused_run(case, seed, rank, group):
    d, labels = _fused_inputs(case, seed)
    off = sum(case["widths"][:rank])
    return _fused_call(d, labels, case, lambda x: x[off:off + case["widths"][rank]],
                       process_group=group)


def _fused_bad_inputs(rank, group, out):
    d, labels = _fused_inputs(_fused_case("bad"), 0)
    sh, sw, th, tw = d["sh"], d["sw"][: 10 + rank], d["th"], d["tw"][: 10 + rank]
    f = fd.fused_linear_kd_loss
    out["fused-width-mismatch"] = _catch(lambda: f(sh, sw, th, d["tw"][: 10 + 2 * rank],
                                                   process_group=group))
    out["fused-sparse"] = _catch(lambda: f(sh, sw, teacher_sparse=(labels.clamp(min=0)[:, None],
                                                                   torch.zeros(9, 1)),
                                           process_group=group))
    out["fused-pad"] = _catch(lambda: f(sh, sw, th, tw, vocab_mismatch="pad", process_group=group))
    out["fused-chunks-disagree"] = _catch(lambda: f(sh, sw, th, tw, chunk_size=3 + rank,
                                                    process_group=group))
    out["fused-still-in-sync"] = _catch(lambda: f(sh, sw, th, tw, process_group=group).item())


def _worker(rank, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    group = dist.new_group(list(range(WORLD)))
    results = {}
    for i, case in enumerate(CASES):
        def run(case=case, i=i):
            s, t, labels, weights = _inputs(case, i)
            loss, grad = _loss_and_grad(_shard(s, case["widths"], rank), _shard(t, case["widths"], rank),
                                        labels, weights, case, process_group=group)
            return loss, grad
        results[case["id"]] = _catch(run)
    for i, case in enumerate(FUSED_CASES):
        results[case["id"]] = _catch(lambda case=case, i=i: _fused_run(case, i, rank, group))
    results["row-count"] = _catch(lambda: _row_count_chunks(rank, group))
    results["bad"] = _bad_inputs(rank, group)
    _fused_bad_inputs(rank, group, results["bad"])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab_parallel")
    mp.spawn(_worker, args=(str(d / "store"), str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ----------------------------------------------------------------- the parent's checks

def _assert_close_rel(actual, expected, rtol, what, floor):
    """Element-wise rtol with an absolute floor of rtol times the largest magnitude."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, floor),
                               equal_nan=False, msg=lambda m: f"{what}: {m}")


def _unwrap(result, what):
    if "error" in result:
        pytest.fail(f"{what} raised {result['error']}: {result['message']}\n{result['trace']}")
    return result["ok"]


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c["id"] for c in CASES])
def test_matches_single_process(ranks, i):
    case = CASES[i]
    s, t, labels, weights = _inputs(case, i)
    got = [_unwrap(ranks[r][case["id"]], f"rank {r}") for r in range(WORLD)]
    losses = [g[0] for g in got]
    # every rank holds the very same full-vocabulary loss
    assert torch.equal(losses[0], losses[1]), (losses[0], losses[1])
    if case["dtype"] == torch.float64:
        rtol, ref_s, ref_t = 1e-10, s, t
    else:  # low precision against the float64 ground truth
        rtol = 1e-5 if case["dtype"] == torch.float32 else 2e-2
        ref_s, ref_t = s.double(), t.double()
    want_l, want_g = _loss_and_grad(ref_s, ref_t, labels, weights, case, backend="torch")
    want_dtype = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    assert losses[0].dtype == want_dtype and losses[0].shape == want_l.shape
    assert torch.isfinite(losses[0]).all()
    _assert_close_rel(losses[0].double(), want_l, rtol, "loss", floor=1.0)
    if case["all_ignored"]:
        assert (losses[0] == 0).all()
    if case["no_grad"]:
        assert got[0][1] is None
        return
    grads = [g[1] for g in got]
    for r in range(WORLD):
        assert grads[r].dtype == case["dtype"]
        assert grads[r].shape == (*case["lead"], case["widths"][r])
    grad = torch.cat(grads, dim=-1)
    assert torch.isfinite(grad).all()
    _assert_close_rel(grad.double(), want_g, rtol, "grad", floor=1e-2)
    if labels is not None:  # ignored rows: exactly zero gradient
        assert (grad[labels == -100] == 0).all()


def test_row_count_makes_chunks_the_batch_mean(ranks):
    case = _case("row-count", ROW_COUNT_KW["divergence"], temperature=2.0, hard_weight=0.3)
    s, t, labels, _ = _inputs(case, seed=-1)
    kw = dict(ROW_COUNT_KW, labels=labels)
    x = s.clone().requires_grad_()
    fd.kd_loss(x, t, backend="torch", **kw).backward()
    want_rows = fd.kd_loss(s, t, backend="torch", reduction="none", **kw)
    got = [_unwrap(ranks[r]["row-count"], f"rank {r}") for r in range(WORLD)]
    for rows, _ in got:
        _assert_close_rel(rows, want_rows, 1e-10, "rows", floor=1.0)
    grad = torch.cat([g for _, g in got], dim=-1)
    _assert_close_rel(grad, x.grad, 1e-10, "grad", floor=1e-2)


@pytest.mark.parametrize("i", range(len(FUSED_CASES)), ids=[c["id"] for c in FUSED_CASES])
def test_fused_linear_matches_single_process(ranks, i):
    """Each rank holds rows of the heads; the loss, grad_hidden (summed over the
    ranks) and the concatenated weight/bias shard gradients equal the
    single-process fused loss on the full heads."""
    case = FUSED_CASES[i]
    d, labels = _fused_inputs(case, i)
    got = [_unwrap(ranks[r][case["id"]], f"rank {r}") for r in range(WORLD)]
    f64 = dict(case, dtype=torch.float64)
    want = _fused_call(d, labels, f64, backend="torch")
    rtol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(case["dtype"], 2e-2)
    assert torch.equal(got[0][0], got[1][0])
    assert torch.equal(got[0][1], got[1][1])          # grad_hidden: the same full sum everywhere
    _assert_close_rel(got[0][0].double(), want[0], rtol, "loss", floor=1.0)
    _assert_close_rel(got[0][1].double(), want[1], rtol, "grad hidden", floor=1e-2)
    for k, what in ((2, "grad weight"), (3, "grad bias")):
        for r in range(WORLD):
            assert got[r][k].dtype == case["dtype"] and got[r][k].shape[0] == case["widths"][r]
        _assert_close_rel(torch.cat([g[k] for g in got]).double(), want[k], rtol, what, floor=1e-2)
    assert (got[0][1][labels == -100] == 0).all()


@pytest.mark.parametrize("name,match", [
    ("fused-width-mismatch", "same vocabulary width.*rank 1: student 11, teacher 12"),
    ("fused-sparse", "teacher_sparse is not supported with process_group"),
    ("fused-pad", "vocab_mismatch='pad' is not supported with process_group"),
    ("fused-chunks-disagree", "ranks disagree"),
    ("width-mismatch", "same vocabulary width.*rank 1: student 17, teacher 16"),
    ("row-mismatch", "same rows"),
    ("pad", "vocab_mismatch='pad' is not supported with process_group"),
    ("truncate", "vocab_mismatch='truncate' is not supported with process_group"),
    ("inplace", "inplace_backward"),
    ("label-range", r"labels must be in \[0, 20\)"),
    ("dtype-mismatch", "ranks disagree"),
])
def test_bad_input_is_a_clear_error_on_every_rank(ranks, name, match):
    import re

    for r in range(WORLD):
        res = ranks[r]["bad"][name]
        assert res.get("error") == "ValueError", (r, res)
        assert re.search(match, res["message"]), (r, res["message"])


def test_valid_global_labels_and_group_still_in_sync(ranks):
    for name in ("global-label", "still-in-sync", "fused-still-in-sync"):
        vals = [_unwrap(ranks[r]["bad"][name], f"rank {r} {name}") for r in range(WORLD)]
        assert vals[0] == vals[1] and math.isfinite(vals[0])


def test_process_group_without_init_is_a_clear_error():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(ValueError, match="not initialized"):
        fd.kd_loss(torch.randn(2, 5), torch.randn(2, 5), process_group=object())
