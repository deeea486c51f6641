"""ONNX artifacts in ONNX Runtime: causal LMs and encoders (sentence embeddings).

A decoder is scored window by window in an ONNX Runtime session of its graph (empty KV cache).
A decoder built for onnxruntime-genai (``genai_config.json`` beside it) generates through
``onnxruntime_genai``, the way its users run it; other decoders generate greedily with their
exported KV cache, or by re-running a static-shape window. The session and the generator are
made when first needed, so a process that only generates holds only the generator's copy.

Providers: CUDA when this onnxruntime build has it, else the CPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..formats.onnx.export import first_line
from ..formats.onnx.graph import OnnxSessionInputs, element_bytes, summarize_model
from . import register_runtime
from .hf import HFTokenizerMixin, config_sizes, linear_params, read_config
from .pooling import read_pooling

__all__ = ["OnnxRuntime"]


@register_runtime("onnx")
class OnnxRuntime(HFTokenizerMixin):
    name = "onnxruntime"

    def __init__(self, path: Path, n_ctx: int = 512, threads: int | None = None, logits_all: bool = True):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such ONNX model")
        available = ort.get_available_providers()
        self.providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.threads = threads
        self.genai = read_genai_config(self.path.parent)
        decoder = (self.genai or {}).get("model", {}).get("decoder", {})
        self.sliding_window = int((decoder.get("sliding_window") or {}).get("window_size") or 0)
        # a shared past/present buffer must be a window long even when empty; separate past and
        # present tensors: an empty past is empty
        shared = (self.genai or {}).get("search", {}).get("past_present_share_buffer")
        graph = summarize_model(self.path)
        self.inputs = OnnxSessionInputs.from_summary(graph, kv_dim=decoder.get("head_size"),
                                                     kv_window=self.sliding_window if shared else 0)
        self.outputs = list(graph["outputs"])
        self.present = [o for o in self.outputs if o.startswith("present.")]  # KV-cache outputs
        self.kind = "decoder" if "logits" in self.outputs else "encoder"
        self.n_ctx = n_ctx
        self._session = None
        self._generator_model = None
        self.tokenizer = AutoTokenizer.from_pretrained(self.path.parent, trust_remote_code=False)
        self.pooling = read_pooling(self.path.parent)

    @staticmethod
    def import_library() -> None:
        import onnxruntime  # noqa: F401
        import onnxruntime_genai  # noqa: F401
        import torch  # noqa: F401  (transformers 5 imports it when it loads a tokenizer: ~190 MB)
        import transformers  # noqa: F401

    @property
    def session(self):
        """The ONNX Runtime session, made (after a load in a child process) on first use."""
        if self._session is None:
            check_session(self.path, self.threads, self.providers)
            self._session = _session(self.path, self.threads, self.providers)
        return self._session

    # -- decoders ------------------------------------------------------------------------------
    @property
    def max_window(self) -> int:
        """The longest window one call scores: the fixed length of a static-shape model."""
        return self.inputs.fixed_length or self.n_ctx

    def logits(self, tokens: list[int]) -> np.ndarray:
        if self.kind != "decoder":
            raise InputError(f"{self.path}: an encoder has no next-token logits")
        out = self.session.run(["logits"], self.inputs.feeds(tokens))[0]
        return out[0, : len(tokens)].astype(np.float32)

    def generate_timed(self, prompt: list[int], n_generate: int) -> dict[str, float]:
        """Greedy decoding; prefill (time to first token) and decode seconds."""
        return self.generate(prompt, n_generate)[1]

    def generate(self, prompt: list[int], n_generate: int) -> tuple[list[int], dict[str, float]]:
        """Greedy decoding of ``n_generate`` tokens after the first: in onnxruntime-genai for
        the models built for it, else with the KV cache when the model has one, else by
        re-running the (static-shape) window with one more token a step. Returns the new tokens
        and the timings."""
        if self.genai is not None:
            return self._generate_genai(prompt, n_generate)
        step = self._step_with_cache if self.inputs.past else self._step_static
        state = {"tokens": list(prompt)}
        start = time.perf_counter()
        new = [step(state)]
        first = time.perf_counter()
        for _ in range(n_generate):
            new.append(step(state))
        return new, {"prefill_s": first - start, "decode_s": time.perf_counter() - first}

    def _generate_genai(self, prompt: list[int], n_generate: int) -> tuple[list[int], dict[str, float]]:
        import onnxruntime_genai as og

        if self._generator_model is None:
            config = og.Config(str(self.path.parent))
            if self.threads:
                config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                    "intra_op_num_threads": self.threads, "inter_op_num_threads": 1}}}}))
            self._generator_model = og.Model(config)
        params = og.GeneratorParams(self._generator_model)
        # the generator refuses a max_length below the sliding window of models that have one
        params.set_search_options(max_length=max(len(prompt) + n_generate + 2, self.sliding_window), do_sample=False)
        generator = og.Generator(self._generator_model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt)
        generator.generate_next_token()
        new = [int(generator.get_next_tokens()[0])]
        first = time.perf_counter()
        for _ in range(n_generate):
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
        return new, {"prefill_s": first - start, "decode_s": time.perf_counter() - first}

    def _step_with_cache(self, state: dict) -> int:
        present = self.present
        if "past" not in state:
            feeds = self.inputs.feeds(state["tokens"])
        else:
            length = len(state["tokens"])
            feeds = {"input_ids": np.array([state["tokens"][-1:]], dtype=np.int64),
                     "attention_mask": np.ones((1, length), dtype=np.int64)}
            if "position_ids" in self.inputs.names:
                feeds["position_ids"] = np.array([[length - 1]], dtype=np.int64)
            feeds.update(state["past"])
        out = self.session.run(["logits", *present], feeds)
        state["past"] = {name.replace("present.", "past_key_values."): v for name, v in zip(present, out[1:], strict=True)}
        token = int(out[0][0, -1].argmax())
        state["tokens"].append(token)
        return token

    def _step_static(self, state: dict) -> int:
        if len(state["tokens"]) >= self.max_window:
            raise InputError(f"{self.path}: generation passed this static-shape model's {self.max_window} tokens")
        token = int(self.logits(state["tokens"])[-1].argmax())
        state["tokens"].append(token)
        return token

    # -- encoders ------------------------------------------------------------------------------
    def embed(self, texts: list[str]) -> np.ndarray:
        """One pooled embedding per text, [n, dim] float32."""
        return np.concatenate([self._embed_one(text) for text in texts]) if texts else np.zeros((0, 0), np.float32)

    def _embed_one(self, text: str) -> np.ndarray:
        limit = min(x for x in (self.inputs.fixed_length, self.pooling.max_seq_length, self.n_ctx) if x)
        ids = self.tokenizer(text, truncation=True, max_length=limit, verbose=False)["input_ids"]
        feeds = self.inputs.feeds(ids, pad_id=self.tokenizer.pad_token_id or 0)
        states = self.session.run(["last_hidden_state"], feeds)[0]
        return self.pooling(states, feeds["attention_mask"])

    def encode_timed(self, texts: list[str]) -> dict[str, float]:
        start = time.perf_counter()
        self.embed(texts)
        return {"encode_s": time.perf_counter() - start}

    # -- sizes for the memory model -----------------------------------------------------------
    @classmethod
    def describe(cls, path: Path) -> dict[str, Any]:
        path = Path(path)
        graph = summarize_model(path)
        config = read_config(path.parent)
        kind = "decoder" if "logits" in graph["outputs"] else "encoder"
        past = [t for name, t in graph["input_types"].items() if name.startswith("past_key_values.")]
        kv_bytes = int(element_bytes(past[0])) if past else 0  # the KV cache's element type
        sizes = config_sizes(config)
        # weights in external data are mapped, not parsed: an embedding table read by Gather is
        # resident only in the rows used (Gemma 3 270M int8: its 671 MB float32 table)
        external = bool(graph.get("external_data"))
        genai = read_genai_config(path.parent) is not None
        return {
            **sizes,
            "kind": kind,
            "tensor_bytes": graph["weight_bytes"] - (graph["embedding_bytes"] if external else 0),
            # mapped pages stay resident beside the packed copies the CPU kernels make of them
            "repack_bytes": graph.get("packed_weight_bytes", 0) if external else 0,
            # the builder's graphs return logits at every prompt position, held for the prefill
            "logits_every_position": genai,
            "kv_bytes_per_element": kv_bytes if kind == "decoder" else 0,
            # decoding reads every weight once, except embedding tables (one row per token)
            "bytes_read_per_token": graph["weight_bytes"] - graph["embedding_bytes"],
            # ONNX Runtime parses the .onnx file into memory before it builds its own tensors
            # (weights stored inline are held twice for a moment)
            "load_transient_bytes": path.stat().st_size if not external else 0,
            "runtime_overhead_bytes": cls.tokenizer_bytes(path.parent),
            "linear_params": linear_params(sizes, int(config.get("intermediate_size") or 4 * sizes["n_embd"]), gated=kind == "decoder"),
            "max_ctx": config.get("max_position_embeddings"),
            "graph": graph,
        }

    def close(self) -> None:
        self._session = None
        self._generator_model = None


def read_genai_config(folder: Path) -> dict | None:
    """``genai_config.json`` of an onnxruntime-genai model folder, or None."""
    path = Path(folder) / "genai_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc.__class__.__name__})") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model", {}).get("decoder"), dict):
        raise InputError(f"{path}: not an onnxruntime-genai config (no model.decoder section)")
    return config



def _session(path: Path, threads: int | None, providers: list[str]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # ONNX Runtime raises its own Fail/InvalidGraph/... types
        detail = first_line(exc)
        raise InputError(f"{path}: ONNX Runtime cannot load the model ({detail})") from exc


_CHECKED: set[tuple] = set()


def check_session(path: Path, threads: int | None, providers: list[str]) -> None:
    """Create the session once in a child process first: an abort inside ONNX Runtime's graph
    loading there is a NativeError here, with its message. Once per file and setting."""
    from ..isolate import in_child, run_isolated

    if in_child():
        return
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, threads, tuple(providers))
    if key not in _CHECKED:
        run_isolated("quantkit.runtimes.onnx:session_in_child",
                     {"path": str(path), "threads": threads, "providers": providers},
                     what=f"ONNX Runtime loading {path.name}")
        _CHECKED.add(key)


def session_in_child(args: dict, reporter) -> dict:
    """The child's side of :func:`check_session`."""
    _session(Path(args["path"]), args["threads"], args["providers"])
    return {}
