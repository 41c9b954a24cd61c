"""Tiny random-weight MoE models of every supported family and a byte-level tokenizer, built offline.

Tests, benchmarks and the toy demo run on these: no model hub is reachable here, and a real model of each family
built from its own transformers `*Config` exercises the exact router/gating code a full-size model runs.
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss")

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


def tiny_config(family: str, **overrides):
    """A small config of `family` (2 MoE layers, hidden 32, 8 experts, top-2); `overrides` go to the config."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
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
    per_family = {
        "olmoe": dict(num_experts=8),
        "qwen2_moe": dict(num_experts=8, moe_intermediate_size=16, shared_expert_intermediate_size=16),
        "qwen3_moe": dict(num_experts=8, moe_intermediate_size=16, norm_topk_prob=True),
        "mixtral": dict(num_local_experts=8),
        "gpt_oss": dict(num_local_experts=8, sliding_window=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    }
    kwargs = {**common, **per_family[family], **overrides}
    if family == "gpt_oss" and "layer_types" not in overrides:
        n = kwargs["num_hidden_layers"]
        kwargs["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(n)]
    return AutoConfig.for_model(family, **kwargs)


def make_tiny_model(family: str, seed: int = 0, **overrides):
    """A random-weight causal LM of `family`, fp32, eval mode. Router weights are scaled up so routing is decisive."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.normal_(0.0, 0.5)
            elif name.endswith("mlp.router.bias"):
                p.normal_(0.0, 0.1)
    return model.eval()


def save_tiny(family: str, out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny model and the tokenizer to `out_dir`, loadable with `from_pretrained` and `pretrained=out_dir`."""
    out = Path(out_dir)
    make_tiny_model(family, seed=seed, **overrides).save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return out
