"""The layer-streaming engine: an HF causal LM run one decoder block at a time from safetensors.

Every path that needs the source model's own numbers goes through here: verification and the
profiler's reference logits, GPTQ's and RTN's block loop. The model is built by transformers with
its parameters on the meta device (buffers such as rotary frequencies are real); the inputs of
every window are captured at block 0 with each block's keyword arguments (masks, rotary
embeddings), then each block is loaded from the checkpoint (upcast to float32), given to the
caller, run on every window's hidden states and released before the next one is loaded. The
output head runs last, one window at a time and in row chunks. Memory follows one block, the
embedding rows the windows use, one head chunk and the windows' hidden states, never the
number of layers (the same schedule as GPTQ's reference code and llm-compressor's sequential
pipeline).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConversionError
from ..source import Source

__all__ = ["Layout", "LAYOUTS", "LayerStream", "BlockStep", "HEAD_CHUNK_BYTES", "parameters_on_meta", "largest_block_bytes",
           "head_logits", "embed_compact"]

#: float32 bytes of output-head rows multiplied at a time (the head of a 150k vocabulary is 1-2 GB)
HEAD_CHUNK_BYTES = 128 << 20


@dataclass(frozen=True)
class Layout:
    """Where a transformers causal LM keeps its parts (module paths, checkpoint names alike)."""

    base: str = "model"  # the decoder stack without the head
    embed: str = "model.embed_tokens"
    blocks: str = "model.layers"
    norm: str = "model.norm"
    head: str = "lm_head"
    # a mixture-of-experts block: transformers 5 keeps each block's routed experts as two stacked
    # parameters, ``mlp.experts.gate_up_proj`` [experts, 2 x ffn, hidden] (gate rows first) and
    # ``mlp.experts.down_proj`` [experts, hidden, ffn]; checkpoints store one matrix per expert
    # and part, ``{moe}.experts.{e}.{leaf}.weight`` with the leaves of gate, up and down, where
    # ``moe`` is the checkpoint's name of the module transformers calls ``mlp``
    moe: str = "mlp"
    expert_leaves: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def checkpoint_parts(self, param: str, shape: tuple[int, ...]) -> list[list[str]]:
        """The checkpoint tensors module parameter ``param`` (full path) is read from: one, or for
        a stacked expert parameter, per expert the matrices concatenated along rows."""
        stored = param.replace(".mlp.", f".{self.moe}.", 1) if self.moe != "mlp" else param
        owner, _, leaf = stored.rpartition(f".{self.moe}.experts.")
        if not owner or leaf not in ("gate_up_proj", "down_proj"):
            return [[stored]]
        gate, up, down = self.expert_leaves
        parts = (gate, up) if leaf == "gate_up_proj" else (down,)
        return [[f"{owner}.{self.moe}.experts.{e}.{part}.weight" for part in parts] for e in range(shape[0])]

    def parse_expert(self, name: str) -> tuple[str, int, str] | None:
        """(block path, expert, "gate" | "up" | "down") of one routed expert's matrix, under the
        checkpoint's names (``{moe}.experts.{e}.{leaf}``) or transformers 5's
        (``mlp.experts.{e}.{gate,up,down}_proj``), with or without ``.weight``; else None."""
        m = re.match(rf"^(.+)\.(?:mlp|{re.escape(self.moe)})\.experts\.(\d+)\.(\w+?)(?:\.weight)?$", name)
        if not m:
            return None
        parts = {**dict(zip(self.expert_leaves, ("gate", "up", "down"), strict=True)),
                 "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
        return (m[1], int(m[2]), parts[m[3]]) if m[3] in parts else None


# config.json model_type -> layout; every supported family keeps Llama's names (Mixtral its own
# names for the experts)
LAYOUTS: dict[str, Layout] = {
    **{name: Layout() for name in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2", "phi3", "glm4", "qwen2_moe",
                                   "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe")},
    "mixtral": Layout(moe="block_sparse_moe", expert_leaves=("w1", "w3", "w2")),
}


class _StopCapture(Exception):
    pass


#: allocations from this size up get their own mapping, returned to the system when freed
MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the system. By default glibc raises its mmap
    threshold to the size of each mapped block freed (up to 32 MB), after which the engine's
    per-block tensors come from the heap and stay resident once freed: verification of a
    0.5B-parameter model peaked at 4.1 GB instead of 3.0 GB. Fixing the threshold turns that
    dynamic behaviour off (``mallopt(M_MMAP_THRESHOLD)``; a no-op where libc is not glibc)."""
    _glibc("mallopt", -3, MMAP_THRESHOLD_BYTES)  # M_MMAP_THRESHOLD


def trim_heap() -> None:
    """Give the heap's free pages back to the system (``malloc_trim``; a no-op where libc is not
    glibc): after a pass of the engine whose buffers the process no longer needs."""
    _glibc("malloc_trim", 0)


def _glibc(function: str, *args: int) -> None:
    """Call one of glibc's malloc tunables; nothing where the C library has no such function."""
    import ctypes
    import ctypes.util

    try:
        getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), function)(*args)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with their parameters on the meta device and their buffers real (rotary
    frequencies, Gemma's embedding scale are computed in ``__init__`` and not stored)."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":  # a tied head re-registers the embedding's
            param = torch.nn.Parameter(param.to("meta"), requires_grad=False)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _to(obj: Any, device, memo: dict[int, Any]) -> Any:
    """``obj`` (tensors nested in tuples, lists, dicts) on ``device``; shared tensors stay shared."""
    import torch

    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


def head_logits(hidden, rows: int, width: int, read_rows, device=None):
    """float32 logits ``hidden @ W.T`` of an output head ``W`` [rows, width] that is read in row
    chunks of ``HEAD_CHUNK_BYTES`` (``read_rows(start, stop)``: those rows as float32), so that
    a 150k-row head is never whole in float32 (1-2 GB)."""
    import torch

    chunk = max(1, HEAD_CHUNK_BYTES // (4 * width))
    out = torch.empty((*hidden.shape[:-1], rows), dtype=torch.float32)
    for start in range(0, rows, chunk):
        weight = read_rows(start, min(rows, start + chunk))
        out[..., start : start + weight.shape[0]] = (hidden @ weight.to(device or hidden.device).T).cpu()
    return out


def embed_compact(embed, ids, read_rows):
    """Give the embedding module ``embed`` a float32 table of only the rows ``ids`` use
    (``read_rows(used)`` returns them) and return ``ids`` as positions in that table: the
    module's own forward (Gemma's scale included) then runs as on the whole table."""
    import torch

    used, positions = torch.unique(ids, return_inverse=True)
    embed.padding_idx = None  # only gradients use it, and F.embedding checks it against the (compact) table
    embed._parameters["weight"] = torch.nn.Parameter(read_rows(used), requires_grad=False)
    return positions


def is_experts(module) -> bool:
    """A transformers 5 routed-experts module: stacked ``gate_up_proj`` / ``down_proj``."""
    return hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and hasattr(module, "act_fn")


def expert_inputs(module, args: tuple, kwargs: dict, *, down: bool = True):
    """What each routed expert of ``module`` (see :func:`is_experts`) multiplies in one call,
    from the call's arguments (``hidden_states`` [tokens, hidden], ``top_k_index`` [tokens, k]):
    per expert that got tokens, ``(e, x, h)`` with ``x`` its tokens' inputs to gate/up and ``h``
    the input to its down projection, ``act(x @ gate.T) * (x @ up.T)`` (None when not ``down``:
    it costs the expert's gate/up products). GPTQ and the importance matrix see each expert's own
    tokens only."""
    import torch

    hidden = args[0] if args else kwargs["hidden_states"]
    index = args[1] if len(args) > 1 else kwargs["top_k_index"]
    hidden = hidden.reshape(-1, hidden.shape[-1]).float()
    index = index.reshape(hidden.shape[0], -1)
    for e in torch.unique(index).tolist():
        if not 0 <= e < module.gate_up_proj.shape[0]:  # a padding id some routers use for dropped slots
            continue
        tokens = (index == e).any(dim=1).nonzero().flatten()
        x = hidden[tokens]
        if not down:
            yield e, x, None
            continue
        gate, up = torch.nn.functional.linear(x, module.gate_up_proj[e].float()).chunk(2, dim=-1)
        yield e, x, module.act_fn(gate) * up


@dataclass
class BlockStep:
    """One decoder block, loaded, with the hidden states of every window that enter it.

    The caller may change the block's weights (GPTQ replaces them by their quantized values) and
    run it on inputs (``forward``) as often as it needs; the engine then maps ``inputs`` to the
    next block's inputs with the weights as the caller left them."""

    index: int
    count: int
    block: Any
    inputs: list[Any]
    kwargs: list[dict[str, Any]]

    def forward(self, i: int):
        kwargs = dict(self.kwargs[i])
        extra = kwargs.pop("_extra_args", ())
        out = self.block(self.inputs[i], *extra, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


class LayerStream:
    """A causal LM of an HF checkpoint (``source``), run block by block in float32."""

    def __init__(self, source: Source, device=None):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        return_freed_memory()
        self.source = source
        self.device = torch.device(device or "cpu")
        self.layout = LAYOUTS.get(source.config.get("model_type"), Layout())
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=False)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        with no_init_weights(), parameters_on_meta():
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False).eval()
            self.model.tie_weights()  # transformers 5 ties at load time, not in from_config
        for module in self.model.modules():  # buffers only: the parameters stay on meta until loaded
            for key, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[key] = buffer.to(self.device)
        try:
            self.blocks = self.model.get_submodule(self.layout.blocks)
            self.base = self.model.get_submodule(self.layout.base)
        except AttributeError as exc:
            raise ConversionError(f"{source.id}: the model has no {exc}; its layout does not match the architecture table") from exc
        head, embed = (self.model.get_submodule(p).weight for p in (self.layout.head, self.layout.embed))
        self.tied = head is embed
        self.head_name = (self.layout.embed if self.tied else self.layout.head) + ".weight"
        if self.head_name not in source.tensors:
            raise ConversionError(f"{source.id}: the checkpoint has no output head {self.head_name!r}")

    # -- weights ---------------------------------------------------------------------------------
    def load(self, prefix: str, reader) -> Any:
        """Load the module at ``prefix`` from the checkpoint (float32, on the engine's device)."""
        import torch

        module = self.model.get_submodule(prefix)
        for name, param in list(module.named_parameters()):
            value = self._read(f"{prefix}.{name}", tuple(param.shape), reader)
            owner, _, leaf = name.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            target._parameters[leaf] = torch.nn.Parameter(value.to(self.device), requires_grad=False)
        for name, buffer in list(module.named_buffers()):  # stored buffers (DeepSeek V3's router bias)
            full = f"{prefix}.{name}"
            if self.layout.checkpoint_parts(full, tuple(buffer.shape))[0][0] in self.source.tensors:
                owner, _, leaf = name.rpartition(".")
                target = module.get_submodule(owner) if owner else module
                target._buffers[leaf] = self._read(full, tuple(buffer.shape), reader).to(buffer.dtype).to(self.device)
        return module

    def _read(self, full: str, shape: tuple[int, ...], reader):
        """float32 tensor ``full`` of the module tree, from its checkpoint tensor, or stacked one
        expert at a time from the per-expert matrices it is made of."""
        import torch

        parts = [[full]] if full in self.source.tensors else self.layout.checkpoint_parts(full, shape)
        for name in (n for group in parts for n in group):
            if name not in self.source.tensors:
                raise ConversionError(f"{self.source.id}: the checkpoint has no tensor {name!r} that its config.json implies")
        if len(parts) == 1 and len(parts[0]) == 1:
            value = torch.from_numpy(reader.get(parts[0][0]))
        else:
            value = torch.empty(shape, dtype=torch.float32)
            for e, group in enumerate(parts):
                row = 0
                for name in group:
                    piece = torch.from_numpy(reader.get(name))
                    if piece.ndim != 2 or piece.shape[1] != shape[2] or row + piece.shape[0] > shape[1]:
                        raise ConversionError(f"{self.source.id}: {name} has shape {tuple(piece.shape)}; config.json implies "
                                              f"rows of {shape[2]} in a stack of {tuple(shape)}")
                    value[e, row : row + piece.shape[0]] = piece
                    row += piece.shape[0]
                if row != shape[1]:
                    raise ConversionError(f"{self.source.id}: expert {e} of {full} has {row} rows; config.json implies {shape[1]}")
        if tuple(value.shape) != shape:
            raise ConversionError(f"{self.source.id}: {full} has shape {tuple(value.shape)}; config.json implies {shape}")
        return value

    def release(self, prefix: str) -> None:
        """Free the parameters of the module at ``prefix`` (back to meta)."""
        import torch

        for sub in self.model.get_submodule(prefix).modules():
            for leaf, param in list(sub._parameters.items()):
                if param is not None:
                    sub._parameters[leaf] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    # -- the run ---------------------------------------------------------------------------------
    def _capture(self, windows: Sequence[list[int]], reader) -> tuple[list[Any], list[list[dict[str, Any]]]]:
        """Block 0's input and every block's keyword arguments, per window: the stack runs with
        each block replaced by a recorder that passes its input through."""
        import torch

        inputs: list[Any] = []
        kwargs: list[list[dict[str, Any]]] = [[] for _ in self.blocks]
        memo: dict[int, Any] = {}

        def recorder(i):
            def forward(hidden, *args, **kw):
                if i == 0:
                    inputs.append(hidden.detach())
                kwargs[i].append(_to({**kw, "_extra_args": tuple(args)}, self.device, memo))
                if i == len(self.blocks) - 1:
                    raise _StopCapture
                return hidden

            return forward

        for i, block in enumerate(self.blocks):
            block.forward = recorder(i)
        # the embedding module runs on a table of only the rows the windows use (a 150k-token
        # vocabulary's table is 1-2 GB in float32)
        embed = self.model.get_submodule(self.layout.embed)
        name = self.layout.embed + ".weight"
        ids = torch.tensor([t for window in windows for t in window], dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.source.tensors[name].shape[0]):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ConversionError(f"{self.source.id}: token id {bad} is outside the embedding")

        def read_rows(used):
            rows = np.concatenate([reader.get_rows(name, t, t + 1) for t in used.tolist()])
            return torch.from_numpy(rows).to(self.device)

        positions = embed_compact(embed, ids, read_rows).to(self.device).split([len(w) for w in windows])
        try:
            for window_positions in positions:
                try:
                    self.base(inputs_embeds=embed(window_positions[None]), use_cache=False)
                except _StopCapture:
                    pass
        finally:
            for block in self.blocks:
                del block.forward
            self.release(self.layout.embed)
        return inputs, kwargs

    def steps(self, windows: Sequence[list[int]] | None, *, task=None) -> Iterator[BlockStep]:
        """Each block in turn, loaded, with its inputs (none when ``windows`` is None: RTN needs
        no activations). After the caller is done with a step the block is run on the inputs
        and released. ``task(description, total)`` as ``Progress.task``."""
        import torch

        with self.source.open_tensors() as reader, torch.inference_mode():
            states, kwargs = self._capture(windows, reader) if windows else ([], [[] for _ in self.blocks])
            n = len(self.blocks)
            with task("running blocks", n) if task else contextlib.nullcontext(lambda k=1: None) as advance:
                for i in range(n):
                    prefix = f"{self.layout.blocks}.{i}"
                    step = BlockStep(i, n, self.load(prefix, reader), states, kwargs[i])
                    yield step
                    states = [step.forward(j) for j in range(len(states))]
                    step.inputs = states  # so the last step ends holding the final hidden states (``logits``)
                    self.release(prefix)
                    advance(1)

    def logits(self, windows: Sequence[list[int]], *, task=None) -> Iterator[np.ndarray]:
        """float32 logits ``[len(window), vocab]`` of each window, in order."""
        import torch

        last = None
        for last in self.steps(windows, task=task):  # noqa: B007 (the final step carries the last hidden states)
            pass
        states = last.inputs if last is not None else []
        with self.source.open_tensors() as reader, torch.inference_mode():
            norm = self.load(self.layout.norm, reader)
            rows, width = self.source.tensors[self.head_name].shape

            def read_rows(start, stop):
                return torch.from_numpy(reader.get_rows(self.head_name, start, stop))

            try:
                for hidden in states:
                    out = head_logits(norm(hidden)[0], rows, width, read_rows, self.device)
                    if self.softcap:  # Gemma 2's final logit soft-capping
                        out = torch.tanh(out / self.softcap) * self.softcap
                    yield out.numpy()
            finally:
                self.release(self.layout.norm)

    def parameter_names(self) -> list[str]:
        """The checkpoint tensors the model uses, in ``state_dict`` order (a tied head once)."""
        skip = self.layout.head + ".weight" if self.tied else None
        return [name for name in self.model.state_dict() if name != skip]


def largest_block_bytes(source: Source, layout: Layout | None = None) -> int:
    """float32 bytes of the largest decoder block: what the engine holds besides activations."""
    layout = layout or LAYOUTS.get(source.config.get("model_type"), Layout())
    per_block: dict[str, int] = {}
    for name, info in source.tensors.items():
        if name.startswith(layout.blocks + "."):
            index = name[len(layout.blocks) + 1 :].split(".", 1)[0]
            per_block[index] = per_block.get(index, 0) + 4 * math.prod(info.shape)
    return max(per_block.values(), default=0)
