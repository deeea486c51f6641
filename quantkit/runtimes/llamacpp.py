"""llama.cpp (through llama-cpp-python) as a runtime: tokenize and score GGUF artifacts."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NativeError, VerificationError
from . import register_runtime
from .hf import linear_params

__all__ = ["LlamaCppRuntime", "check_loads"]

_VOCAB_BYTES_PER_TOKEN = 192


@register_runtime("gguf")
class LlamaCppRuntime:
    """A GGUF model loaded for scoring: all positions' logits are kept (logits_all)."""

    name = "llama.cpp"

    def __init__(self, path: Path, n_ctx: int = 512, threads: int | None = None, logits_all: bool = True):
        import llama_cpp
        from llama_cpp import _logger

        from ..isolate import in_child

        # the same load in a child first: an abort there cannot take this process down; in the
        # child, llama.cpp's log stays on stderr (captured, the reason for a failure), elsewhere
        # its load-time notices are not for our users
        check_loads(Path(path), n_ctx=n_ctx, threads=threads, logits_all=logits_all)
        verbose = in_child()
        if not verbose:
            from ..log import route_llama_cpp

            route_llama_cpp()
        _logger.set_verbose(verbose)
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                logits_all=logits_all,
                # read, not mapped: ggml's CPU backend copies Q4_0/Q4_K/IQ4_NL weights into its
                # interleaved layout at load ("CPU_REPACK", on AVX2/NEON hosts) and a mapped
                # file's pages of them stay resident beside the copy (llama.cpp issue #16761:
                # 1.7x the file for a q4_k_m); read, every weight is resident once, repacked or
                # not. The profile measures what a host needs for the weights (what
                # quantkit.hardware.fit counts), and ship's lines say --no-mmap
                use_mmap=False,
                n_threads=threads or os.cpu_count(),
                seed=0,
                verbose=verbose,
            )
        except (ValueError, RuntimeError) as exc:
            raise VerificationError(f"llama.cpp could not load {path}: {exc}") from exc
        self.n_ctx = n_ctx

    @staticmethod
    def import_library() -> None:
        import llama_cpp  # noqa: F401

    @property
    def add_bos(self) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_get_add_bos(self._llm._model.vocab))

    @property
    def bos_id(self) -> int:
        return int(self._llm.token_bos())

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` with no BOS/EOS and no special-token parsing."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Next-token logits at every position of ``tokens`` (one window, <= n_ctx): a read-only
        view of llama-cpp-python's score buffer, valid until the next call (a copy would be
        another 300 MB per window for a 150k-token vocabulary)."""
        if len(tokens) > self.n_ctx:
            raise ValueError(f"window of {len(tokens)} tokens exceeds n_ctx={self.n_ctx}")
        self._llm.reset()
        self._llm.eval(tokens)
        view = self._llm.scores[: len(tokens)].view()
        view.flags.writeable = False
        return view

    def generate_timed(self, prompt: list[int], n_generate: int) -> dict[str, float]:
        """Greedy generation; returns prefill (time to first token) and decode seconds."""
        import time

        self._llm.reset()
        start = time.perf_counter()
        self._llm.eval(prompt)
        token = self._greedy_next()
        first = time.perf_counter()
        for _ in range(n_generate):
            self._llm.eval([token])
            token = self._greedy_next()
        end = time.perf_counter()
        return {"prefill_s": first - start, "decode_s": end - first}

    def _greedy_next(self) -> int:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self._llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self._llm.n_vocab(),))))

    @staticmethod
    def describe(path: Path) -> dict[str, Any]:
        """Sizes the memory model and roofline need, read from the GGUF header."""
        from ..formats.gguf.header import read_header

        reader = read_header(path)
        arch = reader.fields["general.architecture"]

        def hp(key: str, default=None):
            return reader.fields.get(f"{arch}.{key}", default)

        n_embd, n_head = int(hp("embedding_length")), int(hp("attention.head_count"))
        head_dim = int(hp("attention.key_length", n_embd // n_head))
        names = {t.name: int(t.n_bytes) for t in reader.tensors}
        embd = names.get("token_embd.weight", 0)
        tied = "output.weight" not in names
        n_vocab = len(reader.fields["tokenizer.ggml.tokens"])
        sizes = {"n_layers": int(hp("block_count")), "n_embd": n_embd, "n_head": n_head,
                 "n_head_kv": int(hp("attention.head_count_kv", n_head)), "head_dim": head_dim}
        # a mixture of experts reads, per token, only the routed experts' rows of the stacked
        # ffn_*_exps tensors: used / count of them (all of them stay resident)
        n_expert, n_used = int(hp("expert_count", 0) or 0), int(hp("expert_used_count", 0) or 0)
        active = n_used / n_expert if n_expert else 1.0
        experts = [t for t in reader.tensors if "_exps." in t.name]
        idle_bytes = int(sum(t.n_bytes for t in experts) * (1 - active))
        moe = {}
        if experts:
            block_params = sum(math.prod(t.shape) for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) >= 2)
            idle_params = int(sum(math.prod(t.shape) for t in experts) * (1 - active))
            moe = {"expert_count": n_expert, "expert_used_count": n_used, "expert_bytes": sum(t.n_bytes for t in experts),
                   "linear_params": block_params - idle_params, "active_params": block_params - idle_params}
        return {
            "n_layers": int(hp("block_count")),
            "n_embd": n_embd,
            "n_head": n_head,
            "n_head_kv": int(hp("attention.head_count_kv", n_head)),
            "head_dim": head_dim,
            "n_vocab": n_vocab,
            "tensor_bytes": sum(names.values()),
            # bytes a decode step reads: every weight, except the embedding table when the
            # output head is separate (then only one row of it is looked up per token)
            "bytes_read_per_token": sum(names.values()) - (0 if tied else embd) - idle_bytes,
            # the vocabulary's in-memory tables (token text, score and attributes, the
            # text->id hash map, the piece cache, the loader's copy of the GGUF arrays: about
            # 192 bytes a token) and the output buffer of one float32 logits row
            "runtime_overhead_bytes": n_vocab * (_VOCAB_BYTES_PER_TOKEN + 4),
            "linear_params": linear_params(sizes, int(hp("feed_forward_length", 4 * n_embd))),
            "max_ctx": int(hp("context_length", 0)) or None,
            "tensor_types": sorted({t.tensor_type.name.lower() for t in reader.tensors}),
            **moe,
        }

    def close(self) -> None:
        self._llm.close()


_LOADED: set[tuple] = set()  # (file identity, settings) already loaded once in a child


def check_loads(path: Path, *, vocab_only: bool = False, n_ctx: int = 512, threads: int | None = None,
                logits_all: bool = True) -> None:
    """Load ``path`` in llama.cpp in a child process, as :class:`LlamaCppRuntime` will (or only
    its vocabulary, which is quick): a GGML_ASSERT there is a NativeError here, with
    llama.cpp's own message. Each file and setting is checked once per process."""
    from ..isolate import in_child, run_isolated

    if in_child():
        return
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    settings = (True,) if vocab_only else (False, n_ctx, logits_all)
    # a full load covers the vocabulary-only one
    if (*key, *settings) in _LOADED or (vocab_only and any(k[:3] == key for k in _LOADED)):
        return
    args = {"path": str(path), "vocab_only": vocab_only, "n_ctx": n_ctx, "threads": threads, "logits_all": logits_all}
    run_isolated("quantkit.runtimes.llamacpp:load_in_child", args, what=f"llama.cpp loading {Path(path).name}")
    _LOADED.add((*key, *settings))


def load_in_child(args: dict, reporter) -> dict:
    """The child's side of :func:`check_loads`."""
    import llama_cpp

    from ..log import on_llama_log

    lines: list[str] = []

    def on_log(text: str) -> None:
        lines.append(text)
        sys.stderr.write(text)

    on_llama_log(on_log)
    path = Path(args["path"])
    if not args["vocab_only"]:
        LlamaCppRuntime(path, n_ctx=args["n_ctx"], threads=args["threads"], logits_all=args["logits_all"]).close()
        return {}
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        from ..isolate import native_message

        raise NativeError(f"llama.cpp cannot load {path.name}: {native_message(''.join(lines)) or 'no message'}")
    n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))
    llama_cpp.llama_model_free(model)
    return {"n_vocab": n_vocab}
