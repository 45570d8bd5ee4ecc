"""Tests of craft_ext.heads: NormalizedFC and PartialFC (single process and 2-rank gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from craft_ext.heads import NormalizedFC, PartialFC, shard_range
from craft_ext.losses import CombinedMarginLoss

ROOT = Path(__file__).resolve().parents[1]
D, C, N = 16, 41, 8


def _arcface() -> CombinedMarginLoss:
    return CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)


def test_shard_range() -> None:
    assert [shard_range(11, 2, r) for r in range(2)] == [(0, 6), (6, 11)]
    assert [shard_range(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert shard_range(7, 1, 0) == (0, 7)


def test_normalized_fc() -> None:
    torch.manual_seed(0)
    fc = NormalizedFC(D, 5)
    assert fc.weight.shape == (5, D)
    x = torch.randn(3, D) * 7
    cos = fc(x)
    expected = F.normalize(x, dim=1) @ F.normalize(fc.weight, dim=1).T
    torch.testing.assert_close(cos, expected)
    assert cos.abs().max() <= 1.0
    # scale invariance in both arguments
    torch.testing.assert_close(fc(x * 0.01), cos, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fc(x).dtype == torch.float32


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g) * 0.01
    x = torch.randn(N, D, generator=g)
    y = torch.tensor([0, 40, 5, 21, -1, 20, 33, 5])
    return w, x, y


def test_partial_fc_full_rate_equals_full_softmax() -> None:
    w, x, y = _data()
    loss_fn = _arcface()
    head = PartialFC(D, C, 1.0, loss_fn)
    head.load_full_state_dict({"weight": w})
    fc = NormalizedFC(D, C)
    fc.load_state_dict({"weight": w})
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    loss = head(x1, y)
    ref = loss_fn(fc(x2), y)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, fc.weight.grad, rtol=1e-4, atol=1e-4)
    assert head.num_local == C and head.world_size == 1
    assert head.last_index is None


def test_partial_fc_default_margin_is_cosface() -> None:
    head = PartialFC(D, C)
    m = head.margin_loss
    assert isinstance(m, CombinedMarginLoss)
    assert (m.s, m.m1, m.m2, m.m3) == (64.0, 1.0, 0.0, 0.4)


def test_partial_fc_accepts_logit_callable() -> None:
    """An insightface-style margin module (called, returns logits) works too."""
    w, x, y = _data(1)
    arc = _arcface()
    head = PartialFC(D, C, 1.0, margin_loss=lambda cos, lab: arc.margin_logits(cos, lab))
    head.load_full_state_dict({"weight": w})
    ref = PartialFC(D, C, 1.0, arc)
    ref.load_full_state_dict({"weight": w})
    torch.testing.assert_close(head(x, y), ref(x, y))


def _restricted_loss(
    w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Full-softmax loss over the class columns ``cols`` only (labels remapped)."""
    remap = torch.full((C,), -1, dtype=torch.long)
    remap[cols] = torch.arange(len(cols))
    y_sub = torch.where(y >= 0, remap[y.clamp_min(0)], y)
    assert torch.all(y_sub[y >= 0] >= 0)
    cos = F.normalize(x, dim=1) @ F.normalize(w[cols], dim=1).T
    return _arcface()(cos, y_sub)


def test_partial_fc_sampling_keeps_positives() -> None:
    torch.manual_seed(0)
    w, x, y = _data(2)
    head = PartialFC(D, C, 0.3, _arcface())
    head.load_full_state_dict({"weight": w})
    k = max(int(0.3 * C), N)
    for _ in range(5):
        loss = head(x, y)
        idx = head.last_index
        assert idx is not None and idx.shape == (k,)
        assert torch.all(idx[1:] > idx[:-1])  # sorted, unique
        assert set(y[y >= 0].tolist()) <= set(idx.tolist())
        torch.testing.assert_close(loss, _restricted_loss(w, x, y, idx))
    loss.backward()
    unused = torch.ones(C, dtype=torch.bool)
    unused[idx] = False
    assert torch.all(head.weight.grad[unused] == 0)
    # eval mode: no sampling, full softmax
    head.eval()
    torch.testing.assert_close(head(x, y), _restricted_loss(w, x, y, torch.arange(C)))


def test_partial_fc_sample_count_covers_batch() -> None:
    """With many positives the sample grows to the batch size so no positive is dropped."""
    torch.manual_seed(1)
    head = PartialFC(D, 100, 0.05)
    y = torch.randperm(100)[:20]
    head(torch.randn(20, D), y)
    assert head.last_index.shape == (20,)
    assert set(y.tolist()) == set(head.last_index.tolist())


def test_partial_fc_compute_dtype() -> None:
    w, x, y = _data(3)
    ref = PartialFC(D, C, 1.0, _arcface())
    ref.load_full_state_dict({"weight": w})
    half = PartialFC(D, C, 1.0, _arcface(), compute_dtype=torch.bfloat16)
    half.load_full_state_dict({"weight": w})
    out = half(x, y)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert abs(out.item() - ref(x, y).item()) < 0.05 * ref(x, y).item()


def test_partial_fc_state_dict_checks() -> None:
    head = PartialFC(D, C)
    with pytest.raises(ValueError):
        head.load_full_state_dict({"weight": torch.zeros(C + 1, D)})
    with pytest.raises(ValueError):
        PartialFC(D, C, sample_rate=0.0)
    full = head.full_state_dict()["weight"]
    assert torch.equal(full, head.weight.detach()) and full is not head.weight


_WORKER = textwrap.dedent(
    """
    import gc
    import sys

    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from craft_ext.heads import PartialFC
    from craft_ext.losses import CombinedMarginLoss


    def worker(rank, world, init_file, data_file, out_dir):
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method="file://" + init_file, rank=rank, world_size=world
        )
        data = torch.load(data_file)
        w, x, y = data["W"], data["X"], data["Y"]
        d, c, n = w.shape[1], w.shape[0], x.shape[0] // world
        margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
        out = {}

        # 1) full-rate loss through a DDP-wrapped backbone
        head = PartialFC(d, c, 1.0, margin)
        out["range"] = (head.class_start, head.class_end)
        head.load_full_state_dict({"weight": w})
        backbone = nn.Linear(d, d)
        backbone.load_state_dict(data["backbone"])
        model = DDP(backbone)
        xs, ys = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
        emb = model(xs)
        emb.retain_grad()
        loss = head(emb, ys)
        loss.backward()
        out["loss"] = loss.detach()
        out["emb_grad"] = emb.grad
        out["weight_grad"] = head.weight.grad
        out["backbone_grad"] = backbone.weight.grad
        out["full_after_load"] = head.full_state_dict()["weight"]

        # 2) sampled loss (sample_rate < 1)
        torch.manual_seed(100 + rank)
        sampled = PartialFC(d, c, 0.5, margin)
        sampled.load_full_state_dict({"weight": w})
        out["sampled_loss"] = sampled(emb.detach(), ys).detach()
        out["sampled_index"] = sampled.last_index + sampled.class_start

        # 3) a randomly initialised shard per rank, gathered for a world-size-1 resume
        torch.manual_seed(7 + rank)
        fresh = PartialFC(d, c, 1.0, margin)
        out["fresh_shard"] = fresh.weight.detach().clone()
        out["fresh_full"] = fresh.full_state_dict()["weight"]

        torch.save(out, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
        del model  # free DDP's Reducer before the group (see craft_ext Trainer.close)
        gc.collect()
        dist.destroy_process_group()


    if __name__ == "__main__":
        init_file, data_file, out_dir = sys.argv[1:4]
        mp.spawn(worker, args=(2, init_file, data_file, out_dir), nprocs=2, join=True)
    """
)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("pfc_dist")
    w, x, y = _data(4)
    backbone = torch.nn.Linear(D, D)
    torch.save({"W": w, "X": x, "Y": y, "backbone": backbone.state_dict()}, tmp / "data.pt")
    script = tmp / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp / "init"), str(tmp / "data.pt"), str(tmp)],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp / f"rank{r}.pt") for r in range(2)]
    return {"w": w, "x": x, "y": y, "backbone": backbone, "ranks": ranks}


def test_two_ranks_match_world_size_one(two_rank_run: dict) -> None:
    w, x, y, backbone = (two_rank_run[k] for k in ("w", "x", "y", "backbone"))
    r0, r1 = two_rank_run["ranks"]
    assert r0["range"] == (0, 21) and r1["range"] == (21, 41)

    head = PartialFC(D, C, 1.0, _arcface())
    head.load_full_state_dict({"weight": w})
    emb = backbone(x)
    emb.retain_grad()
    loss = head(emb, y)
    loss.backward()

    for r in (r0, r1):
        torch.testing.assert_close(r["loss"], loss.detach())
    torch.testing.assert_close(torch.cat([r0["emb_grad"], r1["emb_grad"]]), emb.grad)
    torch.testing.assert_close(
        torch.cat([r0["weight_grad"], r1["weight_grad"]]), head.weight.grad, rtol=1e-4, atol=1e-5
    )
    # DDP averages the per-rank backbone gradients: world_size * averaged == single process
    torch.testing.assert_close(2 * r0["backbone_grad"], backbone.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r0["backbone_grad"], r1["backbone_grad"])


def test_two_ranks_sampled_loss(two_rank_run: dict) -> None:
    w, x, y, backbone = (two_rank_run[k] for k in ("w", "x", "y", "backbone"))
    r0, r1 = two_rank_run["ranks"]
    torch.testing.assert_close(r0["sampled_loss"], r1["sampled_loss"])
    cols = torch.cat([r0["sampled_index"], r1["sampled_index"]])
    assert len(cols) == 2 * 10  # int(0.5 * 21) and int(0.5 * 20), both >= global batch 8
    assert set(y[y >= 0].tolist()) <= set(cols.tolist())
    with torch.no_grad():
        ref = _restricted_loss(w, backbone(x), y, cols)
    torch.testing.assert_close(r0["sampled_loss"], ref)


def test_full_state_dict_across_world_sizes(two_rank_run: dict) -> None:
    w = two_rank_run["w"]
    r0, r1 = two_rank_run["ranks"]
    # world size 1 -> 2 -> gathered: unchanged
    torch.testing.assert_close(r0["full_after_load"], w, rtol=0, atol=0)
    torch.testing.assert_close(r1["full_after_load"], w, rtol=0, atol=0)
    # world size 2 -> 1: the gathered matrix is the two shards in rank order
    full = r0["fresh_full"]
    assert full.shape == (C, D)
    torch.testing.assert_close(full, torch.cat([r0["fresh_shard"], r1["fresh_shard"]]))
    torch.testing.assert_close(r1["fresh_full"], full)
    single = PartialFC(D, C)
    single.load_full_state_dict({"weight": full})
    torch.testing.assert_close(single.full_state_dict()["weight"], full)
