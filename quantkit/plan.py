"""The planner: pick the best recipe for one hardware profile.

1. Enumerate candidate recipes across GGUF, GPTQ and ONNX (:data:`CANDIDATES`, one table), and,
   where q8_0 does not fit the target, ``gguf:auto`` at the most bits per weight that fits
   (:func:`auto_candidate`: per-tensor types chosen for that size).
2. Before converting anything, estimate each one's size, fit, compatibility and decode speed on
   the target from the source's shape (the hardware estimates of ``quantkit.hardware``), and drop
   those that cannot fit, cannot run there, or are estimated below ``min_decode_tps``.
3. Convert and profile the rest, fastest estimate first. The objective is the fastest decoding
   that keeps quality (``kld_mean <= max_kld``); once a candidate qualifies, every later one is
   estimated slower, so none can win and the search stops.
4. Print the Pareto front (size against KLD) of what was profiled and the recommendation with
   its report. Runs are resumable: ``plan-state.json`` in the output folder remembers finished
   candidates (keyed by source fingerprint and recipe), which are not recomputed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["CANDIDATES", "Candidate", "plan"]


@dataclass(frozen=True)
class Candidate:
    recipe: str
    bits_per_weight: float  # average over the quantized weights, format overhead included
    embedding_bits: float  # what the token-embedding table is stored in
    tensor_types: tuple[str, ...] = ()  # GGUF: the types llama.cpp will write (main ones)
    operators: tuple[str, ...] = ()  # ONNX: non-trivial operators the recipe adds


# bits per weight: llama.cpp's own figures for its types; GPTQ 4 bits + fp16 scale/zero per group
# of 128 (+0.25); ONNX MatMulNBits blocks of 32 with float32 scales (+1, onnxruntime-genai's
# builder), whose int8 keeps the embedding table float32
CANDIDATES: tuple[Candidate, ...] = (
    Candidate("gguf:q8_0", 8.5, 8.5, ("q8_0",)),
    Candidate("gguf:q6_k", 6.56, 6.56, ("q6_k",)),
    Candidate("gguf:q5_k_m", 5.69, 6.56, ("q5_k", "q6_k")),
    Candidate("gguf:q4_k_m", 4.85, 6.56, ("q4_k", "q6_k")),
    Candidate("gguf:q4_0", 4.5, 4.5, ("q4_0",)),
    Candidate("gguf:q3_k_m", 3.91, 6.56, ("q3_k", "q5_k")),
    Candidate("gguf:f16", 16.0, 16.0, ("f16",)),
    Candidate("gptq:w4g128", 4.25, 16.0),
    Candidate("gptq:w8g128", 8.25, 16.0),
    Candidate("onnx:int8", 9.0, 32.0, (), ("com.microsoft::MatMulNBits", "com.microsoft::GroupQueryAttention")),
    Candidate("onnx:int4", 5.0, 5.0, (), ("com.microsoft::MatMulNBits", "com.microsoft::GatherBlockQuantized",
                                         "com.microsoft::GroupQueryAttention")),
    Candidate("onnx:int8-static", 8.0, 32.0, (), ("ai.onnx::QuantizeLinear", "ai.onnx::DequantizeLinear")),
    Candidate("onnx:fp16", 16.0, 16.0, (), ("ai.onnx::MatMul",)),
)


# what a gguf:auto mix may hold: the candidate types and llama.cpp's fallbacks for narrow rows
AUTO_TENSOR_TYPES = ("q2_k", "q3_k", "iq4_xs", "q4_k", "q5_k", "q6_k", "q8_0", "q4_0", "q5_0", "q5_1", "iq4_nl")


def auto_candidate(shape: dict[str, int], target, static: bool, ctx: int) -> Candidate | None:
    """``gguf:auto`` sized to ``target``: the most bits per weight, in steps of 0.25 from q8_0's
    8.5 down to 2.75, whose estimate fits there; None when q8_0 fits (q8_0 is the better choice)
    or nothing does."""
    from .hardware.estimate import estimate_target

    fallback = None  # the most bits whose estimate fits, where llama.cpp's split fits at none
    for quarter in range(34, 10, -1):
        bpw = quarter / 4
        candidate = Candidate(f"gguf:auto-{bpw:g}bpw", bpw, bpw, AUTO_TENSOR_TYPES)
        estimate = estimate_target(_facts(candidate, shape, static), target, ctx, None)
        if not estimate["fits"]:
            continue
        if quarter == 34:  # q8_0's size fits: q8_0 is the better choice
            return None
        if "error" not in _fit(shape, candidate, target, estimate, ctx):
            return candidate
        fallback = fallback or candidate
    return fallback


def _shape(source) -> dict[str, Any]:
    """The source's sizes for the estimates: from its tensors' shapes, or from config.json alone
    (a shape-only source). A mixture of experts' routed experts are counted apart: all of them
    are resident, a token reads ``expert_active`` of them."""
    from .runtimes.hf import block_params, config_sizes
    from .runtimes.stream import LAYOUTS, Layout
    from .source import experts_of

    cfg = source.config.get("text_config") or source.config
    layout = LAYOUTS.get(source.config.get("model_type"), Layout())
    sizes = config_sizes(source.config)
    blocks = block_params(source.config)
    embedding = sizes["n_vocab"] * sizes["n_embd"]
    tied = bool(cfg.get("tie_word_embeddings", source.config.get("tie_word_embeddings", False)))
    if source.tensors:
        total = sum(math.prod(t.shape) for t in source.tensors.values())
        routed = sum(math.prod(t.shape) for n, t in source.tensors.items() if layout.parse_expert(n))
    else:
        total = sum(p for p, _ in blocks) + embedding * (1 if tied else 2)
        routed = sum(r for _, r in blocks)
    experts = experts_of(source.config)
    active = experts.used / experts.count if experts else 1.0
    return {**sizes, "linear_params": int(sum(p - r * (1 - active) for p, r in blocks)), "embedding_params": embedding,
            "other_params": max(0, total - embedding), "routed_params": routed, "expert_active": active, "blocks": blocks,
            "config": source.config, "max_ctx": int(cfg.get("max_position_embeddings") or 0)}


def _facts(candidate: Candidate, shape: dict[str, int], static: bool):
    from .hardware.estimate import ArtifactFacts

    fmt, _, scheme = candidate.recipe.partition(":")
    weights = int(shape["other_params"] * candidate.bits_per_weight / 8 + shape["embedding_params"] * candidate.embedding_bits / 8)
    idle = int(shape["routed_params"] * (1 - shape["expert_active"]) * candidate.bits_per_weight / 8)
    kv_per_element = 4 if fmt == "onnx" else 2
    graph: dict[str, Any] = {}
    if fmt == "onnx":
        inputs = {"input_ids": [1, "s"], "attention_mask": [1, "s"]}
        graph = {"operators": dict.fromkeys(candidate.operators, 1), "opset": 21 if scheme == "int4" else 18,
                 "inputs": {**inputs, **({} if static else {"past_key_values.0.key": [1, 1, "p", 1]})},
                 "dynamic_inputs": [] if static else sorted(inputs)}
    return ArtifactFacts(
        format=fmt, scheme=scheme, kind="decoder", weight_bytes=weights, bytes_read_per_token=weights - idle,
        idle_expert_bytes=idle, active_params=shape["linear_params"],
        kv_bytes_per_token=shape["n_layers"] * _kv_width(shape["config"]) * kv_per_element,
        linear_params=shape["linear_params"], n_vocab=shape["n_vocab"], n_embd=shape["n_embd"],
        max_ctx=shape["max_ctx"] or None, gguf_tensor_types=frozenset(candidate.tensor_types), onnx_graph=graph,
    )


def _kv_width(config: dict[str, Any]) -> int:
    """Values a layer's KV cache holds per token (keys and values of every KV head)."""
    from .runtimes.hf import kv_dims

    heads, k, v = kv_dims(config)
    return heads * (k + v)


def _fit(shape: dict[str, Any], candidate: Candidate, target, estimate: dict[str, Any], ctx: int) -> dict[str, Any]:
    """llama.cpp's split of a GGUF candidate on ``target`` (GPU layers, experts in RAM, KV cache,
    the largest context), from the source's shape; ``{"error": ...}`` where nothing fits at
    ``ctx`` tokens or more."""
    from .errors import InputError
    from .hardware.fit import GGUFLayout, fit_gguf

    layout = GGUFLayout.from_shape(shape["config"], shape["blocks"], candidate.bits_per_weight, candidate.embedding_bits)
    try:
        fit = fit_gguf(candidate.recipe, target, estimate=estimate, layout=layout)
    except InputError as exc:  # nothing fits, or no llama.cpp on the target
        return {"error": str(exc)}
    if fit["ctx"] < ctx:
        return {"error": f"{candidate.recipe} fits {target.name} with at most {fit['ctx']:,} tokens of context, {ctx:,} asked"}
    return fit


def _state(path: Path, fingerprint: str) -> dict[str, Any]:
    from .errors import ArtifactError

    if path.is_file():
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ArtifactError(f"{path}: not a readable plan state ({type(exc).__name__}); delete it to start over") from exc
        done = state.get("done") if isinstance(state, dict) else None
        if not isinstance(done, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("artifact"), str) and isinstance(v.get("report"), str) for v in done.values()
        ):
            raise ArtifactError(f"{path}: not a plan state (needs 'done' entries with an artifact and a report); delete it to start over")
        if state.get("source_fingerprint") == fingerprint:
            return state
    return {"source_fingerprint": fingerprint, "done": {}}


def plan(
    source,
    profile_name: str,
    out_dir: Path,
    *,
    max_kld: float = 0.05,
    min_decode_tps: float | None = None,
    ctx: int = 512,
    chunks: int = 2,
    threads: int | None = None,
    progress=None,
    candidates: tuple[Candidate, ...] = CANDIDATES,
    estimate_only: bool = False,
    convert: Callable[..., Any],
    profile: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    """Estimate, prune, convert and profile candidates; return the plan (also ``plan.json``).

    ``estimate_only``: stop after the estimates (no conversion, no profile): the source may then
    be a config.json alone, and each GGUF candidate's fit on the target (GPU layers, experts in
    RAM, context) is given from the shape.

    ``convert`` and ``profile`` are the API's verbs (``quantkit.api`` passes its own), so the
    planner depends on what they do, not on the module that offers them."""
    from .artifact import check_artifact, read_manifest
    from .gate import read_report
    from .hardware import load_profile
    from .hardware.estimate import estimate_target
    from .report.gate_render import pareto_front
    from .report.render import write_json
    from .source import experts_of, resolve_source

    target = load_profile(profile_name, threads)
    src = resolve_source(source, shape_only=estimate_only)
    if src.kind != "hf":
        raise InputError(f"{src.id}: the planner needs an HF checkpoint (GPTQ and ONNX start from one)")
    shape = _shape(src)
    static = target.constraints.static_shapes
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_file = out_dir / "plan-state.json"
    state = _state(state_file, src.fingerprint)

    from .footprint import available_memory_bytes, predict_convert_peak
    from .recipe import parse_recipe

    available = available_memory_bytes()
    considered, queue = [], []
    if (sized := auto_candidate(shape, target, static, ctx)) is not None:
        candidates = (*candidates, sized)
    moe = experts_of(src.config) is not None
    for cand in candidates:
        est = estimate_target(_facts(cand, shape, static), target, ctx, None)
        # converting happens here, on this machine (without verification: the profile measures)
        peak = None if estimate_only else predict_convert_peak(src, parse_recipe(cand.recipe), verify=False)["total_bytes"]
        row = {"recipe": cand.recipe + (" --static-shapes" if static and cand.recipe.startswith("onnx:") else ""),
               "estimated_bytes": est["needed_bytes"], "fits": est["fits"], "compatible": est["compatible"],
               "reasons": est["reasons"], "estimated_decode_tokens_per_s": est.get("decode_tokens_per_s"),
               "predicted_convert_peak_bytes": peak}
        fit = None
        if cand.recipe.startswith("gguf:") and est["compatible"]:
            fit = _fit(shape, cand, target, est, ctx)
            row["fit"] = fit
        why = [] if est["fits"] else [f"does not fit ({est['needed_bytes'] / 1e9:.2f} GB > {est['usable_bytes'] / 1e9:.2f} GB usable)"]
        if fit and "error" not in fit:  # llama.cpp's split (experts or layers in RAM) fits where the whole does not
            why = []
            row["fits"] = True
            row["estimated_decode_tokens_per_s"] = fit.get("decode_tokens_per_s") or row["estimated_decode_tokens_per_s"]
        if moe and not cand.recipe.startswith("gguf:"):
            why.append(f"{cand.recipe.partition(':')[0]}: mixtures of experts are not supported (gguf is)")
        if peak is not None and available is not None and peak > available:
            why.append(f"converting needs {peak / 1e9:.1f} GB here (predicted), {available / 1e9:.1f} GB available")
        why += est["reasons"]
        if min_decode_tps and (row["estimated_decode_tokens_per_s"] or 0) < min_decode_tps:  # the split's speed, where split
            why.append(f"estimated decode {row['estimated_decode_tokens_per_s'] or 0:.1f} tok/s < {min_decode_tps}")
        row["status"] = "pruned: " + "; ".join(why) if why else ("estimated" if estimate_only else "queued")
        considered.append(row)
        if not why:
            queue.append((cand, row))
    queue.sort(key=lambda item: -(item[1]["estimated_decode_tokens_per_s"] or 0))
    if estimate_only:
        result = {"source": src.to_manifest(), "profile": profile_name, "ctx": ctx, "max_kld": max_kld,
                  "min_decode_tps": min_decode_tps, "estimate_only": True, "candidates": considered, "pareto_front": [],
                  "recommendation": None}
        write_json(result, out_dir / "plan.json")
        return result

    recommendation = None
    for cand, row in queue:
        key = f"{cand.recipe}|static={static}|ctx={ctx}|chunks={chunks}"
        done = state["done"].get(key)
        options = {"static_shapes": True} if static and cand.recipe.startswith("onnx:") else {}
        manifest = read_manifest(Path(done["artifact"])) if done and Path(done["report"]).is_file() \
            and Path(done["artifact"]).is_dir() else None
        # resumed only if the artifact is what the recipe means now (an older quantkit's defaults
        # differ, e.g. the importance matrix below 5 bits): redone otherwise
        if manifest is not None and parse_recipe(cand.recipe, options).matches(manifest.get("recipe")):
            check_artifact(Path(done["artifact"]), manifest, hashes=False)
            report = read_report(done["report"])  # schema-checked: a damaged report is bad input
            row["resumed"] = True
        else:
            art = convert(source, [cand.recipe], out_dir / "artifacts", threads=threads, progress=progress,
                          recipe_options=options, verify=False).artifacts[0]
            report = profile(art.path, ctx=ctx, chunks=chunks, threads=threads, progress=progress,
                             profiles=[profile_name], latency=not static)
            report_file = out_dir / "reports" / f"{art.path.name}.json"
            write_json(report, report_file)
            state["done"][key] = {"artifact": str(art.path), "report": str(report_file)}
            write_json(state, state_file)
        est = report["targets"][0]
        kld = report["quality"]["kld_mean"]
        # a GGUF that llama.cpp runs split (layers or experts in RAM) fits, at the split's speed
        split = est.get("fit") if isinstance(est.get("fit"), dict) and "error" not in est["fit"] else None
        if split is not None and split.get("ctx", 0) < ctx:  # fits only a shorter context than asked
            split = None
        fits = est["fits"] or split is not None
        decode = (split or {}).get("decode_tokens_per_s") or est.get("decode_tokens_per_s")
        row.update(kld_mean=kld, file_bytes=report["memory"]["file_bytes"], compatible=est["compatible"], fits=fits,
                   decode_tokens_per_s=decode, report=state["done"][key]["report"], artifact=state["done"][key]["artifact"])
        ok = est["compatible"] and fits and kld <= max_kld and (not min_decode_tps or (decode or 0) >= min_decode_tps)
        row["status"] = "qualifies" if ok else "profiled: " + (f"kld_mean {kld:.4f} > {max_kld}" if kld > max_kld else "fails the target")
        if ok:
            recommendation = row
            break  # every later candidate is estimated slower on this target: none can win
    for _, row in queue:
        if row["status"] == "queued":
            row["status"] = "skipped: estimated slower than the recommendation"
    profiled = [(r["recipe"], r["file_bytes"] / 1e6, r["kld_mean"]) for r in considered if "kld_mean" in r]
    result = {
        "source": src.to_manifest(), "profile": profile_name, "ctx": ctx, "max_kld": max_kld,
        "min_decode_tps": min_decode_tps, "candidates": considered,
        "pareto_front": pareto_front(profiled), "recommendation": recommendation,
    }
    write_json(result, out_dir / "plan.json")
    _write_html(out_dir / "plan.html", [r["report"] for r in considered if "report" in r])
    return result


def _write_html(path: Path, report_files: list[str]) -> None:
    """The profiled candidates' plots (size against KLD, per domain, speed per profile)."""
    from .gate import GateResult, read_report
    from .report.gate_render import render_html
    from .report.render import write_text

    reports = [read_report(f) for f in report_files]
    if reports:
        write_text(path, render_html(GateResult(reports=reports), title="quantkit plan"))
