"""ONNX: causal LMs (with their KV cache) and encoders exported to ONNX and quantized for ONNX
Runtime and NPU compilers.

Schemes: ``fp32``, ``fp16``, ``int8`` (dynamic), ``int8-static`` (QDQ, calibrated), ``int4``
(``MatMulNBits`` blocks of 32; ``int4g128`` for blocks of 128; a ``-hqq`` suffix picks HQQ over
round-to-nearest). Options: ``static_shapes`` (batch 1, every sequence dimension fixed to
``static_seqlen``, no KV cache: what Ascend's ATC and similar compilers need), ``opset``, and the
calibration settings shared with GPTQ for ``int8-static``.

The source is exported once to float32 (``export.py``, behind an interface); each recipe is then
derived from that export with ONNX Runtime's quantizers (``quantize.py``).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...artifact import Artifact, atomic_dir, work_dir, write_manifest
from ...errors import InputError, RecipeError
from ...progress import Progress
from ...recipe import Recipe
from ...source import Source
from .. import ConvertOptions, Format, register_format
from ..options import CALIBRATION_OPTION_NAMES, Option, calibration_options, resolve_options

__all__ = ["OnnxFormat", "OnnxScheme", "parse_scheme", "OPTION_DEFAULTS", "MODEL_NAME"]

MODEL_NAME = "model.onnx"
_SCHEME = re.compile(r"^(fp32|fp16|int8|int8-static|int4(?:g(32|128))?(-hqq)?)$")
_SCHEME_HELP = "fp32, fp16, int8, int8-static, int4 (blocks of 32), int4g128, with -hqq for HQQ (e.g. int4g128-hqq)"


def _exporters() -> list[str]:
    from .export import EXPORTERS

    return list(EXPORTERS)


OPTIONS: dict[str, Option] = {
    "static_shapes": Option(False, "bool"),
    "static_seqlen": Option(512, "int", minimum=8),
    "opset": Option(None, "int", minimum=11),  # default: the exporter's choice for the architecture
    "exporter": Option("optimum-onnx", "choice", choices=_exporters),
    # int8-static calibration (the same text mix as GPTQ, disjoint from the evaluation text)
    **calibration_options(samples=16, seqlen=256),
}
OPTION_DEFAULTS: dict[str, Any] = {key: option.default for key, option in OPTIONS.items()}


@dataclass(frozen=True)
class OnnxScheme:
    dtype: str  # fp32, fp16, int8, int8-static, int4
    block_size: int | None = None
    algo: str | None = None  # int4: rtn or hqq


def parse_scheme(scheme: str) -> OnnxScheme:
    match = _SCHEME.match(scheme)
    if not match:
        raise RecipeError(f"unknown ONNX scheme {scheme!r}; expected {_SCHEME_HELP}")
    if scheme.startswith("int4"):
        return OnnxScheme("int4", int(match[2] or 32), "hqq" if match[3] else "rtn")
    return OnnxScheme(scheme)


def _recipe_options(scheme: OnnxScheme, options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    values = resolve_options("ONNX", OPTIONS, options)
    if scheme.dtype != "int8-static":
        values = {k: v for k, v in values.items() if k not in CALIBRATION_OPTION_NAMES}
    elif values["static_shapes"]:
        values["calib_seqlen"] = values["static_seqlen"]  # a static model takes only that length
    if not values["static_shapes"]:
        del values["static_seqlen"]
    return tuple(sorted(values.items()))


def _calibration_feeds(source: Source, model_path: Path, opts: dict[str, Any], kind: str) -> tuple[list[dict], dict]:
    """Input dicts for ``int8-static`` calibration: token windows from the calibration mix (an
    encoder's framed by its special tokens, [CLS] ... [SEP], as it sees text in use)."""
    from transformers import AutoTokenizer

    from ...calibration import calibration_texts, calibration_windows
    from .graph import OnnxSessionInputs

    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=False)
    windows, counts = calibration_windows(
        tokenizer, calibration_texts(opts["calib"]), n_samples=opts["calib_samples"],
        seqlen=opts["calib_seqlen"], seed=opts["seed"],
    )
    if kind == "encoder":
        extra = tokenizer.num_special_tokens_to_add()
        windows = [tokenizer.build_inputs_with_special_tokens(w[: len(w) - extra]) for w in windows]
    inputs = OnnxSessionInputs.from_model_file(model_path)
    feeds = [inputs.feeds(window) for window in windows]
    details = {"samples": len(windows), "seqlen": opts["calib_seqlen"], "seed": opts["seed"],
               "windows_per_domain": counts, "texts": opts["calib"] or "default calibration mix"}
    return feeds, details


@register_format
class OnnxFormat(Format):
    name = "onnx"

    def option_names(self) -> frozenset[str]:
        return frozenset(OPTION_DEFAULTS)

    def parse_recipe(self, scheme: str, options: Mapping[str, Any] | None = None) -> Recipe:
        parsed = parse_scheme(scheme)
        return Recipe("onnx", scheme, _recipe_options(parsed, options or {}))

    def convert(
        self, source: Source, recipes: Sequence[Recipe], out_dir: Path, options: ConvertOptions
    ) -> list[Artifact]:
        from .export import EXPORTERS, ExportSpec, model_kind

        if source.kind != "hf":
            raise InputError(f"{source.id}: ONNX export needs an HF checkpoint folder, not a {source.kind} file")
        if source.weight_format == "pickle":
            raise InputError(f"{source.id}: ONNX export loads safetensors weights only")
        kind = model_kind(source.config)
        progress = options.progress or Progress(False)
        artifacts = []
        exports: dict[tuple, Path] = {}  # one float32 export per (exporter, shapes, opset)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with work_dir(out_dir, "quantkit-onnx") as work:
            for recipe in recipes:
                opts = {**OPTION_DEFAULTS, **dict(recipe.options)}
                static = opts["static_shapes"]
                key = (opts["exporter"], static, opts.get("static_seqlen"), opts["opset"])
                if key not in exports:
                    spec = ExportSpec(kind, with_past=kind == "decoder" and not static, opset=opts["opset"])
                    folder = Path(work) / f"export-{len(exports)}"
                    with progress.task(f"exporting {source.name} to ONNX ({'static' if static else 'dynamic'} shapes)"):
                        model = EXPORTERS[opts["exporter"]].export(source.path, folder, spec)
                        if static:
                            _make_static(model, opts["static_seqlen"])
                    exports[key] = model
                artifacts.append(self._derive(source, recipe, exports[key], kind, out_dir, options, progress))
        return artifacts

    def _derive(self, source, recipe, fp32_model: Path, kind, out_dir, options, progress) -> Artifact:
        from . import quantize
        from .export import EXPORTERS
        from .graph import summarize_model

        scheme = parse_scheme(recipe.scheme)
        opts = {**OPTION_DEFAULTS, **dict(recipe.options)}
        final = Path(out_dir) / f"{source.name}-onnx-{recipe.tag}{'-static' if opts['static_shapes'] else ''}"
        info: dict[str, Any] = {"kind": kind, "exporter": {"name": opts["exporter"],
                                                          "version": EXPORTERS[opts["exporter"]].version()}}
        with atomic_dir(final) as tmp:
            for extra in sorted(fp32_model.parent.rglob("*")):  # configs, tokenizer, pooling files
                if extra.is_file() and not extra.name.startswith(MODEL_NAME):
                    (tmp / extra.relative_to(fp32_model.parent)).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(extra, tmp / extra.relative_to(fp32_model.parent))
            target = tmp / MODEL_NAME
            with progress.task(f"onnx:{recipe.scheme}: quantizing"):
                if scheme.dtype == "fp32":
                    quantize.save_model(_load(fp32_model), target)
                elif scheme.dtype == "fp16":
                    quantize.to_fp16(fp32_model, target)
                elif scheme.dtype == "int8":
                    info["quantization"] = quantize.int8_dynamic(fp32_model, target)
                elif scheme.dtype == "int8-static":
                    feeds, info["calibration"] = _calibration_feeds(source, fp32_model, opts, kind)
                    info["calibration"].update(quantize.int8_static(fp32_model, target, feeds))
                else:
                    quantize.int4_weight_only(fp32_model, target, scheme.block_size, scheme.algo)
            for written in tmp.glob(MODEL_NAME + "*"):  # ONNX Runtime writes external data as 0600
                written.chmod(0o644)
            info["graph"] = summarize_model(target)
            if options.verify:
                provisional = Artifact(tmp, target, {"recipe": recipe.to_dict(), "main_file": MODEL_NAME})
                info["verification"] = options.verify(provisional)
            manifest = write_manifest(
                tmp, recipe=recipe.to_dict(), source=source.to_manifest(), details=info, main_file=MODEL_NAME
            )
        return Artifact(final, final / MODEL_NAME, manifest)


def _load(path: Path):
    import onnx

    return onnx.load(str(path))


def _make_static(model_path: Path, seqlen: int) -> None:
    from .export import fix_static_shapes
    from .quantize import save_model

    model = _load(model_path)
    left = fix_static_shapes(model, seqlen)
    if left:
        raise InputError(f"cannot make every input static: {', '.join(left)} stay symbolic")
    for f in model_path.parent.glob(MODEL_NAME + "*"):
        f.unlink()
    save_model(model, model_path)
