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


def test_fsdp2_config_reaches_every_process(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(EXAMPLES / "accelerate_fsdp2.yaml"), str(probe), str(tmp_path)]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for s in seen:
        assert s["world"] == "2" and s["use_fsdp"] == "true"
        assert s["fsdp_version"] == 2 and s["reshard_after_forward"] is True
        assert s["wrap"] == ["LlamaDecoderLayer"] and "FULL_STATE_DICT" in s["state_dict_type"]
