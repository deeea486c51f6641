"""HF checkpoint -> float32 ONNX, behind a small interface.

optimum-onnx is today's exporter. It pins transformers below 4.58, so the day that pin blocks a
new architecture another exporter (onnxruntime-genai's model builder, or one of our own) can be
registered here without touching the recipes, the runtime or the profiler: an exporter takes an
HF folder and an :class:`ExportSpec` and writes ``model.onnx`` (plus external data) into a folder.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ...errors import ConversionError, UnsupportedArchitectureError

__all__ = ["EXPORTERS", "ExportSpec", "Exporter", "OptimumExporter", "fix_static_shapes", "model_kind",
           "ENCODER_FILES"]

# sentence-transformers files that say how token states become one embedding (copied as is)
ENCODER_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "1_Pooling/config.json")


@dataclass(frozen=True)
class ExportSpec:
    kind: str  # "decoder" (causal LM) or "encoder" (feature extraction)
    with_past: bool  # decoders: export the KV-cache inputs and outputs
    opset: int | None  # None: the exporter's choice for the architecture


def model_kind(config: dict[str, Any]) -> str:
    """'decoder' for causal LMs, 'encoder' for models whose hidden states are the output."""
    archs = config.get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return "decoder"
    if any(a.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")) for a in archs):
        raise UnsupportedArchitectureError(
            f"ONNX export of {archs[0]} (multimodal or encoder-decoder) is not supported; "
            "quantkit exports causal LMs and encoders"
        )
    return "encoder"


class Exporter:
    name: ClassVar[str]

    def export(self, folder: Path, out: Path, spec: ExportSpec) -> Path:
        """Write the float32 model into ``out`` and return the path of its ``.onnx`` file."""
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError


class OptimumExporter(Exporter):
    name = "optimum-onnx"

    def version(self) -> str:
        from importlib.metadata import version

        return version("optimum-onnx")

    def supported_tasks(self, model_type: str) -> set[str]:
        from optimum.exporters.tasks import TasksManager

        for name in (model_type, model_type.replace("_", "-")):
            try:
                return set(TasksManager.get_supported_tasks_for_model_type(name, "onnx", library_name="transformers"))
            except (KeyError, ValueError):
                continue
        return set()

    def export(self, folder: Path, out: Path, spec: ExportSpec) -> Path:
        import json

        from optimum.exporters.onnx import main_export

        task = "feature-extraction" if spec.kind == "encoder" else (
            "text-generation-with-past" if spec.with_past else "text-generation"
        )
        model_type = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type", "?")
        if task not in self.supported_tasks(model_type):
            raise UnsupportedArchitectureError(
                f"{folder}: optimum-onnx {self.version()} does not support {task} for model_type {model_type!r}"
            )
        from .quantize import quiet

        try:
            with quiet():
                main_export(
                    str(folder), output=str(out), task=task, opset=spec.opset, device="cpu",
                    library_name="transformers", trust_remote_code=False, do_validation=False,
                )
        except (KeyError, ValueError, NotImplementedError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            if "not supported" in message or isinstance(exc, KeyError):
                raise UnsupportedArchitectureError(f"{folder}: optimum-onnx cannot export it ({message[:200]})") from exc
            raise ConversionError(f"{folder}: ONNX export failed ({message[:200]})") from exc
        model = out / "model.onnx"
        if not model.is_file():
            raise ConversionError(f"{folder}: the ONNX exporter wrote no model.onnx")
        for name in ENCODER_FILES if spec.kind == "encoder" else ():
            if (folder / name).is_file():
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / name, out / name)
        return model


EXPORTERS: dict[str, Exporter] = {OptimumExporter.name: OptimumExporter()}


def fix_static_shapes(model, seqlen: int) -> list[str]:
    """Fix batch to 1 and every sequence dimension to ``seqlen`` in place (what Ascend-style
    compilers need). Returns the input dimensions still symbolic afterwards."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

    for param in ("batch_size", "batch"):
        make_dim_param_fixed(model.graph, param, 1)
    for param in ("sequence_length", "seq_len", "past_sequence_length + sequence_length"):
        make_dim_param_fixed(model.graph, param, seqlen)
    fix_output_shapes(model)
    left = []
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                left.append(f"{value.name}:{dim.dim_param or '?'}")
    return left
