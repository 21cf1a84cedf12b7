"""``masktrain.tracking.import_wandb_early``: train.py imports wandb's run machinery before torch
and Lightning, only on the rank that starts the W&B run and only when the job logs to W&B."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys
from masktrain.tracking import import_wandb_early
did = import_wandb_early(sys.argv[1])
print(json.dumps({"did": did, "launch": "wandb.sdk.launch" in sys.modules, "wandb": "wandb" in sys.modules,
                  "torch": "torch" in sys.modules}))
"""


def probe(target: str, **env: str) -> dict:
    """Run the import in a fresh interpreter (sys.modules clean) and report what it loaded."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")}
    out = subprocess.run([sys.executable, "-c", PROBE, target], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**clean, "PYTHONPATH": str(REPO), **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_wandb_logger_on_rank_zero_imports_wandb_launch_without_torch():
    assert probe("lightning.pytorch.loggers.WandbLogger") == {"did": True, "launch": True, "wandb": True, "torch": False}


@pytest.mark.parametrize("target,env", [
    ("lightning.pytorch.loggers.CSVLogger", {}),
    ("None", {}),
    ("lightning.pytorch.loggers.WandbLogger", {"LOCAL_RANK": "1"}),  # a DDP child: Lightning hands it a dummy
    ("lightning.pytorch.loggers.WandbLogger", {"RANK": "3", "LOCAL_RANK": "0"}),  # RANK wins, as in Lightning
])
def test_other_loggers_and_other_ranks_import_nothing(target, env):
    assert probe(target, **env) == {"did": False, "launch": False, "wandb": False, "torch": False}
