"""Triton kernels of ``craft_ext::feature_map_stats_triton`` (Diba & Khosravi, IASC 2023).

For ``fmap`` [B, C, H, W] and map x_bi (n = H*W values, mean m_bi, centred d_bi = x_bi - m_bi)::

    sum[b, i]       = sum_p x_bip                                (float32 [B, C])
    empty[b, i]     = |sum[b, i]| <= sum_threshold               (Eq. 2)
    corr[b, i, k]   = G_bik / sqrt(G_bii G_bkk),  G_b = D_b D_b^T (Eqs. 5-9)
    redundant[b, i] = any_{k < i} corr[b, i, k] >= corr_threshold (Eq. 10)

Pearson correlation does not change under the paper's min-max normalisation, so the raw maps
are used and no normalised copy is made. The input is read once (the bound of this op is the
bandwidth of that read), in two launches:

1. ``_gram_stats_kernel``: per sample, the Gram matrix of the *pivot-shifted* maps
   y_bip = x_bip - q_bi, with q_bi a value of map i itself (the median of three), by
   ``tl.dot`` in 3xTF32 (tensor cores at float32 accuracy), and in the same pass each map's
   sum, shifted sum s_bi = sum_p y_bip, min and max. Only the tiles on and below the diagonal
   of the symmetric matrix are computed. Positions are split across programs into partials
   when B * tiles alone would leave the GPU idle.
2. ``_corr_epilogue_kernel``: adds the partials (fixed order: deterministic), centres the Gram
   matrix exactly as::

       G_bik = sum_p y_bip y_bkp - s_bi s_bk / n     (= sum_p d_bip d_bkp, as sum_p d_bip = 0)

   then the correlations (constant maps: 0 off the diagonal, diagonal 1, clamped to [-1, 1],
   NaN kept), optionally written out, the redundancy and the empty flags.

Shifting by a value of the map itself keeps the shifted values of the order of the map's
spread, not of its mean: with |m| >> std an uncentred Gram would lose every digit to the
n m_i m_k term (``tests/test_feature_map_stats.py`` has such maps), this one does not.

Semantics: ``craft_ext.reference.feature_map_stats``.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["feature_map_stats_triton"]

_GRAM_BLOCK_P = 32
_EPI_BLOCK = 32
# The Gram kernel splits the positions of each sample until about this many programs run
# (B=100, C=64, 112x112 gets 10 splits; C=512, 7x7 needs none).
_TARGET_PROGRAMS = 1024
# per-map partial statistics of each split: sum, shifted sum, min, max
_N_STATS = 4


@triton.jit
def _lower_tile_pair(q):
    """Tile pair (ti, tk), tk <= ti, of the q-th tile on or below the diagonal, in the order
    q = ti (ti + 1) / 2 + tk (the float square root is corrected to the exact integer)."""
    ti = ((tl.sqrt((8 * q + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    ti = tl.where((ti + 1) * (ti + 2) // 2 <= q, ti + 1, ti)
    ti = tl.where(ti * (ti + 1) // 2 > q, ti - 1, ti)
    return ti, q - ti * (ti + 1) // 2


@triton.jit
def _pivot(rows, ok, n, stride_p):
    """Pivot of each map (``rows``: pointers to its first value): the median of its values at
    positions n // 4, n // 2 and n - 1 - n // 4 as float32. Min / max only, so every program
    gets the same bits for a map; away from the padded borders, and one outlier among the
    three is never chosen."""
    a = tl.load(rows + tl.cast(n // 4, tl.int64) * stride_p, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(rows + tl.cast(n // 2, tl.int64) * stride_p, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(rows + tl.cast(n - 1 - n // 4, tl.int64) * stride_p, mask=ok, other=0.0)
    return tl.maximum(tl.minimum(a, b), tl.minimum(tl.maximum(a, b), c.to(tl.float32)))


@triton.jit
def _gram_stats_kernel(
    x_ptr,
    gram_ptr,
    part_ptr,
    batch,
    chans,
    n,
    per_split,
    pairs,
    stride_b,
    stride_c,
    stride_p,
    BLOCK_I: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial shifted Gram tile and per-map statistics of one sample, one pass over its maps.

    Grid (B * P, S): P = T (T + 1) / 2 tile pairs (ti >= tk) of T = cdiv(C, BLOCK_I) channel
    tiles, S position splits. Program (b * P + q, s) reads positions
    [s * per_split, (s + 1) * per_split) of the maps of tiles ti and tk (float32 after the
    load, any input dtype), shifts each map i by its pivot q_bi (:func:`_pivot`), and writes::

        gram[s, b, i, k]    = sum_p y_bip y_bkp      (i in tile ti, k in tile tk; float32)
        part[s, b, 0, i]    = sum_p x_bip            part[s, b, 1, i] = sum_p y_bip
        part[s, b, 2, i]    = min_p x_bip            part[s, b, 3, i] = max_p x_bip

    (``part`` by the diagonal programs, ti == tk). ``tl.dot`` accumulates in float32 with
    ``PRECISION`` inputs. Diba & Khosravi, IASC 2023, Eqs. 2, 5-9.
    """
    pid = tl.program_id(0)
    b = pid // pairs
    ti, tk = _lower_tile_pair(pid % pairs)
    split = tl.program_id(1)
    p_lo = split * per_split
    p_hi = tl.minimum(p_lo + per_split, n)
    ii = ti * BLOCK_I + tl.arange(0, BLOCK_I)
    kk = tk * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = ii < chans
    k_ok = kk < chans
    base = x_ptr + b.to(tl.int64) * stride_b
    a_rows = base + ii.to(tl.int64) * stride_c
    c_rows = base + kk.to(tl.int64) * stride_c
    piv_i = _pivot(a_rows, i_ok, n, stride_p)
    piv_k = _pivot(c_rows, k_ok, n, stride_p)
    ps0 = tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_I, BLOCK_I), dtype=tl.float32)
    total = tl.zeros((BLOCK_I,), dtype=tl.float32)
    shifted = tl.zeros((BLOCK_I,), dtype=tl.float32)
    lo = tl.full((BLOCK_I,), float("inf"), dtype=tl.float32)
    hi = tl.full((BLOCK_I,), float("-inf"), dtype=tl.float32)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        ps = p0 + ps0
        p_ok = (ps < p_hi)[None, :]
        off = ps.to(tl.int64)[None, :] * stride_p
        a_mask = i_ok[:, None] & p_ok
        xa = tl.load(a_rows[:, None] + off, mask=a_mask, other=0.0).to(tl.float32)
        a = tl.where(a_mask, xa - piv_i[:, None], 0.0)
        c_mask = k_ok[:, None] & p_ok
        xc = tl.load(c_rows[:, None] + off, mask=c_mask, other=0.0).to(tl.float32)
        c = tl.where(c_mask, xc - piv_k[:, None], 0.0)
        acc = tl.dot(a, tl.trans(c), acc, input_precision=PRECISION)
        total += tl.sum(xa, axis=1)
        shifted += tl.sum(a, axis=1)
        lo = tl.minimum(lo, tl.min(tl.where(a_mask, xa, float("inf")), axis=1))
        hi = tl.maximum(hi, tl.max(tl.where(a_mask, xa, float("-inf")), axis=1))
    plane = split.to(tl.int64) * batch + b
    out = gram_ptr + plane * chans * chans + ii.to(tl.int64)[:, None] * chans + kk[None, :]
    tl.store(out, acc, mask=i_ok[:, None] & k_ok[None, :])
    stats = part_ptr + plane * (4 * chans) + ii
    diag = i_ok & (ii == kk)  # ti == tk (an elementwise test: the interpreter needs one)
    tl.store(stats, total, mask=diag)
    tl.store(stats + chans, shifted, mask=diag)
    tl.store(stats + 2 * chans, lo, mask=diag)
    tl.store(stats + 3 * chans, hi, mask=diag)


@triton.jit
def _map_totals(part_ptr, b, rows, ok, batch, chans, splits, BLOCK: tl.constexpr):
    """Sum, shifted sum and constant flag (min == max, no NaN) of maps ``rows`` of sample b,
    from the ``splits`` partials (added in split order)."""
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    shifted = tl.zeros((BLOCK,), dtype=tl.float32)
    lo = tl.full((BLOCK,), float("inf"), dtype=tl.float32)
    hi = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for sp in range(0, splits):
        p = part_ptr + (tl.cast(sp, tl.int64) * batch + b) * (4 * chans) + rows
        total += tl.load(p, mask=ok, other=0.0)
        shifted += tl.load(p + chans, mask=ok, other=0.0)
        lo = tl.minimum(lo, tl.load(p + 2 * chans, mask=ok, other=float("inf")))
        hi = tl.maximum(hi, tl.load(p + 3 * chans, mask=ok, other=float("-inf")))
    # a map holding NaN has a NaN sum (min / max need not propagate NaN: GPU min.f32 does
    # not), and a NaN sum without NaN values needs both infinities (min != max): constant
    # means min == max and a sum that is not NaN, as the reference's amax == amin
    return total, shifted, (lo == hi) & (total == total)


@triton.jit
def _corr_epilogue_kernel(
    gram_ptr,
    part_ptr,
    sum_ptr,
    empty_ptr,
    corr_ptr,
    red_ptr,
    batch,
    chans,
    n,
    splits,
    sum_threshold,
    corr_threshold,
    GRAM_TILE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WRITE_CORR: tl.constexpr,
):
    """Correlations of BLOCK_I maps of sample b against all maps; sums and flags.

    Grid (B, cdiv(C, BLOCK_I)). With the ``splits`` partials of ``_gram_stats_kernel`` added
    (tiles of GRAM_TILE channels: entry (i, k) is read from the tile pair on or below the
    diagonal, (k, i) above it): ``sum`` and ``empty = |sum| <= sum_threshold`` of maps i,
    ``G_ik = sum y_i y_k - s_i s_k / n``, ``corr = clamp(G_ik / (sqrt(G_ii) sqrt(G_kk)), -1, 1)``,
    0 when map i or k is constant, exactly 1 on the diagonal; ``redundant[i]`` = some k < i
    with ``corr >= corr_threshold``. ``corr`` [B, C, C] is written only when WRITE_CORR.
    Diba & Khosravi, IASC 2023, Eqs. 2, 5-10.
    """
    b = tl.program_id(0)
    ii = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = ii < chans
    n_f = n * 1.0
    total_i, shift_i, const_i = _map_totals(part_ptr, b, ii, i_ok, batch, chans, splits, BLOCK_I)
    tl.store(sum_ptr + b * chans + ii, total_i, mask=i_ok)
    tl.store(empty_ptr + b * chans + ii, (tl.abs(total_i) <= sum_threshold).to(tl.uint8), mask=i_ok)
    g_b = gram_ptr + b.to(tl.int64) * chans * chans
    split_stride = tl.cast(chans, tl.int64) * chans * batch  # chans, batch may be constexpr 1
    g_ii = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for sp in range(0, splits):
        g_ii += tl.load(g_b + tl.cast(sp, tl.int64) * split_stride + ii * (chans + 1), mask=i_ok)
    g_ii = g_ii - shift_i * (shift_i / n_f)
    inv_i = tl.where(g_ii > 0, 1.0 / tl.sqrt(tl.maximum(g_ii, 1e-37)), 0.0)
    red = tl.zeros((BLOCK_I,), dtype=tl.int32)
    for k0 in range(0, chans, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < chans
        _, shift_k, const_k = _map_totals(part_ptr, b, kk, k_ok, batch, chans, splits, BLOCK_K)
        mask = i_ok[:, None] & k_ok[None, :]
        lower = (ii // GRAM_TILE)[:, None] >= (kk // GRAM_TILE)[None, :]
        off = tl.where(lower, ii[:, None] * chans + kk[None, :], kk[None, :] * chans + ii[:, None])
        g_kk = tl.zeros((BLOCK_K,), dtype=tl.float32)
        g = tl.zeros((BLOCK_I, BLOCK_K), dtype=tl.float32)
        for sp in range(0, splits):
            g_s = g_b + tl.cast(sp, tl.int64) * split_stride
            g_kk += tl.load(g_s + kk * (chans + 1), mask=k_ok, other=0.0)
            g += tl.load(g_s + off, mask=mask, other=0.0)
        g_kk = g_kk - shift_k * (shift_k / n_f)
        g = g - shift_i[:, None] * (shift_k[None, :] / n_f)
        inv_k = tl.where(g_kk > 0, 1.0 / tl.sqrt(tl.maximum(g_kk, 1e-37)), 0.0)
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
    The maps are read once. Diba & Khosravi, IASC 2023, Eqs. 2, 5-10.
    """
    b, c, h, w = fmap.shape
    n = h * w
    if fmap.stride(2) != w * fmap.stride(3):
        fmap = fmap.contiguous()
    x = fmap.as_strided((b, c, n), (fmap.stride(0), fmap.stride(1), fmap.stride(3)))
    dev = fmap.device
    block_i = _gram_block(c)
    tiles = triton.cdiv(c, block_i)
    pairs = tiles * (tiles + 1) // 2
    chunks = triton.cdiv(n, _GRAM_BLOCK_P)
    splits = max(1, min(chunks, _TARGET_PROGRAMS // (b * pairs)))
    per_split = triton.cdiv(chunks, splits) * _GRAM_BLOCK_P
    splits = triton.cdiv(n, per_split)
    gram = torch.empty((splits, b, c, c), dtype=torch.float32, device=dev)
    part = torch.empty((splits, b, _N_STATS, c), dtype=torch.float32, device=dev)
    torch.library.wrap_triton(_gram_stats_kernel)[(b * pairs, splits)](
        x,
        gram,
        part,
        b,
        c,
        n,
        per_split,
        pairs,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        BLOCK_I=block_i,
        BLOCK_P=_GRAM_BLOCK_P,
        PRECISION="tf32x3",
    )
    sums = torch.empty((b, c), dtype=torch.float32, device=dev)
    empty = torch.empty((b, c), dtype=torch.uint8, device=dev)
    corr = torch.empty((b, c, c) if return_corr else (b, 0, 0), dtype=torch.float32, device=dev)
    redundant = torch.empty((b, c), dtype=torch.uint8, device=dev)
    torch.library.wrap_triton(_corr_epilogue_kernel)[(b, triton.cdiv(c, _EPI_BLOCK))](
        gram,
        part,
        sums,
        empty,
        corr if return_corr else gram,  # never written without WRITE_CORR: no null pointer
        redundant,
        b,
        c,
        n,
        splits,
        sum_threshold,
        corr_threshold,
        GRAM_TILE=block_i,
        BLOCK_I=_EPI_BLOCK,
        BLOCK_K=_EPI_BLOCK,
        WRITE_CORR=return_corr,
    )
    return sums, corr, empty.view(torch.bool), redundant.view(torch.bool)
