"""GPTQ: weight-only integer quantization (Frantar et al., 2022) of HF checkpoints, written in the
auto-gptq / GPTQModel "v1" layout that transformers, vLLM and GPTQModel load.

Schemes are ``w{bits}g{group_size}`` (bits 2, 3, 4 or 8; group 32, 64, 128 or -1 for one group
per row), e.g. ``gptq:w4g128``; the suffix ``-rtn`` rounds to nearest on the same grid without
calibration (``gptq:w4g128-rtn``), a baseline that shows what GPTQ's error compensation buys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...artifact import Artifact, atomic_dir, write_manifest
from ...errors import InputError, RecipeError, UnsupportedArchitectureError
from ...progress import Progress
from ...recipe import Recipe
from ...source import Source
from .. import ConvertOptions, Format, register_format
from ..options import CALIBRATION_OPTION_NAMES, Option, calibration_options, resolve_options
from .arch import ARCHITECTURES

# torch, transformers and the modules that need them are imported where used: every quantkit
# command loads the format registry, and most never run GPTQ

__all__ = ["GPTQFormat", "GPTQScheme", "parse_scheme", "OPTION_DEFAULTS", "MAX_SHARD_BYTES", "quantize_source", "write_quantized"]

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, -1)
_SCHEME = re.compile(r"^w(\d+)g(-?\d+)(-rtn)?$")
_SCHEME_HELP = "w{bits}g{group}[-rtn] with bits in 2, 3, 4, 8 and group in 32, 64, 128, -1 (e.g. w4g128, w8g-1, w4g128-rtn)"
# weights files above this size are split into shards (module attribute so tests can lower it)
MAX_SHARD_BYTES = 2 * 10**9

# every option; the effective values of all of them go into Recipe.options
OPTIONS: dict[str, Option] = {
    "damp": Option(0.01, "fraction", expected="a fraction of the mean Hessian diagonal between 0 and 1 (e.g. 0.01)"),
    "sym": Option(True, "bool"),
    "act_order": Option(False, "bool"),
    "static_groups": Option(False, "bool"),
    **calibration_options(samples=128, seqlen=512),
}
OPTION_DEFAULTS: dict[str, Any] = {key: option.default for key, option in OPTIONS.items()}
# options that only matter when codes are chosen with calibration data (ignored by -rtn)
_CALIBRATION_OPTIONS = ("damp", "act_order", "static_groups", *CALIBRATION_OPTION_NAMES)


@dataclass(frozen=True)
class GPTQScheme:
    bits: int
    group_size: int
    rtn: bool


def parse_scheme(scheme: str) -> GPTQScheme:
    match = _SCHEME.match(scheme)
    if not match:
        raise RecipeError(f"unknown GPTQ scheme {scheme!r}; expected {_SCHEME_HELP}")
    bits, group = int(match[1]), int(match[2])
    if bits not in BITS or group not in GROUP_SIZES:
        raise RecipeError(f"unsupported GPTQ scheme {scheme!r}; expected {_SCHEME_HELP}")
    return GPTQScheme(bits, group, bool(match[3]))


def _recipe_options(scheme: GPTQScheme, options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    values = resolve_options("GPTQ", OPTIONS, options)
    if scheme.rtn:  # round-to-nearest uses no calibration data: record only what shapes its grid
        values = {k: v for k, v in values.items() if k not in _CALIBRATION_OPTIONS}
    return tuple(sorted(values.items()))


def _architecture(source: Source):
    config = source.config
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(f"{source.id}: GPTQ does not support model_type {model_type!r}; supported: {known}")
    return ARCHITECTURES[model_type]


def quantize_source(
    source: Source, recipe: Recipe, stream, on_block, progress: Progress | None = None
) -> tuple[Any, dict[str, Any]]:
    """Quantize ``source`` block by block, streamed from its checkpoint: (result, calibration
    details). ``on_block(step, codes)`` receives each block as soon as its codes exist."""
    import torch

    from ...calibration import source_windows
    from .algorithm import QuantGrid
    from .sequential import GPTQSettings, pick_device, quantize_blocks

    progress = progress or Progress(False)
    scheme = parse_scheme(recipe.scheme)
    spec = _architecture(source)
    opts = {**OPTION_DEFAULTS, **dict(recipe.options)}  # a Recipe built by hand may omit options
    grid = QuantGrid(scheme.bits, scheme.group_size, opts["sym"])
    torch.manual_seed(0)
    if scheme.rtn:
        result = quantize_blocks(stream, spec, GPTQSettings(grid, method="rtn"), on_block=on_block, task=progress.task)
        return result, {"method": "rtn"}
    settings = GPTQSettings(grid, "gptq", opts["damp"], opts["act_order"], opts["static_groups"])
    _, windows, calibration = source_windows(source.path, opts)
    result = quantize_blocks(stream, spec, settings, windows, on_block=on_block, task=progress.task)
    return result, {"method": "gptq", **calibration, "device": pick_device().type}


def write_quantized(folder: Path, source: Source, recipe: Recipe, progress: Progress | None = None) -> tuple[Any, dict, list[str]]:
    """Quantize ``source`` and stream its checkpoint into ``folder``: the embedding first, each
    block as it is quantized, the final norm and an untied head last (the order of the model's
    state dict, as ``save_pretrained`` writes it). Returns (result, calibration, weight files)."""
    from ...runtimes.stream import LayerStream
    from .sequential import pick_device
    from .writer import SafetensorsShardWriter, write_tensors

    bits = parse_scheme(recipe.scheme).bits
    stream = LayerStream(source, device=pick_device())
    names = stream.parameter_names()
    blocks = stream.layout.blocks + "."
    first = next(i for i, n in enumerate(names) if n.startswith(blocks))
    last = max(i for i, n in enumerate(names) if n.startswith(blocks))
    writer = SafetensorsShardWriter(folder, MAX_SHARD_BYTES)
    with source.open_tensors() as reader:
        def from_checkpoint(selected):
            import torch

            return ((n, torch.from_numpy(reader.get(n))) for n in selected)

        write_tensors(writer, from_checkpoint(names[:first]), {}, bits)

        def on_block(step, codes):
            prefix = f"{blocks}{step.index}."
            # under transformers 5's module names (Mixtral's router as mlp.gate, as GPTQModel
            # expects); a routed expert's stacked parameters are written as the packed Linears below
            tensors = [(prefix + key, value) for key, value in step.block.state_dict().items()
                       if not key.endswith(("experts.gate_up_proj", "experts.down_proj"))]
            present = {name for name, _ in tensors}
            tensors += [(f"{name}.weight", None) for name in codes if f"{name}.weight" not in present]
            write_tensors(writer, tensors, codes, bits)

        result, calibration = quantize_source(source, recipe, stream, on_block, progress)
        write_tensors(writer, from_checkpoint(names[last + 1 :]), {}, bits)
    return result, calibration, writer.close()


def _details(result, calibration: dict) -> dict[str, Any]:
    # no timings here: the manifest is part of the artifact, and the same input and recipe must
    # give the same bytes (the convert result reports the elapsed time)
    return {
        "calibration": calibration,
        "layers": result.layers,
        "quantized_linears": result.quantized_linears,
    }


@register_format
class GPTQFormat(Format):
    name = "gptq"

    def option_names(self) -> frozenset[str]:
        return frozenset(OPTION_DEFAULTS)

    def parse_recipe(self, scheme: str, options: Mapping[str, Any] | None = None) -> Recipe:
        parsed = parse_scheme(scheme)
        return Recipe("gptq", scheme, _recipe_options(parsed, options or {}))

    def convert(
        self, source: Source, recipes: Sequence[Recipe], out_dir: Path, options: ConvertOptions
    ) -> list[Artifact]:
        if source.kind != "hf":
            raise InputError(f"{source.id}: GPTQ quantizes an HF checkpoint folder, not a {source.kind} file")
        _architecture(source)
        import torch

        progress = options.progress or Progress(False)
        threads = torch.get_num_threads()
        if options.threads:
            torch.set_num_threads(options.threads)
        try:
            return [self._convert_one(source, recipe, out_dir, options, progress) for recipe in recipes]
        finally:
            torch.set_num_threads(threads)

    def _convert_one(self, source: Source, recipe: Recipe, out_dir: Path, options: ConvertOptions, progress: Progress) -> Artifact:
        from .writer import copy_tokenizer_files, quantization_config, write_configs

        scheme = parse_scheme(recipe.scheme)
        opts = {**OPTION_DEFAULTS, **dict(recipe.options)}
        qconfig = quantization_config(
            bits=scheme.bits,
            group_size=scheme.group_size,
            desc_act=opts["act_order"] and not scheme.rtn,
            sym=opts["sym"],
            static_groups=opts["static_groups"] and not scheme.rtn,
            damp=opts["damp"],
            true_sequential=not scheme.rtn,
        )
        final = Path(out_dir) / f"{source.name}-gptq-{recipe.tag}"
        with atomic_dir(final) as tmp:
            result, calibration, weight_files = write_quantized(tmp, source, recipe, progress)
            write_configs(tmp, source.config, qconfig)
            tokenizer_files = copy_tokenizer_files(source.path, tmp)
            info = _details(result, calibration)
            info.update(weight_files=weight_files, tokenizer_files=tokenizer_files, quantization_config=qconfig)
            if options.verify:
                provisional = Artifact(tmp, tmp / "config.json", {"recipe": recipe.to_dict(), "main_file": "config.json"})
                info["verification"] = options.verify(provisional)
            manifest = write_manifest(
                tmp, recipe=recipe.to_dict(), source=source.to_manifest(), details=info, main_file="config.json"
            )
        return Artifact(final, final / "config.json", manifest)
