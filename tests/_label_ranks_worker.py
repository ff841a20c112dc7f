"""``fastdistill.softlabels.parallel.label_windows`` on a tiny Llama teacher, under
``torchrun`` (gloo, CPU) or as one process: tests/test_label_distributed.py runs it
and compares the store with one process's.

    python tests/_label_ranks_worker.py OUT [MODE]

MODE:
- ``plain`` (default): label WINDOWS into OUT.
- ``kill-rank1``: rank 1 SIGKILLs itself right after its first shard is flushed
  into its staging store (a crash mid-labelling).
- ``kill-merge``: rank 0 SIGKILLs itself right after its first shard is flushed
  into OUT (a crash while merging the ranks' entries).
- ``error-rank1``: rank 1's teacher raises on its first forward pass.

The kills are this script's own: it wraps ``SoftLabelWriter._write_shard`` (the
flush) in the process it runs in; the library has no test hook.
Prints ``RESULT <rank> <json of label_windows' result>`` on success.
"""
import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _kd_ranks_worker import V, llama, leave  # noqa: E402

from fastdistill.softlabels import SoftLabelWriter, encode  # noqa: E402
from fastdistill.softlabels.parallel import label_windows  # noqa: E402

N, T, BATCH = 22, 9, 4                     # 6 batches, the last one of 2 windows
OPTIONS = dict(k=8, value_bits=16, temperature=2.0)
ROW_BYTES = encode(torch.zeros(1, V), **OPTIONS).codec.row_bytes
SHARD_BYTES = 2 * T * ROW_BYTES            # every writer flushes after each 2nd entry
TIMEOUT_S = 120.0


def windows() -> torch.Tensor:
    return torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(7))


def teacher():
    return llama(1)


def label(model, out, **kw):
    return label_windows(model, windows(), out, batch=BATCH, shard_bytes=SHARD_BYTES,
                         progress=False, timeout=TIMEOUT_S, **OPTIONS, **kw)


class Broken(torch.nn.Module):
    """A teacher whose forward raises."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        raise RuntimeError("rank 1's teacher broke")


def kill_after_first_flush(which):
    """SIGKILL this process once a writer whose folder satisfies ``which`` flushed."""
    original = SoftLabelWriter._write_shard

    def write_shard(self):
        original(self)
        if which(os.path.abspath(self.path)):
            os.kill(os.getpid(), signal.SIGKILL)

    SoftLabelWriter._write_shard = write_shard


def main():
    out = os.path.abspath(sys.argv[1])
    mode = sys.argv[2] if len(sys.argv) > 2 else "plain"
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    model = teacher()
    if mode == "kill-rank1" and rank == 1:
        kill_after_first_flush(lambda path: path != out)
    elif mode == "kill-merge" and rank == 0:
        kill_after_first_flush(lambda path: path == out)
    elif mode == "error-rank1" and rank == 1:
        model = Broken(model)
    elif mode not in ("plain", "kill-rank1", "kill-merge", "error-rank1"):
        raise SystemExit(f"unknown mode {mode!r}")
    result = label(model, out, vocab_size=V)
    print("RESULT", rank, json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
    leave()  # out without the interpreter's teardown (see _kd_ranks_worker.leave)
