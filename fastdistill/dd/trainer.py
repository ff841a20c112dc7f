"""The dataset-distillation trainer: DC, DSA, DM, DataDAM and MTT on one loop,
with resumable checkpoints, and the DC evaluation protocol.

Every random choice (network initializations, real batches, DSA seeds, MTT
start epochs) comes from one ``torch.Generator`` seeded by ``seed`` and saved
in the checkpoint, so a run stopped and resumed gives the same synthetic set
as a run that never stopped.
"""
from __future__ import annotations

import math
import numbers
import os
import struct
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .. import _checkpoint, _checks
from .._progress import Progress
from .augment import DEFAULT_STRATEGY, dsa
from .grads import grouped_gradients
from .losses import attention_match_loss, distribution_match_loss, gradient_match_loss, \
    trajectory_match_loss
from .nets import ConvNet

METHODS = ("dc", "dsa", "dm", "datadam", "mtt")
# 2: MTT's learning rate has its own optimizer group (lr_lr); 3: the checksummed
# file below, read with weights_only=True
CHECKPOINT_VERSION = 3
# the file is sealed by fastdistill._checkpoint (header, length, SHA-256, weights_only)
CHECKPOINT_MAGIC = b"FDDDCKPT"
# learning rates of the synthetic images per method (the papers' defaults)
LR_IMG = {"dc": 0.1, "dsa": 0.1, "dm": 1.0, "datadam": 1.0, "mtt": 100.0}
# MTT learns its student's learning rate as log(lr), with SGD at this rate
LR_LR = 0.01
# the outer iterations of the DC/DSA papers (Zhao et al. 2021), the command's default
PAPER_ITERATIONS = 1000
# save_image_grid upscales (nearest neighbour) until each image is at least this many pixels
MIN_TILE_PIXELS = 64

__all__ = ["DatasetDistiller", "METHODS", "save_image_grid", "save_class_grid", "load_checkpoint"]


_STATE_TYPES = {"version": int, "settings": dict, "iteration": int, "images": torch.Tensor,
                "labels": torch.Tensor, "opt": dict, "rng": torch.Tensor, "extra": dict}


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The state in a DatasetDistiller checkpoint, after checking, in this
    order, the header, the length and the SHA-256 of the payload, then
    unpickling it with ``weights_only=True`` (no code runs), then its fields
    and that every floating value in it (images, optimizer state, MTT's
    experts and learning rate) is finite. Anything else: a ValueError naming
    the file and the problem."""
    state = _checkpoint.read(path, CHECKPOINT_MAGIC, CHECKPOINT_VERSION, "dataset-distillation")
    _checkpoint.check_fields(path, state, _STATE_TYPES)
    _checkpoint.check_finite(path, {k: state[k] for k in ("images", "opt", "extra")})
    return state


def _ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def _as_pair(name: str, data) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) from a tensor pair or a map-style Dataset of (image, label)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    elif isinstance(data, torch.utils.data.Dataset):
        items = [data[i] for i in range(len(data))]
        if not items:
            raise ValueError(f"{name} is empty")
        x = torch.stack([torch.as_tensor(it[0]) for it in items])
        y = torch.as_tensor([int(it[1]) for it in items])
    else:
        raise TypeError(f"{name} must be an (images, labels) tensor pair or a torch Dataset of "
                        f"(image, label), got {type(data).__name__}")
    _checks.tensor(f"{name} images", x, floating=True)
    if x.dim() != 4:
        raise ValueError(f"{name} images must be (N, C, H, W), got {tuple(x.shape)}")
    if y.dtype.is_floating_point or y.shape != x.shape[:1]:
        raise ValueError(f"{name} labels must be integers of shape ({x.shape[0]},), got "
                         f"{y.dtype} {tuple(y.shape)}")
    if (y < 0).any():
        raise ValueError(f"{name} labels must be >= 0")
    return x.float(), y.long()


def _paper_loops(ipc: int) -> tuple[int, int]:
    """DC's (outer_loop, inner_loop) per IPC (Zhao et al. 2021)."""
    if ipc == 1:
        return 1, 1
    if ipc <= 10:
        return 10, 50
    if ipc <= 20:
        return 20, 25
    return 50, 10


def _int(name, v, low=1):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return int(v)


class DatasetDistiller:
    """Learns ``ipc`` synthetic images per class that train a ConvNet like the real set.

    method: "dc" (gradient matching, Zhao et al. 2021), "dsa" (DC with
    differentiable siamese augmentation), "dm" (distribution matching),
    "datadam" (attention matching), "mtt" (matching training trajectories of
    expert networks). ``iterations`` outer steps; ``batch_real`` real images
    per class per step. ``checkpoint``: a file written (atomically) every
    ``checkpoint_every`` iterations and at the end; if it exists, ``fit``
    resumes from it (same settings required).
    """

    def __init__(self, method: str = "dc", ipc: int = 10, *, iterations: int = 1000,
                 batch_real: int = 256, lr_img: float | None = None, lr_net: float = 0.01,
                 outer_loop: int | None = None, inner_loop: int | None = None, width: int = 128,
                 depth: int = 3, dsa_strategy: str = DEFAULT_STRATEGY, init: str = "real",
                 seed: int = 0, checkpoint: str | os.PathLike | None = None,
                 checkpoint_every: int = 50, progress: bool = True, expert_epochs: int = 2,
                 num_experts: int = 2, syn_steps: int = 10, lr_lr: float = LR_LR,
                 datadam_mmd_weight: float = 0.01):
        self.method = _checks.choice("method", method, METHODS)
        self.ipc = _int("ipc", ipc)
        self.iterations = _int("iterations", iterations, 0)
        self.batch_real = _int("batch_real", batch_real)
        self.lr_img = LR_IMG[method] if lr_img is None else _checks.real("lr_img", lr_img, low=0.0,
                                                                         low_open=True)
        self.lr_net = _checks.real("lr_net", lr_net, low=0.0, low_open=True)
        loops = _paper_loops(self.ipc)
        self.outer_loop = loops[0] if outer_loop is None else _int("outer_loop", outer_loop)
        self.inner_loop = loops[1] if inner_loop is None else _int("inner_loop", inner_loop, 0)
        self.width, self.depth = _int("width", width), _int("depth", depth)
        self.dsa_strategy = dsa_strategy
        dsa(torch.zeros(1, 1, 2, 2), 0, dsa_strategy)  # validates the strategy string
        self.init = _checks.choice("init", init, ("real", "noise"))
        self.seed = _int("seed", seed, 0)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.checkpoint_every = _int("checkpoint_every", checkpoint_every)
        self.progress = _checks.flag("progress", progress)
        self.expert_epochs = _int("expert_epochs", expert_epochs)
        self.num_experts = _int("num_experts", num_experts)
        self.syn_steps = _int("syn_steps", syn_steps)
        self.lr_lr = _checks.real("lr_lr", lr_lr, low=0.0, low_open=True)
        self.datadam_mmd_weight = _checks.real("datadam_mmd_weight", datadam_mmd_weight, low=0.0)
        self.syn_lr = None  # MTT's learned student learning rate, after fit
        self.losses: list[float] = []  # the matching loss of each iteration of the last fit

    # ------------------------------------------------------------- settings
    def settings(self) -> dict:
        """What a checkpoint must agree on to be resumed (iterations may grow)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self).items()
                if k not in ("iterations", "checkpoint", "checkpoint_every", "progress", "syn_lr",
                             "losses")}

    def _net(self, gen: torch.Generator, channels: int, classes: int, size) -> ConvNet:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
            return ConvNet(channels, classes, self.width, self.depth, size)

    def _augment(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        return dsa(x, seed, self.dsa_strategy) if self.method in ("dsa", "dm", "datadam") else x

    # ------------------------------------------------------------- checkpoint
    def _save(self, state: dict) -> None:
        if self.checkpoint is None:
            return
        _checkpoint.write(self.checkpoint, state, CHECKPOINT_MAGIC, CHECKPOINT_VERSION)

    def _load(self) -> dict | None:
        if self.checkpoint is None or not self.checkpoint.exists():
            return None
        state = load_checkpoint(self.checkpoint)
        if state["settings"] != self.settings():
            diff = sorted(k for k in set(state["settings"]) | set(self.settings())
                          if state["settings"].get(k) != self.settings().get(k))
            raise ValueError(f"{self.checkpoint} was written with other settings ({', '.join(diff)}); "
                             "use another checkpoint path or the same settings")
        return state

    # ------------------------------------------------------------- fit
    def fit(self, real) -> tuple[torch.Tensor, torch.Tensor]:
        """Distill ``real`` ((images, labels) or a Dataset); returns the synthetic
        (images (C·ipc, ...), labels (C·ipc,)), classes in order."""
        x, y = _as_pair("real", real)
        classes = int(y.max()) + 1
        by_class = [torch.nonzero(y == c).flatten() for c in range(classes)]
        if any(len(ix) == 0 for ix in by_class):
            raise ValueError("every class 0..max(label) needs real images")
        syn_y = torch.arange(classes).repeat_interleave(self.ipc)
        state = self._load()
        if state is None:
            gen = torch.Generator().manual_seed(self.seed)
            if self.init == "real":
                pick = [ix[torch.randint(len(ix), (self.ipc,), generator=gen)] for ix in by_class]
                syn = x[torch.cat(pick)].clone()
            else:
                syn = torch.randn((classes * self.ipc,) + tuple(x.shape[1:]), generator=gen)
            extra = {"syn_lr": math.log(self.lr_net)} if self.method == "mtt" else {}
            start = 0
        else:
            syn, start, extra = state["images"], state["iteration"], state["extra"]
            if tuple(syn.shape) != (len(syn_y),) + tuple(x.shape[1:]) or not torch.equal(state["labels"], syn_y):
                raise ValueError(f"{self.checkpoint}: its synthetic set {tuple(syn.shape)} does not fit "
                                 f"this data ({len(syn_y)} images of {tuple(x.shape[1:])}, {classes} "
                                 "classes); use another checkpoint path")
            if self.method == "mtt" and not isinstance(extra.get("syn_lr"), float):
                raise ValueError(f"{self.checkpoint}: checkpoint of an MTT run without its learning rate")
            gen = torch.Generator()
            try:
                gen.set_state(state["rng"])
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"{self.checkpoint}: checkpoint holds no valid generator state ({e})") from e
        syn = syn.clone().requires_grad_()
        groups = [{"params": [syn]}]
        if self.method == "mtt":
            syn_lr = torch.tensor(extra["syn_lr"], requires_grad=True)
            # log(lr) moves at its own rate: lr_img would blow it up
            groups.append({"params": [syn_lr], "lr": self.lr_lr})
            if "experts" not in extra:
                extra["experts"] = self._train_experts(x, y, classes, gen)
        opt = torch.optim.SGD(groups, lr=self.lr_img, momentum=0.5)
        if state is not None:
            try:
                opt.load_state_dict(state["opt"])
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                raise ValueError(f"{self.checkpoint}: checkpoint optimizer state does not fit this run "
                                 f"({e})") from e

        def snapshot(it):
            if self.method == "mtt":
                extra["syn_lr"] = float(syn_lr.detach())
            return {"version": CHECKPOINT_VERSION, "settings": self.settings(), "iteration": it,
                    "images": syn.detach().clone(), "labels": syn_y, "opt": opt.state_dict(),
                    "rng": gen.get_state(), "extra": extra}

        bar = Progress(self.progress, self.iterations, f"{self.method} ipc={self.ipc}", "iteration",
                       initial=min(start, self.iterations))
        step = getattr(self, f"_step_{self.method}" if self.method != "dsa" else "_step_dc")
        self.losses = []
        try:
            for it in range(start, self.iterations):
                loss = step(x, y, by_class, syn, syn_y, classes, gen, opt, extra,
                            syn_lr if self.method == "mtt" else None)
                self.losses.append(float(loss))
                bar.update(1, loss=f"{loss:.4f}")
                if (it + 1) % self.checkpoint_every == 0 and it + 1 < self.iterations:
                    self._save(snapshot(it + 1))
        finally:
            bar.close()
        self._save(snapshot(max(start, self.iterations)))
        self.syn_lr = float(syn_lr.detach()) if self.method == "mtt" else None
        return syn.detach().clone(), syn_y.clone()

    def _real_batch(self, x, by_class, gen):
        """batch_real random real images of each class, classes in order."""
        idx = [ix[torch.randint(len(ix), (self.batch_real,), generator=gen)] for ix in by_class]
        labels = torch.arange(len(by_class)).repeat_interleave(self.batch_real)
        return x[torch.cat(idx)], labels

    def _siamese(self, xr, yr, xs, ys, classes, gen):
        """DSA per class: real and synthetic images of a class share one seed."""
        if self.method not in ("dsa", "dm", "datadam"):
            return xr, xs
        seeds = torch.randint(2**31, (classes,), generator=gen).tolist()
        xr = torch.cat([self._augment(xr[yr == c], seeds[c]) for c in range(classes)])
        xs = torch.cat([self._augment(xs[ys == c], seeds[c]) for c in range(classes)])
        return xr, xs

    def _step_dc(self, x, y, by_class, syn, syn_y, classes, gen, opt, extra, _lr):
        net = self._net(gen, x.shape[1], classes, tuple(x.shape[2:]))
        net_opt = torch.optim.SGD(net.parameters(), lr=self.lr_net)
        total = 0.0
        for ol in range(self.outer_loop):
            xr, yr = self._real_batch(x, by_class, gen)
            xr, xs = self._siamese(xr, yr, syn, syn_y, classes, gen)
            g_real = grouped_gradients(net, _ce, xr, yr, yr, num_groups=classes)
            g_syn = grouped_gradients(net, _ce, xs, syn_y, syn_y, create_graph=True,
                                      num_groups=classes)
            loss = gradient_match_loss(g_real, g_syn, "dc")
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
            if ol == self.outer_loop - 1:
                break
            data = syn.detach()
            for _ in range(self.inner_loop):  # train the network on the synthetic set
                seed = int(torch.randint(2**31, (1,), generator=gen))
                net_opt.zero_grad()
                F.cross_entropy(net(self._augment(data, seed)), syn_y).backward()
                net_opt.step()
        return total / self.outer_loop

    def _frozen_net_and_batches(self, x, by_class, syn, syn_y, classes, gen):
        """DM/DataDAM: a fresh random network (not trained), a real batch, both sides augmented."""
        net = self._net(gen, x.shape[1], classes, tuple(x.shape[2:]))
        for p in net.parameters():
            p.requires_grad_(False)
        xr, yr = self._real_batch(x, by_class, gen)
        xr, xs = self._siamese(xr, yr, syn, syn_y, classes, gen)
        return net, xr, yr, xs

    def _step_dm(self, x, y, by_class, syn, syn_y, classes, gen, opt, extra, _lr):
        net, xr, yr, xs = self._frozen_net_and_batches(x, by_class, syn, syn_y, classes, gen)
        loss = distribution_match_loss(net.embed(xr), net.embed(xs), yr, syn_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    def _step_datadam(self, x, y, by_class, syn, syn_y, classes, gen, opt, extra, _lr):
        net, xr, yr, xs = self._frozen_net_and_batches(x, by_class, syn, syn_y, classes, gen)

        def maps(inp):
            out, h = [], inp
            for layer in net.features:
                h = layer(h)
                if isinstance(layer, torch.nn.AvgPool2d):
                    out.append(h)
            return out, h.flatten(1)

        (mr, er), (ms, es) = maps(xr), maps(xs)
        loss = sum(attention_match_loss([m[yr == c] for m in mr], [m[syn_y == c] for m in ms],
                                        real_embed=er[yr == c], syn_embed=es[syn_y == c],
                                        mmd_weight=self.datadam_mmd_weight)
                   for c in range(classes))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    # ------------------------------------------------------------- MTT
    def _train_experts(self, x, y, classes, gen) -> list[list[torch.Tensor]]:
        """num_experts networks trained on the real set for expert_epochs epochs;
        their flattened parameters at the start and after each epoch."""
        trajectories = []
        for _ in range(self.num_experts):
            net = self._net(gen, x.shape[1], classes, tuple(x.shape[2:]))
            opt = torch.optim.SGD(net.parameters(), lr=self.lr_net, momentum=0.9)
            traj = [torch.cat([p.detach().flatten() for p in net.parameters()])]
            for _ in range(self.expert_epochs):
                order = torch.randperm(len(x), generator=gen)
                for i in range(0, len(x), 256):
                    b = order[i:i + 256]
                    opt.zero_grad()
                    F.cross_entropy(net(x[b]), y[b]).backward()
                    opt.step()
                traj.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
            trajectories.append(traj)
        return trajectories

    def _step_mtt(self, x, y, by_class, syn, syn_y, classes, gen, opt, extra, syn_lr):
        net = self._net(gen, x.shape[1], classes, tuple(x.shape[2:]))
        names = [n for n, _ in net.named_parameters()]
        shapes = [p.shape for p in net.parameters()]
        sizes = [p.numel() for p in net.parameters()]
        e = int(torch.randint(len(extra["experts"]), (1,), generator=gen))
        traj = extra["experts"][e]
        t = int(torch.randint(len(traj) - 1, (1,), generator=gen))
        start, target = traj[t], traj[t + 1]
        theta = start.clone().requires_grad_()
        lr = syn_lr.exp()
        for _ in range(self.syn_steps):
            params = {n: v.view(s) for n, v, s in zip(names, theta.split(sizes), shapes)}
            loss = F.cross_entropy(functional_call(net, params, (syn,)), syn_y)
            g = torch.autograd.grad(loss, theta, create_graph=True)[0]
            theta = theta - lr * g
        match = trajectory_match_loss(theta, start, target)
        opt.zero_grad()
        match.backward()
        opt.step()
        return float(match.detach())

    # ------------------------------------------------------------- evaluation
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, test, *, n_models: int = 5,
                 epochs: int = 300, lr: float = 0.01, batch_size: int = 256,
                 seed: int = 1, progress: bool | None = None, desc: str | None = None) -> dict:
        """The DC protocol: ``n_models`` fresh ConvNets (this distiller's width and
        depth) trained on (images, labels) with SGD (momentum 0.9, weight decay
        5e-4, lr halved at half of ``epochs``; DSA augmentation for dsa/dm/datadam),
        tested on ``test``.

        Returns {"mean", "std", "accs"} as test accuracies in PERCENT (0-100, not
        fractions): "accs" one per model, "mean" and "std" (population) over them.
        ``progress`` (None: the distiller's own setting, as ``fit``) shows one
        bar over the n_models × epochs training epochs, with each model's accuracy,
        labelled ``desc`` (default "evaluate <method> ipc=<ipc>")."""
        xs, ys = _as_pair("images/labels", (images, labels))
        xt, yt = _as_pair("test", test)
        n_models, epochs = _int("n_models", n_models), _int("epochs", epochs)
        lr = _checks.real("lr", lr, low=0.0, low_open=True)
        batch_size = _int("batch_size", batch_size)
        progress = self.progress if progress is None else _checks.flag("progress", progress)
        classes = int(max(ys.max(), yt.max())) + 1
        gen = torch.Generator().manual_seed(_int("seed", seed, 0))
        accs = []
        if desc is None:
            desc = f"evaluate {self.method} ipc={self.ipc}"
        elif not isinstance(desc, str):
            raise TypeError(f"desc must be a str or None, got {type(desc).__name__}")
        bar = Progress(progress, n_models * epochs, desc, "epoch")
        try:
            for m in range(n_models):
                accs.append(self._train_and_test(xs, ys, xt, yt, classes, gen, epochs, lr, batch_size,
                                                 lambda: bar.update(1, model=f"{m + 1}/{n_models}")))
                bar.update(0, acc=f"{accs[-1]:.2f}%")
        finally:
            bar.close()
        t = torch.tensor(accs, dtype=torch.float64)
        return {"mean": float(t.mean()), "std": float(t.std(unbiased=False)), "accs": accs}

    def _train_and_test(self, xs, ys, xt, yt, classes, gen, epochs, lr, batch_size, on_epoch) -> float:
        """One model of the protocol: its test accuracy in percent."""
        net = self._net(gen, xs.shape[1], classes, tuple(xs.shape[2:]))
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        for ep in range(epochs):
            if ep == epochs // 2:
                for group in opt.param_groups:
                    group["lr"] = lr / 2
            order = torch.randperm(len(xs), generator=gen)
            for i in range(0, len(xs), batch_size):
                b = order[i:i + batch_size]
                seed_b = int(torch.randint(2**31, (1,), generator=gen))
                opt.zero_grad()
                F.cross_entropy(net(self._augment(xs[b], seed_b)), ys[b]).backward()
                opt.step()
            on_epoch()
        net.eval()
        with torch.no_grad():
            correct = sum(int((net(xt[i:i + 1000]).argmax(1) == yt[i:i + 1000]).sum())
                          for i in range(0, len(xt), 1000))
        return 100.0 * correct / len(xt)

    def evaluate_random_real(self, real, test, *, seed: int = 2, **evaluate_keywords) -> dict:
        """``evaluate`` of ``random_real_subset(real, seed=seed)``: the baseline a
        distilled set of this IPC has to beat, its progress bar labelled so."""
        evaluate_keywords.setdefault("desc", f"evaluate random real baseline ipc={self.ipc}")
        return self.evaluate(*self.random_real_subset(real, seed=seed), test, **evaluate_keywords)

    def run_warnings(self, result: dict, baseline: dict) -> list[str]:
        """Plain-language warnings about the last ``fit`` given its evaluation
        (``result``) and the random real baseline's (``baseline``): a distilled
        set that scores below the baseline, and a matching loss that rose over
        the run. Empty when neither holds."""
        out = []
        if result["mean"] < baseline["mean"]:
            out.append(
                f"warning: the distilled set scores {result['mean']:.2f} %, below the "
                f"{baseline['mean']:.2f} % of {self.ipc} random real image"
                f"{'' if self.ipc == 1 else 's'} per class, so picking real images at random "
                f"does better than this distillation. The run was likely too short to beat its "
                f"baseline: --iterations {self.iterations} here, the papers' default is "
                f"--iterations {PAPER_ITERATIONS}.")
        if len(self.losses) >= 2:
            k = max(1, len(self.losses) // 3)
            first = sum(self.losses[:k]) / k
            last = sum(self.losses[-k:]) / k
            if last > first:
                rises = sum(b > a for a, b in zip(self.losses, self.losses[1:]))
                ends = (f"first iteration {first:.4f}, last {last:.4f}" if k == 1 else
                        f"mean of the first {k} iterations {first:.4f}, of the last {k} {last:.4f}")
                out.append(
                    f"warning: the {self.method.upper()} matching loss rose over the run ({ends}; "
                    f"it rose in {rises} of {len(self.losses) - 1} steps): the synthetic set is "
                    f"not converging yet, more --iterations are needed.")
        return out

    def random_real_subset(self, real, *, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """``ipc`` random real images per class: the baseline at the same IPC."""
        x, y = _as_pair("real", real)
        gen = torch.Generator().manual_seed(_int("seed", seed, 0))
        idx = [ix[torch.randperm(len(ix), generator=gen)[:self.ipc]]
               for ix in (torch.nonzero(y == c).flatten() for c in range(int(y.max()) + 1))]
        idx = torch.cat(idx)
        return x[idx].clone(), y[idx].clone()


def _grid_pixels(images: torch.Tensor, nrow: int, denormalize, scale: int | None):
    """(uint8 H×W×C grid, scale, tile height, tile width, pad) of the images."""
    x = images.detach().float().cpu()
    if denormalize is not None:
        x = denormalize(x)
    x = x.clamp(0, 1)
    if x.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(x.shape)}")
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c}")
    nrow = _int("nrow", nrow)
    if scale is None:
        scale = max(1, math.ceil(MIN_TILE_PIXELS / max(1, min(h, w))))
    scale = _int("scale", scale)
    if scale > 1:  # nearest neighbour: every pixel becomes a scale × scale block
        x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        h, w = h * scale, w * scale
    rows = math.ceil(n / nrow)
    pad = 2 * scale if scale > 1 else 2
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = x[i]
    return (grid * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).contiguous(), scale, h, w, pad


def _write_png(pix: torch.Tensor, path) -> None:
    """An 8-bit grey (C = 1) or RGB (C = 3) PNG of H×W×C pixels, with zlib."""
    H, W, c = pix.shape
    raw = b"".join(b"\x00" + pix[i].numpy().tobytes() for i in range(H))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 0 if c == 1 else 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, *, nrow: int,
                    denormalize=None, scale: int | None = None, row_labels=None,
                    col_labels=None, title: str | None = None) -> None:
    """A PNG grid of (N, C, H, W) images (C = 1 or 3), ``nrow`` per row, pixel
    values in [0, 1] after ``denormalize``.

    ``scale``: each image pixel becomes a scale × scale block (nearest
    neighbour); default: the smallest scale that makes each image at least
    ``MIN_TILE_PIXELS`` (64) pixels on its shorter side (8 for 8×8 digits, 3 for
    28×28). ``row_labels`` / ``col_labels`` (one string per row / column) and
    ``title`` are drawn around the grid with matplotlib, the grid itself kept
    pixel for pixel; without them (or without matplotlib) the PNG is the grid
    alone, written with zlib."""
    pix, scale, h, w, pad = _grid_pixels(images, nrow, denormalize, scale)
    rows, cols = math.ceil(images.shape[0] / nrow), nrow
    row_labels = None if row_labels is None else [str(t) for t in row_labels]
    col_labels = None if col_labels is None else [str(t) for t in col_labels]
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"row_labels must hold one label per row ({rows}), got {len(row_labels)}")
    if col_labels is not None and len(col_labels) != cols:
        raise ValueError(f"col_labels must hold one label per column ({cols}), got {len(col_labels)}")
    if row_labels is None and col_labels is None and title is None:
        _write_png(pix, path)
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _write_png(pix, path)
        return
    dpi = 100
    H, W = pix.shape[:2]
    fig = plt.figure(figsize=(W / dpi, H / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    img = pix[..., 0] if pix.shape[2] == 1 else pix
    ax.imshow(img.numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest",
              extent=(0, W, H, 0), aspect="auto")
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    for side in ax.spines.values():
        side.set_visible(False)
    centre = lambda i, size: pad + i * (size + pad) + size / 2  # noqa: E731
    ax.xaxis.tick_top()
    ax.set_xticks([centre(i, w) for i in range(cols)] if col_labels else [])
    if col_labels:
        ax.set_xticklabels(col_labels, fontsize=9)
    ax.set_yticks([centre(i, h) for i in range(rows)] if row_labels else [])
    if row_labels:
        ax.set_yticklabels(row_labels, fontsize=9)
    ax.tick_params(length=0, pad=3)
    if title:
        ax.set_title(title, fontsize=10, pad=6)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.08, facecolor="white",
                format="png")
    plt.close(fig)


def save_class_grid(images: torch.Tensor, labels: torch.Tensor, path: str | os.PathLike, *,
                    denormalize=None, class_names=None, title: str | None = None,
                    scale: int | None = None) -> None:
    """``save_image_grid`` of a synthetic set, classes in order (``labels``
    sorted, the same count per class): one row per class when there are
    several images per class (rows labelled with the classes, columns with the
    image's index), else one row with a column per class."""
    labels = torch.as_tensor(labels).flatten()
    classes = sorted(set(labels.tolist()))
    per_class = len(labels) // max(1, len(classes))
    names = [str(class_names[c]) if class_names is not None else str(c) for c in classes]
    if per_class > 1:
        save_image_grid(images, path, nrow=per_class, denormalize=denormalize, scale=scale,
                        row_labels=[f"class {n}" for n in names],
                        col_labels=[str(i + 1) for i in range(per_class)], title=title)
    else:
        save_image_grid(images, path, nrow=len(labels), denormalize=denormalize, scale=scale,
                        col_labels=names, title=title)
