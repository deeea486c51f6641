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
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import ArtifactError, ConversionError

__all__ = [
    "Artifact",
    "MANIFEST_NAME",
    "atomic_dir",
    "atomic_file",
    "work_dir",
    "remove_stale",
    "read_manifest",
    "check_artifact",
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
        return model_bytes(self.manifest, self.main_file)


def model_bytes(manifest: dict[str, Any], main_file: Path) -> int:
    """Bytes of an artifact's files as its manifest lists them; a GGUF's is its one model file
    (the importance matrix beside it is a by-product llama.cpp does not load)."""
    files = manifest["files"]
    if manifest.get("recipe", {}).get("format") == "gguf":
        files = [f for f in files if f["path"] == main_file.name] or files
    return sum(f["bytes"] for f in files)


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
    return final.parent / f".{final.name}.quantkit-partial-{os.getpid()}"


def _old_name(final: Path) -> Path:
    return final.parent / f".{final.name}.quantkit-old-{os.getpid()}"


# hidden names only this module gives unfinished output: ".NAME.quantkit-partial-PID" and
# ".NAME.quantkit-old-PID" (a replaced artifact, kept until its successor is in place)
# set by the CLI's signal handler: a KeyboardInterrupt raised where Python swallows it (a weakref
# callback, a __del__: "Exception ignored in ...") must still keep the run from publishing anything
_interrupt_requested = False


def request_interrupt() -> None:
    """Record that the process was told to stop (SIGTERM, Ctrl-C)."""
    global _interrupt_requested
    _interrupt_requested = True


def interrupt_requested() -> bool:
    return _interrupt_requested


_UNFINISHED = re.compile(r"^\.(.+)\.quantkit-(partial|old)-(\d+)$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _tree_bytes(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def remove_stale(folder: Path) -> tuple[int, int]:
    """Remove unfinished outputs in ``folder`` left by runs whose process is gone (killed with
    SIGKILL, a machine that lost power); returns (entries removed, bytes freed)."""
    count = freed = 0
    if not Path(folder).is_dir():
        return 0, 0
    for entry in Path(folder).iterdir():
        match = _UNFINISHED.match(entry.name)
        if not match or int(match.group(3)) == os.getpid() or _process_alive(int(match.group(3))):
            continue
        final = entry.parent / match.group(1)
        if match.group(2) == "old" and not final.exists():
            os.rename(entry, final)  # killed between the two renames: the old artifact is the only copy
            continue
        size = _tree_bytes(entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        if not entry.exists():
            count, freed = count + 1, freed + size
    return count, freed


@contextlib.contextmanager
def work_dir(folder: Path, name: str = "quantkit-work") -> Iterator[Path]:
    """A hidden scratch folder in ``folder`` (``.NAME.quantkit-partial-PID``), removed when the block
    ends; one left by a killed run is found and removed by :func:`remove_stale`."""
    path = _partial_name(Path(folder) / name)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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
        if _interrupt_requested:  # told to stop, whether or not its KeyboardInterrupt got through
            raise KeyboardInterrupt
        if final.exists():
            old = _old_name(final)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _old_name(final).exists() and not final.exists():  # interrupted between the renames
            os.rename(_old_name(final), final)
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
        if _interrupt_requested:
            raise KeyboardInterrupt
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


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MANIFEST_KEYS = {"manifest_version": int, "recipe": dict, "source": dict, "details": dict, "files": list}


def read_manifest(folder: Path) -> dict[str, Any]:
    """The artifact's manifest, checked for the keys and types quantkit relies on; a damaged
    one is an ArtifactError naming the file and what is wrong."""
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(f"{folder}: not a quantkit artifact (no {MANIFEST_NAME})") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(f"{path}: not a readable manifest ({type(exc).__name__})") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: not a manifest (a JSON object was expected)")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ArtifactError(f"{path}: the manifest lacks {', '.join(missing)}")
    for key, kind in _MANIFEST_KEYS.items():
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise ArtifactError(f"{path}: manifest key {key!r} should be a {kind.__name__}")
    recipe = manifest["recipe"]
    if not all(isinstance(recipe.get(k), str) for k in ("format", "scheme")):
        raise ArtifactError(f"{path}: the manifest's recipe lacks its format or scheme")
    if not manifest["files"]:
        raise ArtifactError(f"{path}: the manifest lists no files")
    for i, entry in enumerate(manifest["files"]):
        ok = (isinstance(entry, dict) and isinstance(entry.get("path"), str)
              and isinstance(entry.get("bytes"), int) and not isinstance(entry.get("bytes"), bool) and entry["bytes"] >= 0
              and isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"]))
        if not ok:
            raise ArtifactError(f"{path}: files[{i}] needs a path, a byte count and a sha256")
        rel = Path(entry["path"])
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ArtifactError(f"{path}: files[{i}] path {entry['path']!r} points outside the artifact")
    main = manifest.get("main_file", manifest["files"][0]["path"])
    if not isinstance(main, str) or main not in {f["path"] for f in manifest["files"]}:
        raise ArtifactError(f"{path}: main_file {main!r} is not one of the listed files")
    return manifest


def check_artifact(folder: Path, manifest: dict[str, Any], *, hashes: bool = True) -> None:
    """The folder holds exactly the manifest's files, each of the recorded size (and sha256,
    unless ``hashes`` is False); else an ArtifactError naming the file."""
    folder = Path(folder)
    listed = {f["path"]: f for f in manifest["files"]}
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME}
    missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
    if missing:
        raise ArtifactError(f"{folder}: missing file(s) the manifest lists: {', '.join(missing)}")
    if extra:
        raise ArtifactError(f"{folder}: file(s) the manifest does not list: {', '.join(extra)}")
    for rel, entry in listed.items():
        size = (folder / rel).stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(f"{folder / rel}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
    if hashes:
        for rel, entry in listed.items():
            if sha256_file(folder / rel) != entry["sha256"]:
                raise ArtifactError(f"{folder / rel}: sha256 differs from the manifest (damaged or modified; --no-check skips this)")
