"""Recipes: typed, hashable descriptions of one output, parsed from strings like 'gguf:q4_k_m'.

The part before the colon names a format in the registry (``quantkit.formats.FORMATS``); the
format validates the part after it, so this module never names a format itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import RecipeError

__all__ = ["Recipe", "parse_recipe"]


@dataclass(frozen=True)
class Recipe:
    """One output: a format, a scheme inside that format and its (sorted) options."""

    format: str
    scheme: str
    options: tuple[tuple[str, Any], ...] = field(default=())

    def __str__(self) -> str:
        return f"{self.format}:{self.scheme}"

    @property
    def tag(self) -> str:
        """A file-name-safe label, e.g. 'q4_k_m'."""
        return self.scheme.replace("/", "-")

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "scheme": self.scheme, "options": dict(self.options)}

    def matches(self, recorded: dict[str, Any] | None) -> bool:
        """Whether a manifest's recorded recipe is this one (as its JSON reads back)."""
        return recorded == json.loads(json.dumps(self.to_dict()))

    def cache_key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def parse_recipe(text: str, options: Mapping[str, Any] | None = None) -> Recipe:
    """Parse 'FORMAT:SCHEME' with the format's own parser; unknown formats list the known ones.

    ``options`` (e.g. ``{"damp": 0.01}``) go to every format, which keeps the keys it knows."""
    from .formats import get_format  # registry lookup; formats import this module

    fmt_name, sep, scheme = text.strip().partition(":")
    if not sep or not fmt_name or not scheme:
        raise RecipeError(f"recipe {text!r} is not of the form FORMAT:SCHEME, e.g. gguf:q4_k_m")
    fmt = get_format(fmt_name.lower())
    mine = {k: v for k, v in (options or {}).items() if v is not None and k in fmt.option_names()}
    return fmt.parse_recipe(scheme.strip().lower(), mine)
