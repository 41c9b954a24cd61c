"""Tiny random-weight MoE models of every supported family and a byte-level tokenizer, built offline.

Tests, benchmarks and the toy demo run on these: no model hub is reachable here, and a real model of each family
built from its own transformers `*Config` exercises the exact router/gating code a full-size model runs.
"""

from __future__ import annotations

from pathlib import Path

_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def make_tokenizer():
    """A byte-level tokenizer (256 byte tokens + 4 specials): handles any text, needs no training data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


VOCAB_SIZE = 256 + len(_SPECIALS)


_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
_MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=4,
            num_key_value_heads=4)  # multi-head latent attention: as many kv heads as heads
_DEEPSEEK = dict(n_routed_experts=8, moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=0,
                 routed_scaling_factor=1.5)
_LINEAR_ATTENTION = dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8,
                         linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4)

# Per family: the config overrides of a tiny model (hybrid families get small state sizes); "model_type" names
# the config class when the family's causal LM is built from another one's (multimodal checkpoints' text model).
TINY: dict[str, dict] = {
    "olmoe": dict(num_experts=8),
    "flex_olmo": dict(num_experts=8),
    "qwen2_moe": dict(num_experts=8, moe_intermediate_size=16, shared_expert_intermediate_size=16),
    "qwen3_moe": dict(num_experts=8, moe_intermediate_size=16, norm_topk_prob=True),
    "qwen3_next": dict(num_experts=8, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                       **_LINEAR_ATTENTION),
    "qwen3_5_moe": dict(model_type="qwen3_5_moe_text", num_experts=8, moe_intermediate_size=16,
                        shared_expert_intermediate_size=16, **_LINEAR_ATTENTION),
    "hunyuan_v1_moe": dict(num_experts=8, moe_topk=2),
    "mixtral": dict(num_local_experts=8),
    "minimax": dict(num_local_experts=8, block_size=16, layer_types=["linear_attention", "full_attention"]),
    "jamba": dict(num_experts=8, expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2,
                  attn_layer_offset=1, mamba_d_state=8),
    "gpt_oss": dict(num_local_experts=8, sliding_window=16, rope_parameters=_ROPE,
                    layer_types=["sliding_attention", "full_attention"]),
    "granitemoe": dict(num_local_experts=8),
    "granitemoeshared": dict(num_local_experts=8, shared_intermediate_size=16),
    "granitemoehybrid": dict(num_local_experts=8, shared_intermediate_size=16, layer_types=["mamba", "attention"],
                             mamba_n_heads=4, mamba_d_state=8, mamba_d_head=16, mamba_chunk_size=16),
    "cohere2_moe": dict(num_experts=8, num_shared_experts=1),
    "deepseek_v2": dict(**_DEEPSEEK, **_MLA, topk_method="group_limited_greedy", n_group=4, topk_group=2),
    "deepseek_v3": dict(**_DEEPSEEK, **_MLA, n_group=4, topk_group=2),
    "glm4_moe": dict(**_DEEPSEEK, n_group=2, topk_group=1),
    "glm4_moe_lite": dict(n_routed_experts=8, moe_intermediate_size=16, n_shared_experts=1,
                          mlp_layer_types=["sparse", "sparse"], **_MLA),
    "dots1": dict(**_DEEPSEEK, norm_topk_prob=True),
    "exaone_moe": dict(num_experts=8, moe_intermediate_size=16, num_shared_experts=1, n_group=2, topk_group=1,
                       first_k_dense_replace=0),
    "solar_open": dict(n_routed_experts=8, moe_intermediate_size=16, n_shared_experts=1, n_group=2, topk_group=1),
    "ernie4_5_moe": dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=16, moe_num_shared_experts=1,
                         moe_layer_start_index=0),
    "longcat_flash": dict(num_hidden_layers=4, n_routed_experts=6, zero_expert_num=2, expert_ffn_hidden_size=16,
                          ffn_hidden_size=32, moe_topk=2, **_MLA),
    "minimax_m2": dict(num_local_experts=8),
    # a dense first layer: MoE layers 1 and 2
    "lfm2_moe": dict(num_experts=8, moe_intermediate_size=16, num_hidden_layers=3, num_dense_layers=1,
                     layer_types=["conv", "full_attention", "conv"]),
    "phimoe": dict(num_local_experts=8, rope_parameters=_ROPE),
    "llama4": dict(model_type="llama4_text", num_local_experts=8, num_experts_per_tok=1, intermediate_size_mlp=32,
                   attention_chunk_size=16),
    # DBRX copies d_model into its experts' config before generic kwargs such as hidden_size are applied
    "dbrx": dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=512,
                 attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},  # clip_qkv=None breaks 5.24
                 ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2}),
}


def tiny_config(family: str, **overrides):
    """A small config of `family` (2 MoE layers, hidden 32, 8 experts, top-2); `overrides` go to the config."""
    from transformers import AutoConfig

    if family not in TINY:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY)}")
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs = {**common, **TINY[family], **overrides}
    n = kwargs["num_hidden_layers"]
    for name in ("layer_types", "mlp_layer_types"):  # per-layer patterns repeat to a deeper override
        if name in kwargs and name not in overrides and len(kwargs[name]) != n:
            kwargs[name] = [kwargs[name][i % len(kwargs[name])] for i in range(n)]
    return AutoConfig.for_model(kwargs.pop("model_type", family), **kwargs)


def make_tiny_model(family: str, seed: int = 0, **overrides):
    """A random-weight causal LM of `family`, fp32, eval mode. Router weights are scaled up so routing is decisive,
    and correction biases drawn so that they take part in the selection."""
    import torch
    from transformers import AutoModelForCausalLM

    from .core.routers import find_routers

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for site in find_routers(model, check=False):
            site.weight.normal_(0.0, 0.5)
            if site.bias is not None:
                site.bias.normal_(0.0, 0.1)
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                t.normal_(0.0, 0.1)
    return model.eval()


def save_tiny(family: str, out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny model and the tokenizer to `out_dir`, loadable with `from_pretrained` and `pretrained=out_dir`."""
    out = Path(out_dir)
    make_tiny_model(family, seed=seed, **overrides).save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return out


# ---- helpers of the tests and scripts that look at routing: the stock routers' inputs and logits, constant memories

def small_toy():
    """A toy config small enough to train in a fraction of a second (2 steps): for the data, the tasks and the
    pipeline, not for accuracy."""
    from .experiments.toy import ToyConfig

    return ToyConfig(n_train=64, n_indomain_test=12, n_shift_ref=6, n_shift_test=10, steps=2, batch_size=8)


def signature(model) -> dict:
    """The model's signature as a memory records it (`core.signature.model_signature` over its routers)."""
    from .core.routers import find_routers
    from .core.signature import model_signature

    return model_signature(model, find_routers(model))


def stock_routing(model, input_ids) -> tuple[dict, dict]:
    """One stock forward of `input_ids` through kNN-MoE's router hook: per MoE layer, the router inputs
    (n_tokens, d) and the router logits (n_tokens, E), detached copies."""
    import torch

    from .core.hooks import Recorder, hooked_routers
    from .core.routers import find_routers

    recorder = Recorder()
    with torch.no_grad(), hooked_routers(find_routers(model), recorder):
        model(input_ids)
    return ({l: h.clone() for l, h in recorder.inputs.items()}, {l: z.clone() for l, z in recorder.logits.items()})


def router_inputs(model, input_ids) -> dict:
    """Every MoE layer's router inputs (n_tokens, d) for `input_ids`, under stock routing."""
    return stock_routing(model, input_ids)[0]


def router_logits(model, input_ids) -> dict:
    """Every MoE layer's router logits (n_tokens, E) for `input_ids`, under stock routing."""
    return stock_routing(model, input_ids)[1]


def write_constant_memory(path, model, keys, values_fn):
    """A memory with the given keys per layer and values_fn(layer, n, E) as values."""
    from .core.memory import write_memory

    sig = signature(model)
    values = {l: values_fn(l, keys[l].shape[0], sig["num_experts"]) for l in sig["moe_layers"]}
    return write_memory(path, keys, values, sig)


def empty_keys(model) -> dict:
    """No keys in any MoE layer: (0, d) per layer."""
    import torch

    sig = signature(model)
    return {l: torch.zeros(0, sig["hidden_size"]) for l in sig["moe_layers"]}


def random_references(n: int = 6, length: int = 9, n_cont: int = 3, seed: int = 0) -> list:
    """n tokenized reference requests of random byte tokens (the last `n_cont` the answer), the same on every call
    whatever ran before."""
    import torch

    from .core.build import tokenize_request

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(4, 250, (length + (i % 3),), generator=gen).tolist()
        out.append(tokenize_request(("t", i, 0), [1] + ids[:-n_cont], ids[-n_cont:], max_length=64))
    return out
