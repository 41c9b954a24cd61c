"""Smoke test of scripts/perf_vllm.py: it runs from a clean environment (no VLLM_CPU_KVCACHE_SPACE) and writes its
table; engines eager and 2k keys to stay cheap (the figures of docs/vllm.md come from its full run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "perf_vllm.py"


@pytest.mark.e2e
def test_perf_vllm_quick_runs_on_a_fresh_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    out = tmp_path / "perf.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--eager", "--allow-load", "--keys", "2000",
                          "--indexes", "exact", "--prompts", "2", "--gen", "2", "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["runs"]
    assert [(r["model"], r["keys"], r["index"]) for r in rows] == [("vllm (enforce_eager)", 0, "-"),
                                                                    ("vllm-knnmoe", 2000, "exact")]
    assert all(r["ll_tok_s"] > 0 and r["gen_tok_s"] > 0 for r in rows) and rows[0]["ll_vs_vllm"] == 1.0
    assert "ll_vs_vllm" in run.stdout
