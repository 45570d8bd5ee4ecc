"""craft_ext.feature_map_stats against naive PyTorch (pytest-benchmark).

Naive: per sample, min-max normalise the maps (a normalised copy, as written in Diba &
Khosravi, IASC 2023, Eqs. 5-9) and call ``torch.corrcoef``, plus the sums and the empty /
redundant flags. GPU shapes are the issue's: B=100 with C=64 at 112x112 and C=512 at 7x7;
CPU shapes are small. ``extra_info``: ``speedup`` (naive median time / craft_ext mean time),
and on GPU the achieved read bandwidth of the input (``GB_per_s``, input bytes read once /
time) against the device's peak (``peak_GB_per_s`` from the memory clock and bus width, or
``$CRAFT_PEAK_GBPS``), as ``fraction_of_peak``.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

import craft_ext

CUDA = torch.cuda.is_available()
SUM_THR, CORR_THR = 0.02, 0.95

CASES = [
    pytest.param("cpu", (8, 32, 28, 28), id="cpu-B8-C32-28x28"),
    pytest.param("cpu", (8, 128, 7, 7), id="cpu-B8-C128-7x7"),
    pytest.param(
        "cuda",
        (100, 64, 112, 112),
        id="cuda-B100-C64-112x112",
        marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"),
    ),
    pytest.param(
        "cuda",
        (100, 512, 7, 7),
        id="cuda-B100-C512-7x7",
        marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"),
    ),
]


def naive_feature_map_stats(fmap: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sums, per-sample corrcoef of min-max normalised maps, empty and redundant flags."""
    b, c = fmap.shape[:2]
    sums, corrs = [], []
    for i in range(b):
        x = fmap[i].reshape(c, -1).float()
        lo = x.amin(dim=1, keepdim=True)
        hi = x.amax(dim=1, keepdim=True)
        xn = (x - lo) / (hi - lo)
        sums.append(x.sum(dim=1))
        corrs.append(torch.nan_to_num(torch.corrcoef(xn), nan=0.0))
    total, corr = torch.stack(sums), torch.stack(corrs)
    lower = torch.ones(c, c, dtype=torch.bool, device=fmap.device).tril(-1)
    return total, corr, total.abs() <= SUM_THR, ((corr >= CORR_THR) & lower).any(dim=2)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, device: str, reps: int) -> float:
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_gbps() -> float | None:
    if "CRAFT_PEAK_GBPS" in os.environ:
        return float(os.environ["CRAFT_PEAK_GBPS"])
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


@pytest.mark.parametrize("device,shape", CASES)
@pytest.mark.parametrize("impl", ["naive", "craft_ext"])
def test_feature_map_stats(benchmark, device, shape, impl):
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(shape, generator=g).to(device)

    def run_craft():
        return craft_ext.feature_map_stats(fmap, sum_threshold=SUM_THR, corr_threshold=CORR_THR)

    def run_naive():
        return naive_feature_map_stats(fmap)

    fn = run_craft if impl == "craft_ext" else run_naive

    def step():
        fn()
        _sync(device)

    for _ in range(2):  # warm-up (Triton compilation, allocator)
        step()
    rounds = 20 if device == "cuda" else 3
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["impl"] = impl
    benchmark.extra_info["backend"] = craft_ext.resolve_backend(fmap.device, "feature_map_stats")
    if impl == "craft_ext":
        naive = _median_time(run_naive, device, reps=5 if device == "cuda" else 2)
        benchmark.extra_info["speedup"] = naive / mean
    if device == "cuda":
        gbps = fmap.numel() * fmap.element_size() / mean / 1e9
        benchmark.extra_info["GB_per_s"] = gbps
        peak = _peak_gbps()
        if peak:
            benchmark.extra_info["peak_GB_per_s"] = peak
            benchmark.extra_info["fraction_of_peak"] = gbps / peak
        benchmark.extra_info["device"] = torch.cuda.get_device_name()
