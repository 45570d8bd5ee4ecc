"""Optimizer step time: ``ReactivatingSGD`` (reactivation at every step) vs ``torch.optim.SGD``.

Only ``optimizer.step()`` is timed, with fixed gradients. ``ReactivatingSGD`` watches the first
conv layer with ``interval=1`` (CRAFT at every step; the paper reactivates once per epoch, so
this is the most expensive schedule). Targets (issue 3): within 10% of torch's SGD (foreach)
on a small conv stack on CPU, within 5% of ``SGD(fused=True)`` on r50-sized parameters on GPU.

``extra_info["ratio_vs_sgd"]`` is the median over interleaved rounds of
``t(ReactivatingSGD.step) / t(SGD.step)`` (interleaving cancels load drifts on a shared
machine; t is wall time, see ``BenchTools.seconds_per_call``). The GPU case also checks that a step
never synchronises with the host (``torch.cuda.set_sync_debug_mode("error")``) and that a
step can be captured in a CUDA graph and replayed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import craft_ext

CUDA = torch.cuda.is_available()


def _conv_stack() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 512),
    )


def _r50() -> nn.Module:
    from craft_ext.models import get_model

    return get_model("r50")


def _setup(device: str, kind: str) -> tuple[torch.optim.Optimizer, nn.Module]:
    torch.manual_seed(0)
    model = (_r50() if device == "cuda" else _conv_stack()).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        first.weight[:4] *= 1e-5  # a few inactive filters, so reactivation has work to do
    impl = dict(fused=True) if device == "cuda" else dict(foreach=True)
    hyper = dict(lr=1e-4, momentum=0.9, weight_decay=5e-4, **impl)
    if kind == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), **hyper)
    else:
        opt = craft_ext.ReactivatingSGD(
            model.parameters(), **hyper, reactivate=first, interval=1, seed=0
        )
    return opt, first


def _ratio(tools, device: str, rounds: int, reps: int) -> tuple[float, float]:
    """Median ``t(ours) / t(sgd)`` and median ``t(ours) - t(sgd)`` (seconds) per step, timed
    in alternation on fresh optimizers."""
    ours, _ = _setup(device, "craft")
    base, _ = _setup(device, "sgd")
    ratio, extra, _ = tools.interleaved(
        base.step, ours.step, device, rounds=rounds, reps=reps, after_round=ours.drain_events
    )  # draining keeps the pending events bounded over long runs
    return ratio, extra


CASES = [
    pytest.param("cpu", id="cpu-conv-stack-foreach"),
    pytest.param(
        "cuda",
        id="cuda-r50-fused",
        marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"),
    ),
]


@pytest.mark.parametrize("device", CASES)
@pytest.mark.parametrize("kind", ["sgd", "craft"])
def test_optimizer_step(benchmark, tools, device, kind):
    opt, first = _setup(device, kind)

    def step() -> None:
        opt.step()
        tools.synchronize(device)

    for _ in range(3):
        step()
    benchmark.pedantic(step, rounds=20, iterations=5 if device == "cpu" else 10)
    benchmark.extra_info["optimizer"] = type(opt).__name__
    if kind == "craft":
        assert isinstance(opt, craft_ext.ReactivatingSGD)
        assert opt.total_reactivated >= 4
        ratio, extra = _ratio(tools, device, rounds=15, reps=10 if device == "cpu" else 20)
        benchmark.extra_info["ratio_vs_sgd"] = ratio
        benchmark.extra_info["overhead_us_per_step"] = extra * 1e6
        benchmark.extra_info["target"] = 1.05 if device == "cuda" else 1.10
        benchmark.extra_info["reactivate_backend"] = craft_ext.resolve_backend(
            first.weight.device, "reactivate_"
        )
    if device == "cuda":
        benchmark.extra_info["device"] = torch.cuda.get_device_name()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_step_no_sync_and_graph_capture():
    opt, first = _setup("cuda", "craft")
    assert isinstance(opt, craft_ext.ReactivatingSGD)
    opt.step()  # creates the momentum buffers
    torch.cuda.set_sync_debug_mode("error")  # any host sync in step() raises
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    opt.reactivator.register_cuda_graph(graph)  # the reactivation generator
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    before = opt.total_reactivated
    with torch.no_grad():
        first.weight[10:12] *= 1e-6
    graph.replay()
    torch.cuda.synchronize()
    assert opt.total_reactivated == before + 2
