"""masktrain.malloc_tuning: glibc thresholds raised for the job, the user's own allocator settings left alone."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from masktrain import malloc_tuning

CHECK = "from masktrain.malloc_tuning import keep_freed_memory; print(keep_freed_memory())"


def _run(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in malloc_tuning.USER_VARIABLES}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_thresholds_raised_on_glibc():
    assert _run({}) == "True"


@pytest.mark.parametrize("var", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_CONF"])
def test_user_allocator_settings_are_left_alone(var):
    assert _run({var: "131072"}) == "False"
