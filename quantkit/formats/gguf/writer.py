"""Streaming HF -> GGUF (F32/F16/BF16) writer built on gguf-py's GGUFWriter.

The writer moves through GGUFWriter's states explicitly: all tensor infos are declared from
the safetensors headers (no tensor loaded), header/key-values/tensor-infos are written, then
each tensor is loaded, transformed, written and dropped. A mixture of experts' per-expert
matrices become llama.cpp's stacked ``ffn_{gate,up,down}_exps`` tensors, written one expert at a
time. Peak memory is about the largest checkpoint tensor (in float32), not the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ...errors import SourceError, TokenizerError, UnsupportedArchitectureError
from ...runtimes.stream import LAYOUTS, Layout
from ...source import Source, experts_of
from .arch import (
    HParams,
    arch_for_config,
    extra_tensors,
    mla_dims,
    split_kv_b,
    transform_tensor,
    write_hparams,
)
from .vocab import load_vocab

__all__ = ["FLOAT_TYPES", "write_float_gguf"]

Q = gguf.GGMLQuantizationType
# output name -> (tensor type for 2-D weights, llama.cpp file type)
FLOAT_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
_SKIP = re.compile(r"rotary_emb\.inv_freq$")
_BLOCK = re.compile(r"^blk\.(\d+)\.")
T = gguf.MODEL_TENSOR


@dataclass(frozen=True)
class _Planned:
    sources: tuple[str, ...]  # checkpoint tensors: one, one per expert (stacked), none (computed here)
    gguf_name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    part: int = -1  # of a checkpoint tensor llama.cpp wants split in two (DeepSeek's kv_b_proj)


def _order(name: str) -> tuple[int, str]:
    m = _BLOCK.match(name)
    if m:
        return (int(m.group(1)) + 1, name)
    return (0 if name.startswith(("token_embd", "rope_freqs")) else 1 << 30, name)


def _expert_stacks(source: Source, layout: Layout) -> dict[str, list[str]]:
    """Checkpoint names of each block's per-expert matrices, by the name of the stack they form
    (``{block}.mlp.experts.{gate,up,down}_proj.weight``, which gguf-py maps to ``ffn_*_exps``), in
    expert order; every expert must be present."""
    found: dict[str, dict[int, str]] = {}
    for name in source.tensors:
        if name.endswith(".weight") and (expert := layout.parse_expert(name)):
            block, e, part = expert
            found.setdefault(f"{block}.mlp.experts.{part}_proj.weight", {})[e] = name
    experts = experts_of(source.config)
    count = experts.count if experts else 0
    stacks = {}
    for stacked, members in found.items():
        if sorted(members) != list(range(count)):
            raise SourceError(f"{stacked}: the checkpoint has experts {sorted(members)[:8]}; config.json says {count}")
        stacks[stacked] = [members[e] for e in range(count)]
    return stacks


def _plan(source: Source, arch, float_type: str) -> list[_Planned]:
    hp = HParams.from_config(source.config)
    tmap = gguf.get_tensor_name_map(arch.gguf_arch, hp.n_layers)
    target = FLOAT_TYPES[float_type][0]
    stacks = _expert_stacks(source, LAYOUTS.get(source.config.get("model_type"), Layout()))
    stacked = {name for members in stacks.values() for name in members}
    entries = [(name, (name,)) for name in source.tensors if name not in stacked] + list(stacks.items())
    plan = []
    for name, members in entries:
        block = re.match(r"^model\.layers\.(\d+)\.", name)
        # a block past num_hidden_layers: DeepSeek V3's and GLM-4.5's multi-token-prediction layer
        # (model.layers.61 of DeepSeek-V3), which the forward pass never runs; left out, as
        # llama.cpp's converter does by default (kept, a GGUF declares nextn_predict_layers)
        if _SKIP.search(name) or (block and int(block.group(1)) >= hp.n_layers):
            continue
        infos = [source.tensors[m] for m in members]
        if any(info.dtype not in ("F32", "F16", "BF16") for info in infos):
            raise SourceError(f"tensor {name!r} has dtype {infos[0].dtype}; only float checkpoints convert to GGUF")
        if any(info.shape != infos[0].shape for info in infos):
            raise SourceError(f"{name}: the experts' matrices differ in shape")
        shape = ((len(members),) if len(members) > 1 else ()) + tuple(infos[0].shape)
        qtype = target if len(shape) >= 2 else Q.F32  # norms and biases stay F32, as in llama.cpp
        if ".mlp.gate." in name or ".block_sparse_moe.gate." in name or name.endswith("shared_expert_gate.weight"):
            qtype = Q.F32  # routers stay F32, as llama.cpp's converter and quantizer keep them: which experts
            # a token goes to flips on a rounding, and the router is a sliver of the model
        if arch.mla and name.endswith("self_attn.kv_b_proj.weight") and block:
            # llama.cpp wants per-head k and v matrices (MLA absorbed), not the combined projection
            _, kv_lora, nope, _, v = mla_dims(source.config)
            heads = shape[0] // (nope + v)
            for part, (kind, part_shape) in enumerate(((T.ATTN_K_B, (heads, kv_lora, nope)), (T.ATTN_V_B, (heads, v, kv_lora)))):
                plan.append(_Planned(members, _gguf_name(kind, block.group(1), "weight"), part_shape, qtype, part))
            continue
        if name.endswith("mlp.gate.e_score_correction_bias") and block:  # the router's bias (DeepSeek V3, GLM-4.5)
            gname = _gguf_name(T.FFN_EXP_PROBS_B, block.group(1), "bias")
        else:
            gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise UnsupportedArchitectureError(f"tensor {name!r} has no GGUF name for {arch.arch_name}")
        plan.append(_Planned(members, gname, shape, qtype))
    if arch.output_required and not any(p.gguf_name == "output.weight" for p in plan):
        embed = next(p for p in plan if p.gguf_name == "token_embd.weight")  # a tied head, written twice
        plan.append(_Planned(embed.sources, "output.weight", embed.shape, embed.qtype))
    for gname, data in extra_tensors(source.config).items():
        plan.append(_Planned((), gname, data.shape, Q.F32))
    return sorted(plan, key=lambda p: _order(p.gguf_name))


def _gguf_name(kind: gguf.MODEL_TENSOR, block: str, suffix: str) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=int(block)) + "." + suffix


def _cast(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == Q.BF16:
        import torch  # numpy has no bfloat16; torch rounds to nearest even like llama.cpp

        return torch.from_numpy(data).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return data.astype(np.float16 if qtype == Q.F16 else np.float32, copy=False)


def write_float_gguf(
    source: Source, out_path: Path, float_type: str, advance: Callable[[int], None] | None = None
) -> dict:
    """Write ``source`` as a GGUF file of ``float_type`` (f32/f16/bf16); returns details."""
    arch = arch_for_config(source.config)
    vocab = load_vocab(source.path, source.config)  # validated before anything is written
    # llama.cpp looks these up by text (unordered_map::at) when the model's name says Phi-3
    needed = {"<unk>", "<s>", "</s>", "<|endoftext|>"} - set(vocab.tokens)
    if any(key in source.name.lower() for key in ("phi3", "phi-3")) and needed:
        raise TokenizerError(f"{source.path}: llama.cpp needs the tokens {', '.join(sorted(needed))} in the vocabulary "
                             "of a model named like Phi-3")
    plan = _plan(source, arch, float_type)
    extras = extra_tensors(source.config)

    writer = gguf.GGUFWriter(path=None, arch=arch.arch_name)
    writer.add_name(source.name)
    writer.add_file_type(int(FLOAT_TYPES[float_type][1]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hparams(writer, arch, source.config)
    vocab.write(writer)
    for p in plan:
        itemsize = 4 if p.qtype == Q.F32 else 2
        nbytes = int(np.prod(p.shape)) * itemsize
        np_dtype = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}[p.qtype]
        raw = Q.BF16 if p.qtype == Q.BF16 else None
        writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np_dtype), nbytes, raw_dtype=raw)
    writer.write_header_to_file(path=out_path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with source.open_tensors() as reader:
        for p in plan:
            if len(p.sources) > 1:  # a stack of experts, read and written one expert at a time
                pieces = (transform_tensor(arch, name, reader.get(name), source.config) for name in p.sources)
                _write_pieces(writer, (np.ascontiguousarray(_cast(piece, p.qtype)) for piece in pieces))
            else:
                if not p.sources:
                    data = extras[p.gguf_name]
                elif p.part >= 0:
                    data = split_kv_b(reader.get(p.sources[0]), source.config)[p.part]
                else:
                    data = transform_tensor(arch, p.sources[0], reader.get(p.sources[0]), source.config)
                writer.write_tensor_data(np.ascontiguousarray(_cast(data, p.qtype)))
            if advance:
                advance(1)
    writer.close()
    return {
        "gguf_architecture": arch.arch_name,
        "tokenizer_model": vocab.model,
        "tokenizer_pre": vocab.pre,
        "tensor_count": len(plan),
    }


def _write_pieces(writer: gguf.GGUFWriter, pieces) -> None:
    """Write the next declared tensor's data as consecutive pieces (one expert's matrix at a
    time), with GGUFWriter's alignment padding before and after, as ``write_tensor_data`` does
    for a whole array."""
    fout = writer.fout[0]
    name = next(iter(writer.tensors[0]))
    expected = writer.tensors[0].pop(name).nbytes
    writer.write_padding(fout, fout.tell())
    written = 0
    for piece in pieces:
        piece.tofile(fout)
        written += piece.nbytes
    if written != expected:
        raise RuntimeError(f"{name}: wrote {written} bytes, declared {expected}")
    writer.write_padding(fout, written)
    writer.state = gguf.gguf_writer.WriterState.WEIGHTS


def tensor_count(source: Source) -> int:
    """Tensors the GGUF file will hold (the progress of writing it)."""
    return len(_plan(source, arch_for_config(source.config), "f32"))
