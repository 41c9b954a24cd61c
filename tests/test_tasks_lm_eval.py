"""End to end through lm-eval: groups with the dummy model, MBPP pass@1 with a model that writes the gold programs,
and the `lm_eval --model hf ... --tasks knnmoe_test --include_path tasks` command on a tiny model, offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from knnmoe_eval.benchmarks import data as B

pytestmark = pytest.mark.e2e  # lm-eval runs over every benchmark's tasks, one through the `lm_eval` command

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "fixtures" / "data"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def evaluate(model, tasks, **metadata):
    manager = TaskManager(include_path=str(ROOT / "tasks"), metadata={"data_dir": str(DATA), **metadata})
    return simple_evaluate(
        model=model, tasks=tasks, task_manager=manager, confirm_run_unsafe_code=True, bootstrap_iters=0
    )


def test_test_group_averages_over_all_items_and_ref_size_cuts_every_reference_set():
    out = evaluate("dummy", ["knnmoe_test", "knnmoe_ref"], ref_size=2)
    assert out["n-samples"]["knnmoe_mmlu_ref"] == {"original": 2, "effective": 2}
    assert {out["n-samples"][f"knnmoe_{b}_ref"]["effective"] for b in B.BENCHMARK_SPLITS} == {2}
    per_task = {b: out["results"][f"knnmoe_{b}"] for b in B.BENCHMARK_SPLITS if b != "mbpp"}
    sizes = {b: out["n-samples"][f"knnmoe_{b}"]["effective"] for b in per_task}
    concatenated = sum(per_task[b]["acc,none"] * sizes[b] for b in per_task) / sum(sizes.values())
    assert out["results"]["knnmoe_test"]["acc,none"] == pytest.approx(concatenated)
    assert "bits_per_byte,none" in out["results"]["knnmoe_mbpp"]


class GoldCoder(LM):
    """Answers each MBPP prompt with the gold program of the problem it states."""

    def __init__(self):
        super().__init__()
        self.programs = {d["question"]: d["code"] for d in B.split_sets("mbpp", data_dir=DATA)[0]}

    def generate_until(self, requests, disable_tqdm=False):
        return [next(code for text, code in self.programs.items() if text in r.arguments[0]) for r in requests]

    def loglikelihood(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError


def test_mbpp_pass_at_1_end_to_end(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    gold = evaluate(GoldCoder(), ["knnmoe_mbpp_gen"])["results"]["knnmoe_mbpp_gen"]
    assert gold["pass@1,none"] == 1.0 and gold["acc,none"] == 1.0


def test_lm_eval_cli_runs_knnmoe_test_with_hf_offline(tmp_path):
    from knnmoe_eval.testing import save_tiny

    model = save_tiny("olmoe", tmp_path / "model")
    command = [
        str(Path(sys.executable).with_name("lm_eval")), "--model", "hf", "--model_args", f"pretrained={model}",
        "--device", "cpu", "--tasks", "knnmoe_test", "--include_path", "tasks",
        "--metadata", f"data_dir={DATA}", "--limit", "2", "--output_path", str(tmp_path / "out"), "--log_samples",
    ]
    run = subprocess.run(command, cwd=ROOT, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["n-samples"]["knnmoe_supergpqa"] == {"original": 16, "effective": 2}
    # the group's accuracy is the mean over every item the model answered (2 per multiple-choice benchmark)
    accs = [json.loads(line)["acc"] for b in B.BENCHMARK_SPLITS if b != "mbpp"
            for f in results_file.parent.glob(f"samples_knnmoe_{b}_2*.jsonl") for line in f.read_text().splitlines()]
    assert len(accs) == 2 * (len(B.BENCHMARK_SPLITS) - 1)
    assert results["results"]["knnmoe_test"]["acc,none"] == pytest.approx(sum(accs) / len(accs))


@pytest.mark.parametrize("task", ["knnmoe_medmcqa_5shot"])  # the build task (_ref) was refused already
def test_an_empty_reference_split_is_refused_by_us_before_lm_eval_or_datasets_fail(tmp_path, task):
    import shutil

    from knnmoe_eval.errors import KnnMoeError

    shutil.copytree(DATA / "medmcqa", tmp_path / "medmcqa")
    (tmp_path / "medmcqa" / "train.jsonl").write_text("")  # medmcqa's reference split
    with pytest.raises(KnnMoeError, match=r"medmcqa: the reference set is empty.*train\.jsonl"):
        evaluate("dummy", [task], data_dir=str(tmp_path))
