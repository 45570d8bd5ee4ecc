"""feature_map_stats: every craft_ext backend on this machine vs naive PyTorch (pytest-benchmark).

Run explicitly (pytest does not collect ``benchmarks/`` with the tests)::

    python -m pytest benchmarks/bench_feature_map_stats.py --benchmark-only

Per-sample map sums, Pearson correlations and the empty / redundant flags of a feature map
[B, C, H, W] (Diba & Khosravi, IASC 2023, Eqs. 2 and 5-10), in float32. ``naive`` is what a
user would write from the paper: per sample, a min-max normalised copy of the maps and
``torch.corrcoef``, plus the sums and flags. GPU shapes are B=100 with C=64 at 112x112 and
C=512 at 7x7; CPU shapes are small. ``extra_info`` holds ``speedup_vs_naive`` and the achieved
``GB/s`` (map read once, float32 sums and two bool flags [B, C] written), and on CUDA
``fraction_of_peak`` of the GPU's HBM bandwidth (see ``conftest.BenchTools``).
"""

from __future__ import annotations

import pytest
import torch

import craft_ext

SUM_THR, CORR_THR = 0.02, 0.95
CUDA = torch.cuda.is_available()
_NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

#: (device, [B, C, H, W]) per case id
CASES = {
    "cpu-B8-C32-28x28": ("cpu", (8, 32, 28, 28)),
    "cpu-B8-C128-7x7": ("cpu", (8, 128, 7, 7)),
    "cuda-B100-C64-112x112": ("cuda", (100, 64, 112, 112)),
    "cuda-B100-C512-7x7": ("cuda", (100, 512, 7, 7)),
}
CASE_PARAMS = [
    pytest.param(case, id=case, marks=[_NEEDS_CUDA] if device == "cuda" else [])
    for case, (device, _) in CASES.items()
]
IMPLS = ["naive", "cpp", "cuda", "triton", "reference"]


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


def _fmap(shape: tuple[int, ...], device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g).to(device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_feature_map_stats(benchmark, tools, case, impl):
    device, shape = CASES[case]
    tools.require(device, "feature_map_stats", impl)
    fmap = _fmap(shape, device)

    def naive() -> None:
        naive_feature_map_stats(fmap)
        tools.synchronize(device)

    def run() -> None:
        craft_ext.feature_map_stats(
            fmap, sum_threshold=SUM_THR, corr_threshold=CORR_THR, backend=impl
        )
        tools.synchronize(device)

    fn = naive if impl == "naive" else run
    rounds = 5 if device == "cpu" else 20
    naive_s = tools.naive_seconds(
        ("feature_map_stats", device, case),
        lambda: tools.median_seconds(naive, device, rounds=rounds),
    )
    fn()  # warm-up outside the timings (Triton compilation, allocator)
    benchmark(fn)
    b, c = shape[:2]
    tools.record(
        benchmark,
        device=device,
        impl=impl,
        naive_s=naive_s,
        own_s=lambda: tools.median_seconds(fn, device, rounds=rounds),
        bytes_moved=fmap.numel() * fmap.element_size() + b * c * (4 + 1 + 1),
    )
