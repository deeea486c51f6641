"""Built-in verification of a converted artifact against its source model.

Checks, in order: the artifact loads in its runtime; the runtime tokenizes each evaluation text
exactly as the source's HF tokenizer does; and, on windows of the first text, the runtime's
next-token distributions match the float32 transformers model (mean KL divergence). Float
outputs must stay under a tight KLD limit; quantized outputs report their KLD for information.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from .artifact import Artifact
from .errors import VerificationError
from .profile.quality import kl_divergence, top1_agreement
from .runtimes import get_runtime
from .runtimes.torch import TorchEncoder, TorchReference
from .source import Source

__all__ = ["Reference", "verify_artifact", "FLOAT_KLD_LIMITS", "FLOAT_COSINE_LIMITS", "cosine_rows"]

# mean KLD (nats) a lossless or near-lossless output must stay under
FLOAT_KLD_LIMITS = {"f32": 1e-3, "f16": 1e-3, "bf16": 5e-3, "fp32": 1e-3, "fp16": 1e-3}
# encoders: the least mean cosine similarity of a float output's embeddings to the source's
FLOAT_COSINE_LIMITS = {"fp32": 0.9999, "fp16": 0.999}


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.clip(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12, None)


@dataclass
class Reference:
    """The source model in float32 (an HF checkpoint), set up on first use.

    ``logits`` keeps each window's logits in a temporary file that has no name (unlinked as it is
    created, so a killed process leaves nothing on disk) and maps a window back only while it is
    compared: the artifacts of one conversion are verified on the same windows, and the logits of
    2,048 tokens of a 150k-token vocabulary are 1.2 GB, too much to hold beside the artifact's
    runtime (a mapping kept for every window would keep every page it touched resident)."""

    source: Source
    threads: int | None = None
    _model: TorchReference | None = None
    _encoder: TorchEncoder | None = None
    _cache: dict[tuple[int, ...], _Spilled] = field(default_factory=dict)

    @property
    def model(self) -> TorchReference:
        if self._model is None:
            self._model = TorchReference(self.source, threads=self.threads)
        return self._model

    def embed(self, texts: list[str], max_length: int = 512) -> np.ndarray:
        """Pooled sentence embeddings of an encoder source."""
        if self._encoder is None:
            self._encoder = TorchEncoder(self.source.path, threads=self.threads)
        return self._encoder.embed(texts, max_length)

    def logits(self, windows: list[list[int]], task=None) -> Iterator[np.ndarray]:
        """Logits of each window; the windows not seen before are computed in one pass."""
        missing = [list(w) for w in dict.fromkeys(map(tuple, windows)) if tuple(w) not in self._cache]
        if missing:
            for window, logits in zip(missing, self.model.logits(missing, task=task), strict=True):
                self._cache[tuple(window)] = _Spilled.of(logits)
        for window in windows:
            yield self._cache[tuple(window)].array()

    def close(self) -> None:
        for spilled in self._cache.values():
            spilled.file.close()  # an unnamed file goes with its last descriptor and mapping
        self._cache = {}


@dataclass
class _Spilled:
    """An array written to an unnamed temporary file, mapped back read-only on demand."""

    file: IO[bytes]
    dtype: np.dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, array: np.ndarray) -> _Spilled:
        file = tempfile.TemporaryFile(prefix="quantkit-reference-")  # unlinked at creation (POSIX)
        np.ascontiguousarray(array).tofile(file)  # written, not mapped: no page of it resident here
        file.flush()
        return cls(file, array.dtype, tuple(array.shape))

    def array(self) -> np.ndarray:
        """A read-only mapping of the array; its pages leave this process with the mapping."""
        return np.memmap(self.file, dtype=self.dtype, mode="r", shape=self.shape)


def _windows(tokens: list[int], bos: int | None, ctx: int, max_tokens: int) -> list[list[int]]:
    step = ctx - (1 if bos is not None else 0)
    windows, used = [], 0
    for start in range(0, len(tokens), step):
        if used >= max_tokens:
            break
        body = tokens[start : start + min(step, max_tokens - used)]
        if len(body) < 2:
            break
        windows.append(([bos] if bos is not None else []) + body)
        used += len(windows[-1])
    return windows


def _first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def verify_artifact(
    artifact: Artifact,
    reference: Reference | None,
    texts: dict[str, str],
    *,
    kld_limit: float | None,
    ctx: int = 512,
    max_tokens: int = 2048,
    threads: int | None = None,
) -> dict:
    """Verify one artifact; raise VerificationError on a failed check, return the figures."""
    # a document's leading whitespace is layout, and tokenizers disagree on it: SentencePiece and
    # llama.cpp put a dummy-prefix '▁' before a leading space ('▁▁第'), transformers 5's
    # Metaspace(prepend_scheme='first') does not ('▁第')
    texts = {name: text.lstrip() for name, text in texts.items()}
    runtime_cls = get_runtime(artifact.manifest["recipe"]["format"])
    runtime = runtime_cls(artifact.main_file, n_ctx=ctx, threads=threads)
    result: dict = {"tokenization": {}, "kld_limit": kld_limit}
    try:
        if reference is None:
            result["logits"] = "not compared: the source has no HF checkpoint to run as reference"
            return result
        if getattr(runtime, "kind", "decoder") == "encoder":
            return _verify_encoder(artifact, runtime, reference, texts, result)
        hf_tok = reference.model
        for name, text in texts.items():
            ours, theirs = runtime.tokenize(text), hf_tok.tokenize(text)
            if ours != theirs:
                i = _first_difference(ours, theirs)
                raise VerificationError(
                    f"{artifact.main_file.name}: {runtime.name} tokenizes the {name} text differently from the HF "
                    f"tokenizer at token {i} of {len(theirs)} ({runtime.name} {ours[i:i + 4]} vs HF {theirs[i:i + 4]})"
                )
            result["tokenization"][name] = {"tokens": len(theirs), "match": True}
        first = next(iter(texts.values()))
        bos = runtime.bos_id if runtime.add_bos else None
        ctx = min(ctx, getattr(runtime, "max_window", ctx))  # a static-shape model takes no more
        windows = _windows(hf_tok.tokenize(first), bos, ctx, max_tokens)
        klds, agree, n = [], [], 0
        for window, ref in zip(windows, reference.logits(windows), strict=True):
            out = runtime.logits(window)
            klds.append(kl_divergence(ref, out))
            agree.append(top1_agreement(ref, out) * len(window))
            n += len(window)
            del out, ref  # not alive while the next window's logits are made (300 MB each for 150k tokens)
        kld = np.concatenate(klds)
        result.update(
            tokens_scored=n,
            kld_mean=float(kld.mean()),
            kld_max=float(kld.max()),
            top1_agreement=float(sum(agree) / n),
        )
        if kld_limit is not None and result["kld_mean"] > kld_limit:
            raise VerificationError(
                f"{artifact.main_file.name}: {runtime.name} logits differ from transformers: mean KLD "
                f"{result['kld_mean']:.2e} > {kld_limit:.0e} over {n} tokens"
            )
        return result
    finally:
        runtime.close()


def _verify_encoder(artifact: Artifact, runtime, reference: Reference, texts: dict[str, str], result: dict) -> dict:
    """Encoders: pooled embeddings of passages of each text against the float32 source."""
    from .profile.corpus import segments

    scheme = artifact.manifest["recipe"]["scheme"]
    passages = [p for text in texts.values() for p in segments(text, limit=16)]
    cos = cosine_rows(runtime.embed(passages), reference.embed(passages))
    result.pop("kld_limit", None)
    result.update(passages=len(passages), cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
                  cosine_limit=FLOAT_COSINE_LIMITS.get(scheme))
    limit = FLOAT_COSINE_LIMITS.get(scheme)
    if limit is not None and result["cosine_mean"] < limit:
        raise VerificationError(
            f"{artifact.main_file.name}: {runtime.name} embeddings differ from transformers: mean cosine "
            f"{result['cosine_mean']:.6f} < {limit} over {len(passages)} passages"
        )
    return result
