"""fd.dd: grouped and per-sample gradients against per-group autograd loops and
torch.func in float64 (first and second order), the matching losses against
per-layer references, DSA's siamese property, and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import fastdistill as fd
from conftest import fused_backends

dd = fd.dd
F64 = torch.float64


def ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


class Scale(nn.Module):
    """A layer type grouped_gradients does not know: the torch.func fallback."""

    def __init__(self, n):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return torch.tanh(x * self.s)


class MLP(nn.Module):
    """Linear on (B, T, d) tokens (T > 1), LayerNorm, the fallback layer, and a
    layer used twice (its pieces add up per sample)."""

    def __init__(self, d=6, h=5, classes=4, T=3):
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.norm = nn.LayerNorm(h)
        self.scale = Scale(h)
        self.shared = nn.Linear(h, h)
        self.head = nn.Linear(h * T, classes, bias=False)

    def forward(self, x):
        z = self.scale(self.norm(self.inp(x)))
        z = torch.relu(self.shared(torch.relu(self.shared(z))))
        return self.head(z.flatten(1))


def models():
    torch.manual_seed(0)
    conv = dd.ConvNet(in_channels=2, num_classes=5, width=6, depth=2, image_size=(9, 7)).double()
    mlp = MLP().double()
    return [
        pytest.param(conv, lambda n: torch.randn(n, 2, 9, 7, dtype=F64), 5, id="convnet"),
        pytest.param(mlp, lambda n: torch.randn(n, 3, 6, dtype=F64), 4, id="mlp"),
    ]


def per_group_loop(model, x, y, groups, G, create_graph=False):
    out = []
    params = list(model.parameters())
    for k in range(G):
        idx = groups == k
        if not idx.any():
            out.append([torch.zeros_like(p) for p in params])
            continue
        loss = ce(model(x[idx]), y[idx]).sum()
        out.append(list(torch.autograd.grad(loss, params, create_graph=create_graph)))
    return out


def per_sample_flat(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return ce(functional_call(model, p, (xi[None],)), yi[None]).sum()

    per = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([v.reshape(x.shape[0], -1) for v in per.values()], 1)


@pytest.mark.parametrize("model,make,classes", models())
def test_grouped_gradients_equal_a_per_group_loop(model, make, classes):
    x = make(11)
    y = torch.randint(0, classes, (11,))
    groups = torch.tensor([0, 3, 3, 0, 1, 3, 3, 0, 3, 1, 3])  # unequal sizes, group 2 empty
    got = dd.grouped_gradients(model, ce, x, y, groups, num_groups=5)  # 4: a trailing empty group
    want = per_group_loop(model, x, y, groups, 5)
    assert len(got) == 5 and all(len(r) == len(list(model.parameters())) for r in got)
    for rg, rw in zip(got, want):
        for a, b in zip(rg, rw):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all((t == 0).all() for t in got[2]) and all((t == 0).all() for t in got[4])
    # chunks: small groups packed together, large ones split into single-group
    # chunks (plain gradients); every plan adds up to the same sums
    for chunk in (1, 2, 3, 5, None):
        chunked = dd.grouped_gradients(model, ce, x, y, groups, num_groups=5, chunk_size=chunk)
        for rg, rw in zip(chunked, want):
            for a, b in zip(rg, rw):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    sorted_ids = torch.tensor([0, 0, 1, 1, 1, 1, 1, 2, 3, 4, 4, 4])
    assert dd.grads._chunks(sorted_ids, 3) == [(0, 2), (2, 5), (5, 7), (7, 9), (9, 12)]
    assert dd.grads._chunks(sorted_ids, 20) == [(0, 12)]


@pytest.mark.parametrize("model,make,classes", models())
def test_grouped_gradients_second_order(model, make, classes):
    # DC's synthetic side: the distance between grouped gradients of synthetic
    # images (create_graph=True) and fixed real ones, differentiated w.r.t. the images
    real, syn = make(8), make(6)
    y_real = torch.randperm(8) % classes  # every class, so every group of y_real % 3
    y_syn = torch.arange(6) % 3
    g_real = dd.grouped_gradients(model, ce, real, y_real, y_real % 3, num_groups=3)
    xs = syn.clone().requires_grad_()
    g_syn = dd.grouped_gradients(model, ce, xs, y_syn, y_syn, num_groups=3, create_graph=True)
    for metric in dd.losses.METRICS:
        got = torch.autograd.grad(dd.gradient_match_loss(g_real, g_syn, metric), xs, retain_graph=True)[0]
        xr = syn.clone().requires_grad_()
        loop = per_group_loop(model, xr, y_syn, y_syn, 3, create_graph=True)
        want = torch.autograd.grad(dd.gradient_match_loss(g_real, loop, metric), xr)[0]
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("model,make,classes", models())
def test_per_sample_norms_and_gram_equal_torch_func(model, make, classes):
    x = make(7)
    y = torch.randint(0, classes, (7,))
    flat = per_sample_flat(model, x, y)
    torch.testing.assert_close(dd.per_sample_grad_norms(model, ce, x, y), flat.norm(dim=1),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dd.per_sample_grad_gram(model, ce, x, y), flat @ flat.T,
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, None])
def test_per_sample_norms_across_sample_chunks(chunk_size):
    model, make, classes = models()[0].values
    x = make(7)
    y = torch.randint(0, classes, (7,))
    want = per_sample_flat(model, x, y).norm(dim=1)
    torch.testing.assert_close(dd.per_sample_grad_norms(model, ce, x, y, chunk_size=chunk_size), want,
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="chunk_size"):
        dd.per_sample_grad_norms(model, ce, x, y, chunk_size=0)


@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    (3, 1, 1, 1), (3, 2, 1, 1), ((3, 2), (2, 1), (0, 2), (1, 2)), (5, 1, 2, 1), (1, 1, 0, 1)])
def test_conv_norms_by_position_grams_equal_the_unfolded_gradients(kernel, stride, padding, dilation):
    # ‖g_i‖² from the Gram matrices of input and output positions (the patches
    # are shifted windows of one input) against the materialized per-sample gradient
    m = nn.Conv2d(4, 5, kernel, stride=stride, padding=padding, dilation=dilation).double()
    a = torch.randn(3, 4, 9, 10, dtype=F64)
    b = torch.randn_like(m(a))
    piece = dd.grads._ConvWeight(m, a, b)
    want = piece.materialize().pow(2).sum(1)
    torch.testing.assert_close(piece._shifted_gram_sqnorms(), want, rtol=1e-10, atol=1e-12)
    # the cost model: wide and small (the standard ConvNet's conv 2 and 3) takes the Gram form,
    # one input channel over many positions (its conv 1) the unfolded product
    wide = nn.Conv2d(128, 128, 3, padding=1)
    assert dd.grads._ConvWeight(wide, torch.zeros(1, 128, 14, 14), torch.zeros(1, 128, 14, 14))._shifted_gram_cheaper()
    first = nn.Conv2d(1, 128, 3, padding=1)
    assert not dd.grads._ConvWeight(first, torch.zeros(1, 1, 28, 28), torch.zeros(1, 128, 28, 28))._shifted_gram_cheaper()


class Norms(nn.Module):
    """Every norm-layer path: GroupNorm with 2 channels per group and one γ of 0
    (x̂ from the input again), InstanceNorm2d's affine, LayerNorm without β
    (the others take Σ b·x̂ from the output)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.ln = nn.LayerNorm(4 * 5 * 5, bias=False)
        self.head = nn.Linear(100, 3)
        with torch.no_grad():
            for norm in (self.gn, self.inorm, self.ln):
                norm.weight.uniform_(0.5, 1.5)
                if norm.bias is not None:
                    norm.bias.normal_()
            self.gn.weight[1] = 0

    def forward(self, x):
        z = torch.relu(self.inorm(self.gn(self.conv(x))))
        return self.head(self.ln(z.flatten(1)))


def test_every_norm_layer_path():
    torch.manual_seed(1)
    model = Norms().double()
    x = torch.randn(9, 2, 5, 5, dtype=F64)
    y = torch.randint(0, 3, (9,))
    groups = torch.tensor([2, 0, 2, 1, 0, 2, 2, 1, 0])
    for got, want in zip(dd.grouped_gradients(model, ce, x, y, groups), per_group_loop(model, x, y, groups, 3)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dd.per_sample_grad_norms(model, ce, x, y, chunk_size=4),
                               per_sample_flat(model, x, y).norm(dim=1), rtol=1e-10, atol=1e-12)
    # second order through every path
    xs = x.clone().requires_grad_()
    gs = dd.grouped_gradients(model, ce, xs, y, groups, create_graph=True)
    got = torch.autograd.grad(sum(g.square().sum() for r in gs for g in r), xs)[0]
    xr = x.clone().requires_grad_()
    loop = per_group_loop(model, xr, y, groups, 3, create_graph=True)
    want = torch.autograd.grad(sum(g.square().sum() for r in loop for g in r), xr)[0]
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_factored_and_materialized_paths_agree():
    # Linear over T tokens: T = 2 takes the factored Gram form (T²(k+m) < km), T = 9 materializes
    for T in (2, 9):
        lin = nn.Linear(40, 30).double()
        x = torch.randn(5, T, 40, dtype=F64)
        y = torch.randint(0, 30, (5,))

        def lf(o, t):
            return F.cross_entropy(o.sum(1), t, reduction="none")

        params = {k: v.detach() for k, v in lin.named_parameters()}
        per = vmap(grad(lambda p, xi, yi: lf(functional_call(lin, p, (xi[None],)), yi[None]).sum()),
                   in_dims=(None, 0, 0))(params, x, y)
        flat = torch.cat([v.reshape(5, -1) for v in per.values()], 1)
        torch.testing.assert_close(dd.per_sample_grad_norms(lin, lf, x, y), flat.norm(dim=1))
        torch.testing.assert_close(dd.per_sample_grad_gram(lin, lf, x, y), flat @ flat.T)


def test_float32_results_keep_the_parameter_dtype():
    net = dd.ConvNet(1, 10, width=4, depth=1, image_size=6)
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 10, (4,))
    g = dd.grouped_gradients(net, ce, x, y, y % 2)
    assert all(t.dtype == torch.float32 and not t.requires_grad for r in g for t in r)
    assert dd.per_sample_grad_norms(net, ce, x, y).shape == (4,)


# ----------------------------------------------------------------- matching losses

def dc_reference(ga, gb):
    """The DC paper's layer distance, written row by row."""
    total = 0.0
    for ra, rb in zip(ga, gb):
        for a, b in zip(ra, rb):
            if a.dim() == 1:
                continue  # biases and norm affines: 0
            a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            for o in range(a2.shape[0]):
                total = total + 1 - torch.dot(a2[o], b2[o]) / (a2[o].norm() * b2[o].norm() + 1e-6)
    return total


def test_gradient_match_loss_equals_per_layer_reference():
    torch.manual_seed(1)
    shapes = [(4, 3, 3, 3), (4,), (5, 36), (5,), (2, 3, 4)]
    ga = [[torch.randn(s, dtype=F64) for s in shapes] for _ in range(3)]
    gb = [[torch.randn(s, dtype=F64) for s in shapes] for _ in range(3)]
    torch.testing.assert_close(dd.gradient_match_loss(ga, gb, "dc"), dc_reference(ga, gb))
    mse = sum(((a - b) ** 2).sum() for ra, rb in zip(ga, gb) for a, b in zip(ra, rb))
    torch.testing.assert_close(dd.gradient_match_loss(ga, gb, "mse"), mse)
    cos = sum(1 - F.cosine_similarity(torch.cat([a.flatten() for a in ra]),
                                      torch.cat([b.flatten() for b in rb]), dim=0, eps=0)
              for ra, rb in zip(ga, gb))
    torch.testing.assert_close(dd.gradient_match_loss(ga, gb, "cos"), cos, rtol=1e-6, atol=0)
    # only 1-D parameters: "dc" is exactly 0
    assert dd.gradient_match_loss([[torch.randn(3)]], [[torch.randn(3)]], "dc").item() == 0
    # differentiable in both arguments
    a = [[t.clone().requires_grad_() for t in r] for r in ga]
    dd.gradient_match_loss(a, gb, "dc").backward()
    assert a[0][1].grad is None and a[0][0].grad.abs().sum() > 0  # 1-D: no contribution


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("metric", dd.losses.METRICS)
def test_gradient_match_loss_backends_agree(backend, metric):
    torch.manual_seed(3)
    shapes = [(5, 3, 3, 3), (5,), (7, 45), (2,), (3, 2, 4), (1, 1), (300, 1100)]
    ga = [[torch.randn(s) for s in shapes] for _ in range(3)]
    gb = [[torch.randn(s) for s in shapes] for _ in range(3)]
    ga[1][0][2] = 0  # a zero row: its norm's subgradient is 0 on every backend
    out = []
    for name in ("torch", backend):
        a = [[t.clone().requires_grad_() for t in r] for r in ga]
        b = [[t.clone().requires_grad_() for t in r] for r in gb]
        loss = dd.gradient_match_loss(a, b, metric, backend=name)
        loss.backward()
        out.append((loss.detach(), [t.grad for r in a for t in r], [t.grad for r in b for t in r]))
    (l0, ga0, gb0), (l1, ga1, gb1) = out
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga0 + gb0, ga1 + gb1):
        if x is None:  # 1-D parameters in "dc": no gradient on the reference path
            assert y is None or (y == 0).all()
        else:
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5 * (1 + x.abs().max().item()))
    with pytest.raises(TypeError, match="float64"):
        dd.gradient_match_loss([[ga[0][0].double()]], [[gb[0][0].double()]], metric, backend=backend)


def test_gradient_match_loss_traces_whole_under_torch_compile():
    # the segment-cosine ops have shape-only (Meta) kernels: fullgraph=True traces them
    if not fd.backends()["cpp"]:
        pytest.skip("cpp unavailable")
    torch.manual_seed(5)
    ga = [[torch.randn(5, 3), torch.randn(4)] for _ in range(2)]
    gb = [[torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)] for _ in range(2)]
    for metric in dd.losses.METRICS:
        def loss(a, b):
            return dd.gradient_match_loss(a, b, metric, backend="cpp")

        torch._dynamo.reset()
        got = torch.compile(loss, fullgraph=True)(ga, gb)
        want = loss(ga, gb)
        torch.testing.assert_close(got, want)
        flat = [t for r in gb for t in r]
        for t, x, y in zip(flat, torch.autograd.grad(got, flat, allow_unused=True),
                           torch.autograd.grad(want, flat, allow_unused=True)):
            # 1-D parameters do not enter "dc": no gradient, or a zero one
            torch.testing.assert_close(torch.zeros_like(t) if x is None else x,
                                       torch.zeros_like(t) if y is None else y)


@pytest.mark.parametrize("shape", [(2, 3, 6, 8), (2, 3, 7, 5), (3, 4, 4), (1, 1, 2, 3)])
def test_convnet_pooling_equals_avg_pool2d_at_every_order(shape):
    """ConvNet's AvgPool2x2 (strided adds forward, strided copies backward) is
    nn.AvgPool2d(2): values, first and second derivatives, odd edges dropped,
    non-contiguous inputs, and under torch.func's vmap(grad)."""
    from fastdistill.dd.nets import AvgPool2x2

    pool = AvgPool2x2()
    assert isinstance(pool, nn.AvgPool2d)
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(pool(x), F.avg_pool2d(x, 2))
    xt = x.detach().transpose(-1, -2).requires_grad_()
    assert torch.allclose(pool(xt), F.avg_pool2d(xt, 2))
    assert torch.autograd.gradcheck(pool, (x,))
    assert torch.autograd.gradgradcheck(pool, (x,))

    if x.dim() < 4:
        return

    def f(p, xi):
        return (p(xi) ** 3).sum()

    got = vmap(grad(lambda xi: f(pool, xi)))(x.detach())
    want = vmap(grad(lambda xi: f(nn.AvgPool2d(2), xi)))(x.detach())
    assert torch.allclose(got, want)
    got2 = vmap(grad(lambda xi: grad(lambda z: f(pool, z))(xi).pow(2).sum()))(x.detach())
    want2 = vmap(grad(lambda xi: grad(lambda z: f(nn.AvgPool2d(2), z))(xi).pow(2).sum()))(x.detach())
    assert torch.allclose(got2, want2)


def test_distribution_attention_and_trajectory_losses():
    torch.manual_seed(2)
    r, s = torch.randn(10, 3, 2, dtype=F64), torch.randn(4, 3, 2, dtype=F64)
    rl, sl = torch.tensor([0, 1] * 5), torch.tensor([0, 1, 1, 1])
    want = sum(((r[rl == c].mean(0) - s[sl == c].mean(0)) ** 2).sum() for c in (0, 1))
    torch.testing.assert_close(dd.distribution_match_loss(r, s, rl, sl), want)
    torch.testing.assert_close(dd.distribution_match_loss(r, s), ((r.mean(0) - s.mean(0)) ** 2).sum())
    with pytest.raises(ValueError, match="no real sample"):
        dd.distribution_match_loss(r, s, rl, torch.tensor([0, 1, 2, 1]))

    fr, fs = torch.randn(6, 4, 5, 5, dtype=F64), torch.randn(3, 4, 5, 5, dtype=F64)

    def att(f):
        a = (f.abs() ** 4).sum(1).flatten(1)
        return a / (a.norm(dim=1, keepdim=True) + 1e-6)

    er, es = torch.randn(6, 7, dtype=F64), torch.randn(3, 7, dtype=F64)
    want = ((att(fr).mean(0) - att(fs).mean(0)) ** 2).sum() * 2 \
        + 0.5 * ((er.mean(0) - es.mean(0)) ** 2).sum()
    got = dd.attention_match_loss([fr, fr], [fs, fs], real_embed=er, syn_embed=es, mmd_weight=0.5)
    torch.testing.assert_close(got, want)

    a, b = [torch.randn(3, 2), torch.randn(4)], [torch.randn(3, 2), torch.randn(4)]
    st = [torch.randn(3, 2), torch.randn(4)]
    flat = [torch.cat([t.flatten() for t in z]) for z in (st, a, b)]
    torch.testing.assert_close(dd.trajectory_match_loss(st, a, b),
                               ((flat[0] - flat[2]) ** 2).sum() / ((flat[1] - flat[2]) ** 2).sum())
    with pytest.raises(ValueError, match="normalizer"):
        dd.trajectory_match_loss(st, b, b)


# ----------------------------------------------------------------- DSA

def test_dsa_same_seed_same_transform_and_differentiable():
    x = torch.rand(6, 3, 16, 16)
    a, b = dd.dsa(x, seed=7), dd.dsa(x.clone(), seed=7)
    assert torch.equal(a, b)
    assert not torch.allclose(a, dd.dsa(x, seed=8))
    # siamese: a batch of different size gets the same transforms on its first samples
    torch.testing.assert_close(dd.dsa(x[:2], seed=7), a[:2])
    # every op alone changes the images and passes gradients to them
    for op in dd.augment.OPS:
        xs = x.clone().requires_grad_()
        out = dd.dsa(xs, seed=3, strategy=op)
        assert out.shape == x.shape
        out.square().sum().backward()
        assert torch.isfinite(xs.grad).all() and xs.grad.abs().sum() > 0
    assert torch.equal(dd.dsa(x, 1, "none"), x)


# ----------------------------------------------------------------- bad input

def test_bad_input():
    net = dd.ConvNet(1, 3, width=4, depth=1, image_size=4)
    x, y = torch.randn(5, 1, 4, 4), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="per-sample losses"):
        dd.grouped_gradients(net, lambda o, t: F.cross_entropy(o, t), x, y, y)
    with pytest.raises(ValueError, match="groups must have shape"):
        dd.grouped_gradients(net, ce, x, y, y[:3])
    with pytest.raises(TypeError, match="integer"):
        dd.grouped_gradients(net, ce, x, y, y.float())
    with pytest.raises(ValueError, match=">= 0"):
        dd.grouped_gradients(net, ce, x, y, y - 5)
    with pytest.raises(ValueError, match="num_groups"):
        dd.grouped_gradients(net, ce, x, y, y, num_groups=1)
    bn = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="training mode"):
        dd.per_sample_grad_norms(bn, ce, x, y)
    dd.per_sample_grad_norms(bn.eval(), ce, x, y)  # eval mode: samples are independent
    inplace = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.ReLU(inplace=True), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="in place"):
        dd.grouped_gradients(inplace, ce, x, y, y)
    with pytest.raises(ValueError, match="metric"):
        dd.gradient_match_loss([[x]], [[x]], "l2")
    with pytest.raises(ValueError, match="same shape"):
        dd.gradient_match_loss([[x]], [[x[:2]]])
    with pytest.raises(ValueError, match="groups"):
        dd.gradient_match_loss([[x]], [[x], [x]])
    with pytest.raises(ValueError, match="unknown operation"):
        dd.dsa(x, 0, "color_blur")
    with pytest.raises(TypeError, match="seed"):
        dd.dsa(x, 0.5)
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(2, 1, 5, 5))
    with pytest.raises(ValueError, match="depth"):
        dd.ConvNet(1, 3, depth=4, image_size=8)
    assert math.isfinite(float(dd.per_sample_grad_norms(net, ce, x, y).sum()))


def test_convnet_with_its_pooling_compiles():
    """AvgPool2x2's autograd.Functions trace under torch.compile: a compiled
    ConvNet gives eager's outputs and input gradients."""
    torch.manual_seed(0)
    net = dd.ConvNet(width=8)
    x = torch.randn(3, 1, 28, 28, requires_grad=True)
    torch._dynamo.reset()
    got = torch.compile(net)(x)
    (g_got,) = torch.autograd.grad(got.square().sum(), x)
    want = net(x)
    (g_want,) = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-5)
