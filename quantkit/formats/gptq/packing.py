"""Packing of GPTQ codes into the auto-gptq / GPTQModel "v1" checkpoint layout, and back.

Per quantized Linear with ``in`` input and ``out`` output features, ``bits`` per weight:

* ``qweight`` int32 [in * bits / 32, out]: the codes of each output column, packed along the
  input dimension as one little-endian bit stream (value k at bit ``bits * k``, low bits first).
  For 2, 4 and 8 bits each int32 holds 32 / bits whole values; for 3 bits, 32 values fill three
  int32 words and values 10 and 21 cross a word boundary (auto-gptq's ``QuantLinear.pack``).
* ``qzeros`` int32 [n_groups, out * bits / 32]: the zero points minus one (the v1 convention;
  GPTQModel's "v2" stores them as they are), packed the same way along the output dimension.
* ``scales`` float16 [n_groups, out]; ``g_idx`` int32 [in]: the group of each input column.

A weight is ``(code - (stored_zero + 1)) * scale`` with the zero and scale of its column's group.
"""

from __future__ import annotations

import torch

from ...errors import ConversionError

__all__ = ["SUPPORTED_BITS", "pack_rows", "unpack_rows", "pack_linear", "dequantize_linear"]

SUPPORTED_BITS = (2, 3, 4, 8)


def _check(bits: int, n: int, what: str) -> None:
    if bits not in SUPPORTED_BITS:
        raise ConversionError(f"GPTQ packing: {bits} bits is not one of {SUPPORTED_BITS}")
    if (n * bits) % 32:
        raise ConversionError(f"GPTQ packing: {what} of {n} is not a multiple of {32 // _gcd32(bits)} for {bits}-bit")


def _gcd32(bits: int) -> int:
    from math import gcd

    return gcd(bits, 32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``values`` [n, m] (integers in 0..2^bits-1) along dim 0 into int32 [n*bits/32, m]."""
    n, m = values.shape
    _check(bits, n, "a packed dimension")
    # 32 values fill exactly ``bits`` words, so work on blocks of 32 (zero-padded at the end)
    blocks = -(-n // 32)
    v = torch.zeros(blocks * 32, m, dtype=torch.int64, device=values.device)
    v[:n] = values.to(torch.int64) & ((1 << bits) - 1)
    v = v.view(blocks, 32, m)
    words = torch.zeros(blocks, bits, m, dtype=torch.int64, device=values.device)
    for k in range(32):  # value k of a block starts at bit bits*k; at most one carry into the next word
        word, shift = divmod(bits * k, 32)
        words[:, word] |= v[:, k] << shift
        if shift + bits > 32:
            words[:, word + 1] |= v[:, k] >> (32 - shift)
    words = words.view(blocks * bits, m)[: n * bits // 32] & 0xFFFFFFFF
    # reinterpret the unsigned 32-bit patterns as int32 (two's complement), as safetensors stores them
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 [n*bits/32, m] -> integers [n, m] (int32 for 2, 4
    and 8 bits, which the runtime unpacks on every forward call; int64 for 3)."""
    _check(bits, n, "a packed dimension")
    if words.shape[0] != n * bits // 32:
        raise ConversionError(f"GPTQ unpacking: {words.shape[0]} packed rows, expected {n * bits // 32} for {n} values")
    m = words.shape[1]
    if 32 % bits == 0:  # whole values per word: one shift-and-mask per position, in int32
        # an arithmetic shift drags the sign bit along, but the mask keeps only the value's bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device).view(1, -1, 1)
        return ((words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1, m)[:n]
    blocks = -(-n // 32)
    w = torch.zeros(blocks * bits, m, dtype=torch.int64, device=words.device)
    w[: words.shape[0]] = words.to(torch.int64) & 0xFFFFFFFF
    w = w.view(blocks, bits, m)
    mask = (1 << bits) - 1
    out = torch.empty(blocks, 32, m, dtype=torch.int64, device=words.device)
    for k in range(32):
        word, shift = divmod(bits * k, 32)
        value = w[:, word] >> shift
        if shift + bits > 32:
            value = value | (w[:, word + 1] << (32 - shift))
        out[:, k] = value & mask
    return out.view(blocks * 32, m)[:n]


def pack_linear(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """The v1 tensors of one Linear from codes [out, in], zeros and scales [n_groups, out]."""
    out_features = codes.shape[0]
    _check(bits, out_features, "out_features")
    if int(zeros.min()) < 1:
        raise ConversionError("GPTQ packing: a zero point of 0 cannot be stored in the v1 layout")
    return {
        "qweight": pack_rows(codes.t().contiguous(), bits),
        "qzeros": pack_rows((zeros.to(torch.int64) - 1).t().contiguous(), bits).t().contiguous(),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def dequantize_linear(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
    *, transposed: bool = False,
) -> torch.Tensor:
    """Float32 weight [out, in] (``transposed``: [in, out], as stored) of one v1-packed Linear."""
    in_features, out_features = g_idx.shape[0], qweight.shape[1]
    codes = unpack_rows(qweight, bits, in_features).to(torch.float32)  # [in, out]
    zeros = (unpack_rows(qzeros.t().contiguous(), bits, out_features).t() + 1).to(torch.float32)  # [n_groups, out]
    scale = scales.to(torch.float32)
    n_groups = scale.shape[0]
    size = in_features // n_groups
    if in_features % n_groups == 0 and torch.equal(g_idx, torch.arange(in_features, device=g_idx.device, dtype=g_idx.dtype) // size):
        # groups in place (no act-order permutation): broadcast per group instead of gathering
        codes = codes.view(n_groups, size, out_features).sub_(zeros.unsqueeze(1)).mul_(scale.unsqueeze(1)).view(in_features, out_features)
    else:
        g = g_idx.to(torch.int64)
        codes = codes.sub_(zeros[g]).mul_(scale[g])
    return codes if transposed else codes.t().contiguous()
