"""craft_ext.filter_stats: every backend against a float64 truth and the reference."""

from __future__ import annotations

import pytest
import torch
from helpers import OPCHECK_TESTS, backend_params, require_backend

import craft_ext
from craft_ext import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [
    (1, 3, 3, 3),  # a single filter
    (7, 5),  # linear, N not a power of two
    (13, 1),  # K = 1
    (64, 3, 3, 3),  # ArcFace first layer
    (33, 17, 3, 3),
    (1024, 3, 3, 3),
]
F32_EPS = torch.finfo(torch.float32).eps


def _truth(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    r = x.double().reshape(x.shape[0], -1)
    std, mean = torch.std_mean(r, dim=1, correction=0)
    return r.abs().amax(1), r.abs().sum(1), mean, std


def _same_precision_torch(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What a user gets from torch ops in the input's own precision (fp32 for <= fp32)."""
    r = x.reshape(x.shape[0], -1)
    if r.dtype in (torch.float16, torch.bfloat16):
        r = r.float()
    std, mean = torch.std_mean(r, dim=1, correction=0)
    return r.abs().amax(1), r.abs().sum(1), mean, std


def assert_stats_accurate(got: craft_ext.FilterStats, x: torch.Tensor) -> None:
    """Error vs float64 <= 2x the same-precision torch error + output rounding (float32)."""
    truth = _truth(x.cpu())
    torch_est = _same_precision_torch(x.cpu())
    for name, g, t, e in zip(got._fields, got, truth, torch_est, strict=True):
        assert g.dtype == torch.float32 and g.shape == (x.shape[0],), name
        g = g.cpu().double()
        err = (g - t).abs().max().item()
        torch_err = (e.double() - t).abs().max().item()
        floor = 2 * F32_EPS * t.abs().max().item() + 1e-30
        assert err <= 2 * torch_err + floor, (
            f"{name}: error {err:.3g} > 2 x torch {torch_err:.3g} + {floor:.3g}"
        )


def _weight(shape, dtype, device, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    return w.to(dtype).to(device)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_truth(device, backend, dtype, shape):
    require_backend(device, backend, "filter_stats")
    x = _weight(shape, dtype, device, seed=sum(shape))
    x[0].mul_(1e-4)  # an "inactive" filter among normal ones
    assert_stats_accurate(craft_ext.filter_stats(x, backend=backend), x)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_conv_weight(device, backend, dtype):
    require_backend(device, backend, "filter_stats")
    x = _weight((512, 512, 3, 3), dtype, device, seed=3, scale=0.02)
    assert_stats_accurate(craft_ext.filter_stats(x, backend=backend), x)


@pytest.mark.parametrize("device,backend", backend_params())
def test_large_mean_std_is_accurate(device, backend):
    """std must not come from a cancelling sum-of-squares formula."""
    require_backend(device, backend, "filter_stats")
    x = _weight((9, 4, 5, 5), torch.float32, device, seed=4, scale=1e-3, offset=100.0)
    assert_stats_accurate(craft_ext.filter_stats(x, backend=backend), x)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize(
    "layout", ["channels_last", "row_slice", "transposed", "channel_slice"], ids=str
)
def test_layouts(device, backend, layout):
    require_backend(device, backend, "filter_stats")
    base = _weight((24, 6, 3, 3), torch.float32, device, seed=5)
    x = {
        "channels_last": base.to(memory_format=torch.channels_last),
        "row_slice": base[::2],
        "transposed": base.transpose(2, 3),
        "channel_slice": base[:, 1:5],
    }[layout]
    got = craft_ext.filter_stats(x, backend=backend)
    want = reference.filter_stats(x.contiguous())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", backend_params())
def test_nan_and_inf_filters(device, backend):
    require_backend(device, backend, "filter_stats")
    x = _weight((5, 2, 3, 3), torch.float32, device, seed=6)
    x[1, 0, 1, 1] = float("nan")
    x[3, 1, 0, 2] = float("inf")
    s = craft_ext.filter_stats(x, backend=backend)
    for field in s:
        assert torch.isnan(field[1]), "a NaN filter must get NaN statistics"
    assert torch.isinf(s.max_abs[3]) and torch.isinf(s.l1[3])
    finite = torch.tensor([0, 2, 4])
    want = reference.filter_stats(x[finite])
    for g, w in zip(s, want, strict=True):
        torch.testing.assert_close(g[finite.to(g.device)], w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", backend_params())
def test_opcheck(device, backend):
    require_backend(device, backend, "filter_stats")
    if backend == "reference":
        pytest.skip("the reference is plain PyTorch, not an operator")
    op = (
        torch.ops.craft_ext.filter_stats_triton.default
        if backend == "triton"
        else torch.ops.craft_ext.filter_stats.default
    )
    utils = OPCHECK_TESTS
    if backend == "triton" and device == "cpu":
        # The interpreter reads data pointers of functional tensors under AOT dispatch; that
        # test runs on GPU.
        utils = utils[:3]
    for shape, dtype in [((7, 3, 3, 3), torch.float32), ((4, 9), torch.bfloat16)]:
        x = _weight(shape, dtype, device, seed=7)
        torch.library.opcheck(op, (x,), test_utils=utils)


@pytest.mark.parametrize("device,backend", backend_params())
def test_compile_fullgraph(device, backend):
    require_backend(device, backend, "filter_stats")
    if backend == "triton" and device == "cpu":
        pytest.skip("Triton under torch.compile needs a GPU (the interpreter cannot be traced)")
    x = _weight((16, 3, 3, 3), torch.float32, device, seed=8)
    fn = torch.compile(lambda w: craft_ext.filter_stats(w, backend=backend), fullgraph=True)
    for g, w in zip(fn(x), reference.filter_stats(x), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="weight must have at least 2 dims"):
        craft_ext.filter_stats(torch.randn(5))
    with pytest.raises(ValueError, match="at least one filter"):
        craft_ext.filter_stats(torch.randn(0, 3))
    with pytest.raises(ValueError, match="at least one filter"):
        craft_ext.filter_stats(torch.randn(4, 0))
    with pytest.raises(TypeError, match="weight must be float32"):
        craft_ext.filter_stats(torch.ones(4, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        craft_ext.filter_stats([[1.0, 2.0]])
    with pytest.raises(ValueError, match="backend must be one of"):
        craft_ext.filter_stats(torch.randn(4, 3), backend="fortran")


# ---------------------------------------------------------------------------------------------
# Folded statistics: the BatchNorm after the layer folded in (BN-aware channels)
# ---------------------------------------------------------------------------------------------


def _bn(n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(n)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(n, generator=g))
        bn.weight[0] = 1e-4  # a channel dead through BN
        bn.running_var.copy_(torch.rand(n, generator=g) * 2 + 1e-3)
    return bn.to(dtype).to(device)


def _folded_truth(x: torch.Tensor, bn: torch.nn.BatchNorm2d) -> tuple[torch.Tensor, ...]:
    """Float64 statistics of the folded filters w_i * gamma_i / sqrt(var_i + eps)."""
    s = bn.weight.double().cpu() / torch.sqrt(bn.running_var.double().cpu() + bn.eps)
    return _truth(x.cpu().double() * s.view(-1, *[1] * (x.dim() - 1)))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 3, 3), (7, 5), (64, 3, 3, 3), (129, 8, 3, 3)], ids=str)
def test_folded_matches_reference_and_float64(device, backend, dtype, shape):
    require_backend(device, backend, "filter_stats")
    x = _weight(shape, dtype, device, seed=sum(shape))
    bn = _bn(shape[0], dtype, device, seed=shape[0])
    got = craft_ext.filter_stats(x, bn=bn, backend=backend)
    want = reference.filter_stats(x, bn.weight, bn.running_var, bn.eps)
    # the fold is one float32 product per filter after the same float32 statistics: max_abs
    # is exact wherever the raw max_abs is (the backends' l1 / mean / std round like theirs)
    raw = craft_ext.filter_stats(x, backend=backend)
    s = reference.folded_scale(bn.weight, bn.running_var, bn.eps)
    assert torch.equal(got.max_abs, raw.max_abs * s.abs())
    torch.testing.assert_close(got.max_abs, want[0], rtol=0, atol=0)
    # against float64: within 2x what folding with torch in the input's precision gets
    truth = _folded_truth(x, bn)
    s_col = s.detach().cpu().view(-1, *[1] * (x.dim() - 1))
    torch_est = _same_precision_torch((x.cpu().float() * s_col).to(x.dtype))
    if x.dtype == torch.float64:
        torch_est = _same_precision_torch(x.cpu() * s_col.double())
    for name, g, t, e in zip(got._fields, got, truth, torch_est, strict=True):
        err = (g.cpu().double() - t).abs().max().item()
        torch_err = (e.double() - t).abs().max().item()
        floor = 4 * F32_EPS * t.abs().max().item() + 1e-30
        assert err <= 2 * torch_err + floor, f"{name}: {err:.3g} > 2 x {torch_err:.3g} + floor"


@pytest.mark.parametrize("device,backend", backend_params())
def test_folded_non_finite_bn_gives_nan(device, backend):
    """A channel whose gamma or running var is NaN / Inf has NaN folded statistics: neither
    dead nor alive (a var of Inf would otherwise fold the filter to 0)."""
    require_backend(device, backend, "filter_stats")
    x = _weight((6, 3, 3, 3), torch.float32, device, seed=9)
    bn = _bn(6, torch.float32, device)
    with torch.no_grad():
        bn.weight[1] = float("nan")
        bn.weight[2] = float("inf")
        bn.running_var[3] = float("inf")
        bn.running_var[4] = -1.0  # var + eps < 0
    got = craft_ext.filter_stats(x, bn=bn, backend=backend)
    for field in got:
        assert field[1:5].isnan().all()
        assert not field[[0, 5]].isnan().any()


@pytest.mark.parametrize("device,backend", backend_params())
def test_folded_opcheck(device, backend):
    require_backend(device, backend, "filter_stats")
    if backend == "reference":
        pytest.skip("the reference is plain PyTorch, not an operator")
    op = (
        torch.ops.craft_ext.filter_stats_triton.default
        if backend == "triton"
        else torch.ops.craft_ext.filter_stats.default
    )
    utils = OPCHECK_TESTS[:3] if backend == "triton" and device == "cpu" else OPCHECK_TESTS
    x = _weight((7, 3, 3, 3), torch.float32, device, seed=10)
    bn = _bn(7, torch.float32, device)
    for gamma in (bn.weight.detach(), None):
        args = (x, gamma, bn.running_var, 1e-5)
        torch.library.opcheck(op, args, test_utils=utils)


def test_folded_bad_bn():
    x = torch.randn(8, 3, 3, 3)
    with pytest.raises(ValueError, match="bn: .* has 6 channels"):
        craft_ext.filter_stats(x, bn=torch.nn.BatchNorm2d(6))
    with pytest.raises(TypeError, match="expected a BatchNorm module"):
        craft_ext.filter_stats(x, bn=torch.nn.GroupNorm(2, 8))
    with pytest.raises(ValueError, match="no running statistics"):
        craft_ext.filter_stats(x, bn=torch.nn.BatchNorm2d(8, track_running_stats=False))
    frozen = torch.nn.BatchNorm2d(8).requires_grad_(False)  # statistics of a frozen BN: fine
    assert craft_ext.filter_stats(x, bn=frozen).max_abs.shape == (8,)
