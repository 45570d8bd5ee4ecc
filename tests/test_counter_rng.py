"""craft_ext.CounterGenerator: its stream, its statistics, and the Reactivator step hook it
makes traceable (rng="counter": no graph break, same results as eager, bit-identical resume)."""

from __future__ import annotations

import warnings

import pytest
import torch
from scipy import stats

import craft_ext
from craft_ext import CounterGenerator
from craft_ext.counter_rng import _hash


def test_stream_continues_across_calls_and_seeds_differ():
    g = CounterGenerator(7)
    whole = g.rand(11)
    parts = CounterGenerator(7)
    assert torch.equal(torch.cat([parts.rand(4), parts.rand(2, 3).flatten(), parts.rand(1)]), whole)
    assert g.state.tolist() == [7, 11]
    assert not torch.equal(CounterGenerator(8).rand(11), whole)
    again = CounterGenerator(0)
    again.set_state(torch.tensor([7, 4]))
    assert torch.equal(again.rand(7), whole[4:])


def test_uniform_grid_range_and_distribution():
    u = CounterGenerator(1).rand(20000)
    assert u.dtype == torch.float32 and 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert torch.equal(u * 2**24, (u * 2**24).round())  # on torch.rand's 2^-24 grid
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    # neighbouring seeds and neighbouring draws are not correlated
    v = CounterGenerator(2).rand(20000)
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 0.03
    assert abs(float(torch.corrcoef(torch.stack([u[1:], u[:-1]]))[0, 1])) < 0.03


def test_normal_distribution_and_shape():
    z = CounterGenerator(3).randn(101, 99)
    assert z.shape == (101, 99) and z.dtype == torch.float32 and bool(torch.isfinite(z).all())
    flat = z.flatten().numpy()
    assert stats.kstest(flat, "norm").pvalue > 1e-3
    assert abs(stats.kurtosis(flat)) < 0.15
    g = CounterGenerator(3)
    g.randn(5)  # an odd count consumes a whole pair
    assert g.state.tolist() == [3, 6]


def test_counter_crosses_32_bits():
    """The 64-bit counter: values past 2^32 differ from those at the same low 32 bits."""
    h = _hash(torch.tensor([5, 2**32 - 2]), 4)
    after = _hash(torch.tensor([5, 2**32]), 2)
    assert torch.equal(h[2:], after)  # the stream continues over the boundary
    assert not torch.equal(h[2:], _hash(torch.tensor([5, 0]), 2))  # 2^32 + j is not j
    assert int(h.min()) >= 0 and int(h.max()) < 2**32


def test_set_state_refuses_other_states():
    g = CounterGenerator(0)
    with pytest.raises(ValueError, match=r"int64 \[seed, offset\], got torch.uint8"):
        g.set_state(torch.Generator().get_state())
    with pytest.raises(TypeError, match="seed must be an int"):
        CounterGenerator(1.5)  # type: ignore[arg-type]


def test_draws_are_exact_under_inductor():
    g1, g2 = CounterGenerator(9), CounterGenerator(9)
    eager = g1.rand(1000)
    compiled = torch.compile(lambda: g2.rand(1000), fullgraph=True, backend="inductor")()
    assert torch.equal(eager, compiled) and torch.equal(g1.state, g2.state)


@pytest.mark.parametrize("method", ["craft", "scaled_gaussian", "random"])
def test_reactivate_with_a_counter_generator_matches_the_reference(method):
    """Every CPU backend draws the same numbers from a CounterGenerator as the reference."""
    torch.manual_seed(0)
    base = torch.randn(24, 3, 3, 3)
    base[[1, 5, 6, 20]] *= 1e-5
    want = base.clone()
    ref = craft_ext.reactivate_(
        want, method=method, generator=CounterGenerator(4), backend="reference"
    )
    for backend in craft_ext.available_backends("cpu", "reactivate_"):
        got = base.clone()
        out = craft_ext.reactivate_(
            got, method=method, generator=CounterGenerator(4), backend=backend
        )
        assert torch.equal(got, want), backend
        assert torch.equal(out.donor, ref.donor) and torch.equal(out.reactivated, ref.reactivated)


def _model_and_opt(rng: str, method: str = "scaled_gaussian", device: str = "cpu"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.PReLU(16)
    ).to(device)
    opt = craft_ext.ReactivatingSGD(
        model.parameters(),
        lr=0.1,
        momentum=0.9,
        reactivate=craft_ext.channels_of(model, "0"),
        criterion="folded",
        method=method,
        interval=1,
        seed=3,
        rng=rng,
    )
    model(torch.randn(4, 3, 8, 8, device=device)).square().mean().backward()
    opt.step()
    with torch.no_grad():
        model[0].weight[:3] = 0
    return model, opt


@pytest.mark.parametrize(
    ("method", "backend"),
    [("scaled_gaussian", "aot_eager"), ("craft", "aot_eager"), ("craft", "inductor")],
)
def test_hook_compiles_fullgraph_with_counter_rng(method, backend):
    """The step hook traces into one graph (no break) and reactivates exactly as in eager
    mode (Inductor: exact for craft; the Gaussian draws may differ in a last bit there)."""
    model, opt = _model_and_opt("counter", method)
    hook = torch.compile(opt.reactivator._after_step, fullgraph=True, backend=backend)
    hook(opt, (), {})
    model_e, opt_e = _model_and_opt("counter", method)
    opt_e.reactivator._after_step(opt_e, (), {})
    assert opt.reactivator.total_reactivated == 3
    for a, b in zip(model.parameters(), model_e.parameters(), strict=True):
        assert torch.equal(a, b)
    buf, buf_e = (
        o.state[m[0].weight]["momentum_buffer"] for o, m in ((opt, model), (opt_e, model_e))
    )
    assert torch.equal(buf, buf_e) and bool((buf[:3] == 0).all())
    assert [e.step for e in opt.reactivator.events] == [e.step for e in opt_e.reactivator.events]
    torch._dynamo.reset()


def test_hook_with_torch_generator_breaks_the_graph():
    """Why rng="counter" exists: a torch.Generator argument cannot enter a graph."""
    _, opt = _model_and_opt("torch")
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(opt.reactivator._after_step, fullgraph=True, backend="aot_eager")(opt, (), {})
    torch._dynamo.reset()


def test_compiled_optimizer_step_adds_no_break_of_its_own():
    """torch.compile(opt.step): the only graph breaks are the ones torch.optim inserts itself
    (Optimizer's no-grad wrapper); with rng="torch" the generator adds one more."""
    breaks = {}
    for rng in ("counter", "torch"):
        model, opt = _model_and_opt(rng, "craft")
        torch._dynamo.utils.counters.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.compile(opt.step, backend="aot_eager")()
        breaks[rng] = dict(torch._dynamo.utils.counters["graph_break"])
        torch._dynamo.reset()
    assert breaks["counter"] and all("torch._dynamo.graph_break()" in k for k in breaks["counter"])
    assert any("Failed to convert args/kwargs to proxy" in k for k in breaks["torch"])


def test_counter_rng_resumes_bit_identically():
    def run(split: bool):
        model, opt = _model_and_opt("counter")
        opt.zero_grad()
        for step in range(6):
            if split and step == 3:
                saved = opt.state_dict()
                fresh_model, opt = _model_and_opt("counter")
                fresh_model.load_state_dict(model.state_dict())
                opt.load_state_dict(saved)
                opt.zero_grad()  # the fresh pair's own first step left gradients
                model = fresh_model
            with torch.no_grad():
                model[0].weight[step : step + 2] = 0
            model(torch.ones(2, 3, 8, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return [p.detach() for p in model.parameters()], opt.reactivator.generators[0].get_state()

    (a, sa), (b, sb) = run(False), run(True)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and torch.equal(sa, sb)


def test_state_of_another_rng_is_refused():
    _, opt_t = _model_and_opt("torch")
    _, opt_c = _model_and_opt("counter")
    with pytest.raises(ValueError, match="rng='torch'"):
        opt_c.reactivator.load_state_dict(opt_t.reactivator.state_dict())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_counter_rng_no_sync_and_capture_without_registration():
    """On a GPU: a step with rng="counter" never syncs and is captured in a CUDA graph with no
    generator registered; each replay draws new numbers (the offset advances on the device)."""
    model, opt = _model_and_opt("counter", "scaled_gaussian", device="cuda")
    x = torch.randn(4, 3, 8, 8, device="cuda")
    for _ in range(3):  # warm up (momentum buffers)
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        opt.step()
    gen = opt.reactivator.generators[0]
    with torch.no_grad():
        model[0].weight[[1, 2]] = 0
    graph.replay()
    offset = int(gen.state[1])
    with torch.no_grad():
        model[0].weight[[1, 2]] = 0
    graph.replay()
    torch.cuda.synchronize()
    assert int(gen.state[1]) > offset  # replays advance the stream on the device
    assert float(model[0].weight[[1, 2]].abs().amax()) > 1e-3
