"""GGUF: HF checkpoints written by quantkit's own streaming writer, quantized by llama.cpp.

An HF source is written once to a lossless intermediate GGUF (F32, or BF16/F16 when every
source weight already is), and each requested llama.cpp type is quantized from it. A GGUF
source is re-quantized directly.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...artifact import Artifact, atomic_dir, work_dir, write_manifest
from ...errors import RecipeError
from ...progress import Progress
from ...recipe import Recipe
from ...runtimes.llamacpp import check_loads
from ...source import Source
from .. import ConvertOptions, Format, register_format
from .header import read_gguf_summary
from .quantize import QUANT_SCHEMES, quantize_gguf
from .writer import FLOAT_TYPES, tensor_count, write_float_gguf

__all__ = ["GGUFFormat", "QUANT_SCHEMES"]


def _lossless_type(source: Source) -> str:
    dtypes = source.dtypes
    if dtypes == {"BF16"}:
        return "bf16"
    if dtypes == {"F16"}:
        return "f16"
    return "f32"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@register_format
class GGUFFormat(Format):
    name = "gguf"

    def parse_recipe(self, scheme: str, options: Mapping[str, Any] | None = None) -> Recipe:
        if scheme not in QUANT_SCHEMES:
            raise RecipeError(f"unknown GGUF type {scheme!r}; known: {', '.join(QUANT_SCHEMES)}")
        return Recipe("gguf", scheme)

    def convert(
        self, source: Source, recipes: Sequence[Recipe], out_dir: Path, options: ConvertOptions
    ) -> list[Artifact]:
        progress = options.progress or Progress(False)
        out_dir.mkdir(parents=True, exist_ok=True)
        artifacts = []
        with work_dir(out_dir) as work:
            details: dict = {}
            if source.kind == "hf":
                base_type = _lossless_type(source)
                base = Path(work) / f"{source.name}-{base_type}.gguf"
                with progress.task(f"writing {base_type.upper()} GGUF", tensor_count(source)) as advance:
                    details = write_float_gguf(source, base, base_type, advance)
            else:
                base_type, base = None, source.path
                details = dict(source.config)
            for recipe in recipes:
                final = out_dir / f"{source.name}-{recipe.tag}"
                with atomic_dir(final) as tmp:
                    out = tmp / f"{source.name}-{recipe.scheme.upper()}.gguf"
                    if recipe.scheme == base_type:
                        _link_or_copy(base, out)
                    elif recipe.scheme in FLOAT_TYPES and source.kind == "hf":
                        with progress.task(f"writing {recipe.scheme.upper()} GGUF", tensor_count(source)) as advance:
                            write_float_gguf(source, out, recipe.scheme, advance)
                    else:
                        total = read_gguf_summary(base)["tensor_count"]
                        with progress.task(f"quantizing {recipe.scheme}", total) as advance:
                            quantize_gguf(base, out, recipe.scheme, threads=options.threads, advance=advance)
                    info = {**details, **read_gguf_summary(out), "intermediate": base_type}
                    if not options.verify:  # verification loads it fully; never leave a GGUF llama.cpp refuses
                        check_loads(out, vocab_only=True)
                    else:
                        provisional = Artifact(tmp, out, {"recipe": recipe.to_dict()})
                        info["verification"] = options.verify(provisional)
                    manifest = write_manifest(
                        tmp, recipe=recipe.to_dict(), source=source.to_manifest(), details=info
                    )
                artifacts.append(Artifact(final, final / out.name, manifest))
        return artifacts
