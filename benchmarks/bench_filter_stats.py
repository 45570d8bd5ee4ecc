"""filter_stats: every craft_ext backend on this machine vs naive PyTorch (pytest-benchmark).

Run explicitly (pytest does not collect ``benchmarks/`` with the tests)::

    python -m pytest benchmarks/bench_filter_stats.py --benchmark-only

Per-filter max |w|, L1 norm, mean and std (correction 0) of a weight [N, ...] (the statistics
CRAFT, Bhatta et al., arXiv 2312.00072, uses to find inactive filters and rank donors), on an
iresnet first conv [64, 3, 3, 3], an r50 conv [512, 512, 3, 3] and a linear [512, 25088], in
float32. ``naive`` is what a user would write: four separate reductions, each a pass over the
weight. ``extra_info`` holds ``speedup_vs_naive`` and the achieved ``GB/s`` (weight read once,
four float32 [N] written), and on CUDA ``fraction_of_peak`` of the GPU's HBM bandwidth.
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


def naive_filter_stats(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """max |w|, sum |w|, mean and std per filter, as four separate reductions over dims 1.."""
    dims = tuple(range(1, w.dim()))
    return (
        w.abs().amax(dim=dims),
        w.abs().sum(dim=dims),
        w.mean(dim=dims),
        w.std(dim=dims, correction=0),
    )


def _weight(shape: tuple[int, ...], device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=g) * 0.05).to(device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape_id", list(SHAPES))
def test_filter_stats(benchmark, tools, bench_device, shape_id, impl):
    device = bench_device
    tools.require(device, "filter_stats", impl)
    w = _weight(SHAPES[shape_id], device)

    def naive() -> None:
        naive_filter_stats(w)
        tools.synchronize(device)

    def run() -> None:
        craft_ext.filter_stats(w, backend=impl)
        tools.synchronize(device)

    fn = naive if impl == "naive" else run
    rounds = 5 if device == "cpu" else 50
    naive_s = tools.naive_seconds(
        ("filter_stats", device, shape_id),
        lambda: tools.median_seconds(naive, device, rounds=rounds),
    )
    benchmark(fn)
    tools.record(
        benchmark,
        device=device,
        impl=impl,
        naive_s=naive_s,
        own_s=lambda: tools.median_seconds(fn, device, rounds=rounds),
        bytes_moved=w.numel() * w.element_size() + 4 * 4 * w.shape[0],
    )


def naive_folded_filter_stats(
    w: torch.Tensor, bn: torch.nn.BatchNorm2d
) -> tuple[torch.Tensor, ...]:
    """What a user writes for the BN-folded filters: fold (a full copy), then four reductions."""
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return naive_filter_stats(w * s.view(-1, *[1] * (w.dim() - 1)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape_id", list(SHAPES))
def test_filter_stats_folded(benchmark, tools, bench_device, shape_id, impl):
    """Folded statistics (``bn=``): must cost about what the weight-only op costs (the fold is
    a per-filter product in the epilogue). ``extra_info["ratio_vs_weight_only"]``: folded over
    weight-only time of the same backend, measured in alternation."""
    device = bench_device
    tools.require(device, "filter_stats", impl)
    w = _weight(SHAPES[shape_id], device)
    bn = torch.nn.BatchNorm2d(w.shape[0]).to(device).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)

    def naive() -> None:
        with torch.no_grad():
            naive_folded_filter_stats(w, bn)
        tools.synchronize(device)

    def run() -> None:
        craft_ext.filter_stats(w, bn=bn, backend=impl)
        tools.synchronize(device)

    def weight_only() -> None:
        craft_ext.filter_stats(w, backend=impl)
        tools.synchronize(device)

    fn = naive if impl == "naive" else run
    rounds = 5 if device == "cpu" else 50
    naive_s = tools.naive_seconds(
        ("filter_stats_folded", device, shape_id),
        lambda: tools.median_seconds(naive, device, rounds=rounds),
    )
    benchmark(fn)
    tools.record(
        benchmark,
        device=device,
        impl=impl,
        naive_s=naive_s,
        own_s=lambda: tools.median_seconds(fn, device, rounds=rounds),
        bytes_moved=w.numel() * w.element_size() + 4 * 4 * w.shape[0] + 2 * 4 * w.shape[0],
    )
    if impl != "naive":
        reps = 200 if w.numel() < 1e5 else 5
        ratio, _, _ = tools.interleaved(weight_only, run, device, rounds=7, reps=reps)
        benchmark.extra_info["ratio_vs_weight_only"] = ratio


@pytest.mark.parametrize("impl", ["cpp", "cuda", "triton"])
def test_filter_stats_r100_every_conv(benchmark, tools, bench_device, impl):
    """``filter_stats`` over every conv weight of an iresnet r100 (the CRAFT statistics of a
    whole backbone, ~65 M weights in 104 convs), one call per conv. ``GB/s`` counts each
    weight read once; on CUDA the issue's target is >= 80% of the HBM peak."""
    device = bench_device
    tools.require(device, "filter_stats", impl)
    from craft_ext.models import get_model

    convs = [
        m.weight.detach()
        for m in get_model("r100").to(device).modules()
        if isinstance(m, torch.nn.Conv2d)
    ]

    def run() -> None:
        for w in convs:
            craft_ext.filter_stats(w, backend=impl)
        tools.synchronize(device)

    def naive() -> None:
        for w in convs:
            naive_filter_stats(w)
        tools.synchronize(device)

    rounds = 3 if device == "cpu" else 20
    naive_s = tools.naive_seconds(
        ("filter_stats_r100", device), lambda: tools.median_seconds(naive, device, rounds=rounds)
    )
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
    tools.record(
        benchmark,
        device=device,
        impl=impl,
        naive_s=naive_s,
        own_s=lambda: tools.median_seconds(run, device, rounds=rounds),
        bytes_moved=sum(w.numel() * w.element_size() + 16 * w.shape[0] for w in convs),
    )
    benchmark.extra_info["convs"] = len(convs)
