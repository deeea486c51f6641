"""Finding, reading and validating hardware profiles; the ``host`` profile, measured here.

A profile file's errors name the file, the field and the line: the YAML is composed into nodes
(which keep their positions) before pydantic validates it, and each error's location is walked
back to the node it came from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import InputError
from .schema import HardwareProfile

__all__ = ["profile_dirs", "profile_files", "load_profile_file", "load_profile", "host_profile", "ProfileError"]

HOST = "host"


class ProfileError(InputError):
    """A malformed hardware profile: the message is ``FILE:LINE: FIELD: problem``."""


def profile_dirs() -> list[Path]:
    """``$QUANTKIT_PROFILES`` (``:``-separated folders) first, then the shipped profiles: inside
    the installed package (``quantkit/profiles``, a link to the repository's ``profiles/`` in a
    checkout), or the checkout's ``profiles/`` where links are not followed."""
    dirs = [Path(p).expanduser() for p in os.environ.get("QUANTKIT_PROFILES", "").split(os.pathsep) if p]
    package = Path(__file__).resolve().parents[1]
    shipped = package / "profiles"
    return [*dirs, shipped if shipped.is_dir() else package.parent / "profiles"]


def profile_files() -> dict[str, Path]:
    """Every profile name found, mapped to its file (earlier folders win)."""
    found: dict[str, Path] = {}
    for folder in profile_dirs():
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            found.setdefault(path.stem, path)
    return found


def _node_at(root, loc: tuple) -> Any:
    """The YAML node at a pydantic error location, or the deepest ancestor that exists."""
    import yaml

    node = root
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == key), None)
            if match is None:
                match = next((k for k, v in node.value if str(k.value) == str(key)), None)
            if match is None:
                return node
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return node
    return node


def _field(loc: tuple) -> str:
    parts = []
    for key in loc:
        if isinstance(key, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{key}]"]
        elif key != "[key]" and not str(key).startswith(("function-", "constrained-")):
            parts.append(str(key))
    return ".".join(parts) or "(top level)"


def load_profile_file(path: str | Path, check_name: bool = True) -> HardwareProfile:
    """Read and validate one profile file; raise ProfileError naming file, line and field."""
    import pydantic
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read profile ({exc.__class__.__name__})") from exc
    try:  # one parse: the node tree keeps positions, the same tree builds the data
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ProfileError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from exc
    if not isinstance(data, dict):
        raise ProfileError(f"{path}:1: a profile is a mapping of fields (name, kind, memory, ...)")
    try:
        profile = HardwareProfile.model_validate(data)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        node = _node_at(root, first["loc"])
        line = node.start_mark.line + 1 if node is not None else 1
        message = first["msg"].removeprefix("Value error, ")
        extra = len(exc.errors()) - 1
        more = f" (and {extra} more problem{'s' if extra > 1 else ''})" if extra else ""
        raise ProfileError(f"{path}:{line}: {_field(first['loc'])}: {message}{more}") from exc
    if profile.measured:
        line = _node_at(root, ("measured",)).start_mark.line + 1
        raise ProfileError(f"{path}:{line}: measured: only the host profile is measured; a file describes a target")
    if check_name and profile.name != path.stem:
        line = _node_at(root, ("name",)).start_mark.line + 1
        raise ProfileError(f"{path}:{line}: name: {profile.name!r} differs from the file name {path.stem!r}")
    return profile


def load_profile(name: str, threads: int | None = None) -> HardwareProfile:
    """A profile by name (``host`` is measured now), or by path to a YAML file."""
    if name == HOST:
        return host_profile(threads)
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        return load_profile_file(name, check_name=False)
    files = profile_files()
    if name not in files:
        known = ", ".join([HOST, *sorted(files)])
        raise InputError(f"unknown hardware profile {name!r}; known: {known}")
    return load_profile_file(files[name])


def _fp32_flops(threads: int) -> float:
    """float32 matrix-multiply throughput of this host, measured (median of a few GEMMs)."""
    import statistics
    import time

    import numpy as np

    n = 1024
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def host_profile(threads: int | None = None, measured: dict | None = None) -> HardwareProfile:
    """This machine, measured now: RAM, memory bandwidth (or the profiler's ``measured`` host
    block, to measure it once), float32 GEMM throughput."""
    from ..footprint import available_memory_bytes
    from ..profile.roofline import host_info

    threads = threads or os.cpu_count() or 1
    host = measured or host_info(threads)
    available = available_memory_bytes() or host["ram_bytes"]
    return HardwareProfile(
        name=HOST,
        kind="cpu",
        description=f"this machine: {host['cpu_model']}, {host['cores']} cores ({threads} threads used)",
        memory={"total_bytes": host["ram_bytes"], "bandwidth_bytes_per_s": host["memory_bandwidth_bytes_per_s"],
                "reserved_bytes": max(0, host["ram_bytes"] - available)},
        compute={"fp32": _fp32_flops(threads)},
        runtimes=[
            {"name": "llama.cpp", "backend": "cpu", "formats": ["gguf"]},
            {"name": "onnxruntime", "backend": "CPUExecutionProvider", "formats": ["onnx"]},
            {"name": "transformers", "backend": "cpu", "formats": ["gptq", "bnb"]},
        ],
        measured=True,
    )
