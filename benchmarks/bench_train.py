"""Training throughput with and without CRAFT reactivation (pytest-benchmark).

GPU: r50 at 112x112, bf16, batch 128, reactivation of conv1 at every step (the most
expensive schedule; the paper reactivates once per epoch) vs none: the overhead target is
under 0.5%. CPU: a small r18 configuration. ``extra_info`` carries images/s; compare the
``craft`` and ``none`` rows of a run for the overhead.
"""

from __future__ import annotations

import pytest
import torch

from craft_ext.train import TrainConfig, Trainer

CUDA = torch.cuda.is_available()

CASES = [
    pytest.param(
        "cpu",
        dict(network="r18", width=0.25, image_size=64, batch_size=32, embedding_size=128),
        id="cpu-r18w0.25-64px-b32",
    ),
    pytest.param(
        "cuda",
        dict(
            network="r50", width=1.0, image_size=112, batch_size=128, amp="bf16", channels_last=True
        ),
        id="cuda-r50-112px-b128-bf16",
        marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"),
    ),
]


@pytest.mark.parametrize("device,options", CASES)
@pytest.mark.parametrize("reactivation", ["none", "craft"])
def test_train_step_throughput(benchmark, tmp_path, device, options, reactivation):
    cfg = TrainConfig(
        data="toy:64:8",
        val=[],
        workers=0,
        progress=False,
        output=str(tmp_path),
        device=device,
        reactivation=reactivation,
        reactivate_every=1 if reactivation == "craft" else None,
        **options,
    )
    trainer = Trainer(cfg)
    n = cfg.batch_size
    images = torch.randint(0, 256, (n, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    labels = torch.randint(0, trainer.num_classes, (n,))

    def step():
        trainer.train_step(images, labels)
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up (allocator, cuDNN autotuning)
        step()
    benchmark.pedantic(step, rounds=10 if device == "cuda" else 3, iterations=1)
    benchmark.extra_info["images_per_s"] = n / benchmark.stats.stats.mean
    benchmark.extra_info["reactivation"] = reactivation
    if device == "cuda":
        benchmark.extra_info["device"] = torch.cuda.get_device_name()
