"""Triton implementation of ``craft_ext::reactivate_triton_``: in-place CRAFT reactivation.

Bhatta et al., "CRAFT: Contextual Re-Activation of Filters for face recognition Training",
arXiv 2312.00072, sec. 4.3. The steps, all on the device and without a host synchronisation:

1. max |w| and L1 per filter as float32 ATen reductions of the logical-order rows, exactly
   the reference's (donors are ranked by L1, and near-ties pair differently under any other
   summation order; the CPU and CUDA kernels make the same choice), plus mean / std for
   ``scaled_gaussian``;
2. inactive / active masks, and the donor pairing of ``craft_ext.reference.craft_donors``
   (torch.sort / scatter on [N] vectors) or the scaled-Gaussian source (argmax of L1);
3. :func:`_rewrite_rows_kernel` overwrites the reactivated rows in place; ``used`` is updated
   with a torch op (it may be strided);
4. the channel entries that follow the filters (conv bias, BatchNorm weight / bias / running
   statistics, PReLU slope; [N] vectors) are rewritten with torch ops
   (``craft_ext.reference.rewrite_channel_``). With ``folded``, step 2 ranks and detects on the
   statistics times |gamma / sqrt(running_var + eps)|: the filters as the BatchNorm applies them.

The semantics are exactly those of ``craft_ext.reference.reactivate_``.
"""

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from craft_ext.reference import craft_donors, folded_scale, rewrite_channel_

from .filter_stats import filter_rows, rows_like, tile_shape

__all__ = ["reactivate_triton_"]

_METHOD_CODES = {"craft": 0, "scaled_gaussian": 1, "random": 2}


@triton.jit
def _rewrite_rows_kernel(
    w_ptr,
    noise_ptr,
    reactivated_ptr,
    donor_ptr,
    mean_ptr,
    std_ptr,
    source_ptr,
    n_rows,
    k,
    row_stride,
    noise_row_stride,
    scale,
    METHOD: tl.constexpr,
    IS_F64: tl.constexpr,
    ROUND_EACH: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Overwrite the reactivated rows of ``w`` [N, K] in place; BLOCK_N rows per program.

    For each row i with ``reactivated[i]`` (bool [N]) and every column j, by METHOD:

    * 0, craft: ``w[i, j] = -w[donor[i], j]`` (exact: negated in float32, or float64 when
      IS_F64, which hold the weight's dtype exactly; donors
      are active, so never reactivated: no row is both read and written);
    * 1, scaled_gaussian: ``w[i, j] = mean[s] + std[s] * noise[i, j]`` in float32, then cast,
      with s = ``source[0]`` the active filter of largest L1 norm (multiply and add each
      rounded, never fused: ``ROUND_EACH`` uses libdevice's ``mul_rn`` / ``add_rn``);
    * 2, random: ``w[i, j] = noise[i, j] * scale`` with scale = sqrt(2 / K) (He normal).

    Other rows are not touched. ``noise`` is float32 [N, K] (unit column stride) in the same
    element order as ``w`` (unused for craft).
    Grid: (cdiv(N, BLOCK_N),). CRAFT: Bhatta et al., arXiv 2312.00072, sec. 4.3.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    hit = tl.load(reactivated_ptr + rows, mask=row_ok, other=0) != 0
    out_base = w_ptr + rows.to(tl.int64)[:, None] * row_stride
    if METHOD == 0:
        donor = tl.load(donor_ptr + rows, mask=row_ok, other=0)
        src_base = w_ptr + tl.maximum(donor, 0).to(tl.int64)[:, None] * row_stride
    else:
        noise_base = noise_ptr + rows.to(tl.int64)[:, None] * noise_row_stride
    if METHOD == 1:
        source = tl.load(source_ptr)
        src_mean = tl.load(mean_ptr + source)
        src_std = tl.load(std_ptr + source)
    for k0 in range(0, k, BLOCK_K):
        cols = (k0 + tl.arange(0, BLOCK_K))[None, :]
        mask = hit[:, None] & (cols < k)
        if METHOD == 0:
            v = tl.load(src_base + cols, mask=mask, other=0.0)
            # negate in a float type holding the dtype exactly (no native 16-bit negation in
            # the interpreter); the round trip back to the weight's dtype is exact
            if IS_F64:
                new = -v.to(tl.float64)
            else:
                new = -v.to(tl.float32)
        else:
            z = tl.load(noise_base + cols, mask=mask, other=0.0).to(tl.float32)
            if METHOD == 1:
                if ROUND_EACH:  # explicit round-to-nearest multiply then add: never an FMA
                    new = libdevice.add_rn(src_mean, libdevice.mul_rn(src_std, z))
                else:  # the interpreter (numpy) rounds each operation anyway
                    new = src_mean + src_std * z
            else:
                new = z * scale
        tl.store(out_base + cols, new.to(w_ptr.dtype.element_ty), mask=mask)


@torch.library.triton_op(
    "craft_ext::reactivate_triton_",
    mutates_args={
        "weight",
        "used",
        "bias",
        "bn_weight",
        "bn_bias",
        "running_mean",
        "running_var",
        "prelu",
    },
)
def reactivate_triton_(
    weight: Tensor,
    used: Tensor,
    order_key: Tensor,
    fallback_u: Tensor,
    noise: Tensor | None,
    threshold: float,
    method: str,
    bias: Tensor | None = None,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    prelu: Tensor | None = None,
    eps: float = 1e-5,
    folded: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reactivate the inactive filters of ``weight`` [N, ...] in place (CRAFT).

    Filter i is inactive when ``max_abs[i] <= threshold`` (float32) and active when it is not
    inactive and ``l1[i]`` is finite. ``craft``: inactive filters become ``-weight[donor]``
    with donors from ``craft_ext.reference.craft_donors`` (L1-ranked unspent active filters,
    then random spent ones), and ``used |= newly spent``. ``scaled_gaussian``:
    ``mean[s] + std[s] * noise[i]``, s the active filter of largest L1. ``random``:
    ``noise[i] * sqrt(2 / K)``. craft / scaled_gaussian change nothing without an active
    filter.

    Args: weight [N, ...] any float dtype and layout (modified in place); used bool [N]
    (modified in place); order_key, fallback_u float32 [N] uniform; noise float32 shaped like
    weight (None for craft); threshold >= 0; method ``craft`` / ``scaled_gaussian`` /
    ``random``; the channel entries ``bias`` .. ``prelu`` (optional [N], rewritten for the
    reactivated filters by ``craft_ext.reference.rewrite_channel_``: [N] vectors, torch ops);
    ``folded``: detect and rank by max_abs and l1 times |bn_weight / sqrt(running_var + eps)|.

    Returns ``(inactive bool [N], reactivated bool [N], donor int64 [N], count int64 [])``,
    as ``craft_ext.reference.reactivate_``. Bhatta et al., arXiv 2312.00072, sec. 4.3.
    """
    if method not in _METHOD_CODES:
        raise ValueError(f"craft_ext: method must be one of {tuple(_METHOD_CODES)}, got {method!r}")
    n = weight.shape[0]
    k = weight.numel() // n
    device = weight.device
    rows = filter_rows(weight)
    target = weight if rows is not None else weight.contiguous()
    if rows is None:
        rows = target.view(n, k)

    x = weight.reshape(n, k).to(torch.float32)  # logical order, as the reference
    a = x.abs()
    max_abs, l1 = a.amax(dim=1), a.sum(dim=1)
    mean = std = l1  # placeholders, read by the kernel for scaled_gaussian only
    if folded:
        if running_var is None:
            raise ValueError("craft_ext: folded detection needs running_var")
        scale = folded_scale(bn_weight, running_var, eps).abs()
        max_abs, l1 = max_abs * scale, l1 * scale
    inactive = max_abs <= threshold  # a Python float: compared in float32, no host copy
    active = ~inactive & torch.isfinite(l1)
    any_active = active.any()

    newly_used = None
    donor = torch.full((n,), -1, dtype=torch.int64, device=device)
    source = torch.zeros((1,), dtype=torch.int64, device=device)
    noise_rows = rows  # placeholder pointer, never read for craft
    if method == "craft":
        donor, newly_used = craft_donors(inactive, active, used, l1, order_key, fallback_u)
        reactivated = inactive & any_active
    else:
        if noise is None:
            raise ValueError(f"craft_ext: method {method!r} needs noise")
        noise_rows = rows_like(noise, target).to(torch.float32).contiguous()
        if method == "scaled_gaussian":
            std, mean = torch.std_mean(x, dim=1, correction=0)
            source = torch.argmax(torch.where(active, l1, -torch.inf)).reshape(1)
            reactivated = inactive & any_active
            donor = torch.where(reactivated, source, -1)
        else:
            reactivated = inactive.clone()

    block_n, block_k = tile_shape(n, k, device)
    grid = (triton.cdiv(n, block_n),)
    torch.library.wrap_triton(_rewrite_rows_kernel)[grid](
        rows,
        noise_rows,
        reactivated,
        donor,
        mean,
        std,
        source,
        n,
        k,
        rows.stride(0),
        noise_rows.stride(0),
        math.sqrt(2.0 / k),
        METHOD=_METHOD_CODES[method],
        IS_F64=weight.dtype == torch.float64,
        # compiled (not interpreted): the multiply and add of mean + std * z are libdevice's
        # round-to-nearest ones, which no compiler contracts into an FMA, also where the
        # launch option below is not passed on (Inductor compiling this kernel in a graph)
        ROUND_EACH=os.environ.get("TRITON_INTERPRET", "0") != "1",
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        enable_fp_fusion=False,  # mean + std * z rounded twice, as the reference: no FMA
    )
    if newly_used is not None:
        used.logical_or_(newly_used)
    if target is not weight:
        weight.copy_(target)
    rewrite_channel_(
        reactivated, donor, method, bias, bn_weight, bn_bias, running_mean, running_var, prelu
    )
    return inactive, reactivated, donor, reactivated.sum()
