"""reactivate_and_reset_: one Reactivator step per weight vs the composition a user would write.

Run explicitly (pytest does not collect ``benchmarks/`` with the tests)::

    python -m pytest benchmarks/bench_reactivate_and_reset.py --benchmark-only

What :class:`craft_ext.Reactivator` runs per watched weight after an optimizer step (CRAFT,
Bhatta et al., arXiv 2312.00072): reactivate the inactive filters, zero their rows in the
optimizer state (an SGD momentum buffer here) and count them. ``naive`` is that written with
the public API: ``craft_ext.reactivate_`` (the fastest backend) followed by
``momentum.masked_fill_(reactivated[:, None, None, None], 0)`` and ``total += count``; ``cpp``
is the fused CPU operator ``craft_ext::reactivate_and_reset_`` (one call, same random draws and
results); ``cpp-record`` is ``craft_ext::reactivate_and_reset_.record``, the same call writing its
event into a log row instead of returning tensors (what the Reactivator's step hook runs);
``reference`` is ``craft_ext.reference.reactivate_and_reset_``. Two states: ``steady``
(no filter inactive: what a step with ``interval=1`` almost always sees) and ``planted`` (a
quarter of the filters inactive, restored untimed before every call). There is no CUDA
kernel of this operator (on CUDA the Reactivator runs the composition), so CUDA cases skip.
"""

from __future__ import annotations

import pytest
import torch

import craft_ext
from craft_ext import reference

SHAPES = {"iresnet-conv1-64x3x3x3": (64, 3, 3, 3), "r50-conv-512x512x3x3": (512, 512, 3, 3)}
IMPLS = ["naive", "cpp", "cpp-record", "reference"]
THRESHOLD = 1e-3


def _weight(shape: tuple[int, ...], state: str, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 0.05
    if state == "planted":
        rows = torch.randperm(shape[0], generator=g)[: shape[0] // 4]
        w[rows] = (torch.rand((len(rows), *shape[1:]), generator=g) - 0.5) * 2e-4
    return w.to(device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("state", ["steady", "planted"])
@pytest.mark.parametrize("shape_id", list(SHAPES))
def test_reactivate_and_reset(benchmark, tools, bench_device, shape_id, state, impl):
    device = bench_device
    tools.require(device, "reactivate_and_reset_", impl.removesuffix("-record"))
    fused = getattr(torch.ops.craft_ext, "reactivate_and_reset_", None)
    if impl == "cpp-record" and "record" not in fused.overloads():
        pytest.skip("the compiled extension predates reactivate_and_reset_.record (rebuild it)")
    w0 = _weight(SHAPES[shape_id], state, device)
    n = w0.shape[0]
    w, momentum = w0.clone(), torch.randn_like(w0)
    used = torch.zeros(n, dtype=torch.bool, device=device)
    total = torch.zeros((), dtype=torch.int64, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    logs = (
        torch.zeros(256, n, dtype=torch.bool, device=device),
        torch.full((256, n), -1, dtype=torch.int64, device=device),
    )

    def restore() -> None:
        w.copy_(w0)
        used.zero_()
        tools.synchronize(device)

    def naive() -> None:
        res = craft_ext.reactivate_(w, used=used, threshold=THRESHOLD, generator=gen)
        momentum.masked_fill_(res.reactivated.view(n, 1, 1, 1), 0)
        total.add_(res.count)
        tools.synchronize(device)

    def run() -> None:
        with torch.no_grad():
            if impl == "cpp":
                fused.default(w, used, total, [momentum], gen, THRESHOLD, "craft")
            elif impl == "cpp-record":
                fused.record(w, used, total, [momentum], *logs, 0, gen, THRESHOLD, "craft")
            else:
                reference.reactivate_and_reset_(w, used, total, [momentum], gen, THRESHOLD, "craft")
        tools.synchronize(device)

    fn = naive if impl == "naive" else run
    rounds = 200 if w0.numel() < 10_000 else 5
    naive_s = tools.naive_seconds(
        ("reactivate_and_reset_", device, shape_id, state),
        lambda: tools.median_seconds(naive, device, setup=restore, rounds=rounds),
    )
    benchmark.pedantic(fn, setup=restore, rounds=rounds, warmup_rounds=1)
    n_inactive = n // 4 if state == "planted" else 0
    row_bytes = w0[0].numel() * w0.element_size()
    tools.record(
        benchmark,
        device=device,
        impl=impl,
        naive_s=naive_s,
        own_s=lambda: tools.median_seconds(fn, device, setup=restore, rounds=rounds),
        # steady: one element per filter is enough to see it is active; planted: the weight
        # read once plus the reactivated filters, their donors and momentum rows written
        bytes_moved=(n * w0.element_size() if state == "steady" else w0.numel() * 4)
        + 3 * n_inactive * row_bytes,
    )
    benchmark.extra_info["state"] = state
