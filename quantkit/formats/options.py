"""Recipe options declared once per format: each option's default and what a valid value is.

A format lists its options as ``{name: Option}``; ``resolve_options`` overlays the user's values
on the defaults, checking each where it enters (unknown names and bad values are one-line
RecipeErrors). The calibration options are shared by every format that calibrates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RecipeError

__all__ = ["Option", "calibration_options", "resolve_options", "CALIBRATION_OPTION_NAMES"]


@dataclass(frozen=True)
class Option:
    """One recipe option. ``kind``: 'bool', 'int' (>= ``minimum``), 'fraction' (0 < x < 1),
    'file' (an existing file, stored as its expanded path) or 'choice' (one of ``choices()``)."""

    default: Any
    kind: str
    minimum: int = 0
    expected: str = ""  # what the error message says a fraction is
    choices: Callable[[], Iterable[str]] | None = None

    def check(self, label: str, key: str, value: Any) -> Any:
        def bad(expected: str) -> RecipeError:
            return RecipeError(f"{label} option {key}={value!r}: expected {expected}")

        if self.kind == "bool":
            if not isinstance(value, bool):
                raise bad("true or false")
            return value
        if self.kind == "fraction":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise bad(self.expected or "a number between 0 and 1")
            return float(value)
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int) or value < self.minimum:
                raise bad(f"an integer >= {self.minimum}")
            return value
        if self.kind == "file":
            path = Path(str(value)).expanduser()
            if not path.is_file():
                raise RecipeError(f"{label} option {key}={value!r}: no such file (a UTF-8 text file to calibrate on)")
            return str(path)
        if self.kind == "choice":
            known = sorted(self.choices() if self.choices else ())
            if value not in known:
                raise bad("one of " + ", ".join(known))
            return value
        raise ValueError(f"unknown option kind {self.kind!r}")


def calibration_options(samples: int, seqlen: int) -> dict[str, Option]:
    """The calibration text, how many windows of how many tokens, and the sampling seed."""
    return {
        "calib": Option(None, "file"),
        "calib_samples": Option(samples, "int", minimum=1),
        "calib_seqlen": Option(seqlen, "int", minimum=8),
        "seed": Option(0, "int", minimum=0),
    }


CALIBRATION_OPTION_NAMES = tuple(calibration_options(1, 8))


def resolve_options(label: str, spec: Mapping[str, Option], options: Mapping[str, Any]) -> dict[str, Any]:
    """Every option of ``spec`` with its default, overlaid with the checked, non-None ``options``."""
    values = {key: option.default for key, option in spec.items()}
    for key, value in options.items():
        if value is None:
            continue
        if key not in spec:
            raise RecipeError(f"unknown {label} option {key!r}; known: {', '.join(sorted(spec))}")
        values[key] = spec[key].check(label, key, value)
    return values
