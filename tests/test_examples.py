"""The launch configs shipped under examples/ are what the README's launch lines
use: each is run through `accelerate launch` itself here (2 processes), and
every process must see the engine the file names, as accelerate hands it to the
HF Trainer (its plugin built from the environment the launcher sets). On a
machine without GPUs the processes cannot shard, so what is checked is the
configuration that reaches them, not a sharded run (tests/test_hf_*.py do those)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

PROBE = r'''
import json, os, sys
from accelerate.utils import FullyShardedDataParallelPlugin
p = FullyShardedDataParallelPlugin()
seen = {"rank": os.environ.get("RANK"), "world": os.environ.get("WORLD_SIZE"),
        "use_fsdp": os.environ.get("ACCELERATE_USE_FSDP"), "fsdp_version": p.fsdp_version,
        "reshard_after_forward": p.reshard_after_forward,
        "wrap": sorted(p.transformer_cls_names_to_wrap or []),
        "state_dict_type": str(p.state_dict_type)}
with open(os.path.join(sys.argv[1], f"rank{seen['rank']}.json"), "w") as f:
    json.dump(seen, f)
'''


ZERO3_PROBE = r'''
import json, os, sys
import deepspeed.ops
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # gloo: no comm op to build
from fastdistill.hf import KDConfig, zero
args = KDConfig(output_dir=os.path.join(sys.argv[1], "out"), report_to=[])
seen = {"rank": os.environ.get("RANK"), "world": os.environ.get("WORLD_SIZE"),
        "args_deepspeed": args.deepspeed, "zero3": zero.is_zero3(args),
        "stage": zero.deepspeed_config(args)["zero_optimization"]["stage"]}
with open(os.path.join(sys.argv[1], f"rank{seen['rank']}.json"), "w") as f:
    json.dump(seen, f)
'''


def _launch(tmp_path, config: str, probe_source: str, **env_extra) -> list[dict]:
    """`accelerate launch --config_file examples/CONFIG probe.py` from the repository
    root (the configs name their files relative to it); what each rank saw."""
    probe = tmp_path / "probe.py"
    probe.write_text(probe_source)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env_extra)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(EXAMPLES / config), str(probe), str(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_zero3_config_reaches_every_process(tmp_path):
    """Under `accelerate launch` HF leaves `args.deepspeed` empty (accelerate's
    DeepSpeedPlugin carries the config): KDTrainer must still see ZeRO-3 (to shard
    the teacher, to gather its head)."""
    pytest.importorskip("deepspeed")
    for s in _launch(tmp_path, "accelerate_zero3.yaml", ZERO3_PROBE, DS_ACCELERATOR="cpu"):
        assert s["world"] == "2" and s["args_deepspeed"] is None
        assert s["zero3"] is True and s["stage"] == 3
    with open(EXAMPLES / "zero3.json") as f:
        assert json.load(f)["zero_optimization"]["stage"] == 3


def test_fsdp2_config_reaches_every_process(tmp_path):
    for s in _launch(tmp_path, "accelerate_fsdp2.yaml", PROBE):
        assert s["world"] == "2" and s["use_fsdp"] == "true"
        assert s["fsdp_version"] == 2 and s["reshard_after_forward"] is True
        assert s["wrap"] == ["LlamaDecoderLayer"] and "FULL_STATE_DICT" in s["state_dict_type"]
