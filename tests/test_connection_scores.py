"""craft_ext.sparsify.connection_scores and its backends: scores against a float64
unfold/corrcoef reference, the pure-PyTorch reference operator
(:func:`craft_ext.reference.connection_scores`), the Triton kernel under the interpreter, backend
selection and input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import OPCHECK_TESTS, require_backend
from torch import nn

import craft_ext
from craft_ext import reference
from craft_ext import sparsify as sp


def corr_with_zero_constants(z: torch.Tensor) -> torch.Tensor:
    """float64 Pearson matrix of the rows of ``z`` (variables x samples); constant rows -> 0."""
    z = z.double()
    c = torch.corrcoef(z)
    const = (z == z[:, :1]).all(1)
    c[const, :] = 0.0
    c[:, const] = 0.0
    return c


def reference_linear(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    y = y.reshape(-1, y.shape[-1])
    o = y.shape[1]
    return corr_with_zero_constants(torch.cat([y, x], 1).T)[:o, o:]


def reference_conv(mod: nn.Conv2d, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 2 through the full float64 im2col (F.unfold) and corrcoef per output position."""
    pad = mod._reversed_padding_repeated_twice
    b = F.unfold(F.pad(x.double(), pad), mod.kernel_size, mod.dilation, 0, mod.stride)
    a = y.double().reshape(y.shape[0], y.shape[1], -1)
    o = a.shape[1]
    assert b.shape[2] == a.shape[2]
    out = torch.zeros(o, b.shape[1], dtype=torch.float64)
    for m in range(a.shape[2]):
        out += corr_with_zero_constants(torch.cat([a[:, :, m], b[:, :, m]], 1).T)[:o, o:].abs()
    return out.reshape(mod.weight.shape)


def conv_case(cin, cout, kernel, stride, padding, dilation, n=6, hw=(7, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    mod = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn((n, cin, *hw), generator=g, dtype=torch.float64)
    x[:, 0, 1, :] = 0.25  # a row constant over samples
    with torch.no_grad():
        y = F.conv2d(
            x, mod.weight.double(), mod.bias.double(), mod.stride, mod.padding, mod.dilation
        )
    return mod, x, y


CONV_CASES = [
    (3, 5, 3, 1, 1, 1),
    (2, 3, (3, 2), (2, 1), (1, 2), (1, 2)),
    (3, 4, 1, 2, 0, 1),
    (1, 2, (2, 3), (1, 3), (0, 1), (2, 1)),
    (2, 3, 3, 1, "same", 2),
]


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_scores_match_unfold_reference(case):
    mod, x, y = conv_case(*case)
    want = reference_conv(mod, x, y)
    got = sp.connection_scores(mod, x, y, backend="reference")
    assert got.shape == mod.weight.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # tiny chunks (one output row at a time) give the same answer
    chunked = sp.connection_scores(mod, x, y, backend="reference", chunk_elements=1)
    torch.testing.assert_close(chunked, want, rtol=0, atol=1e-10)
    # float32 activations: float32 result within float32 accuracy
    got32 = sp.connection_scores(mod, (x.float(),), (y.float(),), backend="reference")
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=0, atol=2e-5 * y[0, 0].numel())


def test_conv_scores_large_mean_and_padding_only_taps():
    mod, x, y = conv_case(2, 3, 3, 1, 2, 2, n=9, hw=(5, 5))
    x = x + 1e3  # large means: centring keeps the float32 path accurate
    y = y + 1e3
    want = reference_conv(mod, x, y)
    got = sp.connection_scores(mod, x.float(), y.float(), backend="reference")
    torch.testing.assert_close(got.double(), want, rtol=0, atol=5e-3)


def test_linear_scores_match_corrcoef():
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(7, 5).double()
    x = torch.randn(4, 3, 7, generator=g, dtype=torch.float64)  # leading dims are samples
    x[..., 2] = -3.0  # constant input neuron
    with torch.no_grad():
        y = lin(x)
        y[..., 4] = 0.5  # dead output neuron
    want = reference_linear(x, y)
    x_before, y_before = x.clone(), y.clone()
    got = sp.connection_scores(lin, x, y)
    assert torch.equal(x, x_before) and torch.equal(y, y_before)  # inputs untouched
    assert got.shape == lin.weight.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert (got[:, 2] == 0).all() and (got[4] == 0).all()
    assert (got < 0).any() and (got > 0).any()  # signed for Linear
    got32 = sp.connection_scores(lin, x.float(), y.float())
    torch.testing.assert_close(got32.double(), want, rtol=0, atol=1e-5)


def _require_triton():
    require_backend("cpu", "triton", "connection_scores")


@pytest.mark.parametrize("case", CONV_CASES[:3], ids=str)
def test_triton_kernel_matches_reference(case):
    _require_triton()
    mod, x, y = conv_case(*case, n=5, hw=(5, 4))
    want = reference_conv(mod, x, y)
    # non-contiguous float32 input (channels_last) exercises the strides
    xs = x.float().contiguous(memory_format=torch.channels_last)
    got = sp.connection_scores(mod, xs, y.float(), backend="triton")
    assert got.dtype == torch.float32 and got.shape == mod.weight.shape
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * y[0, 0].numel())


def test_triton_kernel_position_splits():
    _require_triton()
    mod, x, y = conv_case(2, 3, 3, 2, 1, 1, n=4, hw=(6, 5))
    op = torch.ops.craft_ext.connection_scores_triton
    whole = op(x.float(), y.float(), 3, 3, 2, 2, 1, 1, 1, 1, True)
    for splits in (2, 5, 100):  # 100 > Ho*Wo: clamped to one position per range
        parts = op(x.float(), y.float(), 3, 3, 2, 2, 1, 1, 1, 1, True, splits)
        torch.testing.assert_close(parts, whole, rtol=0, atol=1e-5)
    want = reference_conv(mod, x, y).reshape(3, -1)
    torch.testing.assert_close(whole.double(), want, rtol=0, atol=1e-4)


def test_triton_kernel_linear_and_float64():
    _require_triton()
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(18, 17).double()
    x = torch.randn(20, 18, generator=g, dtype=torch.float64)  # spans two sample blocks
    x[:, 5] = 2.0
    with torch.no_grad():
        y = lin(x)
    got = sp.connection_scores(lin, x, y, backend="triton")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference_linear(x, y), rtol=0, atol=1e-5)
    assert (got[:, 5] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_half_precision_activations(dtype, backend):
    if backend == "triton":
        _require_triton()
    mod, x, y = conv_case(2, 3, 3, 1, 1, 1, n=5, hw=(4, 4))
    x, y = x.to(dtype), y.to(dtype)
    got = sp.connection_scores(mod, x, y, backend=backend)
    assert got.dtype == torch.float32
    want = reference_conv(mod, x, y)  # float64 of the rounded activations
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)


def test_triton_op_fake_and_schema():
    _require_triton()
    x = torch.randn(3, 2, 4, 4)
    y = torch.randn(3, 3, 2, 2)
    op = torch.ops.craft_ext.connection_scores_triton.default
    args = (x, y, 3, 3, 1, 1, 0, 0, 1, 1, True)
    torch.library.opcheck(op, args, test_utils=[t for t in OPCHECK_TESTS if "aot" not in t])
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        out = op(mode.from_tensor(x), mode.from_tensor(y), 3, 3, 1, 1, 0, 0, 1, 1, True)
    assert out.shape == (3, 18) and out.dtype == torch.float32


def test_score_errors():
    conv = nn.Conv2d(2, 3, 3)
    x = torch.randn(4, 2, 5, 5)
    y = conv(x).detach()
    with pytest.raises(TypeError, match="nn.Linear or nn.Conv2d"):
        sp.connection_scores(nn.Conv1d(2, 3, 3), x, y)
    with pytest.raises(ValueError, match="inputs must be"):
        sp.connection_scores(conv, x[0], y)  # wrong rank
    with pytest.raises(ValueError, match="inputs must be"):
        sp.connection_scores(conv, x[:, :1], y)  # wrong channels
    with pytest.raises(ValueError, match="outputs must be"):
        sp.connection_scores(conv, x, y[:, :, :2])
    with pytest.raises(ValueError, match="outputs must be"):
        sp.connection_scores(conv, x, y[:3])
    with pytest.raises(ValueError, match="groups=1"):
        grouped = nn.Conv2d(2, 4, 3, groups=2)
        sp.connection_scores(grouped, x, grouped(x).detach())
    with pytest.raises(ValueError, match="padding_mode"):
        sp.connection_scores(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), x, y)
    with pytest.raises(ValueError, match="at least 2 samples"):
        sp.connection_scores(conv, x[:1], y[:1])
    with pytest.raises(TypeError, match="float"):
        sp.connection_scores(conv, x.long(), y)
    lin = nn.Linear(5, 3)
    with pytest.raises(ValueError, match="Linear inputs"):
        sp.connection_scores(lin, torch.randn(5), torch.randn(3))
    with pytest.raises(ValueError, match="Linear outputs"):
        sp.connection_scores(lin, torch.randn(4, 5), torch.randn(3, 3))
    with pytest.raises(ValueError, match="chunk_elements"):
        sp.connection_scores(conv, x, y, chunk_elements=0)


# --------------------------------------------------------------------------------------------
# The reference operator, backend selection
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_reference_op_bands(case):
    """craft_ext.reference.connection_scores takes the Triton op's arguments; every number of
    row bands gives the unfold reference."""
    mod, x, y = conv_case(*case)
    want = reference_conv(mod, x, y).reshape(mod.out_channels, -1)
    geometry = sp._check_pair(mod, x, y)
    ho = y.shape[2]
    for splits in (0, 1, 2, ho, ho + 3):
        got = reference.connection_scores(x, y, *geometry, True, splits)
        assert got.dtype == torch.float64 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    got32 = reference.connection_scores(x.float(), y.float(), *geometry, True)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=0, atol=1e-4)


def test_backend_selection(monkeypatch):
    mod, x, y = conv_case(2, 3, 3, 1, 1, 1, n=4, hw=(3, 3))
    want = reference_conv(mod, x, y)
    # no compiled kernel for this op: an explicit "cpp" / "cuda" raises instead of being ignored
    for name in ("cpp", "cuda"):
        with craft_ext.use_backend(name), pytest.raises(RuntimeError, match="no compiled"):
            sp.connection_scores(mod, x, y)
        with pytest.raises(RuntimeError, match="connection_scores has no compiled"):
            sp.connection_scores(mod, x, y, backend=name)
    with pytest.raises(ValueError, match="backend must be one of"):
        sp.connection_scores(mod, x, y, backend="fast")
    # auto and "reference" on CPU run the reference operator (never interpreted Triton)
    calls = []
    real = reference.connection_scores

    def spy(*args):
        calls.append(len(args))
        return real(*args)

    monkeypatch.setattr(reference, "connection_scores", spy)
    torch.testing.assert_close(sp.connection_scores(mod, x, y), want, rtol=0, atol=1e-10)
    with craft_ext.use_backend("reference"):
        sp.connection_scores(mod, x, y)
    assert calls == [12, 12]


def test_explicit_triton_choice_is_honoured_on_cpu(monkeypatch):
    """An explicit Triton choice (argument, use_backend, $CRAFT_EXT_BACKEND) runs the Triton op on
    CPU (interpreter); the argument and use_backend beat the environment."""
    _require_triton()
    mod, x, y = conv_case(2, 3, 3, 1, 1, 1, n=4, hw=(3, 3))
    want = reference_conv(mod, x, y)
    calls = []
    real = reference.connection_scores

    def spy(*args):
        calls.append(len(args))
        return real(*args)

    monkeypatch.setattr(reference, "connection_scores", spy)
    x32, y32 = x.float(), y.float()
    for requested in ("argument", "use_backend", "environment"):
        calls.clear()
        if requested == "argument":
            got = sp.connection_scores(mod, x32, y32, backend="triton")
        elif requested == "use_backend":
            with craft_ext.use_backend("triton"):
                got = sp.connection_scores(mod, x32, y32)
        else:
            monkeypatch.setattr(craft_ext.ops, "_ENV_BACKEND", "triton")
            got = sp.connection_scores(mod, x32, y32)
        assert not calls, requested
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)
    # the argument and use_backend beat the environment
    sp.connection_scores(mod, x32, y32, backend="reference")
    with craft_ext.use_backend("reference"):
        sp.connection_scores(mod, x32, y32)
    assert calls == [12, 12]
