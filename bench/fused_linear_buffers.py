"""A/B of fused_linear_kd_loss's reused chunk-logits buffers against fresh
ones per chunk (the behaviour before commit 95c5897), alternating in one
process (N=2048, H=1024, V=32000, JSD, forward+backward, best of 2 per round):

    python bench/fused_linear_buffers.py [rounds]
"""
import sys
import time

import torch

import fastdistill.kd.fused_linear as fl


def _fresh(self, side, head, h):
    return torch.empty((h.shape[0], head.weight.shape[0]), dtype=h.dtype, device=h.device)


def main(rounds: int) -> None:
    n, h, v = 2048, 1024, 32000
    g = torch.Generator().manual_seed(0)
    hid, th = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) / h**0.5
    tw = torch.randn(v, h, generator=g) * 2 / h**0.5

    def step() -> float:
        x, wx = hid.clone().requires_grad_(), w.clone().requires_grad_()
        t0 = time.perf_counter()
        fl.fused_linear_kd_loss(x, wx, th, tw, divergence="jsd").backward()
        return time.perf_counter() - t0

    reused = fl._ChunkBuffers.get
    step()  # warm-up
    for r in range(rounds):
        times = {}
        for mode, get in (("reused", reused), ("fresh", _fresh)):
            fl._ChunkBuffers.get = get
            times[mode] = min(step() for _ in range(2))
        fl._ChunkBuffers.get = reused
        print(f"round {r + 1}: reused {times['reused']:.3f} s, fresh {times['fresh']:.3f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
