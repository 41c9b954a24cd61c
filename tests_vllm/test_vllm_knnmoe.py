"""vllm-knnmoe on vLLM's CPU backend: stock reproduction, agreement with hf-knnmoe, the same errors, registration."""

import subprocess
import sys

import pytest
import torch
from conftest import ENGINE, evaluate, far_memory, per_doc, shutdown, tiny
from lm_eval.api.registry import get_model

from knnmoe_eval import KnnMoeError, attach, load_memory
from knnmoe_eval.harness.lm import KnnMoeLM
from knnmoe_eval.harness.vllm_lm import KnnMoeVLLM


def make(name, args):
    return get_model(name).create_from_arg_string(args)


@pytest.fixture(scope="module")
def far(olmoe_dir, tmp_path_factory):
    mem = far_memory(olmoe_dir, tmp_path_factory.mktemp("far") / "mem")
    lm = make("vllm-knnmoe", f"pretrained={olmoe_dir},memory={mem},{ENGINE}")
    yield lm
    shutdown(lm)


def test_far_memory_reproduces_vllm_exactly(olmoe_dir, far):
    tasks = ["tinyqa", "tinyqa_gen"]
    stock_lm = make("vllm", f"pretrained={olmoe_dir},{ENGINE}")
    try:
        stock = evaluate(stock_lm, tasks)
    finally:
        shutdown(stock_lm)
    ours = evaluate(far, tasks)
    for task in tasks:  # loglikelihoods and greedy generations, bit for bit
        assert per_doc(ours, task) == per_doc(stock, task)
    diag = ours["config"]["knnmoe"]["diagnostics"]
    assert set(diag) == {"0", "1"} and all(d["tokens"] > 12 and d["mean_lambda"] == 0 for d in diag.values())


def test_errors_are_those_of_hf_knnmoe(olmoe_dir, tmp_path):
    def message(cls, **kw):
        with pytest.raises(KnnMoeError) as err:
            cls(pretrained=olmoe_dir, **kw, **({"device": "cpu"} if cls is KnnMoeLM else {}))
        return str(err.value)

    for kw in ({"memory": str(tmp_path / "missing")}, {"memory": str(tmp_path), "simlarity": "rbf"},
               {"memory": str(tmp_path), "k": 0}):
        assert message(KnnMoeVLLM, **kw) == message(KnnMoeLM, **kw)
    assert "does not exist" in message(KnnMoeVLLM, memory=str(tmp_path / "missing"))
    assert "did you mean 'similarity'" in message(KnnMoeVLLM, memory=str(tmp_path), simlarity="rbf")
    assert "only evaluates" in message(KnnMoeVLLM, memory=str(tmp_path), mode="build")


def test_another_models_memory_is_refused_as_by_hf_knnmoe(olmoe_dir, far, tmp_path):
    """The check runs in the worker, before any request: the engine's attach answers what hf-knnmoe raises."""
    other = far_memory(tiny("olmoe", tmp_path / "other", seed=1), tmp_path / "mem")
    with pytest.raises(KnnMoeError) as hf_err:
        KnnMoeLM(pretrained=olmoe_dir, memory=other, device="cpu")
    with pytest.raises(KnnMoeError) as vllm_err:
        far._rpc("knnmoe_attach", {**vars(far.knn), "memory": other})
    assert "router weights of layers ['0', '1'] differ" in str(vllm_err.value)
    assert str(vllm_err.value) == str(hf_err.value)


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_built_memory_agrees_with_hf_knnmoe(family, tmp_path):
    model_dir = tiny(family, tmp_path / family)
    mem = tmp_path / "mem"
    evaluate("hf-knnmoe", ["tinyqa_ref"], model_args=f"pretrained={model_dir},mode=build,memory={mem}",
             batch_size=1, device="cpu")
    hf = evaluate("hf-knnmoe", ["tinyqa"], model_args=f"pretrained={model_dir},memory={mem}", batch_size=1,
                  device="cpu")
    lm = make("vllm-knnmoe", f"pretrained={model_dir},memory={mem},{ENGINE},enable_prefix_caching=False")
    try:
        ours = evaluate(lm, ["tinyqa"])
        # the same token sequences through both: per-layer mean lambda and logprobs agree to float32 noise
        docs = [s["doc"] for s in hf["samples"]["tinyqa"]]
        seqs = [lm.tok_encode(f"Q: {d['question']}\nA: {c}") for d in docs for c in d["choices"]]
        from vllm import SamplingParams, TokensPrompt

        lm.model.collective_rpc("knnmoe_diagnostics", args=(True,))
        outs = lm.model.generate([TokensPrompt(prompt_token_ids=s) for s in seqs],
                                 SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        vllm_diag = lm.model.collective_rpc("knnmoe_diagnostics", args=(True,))[0]
    finally:
        shutdown(lm)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    hf_lp = []
    with torch.no_grad(), attach(model, load_memory(mem)) as retriever:
        for s in seqs:
            logp = model(torch.tensor([s])).logits[0].log_softmax(-1)
            hf_lp.append(logp[:-1].gather(-1, torch.tensor(s[1:])[:, None])[:, 0])
    hf_diag = retriever.diagnostics()
    lam = lambda diag: [round(d["mean_lambda"], 6) for d in diag.values()]  # noqa: E731
    print(f"{family}: acc vllm-knnmoe {ours['results']['tinyqa']['acc,none']:.4f}, "
          f"hf-knnmoe {hf['results']['tinyqa']['acc,none']:.4f}; mean lambda per layer on the same tokens: "
          f"vllm {lam(vllm_diag)} hf {lam(hf_diag)}; in the lm-eval runs: vllm "
          f"{lam(ours['config']['knnmoe']['diagnostics'])} hf {lam(hf['config']['knnmoe']['diagnostics'])}")
    assert ours["results"]["tinyqa"]["acc,none"] == pytest.approx(hf["results"]["tinyqa"]["acc,none"], abs=0.01)
    for layer, d in hf_diag.items():
        assert vllm_diag[layer]["tokens"] == d["tokens"] == sum(map(len, seqs))  # every token, no padding row
        assert vllm_diag[layer]["mean_lambda"] == pytest.approx(d["mean_lambda"], abs=1e-3)
        assert 0.1 < d["mean_lambda"]  # the memory does act
    for out, lp in zip(outs, hf_lp):
        got = torch.tensor([next(iter(p.values())).logprob for p in out.prompt_logprobs[1:]])
        assert torch.allclose(got, lp, atol=1e-3)


def test_plain_lm_eval_registry_finds_vllm_knnmoe():
    code = "from lm_eval.api.registry import get_model; print(get_model('vllm-knnmoe').__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "KnnMoeVLLM"
