"""Runtimes that load an artifact and score tokens, keyed by artifact format (``RUNTIMES["gguf"]``).

Each runtime exposes ``tokenize(text) -> list[int]`` and ``logits(tokens) -> ndarray[n, vocab]``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["RUNTIMES", "register_runtime", "get_runtime", "runtime_formats"]

RUNTIMES: dict[str, Any] = {}
_BUILTIN = ("quantkit.runtimes.llamacpp", "quantkit.runtimes.bnb", "quantkit.runtimes.gptq", "quantkit.runtimes.onnx")


def register_runtime(fmt: str):
    def wrap(cls):
        RUNTIMES[fmt] = cls
        return cls

    return wrap


def runtime_formats() -> list[str]:
    """The artifact formats some runtime can load."""
    for module in _BUILTIN:  # cached by Python after the first call
        importlib.import_module(module)
    return sorted(RUNTIMES)


def get_runtime(fmt: str):
    if fmt not in runtime_formats():
        raise KeyError(f"no runtime for format {fmt!r}; known: {', '.join(sorted(RUNTIMES))}")
    return RUNTIMES[fmt]
