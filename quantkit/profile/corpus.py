"""Evaluation text: the small texts packaged with quantkit, or files the user names."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import InputError

__all__ = ["default_texts", "read_texts"]


def default_texts() -> dict[str, str]:
    """quantkit's own short English and Chinese texts (written for this package)."""
    data = resources.files("quantkit") / "data"
    return {lang: (data / f"eval-{lang}.txt").read_text(encoding="utf-8") for lang in ("en", "zh")}


def read_texts(paths: list[str | Path]) -> dict[str, str]:
    """Read evaluation files, keyed by file stem; a missing or non-UTF-8 file is an InputError."""
    texts = {}
    for p in map(Path, paths):
        try:
            texts[p.stem] = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{p}: cannot read evaluation text ({exc})") from exc
    return texts
