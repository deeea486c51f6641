"""bitsandbytes: the in-memory quantization users already know, as a reference point.

A bnb "artifact" holds no weights: ``bnb_config.json`` names the source checkpoint and the
``BitsAndBytesConfig`` that transformers applies when loading it (bitsandbytes >= 0.46 runs
LLM.int8() and NF4 on the CPU). The profiler can then put GGUF, GPTQ and ONNX artifacts next to
the quantization a transformers user would otherwise reach for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..artifact import Artifact, atomic_dir, write_manifest
from ..errors import InputError, RecipeError, UnsupportedArchitectureError
from ..recipe import Recipe
from ..source import Source, experts_of
from . import ConvertOptions, Format, register_format

__all__ = ["BnbFormat", "BNB_SCHEMES", "CONFIG_NAME"]

CONFIG_NAME = "bnb_config.json"

# recipe scheme -> BitsAndBytesConfig arguments (dtypes as strings so the config is JSON)
BNB_SCHEMES: dict[str, dict[str, Any]] = {
    "int8": {"load_in_8bit": True},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": "float32"},
}


def _bnb_version() -> str:
    try:
        import bitsandbytes
    except ImportError as exc:  # declared as a dependency; a broken install still gets one line
        raise InputError("bnb recipes need the bitsandbytes package (pip install bitsandbytes)") from exc
    return bitsandbytes.__version__


@register_format
class BnbFormat(Format):
    name = "bnb"

    def parse_recipe(self, scheme: str, options: Mapping[str, Any] | None = None) -> Recipe:
        if scheme not in BNB_SCHEMES:
            raise RecipeError(f"unknown bitsandbytes scheme {scheme!r}; known: {', '.join(BNB_SCHEMES)}")
        return Recipe("bnb", scheme)

    def convert(
        self, source: Source, recipes: Sequence[Recipe], out_dir: Path, options: ConvertOptions
    ) -> list[Artifact]:
        if source.kind != "hf":
            raise InputError(f"{source.id}: bitsandbytes quantizes an HF checkpoint, not a {source.kind} file")
        if experts_of(source.config):  # transformers' bitsandbytes path swaps Linears: stacked experts would stay float
            raise UnsupportedArchitectureError(f"{source.id}: bitsandbytes does not quantize the stacked experts of a mixture "
                                               f"of experts ({source.config.get('model_type')}); gguf:* and gptq:* convert it")
        version = _bnb_version()
        out_dir.mkdir(parents=True, exist_ok=True)
        artifacts = []
        for recipe in recipes:
            final = out_dir / f"{source.name}-bnb-{recipe.tag}"
            with atomic_dir(final) as tmp:
                config = {
                    "source": source.to_manifest(),
                    "quantization_config": BNB_SCHEMES[recipe.scheme],
                    "bitsandbytes": version,
                }
                (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
                info: dict[str, Any] = {"note": "weights are quantized by bitsandbytes when the source is loaded"}
                if options.verify:
                    info["verification"] = options.verify(Artifact(tmp, tmp / CONFIG_NAME, {"recipe": recipe.to_dict()}))
                manifest = write_manifest(
                    tmp, recipe=recipe.to_dict(), source=source.to_manifest(), details=info, main_file=CONFIG_NAME
                )
            artifacts.append(Artifact(final, final / CONFIG_NAME, manifest))
        return artifacts
