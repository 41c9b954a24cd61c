"""scripts/kernel_levels.py: the levels `make test` runs the equivalence tests under, whatever level is forced now."""

import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).parents[1] / "scripts" / "kernel_levels.py"


def run(**env):
    return subprocess.run([sys.executable, str(SCRIPT)], env={**os.environ, **env}, capture_output=True, text=True,
                          check=True).stdout.split()


def test_levels_run_from_the_baseline_up_to_the_cpus_own_and_ignore_a_forced_level():
    levels = run()
    assert levels[0] == "default" and len(levels) == len(set(levels))
    assert run(ATEN_CPU_CAPABILITY="default") == levels  # a forced level is not what the CPU has
    for level in levels:  # torch runs each when forced
        code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": level},
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out.lower() == level
    if os.environ.get("ATEN_CPU_CAPABILITY") is None:
        assert levels[-1] == torch.backends.cpu.get_cpu_capability().lower()


def test_help():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    assert "ATEN_CPU_CAPABILITY" in out
