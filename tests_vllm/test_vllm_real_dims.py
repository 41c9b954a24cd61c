"""vllm-knnmoe at OLMoE-1B-7B-0125-Instruct's real dimensions: the vendored published config cut to one layer
(hidden 2048, 16 heads of 128, 64 experts of width 1024, top-8, vocabulary 50304), random weights, its real
tokenizer (`knnmoe_eval.testing_real`). One memory holds the router inputs of two prompts (near: self-retrieval,
with values that reroute) and nothing like two others (far: every token beyond `max_distance`, so lambda = 0
exactly). The far prompts reproduce plain vLLM bit for bit (prompt logprobs and greedy generation); the near
ones reroute and agree with hf-knnmoe's logprobs on the same tokens.

Cheap by design (~65 s at OMP_NUM_THREADS=2): two engines (plain vLLM, with the knnmoe plugin registered as
everywhere but no memory, and vllm-knnmoe: vLLM cannot swap a memory, hence one memory for both claims), eager
(enforce_eager: compiling this layer costs more than this file's budget on 2 cores; the compiled path is
test_vllm_knnmoe.py's, on the tiny models), inside this process (VLLM_ENABLE_V1_MULTIPROCESSING=0: an engine's
two processes would each import vLLM and torch anew, ~40 s of each start on 2 cores), one sequence at a time
(max_num_seqs=1: the far prompts' batches are then the same in both engines, whatever the scheduler's timing)."""

import gc

import pytest
import torch
from conftest import shutdown
from test_vllm_knnmoe import _prompt_logprobs, _route, make

from knnmoe_eval import attach, load_memory
from knnmoe_eval.core.memory import write_memory
from knnmoe_eval.core.routers import find_routers
from knnmoe_eval.core.signature import model_signature
from knnmoe_eval.testing import router_inputs
from knnmoe_eval.testing_real import make_real_model, real_tokenizer

NAME = "olmoe-1b-7b-0125-instruct"
MAX_DISTANCE = 1.0  # vLLM finds the near keys at a rounding distance (~1e-3); other tokens' inputs lie ~10-60 away
ENGINE = "dtype=float32,max_model_len=256,max_num_batched_tokens=256,max_num_seqs=1,seed=0,enforce_eager=True,enable_prefix_caching=False"
GEN = 4
NEAR = [
    "Question: A 46-year-old man presents with three weeks of progressive fatigue, exertional dyspnoea and a dry "
    "cough that is worse at night. On examination the temperature is 38.2 C and the pulse 112/min. Which of the "
    "following is the most likely diagnosis?\nA. Pleural effusion\nB. Asthma\nC. Pulmonary embolism\nD. "
    "Sarcoidosis\nAnswer:",
    "Question: Vitamin K is required for the synthesis of which coagulation factor, and which laboratory test is "
    "prolonged first when it is deficient in a newborn?\nA. Factor VIII\nB. Factor XII\nC. Factor II\nD. Factor "
    "XIII\nAnswer:",
]
FAR = [
    "Which nerve supplies the deltoid muscle, and which fracture of the humerus most often injures it? Options: "
    "radial, axillary, ulnar, median. Reply with one letter.",
    "Drug of choice for absence seizures in a seven-year-old girl with no other illness: carbamazepine, phenytoin, "
    "ethosuximide or gabapentin? Reply with one letter.",
]


@pytest.fixture(scope="module")
def real_olmoe(tmp_path_factory):
    """The model (saved in bf16, its published dtype; every side loads it in float32), the memory, and
    hf-knnmoe's per-token logprobs of every prompt, stock and with the memory."""
    root = tmp_path_factory.mktemp("olmoe_real")
    model_dir = root / "model"
    model = make_real_model(NAME, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    tok = real_tokenizer(NAME)
    tok.save_pretrained(model_dir)
    model = model.float()  # what loading the bf16 checkpoint in float32 gives, without reading it back
    near, far = [tok(p)["input_ids"] for p in NEAR], [tok(p)["input_ids"] for p in FAR]
    assert model.config.vocab_size == 50304 and model.config.hidden_size == 2048
    sig = model_signature(model, find_routers(model))
    # every distinct router input of the near prompts (identical prefixes give identical rows: one of each, so that
    # no tie between equal keys with other values decides the routing), with values that reroute decisively
    keys = {}
    for s in near:
        for l, h in router_inputs(model, torch.tensor([s])).items():
            keys.setdefault(l, []).append(h.float())
    keys = {l: torch.unique(torch.cat(hs), dim=0) for l, hs in keys.items()}
    g = torch.Generator().manual_seed(0)
    values = {l: 50 * torch.randn(len(k), sig["num_experts"], generator=g) for l, k in keys.items()}
    memory = write_memory(root / "memory", keys, values, sig)

    def logprobs(seqs):
        out = []
        for s in seqs:
            logp = model(torch.tensor([s])).logits[0].double().log_softmax(-1)
            out.append(logp[:-1].gather(-1, torch.tensor(s[1:])[:, None])[:, 0].float())
        return out

    hf = {}
    with torch.no_grad():
        hf["stock"] = logprobs(near + far)
        with attach(model, load_memory(memory), max_distance=MAX_DISTANCE) as retriever:
            hf["far"] = logprobs(far)
            hf["far_diag"] = retriever.diagnostics()
            retriever.reset_diagnostics()
            hf["near"] = logprobs(near)
            hf["near_diag"] = retriever.diagnostics()
    del model, retriever  # the retriever holds the model's routers: both go before the engines start
    gc.collect()
    yield dict(dir=str(model_dir), near=near, far=far, memory=str(memory), hf=hf)


def _tokens_and_logprobs(outs):
    return [(o.outputs[0].token_ids, [{t: l.logprob for t, l in lp.items()} for lp in o.outputs[0].logprobs])
            for o in outs]


def _max_diff(xs, ys):
    return max((a - b).abs().max().item() for a, b in zip(xs, ys))


@pytest.fixture
def in_process(monkeypatch):
    """Engines inside this process (no engine-core and worker processes, each of which would import vLLM and
    torch anew: most of an engine's start on 2 cores); the routing state they install here is put back after."""
    from knnmoe_eval.harness.vllm_plugin import ROUTING

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    saved = ROUTING.retriever, ROUTING.sites, ROUTING.calls
    yield
    ROUTING.retriever, ROUTING.sites, ROUTING.calls = saved


def test_far_tokens_are_plain_vllm_and_near_ones_agree_with_hf_knnmoe(real_olmoe, in_process):
    r, hf = real_olmoe, real_olmoe["hf"]
    near, far = r["near"], r["far"]
    assert 25 < min(map(len, near + far)) and max(map(len, near + far)) < 120  # real-tokenizer prompts
    assert hf["far_diag"]["0"]["mean_lambda"] == 0 and all(map(torch.equal, hf["far"], hf["stock"][len(near):]))

    lm = make("vllm", f"pretrained={r['dir']},{ENGINE}")
    try:
        (stock_far, _, _), (stock_far_gen, _, _) = _route(lm, far, GEN, knn=False)
        (stock_near, _, _), _ = _route(lm, near, GEN, knn=False)
    finally:
        shutdown(lm)
    lm = make("vllm-knnmoe", f"pretrained={r['dir']},memory={r['memory']},max_distance={MAX_DISTANCE},{ENGINE}")
    try:
        (far_out, _, far_diag), (far_gen, far_calls, _) = _route(lm, far, GEN)
        (near_out, _, near_diag), _ = _route(lm, near, GEN)
    finally:
        shutdown(lm)

    # far: lambda = 0 on every token, and the bits are plain vLLM's, prompt logprobs and greedy tokens alike
    assert far_calls["0"] >= GEN and far_diag["0"]["tokens"] == sum(map(len, far))  # the op searched every token
    assert far_diag["0"]["mean_lambda"] == 0
    assert [o.prompt_logprobs for o in far_out] == [o.prompt_logprobs for o in stock_far]
    assert _tokens_and_logprobs(far_gen) == _tokens_and_logprobs(stock_far_gen)

    # near: vLLM's own router inputs find HF's at a rounding distance; lambda ~ 1 and most tokens' top-8 change,
    # on both backends alike
    d_hf, d_vllm = hf["near_diag"]["0"], near_diag["0"]
    assert d_vllm["tokens"] == d_hf["tokens"] == sum(map(len, near))
    assert d_vllm["mean_lambda"] > 0.99 and d_hf["mean_lambda"] > 0.99
    assert d_vllm["topk_changed"] > 0.9 and d_vllm["topk_changed"] == pytest.approx(d_hf["topk_changed"],
                                                                                     abs=1.5 / d_hf["tokens"])

    # The tolerance comes from the numerics of this very run: vLLM and transformers compute the same float32 layer
    # with other kernels and differ by eps_stock on the stock model. The memory changes which experts run (other
    # weights, the same operations and magnitudes) and mixes z* at lambda = 1 - O(rounding), which moves the
    # router logits by O(rounding) |z* - z|: the kNN path may differ by a few times eps_stock, not more.
    stock_lp = _prompt_logprobs(stock_near + stock_far)
    near_lp = _prompt_logprobs(near_out)
    eps_stock = _max_diff(stock_lp, hf["stock"])
    eps_near = _max_diff(near_lp, hf["near"])
    moved = min((a - b).abs().max().item() for a, b in zip(near_lp, stock_lp))
    print(f"max |vllm - hf| logprob: stock {eps_stock:.2e}, near memory {eps_near:.2e}; the memory moves each near "
          f"prompt's logprobs by at least {moved:.2e}")
    assert 0 < eps_stock < 1e-3  # two float32 implementations
    assert eps_near <= 4 * eps_stock
    assert moved > 1000 * eps_stock  # the rerouting is visible far beyond the backends' disagreement
