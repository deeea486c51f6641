"""Resolve what the user named (HF folder, hub id, GGUF file, or nothing) into a validated Source.

Weights are read from safetensors (one tensor at a time, with plain reads) or GGUF. Pickle
checkpoints (.bin/.pt/.pth) execute code when loaded, so they are refused unless the caller
passes ``allow_pickle=True``; even then they are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifact import sha256_file
from .errors import PickleRefusedError, SourceError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Source", "TensorInfo", "resolve_source", "rope_parameters", "Experts", "experts_of", "DEFAULT_SOURCE_ID",
           "DTYPE_BYTES"]

DEFAULT_SOURCE_ID = "embedded:gemma-3-270m"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: F32, F16, BF16, ...
    file: Path
    offset: int = -1  # safetensors: where the tensor's bytes start in ``file``


@dataclass
class Source:
    """A validated model source. ``kind`` is 'hf' (a checkpoint folder) or 'gguf' (one file)."""

    kind: str
    path: Path
    id: str
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    weight_format: str = "safetensors"

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the config, tokenizer and weight files' own sha256s."""
        if self.kind == "gguf":
            return sha256_file(self.path)
        digest = hashlib.sha256()
        files = {"config.json"} | {t.file.name for t in self.tensors.values()}
        files |= {n for n in _TOKENIZER_FILES if (self.path / n).exists()}
        for name in sorted(files):
            digest.update(f"{name}\0{sha256_file(self.path / name)}\n".encode())
        return digest.hexdigest()

    @property
    def dtypes(self) -> set[str]:
        return {t.dtype for t in self.tensors.values()}

    def to_manifest(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "fingerprint": self.fingerprint}

    @contextlib.contextmanager
    def open_tensors(self) -> Iterator[TensorReader]:
        """Open the weight files for streaming reads: ``reader.get(name)`` loads one tensor."""
        with contextlib.ExitStack() as stack:
            yield TensorReader(self, stack)


_FLOAT_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}
#: bytes per element of each safetensors dtype
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class TensorReader:
    """Loads one float tensor at a time as a float32 numpy array.

    safetensors are read with plain file reads, not memory-mapped: pages of a mapped file stay in
    the process's resident set once touched, so a streaming conversion of a checkpoint would show
    a peak RSS that grows by the whole file. Pickles (only with allow_pickle) go through torch."""

    def __init__(self, source: Source, stack: contextlib.ExitStack):
        self._source = source
        self._stack = stack
        self._handles: dict[Path, Any] = {}

    def get(self, name: str) -> np.ndarray:
        info = self._source.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = self._open(info.file)
        if isinstance(handle, dict):  # a pickle's state dict of torch tensors
            import torch

            return handle[name].detach().to(torch.float32).numpy()
        return self._read(handle, info, 0, math.prod(info.shape), info.shape)

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a tensor as float32 (an output head read in chunks)."""
        info = self._source.tensors[name]
        if self._source.weight_format == "pickle":
            return self.get(name)[start:stop]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = self._open(info.file)
        width = math.prod(info.shape[1:])
        return self._read(handle, info, start * width, (stop - start) * width, (stop - start, *info.shape[1:]))

    @staticmethod
    def _read(handle, info: TensorInfo, first: int, count: int, shape: tuple[int, ...]) -> np.ndarray:
        import numpy as np

        if info.dtype not in _FLOAT_DTYPES:
            raise SourceError(f"tensor {info.name!r} has dtype {info.dtype}; expected F32, F16 or BF16")
        handle.seek(info.offset + first * DTYPE_BYTES[info.dtype])
        data = np.fromfile(handle, dtype=_FLOAT_DTYPES[info.dtype], count=count)
        if data.size != count:
            raise SourceError(f"{info.file}: truncated while reading tensor {info.name!r}")
        if info.dtype == "BF16":  # bfloat16 is the upper half of a float32
            data = (data.astype(np.uint32) << 16).view(np.float32)
        return data.astype(np.float32, copy=False).reshape(shape)

    def _open(self, file: Path):
        if self._source.weight_format == "pickle":
            return _load_pickle(file)
        try:
            return self._stack.enter_context(open(file, "rb"))
        except OSError as exc:
            raise SourceError(f"{file}: cannot read safetensors file: {exc}") from exc


def rope_parameters(config: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """The RoPE settings of one kind of attention layer, flat (``rope_type``, ``rope_theta`` and
    the scaling fields), from either config.json layout: transformers 4's top-level ``rope_theta``
    / ``rope_scaling`` (Gemma 3's sliding layers: ``rope_local_base_freq``) or transformers 5's
    ``rope_parameters``, flat or keyed by layer type (Gemma 3: ``full_attention`` /
    ``sliding_attention``)."""
    nested = config.get("rope_parameters")
    if isinstance(nested, dict) and nested:
        if layer_type in nested and isinstance(nested[layer_type], dict):
            params = dict(nested[layer_type])
        elif all(isinstance(v, dict) for v in nested.values()):
            params = dict(nested.get("full_attention") or next(iter(nested.values())))
        else:
            params = dict(nested)
    else:
        params = dict(config.get("rope_scaling") or {})
        if layer_type == "sliding_attention" and "rope_local_base_freq" in config:
            params = {"rope_theta": config["rope_local_base_freq"]}  # Gemma 3: local layers are unscaled
        elif "rope_theta" in config:
            params["rope_theta"] = config["rope_theta"]
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params["rope_theta"] = float(params.get("rope_theta", 10000.0))
    return params


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts config, read the same way for every family (``experts_of``)."""

    count: int  # routed experts per MoE block
    used: int  # routed experts a token goes through
    ff: int  # feed-forward width of one routed expert
    shared_ff: int  # total width of the shared expert(s), 0 without
    dense_blocks: int  # leading blocks with a dense feed-forward (DeepSeek's first_k_dense_replace)
    gating: str  # "softmax" or "sigmoid" over the router's scores
    normalize: bool  # the chosen experts' weights renormalised to sum to 1
    scale: float  # routed output multiplied by this (1.0: not scaled)
    groups: int  # expert groups for group-limited routing (1: none)
    groups_used: int

    def moe_blocks(self, n_layers: int) -> int:
        return n_layers - self.dense_blocks


# config.json model_type -> its names for the fields of Experts (ff, shared width or shared count
# x ff, leading dense blocks); the expert count has one of three names (transformers 5 saves
# Qwen's num_experts as num_local_experts), the rest the same name in every family
_EXPERT_FIELDS: dict[str, dict[str, str]] = {
    "mixtral": {"ff": "intermediate_size"},
    "olmoe": {"ff": "intermediate_size"},
    "qwen2_moe": {"ff": "moe_intermediate_size", "shared_ff": "shared_expert_intermediate_size"},
    "qwen3_moe": {"ff": "moe_intermediate_size"},
    **{t: {"ff": "moe_intermediate_size", "shared": "n_shared_experts", "dense_blocks": "first_k_dense_replace"}
       for t in ("deepseek_v2", "deepseek_v3", "glm4_moe")},
}
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
# the gating function, top-k normalisation and scale each family's reference code uses when its
# config does not say (Mixtral always normalises; DeepSeek V3 and GLM-4.5 score with a sigmoid)
_EXPERT_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {"normalize": True},
    "deepseek_v3": {"gating": "sigmoid"},
    "glm4_moe": {"gating": "sigmoid"},
}


def experts_of(config: dict[str, Any]) -> Experts | None:
    """The mixture-of-experts settings of an HF config.json, or None for a dense model."""
    from .errors import UnsupportedArchitectureError

    config = config.get("text_config") or config
    fields = _EXPERT_FIELDS.get(str(config.get("model_type")))
    if fields is None:
        return None
    defaults = _EXPERT_DEFAULTS.get(str(config["model_type"]), {})
    try:
        count = int(next((config[k] for k in _EXPERT_COUNT_KEYS if config.get(k) is not None), None) or config["num_experts"])
        used, ff = int(config["num_experts_per_tok"]), int(config[fields["ff"]])
        if "shared_ff" in fields:
            shared_ff = int(config.get(fields["shared_ff"]) or 0)
        else:
            shared_ff = int(config.get(fields.get("shared", ""), 0) or 0) * ff
        gating = str(config.get("scoring_func") or defaults.get("gating", "softmax"))
        normalize = bool(config.get("norm_topk_prob", defaults.get("normalize", False)))
        experts = Experts(
            count=count, used=used, ff=ff, shared_ff=shared_ff,
            dense_blocks=int(config.get(fields.get("dense_blocks", ""), 0) or 0),
            gating=gating, normalize=normalize, scale=float(config.get("routed_scaling_factor") or 1.0),
            groups=int(config.get("n_group") or 1), groups_used=int(config.get("topk_group") or 1),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UnsupportedArchitectureError(f"config.json of a {config.get('model_type')} model lacks a usable {exc} "
                                           "mixture-of-experts setting") from exc
    if not 0 < experts.used <= experts.count or experts.ff <= 0:
        raise UnsupportedArchitectureError(f"config.json routes {experts.used} of {experts.count} experts of width "
                                           f"{experts.ff}: not a usable mixture of experts")
    if experts.gating not in ("softmax", "sigmoid"):
        raise UnsupportedArchitectureError(f"expert gating function {experts.gating!r} is not supported (softmax or sigmoid)")
    # layer patterns quantkit does not model: every block past the leading dense ones is MoE
    if int(config.get("decoder_sparse_step") or 1) != 1 or config.get("mlp_only_layers") or int(config.get("moe_layer_freq") or 1) != 1:
        raise UnsupportedArchitectureError("a mixture of experts with dense blocks between the MoE blocks (decoder_sparse_step, "
                                           "mlp_only_layers or moe_layer_freq) is not supported")
    return experts


def _load_pickle(file: Path) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise SourceError(f"{file}: cannot load pickle checkpoint: {exc}") from exc
    return state.get("state_dict", state) if isinstance(state, dict) else {}


def resolve_source(
    spec: str | os.PathLike | None,
    *,
    allow_pickle: bool = False,
    revision: str | None = None,
    shape_only: bool = False,
) -> Source:
    """Turn a path, hub id or None (the embedded default model) into a validated Source.
    ``shape_only``: the model's shape is all the caller needs (estimates): a folder may hold a
    config.json without weights, and a hub id fetches only its JSON files."""
    if spec is None or str(spec) == DEFAULT_SOURCE_ID:
        from .embedded import default_model_dir

        return _hf_source(default_model_dir(), DEFAULT_SOURCE_ID, allow_pickle=False)
    path = Path(spec).expanduser()
    if path.is_file():
        return _gguf_source(path)
    if path.is_dir():
        return _hf_source(path, str(spec), allow_pickle=allow_pickle, shape_only=shape_only)
    if _HUB_ID.match(str(spec)) and not str(spec).startswith((".", "/")):
        repo, _, rev = str(spec).partition("@")
        folder = _download(repo, rev or revision, allow_pickle=allow_pickle, shape_only=shape_only)
        return _hf_source(folder, str(spec), allow_pickle=allow_pickle, shape_only=shape_only)
    raise SourceError(f"{spec}: no such file or folder, and not a hub id of the form org/name")


def _download(repo_id: str, revision: str | None, *, allow_pickle: bool, shape_only: bool = False) -> Path:
    """Fetch a checkpoint from the hub (or the HF cache); weights as safetensors unless allowed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
    if shape_only:
        patterns = ["*.json"]
    elif allow_pickle:
        patterns += [f"*{s}" for s in _PICKLE_SUFFIXES]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise SourceError(
            f"{repo_id}: not in the Hugging Face cache and {why}; download it first or pass a local folder"
        ) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
        raise SourceError(f"{repo_id}: {type(exc).__name__} from the hub ({str(exc).splitlines()[0]})") from exc
    except OSError as exc:
        raise SourceError(f"{repo_id}: download failed: {exc}") from exc


def _hf_source(folder: Path, source_id: str, *, allow_pickle: bool, shape_only: bool = False) -> Source:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SourceError(f"{folder}: no config.json; not a Hugging Face checkpoint folder")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{config_path}: not valid JSON ({exc})") from exc
    if shape_only and not any(folder.glob("*.safetensors")):
        tensors, weight_format = {}, "none"  # config.json alone (or pickles, never opened): the shape comes from it
    else:
        tensors, weight_format = _index_weights(folder, allow_pickle=allow_pickle)
    name = source_id.split(":", 1)[-1].rstrip("/").split("/")[-1] or folder.name
    return Source("hf", folder, source_id, name, config, tensors, weight_format)


def _index_weights(folder: Path, *, allow_pickle: bool) -> tuple[dict[str, TensorInfo], str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise SourceError(f"{index}: malformed safetensors index ({type(exc).__name__}: {exc})") from exc
        if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) and f and not Path(f).is_absolute() and ".." not in Path(f).parts for f in weight_map.values()
        ):
            raise SourceError(f"{index}: malformed safetensors index (weight_map must map tensor names to files in the folder)")
        files = sorted({folder / f for f in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if files:
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            if not file.is_file():
                raise SourceError(f"{file}: listed in the safetensors index but missing")
            header, data_start = _read_safetensors_header(file)
            for name, meta in header.items():
                tensors[name] = TensorInfo(name, tuple(meta["shape"]), meta["dtype"], file, data_start + meta["data_offsets"][0])
        return tensors, "safetensors"
    pickles = sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if not pickles:
        raise SourceError(f"{folder}: no weights found (*.safetensors, or pickle files with --allow-pickle)")
    if not allow_pickle:
        raise PickleRefusedError(
            f"{folder}: only pickle weights ({pickles[0].name}); pickles can run code when loaded, "
            "pass --allow-pickle if you trust this checkpoint"
        )
    tensors = {}
    for file in pickles:
        for name, tensor in _load_pickle(file).items():
            if hasattr(tensor, "shape"):
                dtype = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}
                tensors[name] = TensorInfo(name, tuple(tensor.shape), dtype.get(str(tensor.dtype), str(tensor.dtype)), file)
    return tensors, "pickle"


def _read_safetensors_header(file: Path) -> tuple[dict[str, Any], int]:
    """Parse and check a safetensors header: (tensor entries, where the data starts); a truncated
    or corrupt file is a SourceError."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise SourceError(f"{file}: truncated safetensors file ({size} bytes, no header)")
        header_bytes = int.from_bytes(head, "little")
        if header_bytes > min(size - 8, _MAX_HEADER_BYTES):
            raise SourceError(f"{file}: corrupt or truncated safetensors file (header length {header_bytes} > file size)")
        try:
            header = json.loads(fh.read(header_bytes))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SourceError(f"{file}: corrupt safetensors header ({exc.__class__.__name__})") from exc
    if not isinstance(header, dict):
        raise SourceError(f"{file}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    for name, meta in header.items():
        if not (isinstance(meta, dict) and isinstance(meta.get("dtype"), str) and _int_list(meta.get("shape"))
                and _int_list(meta.get("data_offsets")) and len(meta["data_offsets"]) == 2):
            raise SourceError(f"{file}: corrupt safetensors header (tensor {name!r} needs a dtype, a shape and two data offsets)")
    try:
        # tensors are read at these offsets: the byte ranges must tile the data exactly, each as
        # long as its shape says
        position = 0
        for name, meta in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            start, end = meta["data_offsets"]
            if start != position or end < start:
                raise SourceError(f"{file}: corrupt safetensors header (tensor {name!r} starts at byte {start}, expected {position})")
            if meta["dtype"] in DTYPE_BYTES and end - start != math.prod(meta["shape"]) * DTYPE_BYTES[meta["dtype"]]:
                raise SourceError(f"{file}: corrupt safetensors header (tensor {name!r} has {end - start} bytes for shape {meta['shape']})")
            position = end
    except (TypeError, KeyError, IndexError, ValueError) as exc:
        raise SourceError(f"{file}: corrupt safetensors header (bad tensor entry)") from exc
    data_end = position  # where the last tensor ends
    if 8 + header_bytes + data_end != size:
        raise SourceError(
            f"{file}: truncated or corrupt safetensors file (expected {8 + header_bytes + data_end} bytes, found {size})"
        )
    return header, 8 + header_bytes


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _gguf_source(path: Path) -> Source:
    from .formats.gguf.header import read_gguf_summary

    if path.suffix != ".gguf":
        raise SourceError(f"{path}: a file source must be a .gguf file (or pass a checkpoint folder)")
    summary = read_gguf_summary(path)
    return Source("gguf", path, str(path), path.stem, config=summary, weight_format="gguf")
