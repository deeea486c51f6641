"""HF checkpoint -> float32 ONNX with ``torch.onnx`` (the dynamo exporter), for what
onnxruntime-genai's builder does not make: encoders, and decoders without a KV cache (static
shapes for NPU compilers, and the float graph that static int8 quantization calibrates).

An exporter takes an HF folder and an :class:`ExportSpec` and writes ``model.onnx`` (plus external
data) into a folder; the recipes derive their quantized forms from it (``quantize.py``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ...errors import ConversionError, UnsupportedArchitectureError

__all__ = ["ExportSpec", "Exporter", "TorchExporter", "model_kind", "copy_model_files", "first_line",
           "ENCODER_FILES", "DEFAULT_OPSET"]

# sentence-transformers files that say how token states become one embedding (copied as is)
ENCODER_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "1_Pooling/config.json")
# the opset the dynamo exporter writes natively (older ones go through its version converter)
DEFAULT_OPSET = 18


@dataclass(frozen=True)
class ExportSpec:
    kind: str  # "decoder" (causal LM, logits out) or "encoder" (last_hidden_state out)
    static_seqlen: int | None  # fixed [1, seqlen] inputs (NPU compilers); None: dynamic batch and length
    opset: int | None  # None: DEFAULT_OPSET


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


class TorchExporter(Exporter):
    """``torch.onnx.export(dynamo=True)`` of the transformers model in float32, without a KV cache."""

    name = "torch.onnx"

    def version(self) -> str:
        import torch

        return f"torch {torch.__version__}"

    def export(self, folder: Path, out: Path, spec: ExportSpec) -> Path:
        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        from .quantize import EXTERNAL_DATA_ABOVE, quiet

        folder, out = Path(folder), Path(out)
        loader = AutoModelForCausalLM if spec.kind == "decoder" else AutoModel
        try:
            model = loader.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False).eval()
        except (KeyError, ValueError) as exc:
            raise UnsupportedArchitectureError(f"{folder}: transformers does not support it ({first_line(exc)})") from exc
        names = ["input_ids", "attention_mask"]
        if spec.kind == "encoder" and "token_type_ids" in _forward_args(model):
            names.append("token_type_ids")
        length = spec.static_seqlen or 8
        example = tuple(torch.ones((1, length), dtype=torch.long) for _ in names)
        dynamic = None
        if spec.static_seqlen is None:
            batch, seq = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length", max=1 << 16)
            dynamic = {"args": tuple({0: batch, 1: seq} for _ in names)}
        output = "logits" if spec.kind == "decoder" else "last_hidden_state"
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        out.mkdir(parents=True, exist_ok=True)
        target = out / "model.onnx"
        try:
            with quiet(), torch.no_grad():
                program = torch.onnx.export(
                    _Outputs(model, names, output), example, input_names=names, output_names=[output],
                    dynamic_shapes=dynamic, opset_version=spec.opset or DEFAULT_OPSET, dynamo=True,
                    external_data=False, verbose=False, optimize=True,
                )
                program.save(str(target), external_data=weights > EXTERNAL_DATA_ABOVE)
        except Exception as exc:  # torch.export raises many kinds for code it cannot trace
            raise ConversionError(f"{folder}: torch.onnx could not export it ({first_line(exc)})") from exc
        copy_model_files(folder, out)
        return target


def copy_model_files(folder: Path, out: Path) -> None:
    """The files besides the weights that runtimes read: config, tokenizer, chat template,
    sentence-transformers pooling."""
    names = {"config.json", "generation_config.json", "special_tokens_map.json", "vocab.txt", "merges.txt",
             "added_tokens.json", *ENCODER_FILES}
    for path in sorted(Path(folder).rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and (rel in names or (rel.startswith("tokenizer") and "/" not in rel) or rel.endswith(".jinja")):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out / rel)


class _Outputs:
    """A module whose positional inputs are ``names`` and whose one output is ``output``."""

    def __new__(cls, model, names: list[str], output: str):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *args):
                kwargs = dict(zip(names, args, strict=True))
                if output == "logits":
                    kwargs["use_cache"] = False
                return getattr(self.model(**kwargs), output)

        return Wrapped()


def _forward_args(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line (its class name when it has no text), for one-line errors."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else exc.__class__.__name__)[:limit]
