"""fd.dd.grouped_gradients against a per-group autograd loop in float64 over
the family of group layouts (issue 15.8): random group ids in random order,
chunk sizes that split a group over several chunks and that pack several
groups into one chunk, empty groups (middle and trailing), first and second
order, and every internal path (sorted slices, gathered indices when the
targets cannot be sliced, the plain-gradient path of a one-group chunk, the
factored Conv2d/Linear/norm pieces and the torch.func fallback).

Tolerances are absolute, scaled by the group's largest gradient entry: a
parameter whose gradient is zero in exact arithmetic (the conv biases of
ConvNet, each followed by instance norm, which removes a per-channel
constant) comes back as round-off from both sides, so a per-parameter
relative error there compares noise with noise."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdistill as fd
from test_dd import Scale, ce, per_group_loop  # Scale: a layer type grouped_gradients does not know

dd = fd.dd
F64 = torch.float64


def ce_dict(outputs, targets):
    """The same loss with targets the chunker cannot slice (one chunk, gathered groups)."""
    return F.cross_entropy(outputs, targets["y"], reduction="none")


def make_model(name):
    if name == "convnet":
        return dd.ConvNet(1, 3, 8, 2, (8, 8))
    if name == "conv_plain":  # conv biases that matter (no norm after them), a strided conv
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 3, stride=2),
                             nn.Flatten(), nn.Linear(27, 3))
    if name == "mlp":  # LayerNorm, the fallback layer, PReLU (fallback too)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.LayerNorm(12), Scale(12), nn.PReLU(),
                             nn.Linear(12, 3))
    raise AssertionError(name)


def assert_groups_equal(got, want, groups, G, tol=1e-12):
    assert len(got) == G
    for k in range(G):
        assert len(got[k]) == len(want[k])
        if not bool((groups == k).any()):  # an empty group: exact zeros
            assert all(t.dtype == F64 and bool((t == 0).all()) for t in got[k]), k
            continue
        scale = max(float(w.abs().max()) for w in want[k])
        for j, (a, b) in enumerate(zip(got[k], want[k])):
            assert a.shape == b.shape and a.dtype == b.dtype == F64
            err = float((a - b).abs().max())
            assert err <= tol * scale, f"group {k} parameter {j}: max error {err:.3g} (scale {scale:.3g})"


CHUNKS = (1, 2, 3, 5, 7, 8, 13, None)  # 7, 8: split 9-sample groups; 13, None: pack several


@pytest.mark.parametrize("name", ["convnet", "conv_plain", "mlp"])
@pytest.mark.parametrize("seed", range(4))
def test_grouped_gradients_equal_the_per_group_loop_over_the_family(name, seed):
    torch.manual_seed(seed)
    model = make_model(name).double()
    B, G = 20, 6
    x = torch.randn(B, 1, 8, 8, dtype=F64)
    y = torch.randint(0, 3, (B,))
    groups = torch.randint(0, 4, (B,))  # random order, independent of the labels
    groups[groups == 1] = 4  # group 1 empty in the middle, group 5 empty at the end
    want = per_group_loop(model, x, y, groups, G)
    for chunk in CHUNKS:
        got = dd.grouped_gradients(model, ce, x, y, groups, num_groups=G, chunk_size=chunk)
        assert_groups_equal(got, want, groups, G)
    # already sorted ids (no reordering) and unsliceable targets (gathered members)
    order = torch.argsort(groups, stable=True)
    for chunk in (3, 7, None):
        got = dd.grouped_gradients(model, ce, x[order], y[order], groups[order], num_groups=G,
                                   chunk_size=chunk)
        assert_groups_equal(got, want, groups, G)
    got = dd.grouped_gradients(model, ce_dict, x, {"y": y}, groups, num_groups=G, chunk_size=3)
    assert_groups_equal(got, want, groups, G)


@pytest.mark.parametrize("name", ["convnet", "mlp"])
def test_grouped_gradients_second_order_over_the_family(name):
    """create_graph=True: the grouped gradients and a function of them
    differentiated w.r.t. the inputs equal the loop's, for every chunk plan."""
    torch.manual_seed(5)
    model = make_model(name).double()
    B, G = 17, 5
    x0 = torch.randn(B, 1, 8, 8, dtype=F64)
    y = torch.randint(0, 3, (B,))
    groups = torch.randint(0, 3, (B,))
    probe = [[torch.randn_like(p) for p in model.parameters()] for _ in range(G)]

    def functional(gs):
        return sum((g * v).sum() for row, prow in zip(gs, probe) for g, v in zip(row, prow))

    xr = x0.clone().requires_grad_()
    want = per_group_loop(model, xr, y, groups, G, create_graph=True)
    want_dx = torch.autograd.grad(functional(want), xr)[0]
    for chunk in (2, 4, 7, None):
        xs = x0.clone().requires_grad_()
        got = dd.grouped_gradients(model, ce, xs, y, groups, num_groups=G, chunk_size=chunk,
                                   create_graph=True)
        assert_groups_equal([[t.detach() for t in row] for row in got],
                            [[t.detach() for t in row] for row in want], groups, G)
        dx = torch.autograd.grad(functional(got), xs, allow_unused=True)[0]
        torch.testing.assert_close(dx, want_dx, rtol=1e-10, atol=1e-12 * float(want_dx.abs().max()))


@pytest.mark.parametrize("seed", [0, 1])
def test_issue_15_8_repro_is_round_off_on_zero_gradients(seed):
    """The reported case: a 9-sample group split over chunks of 7. Every
    parameter agrees with the loop to round-off of the group's scale; the
    only large *relative* errors are on the conv biases, whose exact gradient
    is zero (instance norm right after them), where both sides are noise."""
    torch.manual_seed(seed)
    net = dd.ConvNet(1, 3, 8, 2, (8, 8)).double()
    x = torch.randn(20, 1, 8, 8, dtype=F64)
    y = torch.randint(0, 3, (20,))
    groups = torch.randint(0, 4, (20,))
    got = dd.grouped_gradients(net, ce, x, y, groups, num_groups=5, chunk_size=7)
    want = per_group_loop(net, x, y, groups, 5)
    assert_groups_equal(got, want, groups, 5, tol=1e-13)
    names = [n for n, _ in net.named_parameters()]
    for k in range(4):
        scale = max(float(w.abs().max()) for w in want[k])
        for n, a, b in zip(names, got[k], want[k]):
            if n.startswith("features.") and n.endswith(".bias") and isinstance(
                    net.features[int(n.split(".")[1])], nn.Conv2d):
                assert float(a.abs().max()) < 1e-13 * scale and float(b.abs().max()) < 1e-13 * scale
    sizes = torch.bincount(groups, minlength=5)
    assert int(sizes.max()) > 7  # a group larger than chunk_size, split over chunks


def test_chunk_plans_cover_every_sample_once():
    """_chunks over random sorted ids: contiguous, covering, at most chunk_size,
    and a chunk holds several groups only when each is whole in it."""
    gen = torch.Generator().manual_seed(0)
    for _, chunk in itertools.product(range(50), (1, 2, 3, 5, 7)):
        B = int(torch.randint(1, 30, (1,), generator=gen))
        g = torch.sort(torch.randint(0, 6, (B,), generator=gen)).values
        plan = dd.grads._chunks(g, chunk)
        assert plan[0][0] == 0 and plan[-1][1] == B
        assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
        for start, stop in plan:
            assert 0 < stop - start <= chunk or (B <= chunk and (start, stop) == (0, B))
            ids = g[start:stop].unique()
            if len(ids) > 1:  # packed: every group in it is whole
                for k in ids.tolist():
                    assert int((g == k).sum()) == int((g[start:stop] == k).sum())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_gradients_on_cuda_equal_the_loop():
    torch.manual_seed(3)
    model = make_model("convnet").double().cuda()
    x = torch.randn(20, 1, 8, 8, dtype=F64, device="cuda")
    y = torch.randint(0, 3, (20,), device="cuda")
    groups = torch.randint(0, 4, (20,), device="cuda")
    want = per_group_loop(model, x, y, groups, 5)
    for chunk in (3, 7, None):
        got = dd.grouped_gradients(model, ce, x, y, groups, num_groups=5, chunk_size=chunk)
        assert_groups_equal(got, want, groups, 5, tol=1e-11)


@pytest.mark.parametrize("name", ["convnet", "conv_plain", "mlp"])
def test_first_order_results_hold_no_graph(name):
    """create_graph=False: plain tensors (the torch.func fallback used to return
    results tied to the live parameters, keeping a graph alive per call)."""
    torch.manual_seed(0)
    model = make_model(name).double()
    x = torch.randn(9, 1, 8, 8, dtype=F64)
    y = torch.randint(0, 3, (9,))
    groups = torch.randint(0, 3, (9,))
    for chunk in (2, None):
        got = dd.grouped_gradients(model, ce, x, y, groups, num_groups=4, chunk_size=chunk)
        assert not any(t.requires_grad for row in got for t in row), chunk
