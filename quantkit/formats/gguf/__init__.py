"""GGUF: HF checkpoints written by quantkit's own streaming writer, quantized by llama.cpp.

An HF source is written once to a lossless intermediate GGUF (F32, or BF16/F16 when every
source weight already is), and each requested llama.cpp type is quantized from it. A GGUF
source is re-quantized directly.

With an importance matrix llama.cpp weighs each weight's rounding error by how large its input
column is on calibration text. Types below 5 bits per weight (q4_k_s/m, iq4_nl/xs, q3_k_*, q2_k,
the i-quants; not q4_0, see ``DEFAULT_IMATRIX_SCHEMES``) use one by default, the others not; ``+imatrix`` / ``+noimatrix`` on a type
(``gguf:q6_k+imatrix``, ``gguf:q4_k_m+noimatrix``) or ``--imatrix auto|none|FILE`` for the whole
run depart from that (the i-quants always need one), and the artifact's name carries the suffix
exactly when it departs. ``auto`` computes the matrix from the HF source on quantkit's calibration
windows (the GPTQ text mix, disjoint from the evaluation text) on the layer-streaming engine; a
GGUF source has no float model to run, so there the default falls back to none (a warning). A
FILE is a GGUF imatrix as ``llama-imatrix`` writes it. The matrix used goes beside the GGUF as
``imatrix.gguf`` (``llama-quantize --imatrix`` reads it) and its sha256 into the manifest.

``gguf:auto-BUDGET`` (``gguf:auto-4.5bpw``, ``gguf:auto-240MB``; or ``gguf:auto`` with
``--target-bpw``/``--target-size``) chooses a type per tensor under that budget from measured
sensitivities (:mod:`.auto`), always with an importance matrix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from ...artifact import Artifact, atomic_dir, atomic_file, remove_stale, work_dir, write_manifest
from ...embedded import cache_dir
from ...errors import InputError, RecipeError
from ...log import logger
from ...progress import Progress
from ...recipe import Recipe
from ...runtimes.llamacpp import check_loads
from ...source import Source
from .. import ConvertOptions, Format, register_format
from ..options import Option, calibration_options, resolve_options
from .header import read_gguf_summary
from .quantize import (
    DEFAULT_IMATRIX_SCHEMES,
    IMATRIX_SCHEMES,
    IMATRIX_SUFFIX,
    NO_IMATRIX_SUFFIX,
    QUANT_SCHEMES,
    llama_type,
    quantize_gguf,
)
from .writer import FLOAT_TYPES, tensor_count, write_float_gguf

__all__ = ["GGUFFormat", "QUANT_SCHEMES", "IMATRIX_SUFFIX", "NO_IMATRIX_SUFFIX", "IMATRIX_FILE", "llama_type"]

IMATRIX_FILE = "imatrix.gguf"
# an importance matrix: "auto" (computed here), a GGUF imatrix file, or "none"; with its calibration
# text (llama-imatrix reads whole files in windows of 512; 32 windows, 16k tokens, keep the
# pass a few minutes for a 270M model on two CPU cores: the sums of squares settle early)
CALIBRATION = calibration_options(samples=32, seqlen=512)
# gguf:auto: its budget, and how many of the calibration windows its sensitivities are measured on
AUTO = {**CALIBRATION, "probe_windows": Option(4, "int", minimum=1)}
BUDGET_KEYS = ("target_size", "target_bpw")
OPTION_NAMES = frozenset({"imatrix", *AUTO, *BUDGET_KEYS})


def _parse_auto(scheme: str, options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``auto-4.5bpw`` / ``auto-240mb``, or ``auto`` with a target_size/target_bpw option."""
    from .auto import budget_label, parse_budget

    given = {k: options[k] for k in BUDGET_KEYS if options.get(k) is not None}
    if scheme != "auto" and given:
        raise RecipeError(f"gguf:{scheme} carries its budget; drop --target-size/--target-bpw or use gguf:auto")
    if scheme != "auto":
        budget = parse_budget(scheme.removeprefix("auto-"))
    elif len(given) != 1:
        raise RecipeError("gguf:auto needs one budget: --target-bpw B or --target-size SIZE, or gguf:auto-4.5bpw / gguf:auto-240MB")
    elif "target_bpw" in given:
        budget = parse_budget(f"{given['target_bpw']}bpw")
    else:
        budget = parse_budget(str(given["target_size"]))
        if "target_size" not in budget:
            raise RecipeError(f"--target-size {given['target_size']!r}: expected a file size (240MB, 1.5GiB, bytes)")
    imatrix = options.get("imatrix") or "auto"
    if imatrix == "none":
        raise RecipeError("gguf:auto quantizes with an importance matrix: use --imatrix auto (the default) or a FILE")
    values = resolve_options("GGUF", AUTO, {k: v for k, v in options.items() if k in AUTO})
    return f"auto-{budget_label(budget)}", {"imatrix": imatrix, **values, **budget}


def _parse_gguf_scheme(scheme: str, options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(canonical scheme, options) of a GGUF recipe. Types below 5 bits are quantized with an
    importance matrix by default, the others without; the scheme carries ``+imatrix`` or
    ``+noimatrix`` only where a recipe departs from its type's default, and the options only
    when a matrix is used. A suffix on the type wins over the run's ``--imatrix``."""
    if scheme == "auto" or scheme.startswith("auto-"):
        return _parse_auto(scheme, options)
    base = llama_type(scheme)
    if base not in QUANT_SCHEMES:
        raise RecipeError(f"unknown GGUF type {base!r}; known: {', '.join(QUANT_SCHEMES)} "
                          f"(quantized types take {IMATRIX_SUFFIX} or {NO_IMATRIX_SUFFIX})")
    imatrix = options.get("imatrix")
    if imatrix is not None and imatrix not in ("auto", "none"):
        path = Path(str(imatrix)).expanduser()
        if not path.is_file():
            raise RecipeError(f"GGUF option imatrix={imatrix!r}: expected auto, none or a GGUF imatrix file")
        imatrix = str(path)
    if scheme != base and base in FLOAT_TYPES:
        raise RecipeError(f"gguf:{scheme}: {base} is not quantized; an importance matrix is for quantized types")
    if scheme.endswith(NO_IMATRIX_SUFFIX) or (scheme == base and imatrix == "none"):
        imatrix = None
    elif scheme.endswith(IMATRIX_SUFFIX):
        imatrix = imatrix if imatrix not in (None, "none") else "auto"
    elif base in FLOAT_TYPES:
        imatrix = None
    else:
        imatrix = imatrix or ("auto" if base in DEFAULT_IMATRIX_SCHEMES else None)
    if imatrix is None and base in IMATRIX_SCHEMES:
        raise RecipeError(f"gguf:{base} needs an importance matrix: use --imatrix auto (the default for it) or a FILE")
    default = base in DEFAULT_IMATRIX_SCHEMES
    canonical = base if (imatrix is not None) == default or base in FLOAT_TYPES else \
        base + (IMATRIX_SUFFIX if imatrix else NO_IMATRIX_SUFFIX)
    if imatrix is None:
        return canonical, {}
    values = resolve_options("GGUF", CALIBRATION, {k: v for k, v in options.items() if k in CALIBRATION})
    if imatrix != "auto":  # a file brings its own calibration
        values = {}
    return canonical, {"imatrix": imatrix, **values}


def _lossless_type(source: Source) -> str:
    dtypes = source.dtypes
    if dtypes == {"BF16"}:
        return "bf16"
    if dtypes == {"F16"}:
        return "f16"
    return "f32"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@register_format
class GGUFFormat(Format):
    name = "gguf"

    def option_names(self) -> frozenset[str]:
        return OPTION_NAMES

    def parse_recipe(self, scheme: str, options: Mapping[str, Any] | None = None) -> Recipe:
        scheme, values = _parse_gguf_scheme(scheme, options or {})
        return Recipe("gguf", scheme, tuple(sorted(values.items())))

    def for_source(self, recipe: Recipe, source: Source) -> Recipe:
        """A GGUF source cannot be run on calibration text: a type quantized with an importance
        matrix by default is quantized without one (a warning; ``--imatrix FILE`` brings one)."""
        if source.kind == "hf" or recipe.option("imatrix") != "auto" or recipe.scheme not in DEFAULT_IMATRIX_SCHEMES - IMATRIX_SCHEMES:
            return recipe
        logger.warning(f"gguf:{recipe.scheme}: no importance matrix (it is computed from an HF checkpoint, "
                       f"and {source.id} is a GGUF file); quantized without one, as gguf:{recipe.scheme}{NO_IMATRIX_SUFFIX}. "
                       "--imatrix FILE uses a llama-imatrix file")
        return Recipe("gguf", recipe.scheme + NO_IMATRIX_SUFFIX)

    def convert(
        self, source: Source, recipes: Sequence[Recipe], out_dir: Path, options: ConvertOptions
    ) -> list[Artifact]:
        progress = options.progress or Progress(False)
        out_dir.mkdir(parents=True, exist_ok=True)
        artifacts = []
        with work_dir(out_dir) as work:
            details: dict = {}
            if source.kind == "hf":
                base_type = _lossless_type(source)
                base = Path(work) / f"{source.name}-{base_type}.gguf"
                with progress.task(f"writing {base_type.upper()} GGUF", tensor_count(source)) as advance:
                    details = write_float_gguf(source, base, base_type, advance)
            else:
                base_type, base = None, source.path
                details = dict(source.config)
            imatrices: dict[tuple, tuple[Path, dict]] = {}  # one per calibration setting or file
            analyses: dict[tuple, Any] = {}  # gguf:auto's, one per calibration setting
            for recipe in recipes:
                final = out_dir / f"{source.name}-{recipe.tag}"
                imatrix, imatrix_info, auto = None, None, recipe.scheme.startswith("auto-")
                if auto:
                    from .auto import check_budget

                    if source.kind != "hf":
                        raise InputError(f"{source.id}: gguf:auto measures sensitivities against the float model; "
                                         "convert from the HF checkpoint")
                    check_budget(base, _budget(recipe), recipe.scheme)
                if recipe.option("imatrix"):
                    calibration = _shared(recipe, (*BUDGET_KEYS, "probe_windows"))
                    if calibration not in imatrices:
                        imatrices[calibration] = _imatrix(source, recipe, Path(work) / f"imatrix-{len(imatrices)}.gguf",
                                                          progress)
                    imatrix, imatrix_info = imatrices[calibration]
                analysis_key = _shared(recipe, BUDGET_KEYS)
                if auto and analysis_key not in analyses:
                    analyses[analysis_key] = _analysis(source, recipe, base, imatrix, Path(work), options.threads, progress)
                with atomic_dir(final) as tmp:
                    out = tmp / f"{source.name}-{recipe.scheme.upper()}.gguf"
                    auto_info = None
                    if auto:
                        from .auto import measured_kld, quantize_choice

                        analysis, budget = analyses[analysis_key], _budget(recipe)
                        types = analysis.choose(budget, recipe.scheme)
                        with progress.task(f"quantizing {recipe.scheme}", read_gguf_summary(base)["tensor_count"]) as advance:
                            quantize_choice(base, out, types, imatrix, analysis, threads=options.threads, advance=advance)
                        auto_info = {**analysis.describe(types, budget), **measured_kld(out, analysis, options.threads)}
                    elif recipe.scheme == base_type:
                        _link_or_copy(base, out)
                    elif recipe.scheme in FLOAT_TYPES and source.kind == "hf":
                        with progress.task(f"writing {recipe.scheme.upper()} GGUF", tensor_count(source)) as advance:
                            write_float_gguf(source, out, recipe.scheme, advance)
                    else:
                        total = read_gguf_summary(base)["tensor_count"]
                        with progress.task(f"quantizing {recipe.scheme}", total) as advance:
                            quantize_gguf(base, out, llama_type(recipe.scheme), threads=options.threads,
                                          advance=advance, imatrix=imatrix)
                    info = {**details, **read_gguf_summary(out), "intermediate": base_type}
                    if auto_info is not None:
                        info["auto"] = auto_info
                    if imatrix is not None:
                        shutil.copyfile(imatrix, tmp / IMATRIX_FILE)
                        info["imatrix"] = imatrix_info
                    if not options.verify:  # verification loads it fully; never leave a GGUF llama.cpp refuses
                        check_loads(out, vocab_only=True)
                    else:
                        provisional = Artifact(tmp, out, {"recipe": recipe.to_dict()})
                        info["verification"] = options.verify(provisional)
                    manifest = write_manifest(tmp, recipe=recipe.to_dict(), source=source.to_manifest(), details=info,
                                              main_file=out.name if imatrix is not None else None)
                artifacts.append(Artifact(final, final / out.name, manifest))
        return artifacts


def _budget(recipe: Recipe) -> dict[str, Any]:
    """gguf:auto's budget: {"target_size": bytes} or {"target_bpw": bits}."""
    return {k: recipe.option(k) for k in BUDGET_KEYS if recipe.option(k)}


def _shared(recipe: Recipe, drop: Sequence[str]) -> tuple:
    """A recipe's options without ``drop``: what recipes that share work have in common."""
    return tuple((k, v) for k, v in recipe.options if k not in drop)


def _analysis(source: Source, recipe: Recipe, base: Path, imatrix: Path, work: Path, threads: int | None,
              progress: Progress):
    """gguf:auto's per-tensor options and group sensitivities, on ``probe_windows`` of the recipe's
    calibration windows spread over the mix."""
    from ...calibration import source_windows
    from ...profile.reference import reference_scores
    from ...runtimes.stream import trim_heap
    from ...runtimes.torch import TorchReference
    from .auto import analyse

    _, windows, _ = source_windows(source.path, dict(recipe.options))
    n = min(recipe.option("probe_windows"), len(windows))
    probes = [windows[i * len(windows) // n] for i in range(n)]

    def task(what: str, total: int):
        return progress.task(f"gguf:auto reference: {what}", total)

    # the float model is referenced by this call only: gone once its top-k scores are kept
    [reference] = reference_scores(partial(TorchReference(source, threads=threads).logits, task=task), {"probe": probes},
                                   fingerprint=source.fingerprint, cache_dir=None).values()
    trim_heap()
    return analyse(base, imatrix, reference, probes, work, threads=threads, progress=progress)


def _imatrix_code() -> str:
    """What a cached importance matrix depends on besides its inputs: the code that computes it
    (this package's engine and accumulation, by content) and the libraries that run the model."""
    import torch
    import transformers

    from ...runtimes import stream
    from . import imatrix

    digest = hashlib.sha256()
    for module in (imatrix, stream):
        digest.update(Path(module.__file__).read_bytes())
    return f"{digest.hexdigest()}:{torch.__version__}:{transformers.__version__}"


def _imatrix(source: Source, recipe: Recipe, path: Path, progress: Progress) -> tuple[Path, dict]:
    """The importance matrix ``recipe`` asks for, as a GGUF imatrix file at ``path`` (or the
    user's file as it is), and what the manifest records of it."""
    from .imatrix import ImportanceMatrix, compute_imatrix

    choice = recipe.option("imatrix")
    if choice != "auto":
        matrix = ImportanceMatrix.read(Path(choice))
        return Path(choice), {"file": Path(choice).name, "sha256": matrix.digest(), "datasets": matrix.datasets,
                              "tensors": len(matrix.sums)}
    if source.kind != "hf":
        raise InputError(f"{source.id}: an importance matrix is computed from an HF checkpoint; "
                         "for a GGUF source pass --imatrix FILE (a llama-imatrix file)")
    from ...calibration import source_windows

    opts = dict(recipe.options)
    _, windows, calibration = source_windows(source.path, opts)
    datasets = [Path(opts["calib"]).name if opts["calib"] else f"quantkit calibration mix ({', '.join(calibration['windows_per_domain'])})"]
    # the same source and calibration windows give the same matrix: kept in quantkit's cache, so a
    # later conversion (another type, the planner's next candidate) does not run the model again
    key = hashlib.sha256(json.dumps([_imatrix_code(), source.fingerprint, datasets, windows]).encode()).hexdigest()
    cached = cache_dir() / "imatrix" / f"{key[:32]}.gguf"
    try:
        matrix = ImportanceMatrix.read(cached) if cached.is_file() else None
    except (InputError, OSError):  # damaged or unreadable: computed again
        matrix = None
    if matrix is None:
        matrix = compute_imatrix(source, windows, datasets=datasets,
                                 task=lambda what, total: progress.task(f"importance matrix: {what}", total))
        with contextlib.suppress(OSError):
            remove_stale(cached.parent)  # a write killed earlier
            with atomic_file(cached) as tmp:
                matrix.write(tmp)
    matrix.write(path)
    return path, {"file": IMATRIX_FILE, "sha256": matrix.digest(), "datasets": datasets, "tensors": len(matrix.sums),
                  "calibration": calibration}
