"""Pure-PyTorch reference implementations of every craft_ext operator.

These define the semantics that the C++ (``csrc/cpu``), CUDA (``csrc/cuda``) and Triton
(``kernels/``) backends must reproduce; the tests compare each backend against them. They use
only device-side torch ops (no ``.item()``, ``.cpu()``, ``nonzero()`` or boolean-mask indexing),
so they also serve as the fallback backend on any device, under CUDA-graph capture and under
``torch.compile(fullgraph=True)``.

Signatures match the operator schemas in ``csrc/ops.cpp`` exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .counter_rng import CounterGenerator

__all__ = [
    "CHANNEL_RULES",
    "filter_stats",
    "folded_scale",
    "rewrite_channel_",
    "reactivate_",
    "reactivate_and_reset_",
    "reactivation_inputs",
    "reactivate_and_record_",
    "craft_donors",
    "kaiming_std",
    "feature_map_stats",
    "connection_scores",
]


def _rows(weight: Tensor) -> Tensor:
    """``weight`` [N, ...] as [N, K] in logical (row-major) order; a copy if needed."""
    return weight.reshape(weight.shape[0], -1)


def sqrt_rn(x: Tensor) -> Tensor:
    """IEEE (correctly rounded) float32 square root of float32 ``x``.

    ``torch.sqrt`` on CPU goes through a vector math library accurate to about 1 ulp, not
    correctly rounded (about 14% of random float32 inputs differ in the last bit from IEEE
    sqrt), while the C++ (``std::sqrt``), CUDA (``sqrtf``) and Triton (``sqrt_rn``) kernels
    round correctly. This takes torch's result y and picks, among y and its two float32
    neighbours, the one whose rounding interval holds x: the midpoints m between neighbours
    and their squares are exact in float64, and r = sqrt_rn(x) is the value with
    (r - ulp / 2)^2 < x < (r + ulp / 2)^2 (no ties are possible). A no-op where torch's sqrt
    is already correctly rounded (CUDA); NaN, Inf, 0 and negative inputs keep torch's value.
    """
    y = torch.sqrt(x)
    lo = torch.nextafter(y, torch.full_like(y, -torch.inf))
    hi = torch.nextafter(y, torch.full_like(y, torch.inf))
    xd, yd = x.double(), y.double()
    m_lo, m_hi = (yd + lo.double()) * 0.5, (yd + hi.double()) * 0.5
    fixed = torch.where(m_hi * m_hi < xd, hi, torch.where(m_lo * m_lo > xd, lo, y))
    return torch.where(torch.isfinite(y) & (y > 0), fixed, y)


def folded_scale(bn_weight: Tensor | None, running_var: Tensor, eps: float) -> Tensor:
    """Per-channel scale of a BatchNorm folded into the filters before it, float32 [N]::

        s_i = gamma_i / sqrt(running_var_i + eps)        (gamma_i = 1 when bn_weight is None)

    computed in float32 (``eps`` rounded to float32, then add, correctly rounded sqrt
    (:func:`sqrt_rn`), divide).
    In eval mode BN(conv_i(x)) = s_i * conv_i(x) + const, so ``w_i * s_i`` is the filter the
    network really applies. Where gamma or var is NaN or Inf (or var + eps < 0) the scale is
    NaN: such a channel is neither inactive nor a donor (a var of Inf would otherwise fold the
    filter to 0 and call a broken channel dead).
    """
    v = running_var.to(torch.float32)
    g = torch.ones_like(v) if bn_weight is None else bn_weight.to(torch.float32)
    s = g / sqrt_rn(v + eps)
    return torch.where(torch.isfinite(g) & torch.isfinite(v), s, torch.nan)


def filter_stats(
    weight: Tensor,
    bn_weight: Tensor | None = None,
    running_var: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-filter ``(max_abs, l1, mean, std)`` of ``weight`` [N, ...], each float32 [N].

    With filter i flattened to x_i of K elements::

        max_abs[i] = max_k |x_ik|        l1[i] = sum_k |x_ik|
        mean[i]    = sum_k x_ik / K
        std[i]     = sqrt(sum_k (x_ik - mean[i])^2 / K)      (correction = 0)

    computed in float32 from any floating input dtype. A NaN anywhere in a filter makes all
    four of its statistics NaN (an Inf makes ``max_abs`` and ``l1`` Inf).

    Folded (``running_var`` given): the statistics of the filter the network applies through
    the BatchNorm that follows it, ``x_i * s_i`` with s = :func:`folded_scale`; each raw float32
    statistic is multiplied by ``|s_i|`` (``mean`` by ``s_i``), one float32 product. Since
    rounding is monotonic, ``max_abs`` is then exactly max_k fl(|x_ik| * |s_i|).
    """
    x = _rows(weight).to(torch.float32)
    max_abs = x.abs().amax(dim=1)
    l1 = x.abs().sum(dim=1)
    std, mean = torch.std_mean(x, dim=1, correction=0)
    if running_var is not None:
        s = folded_scale(bn_weight, running_var, eps)
        a = s.abs()
        return max_abs * a, l1 * a, mean * s, std * a
    return max_abs, l1, mean, std


def kaiming_std(fan_in: int) -> float:
    """He / Kaiming-normal standard deviation for ReLU-family layers: sqrt(2 / fan_in)."""
    return math.sqrt(2.0 / fan_in)


def craft_donors(
    inactive: Tensor,
    active: Tensor,
    used: Tensor,
    l1: Tensor,
    order_key: Tensor,
    fallback_u: Tensor,
) -> tuple[Tensor, Tensor]:
    """CRAFT pairing of inactive filters with donors; returns ``(donor, newly_used)``.

    Inputs are [N] tensors: ``inactive``/``active``/``used`` bool, ``l1``/``order_key``/
    ``fallback_u`` float32. The rules (Bhatta et al., arXiv 2312.00072, sec. 4.3):

    1. Candidates are active filters not yet spent (``active & ~used``), ranked by L1 norm,
       largest first; ties go to the lower index. Let ``n_cand`` be their number.
    2. The inactive filters are put in random order: ascending ``order_key``, ties to the lower
       index. The inactive filter at position p < n_cand takes the candidate of rank p, which
       becomes spent (``newly_used``).
    3. Every inactive filter at position p >= n_cand takes a donor drawn from the spent active
       filters ``S = active & (used | newly_used)`` listed in index order: the element at
       ``r = min(floor(fallback_u[i] * |S|), |S| - 1)`` (float32 product), i being the
       inactive filter.
    4. Without any active filter nothing is paired: ``donor`` is -1 everywhere.

    ``donor[i]`` is the donor of inactive filter i, -1 for filters that get none.
    """
    n = inactive.shape[0]
    device = inactive.device
    inf = float("inf")  # a Python scalar: torch.tensor(x, device=cuda) would be a host copy
    pos = torch.arange(n, device=device)

    cand = active & ~used
    n_cand = cand.sum()
    n_inactive = inactive.sum()
    donor_order = torch.sort(torch.where(cand, -l1, inf), stable=True).indices
    target_order = torch.sort(torch.where(inactive, order_key, inf), stable=True).indices

    slot_paired = (pos < n_cand) & (pos < n_inactive)
    newly_used = torch.zeros_like(used).scatter(0, donor_order, slot_paired)

    spent = active & (used | newly_used)
    n_spent = spent.sum()
    spent_list = torch.sort((~spent).to(torch.uint8), stable=True).indices
    r = torch.floor(fallback_u * n_spent.to(torch.float32)).to(torch.int64)
    r = torch.minimum(r, (n_spent - 1).clamp(min=0))
    fallback = spent_list[r]

    slot_donor = torch.where(pos < n_cand, donor_order, -1)
    donor = torch.empty_like(pos).scatter(0, target_order, slot_donor)
    donor = torch.where(donor < 0, fallback, donor)
    donor = torch.where(inactive & active.any(), donor, -1)
    return donor, newly_used


#: The per-channel entries that follow a watched filter row, in schema order: the conv / linear
#: bias, the BatchNorm weight (gamma), bias (beta), running mean and running variance, and the
#: per-channel PReLU slope. Each is a [N] tensor (one entry per filter) or absent.
CHANNEL_ENTRIES = ("bias", "bn_weight", "bn_bias", "running_mean", "running_var", "prelu")

#: How a reactivation rewrites entry ``t`` of a reactivated channel i, per method (see
#: :func:`rewrite_channel_`): ``"neg"``: ``t[i] = -t[d]``, ``"copy"``: ``t[i] = t[d]``, a number:
#: ``t[i] = number``, None: left as it is; d is the donor (craft) or the source (scaled_gaussian).
#:
#: * craft: the whole channel becomes the complement of its donor's *through* BN. With
#:   w_i = -w_d, b_i = -b_d, gamma_i = gamma_d, beta_i = -beta_d, mean_i = -mean_d,
#:   var_i = var_d: BN_i(conv_i(x)) = -BN_d(conv_d(x)) exactly, in train mode (batch statistics
#:   of a negated map are the negated mean and the same variance) and in eval mode. The PReLU
#:   slope is the donor's.
#: * scaled_gaussian: the new filter is drawn from N(mean_s, std_s) of the source filter s, so
#:   in expectation it has s's element mean and second moment; the channel takes s's bias, gamma,
#:   running statistics and slope, with beta 0 (no learned offset). Its eval-mode output is then
#:   about gamma_s-scaled and centred; BN's running averages settle the rest in training.
#: * random (the baseline): the channel is re-initialised as a freshly built layer: bias 0,
#:   gamma 1, beta 0, running mean 0, running variance 1 (BatchNorm's reset values), slope kept
#:   (its initial value is the model's choice; a slope does not kill a channel).
CHANNEL_RULES: dict[str, dict[str, str | float | None]] = {
    "bias": {"craft": "neg", "scaled_gaussian": "copy", "random": 0.0},
    "bn_weight": {"craft": "copy", "scaled_gaussian": "copy", "random": 1.0},
    "bn_bias": {"craft": "neg", "scaled_gaussian": 0.0, "random": 0.0},
    "running_mean": {"craft": "neg", "scaled_gaussian": "copy", "random": 0.0},
    "running_var": {"craft": "copy", "scaled_gaussian": "copy", "random": 1.0},
    "prelu": {"craft": "copy", "scaled_gaussian": "copy", "random": None},
}


def rewrite_channel_(
    reactivated: Tensor,
    donor: Tensor,
    method: str,
    bias: Tensor | None = None,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    prelu: Tensor | None = None,
) -> None:
    """Rewrite the per-channel entries of the reactivated channels in place.

    For every given [N] tensor t (see :data:`CHANNEL_ENTRIES`) and every i with
    ``reactivated[i]``, ``t[i]`` becomes what :data:`CHANNEL_RULES` says for ``method``, with
    ``d = donor[i]``; other entries are unchanged. Copies and negations are exact in every
    dtype, so every backend gives the same bits.
    """
    src = donor.clamp(min=0)
    tensors = (bias, bn_weight, bn_bias, running_mean, running_var, prelu)
    for name, t in zip(CHANNEL_ENTRIES, tensors, strict=True):
        rule = CHANNEL_RULES[name][method]
        if t is None or rule is None:
            continue
        if rule == "copy":
            new = t.index_select(0, src)
        elif rule == "neg":
            new = -t.index_select(0, src)
        else:
            new = torch.full_like(t, float(rule))  # type: ignore[arg-type]
        t.copy_(torch.where(reactivated, new, t))


def reactivate_(
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
    """Reactivate the inactive filters of ``weight`` [N, ...] in place.

    Detection. With the float32 statistics of :func:`filter_stats` and a = 1 (``folded``
    False, the paper's rule) or a = |:func:`folded_scale`| (``folded``: the filter the network
    applies through the BatchNorm that follows, gamma / sqrt(running_var + eps))::

        strength_max[i] = max_abs[i] * a[i]       strength_l1[i] = l1[i] * a[i]

    (float32 products; with a = 1 the raw statistics). Filter i is *inactive* when
    ``strength_max[i] <= threshold`` (threshold rounded to float32), *active* when it is not
    inactive and ``strength_l1[i]`` is finite. Filters holding NaN or Inf, and channels whose
    gamma or variance is NaN / Inf, are neither: never donors, left unchanged.

    * ``"craft"``: each inactive filter becomes the negative of its donor from
      :func:`craft_donors` (donors ranked by ``strength_l1``); ``used`` |= the donors spent.
    * ``"scaled_gaussian"``: with s the active filter of largest ``strength_l1`` (lowest index
      on ties), each inactive filter becomes ``mean[s] + std[s] * noise[i]`` (raw weight
      statistics, float32, then cast); ``donor[i] = s``.
    * ``"random"``: each inactive filter becomes ``noise[i] * sqrt(2 / K)`` (He / Kaiming
      normal, fan-in K); ``donor[i] = -1``. This works even with no active filter.

    Then the channel entries that are given (``bias`` .. ``prelu``, [N] each) are rewritten for
    the reactivated filters by :func:`rewrite_channel_`, so that the whole channel is alive.
    ``craft`` and ``scaled_gaussian`` leave a layer with no active filter unchanged.
    Returns ``(inactive, reactivated, donor, count)``: bool [N] before the call, bool [N],
    int64 [N] (-1 where none), and int64 [] = ``reactivated.sum()``.
    """
    n = weight.shape[0]
    rows = _rows(weight)
    k = rows.shape[1]
    max_abs, l1, mean, std = filter_stats(rows)
    if folded:
        if running_var is None:
            raise ValueError("folded detection needs running_var")
        a = folded_scale(bn_weight, running_var, eps).abs()
        max_abs, l1 = max_abs * a, l1 * a
    inactive = max_abs <= threshold  # a Python float: compared after rounding to float32
    active = ~inactive & torch.isfinite(l1)
    any_active = active.any()

    if method == "craft":
        donor, newly_used = craft_donors(inactive, active, used, l1, order_key, fallback_u)
        reactivated = inactive & any_active
        new = -rows[donor.clamp(min=0)]
        used.copy_(used | newly_used)
    elif method == "scaled_gaussian":
        source = torch.argmax(torch.where(active, l1, -torch.inf))
        reactivated = inactive & any_active
        donor = torch.where(reactivated, source, -1)
        assert noise is not None
        z = _rows(noise).to(torch.float32)
        src = source.view(1)  # a [1] index (a 0-d one would be read to the host when traced)
        new = (mean[src] + std[src] * z).to(weight.dtype)
    elif method == "random":
        reactivated = inactive
        donor = torch.full((n,), -1, dtype=torch.int64, device=weight.device)
        assert noise is not None
        z = _rows(noise).to(torch.float32)
        new = (z * kaiming_std(k)).to(weight.dtype)
    else:
        raise ValueError(f"unknown method {method!r}")

    weight.copy_(torch.where(reactivated[:, None], new, rows).view(weight.shape))
    rewrite_channel_(
        reactivated, donor, method, bias, bn_weight, bn_bias, running_mean, running_var, prelu
    )
    return inactive, reactivated, donor, reactivated.sum()


def reactivation_inputs(
    weight: Tensor, generator: torch.Generator | CounterGenerator | None, method: str
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The random inputs of :func:`reactivate_` drawn from ``generator``, in this order:
    ``order_key = rand(N)``, ``fallback_u = rand(N)`` and, unless ``method == "craft"``,
    ``noise = randn(weight.shape)``; all float32 on ``weight``'s device. Every caller (the
    Python API, :func:`reactivate_and_reset_` and its C++ kernel) draws exactly these, so a
    generator is consumed the same way whichever path runs. A
    :class:`craft_ext.counter_rng.CounterGenerator` draws the same three with its own
    (traceable) ``rand`` / ``randn``."""
    n, device = weight.shape[0], weight.device
    if isinstance(generator, CounterGenerator):  # traceable: same order of draws
        order_key, fallback_u = generator.rand(n), generator.rand(n)
        return order_key, fallback_u, generator.randn(weight.shape) if method != "craft" else None
    order_key = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
    fallback_u = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
    noise = None
    if method != "craft":
        noise = torch.randn(weight.shape, generator=generator, device=device, dtype=torch.float32)
    return order_key, fallback_u, noise


def reactivate_and_reset_(
    weight: Tensor,
    used: Tensor,
    total: Tensor,
    state: list[Tensor],
    generator: torch.Generator | None,
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
    *,
    reactivate: Callable[..., tuple[Tensor, ...]] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One reactivation as :class:`craft_ext.Reactivator` runs it after an optimizer step.

    Draws :func:`reactivation_inputs`, runs ``reactivate`` (default :func:`reactivate_`; the
    Python API passes the backend's operator) with the channel arguments, then for every
    reactivated filter i::

        buf[i, ...] = 0     for every buf in ``state`` on weight's device shaped like weight,
                            or shaped [N] (the state of a channel entry: gamma, beta, slope,
                            bias); other tensors (e.g. Adam's scalar step) are left alone
        total += count

    so that a new channel does not inherit the optimizer state (momentum, Adam moments) of the
    dead channel it replaces. ``masked_fill_`` also clears NaN / Inf, which a multiply by 0
    would keep. Returns :func:`reactivate_`'s ``(inactive, reactivated, donor, count)``.
    """
    order_key, fallback_u, noise = reactivation_inputs(weight, generator, method)
    out = (reactivate or reactivate_)(
        weight,
        used,
        order_key,
        fallback_u,
        noise,
        threshold,
        method,
        bias,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        prelu,
        eps,
        folded,
    )
    n = weight.shape[0]
    mask = out[1].view(n, *([1] * (weight.dim() - 1)))
    for buf in state:
        if buf.device != weight.device:
            continue
        if buf.shape == weight.shape:
            buf.masked_fill_(mask, 0)
        elif buf.shape == (n,):
            buf.masked_fill_(out[1], 0)
    total.add_(out[3])
    return out  # type: ignore[return-value]


def reactivate_and_record_(
    weight: Tensor,
    used: Tensor,
    total: Tensor,
    state: list[Tensor],
    reactivated_log: Tensor,
    donor_log: Tensor,
    slot: int,
    generator: torch.Generator | None,
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
    *,
    reactivate: Callable[..., tuple[Tensor, ...]] | None = None,
) -> None:
    """Reference of the overload ``craft_ext::reactivate_and_reset_.record``:
    :func:`reactivate_and_reset_`, keeping its ``reactivated`` and ``donor`` as row ``slot`` of
    the event logs instead of returning them::

        _, reactivated, donor, _ = reactivate_and_reset_(weight, used, total, state, ...)
        reactivated_log[slot] = reactivated     (bool  [R, N])
        donor_log[slot]       = donor           (int64 [R, N])

    :class:`craft_ext.Reactivator` keeps the events it has not reported yet in such logs (one
    pair per watched weight), so a step with ``interval=1`` creates no tensor to hold.
    """
    out = reactivate_and_reset_(
        weight,
        used,
        total,
        state,
        generator,
        threshold,
        method,
        bias,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        prelu,
        eps,
        folded,
        reactivate=reactivate,
    )
    reactivated_log[slot] = out[1]
    donor_log[slot] = out[2]


def feature_map_stats(
    fmap: Tensor, sum_threshold: float, corr_threshold: float, return_corr: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample feature-map statistics of ``fmap`` [B, C, H, W] (Diba & Khosravi, IASC 2023).

    With x_bi the H*W values of map i of sample b (n = H*W), m_bi their mean and
    d_bi = x_bi - m_bi::

        sum[b, i]       = sum_p x_bip                                           (float32 [B, C])
        empty[b, i]     = |sum[b, i]| <= sum_threshold                          (Eq. 2, bool)
        corr[b, i, k]   = <d_bi, d_bk> / sqrt(<d_bi, d_bi> <d_bk, d_bk>)        (Eqs. 5-9)
        redundant[b, i] = any_{k < i} corr[b, i, k] >= corr_threshold           (Eq. 10, bool)

    The paper correlates the min-max normalised maps; Pearson correlation is invariant to that
    affine map, so the raw maps give the same value without a normalised copy. A *constant*
    map (min == max) has correlation 0 with every other map; every diagonal entry is exactly 1.
    Correlations are clamped to [-1, 1]. Everything is computed in float32 from centred maps
    (accurate with large means); ``corr`` is [B, C, C] float32 when ``return_corr`` and an
    empty [B, 0, 0] tensor otherwise (``redundant`` is computed either way).
    """
    b, c = fmap.shape[0], fmap.shape[1]
    x = fmap.reshape(b, c, -1).to(torch.float32)
    total = x.sum(dim=2)
    mean = total / x.shape[2]
    constant = x.amax(dim=2) == x.amin(dim=2)
    d = x - mean[:, :, None]
    gram = torch.bmm(d, d.transpose(1, 2))
    ss = torch.diagonal(gram, dim1=1, dim2=2)
    inv = torch.where(ss > 0, torch.rsqrt(ss), torch.zeros_like(ss))
    corr = gram * inv[:, :, None] * inv[:, None, :]
    corr = corr.clamp(-1.0, 1.0)
    either_constant = constant[:, :, None] | constant[:, None, :]
    corr = torch.where(either_constant, torch.zeros_like(corr), corr)
    eye = torch.eye(c, dtype=torch.bool, device=fmap.device)
    corr = torch.where(eye, torch.ones_like(corr), corr)
    # Python scalars compare in float32 (no torch.tensor(x, device=...): a host-to-device copy)
    empty = total.abs() <= sum_threshold
    lower = torch.ones(c, c, dtype=torch.bool, device=fmap.device).tril(diagonal=-1)
    redundant = ((corr >= corr_threshold) & lower).any(dim=2)
    if not return_corr:
        corr = corr.new_empty((b, 0, 0))
    return total, corr, empty, redundant


def connection_scores(
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
    """Correlation scores ``[O, C*kh*kw]`` of the connections between a convolution's input
    ``x`` [N, C, H, W] and output ``y`` [N, O, Ho, Wo] (Sun, Wang and Tang, CVPR 2016).

    Same arguments as ``torch.ops.craft_ext.connection_scores_triton`` (``kernels/
    connection_scores.py``)::

        out[i, k] = sum_m f(corr_n(y[n, i, m], b[n, k, m]))     f = |.| if absolute else identity

    with ``b[n, (c, p, q), m] = x[n, c, oh*stride_h - pad_top + p*dil_h, ow*stride_w -
    pad_left + q*dil_w]`` (0 outside the image) at output position ``m = (oh, ow)``: Eq. 2 for
    a convolution, Eq. 1 (signed, one position) for a fully connected layer passed as a 1x1
    convolution. Correlations are over the N samples; a neuron constant over the samples
    (values are shifted by sample 0 first, so it becomes exactly 0) correlates 0 with
    everything; correlations are clamped to [-1, 1].

    ``splits``: the ``Ho`` output rows are cut into this many bands of consecutive rows (at
    most ``Ho``), one ``F.unfold`` each, whose partial sums are added, so that the whole im2col
    tensor ``[N, C*kh*kw, Ho*Wo]`` never exists; 0 (or less): a single band.

    Computed in float64 when ``x`` or ``y`` is float64 (the result is then float64), else in
    float32 (the Triton operator always returns float32). The caller validates shapes
    (:func:`craft_ext.sparsify.connection_scores`).
    """
    fn = torch.nn.functional
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    n, c, h, w = x.shape
    o, ho, wo = y.shape[1], y.shape[2], y.shape[3]
    # rows / columns of the zero-padded input that the output positions reach
    need_h = (ho - 1) * stride_h + dil_h * (kh - 1) + 1
    need_w = (wo - 1) * stride_w + dil_w * (kw - 1) + 1
    pads = (pad_left, max(0, need_w - pad_left - w), pad_top, max(0, need_h - pad_top - h))
    xp = fn.pad(x.to(dtype), pads)[:, :, :, :need_w]
    yd = y.to(dtype)
    rows = max(1, ho if splits <= 0 else -(-ho // min(splits, ho)))

    def centred(t: Tensor) -> tuple[Tensor, Tensor]:
        """[N, F, P] -> the values as [P, N, F] centred over N (after the shift by sample 0)
        and 1 / sqrt(sum over N of their squares) [P, F] (0 where that sum is 0)."""
        t = t.permute(2, 0, 1).clone(memory_format=torch.contiguous_format)
        t.sub_(t[:, :1].clone())
        t.sub_(t.mean(1, keepdim=True))
        sq = (t * t).sum(1)
        return t, torch.where(sq > 0, torch.rsqrt(torch.where(sq > 0, sq, 1.0)), 0.0)

    total = torch.zeros((o, c * kh * kw), dtype=dtype, device=x.device)
    for r0 in range(0, ho, rows):
        r1 = min(ho, r0 + rows)
        band = xp[:, :, r0 * stride_h : (r1 - 1) * stride_h + dil_h * (kh - 1) + 1, :]
        b = fn.unfold(band, (kh, kw), dilation=(dil_h, dil_w), stride=(stride_h, stride_w))
        a, inv_a = centred(yd[:, :, r0:r1, :].reshape(n, o, -1))  # [P, N, O]
        b, inv_b = centred(b)  # [P, N, K]
        r = torch.bmm(a.transpose(1, 2), b)  # [P, O, K] centred cross products
        r.mul_(inv_a.unsqueeze(2)).mul_(inv_b.unsqueeze(1)).clamp_(-1.0, 1.0)
        total += (r.abs_() if absolute else r).sum(0)
    return total
