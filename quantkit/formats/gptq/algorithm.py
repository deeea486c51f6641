"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv:2210.17323) and a round-to-nearest baseline on the same grid.

Pure torch, no I/O: a weight matrix and a Hessian go in, integer codes, per-group scales and
zero points, the group index of every input column and the dequantized matrix come out. Both
quantizers use one grid (:func:`grid_params`, :func:`quantize_codes`), so GPTQ and RTN differ only
in how the codes are chosen, and the packed checkpoint reproduces ``dequantized`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import ConversionError

__all__ = [
    "QuantGrid",
    "QuantizedWeight",
    "HessianAccumulator",
    "grid_params",
    "quantize_codes",
    "dequantize_codes",
    "gptq_quantize",
    "rtn_quantize",
]

# fp16 range of the stored scales: a scale is rounded to fp16 *before* the codes are chosen, so
# the checkpoint (fp16 scales) dequantizes to exactly what the algorithm measured its error on
_SCALE_MIN = torch.finfo(torch.float16).tiny
_SCALE_MAX = torch.finfo(torch.float16).max
_MAX_DAMP = 1.0  # λ = mean(diag H) makes any positive semi-definite H safely invertible


@dataclass(frozen=True)
class QuantGrid:
    """The integer grid: ``bits`` per weight, one (scale, zero) per ``group_size`` input
    columns (-1: one per output row), symmetric or asymmetric."""

    bits: int
    group_size: int = 128
    sym: bool = True

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def n_groups(self, columns: int) -> int:
        return 1 if self.group_size <= 0 else -(-columns // self.group_size)


@dataclass
class QuantizedWeight:
    """One quantized [out, in] matrix: ``codes`` [out, in] in 0..maxq, ``scales`` and ``zeros``
    [n_groups, out], ``g_idx`` [in] (the group of each input column), ``dequantized`` [out, in]
    float32 (= (codes - zeros[g_idx]) * scales[g_idx]), and GPTQ's loss (0 for RTN)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    dequantized: torch.Tensor
    loss: float = 0.0
    damp: float = 0.0


def grid_params(w: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) covering ``w`` [rows, cols] and 0, as in GPTQ's min-max quantizer.

    Zeros are integers in 1..maxq: the v1 checkpoint layout stores ``zero - 1`` in ``bits`` bits,
    so a zero of 0 (a group with no negative weight) would wrap; such rows get a grid one step
    wider instead (scale = xmax / (maxq - 1)). Scales are rounded to fp16, the stored precision."""
    maxq = grid.maxq
    w = w.to(torch.float32)
    xmin = torch.clamp(w.min(dim=1).values, max=0.0)
    xmax = torch.clamp(w.max(dim=1).values, min=0.0)
    if grid.sym:
        # symmetric about 0 in every row; the reference code keeps xmin = 0 for a row without
        # negative weights, which with the mid-range zero clips that row's upper half
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if grid.sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-xmin / scale)
        wrap = zero < 1  # see the docstring: keep zero - 1 representable
        scale = torch.where(wrap, xmax / (maxq - 1), scale)
        zero = torch.clamp(zero, 1, maxq)
    scale = scale.clamp(_SCALE_MIN, _SCALE_MAX).to(torch.float16).to(torch.float32)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (float tensor of whole numbers) of ``w`` [rows] or [rows, cols] on the grid."""
    if w.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    if q.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return (q - zero) * scale


class HessianAccumulator:
    """Running H = 2/n Σ x xᵀ over the rows x of a Linear's inputs (GPTQ, Section 3, eq. 1)."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.hessian = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.hessian.device, torch.float32)
        n = x.shape[0]
        # rescale the running mean so that H stays 2/n Σ x xᵀ without growing with n
        self.hessian.mul_(self.rows / (self.rows + n))
        self.rows += n
        x = x * (2.0 / self.rows) ** 0.5
        self.hessian.addmm_(x.t(), x)


def _group_bounds(grid: QuantGrid, columns: int) -> int:
    return columns if grid.group_size <= 0 else grid.group_size


def rtn_quantize(weight: torch.Tensor, grid: QuantGrid) -> QuantizedWeight:
    """Round every weight to the nearest grid point of its group: the no-calibration baseline."""
    w = weight.detach().to(torch.float32)
    rows, columns = w.shape
    size = _group_bounds(grid, columns)
    scales, zeros, codes = [], [], torch.empty_like(w)
    for start in range(0, columns, size):
        scale, zero = grid_params(w[:, start : start + size], grid)
        codes[:, start : start + size] = quantize_codes(w[:, start : start + size], scale, zero, grid.maxq)
        scales.append(scale)
        zeros.append(zero)
    g_idx = torch.arange(columns, device=w.device) // size
    return _finish(codes, torch.stack(scales), torch.stack(zeros), g_idx)


def _finish(codes, scales, zeros, g_idx, loss: float = 0.0, damp: float = 0.0) -> QuantizedWeight:
    deq = (codes - zeros[g_idx].t()) * scales[g_idx].t()
    return QuantizedWeight(
        codes=codes.to(torch.uint8).cpu(),
        scales=scales.cpu(),
        zeros=zeros.to(torch.int32).cpu(),
        g_idx=g_idx.to(torch.int32).cpu(),
        dequantized=deq.cpu(),
        loss=loss,
        damp=damp,
    )


def _invert_lower_triangular_(lower: torch.Tensor) -> torch.Tensor:
    """L ← L⁻¹ in place for a lower-triangular L, by halves: inv([[A, 0], [B, C]]) =
    [[A⁻¹, 0], [-C⁻¹BA⁻¹, C⁻¹]]. The work is matrix products, which run near the machine's peak
    (solving against the identity would cost n³ in triangular solves), and the only extra memory is
    one product the size of B."""
    n = lower.shape[0]
    if n <= 1024:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        return lower.copy_(torch.linalg.solve_triangular(lower, eye, upper=False))
    k = n // 2
    a_inv = _invert_lower_triangular_(lower[:k, :k])
    c_inv = _invert_lower_triangular_(lower[k:, k:])
    lower[k:, :k] = torch.mm(c_inv, lower[k:, :k] @ a_inv).neg_()
    return lower


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) after dampening (GPTQ, Section 4, "Cholesky
    Reformulation"), from one Cholesky factorization: with J the order-reversing permutation and
    JHJ = LLᵀ, U = J L⁻¹ J (the reference code's cholesky, cholesky_inverse, cholesky computes the
    same factor with about twice the work and memory).

    λ = damp · mean(diag H) is added to the diagonal; if H is still not positive definite
    (too few calibration tokens for the width, or float32 rounding on a near-singular H), λ grows
    tenfold until it reaches mean(diag H) itself before giving up."""
    mean_diag = torch.mean(torch.diag(hessian)).item()
    while True:
        flipped = hessian.flip(0, 1)
        flipped.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(flipped)
        del flipped
        if info.item() == 0:
            inverse = _invert_lower_triangular_(lower)
            if torch.isfinite(inverse.diagonal()).all():
                return inverse.flip(0, 1), damp
            del lower, inverse
        if damp >= _MAX_DAMP:
            break
        damp = min(damp * 10, _MAX_DAMP)
    raise ConversionError(
        "GPTQ: the calibration Hessian is not positive definite even with heavy dampening; "
        "raise calib_samples or damp"
    )


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: QuantGrid,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int = 128,
) -> QuantizedWeight:
    """Quantize ``weight`` [out, in] column by column, compensating each column's rounding error
    on the not-yet-quantized columns through the inverse Hessian (GPTQ, Algorithm 1).

    ``act_order`` visits columns by decreasing Hessian diagonal ("desc_act"); without
    ``static_groups`` its groups are then consecutive in that order and ``g_idx`` maps each
    original column to its group. ``static_groups`` fixes every group's grid from the original
    weights up front, so groups stay in the natural column order."""
    device = hessian.device
    w = weight.detach().to(device, torch.float32).clone()
    h = hessian.to(torch.float32).clone()
    rows, columns = w.shape
    size = _group_bounds(grid, columns)
    if grid.group_size > 0 and block_size % size:
        block_size = size * max(1, block_size // size)  # a group never straddles two blocks

    # dead inputs (always zero in the calibration data) carry no information: fix H and drop them
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    static: list[tuple[torch.Tensor, torch.Tensor]] = []
    if static_groups or grid.group_size <= 0:
        static = [grid_params(w[:, s : s + size], grid) for s in range(0, columns, size)]

    perm = torch.arange(columns, device=device)
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]

    hinv, damp_used = _inverse_cholesky(h, damp)
    del h
    # transposed: one input column of W is a contiguous row here, so the per-column work (the
    # inner loop below, the part of GPTQ that cannot be batched) reads and updates contiguous memory
    wt = w.t().contiguous()
    del w
    codes = torch.zeros_like(wt)
    losses = torch.zeros(rows, device=device)
    n_groups = grid.n_groups(columns)
    scales = torch.zeros(n_groups, rows, device=device)
    zeros = torch.zeros(n_groups, rows, device=device)
    if static:
        scales[:], zeros[:] = torch.stack([s for s, _ in static]), torch.stack([z for _, z in static])
    err1 = torch.empty(block_size, rows, device=device)

    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        w1 = wt[i1:i2]  # a view: updated in place, quantized row by row
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static_groups or grid.group_size <= 0:
                g = int(perm[col]) // size
            else:
                g = col // size
                if col % size == 0:  # a new group: its grid from the error-updated weights
                    scales[g], zeros[g] = grid_params(w1[i : i + size].t(), grid)
            x = w1[i]
            q = quantize_codes(x, scales[g], zeros[g], grid.maxq)
            codes[col] = q
            err = err1[i]
            torch.sub(x, dequantize_codes(q, scales[g], zeros[g]), out=err)
            err.div_(hinv1[i, i])
            # lazy batch update inside the block (Section 4, "Lazy Batch-Updates")
            if i + 1 < i2 - i1:
                w1[i + 1 :].addr_(hinv1[i, i + 1 :], err, alpha=-1)
        done = err1[: i2 - i1]
        losses += done.square().sum(0) / 2  # Σ (w - q)² / [H⁻¹]ᵢᵢ² / 2 over the block's columns
        if i2 < columns:
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), done, alpha=-1)

    inverse = torch.argsort(perm)
    codes = codes.t()[:, inverse].contiguous()
    if static_groups or grid.group_size <= 0:
        g_idx = torch.arange(columns, device=device) // size
    else:
        g_idx = inverse // size  # original column j was quantized at position inverse[j]
    return _finish(codes, scales, zeros, g_idx, loss=float(losses.sum().item()), damp=damp_used)
