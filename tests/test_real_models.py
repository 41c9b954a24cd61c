"""The three target models as they ship (knnmoe_eval.testing_real): their real tokenizers and chat templates render
the paper's prompt, a build stores the answer's tokens only, their outputs are parsed, and at their real
dimensions (1 layer, random weights) they load, reproduce `hf` with an empty memory and build and evaluate a
memory through lm-eval."""

import gzip
import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from knnmoe_eval.benchmarks import data as B
from knnmoe_eval.harness.requests import reference_sequences
from knnmoe_eval.testing import make_tiny_model
from knnmoe_eval.testing_real import (CUTS, DROPPED, O200K_SHA256, REAL_MODELS, data_dir, harmony_special_tokens,
                                      published_config, real_config, real_tokenizer)

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tasks"
SHORT_DATA = ROOT / "tests" / "fixtures" / "data"
SYSTEM = "You are a careful medical expert."
INSTRUCTION = "Answer the following multiple-choice question with the letter of the correct option."
FAMILY = {"olmoe-1b-7b-0125-instruct": "olmoe", "gpt-oss-20b": "gpt_oss", "qwen3-30b-a3b": "qwen3_moe"}


@pytest.fixture(scope="module")
def tokenizers():
    return {name: real_tokenizer(name) for name in REAL_MODELS}


def chat(tok, **template_args):
    """HFLM.apply_chat_template on a tokenizer alone: what lm-eval renders, without loading a model."""
    holder = SimpleNamespace(tokenizer=tok, chat_template_args=template_args)
    return lambda messages, add_generation_prompt=True: HFLM.apply_chat_template(holder, messages, add_generation_prompt)


def manager(data):
    return TaskManager(include_path=str(TASKS), include_defaults=False, metadata={"data_dir": str(data)})


@pytest.fixture(scope="module")
def short_tasks():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KNNMOE_FEWSHOT_ENCODER", "tfidf")
        yield manager(SHORT_DATA).load(["knnmoe_medmcqa_gen", "knnmoe_medmcqa_5shot", "knnmoe_medmcqa_ref"])["tasks"]


# -- the vendored files ---------------------------------------------------------------------------------------------
def test_vendored_files_are_the_published_ones():
    with gzip.open(data_dir("gpt-oss-20b") / "o200k_base.tiktoken.gz", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == O200K_SHA256
    shipped = json.loads((data_dir("gpt-oss-20b") / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    specials = harmony_special_tokens()
    assert {int(i): t["content"] for i, t in shipped.items()} == {i: specials[i] for i in map(int, shipped)}
    assert len(specials) == 201088 - 199998 and specials[200005] == "<|channel|>"
    for name in REAL_MODELS:
        assert len(real_tokenizer(name)) <= published_config(name)["vocab_size"]
        assert (data_dir(name) / "chat_template.jinja").stat().st_size > 400
    assert (data_dir("gpt-oss-20b").parent / "README.md").is_file()


def test_real_configs_keep_the_real_shapes_and_say_what_is_cut():
    for name in REAL_MODELS:
        real, cfg = published_config(name), real_config(name, num_hidden_layers=2)
        ours = cfg.to_dict()
        kept = {k: v for k, v in real.items()
                if k not in (*CUTS[name], *DROPPED.get(name, ()), "num_hidden_layers", "layer_types", "architectures",
                             "transformers_version", "_name_or_path", "torch_dtype", "rope_scaling", "rope_theta")}
        assert {k: ours.get(k, getattr(cfg, k, None)) for k in kept} == kept, name
        assert cfg.num_hidden_layers == 2 and all(ours[k] == v for k, v in CUTS[name].items())
    gpt = real_config("gpt-oss-20b", num_hidden_layers=2)
    assert not hasattr(gpt, "quantization_config") or gpt.quantization_config is None
    assert gpt.layer_types == ["sliding_attention", "full_attention"] and gpt.sliding_window == 128
    assert gpt.swiglu_limit == 7.0 and gpt.num_local_experts == 32 and gpt.num_experts_per_tok == 4
    rope = gpt.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 32.0 and rope["rope_theta"] == 150000
    qwen = real_config("qwen3-30b-a3b")
    assert qwen.norm_topk_prob is True and qwen.num_experts == 128 and qwen.rope_parameters["rope_theta"] == 1e6
    assert real_config("olmoe-1b-7b-0125-instruct").norm_topk_prob is False


def test_o200k_is_tiktokens_bpe():
    """Every 97th o200k_base token that is one pre-token encodes to its own rank; text round-trips; known ids."""
    import base64

    tok = real_tokenizer("gpt-oss-20b")
    pre = tok.backend_tokenizer.pre_tokenizer
    with gzip.open(data_dir("gpt-oss-20b") / "o200k_base.tiktoken.gz", "rt") as f:
        lines = [line.split() for line in f][::97]
    checked = 0
    for b64, rank in lines:
        try:
            text = base64.b64decode(b64).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if len(pre.pre_tokenize_str(text)) == 1:
            assert tok.encode(text, add_special_tokens=False) == [int(rank)], text
            checked += 1
    assert checked > 1500
    text = "Ein 45-jähriger Mann, 发热 3 天; SpO₂ 91 %\n\n  def f(x):\treturn x**2"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.encode("Hello, world!", add_special_tokens=False) == [13225, 11, 2375, 0]
    ids = tok.encode("<|start|>assistant<|channel|>final<|message|>", add_special_tokens=False)
    assert [ids[0], ids[2], ids[4]] == [200006, 200005, 200008] and len(ids) == 5  # harmony markers are one token
    assert tok.decode(ids[1]) == "assistant" and tok.decode(ids[3]) == "final"


def test_qwen3_tokenizer_matches_llama_cpps_reference_tokenizations():
    here = Path(__file__).parent / "data" / "real"
    inputs = (here / "qwen3_reference_vectors.inp").read_text().split("\n__ggml_vocab_test__\n")
    outputs = (here / "qwen3_reference_vectors.out").read_text().split("\n")
    tok = real_tokenizer("qwen3-30b-a3b")
    pairs = list(zip(inputs, outputs))
    assert len(pairs) >= 40
    for text, ids in pairs:
        assert tok.encode(text, add_special_tokens=False) == [int(i) for i in ids.split()], repr(text)


# -- the paper's prompt through each real template ------------------------------------------------------------------
QUESTION = ("Question: Which nerve supplies the deltoid muscle?\nOptions:\nA. Axillary\nB. Radial\nC. Musculocutaneous\n"
            "D. Median\nAnswer:")
SYSTEM_TEXT = f"{SYSTEM}\n\n{INSTRUCTION}\n\n"
RENDERED = {
    "olmoe-1b-7b-0125-instruct": f"<|system|>\n{SYSTEM_TEXT}\n<|user|>\n{QUESTION}\n<|assistant|>\n",
    "gpt-oss-20b": (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: "
        "2024-06\nCurrent date: DATE\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, final. Channel "
        f"must be included for every message.<|end|><|start|>developer<|message|># Instructions\n\n{SYSTEM_TEXT}\n\n"
        f"<|end|><|start|>user<|message|>{QUESTION}<|end|><|start|>assistant"),
    "qwen3-30b-a3b": (f"<|im_start|>system\n{SYSTEM_TEXT}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
                      "<|im_start|>assistant\n"),
}


def undated(prompt):
    return re.sub(r"Current date: \d{4}-\d{2}-\d{2}", "Current date: DATE", prompt)


@pytest.mark.parametrize("name", REAL_MODELS)
def test_gen_task_renders_the_paper_prompt_through_the_real_template(short_tasks, tokenizers, name):
    task = short_tasks["knnmoe_medmcqa_gen"]
    prompt = task.fewshot_context(task.eval_docs[0], 0, system_instruction=SYSTEM, apply_chat_template=True,
                                  chat_template=chat(tokenizers[name]))
    assert undated(prompt) == RENDERED[name]
    ids = tokenizers[name].encode(prompt, add_special_tokens=False)
    assert tokenizers[name].decode(ids, skip_special_tokens=False) == prompt  # the template's markers are tokens
    assert len(ids) < len(prompt) / 2


@pytest.mark.parametrize("name", REAL_MODELS)
def test_five_shot_as_multiturn_makes_each_shot_a_turn(short_tasks, tokenizers, name):
    task = short_tasks["knnmoe_medmcqa_5shot"]
    doc = task.eval_docs[0]
    prompt = undated(task.fewshot_context(doc, 5, system_instruction=SYSTEM, apply_chat_template=True,
                                          fewshot_as_multiturn=True, chat_template=chat(tokenizers[name])))
    user, assistant, end = {"olmoe-1b-7b-0125-instruct": ("<|user|>\n", "<|assistant|>\n", "<|endoftext|>\n"),
                            "gpt-oss-20b": ("<|start|>user<|message|>", "<|start|>assistant<|channel|>final<|message|>",
                                            "<|end|>"),
                            "qwen3-30b-a3b": ("<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n")}[name]
    assert prompt.count(user) == 6
    shots = re.findall(re.escape(assistant) + "(.*?)" + re.escape(end), prompt, re.DOTALL)
    assert len(shots) == 5 and all(re.fullmatch("[A-D]", s) for s in shots), shots  # each shot's answer, alone
    assert prompt.endswith({"olmoe-1b-7b-0125-instruct": f"{B.doc_to_text(doc)}\n<|assistant|>\n",
                            "gpt-oss-20b": f"{B.doc_to_text(doc)}<|end|><|start|>assistant",
                            "qwen3-30b-a3b": f"{B.doc_to_text(doc)}<|im_end|>\n<|im_start|>assistant\n"}[name])


def test_reasoning_effort_and_enable_thinking_reach_the_templates(short_tasks, tokenizers):
    from knnmoe_eval.core.options import split_model_args
    from knnmoe_eval.harness.lm import _HF_ARGS

    # lm-eval's CLI takes model_args as JSON for nested values: --model_args '{"pretrained": ..., "chat_template_args":
    # {"reasoning_effort": "low"}}'; hf-knnmoe hands chat_template_args and enable_thinking to `hf` untouched
    _, hf_kwargs = split_model_args({"chat_template_args": {"reasoning_effort": "low"}, "enable_thinking": False,
                                     "memory": "m"}, passthrough=_HF_ARGS)
    assert hf_kwargs == {"chat_template_args": {"reasoning_effort": "low"}, "enable_thinking": False}
    task = short_tasks["knnmoe_medmcqa_gen"]
    doc = task.eval_docs[0]
    low = task.fewshot_context(doc, 0, apply_chat_template=True,
                               chat_template=chat(tokenizers["gpt-oss-20b"], reasoning_effort="low"))
    assert "Reasoning: low\n\n" in low and "Reasoning: medium" not in low
    no_think = task.fewshot_context(doc, 0, apply_chat_template=True,
                                    chat_template=chat(tokenizers["qwen3-30b-a3b"], enable_thinking=False))
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


# -- the build's stored positions under each tokenizer --------------------------------------------------------------
@pytest.fixture(scope="module")
def real_vocab_lms(tokenizers):
    """Per real tokenizer, a tiny model of the family with the real vocabulary: tokenization is what is tested."""
    lms = {}
    for name, tok in tokenizers.items():
        model = make_tiny_model(FAMILY[name], vocab_size=published_config(name)["vocab_size"],
                                pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.eos_token_id)
        lms[name] = HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=1)
    return lms


TEMPLATE_END = {"olmoe-1b-7b-0125-instruct": "\n", "gpt-oss-20b": "assistant", "qwen3-30b-a3b": "\n"}


@pytest.mark.parametrize("name", REAL_MODELS)
@pytest.mark.parametrize("template", [None, {}, {"enable_thinking": False}], ids=["plain", "chat", "chat-nothink"])
def test_build_stores_the_answer_tokens_never_the_templates(short_tasks, real_vocab_lms, name, template):
    lm = real_vocab_lms[name]
    tok = lm.tokenizer
    task = short_tasks["knnmoe_medmcqa_ref"]
    lm.chat_template_args = template or {}
    try:
        task.build_all_requests(rank=0, world_size=1, apply_chat_template=template is not None,
                                chat_template=lm.apply_chat_template if template is not None else None,
                                tokenizer_name=name)
        sequences = reference_sequences(lm, task.instances)
    finally:
        lm.chat_template_args = {}
    assert len(sequences) == len(task.eval_docs) == 5
    specials = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    for seq, inst in zip(sequences, sorted(task.instances, key=lambda r: r.doc_id)):
        context, continuation = inst.args
        letter = B.doc_to_target(inst.doc)
        # lm-eval's delimiter rule: " B" after "Answer:", "B" at the start of the assistant turn
        assert continuation == (f" {letter}" if template is None else letter)
        stored = seq.targets[-seq.n_cont:]
        assert seq.n_cont == 1 and tok.decode(stored) == continuation  # one token, spaced the tokenizer's way
        assert not set(stored) & specials
        # the position that predicts it reads the template's last token (or "Answer:"'s colon)
        last = tok.decode([seq.tokens[-seq.n_cont]], skip_special_tokens=False)
        if template is None:
            assert last == ":"
        elif name == "qwen3-30b-a3b" and template:  # enable_thinking=False: the template's empty think block
            assert context.endswith("<think>\n\n</think>\n\n") and last.strip() == "" and last.endswith("\n")
        else:
            assert last == TEMPLATE_END[name] or (name == "qwen3-30b-a3b" and last.endswith("\n") and not last.strip())
        # the tokens themselves are exactly hf's for this request
        ctx, cont = lm._encode_pair(context, continuation)
        assert seq.tokens + seq.targets[-1:] == ctx + cont


# -- answer parsing of what the reasoning models emit ---------------------------------------------------------------
HARMONY = ("<|channel|>analysis<|message|>We need the nerve of the deltoid. Option B (Radial) supplies the triceps; "
           "option C is musculocutaneous, answer is not C. The axillary nerve supplies the deltoid.<|end|>"
           "<|start|>assistant<|channel|>final<|message|>The answer is A.<|return|>")
THINK = ("<think>\nOkay, deltoid. B. Radial? No, that is the extensor compartment. Maybe the answer is D... no. It "
         "is the axillary nerve.\n</think>\n\nThe answer is (A) Axillary.")


def skip_specials(text):
    return re.sub(r"<\|[a-z_]+\|>", "", text)


@pytest.mark.parametrize(("response", "letter"), [
    (HARMONY, "A"),
    (skip_specials(HARMONY), "A"),  # "analysisWe need ...assistantfinalThe answer is A."
    (HARMONY.replace("The answer is A.", "Axillary nerve."), "A"),  # the final answer as the option's text
    (skip_specials(HARMONY).replace("The answer is A.", "**Axillary**"), "A"),
    (HARMONY.split("<|start|>assistant")[0], None),  # analysis only: the generation stopped before `final`
    (skip_specials(HARMONY.split("<|start|>assistant")[0]), None),
    (THINK, "A"),
    (THINK.replace("The answer is (A) Axillary.", "Axillary"), "A"),
    (THINK.split("</think>")[0], None),  # still thinking when max_gen_toks ran out
    ("<think>\n\n</think>\n\nC", "C"),  # enable_thinking=False: the template's empty think block
    ("B. Radial", "B"),  # a plain model
    ("The nerve is radial, not axillary.", None),  # two options named: no answer
])
def test_the_letter_comes_from_the_final_answer(response, letter):
    assert B.parse_answer(response, 4, ["Axillary", "Radial", "Musculocutaneous", "Median"]) == letter


def test_generation_scoring_reads_the_final_channel(short_tasks):
    task = short_tasks["knnmoe_medmcqa_gen"]
    doc = task.eval_docs[0]  # gold A (Axillary)
    assert task.process_results(doc, [HARMONY]) == {"acc": 1}
    assert task.process_results(doc, [HARMONY.replace("answer is A", "answer is C")]) == {"acc": 0}
    assert task.process_results(doc, [skip_specials(THINK)]) == {"acc": 1}


# -- OLMoE-Instruct's bos/eos ----------------------------------------------------------------------------------------
def test_olmoe_placeholder_bos_eos_never_reach_zero_shot_prompts(short_tasks, tokenizers):
    """OLMoE-Instruct's shipped tokenizer config is reported to name a PII placeholder ('|||IP_ADDRESS|||', id 0 of
    the Dolma tokenizer, not a special token) as bos/eos. What reaches the model then:
    - zero-shot prompts (the paper's protocol), plain or chat: token for token the same as with the real
      `<|endoftext|>`: the tokenizer adds no bos (no post-processor) and the Tulu template names eos only after
      earlier assistant turns;
    - multi-turn few-shot prompts: the placeholder after each shot, as the Tulu template writes `eos_token` there;
    - loglikelihood requests with an empty context are prefixed by bos (here the placeholder) as `hf` does."""
    from transformers import AutoConfig

    good = tokenizers["olmoe-1b-7b-0125-instruct"]
    odd = real_tokenizer("olmoe-1b-7b-0125-instruct", bos_token="|||IP_ADDRESS|||", eos_token="|||IP_ADDRESS|||")
    assert odd.bos_token_id == odd.eos_token_id == 0 and good.eos_token_id == 50279 and good.bos_token_id is None
    assert AutoConfig.for_model(**{**published_config("olmoe-1b-7b-0125-instruct")}).eos_token_id == 50279
    gen, shots = short_tasks["knnmoe_medmcqa_gen"], short_tasks["knnmoe_medmcqa_5shot"]
    for tok_a, tok_b in [(good, odd)]:
        for kwargs in ({}, {"apply_chat_template": True}):
            a = gen.fewshot_context(gen.eval_docs[0], 0, chat_template=chat(tok_a), **kwargs)
            b = gen.fewshot_context(gen.eval_docs[0], 0, chat_template=chat(tok_b), **kwargs)
            assert a == b and "|||" not in b
            assert tok_a(a)["input_ids"] == tok_b(b)["input_ids"] and 0 not in tok_b(b)["input_ids"]
        multi = shots.fewshot_context(shots.eval_docs[0], 5, apply_chat_template=True, fewshot_as_multiturn=True,
                                      chat_template=chat(tok_b))
        assert multi.count("|||IP_ADDRESS|||\n<|user|>") == 5
    # the fix for a user: pass the real tokenizer (or eos_token=<|endoftext|>) in model_args; testing_real ships it


# -- one reference set for every method ------------------------------------------------------------------------------
def test_ref_limit_cuts_the_five_shot_pool_to_the_memorys_references(tmp_path, monkeypatch):
    from knnmoe_eval import KnnMoeError
    from knnmoe_eval.experiments.runner import Runner, Settings

    monkeypatch.setenv("KNNMOE_FEWSHOT_ENCODER", "tfidf")
    settings = dict(pretrained=str(tmp_path / "model"), out=str(tmp_path), benchmarks=("medmcqa",),
                    metadata={"data_dir": str(SHORT_DATA)}, include_path=str(TASKS))
    full = Runner(Settings(**settings)).task_manager.load(["knnmoe_medmcqa_5shot"])["tasks"]["knnmoe_medmcqa_5shot"]
    runner = Runner(Settings(**settings, ref_limit=3))
    tasks = runner.task_manager.load(["knnmoe_medmcqa_5shot", "knnmoe_medmcqa_ref"])["tasks"]
    pool = [d["id"] for d in tasks["knnmoe_medmcqa_5shot"].sampler.fewshot_docs()]
    memory_refs = [d["id"] for d in tasks["knnmoe_medmcqa_ref"].eval_docs][:3]  # what the build's limit=3 reads
    assert len(full.sampler.fewshot_docs()) == 5 and pool == memory_refs
    with pytest.raises(KnnMoeError, match="two reference sets"):
        Runner(Settings(**{**settings, "metadata": {"data_dir": str(SHORT_DATA), "ref_size": 2}}, ref_limit=3))


def test_only_the_contexts_moved_whitespace_leaves_the_answer():
    """hf moves a context's trailing whitespace into the continuation; only that goes back to the context. A
    byte-level tokenizer keeps " B" as two tokens: the space is the answer's delimiter and stays stored."""
    from knnmoe_eval.harness.requests import encode_request
    from knnmoe_eval.testing import make_tokenizer

    lm = HFLM(pretrained=make_tiny_model("olmoe"), tokenizer=make_tokenizer(), device="cpu", batch_size=1)
    rid = ("t", 0, 0)
    assert encode_request(lm, rid, "Answer:", " B").n_cont == 2  # " ", "B"
    seq = encode_request(lm, rid, "Answer:\n\n", "B")
    assert seq.n_cont == 1 and seq.targets[-1:] == lm.tok_encode("B", add_special_tokens=False)
    assert encode_request(lm, rid, "Answer: ", "\nB").n_cont == 2  # the continuation's own newline stays
