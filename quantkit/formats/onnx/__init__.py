"""ONNX: causal LMs and encoders for ONNX Runtime, onnxruntime-genai and NPU compilers.

Decoders (causal LMs) with a KV cache are built by onnxruntime-genai's model builder
(``builder.py``): ``fp32``, ``fp16``, ``int8`` and ``int4`` weights (``MatMulNBits``, the tied
embedding as ``GatherBlockQuantized``), each folder with the ``genai_config.json`` that
``onnxruntime_genai`` runs. ``int4`` takes a block size (``int4g16`` ... ``int4g256``, default 32)
and an algorithm suffix: none for round to nearest, ``-kquant`` for the builder's k-quant search,
``-gptq`` for quantkit's own GPTQ checkpoint turned into ``MatMulNBits`` as it is (default blocks
of 128, calibrated on the same text mix as ``gptq:``). Round to nearest in blocks of 32, 64 or 128
is quantkit's streamed ``gptq:w4g{block}-rtn`` checkpoint (asymmetric: min-max with a zero point
per block, like the builder's own quantizer) handed to the builder the same way, so
neither int4 path loads the float model (the builder's float path holds it several times over);
blocks of 16 and 256, which a GPTQ checkpoint does not take, and ``-kquant`` go through the
builder's float path. ``accuracy_level`` (0-4) is the
``MatMulNBits`` compute type (4: int8 activations, the builder's CPU default). ``head`` sets the
output head (and a tied embedding): ``same`` bits as the recipe, ``int8`` or ``float``; ``-gptq``
defaults to ``int8`` (GPTQ never quantizes the head; on Gemma 3 a 4-bit round-to-nearest head
costs more than GPTQ saves), the rest to ``same``. With ``head=float`` and ``accuracy_level=1``,
``int4-gptq`` computes what the GPTQ checkpoint computes.

Encoders, decoders with ``static_shapes`` (batch 1, every sequence dimension fixed to
``static_seqlen``, no KV cache: what Ascend's ATC and similar compilers need) and ``int8-static``
(QDQ, calibrated activation ranges) are exported once to float32 by ``torch.onnx``
(``export.py``) and each recipe derived from that export with ONNX Runtime's quantizers
(``quantize.py``); there ``int4`` may use ``-hqq``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...artifact import Artifact, atomic_dir, work_dir, write_manifest
from ...errors import InputError, RecipeError, UnsupportedArchitectureError
from ...progress import Progress
from ...recipe import Recipe
from ...source import Source, experts_of
from .. import ConvertOptions, Format, register_format
from ..options import CALIBRATION_OPTION_NAMES, Option, calibration_options, resolve_options

__all__ = ["OnnxFormat", "OnnxScheme", "parse_scheme", "checkpoint_recipe", "OPTION_DEFAULTS", "MODEL_NAME", "GENAI_CONFIG"]

MODEL_NAME = "model.onnx"
GENAI_CONFIG = "genai_config.json"
_SCHEME = re.compile(r"^(fp32|fp16|int8|int8-static|int4(?:g(16|32|64|128|256))?(?:-(kquant|gptq|hqq))?)$")
PREQUANTIZED_BLOCKS = (32, 64, 128)  # the group sizes of a GPTQ checkpoint the builder reads
_SCHEME_HELP = ("fp32, fp16, int8, int8-static, int4 with an optional block size (int4g16 ... int4g256) and "
                "algorithm (-kquant, -gptq; -hqq for encoders and static shapes), e.g. int4g128-gptq")

OPTIONS: dict[str, Option] = {
    "static_shapes": Option(False, "bool"),
    "static_seqlen": Option(512, "int", minimum=8),
    "opset": Option(None, "int", minimum=11),  # torch.onnx exports: default 18
    "accuracy_level": Option(None, "int", minimum=0),  # MatMulNBits compute type, 0-4
    # int4/int8 decoders: the output head (and a tied embedding) in the recipe's bits ("same"), in
    # int8, or float (as GPTQ leaves it); default: int8 for -gptq, else same
    "head": Option(None, "choice", choices=lambda: ("same", "int8", "float")),
    # fp32 encoders (dynamic shapes): ONNX Runtime's fused operators (com.microsoft Attention,
    # SkipLayerNormalization, BiasGelu); off for a runtime other than ONNX Runtime
    "ort_fusions": Option(True, "bool"),
    # calibration of int8-static and int4-gptq (the same text mix as GPTQ, disjoint from the evaluation text)
    **calibration_options(samples=16, seqlen=256),
}
OPTION_DEFAULTS: dict[str, Any] = {key: option.default for key, option in OPTIONS.items()}


@dataclass(frozen=True)
class OnnxScheme:
    dtype: str  # fp32, fp16, int8, int8-static, int4
    block_size: int | None = None
    algo: str | None = None  # int4: rtn, kquant, gptq or hqq

    @property
    def calibrated(self) -> bool:
        return self.dtype == "int8-static" or self.algo == "gptq"


def checkpoint_recipe(recipe: Recipe, config: Mapping[str, Any]) -> Recipe | None:
    """The ``gptq:`` recipe of quantkit's own streamed checkpoint that the builder takes instead
    of the float weights for the ONNX ``recipe`` of a model with ``config``, or None (the float
    path): ``-gptq`` always (with the recipe's calibration); round to nearest in the blocks a GPTQ
    checkpoint takes, for the architectures quantkit's GPTQ knows, as min-max with a zero point per
    block like the builder's own quantizer. Only decoders with a KV cache go through the builder."""
    from .. import get_format
    from ..gptq.arch import ARCHITECTURES
    from .export import model_kind

    scheme = parse_scheme(recipe.scheme)
    if recipe.option("static_shapes", False) or model_kind(config) != "decoder":
        return None
    gptq = get_format("gptq")
    if scheme.algo == "gptq":
        return gptq.parse_recipe(f"w4g{scheme.block_size}", {k: recipe.option(k) for k in CALIBRATION_OPTION_NAMES})
    if scheme.algo == "rtn" and scheme.block_size in PREQUANTIZED_BLOCKS and config.get("model_type") in ARCHITECTURES:
        return gptq.parse_recipe(f"w4g{scheme.block_size}-rtn", {"sym": False})
    return None


def parse_scheme(scheme: str) -> OnnxScheme:
    match = _SCHEME.match(scheme)
    if not match:
        raise RecipeError(f"unknown ONNX scheme {scheme!r}; expected {_SCHEME_HELP}")
    if scheme.startswith("int4"):
        algo = match[3] or "rtn"
        if algo == "gptq" and match[2] and int(match[2]) not in (32, 64, 128):
            raise RecipeError(f"onnx:{scheme}: GPTQ groups are 32, 64 or 128 weights")
        return OnnxScheme("int4", int(match[2] or (128 if algo == "gptq" else 32)), algo)
    return OnnxScheme(scheme)


def _recipe_options(scheme: OnnxScheme, options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    values = resolve_options("ONNX", OPTIONS, options)
    if values["accuracy_level"] is not None and values["accuracy_level"] > 4:
        raise RecipeError(f"ONNX option accuracy_level={values['accuracy_level']}: expected 0 to 4")
    if scheme.dtype not in ("fp32", "int8") or values["static_shapes"]:
        del values["ort_fusions"]
    if scheme.dtype not in ("int4", "int8"):
        del values["accuracy_level"], values["head"]
    elif values["head"] is None:
        values["head"] = "int8" if scheme.algo == "gptq" else "same"
    if not scheme.calibrated:
        values = {k: v for k, v in values.items() if k not in CALIBRATION_OPTION_NAMES}
    elif values["static_shapes"] and scheme.dtype == "int8-static":
        values["calib_seqlen"] = values["static_seqlen"]  # a static model takes only that length
    if not values["static_shapes"]:
        del values["static_seqlen"]
    if scheme.algo in ("kquant", "gptq") and values["static_shapes"]:
        raise RecipeError(f"onnx:int4-{scheme.algo} is built by onnxruntime-genai's builder, which makes no static shapes")
    return tuple(sorted(values.items()))


def _calibration_feeds(source: Source, model_path: Path, opts: dict[str, Any], kind: str) -> tuple[list[dict], dict]:
    """Input dicts for ``int8-static`` calibration: token windows from the calibration mix (an
    encoder's framed by its special tokens, [CLS] ... [SEP], as it sees text in use)."""
    from ...calibration import source_windows
    from .graph import OnnxSessionInputs

    tokenizer, windows, details = source_windows(source.path, opts)
    if kind == "encoder":
        prefix, suffix = _special_frame(tokenizer)
        keep = len(prefix) + len(suffix)
        windows = [prefix + w[: len(w) - keep] + suffix for w in windows]
    inputs = OnnxSessionInputs.from_model_file(model_path)
    feeds = [inputs.feeds(window) for window in windows]
    return feeds, details


def _special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS] / [SEP])."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    framed = tokenizer("x")["input_ids"]
    for i in range(len(framed) - len(plain) + 1):
        if framed[i : i + len(plain)] == plain:
            return framed[:i], framed[i + len(plain):]
    return [], []


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
        from .export import ExportSpec, TorchExporter, model_kind

        if source.kind != "hf":
            raise InputError(f"{source.id}: ONNX export needs an HF checkpoint folder, not a {source.kind} file")
        if source.weight_format == "pickle":
            raise InputError(f"{source.id}: ONNX export loads safetensors weights only")
        if experts_of(source.config):  # before any work: onnxruntime-genai's builder has no such models
            raise UnsupportedArchitectureError(f"{source.id}: ONNX does not support mixtures of experts "
                                               f"({source.config.get('model_type')}); gguf:* and gptq:* convert it")
        kind = model_kind(source.config)
        progress = options.progress or Progress(False)
        artifacts = []
        exports: dict[tuple, Path] = {}  # one float32 torch.onnx export per (shapes, opset)
        fusions: dict[Path, dict[str, int]] = {}  # the fused copy of an export, made once
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with work_dir(out_dir, "quantkit-onnx") as work:
            for recipe in recipes:
                scheme = parse_scheme(recipe.scheme)
                opts = {**OPTION_DEFAULTS, **dict(recipe.options)}
                static = opts["static_shapes"]
                if kind == "decoder" and not static and scheme.dtype != "int8-static":
                    if scheme.algo == "hqq":
                        raise RecipeError("onnx:int4...-hqq is for encoders and static shapes; decoders take -kquant or -gptq")
                    artifacts.append(self._build(source, recipe, scheme, opts, Path(work), out_dir, options, progress))
                    continue
                if scheme.algo in ("kquant", "gptq"):
                    raise RecipeError(f"onnx:{recipe.scheme} is for decoders with a KV cache (onnxruntime-genai's builder); "
                                      "this one is exported by torch.onnx: use int4 or int4-hqq")
                key = (static, opts.get("static_seqlen"), opts["opset"])
                if key not in exports:
                    spec = ExportSpec(kind, opts.get("static_seqlen") if static else None, opts["opset"])
                    folder = Path(work) / f"export-{len(exports)}"
                    with progress.task(f"exporting {source.name} to ONNX with torch.onnx ({'static' if static else 'dynamic'} shapes)"):
                        exports[key] = TorchExporter().export(source.path, folder, spec)
                artifacts.append(self._derive(source, recipe, exports[key], kind, out_dir, options, progress, fusions))
        return artifacts

    def _build(self, source, recipe, scheme: OnnxScheme, opts, work: Path, out_dir, options, progress) -> Artifact:
        """A decoder with a KV cache, built by onnxruntime-genai's model builder."""
        from .builder import build_decoder, builder_version
        from .export import copy_model_files

        config = source.config
        if scheme.dtype == "fp16" and ("sliding_attention" in (config.get("layer_types") or [])
                                       or (config.get("use_sliding_window") and config.get("sliding_window"))):
            raise RecipeError(
                f"{source.id}: onnx:fp16 with a KV cache: onnxruntime-genai's CPU float16 graph ignores the sliding "
                "window once a prompt is longer than it (the logits go wrong); use fp32, int8 or int4, or --static-shapes"
            )
        final = Path(out_dir) / f"{source.name}-onnx-{recipe.tag}"
        info: dict[str, Any] = {"kind": "decoder", "exporter": {"name": "onnxruntime-genai model builder",
                                                               "version": builder_version()}}
        model_dir = source.path
        checkpoint = checkpoint_recipe(recipe, config)
        if checkpoint is not None:
            model_dir, info["gptq"] = self._gptq_checkpoint(source, checkpoint, work, options, progress)
        extra: dict[str, Any] = {}
        if scheme.dtype in ("int4", "int8"):
            extra["block_size"] = scheme.block_size or 32
            if opts.get("accuracy_level") is not None:
                extra["accuracy_level"] = opts["accuracy_level"]
            if scheme.algo == "kquant":
                extra["algo_config"] = "k_quant"
            if opts.get("head") == "float":
                extra["nodes_to_exclude"] = "/lm_head/MatMul"
            elif opts.get("head") == "int8" and scheme.dtype == "int4":
                # the builder's mixed precision breaks a tied head (its GatherBlockQuantized names a
                # weight it never writes): the embedding then stays a separate float table
                extra["matmul_mixed_precision"] = "last_matmul:int8"
                extra["shared_embeddings"] = "false"
        info["builder_options"] = {"precision": scheme.dtype, "execution_provider": "cpu", **extra}
        with atomic_dir(final) as tmp:
            with progress.task(f"onnx:{recipe.scheme}: building with onnxruntime-genai's model builder"):
                info["builder"] = build_decoder(model_dir, tmp, scheme.dtype, extra, work / "builder-cache")
            copy_model_files(source.path, tmp)  # the source's own tokenizer and config, as verified
            manifest = _finish(tmp, source, recipe, info, options)
        return Artifact(final, final / MODEL_NAME, manifest)

    def _gptq_checkpoint(self, source, recipe: Recipe, work: Path, options, progress) -> tuple[Path, dict]:
        """quantkit's GPTQ checkpoint of ``source`` (``recipe``, from :func:`checkpoint_recipe`),
        streamed block by block, for the builder to take as pre-quantized input."""
        from .. import get_format

        sub = ConvertOptions(threads=options.threads, progress=progress, verify=None)
        [artifact] = get_format("gptq").convert(source, [recipe], work / "gptq", sub)
        info = {"recipe": recipe.to_dict()}
        if "calibration" in artifact.manifest.get("details", {}):
            info["calibration"] = artifact.manifest["details"]["calibration"]
        return artifact.path, info

    def _derive(self, source, recipe, fp32_model: Path, kind, out_dir, options, progress, fusions: dict[Path, dict[str, int]]) -> Artifact:
        from . import quantize
        from .export import TorchExporter, copy_model_files

        scheme = parse_scheme(recipe.scheme)
        opts = {**OPTION_DEFAULTS, **dict(recipe.options)}
        final = Path(out_dir) / f"{source.name}-onnx-{recipe.tag}{'-static' if opts['static_shapes'] else ''}"
        info: dict[str, Any] = {"kind": kind, "exporter": {"name": TorchExporter.name, "version": TorchExporter().version()}}
        if kind == "encoder" and not opts["static_shapes"] and scheme.dtype in ("fp32", "int8") and opts["ort_fusions"]:
            # for ONNX Runtime on a CPU or GPU: its fused attention (MiniLM: 17 % less time per
            # call in fp32); int8 quantizes the fused graph (QAttention: MiniLM 22 % faster than
            # int8 on the standard operators). NPU compilers (static shapes, int8-static QDQ) and
            # fp16/int4 keep the standard operators
            fused = fp32_model.with_name("fused.onnx")
            if fused not in fusions:
                with progress.task("fusing attention, skip-LayerNorm and bias-GELU for ONNX Runtime"):
                    fusions[fused] = quantize.fuse_for_ort(fp32_model, fused)
            fp32_model, info["ort_fusions"] = fused, fusions[fused]
        with atomic_dir(final) as tmp:
            copy_model_files(fp32_model.parent, tmp)  # configs, tokenizer, pooling files
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
                    level = opts.get("accuracy_level")
                    quantize.int4_weight_only(fp32_model, target, scheme.block_size, scheme.algo, 4 if level is None else level)
            manifest = _finish(tmp, source, recipe, info, options)
        return Artifact(final, final / MODEL_NAME, manifest)


def _finish(tmp: Path, source: Source, recipe: Recipe, info: dict[str, Any], options: ConvertOptions) -> dict:
    """The last steps of every ONNX artifact in its unfinished folder: readable files, the graph
    summary, verification, the manifest."""
    from .graph import summarize_model

    for written in tmp.rglob("*"):  # ONNX Runtime and the builder write some files as 0600
        if written.is_file():
            written.chmod(0o644)
    target = tmp / MODEL_NAME
    info["graph"] = summarize_model(target)
    if options.verify:
        provisional = Artifact(tmp, target, {"recipe": recipe.to_dict(), "main_file": MODEL_NAME})
        info["verification"] = options.verify(provisional)
    return write_manifest(tmp, recipe=recipe.to_dict(), source=source.to_manifest(), details=info, main_file=MODEL_NAME)


def _load(path: Path):
    import onnx

    return onnx.load(str(path))
