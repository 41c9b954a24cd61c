"""vllm-knnmoe on vLLM's CPU backend, compiled (vLLM's defaults: Dynamo fullgraph + inductor): stock reproduction,
agreement with eager vllm-knnmoe and with hf-knnmoe, the same errors, registration."""

import subprocess
import sys

import pytest
import torch
from conftest import COMPILED, ENGINE, evaluate, far_memory, per_doc, shutdown, tiny
from lm_eval.api.registry import get_model

from knnmoe_eval import KnnMoeError, attach, load_memory
from knnmoe_eval.harness.lm import KnnMoeLM
from knnmoe_eval.harness.vllm_lm import KnnMoeVLLM, piecewise_config


def make(name, args):
    return get_model(name).create_from_arg_string(args)


@pytest.fixture(scope="module")
def far(olmoe_dir, tmp_path_factory):
    mem = far_memory(olmoe_dir, tmp_path_factory.mktemp("far") / "mem")
    lm = make("vllm-knnmoe", f"pretrained={olmoe_dir},memory={mem},{COMPILED}")
    yield lm
    shutdown(lm)


def test_far_memory_reproduces_compiled_vllm_exactly(olmoe_dir, far):
    """Both compiled by vLLM (no enforce_eager): the graph with knnmoe::route in it gives stock's bits."""
    tasks = ["tinyqa", "tinyqa_gen"]
    stock_lm = make("vllm", f"pretrained={olmoe_dir},{COMPILED}")
    try:
        stock = evaluate(stock_lm, tasks)
    finally:
        shutdown(stock_lm)
    ours = evaluate(far, tasks)
    for task in tasks:  # loglikelihoods and greedy generations, bit for bit
        assert per_doc(ours, task) == per_doc(stock, task)
    diag = ours["config"]["knnmoe"]["diagnostics"]
    assert set(diag) == {"0", "1"} and all(d["tokens"] > 12 and d["mean_lambda"] == 0 for d in diag.values())
    calls = far.model.collective_rpc("knnmoe_calls")[0]
    assert set(calls) == {"0", "1"} and calls["0"] == calls["1"] > 0  # the op ran, in every MoE layer


def test_compilation_config_splits_at_the_op_and_refuses_full_graphs():
    from vllm.config import CompilationConfig, CUDAGraphMode

    config = piecewise_config(None, "olmoe")
    assert config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    # an explicit list replaces vLLM's defaults, so they are in it, and FusedMoE's op only where it holds the gate
    assert set(CompilationConfig._attention_ops) < set(config.splitting_ops)
    assert "knnmoe::route" in config.splitting_ops and "vllm::moe_forward" not in config.splitting_ops
    assert "vllm::moe_forward" in piecewise_config('{"mode": 3}', "qwen3_moe").splitting_ops
    mine = piecewise_config({"splitting_ops": ["silly::attention"], "cudagraph_mode": "NONE"}, "olmoe")
    assert mine.splitting_ops == ["silly::attention", "knnmoe::route"] and mine.cudagraph_mode == CUDAGraphMode.NONE
    for mode in ("FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"):
        with pytest.raises(KnnMoeError, match=f"cannot run cudagraph_mode={mode}: full CUDA graphs capture"):
            piecewise_config({"cudagraph_mode": mode}, "olmoe")


def test_route_op_passes_opcheck(tmp_path):
    """torch.library.opcheck on knnmoe::route routing a tiny HF model's router with a memory of its own states."""
    from transformers import AutoModelForCausalLM

    from knnmoe_eval.core.routers import find_routers
    from knnmoe_eval.core.memory import write_memory
    from knnmoe_eval.core.options import KnnMoeOptions
    from knnmoe_eval.core.retrieval import Retriever
    from knnmoe_eval.core.signature import model_signature
    from knnmoe_eval.harness.vllm_plugin import ROUTING

    model = AutoModelForCausalLM.from_pretrained(tiny("olmoe", tmp_path / "olmoe"))
    sites = find_routers(model)
    sig = model_signature(model, sites)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, sig["hidden_size"], generator=g)
    keys = {l: torch.cat([h, torch.randn(10, sig["hidden_size"], generator=g)]) for l in sig["moe_layers"]}
    values = {l: 5 * torch.randn(16, sig["num_experts"], generator=g) for l in sig["moe_layers"]}
    mem = load_memory(write_memory(tmp_path / "mem", keys, values, sig))
    retriever = Retriever(model, mem, KnnMoeOptions(memory=str(tmp_path / "mem")), sites=sites)
    saved = ROUTING.retriever, ROUTING.sites, ROUTING.calls
    ROUTING.install(retriever, {s.layer: s for s in sites})
    try:
        z = h @ sites[0].weight.detach().T
        out = torch.empty_like(z)
        torch.ops.knnmoe.route(h, z, out, sites[0].layer)
        assert not torch.equal(out, z)  # near keys: the op did mix
        torch.library.opcheck(torch.ops.knnmoe.route.default, (h, z, torch.empty_like(z), sites[0].layer))
    finally:
        ROUTING.retriever, ROUTING.sites, ROUTING.calls = saved


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
        far._rpc("knnmoe_attach", {**vars(far.options), "memory": other})
    assert "router weights of layers ['0', '1'] differ" in str(vllm_err.value)
    assert str(vllm_err.value) == str(hf_err.value)


def _route(lm, seqs, gen, knn=True):
    """Prompt logprobs of seqs, then greedy generations of `gen` tokens; the op calls so far and the diagnostics of
    each (None for plain vllm, `knn=False`)."""
    from vllm import SamplingParams, TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=s) for s in seqs]
    rpc = (lambda name, *args: lm.model.collective_rpc(name, args=args)[0]) if knn else (lambda *_: None)
    runs = []
    # temperature=0: vLLM samples at temperature 1 by default, and a sampled token is no comparison
    for params in (SamplingParams(max_tokens=1, prompt_logprobs=0),
                   SamplingParams(max_tokens=gen, ignore_eos=True, temperature=0, logprobs=2)):
        rpc("knnmoe_diagnostics", True)  # forget what ran before
        outs = lm.model.generate(prompts, params, use_tqdm=False)
        runs.append((outs, rpc("knnmoe_calls"), rpc("knnmoe_diagnostics", True)))
    return runs


def _greedy_agree(a, b, tol):
    """Two greedy generations agree: each step's token is the same with logprobs within tol, or the steps are a
    near-tie, where rounding within tol may pick either (|top-1 - top-2| <= 2 tol in both runs), and past it the
    sequences are free to differ. Returns the number of tokens compared, so the caller can see it was not none."""
    compared = 0
    for ta, tb, la, lb in zip(a.token_ids, b.token_ids, a.logprobs, b.logprobs):
        if ta != tb:
            for lp in (la, lb):
                assert ta in lp and tb in lp, f"tokens {ta} and {tb} are not both in the top 2: no near-tie"
                assert abs(lp[ta].logprob - lp[tb].logprob) <= 2 * tol, f"{ta} vs {tb}: margin beyond rounding"
            break
        assert abs(la[ta].logprob - lb[tb].logprob) <= tol
        compared += 1
    return compared


def _prompt_logprobs(outs):
    return [torch.tensor([next(iter(p.values())).logprob for p in out.prompt_logprobs[1:]]) for out in outs]


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_built_memory_agrees_with_hf_knnmoe_and_eager(family, olmoe_dir, tmp_path):
    """Compiled vllm-knnmoe with a memory hf-knnmoe built (self-retrieval: near, lambda > 0) against hf-knnmoe on
    the same token sequences and, for OLMoE, against eager vllm-knnmoe; the op searched every token of every step."""
    model_dir = olmoe_dir if family == "olmoe" else tiny(family, tmp_path / family)  # olmoe: `far`'s compile cache
    mem = tmp_path / "mem"
    evaluate("hf-knnmoe", ["tinyqa_ref"], model_args=f"pretrained={model_dir},mode=build,memory={mem}",
             batch_size=1, device="cpu")
    hf = evaluate("hf-knnmoe", ["tinyqa"], model_args=f"pretrained={model_dir},memory={mem}", batch_size=1,
                  device="cpu")
    docs = [s["doc"] for s in hf["samples"]["tinyqa"]]
    gen = 4
    runs = {}
    for name, engine in [("compiled", COMPILED)] + ([("eager", ENGINE)] if family == "olmoe" else []):
        lm = make("vllm-knnmoe", f"pretrained={model_dir},memory={mem},{engine},enable_prefix_caching=False")
        try:
            if name == "compiled":
                ours = evaluate(lm, ["tinyqa"])
            seqs = [lm.tok_encode(f"Q: {d['question']}\nA: {c}") for d in docs for c in d["choices"]]
            runs[name] = _route(lm, seqs, gen)
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
    (outs, calls, vllm_diag), (gen_outs, gen_calls, gen_diag) = runs["compiled"]
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
        # generation: every prompt token, then each fed-back token (the last one generated is never fed)
        assert gen_diag[layer]["tokens"] == sum(map(len, seqs)) + len(seqs) * (gen - 1)
    assert len(set(calls.values())) == len(set(gen_calls.values())) == 1 and gen_calls[layer] >= gen  # every layer
    for got, lp in zip(_prompt_logprobs(outs), hf_lp):
        assert torch.allclose(got, lp, atol=1e-3)
    if "eager" in runs:  # compiled vs eager vllm-knnmoe: float rounding (inductor's fused kernels) only
        (e_outs, e_calls, e_diag), (e_gen, e_gen_calls, e_gen_diag) = runs["eager"]
        worst = max((a - b).abs().max().item() for a, b in zip(_prompt_logprobs(outs), _prompt_logprobs(e_outs)))
        print(f"compiled vs eager vllm-knnmoe: max |d logprob| {worst:.2e}, mean lambda compiled {lam(vllm_diag)} "
              f"eager {lam(e_diag)}")
        assert worst < 1e-4
        for layer, d in e_diag.items():
            assert d["tokens"] == vllm_diag[layer]["tokens"]
            assert d["mean_lambda"] == pytest.approx(vllm_diag[layer]["mean_lambda"], abs=1e-5)
        compared = [_greedy_agree(e.outputs[0], c.outputs[0], 1e-4) for e, c in zip(e_gen, gen_outs)]
        print(f"greedy tokens agreeing before any near-tie: {sum(compared)} of {gen * len(seqs)}")
        assert sum(compared) >= gen * len(seqs) // 2  # near-ties are rare: most of the tokens were compared


def test_plain_lm_eval_registry_finds_vllm_knnmoe():
    code = "from lm_eval.api.registry import get_model; print(get_model('vllm-knnmoe').__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "KnnMoeVLLM"
