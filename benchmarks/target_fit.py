"""GGUF artifacts fitted to the shipped hardware profiles: GPU layers, KV cache type, the largest
context and the estimated decode speed, for Gemma 3 270M q4_k_m (converted here), a
Llama-3.1-8B-shaped q4_k_m and a Qwen3-30B-A3B-shaped q4_k_m (a mixture of experts: 128
experts, 8 routed a token). The last two are GGUF headers written here, their data a sparse hole:
the fit and the estimates read only tensor sizes.

    python benchmarks/target_fit.py

No model is run (seconds). The headers' tensor types follow llama.cpp's q4_k_m mix
(``llama-quant.cpp``: q6_k for the head, and for attn_v and ffn_down (the experts' too) on the
first and last eighth of the blocks and every third between; q4_k elsewhere; routers and norms
f32); their sizes are compared with the published Q4_K_M files. Writes
benchmarks/results/target_fit.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gguf  # noqa: E402
import numpy as np  # noqa: E402
from _measure import cached_embedded_artifact, markdown_table, write_results  # noqa: E402

NAME = "target_fit"
PROFILES = ("laptop-x86-8gb", "laptop-x86-16gb", "raspberry-pi-5-8gb", "apple-m2-16gb", "jetson-orin-nano-8gb",
            "rtx-4060-8gb", "rtx-4090-24gb", "ascend-910b", "ascend-310p")
# Llama 3.1 8B (config.json of meta-llama/Llama-3.1-8B) and the published size of its Q4_K_M GGUF
# (the file behind laptop-x86-8gb's measurement, profiles/laptop-x86-8gb.yaml)
LLAMA_8B = {"n_layers": 32, "n_embd": 4096, "n_head": 32, "n_head_kv": 8, "n_ff": 14336, "n_vocab": 128256,
            "n_ctx_train": 131072}
PUBLISHED_8B_Q4_K_M_BYTES = 4_917_737_554
# Qwen3-30B-A3B (config.json of Qwen/Qwen3-30B-A3B) and its Q4_K_M GGUF's published size: 17.28
# (GiB, 18.55 GB) on huggingface.co/GOBA-AI-Labs/PrunedHub-Qwen3-30B-A3B-EN-80pct-MxMoE, which
# compares its own file with "the original Q4_K_M"
QWEN3_30B_A3B = {"n_layers": 48, "n_embd": 2048, "n_head": 32, "n_head_kv": 4, "head_dim": 128, "n_ff": 6144, "n_expert": 128,
                 "n_expert_used": 8, "n_ff_exp": 768, "n_vocab": 151936, "n_ctx_train": 40960}
PUBLISHED_30B_A3B_Q4_K_M_BYTES = int(17.28 * 2**30)


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth, and every third block between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


Q4K, Q6K, F32 = gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K, gguf.GGMLQuantizationType.F32


def llama_8b_q4_k_m(path: Path) -> int:
    """A Llama-3.1-8B-shaped q4_k_m GGUF: header and tensor table as llama.cpp writes them, the
    data region a sparse hole. Returns the file size."""
    s, q4k, q6k, f32 = LLAMA_8B, Q4K, Q6K, F32
    head_dim = s["n_embd"] // s["n_head"]
    kv = s["n_head_kv"] * head_dim
    tensors = [("token_embd.weight", (s["n_vocab"], s["n_embd"]), q4k)]
    for i in range(s["n_layers"]):
        more = q6k if _more_bits(i, s["n_layers"]) else q4k
        tensors += [(f"blk.{i}.attn_norm.weight", (s["n_embd"],), f32), (f"blk.{i}.ffn_norm.weight", (s["n_embd"],), f32),
                    (f"blk.{i}.attn_q.weight", (s["n_embd"], s["n_embd"]), q4k), (f"blk.{i}.attn_k.weight", (kv, s["n_embd"]), q4k),
                    (f"blk.{i}.attn_v.weight", (kv, s["n_embd"]), more), (f"blk.{i}.attn_output.weight", (s["n_embd"], s["n_embd"]), q4k),
                    (f"blk.{i}.ffn_gate.weight", (s["n_ff"], s["n_embd"]), q4k), (f"blk.{i}.ffn_up.weight", (s["n_ff"], s["n_embd"]), q4k),
                    (f"blk.{i}.ffn_down.weight", (s["n_embd"], s["n_ff"]), more)]
    tensors += [("output_norm.weight", (s["n_embd"],), f32), ("output.weight", (s["n_vocab"], s["n_embd"]), q6k),
                ("rope_freqs.weight", (head_dim // 2,), f32)]
    return _header(path, "llama", s, tensors)


def qwen3_30b_a3b_q4_k_m(path: Path) -> int:
    """A Qwen3-30B-A3B-shaped q4_k_m GGUF header (data a sparse hole): 48 blocks of grouped-query
    attention with q/k norms and a router over 128 stacked experts of width 768."""
    s = QWEN3_30B_A3B
    n, e, hd, ff = s["n_embd"], s["n_expert"], s["head_dim"], s["n_ff_exp"]
    tensors = [("token_embd.weight", (s["n_vocab"], n), Q4K)]
    for i in range(s["n_layers"]):
        more = Q6K if _more_bits(i, s["n_layers"]) else Q4K
        tensors += [(f"blk.{i}.attn_norm.weight", (n,), F32), (f"blk.{i}.ffn_norm.weight", (n,), F32),
                    (f"blk.{i}.attn_q_norm.weight", (hd,), F32), (f"blk.{i}.attn_k_norm.weight", (hd,), F32),
                    (f"blk.{i}.attn_q.weight", (s["n_head"] * hd, n), Q4K), (f"blk.{i}.attn_k.weight", (s["n_head_kv"] * hd, n), Q4K),
                    (f"blk.{i}.attn_v.weight", (s["n_head_kv"] * hd, n), more),
                    (f"blk.{i}.attn_output.weight", (n, s["n_head"] * hd), Q4K), (f"blk.{i}.ffn_gate_inp.weight", (e, n), F32),
                    (f"blk.{i}.ffn_gate_exps.weight", (e, ff, n), Q4K), (f"blk.{i}.ffn_up_exps.weight", (e, ff, n), Q4K),
                    (f"blk.{i}.ffn_down_exps.weight", (e, n, ff), more)]
    tensors += [("output_norm.weight", (n,), F32), ("output.weight", (s["n_vocab"], n), Q6K)]
    return _header(path, "qwen3moe", s, tensors, experts=True)


def _header(path: Path, arch: str, s: dict, tensors: list, experts: bool = False) -> int:
    """Write the GGUF header and tensor table of ``tensors`` (name, numpy-order shape, type) and
    leave the data region a hole of the right length. Returns the file size."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(s["n_layers"])
    writer.add_embedding_length(s["n_embd"])
    writer.add_feed_forward_length(s["n_ff"])
    writer.add_head_count(s["n_head"])
    writer.add_head_count_kv(s["n_head_kv"])
    if "head_dim" in s:
        writer.add_key_length(s["head_dim"])
        writer.add_value_length(s["head_dim"])
    if experts:
        writer.add_expert_count(s["n_expert"])
        writer.add_expert_used_count(s["n_expert_used"])
        writer.add_expert_feed_forward_length(s["n_ff_exp"])
    writer.add_context_length(s["n_ctx_train"])
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_K_M))
    writer.add_token_list([f"<t{i}>" for i in range(s["n_vocab"])])
    for name, shape, kind in tensors:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        nbytes = int(np.prod(shape)) // block * size
        if kind == F32:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=kind)
        else:  # the writer takes a quantized tensor's shape in bytes per row
            writer.add_tensor_info(name, (*shape[:-1], shape[-1] // block * size), np.dtype(np.uint8), nbytes, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    data_start = writer.fout[0].tell()
    writer.close()
    total = data_start + sum(writer.tensors[0][name].nbytes + (-writer.tensors[0][name].nbytes % 32)
                             for name in writer.tensors[0])
    with open(path, "r+b") as fh:  # the data: a hole of the right length
        fh.truncate(total)
    return total


def rows_for(label: str, path: Path) -> list[dict]:
    from quantkit.errors import InputError
    from quantkit.hardware import load_profile
    from quantkit.hardware.estimate import artifact_facts, estimate_target
    from quantkit.hardware.fit import GGUFLayout, fit_gguf
    from quantkit.profile.memory import kv_cache_bytes_per_token
    from quantkit.runtimes.llamacpp import LlamaCppRuntime

    desc = LlamaCppRuntime.describe(path)
    facts = artifact_facts("gguf", "q4_k_m", desc, kv_cache_bytes_per_token(desc))
    layout, rows = GGUFLayout.of(path), []
    for name in PROFILES:
        profile = load_profile(name)
        estimate = estimate_target(facts, profile, 4096, None)
        row = {"model": label, "file_bytes": path.stat().st_size, "profile": name, "compatible": estimate["compatible"],
               "reasons": estimate["reasons"]}
        if estimate["compatible"]:
            try:
                fit = fit_gguf(path, profile, estimate=estimate, layout=layout)
            except InputError as exc:  # does not fit even on the CPU: the line says what is missing
                fit = {"error": str(exc)}
            row.update(fit=fit, calibrated_on=estimate["efficiency"]["calibrated_on"])
        rows.append(row)
    return rows


def _config(s: dict, moe: bool) -> dict:
    """config.json of the shape ``s`` (what `quantkit plan --estimate-only` reads)."""
    base = {"hidden_size": s["n_embd"], "num_attention_heads": s["n_head"], "num_key_value_heads": s["n_head_kv"],
            "num_hidden_layers": s["n_layers"], "vocab_size": s["n_vocab"], "intermediate_size": s["n_ff"],
            "max_position_embeddings": s["n_ctx_train"], "tie_word_embeddings": False}
    if not moe:
        return {**base, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    return {**base, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "head_dim": s["head_dim"],
            "moe_intermediate_size": s["n_ff_exp"], "num_experts": s["n_expert"], "num_experts_per_tok": s["n_expert_used"],
            "norm_topk_prob": True}


PLAN_PROFILES = ("laptop-x86-16gb", "rtx-4060-8gb")


def plan_rows(folder: Path) -> list[dict]:
    """`quantkit plan --estimate-only` from config.json alone, for the two shapes on two profiles."""
    import json

    from quantkit.api import plan

    rows = []
    for label, shape, moe in (("Llama-3.1-8B", LLAMA_8B, False), ("Qwen3-30B-A3B", QWEN3_30B_A3B, True)):
        source = folder / label.lower()
        source.mkdir(parents=True, exist_ok=True)
        (source / "config.json").write_text(json.dumps(_config(shape, moe)))
        for profile in PLAN_PROFILES:
            result = plan(source, profile, folder / f"plan-{label.lower()}-{profile}", estimate_only=True)
            for c in result["candidates"]:
                if c["recipe"] == "gguf:q4_k_m" or (c["recipe"].startswith("gguf:auto") and c["status"] == "estimated"):
                    rows.append({"model": label, "profile": profile, "recipe": c["recipe"], "status": c["status"],
                                 "fit": c.get("fit"), "decode": c.get("estimated_decode_tokens_per_s")})
    return rows


def main() -> None:
    from quantkit.api import convert
    from quantkit.profile.run import locate_artifact

    out = REPO / "out" / "bench"
    gemma = out / "gemma-3-270m-q4_k_m"
    if not cached_embedded_artifact(gemma, "gguf:q4_k_m"):
        convert(None, ["gguf:q4_k_m"], out, verify=False)
    header = out / NAME / "llama-3.1-8b-shape-Q4_K_M.gguf"
    header.parent.mkdir(parents=True, exist_ok=True)
    size = llama_8b_q4_k_m(header)
    moe = out / NAME / "qwen3-30b-a3b-shape-Q4_K_M.gguf"
    moe_size = qwen3_30b_a3b_q4_k_m(moe)
    rows = (rows_for("Gemma 3 270M q4_k_m", locate_artifact(gemma)[1]) + rows_for("Llama-3.1-8B-shaped q4_k_m", header)
            + rows_for("Qwen3-30B-A3B-shaped q4_k_m", moe))
    result = {"rows": rows, "plan_rows": plan_rows(out / NAME), "llama_8b_file_bytes": size, "published_8b_file_bytes": PUBLISHED_8B_Q4_K_M_BYTES,
              "qwen3_30b_a3b_file_bytes": moe_size, "published_30b_a3b_file_bytes": PUBLISHED_30B_A3B_Q4_K_M_BYTES}
    write_results(NAME, result)
    print(table(result))


def table(result: dict) -> str:
    from quantkit.report.render import fit_text

    body = []
    for r in result["rows"]:
        if not r["compatible"]:
            body.append([r["model"], r["profile"], "incompatible: " + "; ".join(r["reasons"]), "-"])
            continue
        fit = r["fit"]
        speed = f"{fit['decode_tokens_per_s']:.1f}" if fit.get("decode_tokens_per_s") else "-"
        body.append([r["model"], r["profile"], fit_text(fit, speed=False).removesuffix(" (estimated)"), speed])
    note = (f"\nThe 8B header is {result['llama_8b_file_bytes'] / 1e9:.3f} GB; the published Llama-3.1-8B Q4_K_M file is "
            f"{result['published_8b_file_bytes'] / 1e9:.3f} GB ({100 * (result['llama_8b_file_bytes'] / result['published_8b_file_bytes'] - 1):+.2f} %).\n")
    if "qwen3_30b_a3b_file_bytes" in result:
        mine, published = result["qwen3_30b_a3b_file_bytes"], result["published_30b_a3b_file_bytes"]
        note += (f"The Qwen3-30B-A3B header is {mine / 1e9:.2f} GB; its published Q4_K_M file is about {published / 1e9:.2f} GB "
                 f"({100 * (mine / published - 1):+.1f} %). A token reads the attention, the router and 8 of 128 experts "
                 "per block: the decode estimates use those bytes, not the file's.\n")
    return markdown_table(["artifact", "profile", "fit (estimated)", "decode tok/s (estimated)"], body) + note


def plan_table(result: dict) -> str:
    from quantkit.report.render import fit_text

    body = []
    for r in result.get("plan_rows", []):
        fit = r["fit"] or {}
        where = fit_text(fit, speed=False).removesuffix(" (estimated)") if fit else "-"
        status = r["status"] if r["status"] != "estimated" else "fits"
        body.append([r["model"], r["profile"], r["recipe"], where if "error" not in fit else status,
                     f"{r['decode']:.1f}" if r["decode"] and "error" not in fit else "-"])
    return markdown_table(["config.json of", "profile", "recipe", "llama.cpp fit (estimated)", "decode tok/s (estimated)"], body)


def sections(result: dict) -> dict[str, str]:
    return {"table": table(result), "plan": plan_table(result)}


if __name__ == "__main__":
    main()
