"""Round-to-nearest fake quantization on GPTQ's grid (min-max per group with a zero point), so
that RTN and GPTQ differ only by GPTQ's error compensation."""

from __future__ import annotations

import torch

_ROWS_PER_CHUNK = 4096


@torch.no_grad()
def rtn_dequantized(weight: torch.Tensor, bits: int, group_size: int, sym: bool = True) -> torch.Tensor:
    """Quantize ``weight`` (out x in) per group of ``group_size`` inputs and dequantize it back.

    Symmetric: scale = 2 max|w| / (2^b - 1), zero point 2^(b-1) (GPTQ's convention, which keeps a
    group with no negative weight at max / (2^b - 1)); asymmetric: scale = (max - min) / (2^b - 1),
    zero = round(-min / scale); the range always holds 0. Computed in float32, returned in
    the weight's dtype, row chunk by row chunk to bound memory on 8B models.
    """
    rows, cols = weight.shape
    if cols % group_size:
        raise ValueError(f"group size {group_size} does not divide {cols} input features")
    out = torch.empty_like(weight)
    for start in range(0, rows, _ROWS_PER_CHUNK):
        chunk = weight[start : start + _ROWS_PER_CHUNK].float()
        out[start : start + _ROWS_PER_CHUNK] = _fake_quantize(chunk, bits, group_size, sym).to(weight.dtype)
    return out


def _fake_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    groups = weight.reshape(weight.shape[0], -1, group_size)
    maxq = 2**bits - 1
    low = groups.amin(dim=-1, keepdim=True).clamp(max=0)
    high = groups.amax(dim=-1, keepdim=True).clamp(min=0)
    if sym:
        high = torch.maximum(high, -low)
        low = torch.where(low < 0, -high, low)
    scale = (high - low) / maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-low / scale)
    q = torch.clamp(torch.round(groups / scale) + zero, 0, maxq)
    return ((q - zero) * scale).reshape_as(weight)
