"""The SFT baselines: what each method trains, loading through lm-eval's `hf` peft=, resume, reuse, bad input."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from knnmoe_eval import KnnMoeError
from knnmoe_eval.core.routers import find_routers
from knnmoe_eval.experiments.sft import SftSettings, main, reference_requests, split, tokenize, train_sft

TASKS = str(Path(__file__).parent / "fixtures" / "tasks")  # the tinyqa fixture tasks

LR = 1e-2  # tiny random models: a large step makes a 3-epoch run on 10 documents move the loss clearly


def sft(pretrained, out, method, stop_after_epochs=None, **settings):
    settings = SftSettings(pretrained, ["tinyqa_ref"], method, include_path=TASKS, **{"lr": LR, **settings})
    return train_sft(settings, out, progress=False, stop_after_epochs=stop_after_epochs)


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """(pretrained, out, summary) of a finished run per (family, method), trained once per module."""
    runs = {}

    def get(family, method):
        if (family, method) not in runs:
            pretrained, out = tiny_dir(family), tmp_path_factory.mktemp(f"{family}-{method}")
            runs[family, method] = (pretrained, out, sft(pretrained, out, method))
        return runs[family, method]

    return get


def hf_val_loss(pretrained, summary, peft=None):
    """NLL per answer token of the validation documents, through lm-eval's own `hf` loglikelihood."""
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=pretrained, peft=peft, device="cpu", batch_size=4)
    val = {tuple(d) for d in summary["val_docs"]}
    requests = [r for r in reference_requests(["tinyqa_ref"], TASKS) if (r.task_name, r.doc_id) in val]
    tokens = sum(s.n_cont for s in tokenize(lm, requests))
    return -sum(ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)) / tokens


def merged_state(pretrained, adapter=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pretrained)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model, model.state_dict()


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["lora", "router"])
@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "mixtral"])
def test_training_lowers_val_loss_and_the_adapter_loads_through_hf_peft(trained, family, method):
    pretrained, out, summary = trained(family, method)
    assert summary["best_val_loss"] < summary["stock_val_loss"]
    assert summary["best_val_loss"] == min(summary["val_loss"])
    assert (summary["n_train"], summary["n_val"]) == (10, 2)  # 12 reference documents, 85/15
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json",
                                                     "adapter_model.safetensors", "train.json"]
    adapted = hf_val_loss(pretrained, summary, peft=str(out))
    assert adapted == pytest.approx(summary["best_val_loss"], rel=1e-5)
    stock = hf_val_loss(pretrained, summary)
    assert stock == pytest.approx(summary["stock_val_loss"], rel=1e-5)
    assert adapted < stock - 1e-4  # the rel=1e-5 matches above are ~5e-5 wide


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_router_sft_changes_router_weights_only(trained, family):
    pretrained, out, _ = trained(family, "router")
    stock_model, stock = merged_state(pretrained)
    _, tuned = merged_state(pretrained, out)
    router_params = {f"{s.name}.{n}" for s in find_routers(stock_model) for n, _ in s.module.named_parameters()}
    assert set(tuned) == set(stock)
    assert {k for k in stock if not torch.equal(stock[k], tuned[k])} == router_params


@pytest.mark.e2e
@pytest.mark.parametrize("family, extra", [
    ("olmoe", ()),
    ("qwen2_moe", ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight",
                   "mlp.shared_expert.down_proj.weight", "mlp.shared_expert_gate.weight")),
    ("gpt_oss", ()),
])
def test_lora_covers_attention_router_and_every_expert(tiny_dir, tmp_path, family, extra):
    """'All linear layers' as in transformers 4: attention, routers, experts, shared experts; nothing else moves."""
    pretrained = tiny_dir(family)
    sft(pretrained, tmp_path / "out", "lora", epochs=1)
    stock_model, stock = merged_state(pretrained)
    _, tuned = merged_state(pretrained, tmp_path / "out")
    router = find_routers(stock_model)[0].name.split("layers.0.")[1]  # mlp.gate, or mlp.router (GPT-OSS)
    expected = {f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        f"{router}.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj", *extra)}
    assert {k for k in stock if not torch.equal(stock[k], tuned[k])} == expected


@pytest.mark.e2e
def test_resumed_run_equals_uninterrupted_bit_for_bit(tiny_dir, tmp_path):
    pretrained = tiny_dir("olmoe")
    full = sft(pretrained, tmp_path / "full", "lora", epochs=2)
    partial = sft(pretrained, tmp_path / "resumed", "lora", epochs=2, stop_after_epochs=1)
    assert partial["stopped_after_epoch"] == 1 and not (tmp_path / "resumed" / "train.json").exists()
    resumed = sft(pretrained, tmp_path / "resumed", "lora", epochs=2)
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("wall_time_s",)
    assert {k: v for k, v in full.items() if k not in drop} == {k: v for k, v in resumed.items() if k not in drop}
    assert not (tmp_path / "resumed" / "checkpoints").exists()


@pytest.mark.e2e
def test_cpu_training_does_not_depend_on_the_thread_count(tiny_dir, tmp_path):
    pretrained, threads = tiny_dir("olmoe"), torch.get_num_threads()
    try:
        for n in (1, 2):  # as under OMP_NUM_THREADS=1 and 2
            torch.set_num_threads(n)
            sft(pretrained, tmp_path / str(n), "lora", epochs=2)
            assert torch.get_num_threads() == n  # the caller's setting is restored
    finally:
        torch.set_num_threads(threads)
    a, b = (load_file(tmp_path / str(n) / "adapter_model.safetensors") for n in (1, 2))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.e2e
def test_finished_run_is_reused_without_training_and_other_settings_refused(trained, monkeypatch):
    pretrained, out, summary = trained("olmoe", "router")

    def no_model(*args, **kwargs):
        raise AssertionError("a finished run must not load the model again")

    monkeypatch.setattr("lm_eval.models.huggingface.HFLM", no_model)
    assert sft(pretrained, out, "router") == summary
    assert json.loads((out / "train.json").read_text()) == summary
    with pytest.raises(KnnMoeError, match=r"other settings.*epochs"):
        sft(pretrained, out, "router", epochs=5)


@pytest.mark.e2e
def test_interrupted_run_with_other_settings_is_refused(tiny_dir, tmp_path):
    pretrained = tiny_dir("olmoe")
    sft(pretrained, tmp_path / "out", "router", epochs=2, stop_after_epochs=1)
    with pytest.raises(KnnMoeError, match=r"other settings.*'lr'"):
        sft(pretrained, tmp_path / "out", "router", epochs=2, lr=LR / 2)


@pytest.mark.parametrize("tasks, kwargs, message", [
    (["tinyqa"], {}, "several answer choices"),
    (["tinyqa_gen"], {}, "generate_until"),
    (["tinyqa_ref"], {"limit": 3}, "no validation documents"),
    (["tinyqa_ref"], {"val_frac": 0.0}, "val_frac must lie"),
])
def test_bad_reference_sets_are_refused(tiny_dir, tmp_path, tasks, kwargs, message):
    with pytest.raises(KnnMoeError, match=message):
        train_sft(SftSettings(tiny_dir("olmoe"), tasks, "lora", include_path=TASKS, **kwargs), tmp_path / "out",
                  progress=False)


def test_bad_method_and_foreign_output_dir_are_refused(tiny_dir, tmp_path):
    with pytest.raises(KnnMoeError, match="unknown SFT method 'full'"):
        sft(tiny_dir("olmoe"), tmp_path / "a", "full")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("x")
    with pytest.raises(KnnMoeError, match="not an SFT output directory"):
        sft(tiny_dir("olmoe"), tmp_path / "b", "lora")


def test_command_line_has_a_flag_per_setting_and_trains_the_same_run(tiny_dir, tmp_path, capsys):
    """`python -m knnmoe_eval.experiments.sft`: its flags are the settings' fields, read as their types; the run it
    trains is the one the same SftSettings train (the second call reuses the first's output)."""
    out = tmp_path / "out"
    main(["--pretrained", tiny_dir("olmoe"), "--tasks", "tinyqa_ref", "--method", "router", "--out", str(out),
          "--include_path", TASKS, "--epochs", "1", "--lr", str(LR), "--metadata", "{}"])
    printed = json.loads(capsys.readouterr().out)
    again = sft(tiny_dir("olmoe"), out, "router", epochs=1, metadata={})
    assert printed["settings"] == again["settings"] == SftSettings(
        tiny_dir("olmoe"), ("tinyqa_ref",), "router", include_path=TASKS, epochs=1, lr=LR, metadata={}).record()


def test_split_is_seeded_disjoint_and_refuses_empty():
    from knnmoe_eval.core.build import tokenize_request

    seqs = [tokenize_request(("t", i, 0), [1, 5], [6, 7], 64) for i in range(20)]
    train, val = split(seqs, 0.15, seed=0)
    assert (len(train), len(val)) == (17, 3)
    assert {s.rid for s in train}.isdisjoint(s.rid for s in val)
    assert split(seqs, 0.15, seed=0) == (train, val)
    assert split(seqs, 0.15, seed=1) != (train, val)
    assert split(list(reversed(seqs)), 0.15, seed=0) == (train, val)  # independent of request order
    with pytest.raises(KnnMoeError, match="reference split is empty"):
        split([], 0.15, seed=0)


@pytest.mark.e2e
def test_cli_prints_the_summary(trained, capsys):
    from knnmoe_eval.experiments.sft import main

    pretrained, out, summary = trained("olmoe", "router")
    main(["--pretrained", pretrained, "--tasks", "tinyqa_ref", "--method", "router", "--out", str(out),
          "--include_path", TASKS, "--lr", str(LR)])
    printed = json.loads(capsys.readouterr().out)
    assert printed == {k: v for k, v in summary.items() if k != "val_docs"}
