"""Blockwise-quantised weights as ``MatMulNBits`` (com.microsoft) stores them.

    B            [N, K/block, block·bits/8] uint8   output row n, block b: block_size values
                                                    along K, 8/bits per byte, low bits first
    scales       [N, K/block] (or flat)             one per block
    zero_points  absent: 2^(bits-1) | uint8 [N, ⌈K/block · bits / 8⌉] packed like B
                 | the scales' type [N, K/block]
    W[k, n] = (q[n, k] − zp[n, k / block]) · scale[n, k / block]

Every row is blocked along K on its own, so two weights with the same N whose K are whole
multiples of block_size join along K by concatenating their blocks: the join dequantises to the
concatenation of the parts, exactly. That is how the down projections of a fused run become one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from graphfuse.blocks import Quant


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """[rows, bytes] uint8 → [rows, count] of ``bits``-bit codes, low bits first."""
    per_byte = 8 // bits
    rows = packed.reshape(packed.shape[0], -1)
    codes = np.stack([(rows >> (bits * i)) & ((1 << bits) - 1) for i in range(per_byte)], -1)
    return codes.reshape(rows.shape[0], -1)[:, :count]


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """[rows, count] codes → [rows, ⌈count·bits/8⌉] uint8, low bits first (zero padded)."""
    per_byte = 8 // bits
    pad = -codes.shape[1] % per_byte
    codes = np.pad(codes.astype(np.uint8), ((0, 0), (0, pad)))
    groups = codes.reshape(codes.shape[0], -1, per_byte)
    out = np.zeros(groups.shape[:2], np.uint8)
    for i in range(per_byte):
        out |= (groups[..., i] << (bits * i)).astype(np.uint8)
    return out


def zero_point_codes(zero_points: np.ndarray | None, quant: Quant) -> np.ndarray:
    """The zero point of every block as [N, K/block]: unpacked, or the default 2^(bits-1)."""
    if zero_points is None:
        return np.full((quant.n, quant.blocks), 1 << (quant.bits - 1), np.float32)
    if zero_points.dtype == np.uint8:
        return unpack(zero_points.reshape(quant.n, -1), quant.bits, quant.blocks)
    return zero_points.reshape(quant.n, quant.blocks)


def dequantize(
    b: np.ndarray | None, scales: np.ndarray, zero_points: np.ndarray | None, quant: Quant
) -> np.ndarray:
    """The weight as [N, K] in the scales' dtype."""
    assert b is not None
    q = unpack(b.reshape(quant.n, -1), quant.bits, quant.blocks * quant.block_size)
    q = q.reshape(quant.n, quant.blocks, quant.block_size).astype(np.float32)
    zp = zero_point_codes(zero_points, quant).astype(np.float32)[..., None]
    s = scales.reshape(quant.n, quant.blocks).astype(np.float32)[..., None]
    w = ((q - zp) * s).reshape(quant.n, -1)[:, : quant.k]
    return w.astype(scales.dtype)


def join_along_k(
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, Quant]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B, scales, zero points) of the weight [K₁; K₂; …] from parts of equal N, bits and
    block_size whose K are multiples of block_size; each array keeps the rank it had."""
    first = parts[0][3]
    b = np.concatenate([p[0].reshape(first.n, p[3].blocks, -1) for p in parts], axis=1)
    scales = np.concatenate([p[1].reshape(first.n, -1) for p in parts], axis=1)
    if parts[0][1].ndim == 1:
        scales = scales.reshape(-1)
    zero_points = None
    if parts[0][2] is not None:
        zp0 = parts[0][2]
        if zp0.dtype == np.uint8:
            codes = np.concatenate([zero_point_codes(p[2], p[3]) for p in parts], axis=1)
            zero_points = pack(codes, first.bits)
        else:
            zero_points = np.concatenate([p[2].reshape(first.n, -1) for p in parts], axis=1)  # type: ignore[union-attr]
        if zp0.ndim == 1:
            zero_points = zero_points.reshape(-1)
    return b, scales, zero_points


def quantize(
    w: np.ndarray, quant: Quant, *, zero_points: bool, scales_dtype: np.dtype | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B, scales, zero points) of the [K, N] weight ``w`` in ``quant``'s layout (bits,
    block_size), by onnxruntime's own blockwise quantiser (round to nearest): symmetric with no
    zero points, else asymmetric with uint8-packed zero points. Shapes are [N, K/block, blob],
    [N, K/block] and [N, ⌈K/block · bits/8⌉]."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(
        block_size=quant.block_size, is_symmetric=not zero_points, bits=quant.bits
    )
    packed, scales, zp = DefaultWeightOnlyQuantizer(config).qbits_block_quant(
        np.ascontiguousarray(w, dtype=np.float32)
    )
    scales = scales.astype(scales_dtype or np.float32)
    return packed, scales, (zp if zero_points else None)
