from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tiny_models import TOKENIZER_FOR, build_tiny_model, shared_text, train_byte_bpe, train_spm


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """quantkit's cache for the test session: the embedded model's files are shared with the
    user's cache (building them takes minutes); computed results (importance matrices, reference
    logits) start empty, so no test passes on what an older build computed."""
    from quantkit.embedded import cache_dir

    real, fresh = cache_dir(), tmp_path_factory.mktemp("quantkit-cache")
    for name in ("downloads", "models"):
        (real / name).mkdir(parents=True, exist_ok=True)
        (fresh / name).symlink_to(real / name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QUANTKIT_CACHE", str(fresh))
        yield fresh


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # tests never reach a hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizers_dir(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {"spm": train_spm(root / "spm"), "qwen2": train_byte_bpe(root, "qwen2"), "llama-bpe": train_byte_bpe(root, "llama-bpe")}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizers_dir):
    """tiny_model(arch) -> folder of a tiny random HF checkpoint (built once per session)."""
    root = tmp_path_factory.mktemp("tiny")
    built: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(arch, tokenizers_dir[TOKENIZER_FOR[arch]], root / arch)
        return built[arch]

    return make


@pytest.fixture
def tiny_copy(tiny_model, tmp_path):
    """tiny_copy(arch) -> a private copy of a tiny model that a test may damage."""

    def make(arch: str = "llama") -> Path:
        dst = tmp_path / f"{arch}-copy"
        shutil.copytree(tiny_model(arch), dst)
        return dst

    return make


@pytest.fixture(scope="session")
def verify_texts() -> dict[str, str]:
    return {"en": shared_text("tinyshakespeare-en.txt", 4000), "zh": shared_text("hongloumeng-zh.txt", 1500)}
