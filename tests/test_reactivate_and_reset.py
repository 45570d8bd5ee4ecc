"""craft_ext::reactivate_and_reset_: one reactivation as the Reactivator runs it per step.

The C++ CPU kernel (csrc/cpu/reactivate_and_reset.cpp) against the Python composition
(craft_ext.reference.reactivate_and_reset_): same draws from the generator, same weight,
``used`` mask, optimizer-state rows, total and outputs, bit for bit; plus the early exit of
the C++ reactivate_ kernel (no inactive filter) against the reference at the threshold's edge.
"""

from __future__ import annotations

import pytest
import torch
from helpers import OPCHECK_TESTS, require_backend
from hypothesis import given, settings
from hypothesis import strategies as st

import craft_ext
from craft_ext import reference
from craft_ext.ops import _reactivate_and_reset_checked

THR = 1e-3
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _fused():
    require_backend("cpu", "cpp", "reactivate_")
    return torch.ops.craft_ext.reactivate_and_reset_.default


def planted(shape, rows, *, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.1
    w[rows] = (torch.rand((len(rows), *shape[1:]), generator=g) - 0.5) * 2e-4
    return w.to(dtype)


def state_like(w, seed=1):
    """Optimizer-like state: two tensors shaped like w (momentum / Adam moments, with a NaN to
    show masked_fill_ clears it), a scalar ``step``, a tensor of another shape (left alone),
    and an [N] tensor (the state of a channel entry such as BN gamma: its rows are reset)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(w.shape, generator=g)
    m.view(w.shape[0], -1)[:, 0] = float("nan")
    n = w.shape[0]
    return [
        m,
        torch.rand(w.shape, generator=g),
        torch.tensor(7.0),
        torch.ones(n + 1),
        torch.rand(n, generator=g) + 1,
    ]


def run_both(w, used, state, method, seed, threshold=THR):
    """(fused results, composite results): each on its own copies, same generator seed."""
    fused = _fused()
    copies = []
    for _ in range(2):
        copies.append(
            (
                w.clone(),
                used.clone(),
                torch.zeros((), dtype=torch.int64),
                [s.clone() for s in state],
                torch.Generator().manual_seed(seed),
            )
        )
    (w1, u1, t1, s1, g1), (w2, u2, t2, s2, g2) = copies
    out1 = fused(w1, u1, t1, s1, g1, threshold, method)
    out2 = reference.reactivate_and_reset_(w2, u2, t2, s2, g2, threshold, method)
    return (w1, u1, t1, s1, g1, out1), (w2, u2, t2, s2, g2, out2)


def assert_same(a, b):
    (w1, u1, t1, s1, g1, out1), (w2, u2, t2, s2, g2, out2) = a, b
    for name, x, y in zip(("inactive", "reactivated", "donor", "count"), out1, out2, strict=True):
        assert torch.equal(x, y), f"{name} differs from the composition"
    assert torch.equal(u1, u2) and torch.equal(t1, t2)
    for i, (x, y) in enumerate(zip(s1, s2, strict=True)):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=f"state[{i}]")
    # the generator was consumed the same way (same draws, same order)
    assert torch.equal(g1.get_state(), g2.get_state())
    assert torch.equal(w1, w2)  # mean + std * z rounded as torch does (no contraction)


@pytest.mark.parametrize("method", craft_ext.METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 3, 3), (13, 5), (64, 3, 3, 3), (37, 16, 3, 3)], ids=str)
def test_fused_matches_composition(method, dtype, shape):
    n = shape[0]
    rows = list(range(0, n, 3))
    w = planted(shape, rows, seed=n, dtype=dtype)
    used = torch.arange(n) % 4 == 1
    a, b = run_both(w, used, state_like(w), method, seed=5)
    assert_same(a, b)
    reactivated = a[5][1]
    assert int(reactivated.sum()) == (len(rows) if n > len(rows) or method == "random" else 0)
    m1 = a[3][0].view(n, -1)
    assert (m1[reactivated] == 0).all(), "state rows of reactivated filters are zeroed"
    others = state_like(w)[0].view(n, -1)[~reactivated]
    assert torch.equal(m1[~reactivated].nan_to_num(), others.nan_to_num()), "other rows kept"
    assert torch.equal(a[3][2], torch.tensor(7.0)) and torch.equal(a[3][3], torch.ones(n + 1))
    channel_state = a[3][4]
    assert (channel_state[reactivated] == 0).all(), "[N] state rows of reactivated channels"
    assert torch.equal(channel_state[~reactivated], state_like(w)[4][~reactivated])


@pytest.mark.parametrize("layout", ["channels_last", "row_slice", "channel_slice"])
def test_fused_layouts(layout):
    base = planted((20, 6, 3, 3), [1, 4, 9, 15], seed=3)
    view = {
        "channels_last": lambda t: t.to(memory_format=torch.channels_last),
        "row_slice": lambda t: t[::2],
        "channel_slice": lambda t: t[:, 1:5],
    }[layout](base.clone())
    n = view.shape[0]
    a, b = run_both(view, torch.zeros(n, dtype=torch.bool), state_like(view), "craft", seed=2)
    assert_same(a, b)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 24),
    k=st.sampled_from([1, 4, 27]),
    n_inactive=st.integers(0, 24),
    method=st.sampled_from(craft_ext.METHODS),
    seed=st.integers(0, 2**16),
    calls=st.integers(1, 4),
)
def test_fused_matches_composition_over_calls(n, k, n_inactive, method, seed, calls):
    """Repeated calls (donors spent, totals accumulated) stay identical to the composition."""
    _fused()
    w = planted((n, k), list(range(min(n_inactive, n))), seed=seed)
    used = torch.zeros(n, dtype=torch.bool)
    state = state_like(w, seed)
    a = [w.clone(), used.clone(), torch.zeros((), dtype=torch.int64), [s.clone() for s in state]]
    b = [w.clone(), used.clone(), torch.zeros((), dtype=torch.int64), [s.clone() for s in state]]
    ga, gb = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for call in range(calls):
        out_a = _fused()(*a, ga, THR, method)
        out_b = reference.reactivate_and_reset_(*b, gb, THR, method)
        for x, y in zip(out_a, out_b, strict=True):
            assert torch.equal(x, y)
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
        assert torch.equal(a[0], b[0])
        b[0].copy_(a[0])  # continue from identical weights
        for x in (a[0], b[0]):  # kill a few filters again
            x[torch.arange(n) % 3 == call % 3] *= 1e-5
    assert torch.equal(ga.get_state(), gb.get_state())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_early_exit_matches_reference_at_the_threshold(dtype):
    """The C++ reactivate_ kernel returns early when no filter is inactive; its test
    (every |float32(w)| <= t) must agree with the reference's float32 amax <= t at the edge."""
    require_backend("cpu", "cpp", "reactivate_")
    t = torch.tensor(THR, dtype=torch.float32)
    below = torch.nextafter(t, torch.tensor(0.0)).item()
    above = torch.nextafter(t, torch.tensor(1.0)).item()
    for fill, want in [(THR, True), (below, True), (above, False), (float("nan"), False)]:
        w = torch.randn(6, 4).to(dtype)
        w[2] = torch.tensor(fill).to(dtype)
        w[2, 1] = 0.0
        w_ref = w.clone()
        res = craft_ext.reactivate_(w, backend="cpp", generator=torch.Generator().manual_seed(0))
        ref = craft_ext.reactivate_(
            w_ref, backend="reference", generator=torch.Generator().manual_seed(0)
        )
        assert torch.equal(w.nan_to_num(), w_ref.nan_to_num())
        assert torch.equal(res.inactive, ref.inactive)
        if dtype in (torch.float32, torch.float64):  # fill is exact in these
            assert bool(res.inactive[2]) == want, fill
    # a layer with nothing inactive: nothing changes, outputs say so
    w = torch.randn(9, 3, 3, 3)
    before = w.clone()
    res = craft_ext.reactivate_(w, backend="cpp")
    assert torch.equal(w, before) and int(res.count) == 0
    assert not res.inactive.any() and not res.reactivated.any() and (res.donor == -1).all()


def test_checked_path_picks_the_fused_kernel_on_cpu(monkeypatch):
    fused = _fused()
    calls = []

    class SpyOverload:  # stands in for the OpOverload: eager calls go through ._op
        def __call__(self, *args):
            calls.append(args)
            return fused(*args)

        def _op(self, *args):
            return self(*args)

    class Spy:
        default = SpyOverload()

    monkeypatch.setattr(torch.ops.craft_ext, "reactivate_and_reset_", Spy, raising=False)
    w = planted((8, 3, 3, 3), [2])
    used, total = torch.zeros(8, dtype=torch.bool), torch.zeros((), dtype=torch.int64)
    res = _reactivate_and_reset_checked(w, used, total, [], None, "craft", THR, None)
    assert len(calls) == 1 and int(res.count) == 1 and int(total) == 1
    with craft_ext.use_backend("reference"):  # the composition, not the kernel
        _reactivate_and_reset_checked(w, used, total, [], None, "craft", THR, None)
    assert len(calls) == 1


def test_opcheck():
    fused = _fused()
    for method in craft_ext.METHODS:
        w = planted((9, 2, 3, 3), [0, 3, 4])
        used = torch.arange(9) % 3 == 0
        total = torch.zeros((), dtype=torch.int64)
        state = [torch.randn(w.shape), torch.tensor(3.0)]
        torch.library.opcheck(
            fused, (w, used, total, state, None, THR, method), test_utils=OPCHECK_TESTS
        )


@pytest.mark.parametrize(
    "used,total,match",
    [
        (torch.zeros(5, dtype=torch.bool), None, "used must be a bool tensor of shape"),
        (torch.zeros(6, dtype=torch.uint8), None, "used must be a bool tensor of shape"),
        (None, torch.zeros((), dtype=torch.int32), "total must be an int64 scalar"),
        (None, torch.zeros(2, dtype=torch.int64), "total must be an int64 scalar"),
    ],
)
def test_bad_arguments_raise_and_modify_nothing(used, total, match):
    fused = _fused()
    w = planted((6, 3, 3, 3), [1, 2])
    used = torch.zeros(6, dtype=torch.bool) if used is None else used
    total = torch.zeros((), dtype=torch.int64) if total is None else total
    state = [torch.ones(w.shape)]
    before = [w.clone(), used.clone(), total.clone(), state[0].clone()]
    with pytest.raises(RuntimeError, match=match):
        fused(w, used, total, state, None, THR, "craft")
    for x, y in zip([w, used, total, state[0]], before, strict=True):
        assert torch.equal(x, y)


def test_every_written_argument_gets_a_new_version():
    fused = _fused()
    w = planted((8, 3, 3, 3), [2])
    used, total = torch.zeros(8, dtype=torch.bool), torch.zeros((), dtype=torch.int64)
    state = [torch.ones(w.shape), torch.tensor(1.0)]
    tensors = [w, used, total, *state]
    before = [t._version for t in tensors]
    fused(w, used, total, state, None, THR, "craft")
    assert all(t._version > v for t, v in zip(tensors, before, strict=True))


# ---------------------------------------------------------------------------------------------
# reactivate_and_reset_.record: the same reactivation, its event written into row `slot` of two logs
# ---------------------------------------------------------------------------------------------


def _recording():
    _fused()
    return torch.ops.craft_ext.reactivate_and_reset_.record


def _logs(n, rows=5):
    return torch.zeros(rows, n, dtype=torch.bool), torch.full((rows, n), -7, dtype=torch.int64)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 24),
    k=st.sampled_from([1, 4, 27]),
    n_inactive=st.integers(0, 24),
    method=st.sampled_from(craft_ext.METHODS),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    slots=st.lists(st.integers(0, 4), min_size=1, max_size=4),
)
def test_record_matches_composition_over_calls(n, k, n_inactive, method, dtype, seed, slots):
    """Each call equals reference.reactivate_and_record_ (itself reactivate_and_reset_ plus two
    row writes): weights, mask, total, state, generator, and the log rows, bit for bit; rows
    other than ``slot`` are left as they were."""
    record = _recording()
    w = planted((n, k), list(range(min(n_inactive, n))), seed=seed, dtype=dtype)
    state = state_like(w, seed)

    def fresh():
        return [
            w.clone(),
            torch.zeros(n, dtype=torch.bool),
            torch.zeros((), dtype=torch.int64),
            [s.clone() for s in state],
            *_logs(n),
        ]

    a, b = fresh(), fresh()
    ga, gb = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for call, slot in enumerate(slots):
        record(*a, slot, ga, THR, method)
        reference.reactivate_and_record_(*b, slot, gb, THR, method)
        for name, x, y in zip(
            ("used", "total", "reactivated_log", "donor_log"),
            a[1:3] + a[4:],
            b[1:3] + b[4:],
            strict=True,
        ):
            assert torch.equal(x, y), name
        for x, y in zip(a[3], b[3], strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(a[0], b[0])
        assert torch.equal(ga.get_state(), gb.get_state())
        b[0].copy_(a[0])
        for x in (a[0], b[0]):  # kill a few filters again
            x[torch.arange(n) % 3 == call % 3] *= 1e-5
    untouched = [r for r in range(5) if r not in slots]
    assert (a[5][untouched] == -7).all() and not a[4][untouched].any()


def test_record_writes_what_reset_returns():
    record, fused = _recording(), _fused()
    w = planted((12, 3, 3, 3), [0, 5, 7])
    used = torch.arange(12) % 4 == 1
    args_a = [w.clone(), used.clone(), torch.zeros((), dtype=torch.int64), state_like(w)]
    args_b = [w.clone(), used.clone(), torch.zeros((), dtype=torch.int64), state_like(w)]
    logs = _logs(12)
    record(*args_a, *logs, 3, torch.Generator().manual_seed(4), THR, "craft")
    out = fused(*args_b, torch.Generator().manual_seed(4), THR, "craft")
    assert torch.equal(logs[0][3], out[1]) and torch.equal(logs[1][3], out[2])
    assert int(out[3]) == 3 and torch.equal(args_a[0], args_b[0])


def test_record_opcheck():
    record = _recording()
    for method in craft_ext.METHODS:
        w = planted((9, 2, 3, 3), [0, 3, 4])
        used = torch.arange(9) % 3 == 0
        total = torch.zeros((), dtype=torch.int64)
        state = [torch.randn(w.shape), torch.tensor(3.0)]
        torch.library.opcheck(
            record,
            (w, used, total, state, *_logs(9), 2, None, THR, method),
            test_utils=OPCHECK_TESTS,
        )


@pytest.mark.parametrize(
    "logs,slot,match",
    [
        (
            lambda: (torch.zeros(4, 6, dtype=torch.uint8), torch.zeros(4, 6, dtype=torch.int64)),
            0,
            "reactivated_log must be a contiguous bool",
        ),
        (
            lambda: (torch.zeros(4, 5, dtype=torch.bool), torch.zeros(4, 5, dtype=torch.int64)),
            0,
            "reactivated_log must be a contiguous bool",
        ),
        (
            lambda: (torch.zeros(4, 6, dtype=torch.bool), torch.zeros(3, 6, dtype=torch.int64)),
            0,
            "donor_log must be a contiguous int64",
        ),
        (
            lambda: (torch.zeros(6, 4, dtype=torch.bool).t(), torch.zeros(4, 6, dtype=torch.int64)),
            0,
            "reactivated_log must be a contiguous bool",
        ),
        (
            lambda: (torch.zeros(4, 6, dtype=torch.bool), torch.zeros(4, 6, dtype=torch.int64)),
            4,
            r"slot must be in \[0, 4\)",
        ),
        (
            lambda: (torch.zeros(4, 6, dtype=torch.bool), torch.zeros(4, 6, dtype=torch.int64)),
            -1,
            r"slot must be in \[0, 4\)",
        ),
    ],
)
def test_record_bad_logs_raise_and_modify_nothing(logs, slot, match):
    record = _recording()
    w = planted((6, 3, 3, 3), [1, 2])
    used, total = torch.zeros(6, dtype=torch.bool), torch.zeros((), dtype=torch.int64)
    state = [torch.ones(w.shape)]
    rlog, dlog = logs()
    gen = torch.Generator().manual_seed(0)
    before = [t.clone() for t in (w, used, total, state[0], rlog, dlog, gen.get_state())]
    with pytest.raises(RuntimeError, match=match):
        record(w, used, total, state, rlog, dlog, slot, gen, THR, "craft")
    after = (w, used, total, state[0], rlog, dlog, gen.get_state())
    for x, y in zip(after, before, strict=True):
        assert torch.equal(x, y)


def test_record_bumps_every_written_argument():
    record = _recording()
    w = planted((8, 3, 3, 3), [2])
    used, total = torch.zeros(8, dtype=torch.bool), torch.zeros((), dtype=torch.int64)
    state = [torch.ones(w.shape)]
    rlog, dlog = _logs(8)
    tensors = [w, used, total, *state, rlog, dlog]
    before = [t._version for t in tensors]
    record(w, used, total, state, rlog, dlog, 0, None, THR, "craft")
    assert all(t._version > v for t, v in zip(tensors, before, strict=True))


def test_step_hook_fast_path_only_when_cpp_is_the_backend():
    """The Reactivator's step hook calls the C++ record op directly only when the cpp backend
    would be picked for a CPU weight; any other choice goes through the general path."""
    from craft_ext.ops import _cpu_record_op

    _recording()
    assert _cpu_record_op() is not None
    with craft_ext.use_backend("cpp"):
        assert _cpu_record_op() is not None
    for other in ("reference", "triton"):
        with craft_ext.use_backend(other):
            assert _cpu_record_op() is None, other


@pytest.mark.parametrize(
    "weight,method,match",
    [
        (lambda: planted((6, 3, 3, 3), [1]), "bogus", "method must be one of"),
        (lambda: torch.zeros(6, 4, dtype=torch.int32), "craft", "weight must be float32"),
        (lambda: torch.zeros(6, 4).to(torch.float8_e4m3fn), "craft", "weight must be float32"),
        (lambda: torch.zeros(6, 0), "craft", "filters must hold at least one element"),
    ],
)
def test_record_rejects_before_drawing_or_writing(weight, method, match):
    """A rejected call leaves the generator, the weight and the logs as they were."""
    record = _recording()
    w = weight()
    n = w.shape[0]
    used, total = torch.zeros(n, dtype=torch.bool), torch.zeros((), dtype=torch.int64)
    rlog, dlog = _logs(n)
    gen = torch.Generator().manual_seed(0)
    before = [t.clone() for t in (w, rlog, dlog, gen.get_state())]
    with pytest.raises(RuntimeError, match=match):
        record(w, used, total, [], rlog, dlog, 0, gen, THR, method)
    for x, y in zip((w, rlog, dlog, gen.get_state()), before, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "rlog,dlog,slot,match",
    [
        (torch.zeros(2, 6, dtype=torch.bool), torch.zeros(2, 6, dtype=torch.int64), 2, "slot must"),
        (torch.zeros(2, 6, dtype=torch.uint8), torch.zeros(2, 6, dtype=torch.int64), 0, "bool"),
        (torch.zeros(2, 6, dtype=torch.bool), torch.zeros(2, 6), 0, "donor_log must"),
    ],
)
def test_general_record_path_checks_logs_first(rlog, dlog, slot, match):
    """The composition path (CUDA, reference, Triton) checks the logs as the C++ kernel does,
    before anything is drawn or written."""
    from craft_ext.ops import _reactivate_and_record_checked

    w = planted((6, 3, 3, 3), [1, 2])
    used, total = torch.zeros(6, dtype=torch.bool), torch.zeros((), dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    before = [t.clone() for t in (w, used, total, rlog, dlog, gen.get_state())]
    with pytest.raises(ValueError, match=match):
        _reactivate_and_record_checked(
            w, used, total, [], rlog, dlog, slot, gen, "craft", THR, "reference"
        )
    for x, y in zip((w, used, total, rlog, dlog, gen.get_state()), before, strict=True):
        assert torch.equal(x, y)
