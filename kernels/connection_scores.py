"""Triton kernel for :func:`craft_ext.sparsify.connection_scores` (Sun et al., CVPR 2016).

``torch.ops.craft_ext.connection_scores_triton(x, y, kh, kw, stride_h, stride_w, pad_top,
pad_left, dil_h, dil_w, absolute) -> [O, C*kh*kw]`` float32 for ``x [N, C, H, W]`` (the layer
input) and ``y [N, O, Ho, Wo]`` (its output), any strides and floating dtype:

    out[i, k] = sum_m f(corr_n(y[n, i, m], b[n, k, m]))        f = |.| if absolute else identity

with ``b[n, (c, p, q), m] = x[n, c, oh*stride_h - pad_top + p*dil_h, ow*stride_w - pad_left +
q*dil_w]`` (0 outside the image) at output position ``m = (oh, ow)``: Eq. 2 of the paper for a
convolution, and Eq. 1 (signed, a single position) for a fully connected layer passed as a 1x1
convolution. Each program owns a ``BLOCK_O x BLOCK_K`` tile of the scores and, for every
output position, reads the samples twice: once for the sums of the values shifted by sample 0
(so a constant neuron becomes exactly zero), once for the centred cross products (``tl.dot``,
IEEE float32) and squares. Patch elements are gathered on the fly, so no im2col tensor exists.

The pure-PyTorch reference with the same arguments is
:func:`craft_ext.reference.connection_scores`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton


@triton.jit
def _shifted_tiles(
    x_ptr, y_ptr, n0, N, sxn, syn, x_off, y_off, mask_o, valid_k, a0, b0, BLOCK_N: tl.constexpr
):
    """Samples ``n0 .. n0 + BLOCK_N`` of the outputs [BLOCK_N, BLOCK_O] and of the gathered
    patch elements [BLOCK_N, BLOCK_K], minus sample 0 (float32; 0 where masked)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    rows = offs_n.to(tl.int64)
    mask_n = offs_n < N
    ma = mask_n[:, None] & mask_o[None, :]
    mb = mask_n[:, None] & valid_k[None, :]
    a = tl.load(y_ptr + rows[:, None] * syn + y_off[None, :], mask=ma, other=0.0)
    b = tl.load(x_ptr + rows[:, None] * sxn + x_off[None, :], mask=mb, other=0.0)
    da = tl.where(ma, a.to(tl.float32) - a0[None, :], 0.0)
    db = tl.where(mb, b.to(tl.float32) - b0[None, :], 0.0)
    return da, db


@triton.jit
def _connection_scores_kernel(
    x_ptr,
    y_ptr,
    out_ptr,
    N,
    H,
    W,
    O,
    Wo,
    M,
    M_PER,
    K,
    sxn,
    sxc,
    sxh,
    sxw,
    syn,
    syc,
    syh,
    syw,
    stride_h,
    stride_w,
    pad_top,
    pad_left,
    dil_h,
    dil_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    ABSOLUTE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_o = offs_o < O
    mask_k = offs_k < K
    chan = offs_k // (KH * KW)
    tap = offs_k % (KH * KW)
    tap_h = (tap // KW) * dil_h - pad_top
    tap_w = (tap % KW) * dil_w - pad_left
    total = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
    m_start = pid_m * M_PER
    m_end = tl.minimum(M, m_start + M_PER)
    for m in range(m_start, m_end):
        oh = m // Wo
        ow = m % Wo
        ih = oh * stride_h + tap_h
        iw = ow * stride_w + tap_w
        valid_k = mask_k & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_off = chan.to(tl.int64) * sxc + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        y_off = offs_o.to(tl.int64) * syc + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw
        a0 = tl.load(y_ptr + y_off, mask=mask_o, other=0.0).to(tl.float32)
        b0 = tl.load(x_ptr + x_off, mask=valid_k, other=0.0).to(tl.float32)
        sum_a = tl.zeros((BLOCK_O,), dtype=tl.float32)
        sum_b = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            da, db = _shifted_tiles(
                x_ptr, y_ptr, n0, N, sxn, syn, x_off, y_off, mask_o, valid_k, a0, b0, BLOCK_N
            )
            sum_a += tl.sum(da, axis=0)
            sum_b += tl.sum(db, axis=0)
        mean_a = sum_a / N
        mean_b = sum_b / N
        cross = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
        var_a = tl.zeros((BLOCK_O,), dtype=tl.float32)
        var_b = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            da, db = _shifted_tiles(
                x_ptr, y_ptr, n0, N, sxn, syn, x_off, y_off, mask_o, valid_k, a0, b0, BLOCK_N
            )
            mask_n = (n0 + tl.arange(0, BLOCK_N)) < N
            ac = tl.where(mask_n[:, None] & mask_o[None, :], da - mean_a[None, :], 0.0)
            bc = tl.where(mask_n[:, None] & valid_k[None, :], db - mean_b[None, :], 0.0)
            cross += tl.dot(tl.trans(ac), bc, input_precision="ieee")
            var_a += tl.sum(ac * ac, axis=0)
            var_b += tl.sum(bc * bc, axis=0)
        denom = tl.sqrt(var_a[:, None] * var_b[None, :])
        safe = tl.where(denom > 0.0, denom, 1.0)
        r = tl.where(denom > 0.0, cross / safe, 0.0)
        r = tl.minimum(tl.maximum(r, -1.0), 1.0)
        if ABSOLUTE:
            r = tl.abs(r)
        total += r
    out_off = (pid_m * O + offs_o.to(tl.int64))[:, None] * K + offs_k[None, :]
    tl.store(out_ptr + out_off, total, mask=mask_o[:, None] & mask_k[None, :])


# (BLOCK_N, BLOCK_O, BLOCK_K, num_warps) on a GPU and under the interpreter (CPU tensors), where
# small tiles keep numpy fast (tl.dot needs >= 16)
_TILES = {"cuda": (32, 64, 64, 4), "interpreter": (16, 16, 16, 1)}


def _device_kind(device: torch.device) -> str:
    """``"cuda"`` for CUDA tensors, else ``"interpreter"`` (the launch configuration to use;
    tests/test_triton_compile.py compiles the CUDA configuration from CPU tensors)."""
    return "cuda" if device.type == "cuda" else "interpreter"


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the CUDA ``device``."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton_op("craft_ext::connection_scores_triton", mutates_args=())
def connection_scores_triton(
    x: Tensor,
    y: Tensor,
    kh: int,
    kw: int,
    stride_h: int,
    stride_w: int,
    pad_top: int,
    pad_left: int,
    dil_h: int,
    dil_w: int,
    absolute: bool,
    splits: int = 0,
) -> Tensor:
    """Scores ``[O, C*kh*kw]`` (float32) of the connections between ``x`` and ``y`` (see module
    docs); the caller validates shapes (:func:`craft_ext.sparsify.connection_scores`).

    ``splits``: the output positions are cut into this many contiguous ranges, one program
    per range and score tile, whose partial sums are added afterwards (0: enough ranges to
    give every SM about four programs on CUDA, one range under the interpreter).
    """
    n, c, h, w = x.shape
    o, ho, wo = y.shape[1], y.shape[2], y.shape[3]
    k = c * kh * kw
    block_n, block_o, block_k, warps = _TILES[_device_kind(x.device)]
    tiles = triton.cdiv(o, block_o) * triton.cdiv(k, block_k)
    m = ho * wo
    if splits <= 0:
        splits = 1
        if _device_kind(x.device) == "cuda":
            splits = triton.cdiv(4 * _sm_count(x.device), tiles)
    per = triton.cdiv(m, max(1, min(splits, m)))
    splits = triton.cdiv(m, per)
    out = torch.empty((splits, o, k), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(o, block_o), triton.cdiv(k, block_k), splits)
    sizes = (n, h, w, o, wo, m, per, k)
    geometry = (stride_h, stride_w, pad_top, pad_left, dil_h, dil_w)
    meta = {"KH": kh, "KW": kw, "ABSOLUTE": absolute, "num_warps": warps}
    blocks = {"BLOCK_N": block_n, "BLOCK_O": block_o, "BLOCK_K": block_k}
    strides = (*x.stride(), *y.stride())
    kernel = wrap_triton(_connection_scores_kernel)
    kernel[grid](x, y, out, *sizes, *strides, *geometry, **meta, **blocks)
    return out.sum(0)


@connection_scores_triton.register_fake
def _fake_connection_scores(x: Tensor, y: Tensor, kh: int, kw: int, *_geometry: object) -> Tensor:
    return x.new_empty((y.shape[1], x.shape[1] * kh * kw), dtype=torch.float32)
