"""Every script under scripts/ runs, as a user runs it from a fresh clone: its --help, and its quickest mode where
that takes seconds, so that none can rot unseen. The --help runs are cheap; the quickest runs start a fresh
interpreter (two for perf_memory), most build the wide OLMoE-shaped layer (~2 GiB, ~10 s) or go through lm-eval,
so they are e2e."""

import importlib.util
import json
import runpy
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from knnmoe_eval.testing import small_toy

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"

# Per script: the arguments of its quickest run ({tmp}: the test's directory) and the file or printed text that run
# must leave; None where there is no run of seconds to make (said why).
QUICK = {
    "cost_tables.py": (["--keys", "2000", "--examples", "1", "--references", "1", "--prompt-tokens", "24",
                        "--gen-tokens", "2", "--no-fit", "--allow-load", "--json", "{tmp}/cost_tables.json"],
                       "cost_tables.json"),
    "demo.py": None,  # its one run is `make demo` (~3 min: trains the README's toy)
    "gpu_check.py": (["--device", "cpu", "--layers", "1", "--keys", "2000", "--tokens", "16", "--reps", "1",
                      "--json", "{tmp}/gpu_check.json"], "gpu_check.json"),
    "kernel_levels.py": None,  # seconds, and tested for what it prints in test_kernel_levels.py
    "machine_load.py": None,  # a library of the perf scripts: test_machine_load_records_the_others_load below
    "perf_build.py": (["--layers", "1", "--requests", "2", "--context", "16", "--batch-size", "2",
                       "--json", "{tmp}/perf_build.json"], "perf_build.json"),
    "perf_index.py": (["--keys", "2000", "--indexes", "exact", "--reps", "1", "--tokens", "32", "--no-toy",
                       "--no-stages", "--allow-load", "--json", "{tmp}/perf_index.json"], "perf_index.json"),
    "perf_memory.py": (["--keys", "2000", "--layers", "1", "--d", "64", "--experts", "8", "--shard-rows", "500",
                        "--allow-load", "--json", "{tmp}/perf_memory.json"], "perf_memory.json"),
    "perf_overhead.py": (["--keys", "2000", "--indexes", "exact", "--layers", "1", "--requests", "2", "--context",
                          "16", "--batch-size", "2", "--allow-load", "--json", "{tmp}/perf_overhead.json"],
                         "perf_overhead.json"),
    "perf_vllm.py": (["--quick", "--json", "{tmp}/perf_vllm.json"], "perf_vllm.json"),  # needs vLLM
    "toy_check.py": (["--quick", "--cache-dir", "{tmp}/toy"], "1-NN router input"),
    "vllm_cpu_env.py": None,  # rewrites the vLLM environment it runs in: --help only
}
HELP_ONLY = {"machine_load.py"}  # no command line


def run_script(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_every_script_has_a_smoke_test():
    assert sorted(p.name for p in SCRIPTS.glob("*.py")) == sorted(QUICK)


@pytest.mark.parametrize("script", sorted(set(QUICK) - HELP_ONLY))
def test_help(script, capsys, monkeypatch):
    """In this process (a fresh interpreter per script costs seconds of imports), as `python scripts/x.py --help`:
    the script's directory first on sys.path, run as __main__."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / script), "--help"])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(SCRIPTS / script), run_name="__main__")
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")


def _quick(name: str):
    marks = [pytest.mark.e2e]
    if name == "perf_vllm.py":
        marks.append(pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM"))
    return pytest.param(name, marks=marks)


@pytest.mark.parametrize("script", [_quick(name) for name, quick in sorted(QUICK.items()) if quick])
def test_quickest_run(script, tmp_path):
    args, expect = QUICK[script]
    out = run_script(script, [a.format(tmp=tmp_path) for a in args], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    if expect.endswith(".json"):
        assert json.loads((tmp_path / expect).read_text())
    else:
        assert expect in out.stdout


def _load(script: str):
    sys.path.insert(0, str(SCRIPTS))  # the scripts import each other as a user's `python scripts/x.py` does
    try:
        spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), SCRIPTS / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


def test_cost_tables_reads_the_papers_memory_sizes_and_extrapolates_linearly():
    """Tables 8-9's N, lost from the paper's text, read back from Table 9's exact column: the largest is the whole
    MedMCQA train split at one answer token per reference (docs/tasks.md); and the 16-layer fit is a line."""
    cost = _load("cost_tables.py")
    keys = cost.paper_keys()
    assert keys == sorted(keys) and abs(keys[-1] - cost.REFERENCES) / cost.REFERENCES < 0.01
    assert 1.9 < keys[1] / keys[0] < 2.1 and 1.9 < keys[2] / keys[1] < 2.1
    assert cost.extrapolate({1: 3.0, 2: 5.0}) == 3.0 + 2.0 * 15 and cost.extrapolate({2: 1.0, 4: 1.0}) == 1.0


def test_machine_load_records_the_others_load():
    machine_load = _load("machine_load.py")
    with machine_load.Load(warn=False) as load:
        sum(range(10_000))
    assert set(load.record) == {"loadavg_before", "loadavg_after", "others_cores", "loaded"}
    assert load.record["others_cores"] is None or load.record["others_cores"] >= 0
    assert machine_load.require_quiet(allow_load=True, seconds=0.05)["others_cores"] is not None


@pytest.mark.e2e
def test_perf_index_toy_figures(tmp_path, monkeypatch):
    """The toy part of perf_index.py (the README's command), on a toy small enough to train in a second: build
    through lm-eval, each index, pruning (at a threshold that keeps this toy's few keys)."""
    from knnmoe_eval.experiments import toy

    small = toy.train_or_load(tmp_path / "toy", small_toy(), progress=False)
    monkeypatch.setattr(toy, "train_or_load", lambda cache, progress=True: small)
    perf_index = _load("perf_index.py")
    args = Namespace(toy_cache=tmp_path, workdir=tmp_path, indexes=["exact"], nprobe=None, toy_positions="answer",
                     prune=[1e-9], dedup=[])
    rows = perf_index.toy_figures(args)
    assert [r["index"] for r in rows] == ["stock (hf)", "exact", "exact, pruned min_change=1e-09"]
    assert rows[1]["points_vs_exact"] == 0 and all(0 <= r["acc"] <= 1 for r in rows)


@pytest.mark.e2e
def test_perf_build_vs_sft_times_both_sides(tmp_path):
    """perf_build.py --vs-sft at its smallest (the wide layer once, 8 references of 16 tokens): the plus build with
    its probe and router-only SFT's three epochs on the same references, both timed, the ratio between them."""
    out = run_script("perf_build.py", ["--vs-sft", "--layers", "1", "--requests", "8", "--context", "16",
                                       "--batch-size", "4", "--allow-load", "--json", f"{tmp_path}/vs.json"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads((tmp_path / "vs.json").read_text())
    plus, sft = figures["plus"], figures["sft"]
    assert plus["build"]["preset"] == "plus" and plus["build"]["probe"]["tokens"] > 0 and plus["build"]["requests"] == 8
    assert 0 < plus["probe_s"] < plus["wall_s"] <= plus["loglikelihood_s"]
    assert len(sft["epoch_s"]) == sft["settings"]["epochs"] == 3 and sft["settings"]["method"] == "router"
    assert sft["n_train"] + sft["n_val"] == 8 and sft["wall_time_s"] == pytest.approx(sum(sft["epoch_s"]))
    build_row, sft_row = figures["runs"]
    assert build_row["ratio_sft_over_plus"] == pytest.approx(sft_row["seconds"] / build_row["seconds"], rel=0.02)
    assert "loaded" in build_row and "loaded" in sft_row


@pytest.mark.e2e
def test_perf_build_vs_sft_on_a_toy_times_both_builds_and_sft(tmp_path, monkeypatch):
    """The toy mode of perf_build.py --vs-sft on a toy small enough to train in a second: each side timed once
    after the warm-up round, through lm-eval and train_sft, and the ratios are SFT's seconds over each side's."""
    from knnmoe_eval.experiments import toy

    small = toy.train_or_load(tmp_path / "toy", small_toy(), progress=False)
    monkeypatch.setattr(toy, "train_or_load", lambda cache, config, progress=True: small)
    perf_build = _load("perf_build.py")
    # two training steps leave the small toy's first layer admitting its own samples: the probe would refuse it
    rows = perf_build.toy_vs_sft(Namespace(toy="readme", toy_cache=tmp_path, workdir=tmp_path, reps=1,
                                           allow_load=True, probe_bound=1.0))
    assert [r["side"] for r in rows] == ["plus build, calibration text", "plus build, no calibration text (probe)",
                                         "router-only SFT (3 epochs)"]
    assert all(r["seconds"] > 0 and len(r["runs"].split()) == 1 for r in rows)
    assert rows[2]["ratio_sft_over_plus"] == 1.0
    # the seconds are rounded to 1 ms, the ratio to 3 decimals: their own relative error bounds the comparison
    rel = 0.0005 / rows[0]["seconds"] + 0.0005 / rows[2]["seconds"] + 0.0005 / rows[0]["ratio_sft_over_plus"]
    assert rows[0]["ratio_sft_over_plus"] == pytest.approx(rows[2]["seconds"] / rows[0]["seconds"], rel=rel)
