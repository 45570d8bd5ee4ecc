"""craft_ext.reactivate_: the CRAFT rules as properties, and every backend against the reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import OPCHECK_TESTS, backend_params, require_backend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import craft_ext

THR = 1e-3


def planted(shape, n_inactive, *, seed=0, dtype=torch.float32, device="cpu", used_frac=0.0):
    """Random weight with ``n_inactive`` inactive filters (|w| <= 1e-4) at random rows."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.1
    rows = torch.randperm(shape[0], generator=g)[:n_inactive]
    w[rows] = (torch.rand((n_inactive, *shape[1:]), generator=g) - 0.5) * 2e-4
    used = torch.rand(shape[0], generator=g) < used_frac
    return w.to(dtype).to(device), used.to(device)


def run(w, used, method="craft", seed=0, backend=None, threshold=THR):
    gen = torch.Generator(device=w.device).manual_seed(seed)
    return craft_ext.reactivate_(
        w, method=method, used=used, generator=gen, threshold=threshold, backend=backend
    )


def check_craft_rules(before, after, used_before, used_after, res, threshold=THR):
    """Assert the CRAFT rules (Bhatta et al. sec. 4.3) hold for one call."""
    n = before.shape[0]
    b = before.reshape(n, -1).double().cpu()
    a = after.reshape(n, -1).double().cpu()
    ub, ua = used_before.cpu(), used_after.cpu()
    inactive, reactivated, donor = res.inactive.cpu(), res.reactivated.cpu(), res.donor.cpu()
    max_abs = b.abs().amax(1).float()
    l1 = b.abs().sum(1)
    finite = torch.isfinite(l1)
    want_inactive = max_abs <= torch.tensor(threshold, dtype=torch.float32)
    assert torch.equal(inactive, want_inactive)
    active = ~want_inactive & finite
    assert int(res.count) == int(reactivated.sum())
    if not active.any():
        assert not reactivated.any() and torch.equal(a, b) and torch.equal(ua, ub)
        assert (donor == -1).all()
        return
    assert torch.equal(reactivated, want_inactive)
    # untouched rows are bit-identical; reactivated rows are the negatives of their donors
    assert torch.equal(a[~reactivated], b[~reactivated])
    assert (donor[~reactivated] == -1).all()
    d = donor[reactivated]
    assert active[d].all(), "donors must be active, finite filters"
    assert torch.equal(a[reactivated], -b[d])
    # donors: unspent candidates by L1 rank first, each once; fallbacks come from spent filters
    cand = active & ~ub
    n_inactive, n_cand = int(want_inactive.sum()), int(cand.sum())
    n_pairs = min(n_inactive, n_cand)
    order = sorted(torch.nonzero(cand).flatten().tolist(), key=lambda j: (-l1[j].item(), j))
    top = set(order[:n_pairs])
    used_now = d.tolist()
    assert top <= set(used_now), "the top-ranked unspent donors are all used"
    if n_inactive <= n_cand:
        assert sorted(used_now) == sorted(top), "each unspent donor is used once"
    else:  # the rest draw from spent filters (earlier calls' or this call's)
        assert all(bool(ub[j]) or j in top for j in used_now), "fallback donors must be spent"
    expected_used = ub.clone()
    expected_used[list(top)] = True
    assert torch.equal(ua, expected_used)
    # a reactivated filter is active afterwards
    assert (a[reactivated].abs().amax(1) > threshold).all()


# ---------------------------------------------------------------------------------------------
# Properties of the rules (hypothesis), on the reference and the C++ backend
# ---------------------------------------------------------------------------------------------

FAST_CPU_BACKENDS = [b for b in ("reference", "cpp") if b in craft_ext.available_backends("cpu")]


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    k=st.sampled_from([1, 3, 27]),
    frac_inactive=st.floats(0.0, 1.0),
    used_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    calls=st.integers(1, 3),
)
def test_craft_rules_property(backend, n, k, frac_inactive, used_frac, seed, calls):
    w, used = planted((n, k), round(frac_inactive * n), seed=seed, used_frac=used_frac)
    for call in range(calls):
        before, used_before = w.clone(), used.clone()
        res = run(w, used, seed=seed + call, backend=backend)
        check_craft_rules(before, w, used_before, used, res)
        # make some filters inactive again for the next call
        w[torch.arange(n) % 3 == call % 3] *= 1e-5


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), frac=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_scaled_gaussian_and_random_rules(backend, n, frac, seed):
    w, _ = planted((n, 3, 3, 3), round(frac * n), seed=seed)
    stats = craft_ext.filter_stats(w, backend="reference")
    inactive = stats.max_abs <= THR
    before = w.clone()
    res = run(w, None, method="scaled_gaussian", seed=seed, backend=backend)
    active = ~inactive
    if active.any():
        src = int(torch.argmax(torch.where(active, stats.l1, -math.inf)))
        assert torch.equal(res.reactivated, inactive)
        assert (res.donor[inactive] == src).all() and (res.donor[~inactive] == -1).all()
    else:
        assert not res.reactivated.any() and torch.equal(w, before)
    assert torch.equal(w[~res.reactivated], before[~res.reactivated])

    w2 = before.clone()
    res = run(w2, None, method="random", seed=seed, backend=backend)
    assert torch.equal(res.reactivated, inactive) and (res.donor == -1).all()
    assert torch.equal(w2[~inactive], before[~inactive])


# ---------------------------------------------------------------------------------------------
# Every backend against the reference
# ---------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(1, 3, 3, 3), (7, 5), (13, 1), (64, 3, 3, 3), (37, 16, 3, 3), (1024, 3, 3, 3)]


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("method", craft_ext.METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backend_matches_reference(device, backend, method, dtype, shape):
    require_backend(device, backend, "reactivate_")
    n = shape[0]
    w, used = planted(shape, max(1, n // 2), seed=n, dtype=dtype, device=device, used_frac=0.3)
    w_ref, used_ref = w.clone(), used.clone()
    res = run(w, used, method=method, seed=1, backend=backend)
    want = run(w_ref, used_ref, method=method, seed=1, backend="reference")
    for name, g, e in zip(res._fields, res, want, strict=True):
        assert torch.equal(g, e), f"{name} differs from the reference"
    assert torch.equal(used, used_ref)
    if method == "craft":
        assert torch.equal(w, w_ref)
    else:  # mean + std * z may round differently (fused multiply-add)
        tol = (
            0.0  # Triton on a GPU: no FMA (enable_fp_fusion=False), bit-identical
            if (device, backend) == ("cuda", "triton")
            else {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(dtype, 1e-6)
        )
        torch.testing.assert_close(w, w_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("device,backend", backend_params())
def test_large_layer_matches_reference(device, backend):
    require_backend(device, backend, "reactivate_")
    w, used = planted((512, 512, 3, 3), 200, seed=11, device=device, used_frac=0.2)
    w_ref, used_ref = w.clone(), used.clone()
    res = run(w, used, seed=2, backend=backend)
    want = run(w_ref, used_ref, seed=2, backend="reference")
    assert torch.equal(res.donor, want.donor) and torch.equal(w, w_ref)
    assert torch.equal(used, used_ref) and int(res.count) == 200


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize(
    "layout", ["channels_last", "row_slice", "transposed", "channel_slice"], ids=str
)
def test_layouts_modify_in_place(device, backend, layout):
    require_backend(device, backend, "reactivate_")
    base, _ = planted((20, 6, 3, 3), 8, seed=12, device=device)
    for method in craft_ext.METHODS:
        x = base.clone()
        view = {
            "channels_last": lambda t: t.to(memory_format=torch.channels_last),
            "row_slice": lambda t: t[::2],
            "transposed": lambda t: t.transpose(2, 3),
            "channel_slice": lambda t: t[:, 1:5],
        }[layout](x)
        ref = view.clone().contiguous()
        res = run(view, None, method=method, seed=3, backend=backend)
        want = run(ref, None, method=method, seed=3, backend="reference")
        assert torch.equal(res.donor, want.donor)
        torch.testing.assert_close(view.contiguous(), ref, rtol=1e-6, atol=1e-6)
        if layout in ("row_slice", "channel_slice"):  # the view wrote through to its base
            assert torch.equal(view, {"row_slice": x[::2], "channel_slice": x[:, 1:5]}[layout])


@pytest.mark.parametrize("device,backend", backend_params())
def test_nan_filters_are_never_donors_and_left_alone(device, backend):
    require_backend(device, backend, "reactivate_")
    w, _ = planted((10, 3, 3, 3), 4, seed=13, device=device)
    stats = craft_ext.filter_stats(w, backend="reference")
    strongest = int(torch.argmax(torch.where(stats.max_abs > THR, stats.l1, -1.0)))
    w[strongest].mul_(10.0)
    w[strongest, 0, 0, 0] = float("nan")  # the strongest filter holds a NaN
    before = w.clone()
    res = run(w, None, backend=backend)
    assert not res.inactive[strongest] and not res.reactivated[strongest]
    assert (res.donor != strongest).all()
    assert torch.equal(w[strongest].isnan(), before[strongest].isnan())
    assert int(res.count) == 4


@pytest.mark.parametrize("device,backend", backend_params())
def test_no_active_filter_leaves_layer_unchanged(device, backend):
    require_backend(device, backend, "reactivate_")
    w = torch.full((6, 3, 3, 3), 1e-5, device=device)
    for method in ("craft", "scaled_gaussian"):
        before = w.clone()
        res = run(w, None, method=method, backend=backend)
        assert torch.equal(w, before) and int(res.count) == 0 and res.inactive.all()
        assert (res.donor == -1).all()
    res = run(w, None, method="random", backend=backend)  # random needs no source filter
    assert int(res.count) == 6 and (w.abs().amax((1, 2, 3)) > THR).all()


@pytest.mark.parametrize("device,backend", backend_params())
def test_opcheck(device, backend):
    require_backend(device, backend, "reactivate_")
    if backend == "reference":
        pytest.skip("the reference is plain PyTorch, not an operator")
    op = (
        torch.ops.craft_ext.reactivate_triton_.default
        if backend == "triton"
        else torch.ops.craft_ext.reactivate_.default
    )
    utils = OPCHECK_TESTS
    if backend == "triton" and device == "cpu":
        utils = utils[:3]  # the interpreter cannot run under AOT dispatch; covered on GPU
    for method in craft_ext.METHODS:
        w, used = planted((9, 2, 3, 3), 4, seed=14, device=device, used_frac=0.3)
        key = torch.rand(9, device=device)
        u = torch.rand(9, device=device)
        noise = None if method == "craft" else torch.randn(w.shape, device=device)
        torch.library.opcheck(op, (w, used, key, u, noise, THR, method), test_utils=utils)


@pytest.mark.parametrize("device,backend", backend_params())
def test_compile_fullgraph(device, backend):
    require_backend(device, backend, "reactivate_")
    if backend == "triton" and device == "cpu":
        pytest.skip("Triton under torch.compile needs a GPU (the interpreter cannot be traced)")
    w, used = planted((16, 3, 3, 3), 5, seed=15, device=device)
    p = torch.nn.Parameter(w.clone())
    used_c = used.clone()

    @torch.compile(fullgraph=True)
    def step(weight, used):
        return craft_ext.reactivate_(weight, used=used, backend=backend)

    res = step(p, used_c)
    check_craft_rules(w, p.detach(), used, used_c, res)
    assert int(res.count) == 5


@pytest.mark.parametrize("device,backend", backend_params())
def test_strided_used_mask_and_float32_l1_near_ties(device, backend):
    """``used`` may be a strided view (only its own elements change), and donors are ranked by
    the reference's float32 L1: [1, e, e] and [e, e, 1] (e = 2^-24) tie in float32 summed in
    this order but not in double, and the reference picks the later-ranked one (index 1)."""
    require_backend(device, backend, "reactivate_")
    w, _ = planted((8, 3, 3, 3), 4, seed=19, device=device)
    base = torch.zeros(16, dtype=torch.bool, device=device)
    w_ref, base_ref = w.clone(), base.clone()
    run(w, base[::2], seed=4, backend=backend)
    run(w_ref, base_ref[::2], seed=4, backend="reference")
    assert torch.equal(base, base_ref) and not base[1::2].any() and torch.equal(w, w_ref)
    e = 2.0**-24
    ties = torch.tensor([[1.0, e, e], [e, e, 1.0], [1e-6, 1e-6, 1e-6]], device=device)
    res = run(ties.clone(), None, backend=backend)
    want = run(ties.clone(), None, backend="reference")
    assert torch.equal(res.donor, want.donor) and int(want.donor[2]) == 1


@pytest.mark.parametrize("device,backend", backend_params())
def test_autograd_sees_the_in_place_write(device, backend):
    """Like torch's in-place ops, reactivate_ bumps the weight's version counter: a backward
    pass through a forward that saved the weight before it was reactivated raises."""
    require_backend(device, backend, "reactivate_")
    w0, _ = planted((6, 3, 3, 3), 2, seed=16, device=device)
    w = torch.nn.Parameter(w0)
    loss = torch.nn.functional.conv2d(torch.randn(2, 3, 5, 5, device=device), w).square().sum()
    before = w._version
    with torch.no_grad():
        res = craft_ext.reactivate_(w, backend=backend)
    assert int(res.count) == 2 and w._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_fixed_seed_is_deterministic_and_seeds_differ():
    pairings = set()
    for seed in range(6):
        outs = []
        for _ in range(2):
            w, _ = planted((64, 3, 3, 3), 20, seed=0)
            outs.append(run(w, None, seed=seed).donor)
        assert torch.equal(outs[0], outs[1])
        pairings.add(tuple(outs[0].tolist()))
    assert len(pairings) > 1, "different seeds must give different pairings"


def test_donors_are_spent_once_across_calls_then_fall_back():
    w, _ = planted((8, 3, 3, 3), 4, seed=16)  # 4 active donors
    used = torch.zeros(8, dtype=torch.bool)
    active = craft_ext.filter_stats(w).max_abs > THR
    r1 = run(w, used, seed=1)
    assert torch.equal(used, torch.zeros_like(used).index_fill_(0, r1.donor[r1.reactivated], True))
    assert int(used.sum()) == 4 and torch.equal(used, active)
    # everything active is now spent: a new inactive filter takes a spent donor at random
    victim = int(torch.nonzero(r1.reactivated)[0])
    w[victim] *= 1e-6
    r2 = run(w, used, seed=2)
    assert int(r2.count) == 1 and bool(used[r2.donor[victim]])


def test_parameter_with_grad_is_modified_in_place():
    w, _ = planted((12, 3, 3, 3), 3, seed=17)
    conv = torch.nn.Conv2d(3, 12, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(w)
    ptr = conv.weight.data_ptr()
    res = craft_ext.reactivate_(conv.weight)
    assert int(res.count) == 3 and conv.weight.data_ptr() == ptr
    assert conv.weight.requires_grad and conv.weight.grad is None


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"method": "complement"}, ValueError, "method must be one of"),
        ({"threshold": -1.0}, ValueError, "threshold must be >= 0"),
        ({"threshold": float("nan")}, ValueError, "threshold must be >= 0"),
        ({"threshold": "1e-3"}, TypeError, "threshold must be a float"),
        ({"used": torch.zeros(5, dtype=torch.bool)}, ValueError, "used must be a bool tensor"),
        ({"used": torch.zeros(6, dtype=torch.uint8)}, ValueError, "used must be a bool tensor"),
        ({"used": [False] * 6}, TypeError, "used must be a torch.Tensor"),
        ({"generator": 42}, TypeError, "generator must be a torch.Generator"),
        ({"backend": "fortran"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments_raise_and_modify_nothing(kwargs, exc, match):
    w, _ = planted((6, 3, 3, 3), 3, seed=18)
    before = w.clone()
    with pytest.raises(exc, match=match):
        craft_ext.reactivate_(w, **kwargs)
    assert torch.equal(w, before)


def test_bad_weights_raise():
    with pytest.raises(ValueError, match="at least 2 dims"):
        craft_ext.reactivate_(torch.zeros(4))
    with pytest.raises(ValueError, match="at least one filter"):
        craft_ext.reactivate_(torch.zeros(0, 3, 3, 3))
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        craft_ext.reactivate_(torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="overlapping memory"):
        craft_ext.reactivate_(torch.zeros(1, 3).expand(4, 3))
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        craft_ext.reactivate_(torch.zeros(4, 3), backend="cuda")


# ---------------------------------------------------------------------------------------------
# BN-aware channels: folded detection and the channel entries, every backend vs the reference
# ---------------------------------------------------------------------------------------------


def channel(n, *, seed, dtype=torch.float32, device="cpu", bn_dtype=None):
    """A weight [n, 3, 3, 3] (some filters dead by weight) with a BatchNorm (some channels dead
    only through it: gamma 1e-4, raw max |w| ~5e-3) and a PReLU, as modules."""
    w, used = planted((n, 3, 3, 3), n // 4, seed=seed, dtype=dtype, device=device, used_frac=0.2)
    g = torch.Generator().manual_seed(seed + 1)
    bn = torch.nn.BatchNorm2d(n)
    prelu = torch.nn.PReLU(n)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(n, generator=g) + 0.1)
        bn.bias.copy_(torch.randn(n, generator=g))
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) + 0.1)
        prelu.weight.copy_(torch.rand(n, generator=g))
        rows = torch.randperm(n, generator=g)[: max(1, n // 5)]
        bn.weight[rows] = 1e-4
        w[rows.to(device)] *= 5e-3 / w[rows.to(device)].abs().amax((1, 2, 3), keepdim=True)
    bn_dtype = bn_dtype or dtype
    return w, used, bn.to(bn_dtype).to(device), prelu.to(bn_dtype).to(device)


def _entries(bn, prelu):
    return [bn.weight, bn.bias, bn.running_mean, bn.running_var, prelu.weight]


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("method", craft_ext.METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 64, 129])
@pytest.mark.parametrize("criterion", ["weight", "folded"])
def test_channel_backend_matches_reference(device, backend, method, dtype, n, criterion):
    require_backend(device, backend, "reactivate_")
    bn_dtype = torch.float32 if dtype != torch.float64 else dtype  # BN params stay float32
    w, used, bn, prelu = channel(n, seed=n, dtype=dtype, device=device, bn_dtype=bn_dtype)
    w_ref, used_ref = w.clone(), used.clone()
    bn_ref, prelu_ref = copy.deepcopy(bn), copy.deepcopy(prelu)
    kw = {"method": method, "criterion": criterion, "threshold": THR}
    gen = torch.Generator(device=device).manual_seed(3)
    gen_ref = torch.Generator(device=device).manual_seed(3)
    with torch.no_grad():
        res = craft_ext.reactivate_(
            w, used=used, bn=bn, prelu=prelu, generator=gen, backend=backend, **kw
        )
        want = craft_ext.reactivate_(
            w_ref,
            used=used_ref,
            bn=bn_ref,
            prelu=prelu_ref,
            generator=gen_ref,
            backend="reference",
            **kw,
        )
    for name, g, e in zip(res._fields, res, want, strict=True):
        assert torch.equal(g, e), f"{name} differs from the reference"
    assert torch.equal(used, used_ref)
    for got, exp in zip(_entries(bn, prelu), _entries(bn_ref, prelu_ref), strict=True):
        assert torch.equal(got, exp), "channel entries must match bit for bit"
    if method == "craft":
        assert torch.equal(w, w_ref)
    else:
        tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(dtype, 1e-6)
        torch.testing.assert_close(w, w_ref, rtol=tol, atol=tol)
    if criterion == "folded" and method != "random" and int(res.count):
        stats = craft_ext.filter_stats(w, bn=bn, backend="reference")
        assert (stats.max_abs[res.reactivated] > THR).all(), "revived through BN"


@pytest.mark.parametrize("device,backend", backend_params())
def test_channel_non_finite_bn_is_neither_inactive_nor_donor(device, backend):
    require_backend(device, backend, "reactivate_")
    w, _, bn, prelu = channel(12, seed=4, device=device)
    stats = craft_ext.filter_stats(w, bn=bn, backend="reference")
    strongest = int(torch.argmax(torch.where(stats.max_abs > THR, stats.l1, -1.0)))
    with torch.no_grad():
        bn.weight[strongest] = float("nan")
        dead = int(torch.nonzero(stats.max_abs <= THR)[0])
        bn.running_var[dead] = float("inf")  # would fold to 0 and look dead
    with torch.no_grad():
        res = craft_ext.reactivate_(w, bn=bn, prelu=prelu, criterion="folded", backend=backend)
    assert not res.inactive[strongest] and not res.inactive[dead]
    assert not res.reactivated[[strongest, dead]].any()
    assert (res.donor != strongest).all() and (res.donor != dead).all()


@pytest.mark.parametrize("device,backend", backend_params())
def test_channel_opcheck(device, backend):
    require_backend(device, backend, "reactivate_")
    if backend == "reference":
        pytest.skip("the reference is plain PyTorch, not an operator")
    op = (
        torch.ops.craft_ext.reactivate_triton_.default
        if backend == "triton"
        else torch.ops.craft_ext.reactivate_.default
    )
    utils = OPCHECK_TESTS[:3] if backend == "triton" and device == "cpu" else OPCHECK_TESTS
    for method in craft_ext.METHODS:
        w, used, bn, prelu = channel(9, seed=14, device=device)
        key = torch.rand(9, device=device)
        u = torch.rand(9, device=device)
        noise = None if method == "craft" else torch.randn(w.shape, device=device)
        entries = [t.detach().clone() for t in _entries(bn, prelu)]
        bias = torch.randn(9, device=device)
        args = (w, used, key, u, noise, THR, method, bias, *entries[:4], entries[4], 1e-5, True)
        torch.library.opcheck(op, args, test_utils=utils)
