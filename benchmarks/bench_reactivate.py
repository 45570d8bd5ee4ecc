"""reactivate_ (CRAFT): every craft_ext backend on this machine vs a naive loop (pytest-benchmark).

Run explicitly (pytest does not collect ``benchmarks/`` with the tests)::

    python -m pytest benchmarks/bench_reactivate.py --benchmark-only

CRAFT reactivation (Bhatta et al., arXiv 2312.00072, sec. 4.3) of a float32 weight with a
quarter of its filters inactive (|w| <= 1e-4 < threshold 1e-3) and a fifth of the filters
already spent as donors, on an iresnet first conv [64, 3, 3, 3], an r50 conv [512, 512, 3, 3]
and a linear [512, 25088]. Every round starts from the same weight (restored untimed).

``naive`` is the loop people write: statistics by separate reductions, ``nonzero()`` and
boolean-mask indexing for the inactive filters and candidates, a Python loop assigning each
inactive filter the negative of its donor. ``extra_info`` holds ``speedup_vs_naive`` and the
achieved ``GB/s`` counting the minimum traffic (weight read once, reactivated filters and
their donors read / written once), and on CUDA ``fraction_of_peak``.
"""

from __future__ import annotations

import pytest
import torch

import craft_ext

SHAPES = {
    "iresnet-conv1-64x3x3x3": (64, 3, 3, 3),
    "r50-conv-512x512x3x3": (512, 512, 3, 3),
    "linear-512x25088": (512, 25088),
}
IMPLS = ["naive", "cpp", "cuda", "triton", "reference"]
THRESHOLD = 1e-3
INACTIVE_FRACTION = 0.25
USED_FRACTION = 0.2


def naive_craft_(w: torch.Tensor, used: torch.Tensor, threshold: float = THRESHOLD) -> int:
    """CRAFT written directly with nonzero() / boolean indexing and a per-filter loop."""
    flat = w.view(w.shape[0], -1)
    max_abs = flat.abs().amax(dim=1)
    l1 = flat.abs().sum(dim=1)
    inactive = max_abs <= threshold
    active = ~inactive & torch.isfinite(l1)
    if not bool(active.any()):
        return 0
    targets = torch.nonzero(inactive).flatten()
    targets = targets[torch.randperm(len(targets), device=w.device)]
    candidates = torch.nonzero(active & ~used).flatten()
    candidates = candidates[torch.argsort(l1[candidates], descending=True, stable=True)]
    for slot, i in enumerate(targets.tolist()):
        if slot < len(candidates):
            donor = int(candidates[slot])
            used[donor] = True
        else:
            spent = torch.nonzero(active & used).flatten()
            donor = int(spent[torch.randint(len(spent), (1,), device=w.device)])
        flat[i] = -flat[donor]
    return len(targets)


def _planted(shape: tuple[int, ...], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 0.05
    n = shape[0]
    rows = torch.randperm(n, generator=g)[: int(n * INACTIVE_FRACTION)]
    w[rows] = (torch.rand((len(rows), *shape[1:]), generator=g) - 0.5) * 2e-4
    used = torch.rand(n, generator=g) < USED_FRACTION
    return w.to(device), used.to(device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape_id", list(SHAPES))
def test_reactivate_craft(benchmark, tools, bench_device, shape_id, impl):
    device = bench_device
    tools.require(device, "reactivate_", impl)
    w0, used0 = _planted(SHAPES[shape_id], device)
    w, used = w0.clone(), used0.clone()

    def restore() -> None:
        w.copy_(w0)
        used.copy_(used0)
        tools.synchronize(device)

    def naive() -> None:
        naive_craft_(w, used)
        tools.synchronize(device)

    def run() -> None:
        craft_ext.reactivate_(w, used=used, threshold=THRESHOLD, backend=impl)
        tools.synchronize(device)

    fn = naive if impl == "naive" else run
    rounds = 5 if device == "cpu" else 50
    naive_s = tools.naive_seconds(
        ("reactivate_", device, shape_id),
        lambda: tools.median_seconds(naive, device, setup=restore, rounds=rounds),
    )
    benchmark.pedantic(fn, setup=restore, rounds=rounds, warmup_rounds=1)
    n_inactive = int(w0.shape[0] * INACTIVE_FRACTION)
    row_bytes = w0[0].numel() * w0.element_size()
    tools.record(
        benchmark,
        device=device,
        impl=impl,
        naive_s=naive_s,
        own_s=lambda: tools.median_seconds(fn, device, setup=restore, rounds=rounds),
        bytes_moved=w0.numel() * w0.element_size() + 2 * n_inactive * row_bytes,
    )


def _channel(n: int, device: str) -> tuple[torch.nn.BatchNorm2d, torch.nn.PReLU]:
    """The BatchNorm and PReLU after the weight, with the planted filters' channels dead only
    through BN (gamma 1e-4): the folded criterion finds them, as the weight criterion finds the
    planted filters."""
    g = torch.Generator().manual_seed(1)
    bn, prelu = torch.nn.BatchNorm2d(n), torch.nn.PReLU(n)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(n, generator=g) + 0.1)
        bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return bn.to(device), prelu.to(device)


@pytest.mark.parametrize("impl", IMPLS[1:])
@pytest.mark.parametrize("shape_id", list(SHAPES))
def test_reactivate_craft_bn_aware(benchmark, tools, bench_device, shape_id, impl):
    """BN-aware CRAFT (folded criterion, the whole channel rewritten) on the same layer: the
    extra work is [N] vectors. ``extra_info["ratio_vs_weight_only"]``: its time over the
    weight-only op's on the same backend (same planted filters), measured in alternation."""
    device = bench_device
    tools.require(device, "reactivate_", impl)
    w0, used0 = _planted(SHAPES[shape_id], device)
    bn, prelu = _channel(w0.shape[0], device)
    saved = [t.detach().clone() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)]
    w, used = w0.clone(), used0.clone()

    def restore() -> None:
        w.copy_(w0)
        used.copy_(used0)
        with torch.no_grad():
            entries = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
            for t, s in zip(entries, saved, strict=True):
                t.copy_(s)
        tools.synchronize(device)

    def run() -> None:
        with torch.no_grad():
            craft_ext.reactivate_(
                w, used=used, bn=bn, prelu=prelu, criterion="folded", backend=impl
            )
        tools.synchronize(device)

    def weight_only() -> None:
        craft_ext.reactivate_(w, used=used, threshold=THRESHOLD, backend=impl)
        tools.synchronize(device)

    rounds = 5 if device == "cpu" else 50
    benchmark.pedantic(run, setup=restore, rounds=rounds, warmup_rounds=1)
    seconds = tools.benchmark_median(
        benchmark, lambda: tools.median_seconds(run, device, setup=restore, rounds=rounds)
    )
    base = tools.median_seconds(weight_only, device, setup=restore, rounds=rounds)
    benchmark.extra_info.update(
        {"impl": impl, "median_s": seconds, "ratio_vs_weight_only": seconds / base}
    )
