"""hf-knnmoe through lm-eval: the plain CLI, stock reproduction, build then self-retrieval, diagnostics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import lm_eval.tasks
import pytest
import torch

from knnmoe_eval import KnnMoeError
from knnmoe_eval.core.families import FAMILIES
from knnmoe_eval.core.memory import load_memory, write_memory
from knnmoe_eval.core.routers import find_routers
from knnmoe_eval.core.signature import model_signature
from knnmoe_eval.testing import empty_keys, router_inputs, write_constant_memory

TASKS = str(Path(__file__).parent / "fixtures" / "tasks")  # the tinyqa fixture tasks

# the families run through lm-eval here: one per router shape (the rest go through attach() in test_retrieval);
# KNNMOE_LM_EVAL_FAMILIES=all runs every family
LM_EVAL_FAMILIES = FAMILIES if os.environ.get("KNNMOE_LM_EVAL_FAMILIES") == "all" else (
    "deepseek_v3", "llama4", "dbrx")


_TASK_MANAGER = []


def evaluate(model, model_args, tasks, **kw):
    if not _TASK_MANAGER:  # indexing lm-eval's thousands of task YAMLs takes seconds: do it once
        _TASK_MANAGER.append(lm_eval.tasks.TaskManager(include_path=TASKS))
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, task_manager=_TASK_MANAGER[0],
        batch_size=4, device="cpu", log_samples=True, **kw,
    )


def per_doc(results, task):
    return [(s["doc_id"], s["resps"]) for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def empty_memory(olmoe_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(olmoe_dir)
    sig = model_signature(model, find_routers(model))
    out = tmp_path_factory.mktemp("m") / "empty"
    return str(write_memory(out, {l: torch.zeros(0, sig["hidden_size"]) for l in sig["moe_layers"]},
                            {l: torch.zeros(0, sig["num_experts"]) for l in sig["moe_layers"]}, sig))


@pytest.mark.e2e
def test_empty_memory_reproduces_hf_through_lm_eval(olmoe_dir, empty_memory, tmp_path):
    tasks = ["tinyqa", "tinyqa_gen"]
    stock = evaluate("hf", f"pretrained={olmoe_dir}", tasks)
    diagnostics = tmp_path / "diagnostics.json"
    ours = evaluate("hf-knnmoe", f"pretrained={olmoe_dir},memory={empty_memory},diagnostics={diagnostics}", tasks)
    for task in tasks:
        assert per_doc(ours, task) == per_doc(stock, task)
    diag = ours["config"]["knnmoe"]["diagnostics"]
    assert set(diag) == {"0", "1"} and all(d["tokens"] > 0 and d["mean_lambda"] == 0 for d in diag.values())
    assert json.loads(diagnostics.read_text()) == diag  # diagnostics=FILE holds what the results JSON holds


@pytest.mark.e2e
def test_build_then_self_retrieval_lowers_the_reference_nll(olmoe_dir, tmp_path):
    mem = tmp_path / "mem"
    built = evaluate("hf-knnmoe", f"pretrained={olmoe_dir},mode=build,memory={mem},eta=100", ["tinyqa_ref"])
    stock = evaluate("hf", f"pretrained={olmoe_dir}", ["tinyqa_ref"])
    # the build's own results are the stock model's loglikelihoods of the gold answers
    for (_, a), (_, b) in zip(per_doc(built, "tinyqa_ref"), per_doc(stock, "tinyqa_ref")):
        assert a[0][0][0] == pytest.approx(b[0][0][0], abs=1e-3)
    ours = evaluate("hf-knnmoe", f"pretrained={olmoe_dir},memory={mem}", ["tinyqa_ref"])
    nll = lambda r: -sum(resps[0][0][0] for _, resps in per_doc(r, "tinyqa_ref"))  # noqa: E731
    assert nll(ours) < nll(stock)
    assert json.loads((mem / "manifest.json").read_text())["build"]["requests"] == 12


@pytest.mark.e2e
@pytest.mark.parametrize("task, message", [("tinyqa", "several answer choices"), ("tinyqa_gen", "loglikelihood build")])
def test_build_mode_refuses_tasks_that_are_not_build_tasks(olmoe_dir, tmp_path, task, message):
    with pytest.raises(KnnMoeError, match=message):
        evaluate("hf-knnmoe", f"pretrained={olmoe_dir},mode=build,memory={tmp_path / 'm'}", [task])
    assert not (tmp_path / "m" / "manifest.json").exists()


@pytest.mark.e2e
def test_unsupported_family_is_refused_at_load(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from knnmoe_eval.testing import make_tokenizer

    cfg = LlamaConfig(vocab_size=260, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(KnnMoeError, match="does not support model_type 'llama'"):
        evaluate("hf-knnmoe", f"pretrained={tmp_path},memory={tmp_path}", ["tinyqa"])


@pytest.mark.e2e
def test_plain_lm_eval_cli_finds_hf_knnmoe_and_saves_diagnostics(olmoe_dir, empty_memory, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf-knnmoe",
           "--model_args", f"pretrained={olmoe_dir},memory={empty_memory}", "--tasks", "tinyqa",
           "--include_path", TASKS, "--limit", "4", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = list((tmp_path / "out").rglob("results_*.json"))
    assert "diagnostics" in json.loads(results.read_text())["config"]["knnmoe"]


def test_registration_hook_costs_no_heavy_import():
    code = "import sys; print('torch' in sys.modules, 'lm_eval' in sys.modules, 'knnmoe_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "True"]


@pytest.mark.e2e
def test_two_process_build_equals_the_one_process_build(olmoe_dir, tmp_path):
    """torchrun + ACCELERATE_USE_CPU=1: each rank builds its share of the requests; rank 0 merges in request order."""
    from safetensors.torch import load_file

    single = tmp_path / "one"
    evaluate("hf-knnmoe", f"pretrained={olmoe_dir},mode=build,memory={single}", ["tinyqa_ref"])
    double = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    # --standalone: the rendezvous takes a free port, so parallel test runs never collide
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
           "-m", "lm_eval", "--model", "hf-knnmoe", "--model_args",
           f"pretrained={olmoe_dir},mode=build,memory={double}", "--tasks", "tinyqa_ref", "--include_path", TASKS,
           "--batch_size", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kNN-MoE build (rank 1)" in proc.stderr
    for layer in (0, 1):
        a = load_file(str(single / f"layer_{layer:03d}.safetensors"))
        b = load_file(str(double / f"layer_{layer:03d}.safetensors"))
        assert torch.equal(a["keys"], b["keys"])
        torch.testing.assert_close(a["values"], b["values"], rtol=0, atol=1e-5)  # other batches, other padding


def test_left_padded_generation_searches_only_real_tokens_and_equals_unpadded(olmoe_dir, tmp_path):
    """`_model_generate` as lm-eval calls it, on a left-padded batch: the padding rows never reach the index (the
    searched-token count is exactly the real tokens'), and each row generates what its prompt generates alone."""
    from transformers import AutoModelForCausalLM

    from knnmoe_eval.harness.lm import KnnMoeLM

    model = AutoModelForCausalLM.from_pretrained(olmoe_dir)
    prompts = [torch.randint(4, 250, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 4)]
    mem = write_constant_memory(tmp_path / "mem", model, router_inputs(model, prompts[0][None]),
                                lambda l, n, e: torch.randn(n, e, generator=torch.Generator().manual_seed(l)) * 10)
    lm = KnnMoeLM(pretrained=olmoe_dir, memory=str(mem), device="cpu", batch_size=2)
    width, new = max(len(p) for p in prompts), 5
    pad = torch.full((width,), lm.tokenizer.pad_token_id)
    context = torch.stack([torch.cat([pad[: width - len(p)], p]) for p in prompts])
    attention_mask = torch.stack([torch.arange(width) >= width - len(p) for p in prompts]).long()

    def generate(ids, mask):
        lm.retriever.reset_diagnostics()
        out = lm._model_generate(ids, max_length=ids.shape[1] + new, stop=[], attention_mask=mask)
        return out[:, ids.shape[1]:], lm.retriever.diagnostics()

    batched, diag = generate(context, attention_mask)
    alone = [generate(p[None], torch.ones(1, len(p), dtype=torch.long)) for p in prompts]
    assert all(d["mean_lambda"] > 0 for d in diag.values())  # the memory is in play
    for row, (tokens, _) in zip(batched, alone):
        assert torch.equal(row, tokens[0])
    # the prompts' real tokens in the first forward, then one token per row for each further step
    real = sum(len(p) for p in prompts) + len(prompts) * (new - 1)
    for layer, d in diag.items():
        assert d["tokens"] == real == sum(a[layer]["tokens"] for _, a in alone)

def test_right_padded_loglikelihood_batches_search_and_count_only_real_tokens(olmoe_dir, tmp_path):
    """Issue 23: diagnostics counted padding (more tokens at batch size 4 than at 1 for the same documents).
    hf right-pads loglikelihood batches with zeros and no mask; the padding must never be searched nor counted."""
    from transformers import AutoModelForCausalLM

    from knnmoe_eval.harness.lm import KnnMoeLM

    model = AutoModelForCausalLM.from_pretrained(olmoe_dir)
    seqs = [torch.randint(4, 250, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (12, 5, 9, 3)]
    mem = write_constant_memory(tmp_path / "mem", model, router_inputs(model, torch.tensor([seqs[0]])),
                                lambda l, n, e: torch.randn(n, e, generator=torch.Generator().manual_seed(l)) * 10)
    requests = [((f"doc {i}", ""), s[:-2], s[-2:]) for i, s in enumerate(seqs)]
    runs = {}
    for batch_size in (1, 4):
        lm = KnnMoeLM(pretrained=olmoe_dir, memory=str(mem), device="cpu", batch_size=batch_size)
        runs[batch_size] = lm._loglikelihood_tokens(requests), lm.retriever.diagnostics()
    real = sum(len(s) - 1 for s in seqs)  # each request's input: its tokens but the last
    for layer, d in runs[4][1].items():
        assert d["tokens"] == runs[1][1][layer]["tokens"] == real
        assert d["mean_lambda"] > 0 and d["mean_lambda"] == pytest.approx(runs[1][1][layer]["mean_lambda"], rel=1e-5)
    for (a, greedy_a), (b, greedy_b) in zip(runs[1][0], runs[4][0]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5) and greedy_a == greedy_b


def test_two_models_scoring_in_two_threads_each_mask_their_own_padding(olmoe_dir, tmp_path):
    """The batch lengths pass from lm-eval's padding to our model call through a context variable: two hf-knnmoe
    instances scoring at once in two threads (each forward waits for the other's) each search exactly their own real
    tokens, run after run."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoModelForCausalLM

    from knnmoe_eval.harness.lm import KnnMoeLM

    model = AutoModelForCausalLM.from_pretrained(olmoe_dir)
    seqs = {w: [torch.randint(4, 250, (n,), generator=torch.Generator().manual_seed(w * 100 + n)).tolist()
                for n in lengths] for w, lengths in enumerate([(12, 5, 9, 3), (4, 11, 6, 10)])}
    mem = write_constant_memory(tmp_path / "mem", model, router_inputs(model, torch.tensor([seqs[0][0]])),
                                lambda l, n, e: torch.randn(n, e, generator=torch.Generator().manual_seed(l)) * 10)
    lms = [KnnMoeLM(pretrained=olmoe_dir, memory=str(mem), device="cpu", batch_size=4) for _ in seqs]
    together = threading.Barrier(2, timeout=60)  # every forward of one waits for the other's: both are mid-batch

    def wait(module, args):
        together.wait()

    for lm in lms:
        lm.model.register_forward_pre_hook(wait)

    def score(w):
        requests = [((f"doc {i}", ""), s[:-2], s[-2:]) for i, s in enumerate(seqs[w])]
        for _ in range(5):
            lms[w]._loglikelihood_tokens(requests)
        return {layer: d["tokens"] for layer, d in lms[w].retriever.diagnostics().items()}

    with ThreadPoolExecutor(2) as pool:
        counts = list(pool.map(score, seqs))
    for w, got in enumerate(counts):
        assert set(got.values()) == {5 * sum(len(s) - 1 for s in seqs[w])}


@pytest.mark.e2e
@pytest.mark.equivalence
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_empty_and_far_memories_reproduce_hf_through_lm_eval(family, dtype, tiny_dir, tmp_path):
    """Every family, both dtypes: an empty memory and one whose keys are far from every token give lm-eval's `hf`
    results exactly (loglikelihoods and generations), on whatever CPU kernels this run uses."""
    from transformers import AutoModelForCausalLM

    pretrained = tiny_dir(family)
    model = AutoModelForCausalLM.from_pretrained(pretrained)
    tasks = ["tinyqa", "tinyqa_gen"]  # loglikelihood and generate_until
    stock = evaluate("hf", f"pretrained={pretrained},dtype={dtype}", tasks, limit=2)
    hidden = model_signature(model, find_routers(model))["hidden_size"]
    memories = {
        "empty": empty_keys(model),
        "far": {l: torch.full((4, hidden), 500.0) + torch.arange(4.0)[:, None] for l in empty_keys(model)},
    }
    for kind, keys in memories.items():
        mem = write_constant_memory(tmp_path / kind, model, keys, lambda l, n, e: torch.randn(n, e) * 100)
        ours = evaluate("hf-knnmoe", f"pretrained={pretrained},dtype={dtype},memory={mem},sigma=1", tasks, limit=2)
        for task in tasks:
            assert per_doc(ours, task) == per_doc(stock, task), (kind, task)
        assert all(d["tokens"] > 0 and d["mean_lambda"] == 0 for d in ours["config"]["knnmoe"]["diagnostics"].values())


@pytest.mark.e2e
@pytest.mark.parametrize("family", LM_EVAL_FAMILIES)
def test_family_builds_and_retrieves_through_lm_eval(family, tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    pretrained = tiny_dir(family)
    model = AutoModelForCausalLM.from_pretrained(pretrained)
    built = tmp_path / "built"
    grad = "dense" if family == "phimoe" else "paper"  # see test_families: sparsemixer's paper gradient vanishes
    evaluate("hf-knnmoe", f"pretrained={pretrained},mode=build,memory={built},eta=1e6,grad={grad}", ["tinyqa_ref"])
    load_memory(built)  # complete, checksums verified
    ours = evaluate("hf-knnmoe", f"pretrained={pretrained},memory={built},sigma=0.1", ["tinyqa_ref"])
    first = ours["config"]["knnmoe"]["diagnostics"][str(find_routers(model)[0].layer)]
    # the requests are the stored sequences: their answer tokens find themselves (per-token locality of the
    # change is checked through attach() in test_families)
    assert first["mean_lambda"] > 0.05 and first["topk_changed"] > 0
