"""KDTrainer with a tensor-parallel (vocabulary-sharded) LM head: 2 gloo ranks
on one TP mesh, ``ColwiseParallel`` on ``lm_head``, vocabulary 61 (shards of
31 and 30 rows). One torchrun launch runs every case (tests/_kd_tp_worker.py);
the tests read what it wrote.

- fused_head=True: the loss runs on each rank's rows and the mesh's group
  (the vocabulary-parallel fused loss), the head never gathered. On both ranks
  the loss equals one unsharded student's on the same batch, and so does every
  gradient: the head's, a Shard(0) DTensor like its weight, once gathered, and
  the rest of the model's (where a hidden-state gradient summed twice over the
  shards, or not at all, would show at once). One plain-SGD step by hand moves
  the sharded student where it moves the whole one.
- The layouts it cannot compute exactly raise a ValueError at construction
  that names the layout and the way out; ranks holding different batches raise
  at the loss.

HF's Trainer cannot ``train()`` a tensor-parallel model on CPU (accelerate
refuses ParallelismConfig on MULTI_CPU, and without it wraps the model in DDP,
which cannot flatten the uneven DTensor): train() is not run here.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("torch.distributed.tensor.parallel")

WORKER = Path(__file__).with_name("_kd_tp_worker.py")
ROOT = Path(__file__).resolve().parents[1]

EQUAL = ["student-tp-whole-teacher", "both-tp", "hard-T2-ignored-bias-chunks",
         "both-tp-skew-hard", "unfused-replicated-logits"]
REFUSED = ["rowwise-head", "replicated-head", "soft-labels", "two-teachers",
           "sharded-teacher-whole-student", "vocab-mismatch", "on-policy",
           "unfused-sharded-logits", "different-batches"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    out = tmp / "tp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), str(out), str(tmp)]
    res = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    got = torch.load(out, weights_only=True)["ranks"]
    assert len(got) == 2 and all(r["world"] == 2 for r in got)
    return got


@pytest.mark.parametrize("case", EQUAL)
def test_sharded_head_equals_one_process(ranks, case):
    for rank, res in enumerate(ranks):
        c = res["equal"][case]
        assert "error" not in c, c.get("error")
        # the head really is sharded, 31 + 30 rows, and its gradient is a DTensor like it
        assert c["head_weight"] == "DTensor" and c["local_rows"] == (31, 30)[rank]
        assert c["head_grad"] == "DTensor" and c["grad_placements"] == ["S(0)"]
        assert c["loss"] == pytest.approx(c["ref_loss"], rel=2e-6), (rank, c)
        n_params = 22 if "bias" in case else 21
        assert len(c["diffs"]) == n_params and "lm_head.weight" in c["diffs"]
        worst = max(c["diffs"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-5, (rank, worst)  # relative to each gradient's largest entry
    assert ranks[0]["equal"][case]["loss"] == ranks[1]["equal"][case]["loss"]  # one loss


def test_teacher_layouts_are_what_the_cases_say(ranks):
    kinds = {k: ranks[0]["equal"][k]["teacher_head"] for k in EQUAL}
    assert kinds["both-tp"] == kinds["both-tp-skew-hard"] == "DTensor"
    assert kinds["student-tp-whole-teacher"] == kinds["hard-T2-ignored-bias-chunks"] == "Parameter"


def test_an_optimizer_step_by_hand(ranks):
    for res in ranks:
        c = res["equal"]["student-tp-whole-teacher"]
        assert c["moved"] > 1e-3  # the step changed the head
        worst = max(c["after_step"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-6, worst


@pytest.mark.parametrize("case", REFUSED)
def test_unsupported_layouts_are_refused(ranks, case):
    for res in ranks:  # on every rank alike
        r = res["refused"][case]
        assert r["raised"], r["message"]
        assert not r["missing"], (r["missing"], r["message"])
