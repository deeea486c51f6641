"""Tiny randomly initialised models of every supported architecture, each with a real tokenizer
trained here on the shared corpora (SentencePiece BPE or byte-level BPE), saved as HF folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from quantkit.formats.gguf.vocab import PRE_TOKENIZERS

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_text(name: str, chars: int) -> str:
    return (SHARED_DATA / name).read_text(encoding="utf-8")[:chars]


def train_spm(folder: Path, vocab_size: int = 600) -> Path:
    """A Llama-2-style SentencePiece BPE tokenizer (byte fallback, dummy prefix) as HF files."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text(shared_text("tinyshakespeare-en.txt", 200_000), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spm"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    # transformers builds tokenizer.json from a folder holding tokenizer.model; the SentencePiece
    # model ships beside it, as in Llama 2 and Mistral checkpoints
    src = folder / "spm-hf"
    src.mkdir(exist_ok=True)
    shutil.copyfile(folder / "spm.model", src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True}))
    tok = AutoTokenizer.from_pretrained(src)
    out = folder / "tok"
    tok.save_pretrained(out)
    shutil.copyfile(folder / "spm.model", out / "tokenizer.model")
    return out


def train_byte_bpe(folder: Path, style: str, vocab_size: int = 700) -> Path:
    """A byte-level BPE tokenizer with llama.cpp pre-tokenizer ``style`` ('qwen2' or 'llama-bpe')."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZERS[style][0]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = shared_text("tinyshakespeare-en.txt", 200_000) + shared_text("hongloumeng-zh.txt", 20_000)
    tok.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    bos = None
    if style == "llama-bpe":  # Llama 3 adds a BOS token through its post-processor
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token=bos)
    hf.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    out = folder / f"tok-{style}"
    hf.save_pretrained(out)
    return out


CONFIGS = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=32)),
    "gemma3": (
        "Gemma3TextConfig",
        dict(num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=16, hidden_activation="gelu_pytorch_tanh"),
    ),
    "phi3": ("Phi3Config", dict(num_key_value_heads=2)),
    "glm4": ("Glm4Config", dict(num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5)),
    # mixtures of experts: 4 experts, 2 routed a token, with each family's routing as its
    # real checkpoints set it (and a router scale and bias that are not trivial)
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", dict(num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)),
    "deepseek_v2": ("DeepseekV2Config", dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                             n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                                             qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, topk_method="greedy",
                                             n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False)),
    "deepseek_v3": ("DeepseekV3Config", dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                             n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=32,
                                             qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, n_group=2, topk_group=1,
                                             routed_scaling_factor=1.5, norm_topk_prob=True)),
    "glm4_moe": ("Glm4MoeConfig", dict(num_key_value_heads=2, head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True,
                                       routed_scaling_factor=1.5, n_group=1, topk_group=1, partial_rotary_factor=0.5)),
}
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe"]
TOKENIZER_FOR = {"llama": "spm", "mistral": "spm", "qwen2": "qwen2", "qwen3": "qwen2", "gemma3": "spm", "llama3": "llama-bpe",
                 "mixtral": "spm", "phi3": "spm", **{a: "qwen2" for a in MOE_ARCHS if a != "mixtral"}, "glm4": "qwen2"}


# A mixture of experts turns a rounding into a different expert wherever two experts score
# within it: GLM4-MoE's seed-0 model has such a near-tie on the test text (its F16 GGUF is 2.7e-3
# mean KLD from transformers, its F32 GGUF 4.9e-6), seeds 1 and 2 have none (2e-5)
SEEDS = {"glm4_moe": 1}


def build_tiny_model(arch: str, tokenizer_dir: Path, out: Path, seed: int | None = None) -> Path:
    """Random weights with enough spread that a layout error shows up as a large KLD."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = "llama" if arch == "llama3" else arch
    config_cls, extra = CONFIGS[base]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if base == "phi3":  # Phi-3's added tokens, which llama.cpp looks up by name in a model named phi3
        tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|end|>"]})
    config = getattr(transformers, config_cls)(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        initializer_range=0.25,
        tie_word_embeddings=base in ("gemma3", "qwen2_moe"),  # qwen2_moe: llama.cpp needs the head written out
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=None,
        **extra,
    )
    if arch == "llama3":  # transformers 5 keeps RoPE settings in rope_parameters
        config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    torch.manual_seed(SEEDS.get(arch, 0) if seed is None else seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # non-trivial norm weights catch a missing Gemma +1 shift
                param.copy_(torch.randn_like(param) * 0.3 + (0.0 if base == "gemma3" else 1.0))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a router bias that changes which experts win
                buffer.copy_(torch.randn_like(buffer) * 0.3)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if (tokenizer_dir / "tokenizer.model").is_file():  # transformers 5 saves tokenizer.json only
        shutil.copyfile(tokenizer_dir / "tokenizer.model", out / "tokenizer.model")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"][0].lower().startswith(base.replace("3", "")[:4]), cfg["architectures"]
    return out
