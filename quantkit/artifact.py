"""Artifacts on disk: atomic output folders and the manifest every artifact carries.

An artifact is a folder holding the format's files plus ``manifest.json``. It is built under a
hidden temporary name beside its final place and renamed only once complete, so an interrupted
run (Ctrl-C, full disk, a crash) never leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import ConversionError

__all__ = [
    "Artifact",
    "MANIFEST_NAME",
    "atomic_dir",
    "atomic_file",
    "read_manifest",
    "sha256_file",
    "tool_versions",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_VERSIONED_PACKAGES = (
    "quantkit", "gguf", "llama-cpp-python", "transformers", "torch", "safetensors", "bitsandbytes",
)


@dataclass(frozen=True)
class Artifact:
    """A finished artifact folder and the file a runtime loads from it."""

    path: Path
    main_file: Path
    manifest: dict[str, Any]

    @property
    def recipe(self) -> str:
        r = self.manifest["recipe"]
        return f"{r['format']}:{r['scheme']}"

    @property
    def file_bytes(self) -> int:
        return sum(f["bytes"] for f in self.manifest["files"])


def sha256_file(path: Path, block_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _partial_name(final: Path) -> Path:
    return final.parent / f".{final.name}.partial-{os.getpid()}"


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``final`` only if the block completes.

    Any exception, KeyboardInterrupt included, removes the temporary folder. An existing
    ``final`` is replaced only after the new one is complete.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise ConversionError(f"could not write {final}: {exc.strerror or exc}") from exc
        raise


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path that is renamed to ``final`` if the block completes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_manifest(
    folder: Path, *, recipe: dict, source: dict, details: dict, main_file: str | None = None
) -> dict[str, Any]:
    """Hash every file in ``folder`` and write ``manifest.json`` (no timestamps: reproducible).

    ``main_file`` names the file a runtime loads (default: the first file)."""
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        files.append(
            {
                "path": path.relative_to(folder).as_posix(),
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "recipe": recipe,
        "source": source,
        "tool_versions": tool_versions(),
        "details": details,
        "files": files,
    }
    if main_file is not None:
        manifest["main_file"] = main_file
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST_NAME).read_text())
