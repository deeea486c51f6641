"""Predicted peak memory of a conversion (and of profiling a GGUF) from the source's shape alone.

A path's peak is the largest of its phases, each a sum of what is alive at once (bytes):

* **libraries**: the interpreter with torch, transformers and llama.cpp loaded (measured).
* **engine** (verification's reference, the profiler's, GPTQ/RTN): the layer-streaming engine
  holds the largest decoder block in float32, the tensor being read in its stored dtype, the
  hidden states of every window (in and out of a block), one window's activations inside a
  block, and, at the end, one output-head chunk and one window's logits
  (:mod:`quantkit.runtimes.stream`).
* **GPTQ/RTN**: the engine, plus for GPTQ the Hessians of one sequential group and the
  algorithm's work arrays for the widest Linear, for RTN the codes of the largest Linear. A
  mixture of experts' group holds one Hessian per routed expert (Qwen3-30B-A3B: 128 x 2048² float32
  for gate/up, 2.1 GB) while they are quantized one by one.
* **GGUF**: llama.cpp's quantizer (in its own process) holds the largest tensor as read, in
  float32 and quantized.
* **verification / quality**: the artifact's runtime, loaded before the reference runs: the
  weights (llama.cpp reads a scored GGUF, see ``runtimes.llamacpp``; the GPTQ runtime keeps the
  packed tensors and float32 for the rest), then, while windows are compared, llama.cpp's
  output, compute and score buffers (a window's logits each) and the reference's logits of
  one window.

The same sizes feed ``profile``'s memory model (:mod:`quantkit.profile.memory`) for running an
artifact; this module answers the question before converting: will it fit here?
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .recipe import Recipe
from .source import DTYPE_BYTES, Source

__all__ = ["predict_convert_peak", "predict_profile_peak", "available_memory_bytes", "ModelShape"]

#: resident size of the interpreter with numpy, torch, transformers and llama_cpp imported
#: (265 MB on CPython 3.11 with torch 2.13 and transformers 5.24) and what a run adds to the
#: heap besides its large arrays (tokenizers, configs, small tensors: ~180 MB measured)
LIBRARIES_BYTES = 450 * 10**6
#: the profiler's latency worker before it loads the model: the interpreter with llama_cpp
#: imported (46 MB measured), the baseline its memory model adds the model's terms to
LATENCY_BASELINE_BYTES = 50 * 10**6
#: what a llama.cpp quantizing child holds besides the tensor it works on: fitted, with the tensor
#: terms below, on the 3B shape quantized to q4_k_m without verification (2,194 MB measured)
QUANTIZER_BASE_BYTES = 60 * 10**6
# bits per weight of the recipes the planner's table (plan.CANDIDATES) does not list
_FLOAT_BITS = {"f32": 32.0, "fp32": 32.0, "f16": 16.0, "fp16": 16.0, "bf16": 16.0}
_OTHER_QUANTIZED_BITS = 8.5  # an unlisted quantized GGUF type: at most q8_0's
# llama.cpp's own bits per weight of the GGUF types the planner does not list (llama-quantize --help)
_GGUF_BITS = {"q2_k": 2.96, "q3_k_s": 3.5, "q3_k_l": 4.27, "q4_k_s": 4.58, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q5_k_s": 5.54,
              "iq4_nl": 4.5, "iq4_xs": 4.25, "iq3_m": 3.66, "iq3_s": 3.44, "iq3_xs": 3.3, "iq3_xxs": 3.06, "iq2_m": 2.7,
              "iq2_s": 2.5, "iq2_xs": 2.31, "iq2_xxs": 2.06, "iq1_m": 1.75}
#: bytes per output-head parameter at the builder's peak (the float32 head table and the column
#: pass quantizing it, and an untied embedding's float32 table), untied and tied, fitted on
#: benchmark 10: tied on the 0.5B and 3B shapes (9.55 and 9.35); untied, the 1.5B and 8B shapes
#: disagree (8.7 and 1.4, with a few hundred MB of run-to-run noise in the builder's peak), so a
#: value that predicts both within 20 % (-16 % and +17 %)
BUILDER_HEAD_BYTES, BUILDER_TIED_HEAD_BYTES = 5.2, 9.4
#: peak bytes per parameter of onnxruntime-genai's builder writing onnx:int4 from a float16
#: checkpoint, measured on the Qwen2.5-0.5B shape (4,568 MB for 0.49B parameters, libraries apart)
ONNX_BYTES_PER_PARAM = 8.3


@dataclass(frozen=True)
class ModelShape:
    """What the memory terms need from a source (an HF checkpoint)."""

    n_layers: int
    hidden: int
    intermediate: int
    n_head: int
    n_head_kv: int
    head_dim: int
    vocab: int
    tied: bool
    params: int
    embedding_params: int
    largest_block_fp32: int
    largest_tensor_stored: int
    largest_tensor_elements: int
    widest_linear_in: int  # input features of the widest Linear (GPTQ's Hessian side)
    largest_linear_elements: int
    expert_hessian_bytes: int = 0  # a mixture of experts: every routed expert's Hessian of one group

    @classmethod
    def of(cls, source: Source) -> ModelShape:
        from .runtimes.hf import config_sizes
        from .runtimes.stream import LAYOUTS, Layout, largest_block_bytes
        from .source import experts_of

        sizes = config_sizes(source.config)
        cfg = source.config.get("text_config") or source.config
        layout = LAYOUTS.get(source.config.get("model_type"), Layout())
        tensors = source.tensors.values()
        elements = {t.name: math.prod(t.shape) for t in tensors}
        linears = [t for t in tensors if t.name.startswith(layout.blocks + ".") and len(t.shape) == 2]
        largest = max(tensors, key=lambda t: elements[t.name])
        embed = source.tensors.get(layout.embed + ".weight")
        experts = experts_of(source.config)
        side = max(sizes["n_embd"], experts.ff) if experts else 0
        return cls(
            # every routed expert's Hessian of the gate/up group, and the block's codes (uint8)
            # kept for the writer until the block is done
            expert_hessian_bytes=(experts.count * side * side * 4 + 3 * experts.count * experts.ff * sizes["n_embd"]) if experts else 0,
            n_layers=sizes["n_layers"], hidden=sizes["n_embd"], intermediate=int(cfg.get("intermediate_size") or 4 * sizes["n_embd"]),
            n_head=sizes["n_head"], n_head_kv=sizes["n_head_kv"], head_dim=sizes["head_dim"], vocab=sizes["n_vocab"],
            tied=(layout.head + ".weight") not in source.tensors,
            params=sum(elements.values()), embedding_params=elements.get(embed.name, 0) if embed else 0,
            largest_block_fp32=largest_block_bytes(source, layout),
            largest_tensor_stored=elements[largest.name] * DTYPE_BYTES.get(largest.dtype, 4),
            largest_tensor_elements=elements[largest.name],
            widest_linear_in=max((t.shape[1] for t in linears), default=sizes["n_embd"]),
            largest_linear_elements=max((elements[t.name] for t in linears), default=0),
        )


def _engine(shape: ModelShape, windows: int, window: int) -> dict[str, int]:
    """The layer-streaming engine's peak over ``windows`` windows of ``window`` tokens."""
    from .runtimes.stream import HEAD_CHUNK_BYTES

    states = 2 * windows * window * shape.hidden * 4
    block = (shape.largest_block_fp32 + shape.largest_tensor_stored // max(1, shape.n_layers)
             + window * (3 * shape.intermediate + 6 * shape.hidden) * 4 + shape.n_head * window * window * 4)
    head = HEAD_CHUNK_BYTES * 3 // 2 + window * shape.vocab * 4
    return {"engine_hidden_states": states, "engine_block_or_head": max(block, head)}


def _compare(shape: ModelShape, window: int, n_ctx: int, llama: bool, llama_windows: int = 4) -> int:
    """Comparing one window: the reference's logits, the runtime's, and llama.cpp's buffers."""
    logits = window * shape.vocab * 4
    divergence = 4 * 16 * shape.vocab * 8  # float64 log-probs of 16 rows, both sides, and their products
    if llama:  # output buffer, compute buffer (one ubatch: the logits and the tensors before them)
        # and llama-cpp-python's scores: four windows of logits resident in verification, three in
        # the profiler's quality pass when it has just computed the reference (a source's first
        # profile; fitted on the 0.5B, 1.5B and 3B shapes, -17 % to -10 % with two; with the
        # reference cached, the 8B row is +9 %); the extra windows are not explained yet (not
        # freed heap: malloc_trim after the reference pass leaves the 0.5B peak as it was)
        kv = 2 * shape.n_layers * shape.n_head_kv * shape.head_dim * n_ctx * 2
        return logits + llama_windows * n_ctx * shape.vocab * 4 + kv + divergence
    return 2 * logits + divergence  # the float32 model's output and the reference's


def _bits(recipe: Recipe) -> tuple[float, float]:
    """(bits per weight, bits per embedding/head weight) of the artifact of ``recipe``: the
    planner's table, by recipe or by its base scheme (``gptq:w4g128-rtn`` as ``gptq:w4g128``)."""
    from .plan import CANDIDATES

    table = {c.recipe: (c.bits_per_weight, c.embedding_bits) for c in CANDIDATES}
    scheme = recipe.scheme.split("-")[0].split("+")[0]  # q3_k_m+imatrix as q3_k_m
    base = f"{recipe.format}:{scheme}"
    if str(recipe) in table or base in table:
        return table.get(str(recipe)) or table[base]
    if recipe.format == "gptq":  # w{bits}g{group}: fp16 scale and packed zero per group, fp16 embedding
        bits = int(recipe.scheme[1])
        return bits + 0.25, 16.0
    bits = _FLOAT_BITS.get(scheme) or _GGUF_BITS.get(scheme, _OTHER_QUANTIZED_BITS)
    return bits, max(bits, 6.56 if bits < 16 else bits)  # llama.cpp mixes keep the head at q6_k or more


def _artifact_bytes(shape: ModelShape, recipe: Recipe) -> int:
    """Estimated size of the artifact (what its runtime holds during verification)."""
    if recipe.format == "gguf" and recipe.scheme.startswith("auto-"):  # gguf:auto fills its budget
        return int(recipe.option("target_size") or recipe.option("target_bpw") * shape.params / 8)
    tables = shape.embedding_params * (1 if shape.tied else 2)  # the embedding and an untied head
    bits, table_bits = _bits(recipe)
    return int((shape.params - tables) * bits / 8 + tables * table_bits / 8)


def _verification(shape: ModelShape, recipe: Recipe, tokens: int, ctx: int) -> dict[str, int]:
    """Phases of verifying the artifact of ``recipe``: the runtime loaded, then the reference
    run beside it, then the windows compared."""
    windows = max(1, math.ceil(tokens / ctx))
    engine = sum(_engine(shape, windows, ctx).values())
    if recipe.format == "gptq":  # the checkpoint as stored, one Linear unpacked and one head chunk at a time
        from .runtimes.stream import HEAD_CHUNK_BYTES

        # the safetensors are mapped: an untied float16 embedding is resident only in the rows
        # looked up (fitted on the 1.5B and 8B shapes' RTN rows: -14 % and +14 % with it left
        # out, +1 % and +31 % with it counted)
        untied_embedding = 0 if shape.tied else 2 * shape.embedding_params
        runtime = (_artifact_bytes(shape, recipe) - untied_embedding + 8 * shape.largest_linear_elements
                   + HEAD_CHUNK_BYTES * 3 // 2)
        llama = False
    else:
        runtime, llama = _artifact_bytes(shape, recipe), True
    return {"runtime_weights": runtime, "reference_or_compare": max(engine, _compare(shape, ctx, ctx, llama))}


def _gptq_work(shape: ModelShape, recipe: Recipe) -> int:
    """GPTQ's Hessians and work arrays, or RTN's codes. The widest Hessian is at its largest while
    its inverse's Cholesky factor is formed: the accumulated H, the working copy, its reversed copy
    or factor, and the factor's reversed result (2.25 n² measured inside the factorization)."""
    if recipe.scheme.endswith("-rtn"):
        return 16 * shape.largest_linear_elements  # int64 codes, float32 dequantized and work copy
    n = shape.widest_linear_in
    work = int(4.25 * n * n * 4) + 4 * shape.largest_linear_elements * 4
    return work + shape.expert_hessian_bytes


def _gptq_phase(shape: ModelShape, recipe: Recipe) -> dict[str, int]:
    """GPTQ or RTN on the layer-streaming engine (``recipe`` a ``gptq:`` recipe)."""
    samples = int(recipe.option("calib_samples", 128)) if not recipe.scheme.endswith("-rtn") else 0
    seqlen = int(recipe.option("calib_seqlen", 512))
    engine = _engine(shape, samples, seqlen) if samples else {"engine_block_or_head": shape.largest_block_fp32}
    return {"libraries": LIBRARIES_BYTES, **engine, "gptq_work": _gptq_work(shape, recipe)}


def _builder_prequantized(shape: ModelShape, checkpoint: Recipe) -> dict[str, int]:
    """onnxruntime-genai's builder on quantkit's GPTQ checkpoint, in its own process (traced on
    the Qwen2.5-0.5B shape, fitted on the 0.5B, 1.5B, 3B and 8B ones): it loads the whole checkpoint
    (4-bit Linears, float16 tables), which its graph's deferred tensors keep until they are
    written, repacks the Linears as ``MatMulNBits`` (4-bit codes, float32 scales on the CPU; an
    untied embedding becomes a float32 table), and at its peak quantkit's column pass (:mod:`quantkit.formats.onnx.builder`) quantizes the
    output head from the float32 table the builder materializes for it (a tied head's costs more:
    the embedding's lookup is made from the same table)."""
    from .formats.gptq import parse_scheme

    group = parse_scheme(checkpoint.scheme).group_size
    tables = shape.embedding_params * (1 if shape.tied else 2)
    linear = shape.params - tables
    return {"builder_checkpoint": int(linear * (0.5 + 2.5 / group)) + 2 * tables,
            "builder_graph": int(linear * (0.5 + 4.5 / group)),
            "builder_head": int((BUILDER_TIED_HEAD_BYTES if shape.tied else BUILDER_HEAD_BYTES) * shape.embedding_params)}


def predict_convert_peak(source: Source, recipe: Recipe, *, verify: bool = True, verify_tokens: int = 2048,
                         verify_ctx: int = 512) -> dict[str, Any]:
    """Predicted peak resident bytes of ``convert`` to ``recipe``: ``{"total_bytes", "phase",
    "terms"}`` (the terms of the largest phase)."""
    shape = ModelShape.of(source)
    phases: dict[str, dict[str, int]] = {}
    if recipe.format == "gguf":
        if recipe.option("imatrix") == "auto":  # the calibration pass on the engine, sums of one row per Linear
            phases["imatrix"] = {"libraries": LIBRARIES_BYTES,
                                 **_engine(shape, int(recipe.option("calib_samples")), int(recipe.option("calib_seqlen")))}
        phases["quantize"] = {"quantizer": QUANTIZER_BASE_BYTES,
                              "largest_tensor": shape.largest_tensor_stored + 5 * shape.largest_tensor_elements}
        if recipe.scheme.startswith("auto-"):
            # gguf:auto's sensitivity probes: a q8_0 model scored as the profiler does, after the
            # reference pass over the probe windows, whose largest buffer the heap keeps (measured
            # on Gemma 3 270M: 0.4 GB above the libraries after malloc_trim)
            seqlen, windows = int(recipe.option("calib_seqlen")), int(recipe.option("probe_windows"))
            engine = _engine(shape, windows, seqlen)
            phases["auto_probes"] = {"libraries": LIBRARIES_BYTES, "reference_heap": engine["engine_block_or_head"],
                                     "runtime_weights": int(shape.params * 8.5 / 8),
                                     "reference_or_compare": max(sum(engine.values()), _compare(shape, 0, seqlen, True, llama_windows=2))}
    elif recipe.format == "gptq":
        phases["quantize"] = _gptq_phase(shape, recipe)
    elif recipe.format == "onnx":
        from .formats.onnx import checkpoint_recipe

        prequantized = checkpoint_recipe(recipe, source.config)
        if prequantized is not None:  # quantkit's streamed GPTQ/RTN checkpoint, then the builder on it
            phases["quantize"] = _gptq_phase(shape, prequantized)
            phases["export"] = {"libraries": LIBRARIES_BYTES, **_builder_prequantized(shape, prequantized)}
        else:
            # onnxruntime-genai's builder (and torch.onnx) hold the whole model, float copies and the
            # graph being written: a measured rate, not a sum of terms (see ONNX_BYTES_PER_PARAM)
            phases["export"] = {"libraries": LIBRARIES_BYTES, "exporter": int(ONNX_BYTES_PER_PARAM * shape.params)}
    else:  # bitsandbytes writes a config; its runtime quantizes when the artifact is loaded
        phases["write"] = {"libraries": LIBRARIES_BYTES}
    if verify and recipe.format in ("gguf", "gptq"):
        phases["verify"] = {"libraries": LIBRARIES_BYTES, **_verification(shape, recipe, verify_tokens, verify_ctx)}
    phase = max(phases, key=lambda p: sum(phases[p].values()))
    return {"total_bytes": sum(phases[phase].values()), "phase": phase, "terms": phases[phase],
            "phases": {p: sum(t.values()) for p, t in phases.items()}}


def predict_profile_peak(artifact: Path, source: Source, *, chunks: int = 1, ctx: int = 512, domains: int = 3,
                         prompt_tokens: int = 128) -> dict[str, Any]:
    """Predicted peak of ``profile`` of the GGUF file ``artifact``, the larger of its two phases:
    the quality pass (the runtime loaded, the reference over every domain's windows in one pass,
    reduced to top-k as each window's logits come, then the runtime scoring) and the latency
    worker (its own process: llama.cpp loading the file, with the profiler's own memory model,
    :mod:`quantkit.profile.memory`)."""
    from .profile.memory import predicted_terms
    from .runtimes.llamacpp import LlamaCppRuntime

    shape = ModelShape.of(source)
    engine = sum(_engine(shape, chunks * domains, ctx).values())
    phases = {
        "quality": {"libraries": LIBRARIES_BYTES, "runtime_weights": Path(artifact).stat().st_size,
                    "reference_or_compare": max(engine, _compare(shape, 0, ctx, True, llama_windows=3))},
        "latency": predicted_terms(LlamaCppRuntime.describe(Path(artifact)), ctx, LATENCY_BASELINE_BYTES,
                                   prompt_tokens=prompt_tokens),
    }
    phase = max(phases, key=lambda p: sum(phases[p].values()))
    return {"total_bytes": sum(phases[phase].values()), "phase": phase, "terms": phases[phase],
            "phases": {p: sum(t.values()) for p, t in phases.items()}}


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), None elsewhere."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
