"""Shared pieces of the craft_ext kernel benchmarks (pytest-benchmark).

Records library versions and the device in pytest-benchmark's ``machine_info``, and provides
the timing helpers the benchmarks use to compare each backend with the naive PyTorch code a
user would write (``speedup_vs_naive`` in ``extra_info``) and, on CUDA, the achieved memory
bandwidth against the GPU's peak.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch

import craft_ext

#: Peak HBM bandwidth in GB/s by a substring of ``torch.cuda.get_device_name()``.
PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0}

#: The ``bench_device`` axis: CUDA cases are skipped without a GPU.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ),
]


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    """Add torch / Triton / CUDA versions, the GPU and the craft_ext build to machine_info."""
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    machine_info["craft_ext_extension_loaded"] = craft_ext.extension_loaded()
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    if torch.cuda.is_available():
        machine_info["cuda"] = torch.version.cuda
        machine_info["cuda_device"] = torch.cuda.get_device_name()


def pytest_generate_tests(metafunc) -> None:
    """Parametrize a ``bench_device`` argument over CPU and (when present) CUDA."""
    if "bench_device" in metafunc.fixturenames:
        metafunc.parametrize("bench_device", DEVICES)


class BenchTools:
    """Timing and reporting helpers shared by the benchmark files (the ``tools`` fixture)."""

    def __init__(self) -> None:
        #: median seconds of the naive code per case, shared by the backends' benchmarks
        self.naive_times: dict[tuple, float] = {}

    @staticmethod
    def peak_gbps(device: str) -> float | None:
        """Peak memory bandwidth of the current CUDA device in GB/s (None: unknown or CPU)."""
        if device != "cuda":
            return None
        name = torch.cuda.get_device_name()
        return next((v for key, v in PEAK_GBPS.items() if key in name), None)

    @staticmethod
    def synchronize(device: str) -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    @staticmethod
    def backends(device: str, op: str) -> list[str]:
        """craft_ext backends that run ``op`` natively on ``device`` (Triton on CUDA only)."""
        usable = craft_ext.available_backends(device, op)
        return [b for b in usable if not (b == "triton" and device != "cuda")]

    def require(self, device: str, op: str, impl: str) -> None:
        """Skip unless ``impl`` (``naive`` or a backend) can run ``op`` on ``device``."""
        if impl != "naive" and impl not in self.backends(device, op):
            pytest.skip(f"backend {impl} cannot run {op} on {device} here")

    def median_seconds(
        self,
        fn: Callable[[], object],
        device: str,
        setup: Callable[[], object] | None = None,
        rounds: int = 5,
    ) -> float:
        """Median wall time of ``fn()`` over ``rounds`` calls after one warm-up, synchronised;
        ``setup()`` runs untimed before each call."""
        times = []
        for r in range(rounds + 1):
            if setup is not None:
                setup()
            self.synchronize(device)
            start = time.perf_counter()
            fn()
            self.synchronize(device)
            if r:
                times.append(time.perf_counter() - start)
        times.sort()
        return times[len(times) // 2]

    def seconds_per_call(self, fn: Callable[[], object], device: str, reps: int) -> float:
        """Wall seconds per call over ``reps`` back-to-back calls (synchronised on CUDA).

        Wall time, not process CPU time: with 2+ intra-op threads ATen's OpenMP workers spin
        after each parallel region and that spinning is charged to whatever runs next, which
        made CPU-time ratios of two interleaved optimizers bimodal (1.1x or 3.3x)."""
        self.synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        self.synchronize(device)
        return (time.perf_counter() - start) / reps

    def interleaved(
        self,
        base: Callable[[], object],
        ours: Callable[[], object],
        device: str,
        *,
        rounds: int,
        reps: int,
        after_round: Callable[[], object] | None = None,
    ) -> tuple[float, float, float]:
        """``base`` and ``ours`` timed in alternation (cancels load drifts on a shared machine):
        medians over ``rounds`` of t(ours) / t(base), t(ours) - t(base) and t(base), seconds
        per call, each round ``reps`` calls (after one warm-up round each)."""
        for fn in (base, ours):
            self.seconds_per_call(fn, device, reps)
        ratios, extra, t_base = [], [], []
        for _ in range(rounds):
            t_base.append(self.seconds_per_call(base, device, reps))
            t_ours = self.seconds_per_call(ours, device, reps)
            ratios.append(t_ours / t_base[-1])
            extra.append(t_ours - t_base[-1])
            if after_round is not None:
                after_round()
        return statistics.median(ratios), statistics.median(extra), statistics.median(t_base)

    @staticmethod
    def benchmark_median(benchmark, fallback: Callable[[], float]) -> float:
        """pytest-benchmark's median, or ``fallback()`` when it kept no statistics
        (``--benchmark-disable``)."""
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        return stats.median if stats is not None else fallback()

    def naive_seconds(self, key: tuple, measure: Callable[[], float]) -> float:
        """The naive code's median for case ``key``, measured once per session."""
        if key not in self.naive_times:
            self.naive_times[key] = measure()
        return self.naive_times[key]

    def record(
        self,
        benchmark,
        *,
        device: str,
        impl: str,
        naive_s: float,
        own_s: Callable[[], float],
        bytes_moved: int,
    ) -> None:
        """Put speedup vs naive and bandwidth (with fraction of peak on CUDA) in extra_info.

        ``own_s`` measures the implementation's median when pytest-benchmark has no
        statistics (e.g. under ``--benchmark-disable``).
        """
        seconds = self.benchmark_median(benchmark, own_s)
        gbps = bytes_moved / seconds / 1e9
        info = {
            "impl": impl,
            "median_s": seconds,
            "naive_median_s": naive_s,
            "speedup_vs_naive": naive_s / seconds,
            "GB/s": gbps,
        }
        peak = self.peak_gbps(device)
        if peak is not None:
            info["peak_GB/s"] = peak
            info["fraction_of_peak"] = gbps / peak
        benchmark.extra_info.update(info)


@pytest.fixture(scope="session")
def tools() -> BenchTools:
    """Shared :class:`BenchTools` (one naive-time cache per session)."""
    return BenchTools()
