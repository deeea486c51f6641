"""Evaluation text by domain: quantkit's held-out texts (en, zh; sources and licences in
``quantkit/data/SOURCES.md``), Python standard-library source (code), files the user names, or a
hub dataset through ``datasets``. Each default domain is long enough for 16 windows of 512
tokens (at least 4,096 scored tokens) with a Gemma- or Llama-sized vocabulary."""

from __future__ import annotations

import sysconfig
from importlib import resources
from pathlib import Path

from ..errors import InputError

__all__ = ["DEFAULT_DOMAINS", "default_texts", "code_text", "read_texts", "load_eval_data", "segments"]

DEFAULT_DOMAINS = ("en", "zh", "code")
# small, stable, pure-Python standard-library modules: the "code" domain on every machine
_CODE_MODULES = ("textwrap.py", "heapq.py", "bisect.py", "fractions.py", "statistics.py", "json/decoder.py")
_HUB_DATASETS = {"wikitext-2-raw-v1": ("wikitext", "wikitext-2-raw-v1", "test", "text")}


def default_texts() -> dict[str, str]:
    """quantkit's held-out English and Chinese evaluation texts."""
    data = resources.files("quantkit") / "data"
    return {lang: (data / f"eval-{lang}.txt").read_text(encoding="utf-8") for lang in ("en", "zh")}


def code_text(max_chars: int = 48_000) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = [(stdlib / name).read_text(encoding="utf-8") for name in _CODE_MODULES if (stdlib / name).is_file()]
    return "\n\n".join(parts)[:max_chars]


def read_texts(paths: list[str | Path]) -> dict[str, str]:
    """Read evaluation files, keyed by file stem; a missing or non-UTF-8 file is an InputError."""
    texts = {}
    for p in map(Path, paths):
        try:
            texts[p.stem] = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{p}: cannot read evaluation text ({exc})") from exc
    return texts


def _hub_dataset(name: str) -> str:
    repo, config, split, column = _HUB_DATASETS[name]
    try:
        import datasets
    except ImportError as exc:
        raise InputError(f"evaluation data {name!r} needs the 'datasets' package (pip install datasets)") from exc
    try:
        rows = datasets.load_dataset(repo, config, split=split)
    except Exception as exc:  # offline, missing, or a hub error: one line
        raise InputError(f"evaluation data {name!r} could not be loaded ({type(exc).__name__}); pass a text file instead") from exc
    return "".join(rows[column])


def load_eval_data(spec: list[str] | None = None) -> dict[str, str]:
    """Resolve domain names (en, zh, code), files and known hub datasets into texts by domain."""
    builtin = default_texts()
    texts: dict[str, str] = {}
    for item in spec or list(DEFAULT_DOMAINS):
        if item in builtin:
            texts[item] = builtin[item]
        elif item == "code":
            texts["code"] = code_text()
        elif item in _HUB_DATASETS:
            texts[item] = _hub_dataset(item)
        elif Path(item).exists():
            texts.update(read_texts([item]))
        else:
            known = ", ".join([*DEFAULT_DOMAINS, *_HUB_DATASETS])
            raise InputError(f"evaluation data {item!r} is neither a domain ({known}) nor a file")
    return texts


def segments(text: str, limit: int | None = None, max_chars: int = 400) -> list[str]:
    """Passages for sentence embeddings: paragraphs (runs of non-blank lines), long ones cut at
    ``max_chars``, fragments under 16 characters dropped; at most ``limit`` of them."""
    out: list[str] = []
    for block in text.split("\n\n"):
        block = " ".join(line.strip() for line in block.splitlines() if line.strip())
        for start in range(0, len(block), max_chars):
            piece = block[start : start + max_chars]
            if len(piece) >= 16:
                out.append(piece)
            if limit and len(out) >= limit:
                return out
    return out
