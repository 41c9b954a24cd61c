"""The three target models as they ship: real configs, tokenizers and chat templates, random weights, 1-2 layers.

OLMoE-1B-7B-0125-Instruct, gpt-oss-20b and Qwen3-30B-A3B are built from their published `config.json` (vendored
under `testing_data/`, provenance in its README) at their real hidden size, heads, kv heads, head dim, experts,
top-k, vocabulary, `norm_topk_prob`, sliding window, `swiglu_limit` and rope settings. What is cut, so that one
model fits a test on 2 cores (and is said so in `CUTS`):
- `num_hidden_layers` (1 by default; `layer_types` keeps the real pattern's first entries);
- the experts' FFN width of gpt-oss and Qwen3 (neither the router's input nor its output: routing is untouched),
  which would otherwise hold 0.8B (gpt-oss) and 0.6B (Qwen3) parameters per layer;
- gpt-oss's mxfp4 `quantization_config`: random weights are not quantized, and transformers' CPU path would
  dequantize them anyway.
Weights are random (`make_real_model`); router logits get a standard deviation of ~4 so that routing is decisive, as
`testing.make_tiny_model` does for the tiny models.

Tokenizers: the OLMoE and Qwen3 `tokenizer.json` files (gzipped), and gpt-oss's o200k_base ranks (tiktoken
format, gzipped) turned into a fast tokenizer with the harmony special tokens, the way transformers'
`TikTokenConverter` does, without needing `tiktoken`.
"""

from __future__ import annotations

import base64
import gzip
import json
import struct
from functools import lru_cache
from importlib import resources
from pathlib import Path

REAL_MODELS = ("olmoe-1b-7b-0125-instruct", "gpt-oss-20b", "qwen3-30b-a3b")
HUB_IDS = {"olmoe-1b-7b-0125-instruct": "allenai/OLMoE-1B-7B-0125-Instruct", "gpt-oss-20b": "openai/gpt-oss-20b",
           "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B"}

# What differs from the real config besides the layer count (see the module docstring).
CUTS: dict[str, dict] = {
    "olmoe-1b-7b-0125-instruct": {},
    "gpt-oss-20b": {"intermediate_size": 256},  # real 2880
    "qwen3-30b-a3b": {"moe_intermediate_size": 256, "intermediate_size": 256},  # real 768 / 6144 (no dense layer)
}
DROPPED = {"gpt-oss-20b": ("quantization_config",)}

# tiktoken's o200k_base split pattern (tiktoken_ext/openai_public.py), the pre-tokenizer of gpt-oss's tokenizer
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"  # the hash tiktoken pins


def data_dir(name: str) -> Path:
    if name not in REAL_MODELS:
        raise ValueError(f"unknown real model {name!r}; choose one of {', '.join(REAL_MODELS)}")
    return Path(str(resources.files("knnmoe_eval") / "testing_data" / name))


def published_config(name: str) -> dict:
    """The model's `config.json` exactly as published."""
    return json.loads((data_dir(name) / "config.json").read_text())


def real_config(name: str, num_hidden_layers: int = 1, **overrides):
    """The published config with `num_hidden_layers` cut, `CUTS` applied and `DROPPED` keys removed."""
    from transformers import AutoConfig

    cfg = published_config(name)
    for key in DROPPED.get(name, ()):
        cfg.pop(key)
    for key in ("architectures", "transformers_version", "_name_or_path", "torch_dtype"):
        cfg.pop(key, None)
    cfg.update(CUTS[name], num_hidden_layers=num_hidden_layers, **overrides)
    if "layer_types" in cfg and "layer_types" not in overrides:
        cfg["layer_types"] = cfg["layer_types"][:num_hidden_layers]
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def make_real_model(name: str, num_hidden_layers: int = 1, dtype=None, seed: int = 0, **overrides):
    """A random-weight causal LM of `name` at its real dimensions (see the module docstring), eval mode.

    Weights are drawn here rather than by transformers' initialisers, which take most of a minute for gpt-oss's
    1.2B parameters on two cores: norms 1, other vectors N(0, 0.02), matrices U with std 0.02, and the two
    vocabulary matrices (embedding, LM head) as rank-64 products with entries of std 0.02, distinct rows.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from .core.routers import find_routers

    config = real_config(name, num_hidden_layers, **overrides)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    std = config.initializer_range
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1 and "norm" in pname:
                p.fill_(1.0)
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif p.shape[0] >= config.vocab_size:  # (vocab, hidden): embedding and LM head
                rank = 64
                a = torch.randn(p.shape[0], rank, generator=g, dtype=p.dtype)
                b = torch.randn(rank, p.shape[1], generator=g, dtype=p.dtype) * (std / rank ** 0.5)
                # multiplied in fp32 and rounded once: a CPU without AVX512-BF16 emulates a bf16 matmul, and this
                # one (151,936 x 64 x 2,048 for Qwen3) took 65 s there against 1 s in fp32
                p.copy_(a.float() @ b.float())
            else:
                p.uniform_(-std * 3 ** 0.5, std * 3 ** 0.5, generator=g)
        for site in find_routers(model, check=False):
            site.weight.normal_(0.0, 4.0 / config.hidden_size ** 0.5, generator=g)  # logits of std ~4
            if site.bias is not None:
                site.bias.normal_(0.0, 0.1, generator=g)
    return model.eval()


def _ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file: one `base64(token) rank` per line."""
    with gzip.open(path, "rt", encoding="ascii") as f:
        return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}


def harmony_special_tokens() -> dict[int, str]:
    """gpt-oss's special tokens by id (ids 199998-201087): `o200k_harmony.special` (u32 count, then per token
    u32 id, u16 length, utf-8 text); where it lists two names for one id the first, which the model's
    tokenizer_config.json names too (200018 `<|endofprompt|>`)."""
    raw = (data_dir("gpt-oss-20b") / "o200k_harmony.special").read_bytes()
    (count,), at, out = struct.unpack_from("<I", raw), 4, {}
    for _ in range(count):
        tid, length = struct.unpack_from("<IH", raw, at)
        out.setdefault(tid, raw[at + 6: at + 6 + length].decode())
        at += 6 + length
    return out


def _o200k_harmony():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = _ranks(data_dir("gpt-oss-20b") / "o200k_base.tiktoken.gz")
    byte_encoder = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_encoder[c] for c in b)

    # a token's merges are the splits into two tokens of lower rank, applied in rank order: TikTokenConverter's rule
    merges = []
    for token, rank in ranks.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [(ranks[l], ranks[r], rank, l, r) for l, r in pairs]
    merges.sort(key=lambda m: (m[2], m[0], m[1]))
    tok = Tokenizer(BPE({text(t): r for t, r in ranks.items()}, [(text(l), text(r)) for *_, l, r in merges],
                        fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = harmony_special_tokens()
    if sorted(specials) != list(range(len(ranks), len(ranks) + len(specials))):
        raise ValueError("o200k_harmony.special does not continue o200k_base's ids")
    tok.add_special_tokens([AddedToken(specials[i], normalized=False, special=True) for i in sorted(specials)])
    return tok


@lru_cache(maxsize=None)
def _tokenizer_object(name: str):
    from tokenizers import Tokenizer

    if name == "gpt-oss-20b":
        return _o200k_harmony()
    with gzip.open(data_dir(name) / "tokenizer.json.gz", "rt", encoding="utf-8") as f:
        return Tokenizer.from_str(f.read())


# bos/eos/pad: gpt-oss's from its tokenizer_config.json; OLMoE's and Qwen3's from their config.json ids (OLMoE's
# own tokenizer_config.json was not found; see testing_data/README.md and tests/test_real_models.py)
_SPECIAL_NAMES = {
    "olmoe-1b-7b-0125-instruct": dict(eos_token="<|endoftext|>", pad_token="<|padding|>"),
    "gpt-oss-20b": dict(bos_token="<|startoftext|>", eos_token="<|return|>", pad_token="<|endoftext|>"),
    "qwen3-30b-a3b": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
}


def real_tokenizer(name: str, **special_tokens):
    """The model's tokenizer with its chat template; `special_tokens` (bos_token=...) override the shipped ones."""
    import copy

    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(_tokenizer_object(name)),
                                  **{**_SPECIAL_NAMES[name], **special_tokens})
    tok.chat_template = (data_dir(name) / "chat_template.jinja").read_text()
    if name == "gpt-oss-20b":
        tok.model_max_length = json.loads((data_dir(name) / "tokenizer_config.json").read_text())["model_max_length"]
    return tok


def save_real(name: str, out_dir: str | Path, num_hidden_layers: int = 1, dtype=None, seed: int = 0,
              **overrides) -> Path:
    """Save a real-dims model and its tokenizer to `out_dir`, loadable with `pretrained=out_dir`."""
    out = Path(out_dir)
    model = make_real_model(name, num_hidden_layers, dtype=dtype, seed=seed, **overrides)
    model.save_pretrained(out)
    del model
    real_tokenizer(name).save_pretrained(out)
    return out
