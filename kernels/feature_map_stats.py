"""Triton kernels of ``craft_ext::feature_map_stats_triton`` (Diba & Khosravi, IASC 2023).

For ``fmap`` [B, C, H, W] and map x_bi (n = H*W values, mean m_bi, centred d_bi = x_bi - m_bi)::

    sum[b, i]       = sum_p x_bip                                (float32 [B, C])
    empty[b, i]     = |sum[b, i]| <= sum_threshold               (Eq. 2)
    corr[b, i, k]   = G_bik / sqrt(G_bii G_bkk),  G_b = D_b D_b^T (Eqs. 5-9)
    redundant[b, i] = any_{k < i} corr[b, i, k] >= corr_threshold (Eq. 10)

Pearson correlation does not change under the paper's min-max normalisation, so the raw maps
are used and no normalised copy is made. Three launches:

1. ``_map_stats_kernel``: one read of the maps -> sum, mean, empty and "constant" (min == max).
2. ``_centred_gram_kernel``: per sample, the Gram matrix of the *centred* maps (the mean is
   subtracted in registers as tiles are loaded) with ``tl.dot`` in 3xTF32 (tensor cores at
   float32 accuracy), so large map means do not cancel; positions are split across programs
   into partial Gram matrices when B * tiles alone would leave the GPU idle.
3. ``_corr_epilogue_kernel``: sums the partials (fixed order: deterministic), correlations
   (constant maps: 0 off the diagonal, diagonal 1, clamped to [-1, 1], NaN kept), optionally written
   out, and the redundancy flags.

Semantics: ``craft_ext.reference.feature_map_stats``.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["feature_map_stats_triton"]

_STATS_BLOCK_C = 16
_STATS_BLOCK_P = 256
_GRAM_BLOCK_P = 32
_EPI_BLOCK = 32
# The Gram kernel splits the positions of each sample until about this many programs run
# (B=100, C=64, 112x112 gets 10 splits; C=512, 7x7 needs none).
_TARGET_PROGRAMS = 1024


@triton.jit
def _map_stats_kernel(
    x_ptr,
    sum_ptr,
    mean_ptr,
    empty_ptr,
    const_ptr,
    chans,
    n,
    stride_b,
    stride_c,
    stride_p,
    sum_threshold,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Sum, mean, ``|sum| <= sum_threshold`` and ``min == max`` of BLOCK_C maps of one sample.

    Grid (B, cdiv(C, BLOCK_C)); each map is read once in chunks of BLOCK_P positions, summed
    in float32 (tree sum per chunk, running sum across chunks). Outputs [B, C]: float32 sum and
    mean, uint8 empty and constant flags.
    """
    b = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < chans
    base = x_ptr + b.to(tl.int64) * stride_b + cs.to(tl.int64)[:, None] * stride_c
    ps0 = tl.arange(0, BLOCK_P)
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    lo = tl.full((BLOCK_C,), float("inf"), dtype=tl.float32)
    hi = tl.full((BLOCK_C,), float("-inf"), dtype=tl.float32)
    has_nan = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for p0 in range(0, n, BLOCK_P):
        ps = p0 + ps0
        mask = c_ok[:, None] & (ps < n)[None, :]
        x = tl.load(base + ps.to(tl.int64)[None, :] * stride_p, mask=mask, other=0.0)
        x = x.to(tl.float32)
        total += tl.sum(x, axis=1)
        lo = tl.minimum(lo, tl.min(tl.where(mask, x, float("inf")), axis=1))
        hi = tl.maximum(hi, tl.max(tl.where(mask, x, float("-inf")), axis=1))
        # min / max need not propagate NaN (GPU min.f32 does not): a map holding NaN is never
        # constant, as with the reference's amin / amax
        has_nan = tl.maximum(has_nan, tl.max((mask & (x != x)).to(tl.int32), axis=1))
    out = b * chans + cs
    tl.store(sum_ptr + out, total, mask=c_ok)
    tl.store(mean_ptr + out, total / (n * 1.0), mask=c_ok)
    tl.store(empty_ptr + out, (tl.abs(total) <= sum_threshold).to(tl.uint8), mask=c_ok)
    tl.store(const_ptr + out, ((lo == hi) & (has_nan == 0)).to(tl.uint8), mask=c_ok)


@triton.jit
def _centred_gram_kernel(
    x_ptr,
    mean_ptr,
    gram_ptr,
    batch,
    chans,
    n,
    per_split,
    stride_b,
    stride_c,
    stride_p,
    BLOCK_I: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial tile [BLOCK_I, BLOCK_I] of G_b = D_b D_b^T, D_b the centred maps [C, n] of b.

    Grid (B, T * T, S) with T = cdiv(C, BLOCK_I) tiles and S position splits: split s sums
    positions [s * per_split, (s + 1) * per_split) into ``gram[s, b]`` (the epilogue adds the
    S partials in a fixed order, so results are deterministic). Tiles of the maps are loaded,
    centred with the means of ``_map_stats_kernel`` and multiplied with ``tl.dot``
    (float32 accumulator).
    """
    b = tl.program_id(0)
    tiles = tl.cdiv(chans, BLOCK_I)
    ii = (tl.program_id(1) // tiles) * BLOCK_I + tl.arange(0, BLOCK_I)
    kk = (tl.program_id(1) % tiles) * BLOCK_I + tl.arange(0, BLOCK_I)
    split = tl.program_id(2)
    p_lo = split * per_split
    p_hi = tl.minimum(p_lo + per_split, n)
    i_ok = ii < chans
    k_ok = kk < chans
    mean_i = tl.load(mean_ptr + b * chans + ii, mask=i_ok, other=0.0)
    mean_k = tl.load(mean_ptr + b * chans + kk, mask=k_ok, other=0.0)
    base = x_ptr + b.to(tl.int64) * stride_b
    a_base = base + ii.to(tl.int64)[:, None] * stride_c
    b_base = base + kk.to(tl.int64)[:, None] * stride_c
    ps0 = tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_I, BLOCK_I), dtype=tl.float32)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        ps = p0 + ps0
        p_ok = (ps < p_hi)[None, :]
        off = ps.to(tl.int64)[None, :] * stride_p
        a = tl.load(a_base + off, mask=i_ok[:, None] & p_ok, other=0.0).to(tl.float32)
        a = tl.where(i_ok[:, None] & p_ok, a - mean_i[:, None], 0.0)
        c = tl.load(b_base + off, mask=k_ok[:, None] & p_ok, other=0.0).to(tl.float32)
        c = tl.where(k_ok[:, None] & p_ok, c - mean_k[:, None], 0.0)
        acc = tl.dot(a, tl.trans(c), acc, input_precision=PRECISION)
    plane = (split.to(tl.int64) * batch + b) * chans * chans
    out = gram_ptr + plane + ii[:, None] * chans + kk[None, :]
    tl.store(out, acc, mask=i_ok[:, None] & k_ok[None, :])


@triton.jit
def _corr_epilogue_kernel(
    gram_ptr,
    const_ptr,
    corr_ptr,
    red_ptr,
    batch,
    chans,
    splits,
    corr_threshold,
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WRITE_CORR: tl.constexpr,
):
    """Correlations of BLOCK_I maps of sample b against all maps; redundancy flags.

    Grid (B, cdiv(C, BLOCK_I)); G is the sum of the ``splits`` partial Gram matrices
    ``gram[s, b]``. ``corr = clamp(G_ik / (sqrt(G_ii) sqrt(G_kk)), -1, 1)``, 0 when
    map i or k is constant, exactly 1 on the diagonal; ``redundant[i]`` = some k < i with
    ``corr >= corr_threshold``. ``corr`` [B, C, C] is written only when WRITE_CORR.
    """
    b = tl.program_id(0)
    ii = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = ii < chans
    g_b = gram_ptr + b.to(tl.int64) * chans * chans
    split_stride = batch.to(tl.int64) * chans * chans
    g_ii = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for sp in range(0, splits):
        g_ii += tl.load(g_b + sp * split_stride + ii * (chans + 1), mask=i_ok, other=1.0)
    inv_i = tl.where(g_ii > 0, 1.0 / tl.sqrt(tl.maximum(g_ii, 1e-37)), 0.0)
    const_i = tl.load(const_ptr + b * chans + ii, mask=i_ok, other=0) != 0
    red = tl.zeros((BLOCK_I,), dtype=tl.int32)
    for k0 in range(0, chans, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < chans
        g_kk = tl.zeros((BLOCK_K,), dtype=tl.float32)
        g = tl.zeros((BLOCK_I, BLOCK_K), dtype=tl.float32)
        mask = i_ok[:, None] & k_ok[None, :]
        for sp in range(0, splits):
            g_s = g_b + sp * split_stride
            g_kk += tl.load(g_s + kk * (chans + 1), mask=k_ok, other=1.0)
            g += tl.load(g_s + ii[:, None] * chans + kk[None, :], mask=mask, other=0.0)
        inv_k = tl.where(g_kk > 0, 1.0 / tl.sqrt(tl.maximum(g_kk, 1e-37)), 0.0)
        const_k = tl.load(const_ptr + b * chans + kk, mask=k_ok, other=0) != 0
        r = g * inv_i[:, None] * inv_k[None, :]
        r = tl.where(r != r, r, tl.minimum(tl.maximum(r, -1.0), 1.0))  # the clamp keeps NaN
        r = tl.where(const_i[:, None] | const_k[None, :], 0.0, r)
        r = tl.where(ii[:, None] == kk[None, :], 1.0, r)
        hit = mask & (kk[None, :] < ii[:, None]) & (r >= corr_threshold)
        red = tl.maximum(red, tl.max(hit.to(tl.int32), axis=1))
        if WRITE_CORR:
            out = corr_ptr + b.to(tl.int64) * chans * chans + ii[:, None] * chans + kk[None, :]
            tl.store(out, r, mask=mask)
    tl.store(red_ptr + b * chans + ii, red.to(tl.uint8), mask=i_ok)


def _gram_block(chans: int) -> int:
    """Channel tile of the Gram kernel: a power of two in [16, 64] (tl.dot needs >= 16)."""
    return max(16, min(64, triton.next_power_of_2(chans)))


@torch.library.triton_op("craft_ext::feature_map_stats_triton", mutates_args=())
def feature_map_stats_triton(
    fmap: Tensor, sum_threshold: float, corr_threshold: float, return_corr: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(sum, corr, empty, redundant)`` of ``fmap`` [B, C, H, W] (see the module docs).

    sum float32 [B, C]; corr float32 [B, C, C] (an empty [B, 0, 0] unless ``return_corr``);
    empty and redundant bool [B, C]. Any float dtype and any strides whose H, W dims merge
    (contiguous, channels_last, slices along B or C); otherwise a contiguous copy is read.
    Diba & Khosravi, IASC 2023, Eqs. 2, 5-10.
    """
    b, c, h, w = fmap.shape
    n = h * w
    if fmap.stride(2) != w * fmap.stride(3):
        fmap = fmap.contiguous()
    x = fmap.as_strided((b, c, n), (fmap.stride(0), fmap.stride(1), fmap.stride(3)))
    dev = fmap.device
    sums = torch.empty((b, c), dtype=torch.float32, device=dev)
    mean = torch.empty((b, c), dtype=torch.float32, device=dev)
    empty = torch.empty((b, c), dtype=torch.uint8, device=dev)
    constant = torch.empty((b, c), dtype=torch.uint8, device=dev)
    strides = (x.stride(0), x.stride(1), x.stride(2))
    grid1 = (b, triton.cdiv(c, _STATS_BLOCK_C))
    torch.library.wrap_triton(_map_stats_kernel)[grid1](
        x,
        sums,
        mean,
        empty,
        constant,
        c,
        n,
        *strides,
        sum_threshold,
        BLOCK_C=_STATS_BLOCK_C,
        BLOCK_P=_STATS_BLOCK_P,
    )
    block_i = _gram_block(c)
    tiles = triton.cdiv(c, block_i)
    chunks = triton.cdiv(n, _GRAM_BLOCK_P)
    splits = max(1, min(chunks, _TARGET_PROGRAMS // (b * tiles * tiles)))
    per_split = triton.cdiv(chunks, splits) * _GRAM_BLOCK_P
    splits = triton.cdiv(n, per_split)
    gram = torch.empty((splits, b, c, c), dtype=torch.float32, device=dev)
    grid2 = (b, tiles * tiles, splits)
    torch.library.wrap_triton(_centred_gram_kernel)[grid2](
        x,
        mean,
        gram,
        b,
        c,
        n,
        per_split,
        *strides,
        BLOCK_I=block_i,
        BLOCK_P=_GRAM_BLOCK_P,
        PRECISION="tf32x3",
    )
    corr = torch.empty((b, c, c) if return_corr else (b, 0, 0), dtype=torch.float32, device=dev)
    redundant = torch.empty((b, c), dtype=torch.uint8, device=dev)
    grid3 = (b, triton.cdiv(c, _EPI_BLOCK))
    torch.library.wrap_triton(_corr_epilogue_kernel)[grid3](
        gram,
        constant,
        corr if return_corr else gram,  # never written without WRITE_CORR: no null pointer
        redundant,
        b,
        c,
        splits,
        corr_threshold,
        BLOCK_I=_EPI_BLOCK,
        BLOCK_K=_EPI_BLOCK,
        WRITE_CORR=return_corr,
    )
    return sums, corr, empty.view(torch.bool), redundant.view(torch.bool)
