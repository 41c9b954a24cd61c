"""OLMoE-1B-7B-0125-Instruct, gpt-oss-20b and Qwen3-30B-A3B at their real dimensions (one layer, random weights,
`knnmoe_eval.testing_real`) through hf-knnmoe and lm-eval: they load in bf16 and fp32 and pass the router
self-check; under each real chat template an empty memory reproduces `hf` bit for bit (loglikelihood and
generation); a memory built from a MedMCQA-schema reference split at real prompt lengths is evaluated on its test
split.

The end-to-end test runs in fp32: a CPU without AVX512-BF16 emulates every bf16 matmul, and there the bf16 run of
gpt-oss alone took 205 s (its experts' grouped matmuls 75 s, the 201k-row LM head and attention 56 s, the build's
backward 54 s). bf16, the published dtype, is loaded and self-checked below, and every family's bf16 path is
tested bit for bit against `hf` at small dimensions (tests/test_lm_eval.py, at each CPU kernel level)."""

import gc
import json
import shutil
from types import SimpleNamespace

import lm_eval
import pytest
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from test_real_models import SYSTEM, TASKS

from knnmoe_eval.core.routers import find_routers
from knnmoe_eval.core.memory import load_memory, write_memory
from knnmoe_eval.core.signature import model_signature
from knnmoe_eval.harness.lm import KnnMoeLM
from knnmoe_eval.testing_real import REAL_MODELS, make_real_model, published_config, real_tokenizer

pytestmark = pytest.mark.e2e

N_REF, N_TEST = 4, 2
_FINDINGS = [
    "He reports three weeks of progressive fatigue, exertional dyspnoea and a dry cough that is worse at night.",
    "Her past history includes type 2 diabetes treated with metformin, hypertension and a cholecystectomy.",
    "On examination the temperature is 38.2 C, pulse 112/min, blood pressure 96/60 mm Hg and SpO2 91% on air.",
    "There is dullness to percussion at the right base with reduced breath sounds and bronchial breathing above.",
    "Laboratory studies show haemoglobin 10.1 g/dL, leukocytes 16,400/mm3 with 85% neutrophils, CRP 180 mg/L.",
    "Serum sodium is 129 mmol/L, potassium 3.4 mmol/L, urea 12 mmol/L and creatinine 140 umol/L.",
    "A chest radiograph shows a right lower lobe opacity with a meniscus sign and blunting of the costophrenic angle.",
    "An ultrasound-guided aspiration yields turbid fluid with pH 7.1, glucose 2.1 mmol/L and LDH 1,200 U/L.",
    "The patient smokes 20 cigarettes a day, drinks alcohol at weekends and works in a shipyard since age 19.",
    "Two years ago a similar but milder episode resolved with oral amoxicillin prescribed by the family doctor.",
    "Her mother had breast cancer at 52 and her father died of a myocardial infarction at 61.",
    "The resident asks which next step in management is most appropriate before antibiotics are escalated.",
]
_OPTIONS = [("Intercostal chest drain", "Repeat chest radiograph in six weeks", "Bronchoscopy", "Oral prednisolone"),
            ("Echocardiography", "Intravenous furosemide", "CT pulmonary angiography", "Serum ACE level"),
            ("Sputum culture only", "Thoracoscopy and decortication", "Bed rest", "Pleural biopsy under local")]


def _row(i: int, split: str) -> dict:
    findings = [_FINDINGS[(i * 5 + j) % len(_FINDINGS)] for j in range(8)]
    question = f"A {34 + 3 * i}-year-old presents to the emergency department. " + " ".join(findings)
    opts = _OPTIONS[i % len(_OPTIONS)]
    return {"id": f"long-{split}-{i}", "question": question, "exp": "", "cop": i % 4, "opa": opts[0], "opb": opts[1],
            "opc": opts[2], "opd": opts[3], "subject_name": "Medicine", "topic_name": None, "choice_type": "single"}


@pytest.fixture(scope="module")
def long_medmcqa(tmp_path_factory):
    """A MedMCQA-schema data_dir whose questions are clinical vignettes (prompts of 200-300 tokens)."""
    root = tmp_path_factory.mktemp("long_medmcqa")
    (root / "medmcqa").mkdir()
    for split, n, offset in (("train", N_REF, 0), ("validation", N_TEST, 100)):
        rows = [_row(i + offset, split) for i in range(n)]
        (root / "medmcqa" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module", params=REAL_MODELS)
def real(request, tmp_path_factory):
    """One real-dims model at a time (saved in bf16, its dtype as published), with an empty memory for it."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model = make_real_model(name, dtype=torch.bfloat16)
    model.save_pretrained(root / "model")
    real_tokenizer(name).save_pretrained(root / "model")
    sig = model_signature(model, find_routers(model))
    empty = write_memory(root / "empty", {l: torch.zeros(0, sig["hidden_size"]) for l in sig["moe_layers"]},
                         {l: torch.zeros(0, sig["num_experts"]) for l in sig["moe_layers"]}, sig)
    del model
    gc.collect()
    yield SimpleNamespace(name=name, dir=str(root / "model"), empty=str(empty), signature=sig)
    shutil.rmtree(root)


def _expected_shape(name):
    cfg = published_config(name)
    experts = cfg.get("num_experts") or cfg["num_local_experts"]
    return {"hidden_size": cfg["hidden_size"], "num_experts": experts, "top_k": cfg["num_experts_per_tok"]}


def check_loaded(lm, real, dtype):
    assert lm.model.dtype == dtype and lm.model.config.vocab_size == published_config(real.name)["vocab_size"]
    sig = model_signature(lm.model, lm.sites)
    assert {k: sig[k] for k in ("hidden_size", "num_experts", "top_k")} == _expected_shape(real.name)
    assert sig["router_fingerprints"] == real.signature["router_fingerprints"]  # bf16 weights, either dtype
    for site in lm.sites:
        site.check()  # the family's gating recomputed from the router's logits equals the stock MoE block (load ran it too)


def test_loads_in_bf16_through_hf_knnmoe_and_passes_the_self_check(real):
    """bf16, the published dtype, as saved (fp32 from the same checkpoint is loaded by the test below)."""
    lm = KnnMoeLM(pretrained=real.dir, memory=real.empty, dtype=torch.bfloat16, device="cpu", batch_size=1)
    try:
        check_loaded(lm, real, torch.bfloat16)
    finally:
        del lm
        gc.collect()


def _per_doc(results, task):
    return [(s["doc_id"], s["resps"]) for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_empty_memory_reproduces_hf_and_a_built_memory_is_evaluated(real, long_medmcqa, tmp_path):
    template_args = {"reasoning_effort": "low"} if real.name == "gpt-oss-20b" else {}
    ours = KnnMoeLM(pretrained=real.dir, memory=real.empty, dtype=torch.float32, device="cpu", batch_size=2,
                    chat_template_args=template_args)
    check_loaded(ours, real, torch.float32)
    model, tok = ours.model, ours.tokenizer
    manager = TaskManager(include_path=str(TASKS), include_defaults=False, metadata={"data_dir": str(long_medmcqa)})
    prompt = dict(apply_chat_template=True, system_instruction=SYSTEM, task_manager=manager, log_samples=True)
    try:
        stock = HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=2, chat_template_args=template_args)
        tasks = ["knnmoe_medmcqa", "knnmoe_medmcqa_gen"]
        # loglikelihood requests cost the LM head at every position (201k rows for gpt-oss): one document of those
        run = dict(tasks=tasks, samples={"knnmoe_medmcqa": [0], "knnmoe_medmcqa_gen": [0, 1]}, gen_kwargs="max_gen_toks=4",
                   **prompt)
        expected = lm_eval.simple_evaluate(model=stock, **run)
        got = lm_eval.simple_evaluate(model=ours, **run)
        for task in tasks:
            assert _per_doc(got, task) == _per_doc(expected, task), task
        context = got["samples"]["knnmoe_medmcqa_gen"][0]["arguments"][0][0]
        assert 200 < len(tok(context, add_special_tokens=False)["input_ids"]) < 600
        if template_args:
            assert "Reasoning: low" in context  # chat_template_args reach the harmony template
        diag = got["config"]["knnmoe"]["diagnostics"]
        assert all(d["tokens"] > 0 and d["mean_lambda"] == 0 for d in diag.values())

        mem = tmp_path / "memory"
        builder = KnnMoeLM(pretrained=model, tokenizer=tok, mode="build", memory=str(mem), device="cpu", batch_size=2,
                           chat_template_args=template_args)
        lm_eval.simple_evaluate(model=builder, tasks=["knnmoe_medmcqa_ref"], **prompt)
        del builder
        memory = load_memory(str(mem))
        for layer in real.signature["moe_layers"]:  # one stored position per reference answer: the letter's token
            assert memory.layers[layer].keys.shape == (N_REF, real.signature["hidden_size"])

        evaluator = KnnMoeLM(pretrained=model, tokenizer=tok, memory=str(mem), device="cpu", batch_size=2,
                             chat_template_args=template_args)
        results = lm_eval.simple_evaluate(model=evaluator, tasks=["knnmoe_medmcqa_gen"], gen_kwargs="max_gen_toks=4",
                                          **prompt)  # the paper's protocol: generate, parse the letter
        assert len(results["samples"]["knnmoe_medmcqa_gen"]) == N_TEST
        assert "acc,none" in results["results"]["knnmoe_medmcqa_gen"]
        assert results["config"]["knnmoe"]["index"] == {str(l): "SQfp16" for l in real.signature["moe_layers"]}
        diag = results["config"]["knnmoe"]["diagnostics"]
        # the test prompts' answer position (the template's last token, as in the reference prompts) is near the
        # stored keys: the memory is in play
        assert all(d["tokens"] > 0 and d["mean_lambda"] > 0 for d in diag.values()), diag
    finally:
        del ours
        gc.collect()
