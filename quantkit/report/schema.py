"""The JSON Schemas quantkit ships for its reports, and validation against them."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from ..errors import QuantkitError

__all__ = ["load_schema", "validate_report"]


@cache
def load_schema(name: str = "profile") -> dict[str, Any]:
    return json.loads((resources.files("quantkit.report") / "schemas" / f"{name}.schema.json").read_text())


def validate_report(report: dict[str, Any], name: str = "profile") -> None:
    """Raise QuantkitError naming the first violation when ``report`` breaks the schema."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema(name))
    errors = sorted(validator.iter_errors(report), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(map(str, first.absolute_path)) or "(top level)"
        raise QuantkitError(f"{name} report breaks its schema at {where}: {first.message}")
