"""Predicted peak memory of running an artifact: weights + KV cache + runtime overhead.

    predicted_peak_bytes = baseline_rss_bytes        # interpreter + runtime library, measured
                         + load_transient_bytes      # source pages a runtime reads to build
                                                     #   its weights (bitsandbytes quantizes a
                                                     #   float checkpoint at load time: the
                                                     #   pages of the tensors it converts)
                         + tensor_bytes              # every weight is resident (mmap or copy)
                         + repack_bytes              # weights a backend copies into another
                                                     #   layout beside them (ONNX Runtime's
                                                     #   prepacked MatMulNBits; llama.cpp
                                                     #   reads its file, so its CPU_REPACK
                                                     #   copy replaces the read weights)
                         + runtime_overhead_bytes    # vocabulary tables (llama.cpp's, or an
                                                     #   HF tokenizer's), output buffers
                         + kv_cache_bytes_per_token * ctx
                         + compute_bytes             # activations of one ubatch, attention
                                                     #   scores of one layer, the logits row

``kv_cache_bytes_per_token = 2 (K and V) * n_layers * n_head_kv * head_dim * bytes per element``
(2 for llama.cpp's default F16 cache, 4 for a float32 transformers cache). Each runtime's
``describe()`` supplies the sizes; the terms it does not know are 0. On Gemma 3 270M with
llama.cpp the prediction is within 2% of the measured peak (see the README).
"""

from __future__ import annotations

__all__ = ["kv_cache_bytes_per_token", "predict_peak_bytes", "predicted_terms"]

KV_BYTES_PER_ELEMENT = 2  # llama.cpp's default F16 cache


def kv_cache_bytes_per_token(desc: dict[str, int]) -> int:
    per_element = desc.get("kv_bytes_per_element", KV_BYTES_PER_ELEMENT)
    return 2 * desc["n_layers"] * desc["n_head_kv"] * desc["head_dim"] * per_element


def predicted_terms(desc: dict[str, int], ctx: int, baseline_rss_bytes: int, ubatch: int = 512,
                    prompt_tokens: int = 1) -> dict[str, int]:
    """Each term of the formula above, in bytes. ``prompt_tokens``: the prompt of the run, for
    runtimes whose prefill returns logits at every prompt position (``logits_every_position``)."""
    ubatch = min(ubatch, ctx)
    activations = ubatch * desc["n_embd"] * 4 * 8  # a handful of ubatch x n_embd float32 buffers
    scores = ubatch * ctx * 4 * max(1, desc.get("n_head", 1))
    logits = desc["n_vocab"] * 4 * (min(prompt_tokens, ctx) if desc.get("logits_every_position") else 1)
    return {
        "baseline_rss_bytes": int(baseline_rss_bytes),
        "load_transient_bytes": int(desc.get("load_transient_bytes", 0)),
        "tensor_bytes": int(desc["tensor_bytes"]),
        "repack_bytes": int(desc.get("repack_bytes", 0)),
        "runtime_overhead_bytes": int(desc.get("runtime_overhead_bytes", 0)),
        "kv_cache_bytes": kv_cache_bytes_per_token(desc) * ctx,
        "compute_bytes": int(activations + scores + logits),
    }


def predict_peak_bytes(desc: dict[str, int], ctx: int, baseline_rss_bytes: int, ubatch: int = 512) -> int:
    return sum(predicted_terms(desc, ctx, baseline_rss_bytes, ubatch).values())
