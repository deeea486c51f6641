"""Output formats, found through a registry keyed by the recipe prefix (``FORMATS["gguf"]``).

A format module subclasses :class:`Format` and registers itself with ``@register_format``;
adding a format is one module plus one import line in ``_BUILTIN``. The core never names one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import RecipeError

__all__ = ["FORMATS", "Format", "ConvertOptions", "register_format", "get_format"]

FORMATS: dict[str, Format] = {}
_BUILTIN = ("quantkit.formats.gguf", "quantkit.formats.bnb", "quantkit.formats.gptq", "quantkit.formats.onnx")


@dataclass(frozen=True)
class ConvertOptions:
    """Settings shared by every format's convert step."""

    threads: int | None = None
    progress: Any = field(default=None, compare=False)  # a quantkit.progress.Progress
    # called with each finished-but-not-yet-renamed artifact; may raise to reject it, and
    # returns figures recorded in the manifest under details["verification"]
    verify: Callable[[Any], dict] | None = field(default=None, compare=False)


class Format:
    """The small interface every output format implements."""

    name: ClassVar[str]

    def parse_recipe(self, scheme: str, options: Mapping[str, Any] | None = None):
        """Validate the part after 'FORMAT:' and return a Recipe.

        ``options`` are user settings from the command line or API (e.g. ``damp`` for GPTQ);
        a format takes the keys it knows, fills in its defaults, and ignores ``None`` values.
        """
        raise NotImplementedError

    def option_names(self) -> frozenset[str]:
        """The option keys this format accepts in ``parse_recipe``."""
        return frozenset()

    def for_source(self, recipe, source):
        """The recipe as it will be carried out for ``source``: a default that the source cannot
        serve falls back here, saying so (the recipe is unchanged otherwise)."""
        return recipe

    def convert(self, source, recipes: Sequence, out_dir: Path, options: ConvertOptions) -> list:
        """Produce one artifact per recipe from ``source`` under ``out_dir``."""
        raise NotImplementedError


def register_format(cls: type[Format]) -> type[Format]:
    FORMATS[cls.name] = cls()
    return cls


def get_format(name: str) -> Format:
    for module in _BUILTIN:  # cached by Python after the first call
        importlib.import_module(module)
    try:
        return FORMATS[name]
    except KeyError:
        known = ", ".join(sorted(FORMATS))
        raise RecipeError(f"unknown format {name!r}; known formats: {known}") from None
