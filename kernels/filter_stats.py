"""Triton kernel of ``craft_ext::filter_stats_triton``: per-filter max |w|, L1, mean and std.

CRAFT (Bhatta et al., arXiv 2312.00072) calls a filter inactive when its largest absolute
weight is below a threshold and ranks donor filters by their L1 norm; this kernel computes
those statistics, plus mean and standard deviation for the scaled-Gaussian variant, in one
pass over the weight. The semantics are those of ``craft_ext.reference.filter_stats``.

Also home of the layout helpers shared with ``reactivate.py``: a weight [N, ...] is handed to
the kernels as a [N, K] row view (row stride, unit column stride) whenever every filter is one
dense block of memory under the filter-major permutation of its dims (contiguous,
channels_last, row or channel slices, transposed kernels); otherwise as a contiguous copy.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "filter_major_perm",
    "filter_rows",
    "filter_stats_triton",
    "launch_filter_stats",
    "rows_like",
    "tile_shape",
]

# Elements of one [BLOCK_N, BLOCK_K] tile and the largest K chunk, on a GPU and (CPU tensors)
# in the interpreter, where every program and every op costs Python overhead: large tiles.
_TILE = {"gpu": 2048, "interpreter": 65536}
_MAX_BLOCK_K = {"gpu": 512, "interpreter": 1024}


def filter_major_perm(t: Tensor) -> list[int]:
    """Dims of ``t``: 0 first, then dims 1.. by decreasing stride (stable).

    Under this permutation a channels_last conv weight [N, C, kh, kw] reads as [N, kh, kw, C],
    so each of its filters is one dense row-major block.
    """
    rest = sorted(range(1, t.dim()), key=lambda d: -t.stride(d))
    return [0, *rest]


def filter_rows(t: Tensor) -> Tensor | None:
    """A [N, K] view of ``t`` [N, ...] sharing its storage, or None when there is none.

    Row i holds the K = numel / N elements of filter ``t[i]`` in :func:`filter_major_perm`
    order; the view has a unit column stride (and row stride ``t.stride(0)`` when N > 1). None
    when a filter is not one dense block (e.g. a slice along the last dim) or rows overlap.
    """
    n = t.shape[0]
    k = t.numel() // n
    expected = 1
    for d in reversed(filter_major_perm(t)[1:]):
        if t.shape[d] == 1:
            continue
        if t.stride(d) != expected:
            return None
        expected *= t.shape[d]
    if n > 1 and t.stride(0) < k:
        return None
    return t.permute(filter_major_perm(t)).view(n, k)


def rows_like(other: Tensor, t: Tensor) -> Tensor:
    """``other`` (shaped like ``t``) as [N, K] rows in the element order of :func:`filter_rows`.

    Element (i, j) of the result and of ``filter_rows(t)`` refer to the same logical index.
    A copy unless ``other`` already has that layout.
    """
    n = t.shape[0]
    return other.permute(filter_major_perm(t)).reshape(n, t.numel() // n)


def tile_shape(n: int, k: int, device: torch.device) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_K)`` powers of two for a kernel walking [N, K] rows in K chunks."""
    where = "interpreter" if device.type == "cpu" else "gpu"
    block_k = min(triton.next_power_of_2(k), _MAX_BLOCK_K[where])
    block_n = max(1, min(triton.next_power_of_2(n), _TILE[where] // block_k))
    return block_n, block_k


@triton.jit
def _filter_stats_kernel(
    w_ptr,
    max_ptr,
    l1_ptr,
    mean_ptr,
    std_ptr,
    n_rows,
    k,
    row_stride,
    gamma_ptr,
    var_ptr,
    eps,
    FOLD: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Statistics of BLOCK_N filters (rows of the [N, K] view ``w``) per program.

    For row i with elements x_i0 .. x_i(K-1), loaded in any float dtype and rounded to
    float32 (as the reference does), then accumulated in float64::

        max_abs[i] = max_k |x_ik|        l1[i] = sum_k |x_ik|
        mean[i]    = sum_k x_ik / K      std[i] = sqrt(M2_i / K),  M2_i = sum_k (x_ik - mean[i])^2

    K is walked in chunks of BLOCK_K columns. Each chunk b (n_b columns) gives its own mean
    m_b and M2_b = sum (x - m_b)^2 (two passes over registers); it is merged into the running
    (n_a, m_a, M2_a) with Chan et al.'s pairwise formula::

        d = m_b - m_a;  n = n_a + n_b;  m = m_a + d * n_b / n;  M2 = M2_a + M2_b + d^2 n_a n_b / n

    which stays accurate when |mean| >> std (no sum-of-squares cancellation). With FOLD, the
    epilogue folds in the BatchNorm after the filters: s_i = gamma_i / sqrt(var_i + eps)
    (float32 [N] ``gamma`` (1 without HAS_GAMMA) and ``var``; IEEE-rounded sqrt and divide),
    and max_abs, l1, std are multiplied by |s_i|, mean by s_i (the filter the network
    applies; still one pass over the weight). Float64
    accumulators keep the float32 results within rounding of the exact statistics of the
    float32-rounded inputs even when a filter's elements cancel (mean << mean |x|), like
    torch's CPU std_mean. A NaN in a row makes its four outputs NaN (it propagates through the
    sums; max_abs is set from l1). Outputs are float32 [N]. Grid: (cdiv(N, BLOCK_N),).

    CRAFT, Bhatta et al., arXiv 2312.00072: max_abs finds inactive filters, l1 ranks donors.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    row_base = w_ptr + rows.to(tl.int64)[:, None] * row_stride
    cols0 = tl.arange(0, BLOCK_K)

    run_max = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_l1 = tl.zeros((BLOCK_N,), dtype=tl.float64)
    run_mean = tl.zeros((BLOCK_N,), dtype=tl.float64)
    run_m2 = tl.zeros((BLOCK_N,), dtype=tl.float64)
    run_n = tl.zeros((BLOCK_N,), dtype=tl.float64)  # K columns seen so far (same every row)
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + cols0
        mask = row_ok[:, None] & (cols < k)[None, :]
        x32 = tl.load(row_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        run_max = tl.maximum(run_max, tl.max(tl.abs(x32), axis=1))
        x = x32.to(tl.float64)
        n_a = run_n
        n_b = tl.sum((cols < k).to(tl.float64), axis=0)
        n_ab = n_a + n_b
        run_n = n_ab
        run_l1 += tl.sum(tl.abs(x), axis=1)
        chunk_mean = tl.sum(x, axis=1) / n_b
        dev = tl.where(mask, x - chunk_mean[:, None], 0.0)
        chunk_m2 = tl.sum(dev * dev, axis=1)
        delta = chunk_mean - run_mean
        run_mean = run_mean + delta * (n_b / n_ab)
        run_m2 = run_m2 + chunk_m2 + delta * delta * (n_a * n_b / n_ab)

    nan = float("nan")
    is_nan = run_l1 != run_l1
    run_max = tl.where(is_nan, nan, run_max)
    std = tl.sqrt(tl.maximum(run_m2, 0.0) / run_n)
    std = tl.where(run_m2 != run_m2, nan, std)
    out_l1 = run_l1.to(tl.float32)
    out_mean = run_mean.to(tl.float32)
    out_std = std.to(tl.float32)
    if FOLD:
        var = tl.load(var_ptr + rows, mask=row_ok, other=1.0)
        if HAS_GAMMA:
            gamma = tl.load(gamma_ptr + rows, mask=row_ok, other=1.0)
        else:
            gamma = tl.full((BLOCK_N,), 1.0, tl.float32)
        s = tl.div_rn(gamma, tl.sqrt_rn(var + eps))
        finite = (tl.abs(gamma) < float("inf")) & (tl.abs(var) < float("inf"))
        s = tl.where(finite, s, float("nan"))  # as reference.folded_scale
        a = tl.abs(s)
        run_max = run_max * a
        out_l1 = out_l1 * a
        out_mean = out_mean * s
        out_std = out_std * a
    tl.store(max_ptr + rows, run_max, mask=row_ok)
    tl.store(l1_ptr + rows, out_l1, mask=row_ok)
    tl.store(mean_ptr + rows, out_mean, mask=row_ok)
    tl.store(std_ptr + rows, out_std, mask=row_ok)


def launch_filter_stats(
    rows: Tensor,
    bn_weight: Tensor | None = None,
    running_var: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the stats kernel on ``rows`` [N, K] (unit column stride); four float32 [N].

    With ``running_var`` (and ``bn_weight``) [N], the statistics of the filters folded with
    that BatchNorm."""
    n, k = rows.shape
    outs = [torch.empty(n, dtype=torch.float32, device=rows.device) for _ in range(4)]
    fold = running_var is not None
    var = running_var.to(torch.float32).contiguous() if fold else outs[0]  # placeholder ptr
    gamma = bn_weight.to(torch.float32).contiguous() if bn_weight is not None else var
    block_n, block_k = tile_shape(n, k, rows.device)
    grid = (triton.cdiv(n, block_n),)
    torch.library.wrap_triton(_filter_stats_kernel)[grid](
        rows,
        *outs,
        n,
        k,
        rows.stride(0),
        gamma,
        var,
        float(eps),
        FOLD=fold,
        HAS_GAMMA=bn_weight is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return outs[0], outs[1], outs[2], outs[3]


@torch.library.triton_op("craft_ext::filter_stats_triton", mutates_args=())
def filter_stats_triton(
    weight: Tensor,
    bn_weight: Tensor | None = None,
    running_var: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-filter ``(max_abs, l1, mean, std)`` of ``weight`` [N, ...]; each float32 [N].

    ``max_abs = max |w|``, ``l1 = sum |w|``, ``mean = sum w / K``,
    ``std = sqrt(sum (w - mean)^2 / K)`` over the K = numel / N elements of each filter,
    accumulated in float32 from any float dtype and any layout (see the module docs). With
    ``running_var`` [N] (and ``bn_weight`` [N], else 1): the statistics of ``w_i * s_i``,
    s_i = bn_weight_i / sqrt(running_var_i + eps), the filter as its BatchNorm applies it.
    Semantics of ``craft_ext.reference.filter_stats``; CRAFT, Bhatta et al., arXiv 2312.00072.
    """
    if bn_weight is not None and running_var is None:
        raise ValueError("craft_ext: bn_weight needs running_var (folded statistics)")
    rows = filter_rows(weight)
    if rows is None:
        rows = weight.reshape(weight.shape[0], -1).contiguous()
    return launch_filter_stats(rows, bn_weight, running_var, eps)
