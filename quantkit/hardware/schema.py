"""The hardware profile file: what a target machine has and what it can run.

One YAML file per target in ``profiles/``; a person types these, so the models forbid unknown
keys (a misspelt field is an error naming the file, the field and the line, not a silent
default). ``hardware-profile.schema.json`` in ``quantkit/report/schemas`` is exported from
these models (``quantkit profiles schema``) so other tools can validate the files too.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["HardwareProfile", "Memory", "RuntimeSupport", "Constraints", "Compiler", "Measurement", "FORMATS", "DTYPES"]

FORMATS = ("gguf", "gptq", "onnx", "bnb")
DTYPES = ("fp32", "fp16", "bf16", "int8", "int4")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Memory(_Strict):
    total_bytes: int = Field(gt=0, description="memory the accelerator (or the whole machine, for CPUs and SoCs) has")
    bandwidth_bytes_per_s: float = Field(gt=0, description="peak memory bandwidth")
    reserved_bytes: int = Field(ge=0, description="what the OS, driver, desktop or runtime keep for themselves")

    @model_validator(mode="after")
    def _reserve_fits(self) -> Memory:
        if self.reserved_bytes >= self.total_bytes:
            raise ValueError("reserved_bytes must be smaller than total_bytes")
        return self


class RuntimeSupport(_Strict):
    name: str = Field(min_length=1, description="llama.cpp, onnxruntime, vllm, atc, ...")
    backend: str = Field(min_length=1, description="llama.cpp backend, ONNX Runtime execution provider or compiler")
    formats: list[Literal["gguf", "gptq", "onnx", "bnb"]] = Field(min_length=1)
    quant_types: list[str] | None = Field(
        default=None, description="null: every type of those formats; else GGUF tensor types (f16, q8_0...) or ONNX schemes"
    )
    source: str | None = None
    note: str | None = Field(default=None, description="a caveat shown with every estimate that uses this runtime")

    @field_validator("quant_types")
    @classmethod
    def _lower(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [v.lower() for v in value]


class Constraints(_Strict):
    static_shapes: bool = Field(default=False, description="the target's compiler needs fixed input shapes")
    max_onnx_opset: int | None = Field(default=None, ge=7)
    onnx_domains: list[str] | None = Field(default=None, description='allowed operator domains, e.g. ["ai.onnx"]')
    onnx_operators: list[str] | None = Field(default=None, description="supported standard ONNX op types")


class Compiler(_Strict):
    name: str = Field(min_length=1)
    soc_version: str | None = None
    command: str = Field(min_length=1, description="with {model}, {output} and {input_shape} placeholders")

    @field_validator("command")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        missing = [p for p in ("{model}", "{output}") if p not in value]
        if missing:
            raise ValueError(f"command must contain {' and '.join(missing)}")
        return value


class Measurement(_Strict):
    """A published speed measurement on this hardware (a llama-bench row or the like): what the
    estimator calibrates its efficiencies on, instead of this host's."""

    model: str = Field(min_length=1, description="as the source names it, e.g. 'llama 7B Q4_0'")
    params: float = Field(gt=0, description="parameters (dense; llama-bench's 'params' column)")
    size_bytes: float = Field(gt=0, description="model file size (llama-bench prints GiB: x 2^30)")
    quant: str = Field(min_length=1, description="GGUF type: q4_0, q4_k_m, q8_0, f16, ...")
    runtime: str = Field(min_length=1)
    backend: str = Field(min_length=1)
    prompt_tokens: int | None = Field(default=None, gt=0)
    prompt_tokens_per_s: float | None = Field(default=None, gt=0)
    gen_tokens: int | None = Field(default=None, gt=0)
    gen_tokens_per_s: float | None = Field(default=None, gt=0)
    date: str | None = None
    source: str = Field(min_length=1, description="where the figure was published (URL)")
    note: str | None = None

    @field_validator("quant")
    @classmethod
    def _lower_quant(cls, value: str) -> str:
        return value.lower()

    @model_validator(mode="after")
    def _some_speed(self) -> Measurement:
        if self.prompt_tokens_per_s is None and self.gen_tokens_per_s is None:
            raise ValueError("a measurement needs prompt_tokens_per_s, gen_tokens_per_s or both")
        return self


class HardwareProfile(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    kind: Literal["cpu", "gpu", "npu", "soc"]
    description: str = ""
    memory: Memory
    host_memory: Memory | None = Field(
        default=None, description="gpu/npu: the system RAM beside the accelerator, which holds the layers not offloaded")
    compute: dict[Literal["fp32", "fp16", "bf16", "int8", "int4"], float] = Field(
        min_length=1, description="dense peak operations per second by data type"
    )
    runtimes: list[RuntimeSupport] = Field(min_length=1)
    constraints: Constraints = Constraints()
    compiler: Compiler | None = None
    measurements: list[Measurement] = Field(default_factory=list, description="published speed measurements (calibration)")
    measured: bool = Field(default=False, description="true only for the host, measured at run time")

    @field_validator("compute")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for dtype, ops in value.items():
            if ops <= 0:
                raise ValueError(f"compute.{dtype} must be > 0")
        return value

    @property
    def usable_bytes(self) -> int:
        return self.memory.total_bytes - self.memory.reserved_bytes
