"""Reactivator and ReactivatingSGD: SGD parity, state resets, schedule, resume, DDP, errors."""

from __future__ import annotations

import importlib
import io
import os
import textwrap

import helpers  # noqa: F401  (test environment)
import pytest
import torch
from helpers import spawn
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import craft_ext
from craft_ext.reactivator import reactivate_and_reset

N_FILTERS = 16


def make_model(seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, N_FILTERS, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(N_FILTERS, 8, 3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        )


def batch(step: int) -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1000 + step))


def plant(weight: torch.Tensor, rows: list[int], scale: float = 1e-5) -> None:
    """Make ``rows`` of ``weight`` inactive (every |w| far below 1e-3)."""
    with torch.no_grad():
        weight[rows] *= scale


def train(model: nn.Module, opt: torch.optim.Optimizer, start: int, steps: int, kill=False):
    """``steps`` SGD steps from global step ``start``; ``kill`` plants dead filters as it goes."""
    for s in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        model(batch(s)).square().mean().backward()
        opt.step()
        if kill and s % 3 == 0:
            plant(model[0].weight, [(5 * s) % N_FILTERS, (5 * s + 7) % N_FILTERS], 1e-6)


def momentum(opt: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    return opt.state[p]["momentum_buffer"]


class NoHostSync(TorchDispatchMode):
    """Fails on aten ops that read tensor values back to the host (CPU stand-in for
    ``torch.cuda.set_sync_debug_mode("error")``)."""

    BANNED = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::item")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        assert name not in self.BANNED, f"host sync: {name}"
        if name == "aten::index":
            idx = args[1]
            assert not any(i is not None and i.dtype == torch.bool for i in idx), "bool index"
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------
# Parity with torch.optim.SGD
# ---------------------------------------------------------------------------------------------

SGD_OPTS = [
    pytest.param(dict(foreach=False), id="for-loop"),
    pytest.param(dict(foreach=True), id="foreach"),
    pytest.param(dict(fused=True), id="fused"),
]


@pytest.mark.parametrize("impl", SGD_OPTS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_parity_with_sgd_when_nothing_is_inactive(impl, nesterov):
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=nesterov, **impl)
    ref_model, model = make_model(), make_model()
    ref = torch.optim.SGD(ref_model.parameters(), **hyper)
    opt = craft_ext.ReactivatingSGD(
        model.parameters(), **hyper, reactivate=[model[0], model[2]], interval=1, seed=3
    )
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (ref, opt)]
    for s in range(5):
        for m, o, sch in zip((ref_model, model), (ref, opt), scheds, strict=True):
            o.zero_grad()
            m(batch(s)).square().mean().backward()
            o.step()
            sch.step()
    for p_ref, p in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p_ref, p)
        assert torch.equal(momentum(ref, p_ref), momentum(opt, p))
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    assert opt.drain_events() == [] and opt.total_reactivated == 0
    assert opt.reactivator.steps == 5 and opt.reactivator.calls == 5


def test_no_reactivate_targets_is_plain_sgd():
    model = make_model()
    opt = craft_ext.ReactivatingSGD(model.parameters(), lr=0.1, momentum=0.9)
    assert isinstance(opt, torch.optim.SGD) and opt.reactivate() == []
    train(model, opt, 0, 2)
    assert opt.events == []


# ---------------------------------------------------------------------------------------------
# Reactivation and optimizer state
# ---------------------------------------------------------------------------------------------


def test_planted_filters_reactivated_and_momentum_rows_zeroed():
    model = make_model()
    w = model[0].weight
    opt = craft_ext.ReactivatingSGD(
        model.named_parameters(), lr=0.05, momentum=0.9, reactivate=[model[0]], seed=0
    )
    train(model, opt, 0, 3)
    rows = [2, 9, 11]
    plant(w, rows)
    w_before, buf_before = w.detach().clone(), momentum(opt, w).clone()
    other_bufs = {p: momentum(opt, p).clone() for p in model.parameters() if p is not w}
    (res,) = opt.reactivate()
    dead = torch.zeros(N_FILTERS, dtype=torch.bool)
    dead[rows] = True
    assert torch.equal(res.reactivated, dead) and int(res.count) == 3
    buf = momentum(opt, w)
    assert (buf[rows] == 0).all()
    assert torch.equal(buf[~dead], buf_before[~dead])
    assert torch.equal(w[~dead], w_before[~dead])
    assert torch.equal(w[rows], -w_before[res.donor[rows]])
    assert (w[rows].flatten(1).abs().amax(1) > 1e-3).all()
    for p, b in other_bufs.items():
        assert torch.equal(momentum(opt, p), b)
    (event,) = opt.drain_events()
    assert event == craft_ext.ReactivationEvent(
        3, "0.weight", "craft", rows, res.donor[rows].tolist()
    )
    assert opt.total_reactivated == 3


def test_interval_runs_after_every_n_steps():
    model = make_model()
    w = model[0].weight
    opt = craft_ext.ReactivatingSGD(model.parameters(), lr=0.0, reactivate=w, interval=3, seed=0)
    plant(w, [4])
    seen = []
    for s in range(7):
        train(model, opt, s, 1)
        seen.append(bool(w[4].abs().amax() > 1e-3))
        if seen[-1]:
            plant(w, [4])
    assert seen == [False, False, True, False, False, True, False]
    assert [e.step for e in opt.drain_events()] == [3, 6]
    assert opt.reactivator.calls == 2


def test_adam_state_rows_reset_through_attach():
    model = make_model()
    w = model[0].weight
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    reactivator = craft_ext.Reactivator({"conv1": model[0]}, seed=1).attach(opt)
    train(model, opt, 0, 3)
    rows = [0, 15]
    plant(w, rows)
    before = {k: v.clone() for k, v in opt.state[w].items()}
    (res,) = reactivator.reactivate()
    assert int(res.count) == 2
    keep = torch.ones(N_FILTERS, dtype=torch.bool)
    keep[rows] = False
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert (opt.state[w][key][rows] == 0).all(), key
        assert torch.equal(opt.state[w][key][keep], before[key][keep]), key
    assert torch.equal(opt.state[w]["step"], before["step"])  # scalar state left as is
    train(model, opt, 3, 1)  # Adam keeps working on the reset rows
    assert torch.isfinite(w).all()
    assert [e.name for e in reactivator.events] == ["conv1"]


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["craft", "scaled_gaussian", "random"])
def test_events_content(method):
    w = nn.Parameter(torch.randn(N_FILTERS, 5, generator=torch.Generator().manual_seed(0)))
    r = craft_ext.Reactivator(w, method=method, seed=4)
    assert r.names == ["target0"] and [g.device.type for g in r.generators] == ["cpu"]
    r.reactivate()  # nothing inactive: no event listed
    plant(w, [3, 7])
    (res,) = r.reactivate()
    assert r.calls == 2 and r.total_reactivated == 2
    events = r.events
    assert events == r.events  # reading does not clear
    (event,) = events
    assert (event.step, event.name, event.method, event.filters) == (0, "target0", method, [3, 7])
    assert event.donors == res.donor[[3, 7]].tolist()
    if method == "random":
        assert event.donors == [-1, -1]
    else:
        assert all(d not in (3, 7) and d >= 0 for d in event.donors)
    assert r.drain_events() == events and r.events == [] and r.drain_events() == []


def test_full_event_logs_keep_events_unchanged(monkeypatch):
    def run() -> list[craft_ext.ReactivationEvent]:
        model = make_model()
        opt = craft_ext.ReactivatingSGD(
            model.parameters(), lr=0.01, reactivate=[model[0], model[2]], interval=1, seed=2
        )
        train(model, opt, 0, 9, kill=True)
        return opt.drain_events()

    plain = run()
    monkeypatch.setattr(craft_ext._events, "_LOG_ROWS", 2)
    assert run() == plain and len(plain) >= 3


def test_unread_records_are_bounded(monkeypatch):
    """A loop that never reads events keeps at most _MAX_PENDING_BYTES of records: the oldest
    are dropped with a warning and counted; the newest stay readable; counts stay exact."""
    monkeypatch.setattr(craft_ext._events, "_LOG_ROWS", 2)
    record = N_FILTERS * (1 + 8)  # bytes of one record: bool mask + int64 donors
    monkeypatch.setattr(craft_ext._events, "_MAX_PENDING_BYTES", 4 * record)
    model = make_model()
    opt = craft_ext.ReactivatingSGD(model.parameters(), lr=0.01, reactivate=model[0], interval=1)
    with pytest.warns(UserWarning, match="dropped unread"):
        train(model, opt, 0, 12, kill=True)
    r = opt.reactivator
    kept = sum(len(p.seq) for p in r._events.all_pending())
    assert r.dropped_records > 0 and r.dropped_records + kept == 12
    assert kept <= 4 + 2 + 1  # the bound, plus one stacked chunk and the unstacked records
    events = opt.drain_events()
    assert events and min(e.step for e in events) > r.dropped_records - 1
    assert opt.total_reactivated >= sum(len(e.filters) for e in events)
    assert opt.state_dict()["craft_reactivator"]["dropped_records"] == r.dropped_records


@pytest.mark.parametrize("log_rows", [256, 2])
def test_events_read_every_step_equal_events_read_at_the_end(log_rows, monkeypatch):
    """Reading empties the open logs, whose rows are then written again: what is read along
    the way is what a single read at the end returns."""
    monkeypatch.setattr(craft_ext._events, "_LOG_ROWS", log_rows)
    runs = []
    for read_every_step in (False, True):
        model = make_model()
        opt = craft_ext.ReactivatingSGD(
            model.parameters(), lr=0.01, reactivate=[model[0], model[2]], interval=1, seed=4
        )
        events = []
        for s in range(9):
            train(model, opt, s, 1, kill=True)
            if read_every_step:
                events += opt.drain_events()
        runs.append(events + opt.drain_events())
    assert runs[0] == runs[1] and len(runs[0]) >= 3


def test_saved_pending_events_do_not_change_with_later_steps():
    model = make_model()
    opt = craft_ext.ReactivatingSGD(model.parameters(), lr=0.01, reactivate=model[0], interval=1)
    train(model, opt, 0, 4, kill=True)
    saved = opt.state_dict()["craft_reactivator"]["pending"]
    frozen = [(m.clone(), d.clone()) for *_, m, d in saved]
    opt.drain_events()
    train(model, opt, 4, 6, kill=True)  # writes the same log rows again
    assert frozen and all(
        torch.equal(m, fm) and torch.equal(d, fd)
        for (*_, m, d), (fm, fd) in zip(saved, frozen, strict=True)
    )


def test_events_before_attach_keep_their_names():
    """Attaching renames watched weights after the optimizer's parameter names; events
    recorded before keep the name they had."""
    model = make_model()
    r = craft_ext.Reactivator(model[0].weight, seed=0)
    plant(model[0].weight, [2])
    r.reactivate()
    opt = torch.optim.SGD(model.named_parameters(), lr=0.01)
    r.attach(opt, interval=1)
    train(model, opt, 0, 4, kill=True)
    names = [e.name for e in r.drain_events()]
    assert names[0] == "target0" and len(names) >= 2 and set(names[1:]) == {"0.weight"}


def test_names_from_pairs_and_optimizer():
    model = make_model()
    opt = torch.optim.SGD(model.named_parameters(), lr=0.1)
    r = craft_ext.Reactivator([model[0], ("head", model[5].weight)]).attach(opt)
    assert r.names == ["0.weight", "head"]
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    assert craft_ext.Reactivator([model[2]]).attach(opt2).names == ["target0"]


# ---------------------------------------------------------------------------------------------
# Resume bit-identity through state_dict
# ---------------------------------------------------------------------------------------------


def build(method: str):
    model = make_model()
    plant(model[0].weight, [1, 6])
    opt = craft_ext.ReactivatingSGD(
        model.named_parameters(),
        lr=0.01,
        momentum=0.9,
        weight_decay=1e-4,
        reactivate=[model[0], model[2]],
        method=method,
        interval=2,
        seed=11,
    )
    return model, opt


@pytest.mark.parametrize("method,log_rows", [("craft", 256), ("random", 3)])
def test_resume_is_bit_identical(method, log_rows, monkeypatch):
    monkeypatch.setattr(craft_ext._events, "_LOG_ROWS", log_rows)
    k = 5
    model_a, opt_a = build(method)
    train(model_a, opt_a, 0, 2 * k, kill=True)

    model_b, opt_b = build(method)
    train(model_b, opt_b, 0, k, kill=True)
    assert opt_b.reactivator._events.all_pending(), "reactivations before the checkpoint"
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    del model_b, opt_b
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_c, opt_c = build(method)  # a fresh model and optimizer, as in a new process
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    train(model_c, opt_c, k, k, kill=True)

    for p_a, p_c in zip(model_a.parameters(), model_c.parameters(), strict=True):
        assert torch.equal(p_a, p_c)
        assert torch.equal(momentum(opt_a, p_a), momentum(opt_c, p_c))
    ra, rc = opt_a.reactivator, opt_c.reactivator
    for u_a, u_c in zip(ra._used, rc._used, strict=True):
        assert torch.equal(u_a, u_c)
    assert (ra.steps, ra.calls) == (rc.steps, rc.calls) == (2 * k, k)
    events = opt_a.drain_events()
    assert events == opt_c.drain_events()
    assert any(e.step > k for e in events) and any(e.step <= k for e in events)
    assert ra.total_reactivated == rc.total_reactivated > 0


def test_load_state_dict_checks_shape():
    _, opt = build("craft")
    state = opt.reactivator.state_dict()
    other = craft_ext.Reactivator([make_model()[0]])
    with pytest.raises(ValueError, match="watches 1"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="Reactivator state_dict"):
        other.load_state_dict({"used": []})
    plain = opt.state_dict()
    del plain["craft_reactivator"]
    with pytest.warns(UserWarning, match="craft_reactivator"):
        opt.load_state_dict(plain)


# ---------------------------------------------------------------------------------------------
# No host synchronisation
# ---------------------------------------------------------------------------------------------


def test_step_has_no_host_sync_ops():
    model = make_model()
    opt = craft_ext.ReactivatingSGD(
        model.parameters(), lr=0.01, momentum=0.9, reactivate=model[0], interval=1, seed=0
    )
    train(model, opt, 0, 1)
    plant(model[0].weight, [5])
    model(batch(1)).square().mean().backward()
    with NoHostSync():
        opt.step()
    assert opt.reactivator.calls == 2 and opt.total_reactivated == 1


def test_reactivation_body_compiles_fullgraph():
    w = torch.randn(N_FILTERS, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    plant(w, [2, 3])
    used = torch.zeros(N_FILTERS, dtype=torch.bool)
    total = torch.zeros((), dtype=torch.int64)
    state = [torch.ones_like(w), torch.ones(3)]

    def body(w, used, total, buf, scalar):
        res = reactivate_and_reset(
            w,
            used,
            total,
            [buf, scalar],
            method="craft",
            threshold=1e-3,
            generator=None,
            backend="auto",
        )
        return res.reactivated

    torch._dynamo.reset()
    compiled = torch.compile(body, fullgraph=True, backend="aot_eager")
    reactivated = compiled(w, used, total, *state)
    assert reactivated[[2, 3]].all() and int(reactivated.sum()) == 2 and int(total) == 2
    assert (state[0][[2, 3]] == 0).all() and (state[0][[0, 1, 4]] == 1).all()
    assert (state[1] == 1).all() and int(used.sum()) == 2


def test_recording_body_compiles_fullgraph():
    """The step hook's op (reactivate_and_reset_.record) traces without a graph break."""
    from craft_ext.ops import _reactivate_and_record_checked

    w = torch.randn(N_FILTERS, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    plant(w, [1, 4])
    used = torch.zeros(N_FILTERS, dtype=torch.bool)
    total = torch.zeros((), dtype=torch.int64)
    buf = torch.ones_like(w)
    rlog = torch.zeros(3, N_FILTERS, dtype=torch.bool)
    dlog = torch.full((3, N_FILTERS), -1, dtype=torch.int64)

    def body(w, used, total, buf, rlog, dlog):
        _reactivate_and_record_checked(
            w, used, total, [buf], rlog, dlog, 1, None, "craft", 1e-3, "auto"
        )

    torch._dynamo.reset()
    torch.compile(body, fullgraph=True, backend="aot_eager")(w, used, total, buf, rlog, dlog)
    assert rlog[1, [1, 4]].all() and int(rlog[1].sum()) == 2 and int(total) == 2
    assert not rlog[[0, 2]].any() and (dlog[1, [1, 4]] >= 0).all()
    assert (buf[[1, 4]] == 0).all() and (buf[[0, 2, 3]] == 1).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_no_sync_and_graph_capture():
    model = make_model().cuda()
    opt = craft_ext.ReactivatingSGD(
        model.parameters(), lr=0.01, momentum=0.9, reactivate=model[0], interval=1, seed=0
    )
    x = batch(0).cuda()
    for _ in range(3):  # warm up (creates the momentum buffers)
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        opt.step()
    plant(model[0].weight, [1])
    model(x).square().mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert opt.total_reactivated == 1
    graph = torch.cuda.CUDAGraph()
    opt.reactivator.register_cuda_graph(graph)
    with torch.cuda.graph(graph):  # a whole training step, reactivation included
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        opt.step()
    plant(model[0].weight, [2])
    graph.replay()
    torch.cuda.synchronize()
    assert model[0].weight[2].abs().amax() > 1e-3
    assert opt.total_reactivated == 2


# ---------------------------------------------------------------------------------------------
# Distributed: 2 gloo processes on CPU
# ---------------------------------------------------------------------------------------------

DDP_WORKER = textwrap.dedent(
    """
    import datetime
    import gc
    import os

    import torch
    import torch.distributed as dist
    from torch import nn

    import craft_ext


    def worker(rank, world, init_file, out):
        dist.init_process_group(
            "gloo",
            init_method="file://" + init_file,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=120),
        )
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 3))
        with torch.no_grad():
            model[0].weight[[1, 4, 9]] *= 1e-5
        torch.manual_seed(100 + rank)  # different default seeds: the reactivation seed is shared
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = craft_ext.ReactivatingSGD(
            model.parameters(), lr=0.01, momentum=0.9, reactivate=model[0], interval=2
        )
        for s in range(6):
            x = torch.randn(2, 3, 8, 8)  # different data per rank
            opt.zero_grad()
            ddp(x).square().mean().backward()
            opt.step()
            if s == 2:
                with torch.no_grad():
                    model[0].weight[[3, 12]] *= 1e-6
        w = model[0].weight
        state = {
            "weight": w.detach(),
            "momentum": opt.state[w]["momentum_buffer"],
            "used": opt.reactivator._used[0],
            "total": opt.total_reactivated,
            "events": [list(e) for e in opt.drain_events()],
        }
        torch.save(state, os.path.join(out, f"rank{rank}.pt"))
        del ddp  # free DDP's Reducer before the group (see craft_ext Trainer.close)
        gc.collect()
        dist.destroy_process_group()
    """
)


def test_ddp_ranks_end_identical(tmp_path, monkeypatch):
    """2 ranks (torch.multiprocessing.spawn, gloo on CPU) end with identical weights, momentum
    and donor masks; the default seed differs per rank and is broadcast from rank 0."""
    module = f"craft_ddp_worker_{os.getpid()}"
    (tmp_path / f"{module}.py").write_text(DDP_WORKER)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned children inherit sys.path
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    worker = importlib.import_module(module).worker
    spawn(worker, args=(2, str(tmp_path / "store"), str(tmp_path)))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in ("weight", "momentum", "used"):
        assert torch.equal(r0[key], r1[key]), key
    assert r0["total"] == r1["total"] >= 5
    assert r0["events"] == r1["events"]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_errors():
    model = make_model()
    stray = nn.Conv2d(3, 4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not a parameter of the optimizer"):
        craft_ext.Reactivator(stray).attach(opt)
    with pytest.raises(ValueError, match="not a parameter of the optimizer"):
        craft_ext.ReactivatingSGD(model.parameters(), lr=0.1, reactivate=stray)
    with pytest.raises(ValueError, match="duplicates"):
        craft_ext.Reactivator([model[0], model[0].weight])
    with pytest.raises(ValueError, match="used twice"):
        craft_ext.Reactivator([("a", model[0].weight), ("a", model[2].weight)])
    with pytest.raises(ValueError, match="at least 2 dims"):
        craft_ext.Reactivator(model[0].bias)
    with pytest.raises(TypeError, match="without a .weight"):
        craft_ext.Reactivator(nn.ReLU())
    with pytest.raises(TypeError, match="targets"):
        craft_ext.Reactivator(3)
    with pytest.raises(TypeError, match="targets"):
        craft_ext.Reactivator(nn.Parameter(torch.zeros(4, 4, dtype=torch.int32), False))
    for bad in (0, -2):
        with pytest.raises(ValueError, match="interval"):
            craft_ext.ReactivatingSGD(model.parameters(), reactivate=model[0], interval=bad)
    with pytest.raises(TypeError, match="interval"):
        craft_ext.Reactivator(model[0]).attach(opt, interval=1.5)
    with pytest.raises(ValueError, match="method"):
        craft_ext.ReactivatingSGD(model.parameters(), reactivate=model[0], method="magic")
    with pytest.raises(ValueError, match="threshold"):
        craft_ext.Reactivator(model[0], threshold=-1.0)
    with pytest.raises(TypeError, match="seed"):
        craft_ext.Reactivator(model[0], seed="x")
    with pytest.raises(ValueError, match="overlapping memory"):
        craft_ext.Reactivator(nn.Parameter(torch.ones(1, 3).expand(4, 3)))
    r = craft_ext.Reactivator(model[0]).attach(opt)
    with pytest.raises(RuntimeError, match="already attached"):
        r.attach(opt)
    # a watched weight replaced after construction (another filter count): a clear error from
    # the per-step path, and nothing written
    model[0].weight.data = torch.randn(N_FILTERS + 3, 3, 3, 3)
    before = model[0].weight.detach().clone()
    with pytest.raises((RuntimeError, ValueError), match="used must be a bool tensor of shape"):
        r.reactivate()
    assert torch.equal(model[0].weight, before)


@pytest.mark.parametrize("method", craft_ext.METHODS)
def test_cpu_fused_path_matches_the_reference_backend(method):
    """On CPU the Reactivator runs one C++ call per weight (reactivate_and_reset_); a run under
    use_backend("reference") (the Python composition) ends bit-identical, events included."""
    if "cpp" not in craft_ext.available_backends("cpu", "reactivate_"):
        pytest.skip("compiled extension not loaded")
    runs = []
    for backend in ("auto", "reference"):
        model = make_model()
        opt = craft_ext.ReactivatingSGD(
            model.parameters(),
            lr=0.05,
            momentum=0.9,
            reactivate=model[0],
            method=method,
            interval=1,
            seed=3,
        )
        with craft_ext.use_backend(backend):
            train(model, opt, 0, 10, kill=True)
        runs.append((model, opt))
    (m_a, o_a), (m_b, o_b) = runs
    assert o_a.events == o_b.events and len(o_a.events) >= 3
    for p_a, p_b in zip(m_a.parameters(), m_b.parameters(), strict=True):
        assert torch.equal(p_a, p_b)
        assert torch.equal(momentum(o_a, p_a), momentum(o_b, p_b))
    assert o_a.total_reactivated == o_b.total_reactivated


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_refuses_interval_above_one():
    """The interval is counted on the host: a captured step with interval > 1 would reactivate
    at every replay or at none, so capture raises; interval=1 captures."""
    conv = nn.Conv2d(3, 8, 3, bias=False).cuda()
    opt = craft_ext.ReactivatingSGD(conv.parameters(), lr=0.1, reactivate=conv, interval=2)
    conv.weight.grad = torch.zeros_like(conv.weight)
    opt.step()  # warm up outside the graph
    graph = torch.cuda.CUDAGraph()
    opt.reactivator.register_cuda_graph(graph)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with pytest.raises(RuntimeError, match="interval=2 cannot be captured"):
        with torch.cuda.stream(side), torch.cuda.graph(graph):
            opt.step()
