"""fastdistill.diffusion.metrics: the Fréchet distance, KID and k-NN
precision/recall against their definitions, the digit classifier's cache, and
the metrics of real held-out digits (the classifier is trained once, on the
8×8 digits, into a temporary cache)."""
import os

import pytest
import torch

from fastdistill.diffusion import metrics as M


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------- Fréchet distance
def test_frechet_diagonal_closed_form():
    g = _gen()
    d = 6
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    v1 = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    v2 = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    want = float(((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * (v1 * v2).sqrt()).sum())
    got = M.frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2))
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_frechet_full_covariances_against_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    g = _gen(1)
    d = 5
    a, b = (torch.randn(d, d, generator=g, dtype=torch.float64) for _ in range(2))
    s1, s2 = a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64), b @ b.T
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    root = linalg.sqrtm((s1 @ s2).numpy()).real
    want = float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace()) - 2 * float(root.trace())
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)


def test_frechet_same_is_zero_symmetric_and_rank_deficient():
    g = _gen(2)
    x = torch.randn(200, 8, generator=g) * 3 + 1
    y = torch.randn(150, 8, generator=g) + 0.5
    sx, sy = M.feature_stats(x), M.feature_stats(y)
    assert abs(M.frechet_distance(*sx, *sx)) < 1e-6
    assert M.frechet_distance(*sx, *sy) == pytest.approx(M.frechet_distance(*sy, *sx), rel=1e-9)
    assert M.frechet_distance(*sx, *sy) > 1
    # fewer rows than features: singular covariances are fine (no inverse, no complex roots)
    few = M.feature_stats(torch.randn(4, 8, generator=g))
    fd = M.frechet_distance(*few, *sx)
    assert torch.isfinite(torch.tensor(fd)) and fd > 0
    assert abs(M.frechet_distance(*few, *few)) < 1e-6


def test_feature_stats_matches_numpy_cov():
    np = pytest.importorskip("numpy")
    x = torch.randn(50, 4, generator=_gen(3), dtype=torch.float64)
    mu, s = M.feature_stats(x)
    torch.testing.assert_close(mu, x.mean(0))
    torch.testing.assert_close(s, torch.from_numpy(np.cov(x.numpy(), rowvar=False)))


def test_frechet_bad_input():
    eye = torch.eye(3, dtype=torch.float64)
    mu = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="sigma2 is not positive semi-definite"):
        M.frechet_distance(mu, eye, mu, -eye)
    with pytest.raises(ValueError, match="sigma1 is not positive semi-definite"):
        M.frechet_distance(mu, torch.diag(torch.tensor([1.0, -0.5, 1.0], dtype=torch.float64)), mu, eye)
    asym = eye.clone()
    asym[0, 1] = 0.5
    with pytest.raises(ValueError, match="sigma1 must be symmetric"):
        M.frechet_distance(mu, asym, mu, eye)
    with pytest.raises(ValueError, match="mu2 must have shape"):
        M.frechet_distance(mu, eye, torch.zeros(4), eye)
    with pytest.raises(ValueError, match="sigma2 must have shape"):
        M.frechet_distance(mu, eye, mu, torch.eye(2))
    with pytest.raises(TypeError, match="mu1 must be a floating tensor"):
        M.frechet_distance(torch.zeros(3, dtype=torch.int64), eye, mu, eye)
    with pytest.raises(ValueError, match="features must have shape"):
        M.feature_stats(torch.zeros(1, 3))
    nan_mu = mu.clone()
    nan_mu[0] = float("nan")
    assert torch.isnan(torch.tensor(M.frechet_distance(nan_mu, eye, mu, eye)))


# ------------------------------------------------------------------------ KID
def _mmd2_loops(x, y):
    """The unbiased MMD² with k(a, b) = (aᵀb/d + 1)³, one pair at a time."""
    d, m = x.shape[1], x.shape[0]

    def k(a, b):
        return (float(a @ b) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_equals_the_double_loop():
    g = _gen(4)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(7, 3, generator=g, dtype=torch.float64) + 0.3
    kid, std = M.kernel_inception_distance(x, y)
    assert kid == pytest.approx(_mmd2_loops(x, y), rel=1e-12)
    assert std == 0.0  # the subset is the whole of both sets: one estimate


@pytest.mark.parametrize("subset_size", [6, 10])  # per-subset kernels; whole-set kernels
def test_kid_subsets_are_the_double_loop_on_subsets(subset_size, monkeypatch):
    g = _gen(5)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randn(11, 3, generator=g, dtype=torch.float64)
    used = []
    for name in ("_mmd2_per_subset", "_mmd2_whole_kernels"):
        f = getattr(M, name)
        monkeypatch.setattr(M, name, lambda *a, f=f, name=name: used.append(name) or f(*a))
    kid, std = M.kernel_inception_distance(x, y, subsets=3, subset_size=subset_size, seed=7)
    assert used == ["_mmd2_per_subset" if subset_size == 6 else "_mmd2_whole_kernels"]
    # the same draws: per subset, a permutation of x's rows, then of y's
    gen = torch.Generator().manual_seed(7)
    xi, yi = [], []
    for _ in range(3):
        xi.append(torch.randperm(12, generator=gen)[:subset_size])
        yi.append(torch.randperm(11, generator=gen)[:subset_size])
    loops = [_mmd2_loops(x[a], y[b]) for a, b in zip(xi, yi)]
    v = torch.tensor(loops, dtype=torch.float64)
    assert kid == pytest.approx(float(v.mean()), rel=1e-10)
    assert std == pytest.approx(float(v.std(unbiased=False)), rel=1e-8)
    assert M.kernel_inception_distance(x, y, subsets=3, subset_size=subset_size, seed=7) == (kid, std)
    # both ways of computing give the loops' values
    for f in (M._mmd2_per_subset, M._mmd2_whole_kernels):
        assert f(x, y, xi, yi) == pytest.approx(loops, rel=1e-10)


def test_kid_near_zero_for_one_distribution_positive_when_shifted():
    g = _gen(6)
    x = torch.randn(600, 16, generator=g)
    y = torch.randn(600, 16, generator=g)
    same, _ = M.kernel_inception_distance(x, y, subsets=20, subset_size=300)
    shifted, _ = M.kernel_inception_distance(x, y + 0.5, subsets=20, subset_size=300)
    assert abs(same) < 0.02
    assert shifted > 0.2 and shifted > 20 * abs(same)


def test_kid_bad_input():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="y must have 3 features"):
        M.kernel_inception_distance(x, torch.randn(5, 4))
    with pytest.raises(ValueError, match="subsets must be an int >= 1"):
        M.kernel_inception_distance(x, x, subsets=0)
    with pytest.raises(ValueError, match="subset_size must be an int >= 2"):
        M.kernel_inception_distance(x, x, subset_size=1)
    with pytest.raises(ValueError, match="x must have shape"):
        M.kernel_inception_distance(torch.randn(1, 3), x)
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        M.kernel_inception_distance(x, [[1.0, 2.0, 3.0]])


# --------------------------------------------------------- precision / recall
def test_precision_recall_identical_disjoint_subset():
    g = _gen(7)
    real = torch.randn(100, 4, generator=g)
    assert M.precision_recall(real, real.clone()) == (1.0, 1.0)
    assert M.precision_recall(real, real + 100.0) == (0.0, 0.0)
    # two far clusters; the fake set is half of one: all inside, most real ones not covered
    two = torch.cat([real[:50], real[50:] + 50.0])
    p, r = M.precision_recall(two, two[:25], k=3)
    assert p == 1.0 and r < 0.6
    # k = 1, by hand: real points 0, 1, 10 (radii 1, 1, 9); fake 0.5 (in), 5 (in 10's ball), 30 (out)
    real1 = torch.tensor([[0.0], [1.0], [10.0]])
    fake1 = torch.tensor([[0.5], [5.0], [30.0]])
    p, r = M.precision_recall(real1, fake1, k=1)
    assert p == pytest.approx(2 / 3)
    # fake radii: 0.5 -> 4.5, 5 -> 4.5, 30 -> 25: every real point is covered
    assert r == 1.0


def test_precision_recall_bad_input():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="real must have more than k = 5 rows"):
        M.precision_recall(x, torch.randn(9, 3), k=5)
    with pytest.raises(ValueError, match="fake must have 3 features"):
        M.precision_recall(x, torch.randn(5, 2))
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        M.precision_recall(x, x, k=0)
    bad = x.clone()
    bad[0, 0] = float("nan")
    p, r = M.precision_recall(x, bad)
    assert p != p and r != r


# ------------------------------------------------------------------ classifier
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("classifier-cache")


@pytest.fixture(scope="module")
def clf(cache):
    return M.train_classifier("digits", cache_dir=cache, progress=False)


def test_classifier_trains_reaches_95_percent_and_caches(clf, cache):
    assert isinstance(clf, M.DigitClassifier) and not clf.from_cache
    assert clf.test_accuracy >= 0.95
    assert clf.data_name == "digits" and clf.seed == 0 and clf.train_seconds > 0
    assert sorted(p.name for p in cache.iterdir()) == ["classifier-digits-0.pt"]  # no temp file left
    x = torch.randn(3, 1, 8, 8)
    assert clf.features(x).shape == (3, 128) and clf(x).shape == (3, 10)


def test_classifier_second_call_loads_without_training(clf, cache, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(M, "_train", no_training)
    again = M.train_classifier("digits", cache_dir=cache, progress=False)
    assert again.from_cache and again.test_accuracy == clf.test_accuracy
    assert not again.training
    for (k, a), b in zip(clf.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_classifier_corrupt_or_mismatching_cache_is_an_error(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(M, "_train", lambda *a, **k: pytest.fail("retrained over a bad cache file"))
    good = (cache / "classifier-digits-0.pt").read_bytes()
    bad = tmp_path / "classifier-digits-0.pt"
    bad.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match=f"{bad}.*cannot be loaded.*delete it"):
        M.train_classifier("digits", cache_dir=tmp_path, progress=False)
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=str(bad)):
        M.train_classifier("digits", cache_dir=tmp_path, progress=False)
    torch.save({"format": "something else"}, bad)
    with pytest.raises(ValueError, match="not a cached fastdistill digit classifier"):
        M.train_classifier("digits", cache_dir=tmp_path, progress=False)
    # a seed-0 file under the seed-1 name, and a file of another recipe version
    (tmp_path / "classifier-digits-1.pt").write_bytes(good)
    with pytest.raises(ValueError, match="classifier-digits-1.pt: .*seed 0, not 1"):
        M.train_classifier("digits", seed=1, cache_dir=tmp_path, progress=False)
    state = torch.load(cache / "classifier-digits-0.pt", weights_only=True)
    torch.save({**state, "version": M.CACHE_VERSION + 1}, bad)
    with pytest.raises(ValueError, match="recipe version"):
        M.train_classifier("digits", cache_dir=tmp_path, progress=False)
    torch.save({**state, "data_sha256": "0" * 64}, bad)
    with pytest.raises(ValueError, match="another version of the data set"):
        M.train_classifier("digits", cache_dir=tmp_path, progress=False)
    sd = dict(state["state_dict"])
    sd.pop("head.bias")
    torch.save({**state, "state_dict": sd}, bad)
    with pytest.raises(ValueError, match="do not fit the classifier"):
        M.train_classifier("digits", cache_dir=tmp_path, progress=False)


def test_classifier_failed_write_leaves_nothing(clf, tmp_path, monkeypatch):
    def broken_save(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(M.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        M._save(tmp_path / "classifier-digits-0.pt", clf, M._data("digits"))
    assert not os.listdir(tmp_path)


def test_default_cache_dir_follows_fastdistill_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDISTILL_CACHE", str(tmp_path))
    assert M.default_cache_dir() == tmp_path / "diffusion"
    assert M._cache_path("mnist", 3, None) == tmp_path / "diffusion" / "classifier-mnist-3.pt"


def test_train_classifier_bad_input(tmp_path):
    with pytest.raises(ValueError, match="data_name must be one of"):
        M.train_classifier("fashion", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        M.train_classifier("digits", seed=-1, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="progress must be a bool"):
        M.train_classifier("digits", progress=1, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="cache_dir must be a path"):
        M.train_classifier("digits", cache_dir=3)
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------ evaluate_samples
def test_real_held_out_digits_evaluate_as_real(clf):
    x, y = M.real_reference("digits")
    m = M.evaluate_samples(x, y, "digits", classifier=clf)
    assert m["n"] == len(y) and m["accuracy"] == pytest.approx(clf.test_accuracy) and m["accuracy"] >= 0.9
    assert abs(m["fd"]) < 1e-6 and m["precision"] == 1.0 and m["recall"] == 1.0
    assert abs(m["kid"]) < 0.1


def test_real_train_digits_score_far_better_than_noise(clf):
    x, y = M.real_reference("digits", "train")
    i = torch.randperm(len(y), generator=_gen())[:300]
    real = M.evaluate_samples(x[i], y[i], "digits", classifier=clf)
    noise = M.evaluate_samples(torch.randn(300, 1, 8, 8, generator=_gen(1)), y[i], "digits",
                               classifier=clf)
    assert real["accuracy"] >= 0.95 and noise["accuracy"] < 0.5
    assert real["fd"] < noise["fd"] / 5 and real["kid"] < noise["kid"] / 5
    assert real["precision"] > 0.7 and real["recall"] > 0.7
    assert noise["precision"] < 0.3 and noise["recall"] < 0.5


def test_labels_only_affect_accuracy(clf):
    x, y = M.real_reference("digits")
    right = M.evaluate_samples(x, y, "digits", classifier=clf)
    wrong = M.evaluate_samples(x, (y + 1) % 10, "digits", classifier=clf)
    assert wrong["accuracy"] < 0.05
    assert {k: v for k, v in wrong.items() if k != "accuracy"} == \
        {k: v for k, v in right.items() if k != "accuracy"}


def test_evaluate_uses_the_cached_default_classifier(clf, cache, monkeypatch):
    monkeypatch.setenv("FASTDISTILL_CACHE", str(cache.parent / "root"))
    (cache.parent / "root").mkdir(exist_ok=True)
    (cache.parent / "root" / "diffusion").mkdir(exist_ok=True)
    target = cache.parent / "root" / "diffusion" / "classifier-digits-0.pt"
    target.write_bytes((cache / "classifier-digits-0.pt").read_bytes())
    monkeypatch.setattr(M, "_train", lambda *a, **k: pytest.fail("trained instead of loading"))
    x, y = M.real_reference("digits")
    assert M.evaluate_samples(x[:50], y[:50], "digits") == \
        M.evaluate_samples(x[:50], y[:50], "digits", classifier=clf)


def test_real_reference_copies_and_splits():
    x, y = M.real_reference("digits")
    x.zero_()
    x2, y2 = M.real_reference("digits")
    assert x2.abs().sum() > 0 and x2.shape == (len(y2), 1, 8, 8) and y2.dtype == torch.int64
    xt, yt = M.real_reference("digits", "train")
    assert len(yt) + len(y2) == 1797
    with pytest.raises(ValueError, match="split must be one of"):
        M.real_reference("digits", "val")


def test_evaluate_bad_input(clf):
    x, y = M.real_reference("digits")
    x, y = x[:20], y[:20]
    ev = M.evaluate_samples
    with pytest.raises(ValueError, match=r"samples must have shape \(N, 1, 8, 8\)"):
        ev(x.view(20, 64), y, "digits", classifier=clf)
    with pytest.raises(ValueError, match=r"samples must have shape \(N, 1, 8, 8\)"):
        ev(torch.zeros(20, 1, 28, 28), y, "digits", classifier=clf)
    with pytest.raises(TypeError, match="samples must be a floating tensor"):
        ev(x.long(), y, "digits", classifier=clf)
    with pytest.raises(TypeError, match="samples must be a torch.Tensor"):
        ev(x.numpy(), y, "digits", classifier=clf)
    nan = x.clone()
    nan[3, 0, 2, 2] = float("nan")
    nan[5, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="samples must be finite: 2 of 20"):
        ev(nan, y, "digits", classifier=clf)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        ev(x, y.float(), "digits", classifier=clf)
    with pytest.raises(ValueError, match=r"labels must have shape \(20,\)"):
        ev(x, y[:10], "digits", classifier=clf)
    with pytest.raises(ValueError, match=r"labels must be classes in \[0, 10\)"):
        ev(x, torch.full((20,), 10), "digits", classifier=clf)
    with pytest.raises(ValueError, match=r"labels must be classes in \[0, 10\)"):
        ev(x, torch.full((20,), -1), "digits", classifier=clf)
    with pytest.raises(ValueError, match="data_name must be one of"):
        ev(x, y, "cifar", classifier=clf)
    with pytest.raises(TypeError, match="classifier must be a DigitClassifier"):
        ev(x, y, "digits", classifier=torch.nn.Linear(64, 10))
    with pytest.raises(ValueError, match="classifier takes 28×28 images"):
        ev(x, y, "digits", classifier=M.DigitClassifier(28))
    with pytest.raises(ValueError, match="samples must hold more than k = 20"):
        ev(x, y, "digits", classifier=clf, k=20)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        ev(x, y, "digits", classifier=clf, k=0)


def test_classifier_input_checks():
    c = M.DigitClassifier(8)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 1, 8, 8\)"):
        c.features(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="image_size must be 8 or 28"):
        M.DigitClassifier(16)
    assert c.data_name is None and c.test_accuracy is None and not c.from_cache
