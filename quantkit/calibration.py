"""Calibration text and token windows, shared by the converters that need activations (GPTQ, static ONNX int8).

The default mix never overlaps quantkit's evaluation text (``quantkit/data/eval-*.txt`` and the
standard-library modules in ``quantkit.profile.corpus._CODE_MODULES``), so a profile after GPTQ
does not score the model on the very text its Hessians were built from:

* en: the Python documentation's topic pages shipped with every CPython
  (``pydoc_data.topics``), plain technical English;
* code: other stable, pure-Python standard-library modules (:data:`CALIB_CODE_MODULES`);
* zh: ``quantkit/data/calib-zh.txt``, Chinese prose written for quantkit.

Windows are drawn with a seeded NumPy generator (PCG64: the same numbers on every platform).
"""

from __future__ import annotations

import sysconfig
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

__all__ = [
    "CALIB_CODE_MODULES",
    "DEFAULT_MIX",
    "calibration_texts",
    "calibration_windows",
    "source_windows",
    "DEFAULT_TEXTS",
]

#: how a manifest names the default texts
DEFAULT_TEXTS = "default (en: pydoc topics, code: stdlib modules, zh: calib-zh.txt)"

# stable, pure-Python standard-library modules, none of them in the evaluation corpus
# (tests/test_gptq.py checks both lists stay disjoint)
CALIB_CODE_MODULES = (
    "argparse.py", "difflib.py", "dataclasses.py", "functools.py", "shlex.py",
    "csv.py", "calendar.py", "graphlib.py", "sched.py", "queue.py",
)

# share of the calibration windows per domain
DEFAULT_MIX: Mapping[str, float] = {"en": 0.45, "code": 0.35, "zh": 0.20}
_MAX_CHARS = 200_000  # per domain: plenty of distinct windows, and quick to tokenize


def _english() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))[:_MAX_CHARS]


def _code() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = [(stdlib / n).read_text(encoding="utf-8") for n in CALIB_CODE_MODULES if (stdlib / n).is_file()]
    return "\n\n".join(parts)[:_MAX_CHARS]


def _chinese() -> str:
    return (resources.files("quantkit") / "data" / "calib-zh.txt").read_text(encoding="utf-8")


def calibration_texts(path: str | Path | None = None) -> dict[str, str]:
    """The default en/zh/code texts, or ``{"file": text}`` for a user's UTF-8 file."""
    if path is None:
        return {"en": _english(), "code": _code(), "zh": _chinese()}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read calibration text ({exc.__class__.__name__})") from exc
    if not text.strip():
        raise InputError(f"{path}: the calibration text is empty")
    return {"file": text}


def _allocate(n: int, domains: list[str], mix: Mapping[str, float]) -> list[str]:
    """``n`` domain labels in the proportions of ``mix`` (largest remainder), in a fixed order."""
    weights = np.array([mix.get(d, 1.0) for d in domains], dtype=np.float64)
    share = weights / weights.sum() * n
    counts = np.floor(share).astype(int)
    for i in np.argsort(-(share - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return [d for d, c in zip(domains, counts, strict=True) for _ in range(c)]


def calibration_windows(
    tokenizer: Any,
    texts: Mapping[str, str],
    *,
    n_samples: int,
    seqlen: int,
    seed: int,
    mix: Mapping[str, float] = DEFAULT_MIX,
) -> tuple[list[list[int]], dict[str, int]]:
    """``n_samples`` token windows of ``seqlen`` tokens, domains mixed in ``mix`` proportions,
    each a random slice of its domain's tokens (BOS first when the tokenizer adds one, as the
    model sees text at inference). Returns the windows and the window count per domain."""
    rng = np.random.Generator(np.random.PCG64(seed))
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    body = seqlen - (1 if adds_bos else 0)
    tokens: dict[str, list[int]] = {}
    for name, text in texts.items():
        ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if not ids:
            raise InputError(f"calibration text {name!r} tokenizes to nothing")
        if len(ids) < body:  # a short text is repeated rather than padded: no pad-token artefacts
            ids = ids * (body // len(ids) + 1)
        tokens[name] = ids
    labels = _allocate(n_samples, sorted(tokens), mix)
    labels = [labels[i] for i in rng.permutation(len(labels))]
    windows = []
    for name in labels:
        ids = tokens[name]
        start = int(rng.integers(0, len(ids) - body + 1))
        windows.append(([bos] if adds_bos else []) + ids[start : start + body])
    counts = {name: labels.count(name) for name in sorted(tokens)}
    return windows, counts


def source_windows(source_path: str | Path, opts: Mapping[str, Any]) -> tuple[Any, list[list[int]], dict[str, Any]]:
    """The calibration windows a recipe's options (``calib``, ``calib_samples``, ``calib_seqlen``,
    ``seed``) ask for, tokenized by the HF checkpoint at ``source_path``: (tokenizer, windows,
    what a manifest records of them)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source_path, trust_remote_code=False)
    windows, counts = calibration_windows(tokenizer, calibration_texts(opts["calib"]), n_samples=opts["calib_samples"],
                                          seqlen=opts["calib_seqlen"], seed=opts["seed"])
    details = {"texts": opts["calib"] or DEFAULT_TEXTS, "windows_per_domain": counts, "samples": len(windows),
               "seqlen": opts["calib_seqlen"], "seed": opts["seed"], "tokens": sum(len(w) for w in windows)}
    return tokenizer, windows, details
