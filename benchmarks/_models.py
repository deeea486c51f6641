"""Checkpoints the benchmarks build for themselves: a Llama with random float16 weights and a
SentencePiece tokenizer trained on ../shared/data, a model every converter here accepts."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def random_llama(work: Path, layers: int, hidden: int = 1024) -> Path:
    """An HF Llama folder under ``work`` (built once, then reused)."""
    out = work / f"llama-{layers}x{hidden}-f16"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import train_spm

    tok = AutoTokenizer.from_pretrained(train_spm(work / "spm"))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    tok.save_pretrained(out)
    return out
