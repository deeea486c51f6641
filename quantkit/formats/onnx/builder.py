"""Decoders with a KV cache through onnxruntime-genai's model builder: the graphs (fused
attention, ``GroupQueryAttention`` on the CPU, ``MatMulNBits`` int4/int8 weights) and the
``genai_config.json`` that ``onnxruntime_genai`` runs, so every such artifact loads there.

The builder is called through its Python API in a child process (``isolate``): it loads the
whole model, and ONNX Runtime's quantizers underneath are native code. quantkit adapts what the
builder does not read itself, without patching it:

* transformers 5 keeps Gemma 3's RoPE settings per layer type (``rope_parameters:
  {full_attention: ..., sliding_attention: ...}``); the builder expects the flat
  ``rope_theta`` / ``rope_local_base_freq`` of transformers 4, so they are set on the loaded config;
* no Hugging Face token lookups (``hf_token=false``) and no remote code.

Its input may be quantkit's own GPTQ checkpoint (``int4-gptq``): the builder turns the packed
GPTQ weights into ``MatMulNBits`` blocks as they are (its pre-quantized input).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import ConversionError, UnsupportedArchitectureError

__all__ = ["build_decoder", "builder_version"]


def builder_version() -> str:
    from importlib.metadata import version

    return f"onnxruntime-genai {version('onnxruntime-genai')}"


def build_decoder(folder: Path, out: Path, precision: str, extra: dict[str, Any], cache: Path) -> dict:
    """Build ``folder`` (an HF checkpoint, float or GPTQ) into ``out`` at ``precision``
    (fp32, fp16, int8, int4) with the builder's ``extra`` options; returns what the child reports."""
    from ...isolate import run_isolated

    return run_isolated(
        "quantkit.formats.onnx.builder:build_in_child",
        {"folder": str(folder), "out": str(out), "precision": precision, "cache": str(cache),
         "extra": {k: str(v) for k, v in sorted(extra.items())}},
        what=f"onnxruntime-genai's model builder ({precision})",
    )


def adapt_config(config) -> list[str]:
    """Give the builder the config fields it reads, from either transformers layout. Returns
    what was changed (recorded in the manifest)."""
    from ...source import rope_parameters

    changed = []
    nested = getattr(config, "rope_parameters", None)
    if isinstance(nested, dict) and nested and all(isinstance(v, dict) for v in nested.values()):
        raw = config.to_dict()
        full, local = rope_parameters(raw, "full_attention"), rope_parameters(raw, "sliding_attention")
        config.rope_theta = full["rope_theta"]
        config.rope_local_base_freq = local["rope_theta"]
        config.rope_parameters = full
        changed.append("rope_parameters per layer type -> rope_theta, rope_local_base_freq")
    return changed


def build_in_child(args: dict, reporter) -> dict:
    """The child's side of :func:`build_decoder`."""
    from .export import first_line
    from .quantize import quiet

    try:
        from onnxruntime_genai.models import builder
    except ImportError as exc:
        raise ConversionError(f"ONNX decoders need onnxruntime-genai's model builder ({exc})") from exc
    folder, out, precision, cache = args["folder"], args["out"], args["precision"], args["cache"]
    options = [f"{k}={v}" for k, v in args["extra"].items()] + ["hf_token=false"]
    with quiet():
        try:
            prepared = builder.parse_extra_options(None, folder, out, precision, "cpu", cache, options)
        except (KeyError, ValueError, OSError) as exc:
            raise UnsupportedArchitectureError(f"{folder}: the model builder cannot read it ({first_line(exc)})") from exc
        config = prepared["hf_details"]["hf_config"]
        changed = adapt_config(config)
        try:
            builder.create_model(None, folder, out, precision, "cpu", cache, **prepared)
        except NotImplementedError as exc:
            raise UnsupportedArchitectureError(
                f"{folder}: onnxruntime-genai's builder does not support it ({first_line(exc)})") from exc
        except (KeyError, ValueError, AttributeError, TypeError) as exc:
            raise ConversionError(f"{folder}: onnxruntime-genai's builder failed ({first_line(exc)})") from exc
    if not (Path(out) / "genai_config.json").is_file():
        raise ConversionError(f"{folder}: the model builder wrote no genai_config.json")
    return {"config_adapted": changed, "architecture": (getattr(config, "architectures", None) or ["?"])[0]}
