"""craft_ext.feature_map_stats: every backend against float64 truth (Diba & Khosravi, IASC 2023)."""

from __future__ import annotations

import pytest
import torch
from helpers import CUDA, OPCHECK_TESTS, backend_params, require_backend

import craft_ext
from craft_ext import reference

CORR_TOL = 2e-4


def _truth(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 sums [B, C] and Pearson correlations [B, C, C] (constant maps: 0, diagonal 1)."""
    b, c = x.shape[:2]
    r = x.detach().cpu().double().reshape(b, c, -1)
    d = r - r.mean(dim=2, keepdim=True)
    g = d @ d.transpose(1, 2)
    norm = g.diagonal(dim1=1, dim2=2).sqrt()
    corr = g / (norm[:, :, None] * norm[:, None, :])
    const = r.amax(2) == r.amin(2)
    corr = torch.where(const[:, :, None] | const[:, None, :], 0.0, corr)
    corr = torch.where(torch.eye(c, dtype=torch.bool), 1.0, corr)
    return r.sum(dim=2), corr


def _maps(shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    return x.to(dtype).to(device)


def _check(got: craft_ext.FeatureMapStats, x: torch.Tensor, sthr: float, cthr: float) -> None:
    b, c = x.shape[:2]
    total, corr = _truth(x)
    assert got.sum.dtype == torch.float32 and got.sum.shape == (b, c)
    assert got.empty.dtype == torch.bool and got.empty.shape == (b, c)
    assert got.redundant.dtype == torch.bool and got.redundant.shape == (b, c)
    assert got.corr is not None and got.corr.shape == (b, c, c)
    scale = x.detach().cpu().double().abs().reshape(b, c, -1).sum(2)
    sum_err = ((got.sum.cpu().double() - total).abs() / (scale + 1e-30)).max().item()
    assert sum_err <= 1e-5, f"relative sum error {sum_err:.3g}"
    corr_err = (got.corr.cpu().double() - corr).abs().max().item()
    assert corr_err <= CORR_TOL, f"corr error {corr_err:.3g}"
    # flags from the float64 truth, away from the thresholds (the test data keep clear of them)
    torch.testing.assert_close(got.empty.cpu(), total.abs() <= sthr)
    lower = torch.ones(c, c, dtype=torch.bool).tril(-1)
    torch.testing.assert_close(got.redundant.cpu(), ((corr >= cthr) & lower).any(2))


def _with_structure(x: torch.Tensor) -> torch.Tensor:
    """Plant an empty map, a constant map, a duplicate (scaled + shifted) and an anti-copy."""
    x = x.clone()
    c = x.shape[1]
    x[0, 0] = 0.0  # empty and constant
    if c > 3:
        x[0, 2] = x[0, 1] * 3 + 7  # redundant with map 1
        x[-1, 3] = -x[-1, 0]  # anti-correlated: not redundant
        x[-1, 1] = 4.0  # constant, non-empty
    return x


SHAPES = [
    (1, 1, 1, 1),
    (2, 5, 3, 4),
    (3, 17, 7, 7),
    (2, 40, 9, 11),
    (2, 70, 5, 6),
    (1, 3, 5, 5),
    (2, 130, 2, 3),
]


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_truth(device, backend, shape):
    require_backend(device, backend, "feature_map_stats")
    x = _with_structure(_maps(shape, device=device, seed=sum(shape)))
    got = craft_ext.feature_map_stats(x, return_corr=True, backend=backend)
    _check(got, x, 0.02, 0.95)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dtypes(device, backend, dtype):
    require_backend(device, backend, "feature_map_stats")
    x = _with_structure(_maps((2, 9, 6, 5), dtype=dtype, device=device, seed=1))
    _check(craft_ext.feature_map_stats(x, return_corr=True, backend=backend), x, 0.02, 0.95)


@pytest.mark.parametrize("device,backend", backend_params())
def test_large_means_are_accurate(device, backend):
    """Correlations must come from centred maps, not from cancelling raw moments."""
    require_backend(device, backend, "feature_map_stats")
    x = _maps((2, 12, 16, 16), device=device, seed=2, scale=1.0, offset=1000.0)
    x[:, 5] = x[:, 4] * 0.5 + 0.2 * _maps((2, 16, 16), device=device, seed=3)
    _check(craft_ext.feature_map_stats(x, return_corr=True, backend=backend), x, 0.02, 0.95)


def _naive_corr(x: torch.Tensor) -> torch.Tensor:
    """float32 correlations from raw moments, G = sum x x^T - n m m^T: what a one-pass kernel
    without a shift would compute."""
    b, c = x.shape[:2]
    r = x.detach().cpu().float().reshape(b, c, -1)
    m = r.mean(dim=2)
    g = r @ r.transpose(1, 2) - r.shape[2] * m[:, :, None] * m[:, None, :]
    d = g.diagonal(dim1=1, dim2=2).clamp_min(1e-30).sqrt()
    return (g / (d[:, :, None] * d[:, None, :])).double()


@pytest.mark.parametrize("device,backend", backend_params())
def test_large_common_offset_one_pass(device, backend):
    """Maps with mean 1e3 and std 1 read in one pass: a naive uncentred Gram loses the
    correlations (checked here), the pivot-shifted one keeps them within CORR_TOL. 70 maps
    make two Gram tiles (the tile above the diagonal is read mirrored: map 66 copies map 3,
    across tiles), 16x16 maps several position splits; map 7 has an outlier at its middle
    position (where the Triton kernel takes a pivot sample)."""
    require_backend(device, backend, "feature_map_stats")
    x = _maps((2, 70, 16, 16), seed=21, offset=1000.0)
    x[:, 5] = 0.5 * x[:, 4] + 0.1 * _maps((2, 16, 16), seed=22) + 500.0
    x[:, 66] = x[:, 3] - 3.0
    x[:, 7, 8, 8] += 60.0  # the middle element (position n // 2) of map 7
    x = x.to(device)
    _, truth = _truth(x)
    naive_err = (_naive_corr(x) - truth).abs().max().item()
    assert naive_err > 50 * CORR_TOL, f"naive Gram error {naive_err:.3g}: the test is too easy"
    got = craft_ext.feature_map_stats(x, return_corr=True, backend=backend)
    _check(got, x, 0.02, 0.95)
    assert got.redundant[:, 5].all() and got.redundant[:, 66].all()


@pytest.mark.parametrize("device,backend", backend_params())
def test_face_sized_maps_with_large_means(device, backend):
    """112x112 maps (the paper's first layers) with mean 500 and unit spread."""
    require_backend(device, backend, "feature_map_stats")
    x = _maps((1, 6, 112, 112), device=device, seed=9, offset=500.0)
    x[:, 3] = 0.8 * x[:, 1] + 0.1 * x[:, 3]
    _check(craft_ext.feature_map_stats(x, return_corr=True, backend=backend), x, 0.02, 0.95)


@pytest.mark.parametrize("device,backend", backend_params())
def test_constant_maps(device, backend):
    require_backend(device, backend, "feature_map_stats")
    x = torch.full((2, 4, 3, 3), 2.5, device=device)
    x[1, 2] = _maps((3, 3), device=device, seed=4)
    got = craft_ext.feature_map_stats(x, return_corr=True, backend=backend)
    want = torch.eye(4).expand(2, 4, 4)
    torch.testing.assert_close(got.corr.cpu(), want)
    assert not got.redundant.any(), "constant maps are never correlated"
    torch.testing.assert_close(got.sum.cpu(), x.cpu().double().sum((2, 3)).float())


@pytest.mark.parametrize("device,backend", backend_params())
def test_nan_maps_match_the_reference(device, backend):
    """A map holding NaN (not at its first element, and a constant map with one NaN) is not
    constant and gets NaN correlations with every other map, as in the reference (amin / amax
    and clamp propagate NaN); the other maps' statistics are unaffected."""
    require_backend(device, backend, "feature_map_stats")
    x = _maps((2, 6, 5, 5), device=device, seed=7)
    x[0, 1, 2, 3] = float("nan")
    x[1, 4] = 1.5
    x[1, 4, 4, 4] = float("nan")
    got = craft_ext.feature_map_stats(
        x, sum_threshold=0.7, corr_threshold=0.95, return_corr=True, backend=backend
    )
    want = reference.feature_map_stats(x, 0.7, 0.95, True)
    for name, g, w in zip(("sum", "corr", "empty", "redundant"), got, want, strict=True):
        torch.testing.assert_close(
            g.cpu(), w.cpu(), rtol=1e-5, atol=CORR_TOL, equal_nan=True, msg=name
        )
    assert got.corr[0, 1].isnan().sum() == 5 and got.corr[1, 4].isnan().sum() == 5


@pytest.mark.parametrize("device,backend", backend_params())
def test_thresholds_and_no_corr(device, backend):
    require_backend(device, backend, "feature_map_stats")
    x = _with_structure(_maps((2, 8, 5, 5), device=device, seed=5))
    got = craft_ext.feature_map_stats(
        x, sum_threshold=3.0, corr_threshold=0.3, return_corr=False, backend=backend
    )
    assert got.corr is None
    full = reference.feature_map_stats(x, 3.0, 0.3, True)
    total, corr = _truth(x)
    torch.testing.assert_close(got.empty.cpu(), total.abs() <= 3.0)
    lower = torch.ones(8, 8, dtype=torch.bool).tril(-1)
    torch.testing.assert_close(got.redundant.cpu(), ((corr >= 0.3) & lower).any(2))
    torch.testing.assert_close(got.sum, full[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("layout", ["channels_last", "channel_slice", "transposed"], ids=str)
def test_layouts(device, backend, layout):
    require_backend(device, backend, "feature_map_stats")
    base = _maps((3, 10, 6, 7), device=device, seed=6)
    x = {
        "channels_last": base.to(memory_format=torch.channels_last),
        "channel_slice": base[:, 2:8],
        "transposed": base.transpose(2, 3),
    }[layout]
    _check(craft_ext.feature_map_stats(x, return_corr=True, backend=backend), x, 0.02, 0.95)


def test_triton_reads_the_maps_once(monkeypatch):
    """One Triton launch reads the input (the Gram, sums, min and max in one pass: the op is
    bound by that read), over the tile pairs on and below the diagonal only (3 channel tiles:
    6 of the 9 pairs)."""
    require_backend("cuda" if CUDA else "cpu", "triton", "feature_map_stats")
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    device = "cuda" if CUDA else "cpu"
    x = _maps((2, 130, 3, 3), device=device, seed=23)
    reads = []
    for cls in (InterpretedFunction, JITFunction):
        real = cls.run

        def run(self, *args, grid, warmup, _real=real, **kwargs):
            storage = x.untyped_storage().data_ptr()
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if any(t.untyped_storage().data_ptr() == storage for t in tensors):
                reads.append((self.fn.__name__, tuple(grid)))
            return _real(self, *args, grid=grid, warmup=warmup, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    got = craft_ext.feature_map_stats(x, return_corr=True, backend="triton")
    assert len(reads) == 1, f"kernels reading the input: {reads}"
    pairs, tiles = reads[0][1][0] // x.shape[0], 3
    assert pairs == tiles * (tiles + 1) // 2, f"grid {reads[0][1]}: not one triangle of tiles"
    _check(got, x, 0.02, 0.95)


@pytest.mark.parametrize("device,backend", backend_params())
def test_opcheck(device, backend):
    require_backend(device, backend, "feature_map_stats")
    if backend == "reference":
        pytest.skip("the reference is plain PyTorch, not an operator")
    op = (
        torch.ops.craft_ext.feature_map_stats_triton.default
        if backend == "triton"
        else torch.ops.craft_ext.feature_map_stats.default
    )
    utils = OPCHECK_TESTS
    if backend == "triton" and device == "cpu":
        utils = utils[:3]  # the interpreter cannot run under AOT dispatch (see filter_stats)
    for return_corr in (True, False):
        x = _maps((2, 5, 4, 3), device=device, seed=7)
        torch.library.opcheck(op, (x, 0.02, 0.9, return_corr), test_utils=utils)


@pytest.mark.parametrize("device,backend", backend_params())
def test_compile_fullgraph(device, backend):
    require_backend(device, backend, "feature_map_stats")
    if backend == "triton" and device == "cpu":
        pytest.skip("Triton under torch.compile needs a GPU (the interpreter cannot be traced)")
    x = _with_structure(_maps((2, 6, 5, 5), device=device, seed=8))

    def fn(t):
        return craft_ext.feature_map_stats(t, return_corr=True, backend=backend)

    got = torch.compile(fn, fullgraph=True)(x)
    want = reference.feature_map_stats(x, 0.02, 0.95, True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_auto_backend_without_cuda_kernel():
    """There is no CUDA C++ kernel for this op: auto on CUDA must go to Triton or reference."""
    assert "cuda" not in craft_ext.available_backends("cuda", "feature_map_stats")
    assert craft_ext.resolve_backend(torch.device("cuda"), "feature_map_stats") in (
        "triton",
        "reference",
    )
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run feature_map_stats"):
        craft_ext.feature_map_stats(torch.randn(1, 2, 3, 3), backend="cuda")


def test_bad_input_errors():
    with pytest.raises(TypeError, match="fmap must be a torch.Tensor"):
        craft_ext.feature_map_stats([[1.0]])
    with pytest.raises(ValueError, match=r"fmap must have 4 dims \[B, C, H, W\]"):
        craft_ext.feature_map_stats(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="must not be empty"):
        craft_ext.feature_map_stats(torch.randn(2, 0, 4, 4))
    with pytest.raises(TypeError, match="fmap must be float32"):
        craft_ext.feature_map_stats(torch.ones(1, 2, 3, 3, dtype=torch.int64))
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="sum_threshold must be in"):
        craft_ext.feature_map_stats(x, sum_threshold=-1.0)
    with pytest.raises(ValueError, match="corr_threshold must be in"):
        craft_ext.feature_map_stats(x, corr_threshold=1.5)
    with pytest.raises(ValueError, match="corr_threshold must be in"):
        craft_ext.feature_map_stats(x, corr_threshold=float("nan"))
    with pytest.raises(TypeError, match="corr_threshold must be a float"):
        craft_ext.feature_map_stats(x, corr_threshold="0.9")
    with pytest.raises(TypeError, match="return_corr must be a bool"):
        craft_ext.feature_map_stats(x, return_corr=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        craft_ext.feature_map_stats(x, backend="fortran")
