"""connection_scores (Sun, Wang and Tang, CVPR 2016, Eq. 2) against the full-unfold version.

Implementations, all float32 on the same Conv2d activations ``x [N, C, H, W]``,
``y [N, O, Ho, Wo]``:

* ``unfold``: materialises the whole im2col tensor ``[N, C*kh*kw, Ho*Wo]`` and the per-position
  cross products ``[Ho*Wo, O, C*kh*kw]`` at once (the obvious implementation);
* ``chunked``: :func:`craft_ext.sparsify.connection_scores` with ``backend="reference"`` (bands
  of output rows, bounded temporaries);
* ``triton``: the implicit-im2col kernel (CUDA only here, skipped where
  ``craft_ext.available_backends`` lacks it; the interpreter is far too slow).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the
call; on CPU the rise of the process's resident high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) during one call, measured in a fresh subprocess so that memory
freed by earlier runs cannot hide it. (``tracemalloc`` does not see PyTorch's CPU allocator.)

Run ``python -m pytest benchmarks/bench_connection_scores.py`` (pytest-benchmark; peak memory
goes to ``extra_info``) or ``python benchmarks/bench_connection_scores.py`` for a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from craft_ext import sparsify as sp

CUDA = torch.cuda.is_available()

#: name -> (device, N, C, O, H=W, kernel, stride, padding)
CASES: dict[str, tuple[str, int, int, int, int, int, int, int]] = {
    "cpu-n32-c16-o32-28px-k3": ("cpu", 32, 16, 32, 28, 3, 1, 1),
    "cpu-n64-c32-o32-14px-k3s2": ("cpu", 64, 32, 32, 14, 3, 2, 1),
    "cuda-n128-c64-o64-56px-k3": ("cuda", 128, 64, 64, 56, 3, 1, 1),
    "cuda-n256-c128-o128-28px-k3": ("cuda", 256, 128, 128, 28, 3, 1, 1),
}


def unfold_scores(module: nn.Conv2d, x: Tensor, y: Tensor) -> Tensor:
    """Eq. 2 through the full im2col tensor (baseline): r[i, k] = sum_m |corr_n(a, b)|."""
    n = x.shape[0]
    b = F.unfold(x.float(), module.kernel_size, module.dilation, module.padding, module.stride)
    b = b.permute(2, 0, 1).contiguous()  # [M, N, K]: every position's patches at once
    a = y.float().reshape(n, y.shape[1], -1).permute(2, 0, 1).contiguous()  # [M, N, O]
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    cross = torch.bmm(a.transpose(1, 2), b)  # [M, O, K]
    denom = torch.sqrt((a * a).sum(1).unsqueeze(2) * (b * b).sum(1).unsqueeze(1))
    r = torch.where(denom > 0, cross / denom.clamp_min(1e-30), 0.0)
    return r.abs().sum(0).reshape(module.weight.shape)


IMPLS: dict[str, Callable[[nn.Conv2d, Tensor, Tensor], Tensor]] = {
    "unfold": unfold_scores,
    "chunked": lambda m, x, y: sp.connection_scores(m, x, y, backend="reference"),
    "triton": lambda m, x, y: sp.connection_scores(m, x, y, backend="triton"),
}


def make_case(name: str) -> tuple[nn.Conv2d, Tensor, Tensor]:
    device, n, c, o, hw, k, stride, pad = CASES[name]
    torch.manual_seed(0)
    module = nn.Conv2d(c, o, k, stride=stride, padding=pad).to(device)
    x = torch.randn(n, c, hw, hw, device=device)
    with torch.no_grad():
        y = module(x)
    return module, x, y


#: impl -> what ``tools.require`` checks: ``naive`` always runs, else the craft_ext backend
BACKEND = {"unfold": "naive", "chunked": "reference", "triton": "triton"}
OP = "connection_scores"


def needs_gpu(case: str) -> str | None:
    """Why ``case`` cannot run here for lack of a GPU (None when it can)."""
    return "needs a CUDA GPU" if CASES[case][0] == "cuda" and not CUDA else None


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak_here(case: str, impl: str) -> int:
    """Peak extra bytes of one call, in this process (CUDA allocator or CPU resident set)."""
    module, x, y = make_case(case)
    fn = IMPLS[impl]
    if CASES[case][0] == "cuda":
        fn(module, x, y)  # warm-up: kernel compilation, cuBLAS workspaces
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(module, x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    torch.set_num_threads(1)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current resident set
    before = _rss_kib("VmRSS")
    fn(module, x, y)
    return (_rss_kib("VmHWM") - before) * 1024


def measure_peak(case: str, impl: str) -> int | None:
    """Peak extra bytes of one call; CPU cases in a fresh subprocess (None if that fails)."""
    if CASES[case][0] == "cuda":
        return measure_peak_here(case, impl)
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, __file__, "--peak-only", case, impl],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    try:
        return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])
    except (ValueError, IndexError, KeyError):
        return None


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", list(CASES))
def test_connection_scores_speed(benchmark, tools, case: str, impl: str) -> None:
    why = needs_gpu(case)
    if why:
        pytest.skip(why)
    device = CASES[case][0]
    tools.require(device, OP, BACKEND[impl])  # Triton: CUDA only, and only where available
    module, x, y = make_case(case)
    fn = IMPLS[impl]
    reference = unfold_scores(module, x, y)
    torch.testing.assert_close(fn(module, x, y).float(), reference, rtol=1e-3, atol=1e-3)
    benchmark.extra_info["peak_bytes"] = measure_peak(case, impl)

    def call() -> None:
        fn(module, x, y)
        tools.synchronize(device)

    benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)


def main(argv: list[str] | None = None) -> None:
    """Print time (median of ``--repeat`` calls) and peak memory of every runnable pair."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--peak-only", nargs=2, metavar=("CASE", "IMPL"))
    args = parser.parse_args(argv)
    if args.peak_only:
        print(json.dumps({"peak_bytes": measure_peak_here(*args.peak_only)}))
        return
    from conftest import BenchTools  # benchmarks/ is sys.path[0] when run as a script

    tools = BenchTools()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cuda={CUDA}")
    print(f"{'case':32s} {'impl':8s} {'median ms':>10s} {'peak MiB':>10s}")
    for case in CASES:
        device = CASES[case][0]
        for impl in IMPLS:
            backend = BACKEND[impl]
            usable = backend == "naive" or backend in tools.backends(device, OP)
            if needs_gpu(case) or not usable:
                continue
            module, x, y = make_case(case)
            call = functools.partial(IMPLS[impl], module, x, y)
            seconds = tools.median_seconds(call, device, rounds=args.repeat)
            peak = measure_peak(case, impl)
            peak_s = "n/a" if peak is None else f"{peak / 2**20:.1f}"
            print(f"{case:32s} {impl:8s} {1e3 * seconds:10.1f} {peak_s:>10s}")


if __name__ == "__main__":
    main()
