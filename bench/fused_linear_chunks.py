"""Time and extra peak memory of fused_linear_kd_loss (N=2048, H=1024, V=32000,
JSD, forward+backward) for chunk budgets given in MiB, against the four bare
GEMMs of one step, in one process:

    python bench/fused_linear_chunks.py 256 192 128
"""
import sys

import torch

from fastdistill import bench
from fastdistill.kd.fused_linear import default_chunk_size, fused_linear_kd_loss


def main(budgets_mib):
    bench.fix_malloc_thresholds()
    n, h, v = 2048, 1024, 32000
    g = torch.Generator().manual_seed(0)
    hid, th = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) / h**0.5
    tw = torch.randn(v, h, generator=g) * 2 / h**0.5
    floor = bench.gemm_floor(n, h, v, 3)
    print(f"four GEMMs: {floor:.3f} s")
    for mib in budgets_mib:
        chunk = default_chunk_size(n, v, 4, mib * 2**20)

        def prep():
            return hid.clone().requires_grad_(), w.clone().requires_grad_()

        def run(state, chunk=chunk):
            x, wx = state
            fused_linear_kd_loss(x, wx, th, tw, divergence="jsd", chunk_size=chunk).backward()

        secs, extra = bench.measure(run, prep, repeat=3, warmup=1)
        mb = "-" if extra is None else f"{extra / 2**20:.0f} MB"
        print(f"budget {mib} MiB (chunk {chunk} rows): {secs:.3f} s = {secs / floor:.2f}x the "
              f"GEMMs, extra peak {mb}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [256])
