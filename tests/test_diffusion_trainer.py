"""DiffusionDistiller and train_teacher: a 2-D toy (8 Gaussians on a ring)
distilled to one step by each method, exact resume, caching, bad input."""
import math

import pytest
import torch

import fastdistill as fd
from fastdistill.diffusion import distiller as distiller_mod
from fastdistill.diffusion import teacher as teacher_mod
from fastdistill.diffusion.distiller import METHODS, DiffusionDistiller
from fastdistill.diffusion.teacher import train_teacher

CENTERS = torch.stack([torch.cos(torch.arange(8) * math.pi / 4),
                       torch.sin(torch.arange(8) * math.pi / 4)], 1) * 2.0


def ring(n, seed):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randint(8, (n,), generator=gen)
    return CENTERS[k] + 0.08 * torch.randn(n, 2, generator=gen)


def modes_covered(samples):
    """Modes with at least 2% of the samples within 0.4 of their centre."""
    near = torch.cdist(samples, CENTERS).min(1)
    hits = near.indices[near.values < 0.4]
    return int((torch.bincount(hits, minlength=8) >= 0.02 * len(samples)).sum())


def distance_to_data(samples):
    return float(fd.ot.sinkhorn_divergence(samples, ring(1000, 99), epsilon=0.01))


@pytest.fixture(scope="module")
def toy_teacher():
    return train_teacher(ring(4000, 0), iterations=800, batch_size=256, width=128, lr=3e-3,
                         ema=0.99, cache=False, progress=False)


TOY = {"dmd2": dict(iterations=150, fake_updates=2, lr=1e-4, batch_size=128),
       "consistency": dict(iterations=300, lr=1e-3, skip=50, batch_size=256),
       "progressive": dict(iterations=300, lr=1e-3, progressive_start=8, batch_size=256)}


@pytest.mark.parametrize("method", METHODS)
def test_toy_one_step_student_covers_the_modes_and_beats_one_ddim_step(toy_teacher, method):
    d = DiffusionDistiller(method, toy_teacher, steps=1, progress=False, **TOY[method])
    d.fit(ring(4000, 0))
    noise_gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    student = d.sample(n=1000, generator=noise_gen())
    ddim1 = toy_teacher.sample_ddim(None, 1, noise=torch.randn(1000, 2, generator=noise_gen()))
    assert modes_covered(student) >= 7
    assert distance_to_data(student) < distance_to_data(ddim1)
    assert student.shape == (1000, 2) and bool(torch.isfinite(student).all())


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", METHODS)
def test_resume_equals_an_uninterrupted_run(tmp_path, method, monkeypatch):
    data = ring(512, 1)
    teacher = train_teacher(data, iterations=20, batch_size=64, width=16, cache=False,
                            progress=False)
    kw = dict(steps=2, iterations=12, batch_size=16, checkpoint_every=4, progress=False,
              fake_updates=2, regression_warmup=2 if method == "dmd2" else 0,
              progressive_start=4, skip=100)
    whole = DiffusionDistiller(method, teacher, checkpoint=tmp_path / "whole.ckpt", **kw).fit(data)

    step = getattr(DiffusionDistiller, f"_step_{method}")

    def failing(self, it, *args):
        if it == 7:
            raise _Interrupt
        return step(self, it, *args)

    monkeypatch.setattr(DiffusionDistiller, f"_step_{method}", failing)
    with pytest.raises(_Interrupt):
        DiffusionDistiller(method, teacher, checkpoint=tmp_path / "cut.ckpt", **kw).fit(data)
    monkeypatch.setattr(DiffusionDistiller, f"_step_{method}", step)
    resumed = DiffusionDistiller(method, teacher, checkpoint=tmp_path / "cut.ckpt", **kw).fit(data)
    for a, b in zip(whole.student.state_dict().values(), resumed.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    labels = None
    torch.testing.assert_close(whole.sample(labels, n=8, generator=torch.Generator().manual_seed(0)),
                               resumed.sample(labels, n=8, generator=torch.Generator().manual_seed(0)))


def test_teacher_resume_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDISTILL_CACHE", str(tmp_path / "cache"))
    data = (ring(256, 2), torch.arange(256) % 3)
    kw = dict(iterations=10, batch_size=16, width=16, checkpoint_every=3, progress=False)
    whole = train_teacher(data, checkpoint=tmp_path / "t.ckpt", **kw)
    calls = {"n": 0}
    loss = teacher_mod.denoising_loss

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 8:
            raise _Interrupt
        return loss(*a, **k)

    monkeypatch.setattr(teacher_mod, "denoising_loss", failing)
    with pytest.raises(_Interrupt):
        train_teacher(data, checkpoint=tmp_path / "cut.ckpt", **kw)
    monkeypatch.setattr(teacher_mod, "denoising_loss", loss)
    resumed = train_teacher(data, checkpoint=tmp_path / "cut.ckpt", **kw)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the cache: a second call loads the finished run, no training step runs
    first = train_teacher(data, **kw)
    assert list((tmp_path / "cache" / "diffusion").glob("teacher-tensor-*.ckpt"))
    monkeypatch.setattr(teacher_mod, "denoising_loss", None)  # would fail if called
    again = train_teacher(data, **kw)
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # labelled data: a class-conditional teacher, guided sampling works
    s = again.sample_ddim(torch.tensor([0, 1, 2]), 2, guidance_scale=2.0)
    assert s.shape == (3, 2)


def test_bad_input_is_a_clear_error(tmp_path):
    data = ring(128, 3)
    teacher = train_teacher(data, iterations=2, batch_size=8, width=16, cache=False,
                            progress=False)
    with pytest.raises(ValueError, match="method"):
        DiffusionDistiller("lcm", teacher)
    with pytest.raises(ValueError, match="steps"):
        DiffusionDistiller("dmd2", teacher, steps=3)
    for steps in (True, 2.0):  # equal to 1 and 2, but not the documented ints
        with pytest.raises(TypeError, match=r"steps must be an int, one of \(1, 2, 4\)"):
            DiffusionDistiller("dmd2", teacher, steps=steps)
    with pytest.raises(TypeError, match="teacher"):
        DiffusionDistiller("dmd2", teacher.net)
    with pytest.raises(ValueError, match="progressive_start"):
        DiffusionDistiller("progressive", teacher, steps=4, progressive_start=6)
    with pytest.raises(ValueError, match="iterations"):
        DiffusionDistiller("dmd2", teacher, iterations=0)
    with pytest.raises(ValueError, match="differ from the teacher"):
        DiffusionDistiller("consistency", teacher, iterations=1, progress=False).fit(
            torch.randn(16, 3))
    with pytest.raises(ValueError, match="labels exactly when"):
        DiffusionDistiller("consistency", teacher, iterations=1, progress=False).fit(
            (data, torch.zeros(128, dtype=torch.int64)))
    with pytest.raises(ValueError, match="NaN"):
        train_teacher(torch.full((8, 2), math.nan), iterations=1, cache=False, progress=False)
    with pytest.raises(RuntimeError, match="fit"):
        DiffusionDistiller("dmd2", teacher).sample(n=2)
    # a corrupt checkpoint names the file; other settings are refused
    ck = tmp_path / "run.ckpt"
    DiffusionDistiller("progressive", teacher, iterations=2, progressive_start=2,
                       checkpoint=ck, progress=False).fit(data)
    with pytest.raises(ValueError, match=r"run.ckpt.*other settings.*lr"):
        DiffusionDistiller("progressive", teacher, iterations=2, progressive_start=2, lr=0.5,
                           checkpoint=ck, progress=False).fit(data)
    raw = bytearray(ck.read_bytes())
    raw[-5] ^= 0xFF
    ck.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"run.ckpt.*corrupt"):
        DiffusionDistiller("progressive", teacher, iterations=2, progressive_start=2,
                           checkpoint=ck, progress=False).fit(data)


def test_the_module_names():
    assert distiller_mod.METHODS == ("dmd2", "consistency", "progressive")
    for name in ("dmd_loss", "denoising_loss", "consistency_loss", "ddim_step", "NoiseSchedule",
                 "train_teacher", "DiffusionDistiller", "DiffusionModel", "metrics"):
        assert hasattr(fd.diffusion, name)


def test_digit_unet_takes_both_digit_sizes():
    for shape in ((1, 8, 8), (1, 28, 28)):
        net = fd.diffusion.DigitUNet(shape, 10, width=8)
        x = torch.randn(3, *shape)
        out = net(x, torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10]))  # 10: the null class
        assert out.shape == x.shape
    with pytest.raises(ValueError, match="multiples of 4"):
        fd.diffusion.DigitUNet((1, 10, 10))
