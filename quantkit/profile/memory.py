"""Predicted peak memory of running an artifact: weights + KV cache + runtime overhead.

    predicted_peak_bytes = baseline_rss_bytes          # interpreter + runtime library, measured
                         + tensor_bytes                # every weight is read (mmap) at least once
                         + kv_cache_bytes_per_token * ctx
                         + compute_bytes               # activations of one ubatch + logits row

``kv_cache_bytes_per_token = 2 (K and V) * n_layers * n_head_kv * head_dim * 2 bytes`` (llama.cpp
keeps the cache in F16 by default). ``compute_bytes`` follows llama.cpp's CPU graph: one ubatch
of activations across the widest layer, the attention scores of one layer, and the logits row.
"""

from __future__ import annotations

__all__ = ["kv_cache_bytes_per_token", "predict_peak_bytes"]

KV_BYTES_PER_ELEMENT = 2  # F16 cache


def kv_cache_bytes_per_token(desc: dict[str, int]) -> int:
    return 2 * desc["n_layers"] * desc["n_head_kv"] * desc["head_dim"] * KV_BYTES_PER_ELEMENT


def predict_peak_bytes(desc: dict[str, int], ctx: int, baseline_rss_bytes: int, ubatch: int = 512) -> int:
    ubatch = min(ubatch, ctx)
    activations = ubatch * desc["n_embd"] * 4 * 8  # a handful of ubatch x n_embd float32 buffers
    scores = ubatch * ctx * 4 * max(1, desc.get("n_head", 1))
    logits = desc["n_vocab"] * 4
    compute = activations + scores + logits
    return int(baseline_rss_bytes + desc["tensor_bytes"] + kv_cache_bytes_per_token(desc) * ctx + compute)
