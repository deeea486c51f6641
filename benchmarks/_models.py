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


# real shapes of the models people ship (config.json values of the published checkpoints)
SHAPES = {
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "deepseek-r1-distill-qwen-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                          num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                          tie_word_embeddings=False),
    "qwen2.5-3b": dict(model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    # a mixture of experts: Qwen3-30B-A3B's blocks (128 experts of width 768, 8 routed a token), 4 of its 48
    "qwen3-30b-a3b-4l": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_hidden_layers=4,
                             num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                             tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                             norm_topk_prob=True),
}


def shaped_folder(work: Path, name: str) -> Path:
    """Where :func:`random_shaped` writes the checkpoint of ``name``."""
    return work / f"{name}-random-f16"


def random_shaped(work: Path, name: str, seed: int = 0) -> Path:
    """An HF folder with the architecture and tensor shapes of ``name`` (``SHAPES``) and random
    float16 weights, written tensor by tensor (building it holds one tensor), with a real
    byte-level BPE tokenizer whose few hundred tokens sit in an embedding padded to the real
    vocabulary, as real Qwen2.5 checkpoints pad 151,665 tokens to 151,936 rows."""
    out = shaped_folder(work, name)
    if (out / "config.json").is_file():
        return out
    import json
    import shutil

    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import train_byte_bpe

    from quantkit.formats.gptq.writer import SafetensorsShardWriter
    from quantkit.runtimes.stream import LAYOUTS, Layout, parameters_on_meta

    shape = dict(SHAPES[name])
    style = "llama-bpe" if shape["model_type"] == "llama" else "qwen2"
    tok_dir = train_byte_bpe(work / "tokenizers", style)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model_type = shape.pop("model_type")
    layout = LAYOUTS.get(model_type, Layout())
    config_cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig, "qwen3_moe": transformers.Qwen3MoeConfig}[model_type]
    extra = {"rope_theta": 1_000_000.0} if config_cls is not transformers.LlamaConfig else {
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    config = config_cls(**shape, max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, **extra)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    tmp = work / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    writer = SafetensorsShardWriter(tmp, max_shard_bytes=2 * 10**9)
    tied = config.tie_word_embeddings
    for key, param in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        # a stacked experts parameter is stored as checkpoints store it: one matrix per expert and part
        parts = layout.checkpoint_parts(key, tuple(param.shape))
        names = [n for group in parts for n in group]
        stored = tuple(param.shape) if len(names) == 1 else (param.shape[1] // len(parts[0]), param.shape[2])
        for name in names:
            if "norm" in name:
                values = np.ones(stored, dtype=np.float16)
            else:
                values = (rng.standard_normal(stored, dtype=np.float32) * 0.02).astype(np.float16)
            writer.add(name, torch.from_numpy(values))
            del values
    writer.close()
    config.architectures = [type(model).__name__]
    config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["dtype"] = "float16"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tmp.rename(out)
    return out
