"""The CUDA kernels (csrc/cuda) against the reference, without host syncs and in CUDA graphs.

The tests marked ``cuda`` need a GPU and an extension built with CUDA; they skip otherwise.
The ``test_emulated_*`` tests need no GPU: they compile csrc/cuda/*.cu, torch glue included, for
CPU tensors with the kernels running under a host emulation of CUDA threads
(csrc/cuda/emulation/), and check the result against the reference. Each GPU test runs
under ``torch.cuda.set_sync_debug_mode("error")``, so any device-to-host synchronisation in the
CUDA backend raises. Shapes cover both kernel configurations of filter_stats (one warp per
filter for K <= 1024, one block per filter above), vectorised and scalar loads (K not a
multiple of the vector width, misaligned storage) and the layouts handled by the row view.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
from collections.abc import Iterator, Sequence

import pytest
import torch
from helpers import CUDA, REPO

import craft_ext
from craft_ext import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (N, K): K = 1, odd, one vector, warp path limit, just past it, a 512-channel 3x3 conv
SHAPES = [(3, 1), (9, 27), (5, 8), (17, 1024), (6, 1025), (40, 4608)]
THR = 1e-3
FIELDS = ("inactive", "reactivated", "donor", "count")
LAYOUTS = ("channels_last", "row_slice", "transposed", "channel_slice")


@pytest.fixture(autouse=True)
def _needs_cuda_backend(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("cuda") is None:
        return  # runs on CPU
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    if "cuda" not in craft_ext.available_backends("cuda", "reactivate_"):
        pytest.skip(f"extension not built with CUDA ({craft_ext.extension_error()})")


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Make any CUDA synchronisation with the host an error inside the block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def weight(
    shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0, n_inactive: int = 0
) -> torch.Tensor:
    """Random [N, ...] CUDA weight; ``n_inactive`` filters (even rows first, then odd) tiny."""
    g = torch.Generator().manual_seed(seed)
    n = shape[0]
    w = torch.randn(shape, generator=g, dtype=torch.float64) * 0.1
    rows = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)])[:n_inactive]
    w[rows] *= 1e-3
    return w.to(dtype).cuda()


def layout_view(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` [N, C, kh, kw] in one of :data:`LAYOUTS` (all but channels_last share storage)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return t.transpose(2, 3)
    if layout == "row_slice":
        return t[::2]
    return t[:, 1:5]  # channel_slice: filters are not dense blocks (the kernels copy)


def draws(
    w: torch.Tensor, method: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The random inputs of reactivate_ (order_key, fallback_u, noise) on w's device."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = w.shape[0]
    key = torch.rand(n, generator=g, device="cuda")
    u = torch.rand(n, generator=g, device="cuda")
    noise = None if method == "craft" else torch.randn(w.shape, generator=g, device="cuda")
    return key, u, noise


def assert_stats_close(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> None:
    rtol = 1e-5  # the kernel sums in double, the reference in float32
    for name, g, e in zip(("max_abs", "l1", "mean", "std"), got, want, strict=True):
        assert g.dtype == torch.float32 and g.device == e.device, name
        torch.testing.assert_close(g, e, rtol=rtol, atol=1e-6, equal_nan=True, msg=name)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)  # max is exact


# ---------------------------------------------------------------------------------------------
# filter_stats
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_filter_stats_matches_reference_without_sync(shape, dtype):
    w = weight(shape, dtype, seed=shape[1])
    with no_host_sync():
        got = torch.ops.craft_ext.filter_stats.default(w)
    assert_stats_close(got, reference.filter_stats(w))


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_filter_stats_layouts_and_misaligned_storage(layout):
    base = weight((24, 8, 3, 3), seed=1)
    x = layout_view(base, layout)
    with no_host_sync():
        got = torch.ops.craft_ext.filter_stats.default(x)
    assert_stats_close(got, reference.filter_stats(x.contiguous()))
    # storage offset of one element: the rows are no longer 16-byte aligned (scalar loads)
    flat = torch.empty(24 * 72 + 1, device="cuda")
    odd = flat[1:].view(24, 8, 3, 3).copy_(base)
    with no_host_sync():
        got = torch.ops.craft_ext.filter_stats.default(odd)
    assert_stats_close(got, reference.filter_stats(base))


@pytest.mark.cuda
@pytest.mark.parametrize("k", [27, 4608])
def test_filter_stats_nan_inf_and_large_offset(k):
    w = weight((6, k), seed=2)
    w[1, k // 2] = float("nan")
    w[3, k - 1] = float("inf")
    w[4] = w[4] * 1e-3 + 100.0  # std must not come from cancelling sums of squares
    with no_host_sync():
        s = torch.ops.craft_ext.filter_stats.default(w)
    assert all(torch.isnan(f[1]) for f in s)
    assert torch.isinf(s[0][3]) and torch.isinf(s[1][3])
    keep = torch.tensor([0, 2, 4, 5], device="cuda")
    want = reference.filter_stats(w[keep].double())
    for g, e in zip(s, want, strict=True):
        torch.testing.assert_close(g[keep], e, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_filter_stats_in_cuda_graph():
    w = weight((64, 16, 3, 3), seed=3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.craft_ext.filter_stats.default(w)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.craft_ext.filter_stats.default(w)
    for seed in (4, 5):
        w.copy_(weight(w.shape, seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        assert_stats_close(out, reference.filter_stats(w))


# ---------------------------------------------------------------------------------------------
# reactivate_
# ---------------------------------------------------------------------------------------------


def check_against_reference(
    w: torch.Tensor,
    used: torch.Tensor,
    method: str,
    seed: int = 0,
    exact_weights: bool | None = None,
) -> tuple[torch.Tensor, ...]:
    """Run the CUDA op (no host sync allowed) and the reference on copies; compare all."""
    key, u, noise = draws(w, method, seed)
    w_ref, used_ref = w.clone(), used.clone()
    with no_host_sync():
        got = torch.ops.craft_ext.reactivate_.default(w, used, key, u, noise, THR, method)
    want = reference.reactivate_(w_ref, used_ref, key, u, noise, THR, method)
    for name, g, e in zip(FIELDS, got, want, strict=True):
        assert g.device == e.device and g.dtype == e.dtype, name
        assert torch.equal(g, e), f"{name} differs from the reference"
    assert torch.equal(used, used_ref)
    if exact_weights if exact_weights is not None else method == "craft":
        assert torch.equal(w, w_ref)
    else:  # scaled_gaussian: mean/std are the reference's std_mean (bit for bit under the
        # emulation, test_emulated_reactivate_matches_reference); kept loose here until checked
        # on a GPU
        tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(w.dtype, 1e-6)
        torch.testing.assert_close(w, w_ref, rtol=tol, atol=tol)
    return got


@pytest.mark.cuda
@pytest.mark.parametrize("method", craft_ext.METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reactivate_matches_reference_without_sync(shape, dtype, method):
    n = shape[0]
    w = weight(shape, dtype, seed=n, n_inactive=max(1, n // 2))
    used = torch.arange(n, device="cuda") % 3 == 0
    check_against_reference(w, used, method, seed=n, exact_weights=method != "scaled_gaussian")


@pytest.mark.cuda
@pytest.mark.parametrize("method", craft_ext.METHODS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reactivate_layouts_write_in_place(layout, method):
    base = weight((20, 6, 3, 3), seed=6, n_inactive=8)
    base0 = base.clone()
    view = layout_view(base, layout)
    used = torch.zeros(view.shape[0], dtype=torch.bool, device="cuda")
    check_against_reference(view, used, method, seed=7)
    if layout != "channels_last":  # a view: the writes landed in base, and nowhere else
        expected = base0.clone()
        layout_view(expected, layout).copy_(view)
        assert torch.equal(base, expected) and not torch.equal(base, base0)


@pytest.mark.cuda
def test_reactivate_more_inactive_than_donors_falls_back_to_spent():
    w = weight((32, 3, 3, 3), seed=8, n_inactive=20)  # 12 active, 20 inactive
    used = torch.zeros(32, dtype=torch.bool, device="cuda")
    used[1::4] = True
    res = check_against_reference(w, used, "craft", seed=9)
    assert int(res[3]) == 20


@pytest.mark.cuda
def test_reactivate_no_active_filter_and_nan_filters():
    w = torch.full((6, 27), 1e-5, device="cuda")
    for method in craft_ext.METHODS:
        used = torch.zeros(6, dtype=torch.bool, device="cuda")
        check_against_reference(w.clone(), used, method, seed=10)
    w = weight((10, 27), seed=11, n_inactive=4)
    w[3, 5] = float("nan")  # an active filter with a NaN: neither inactive nor a donor
    used = torch.zeros(10, dtype=torch.bool, device="cuda")
    res = check_against_reference(w, used, "craft", seed=12)
    assert (res[2] != 3).all()


@pytest.mark.cuda
def test_public_api_runs_without_sync():
    w = weight((64, 3, 3, 3), seed=13, n_inactive=10)
    used = torch.zeros(64, dtype=torch.bool, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with no_host_sync():
        res = craft_ext.reactivate_(w, used=used, generator=gen, backend="cuda")
        stats = craft_ext.filter_stats(w, backend="cuda")
    assert int(res.count) == 10 and bool((stats.max_abs > THR).all())


@pytest.mark.cuda
@pytest.mark.parametrize("method", craft_ext.METHODS)
def test_reactivate_in_cuda_graph(method):
    n = 48
    w = weight((n, 8, 3, 3), seed=14, n_inactive=16)
    used = torch.zeros(n, dtype=torch.bool, device="cuda")
    key, u, noise = draws(w, method, seed=15)
    op = torch.ops.craft_ext.reactivate_.default
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        op(w.clone(), used.clone(), key, u, noise, THR, method)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(w, used, key, u, noise, THR, method)
    for seed in (16, 17):
        fresh = weight(w.shape, seed=seed, n_inactive=16)
        w.copy_(fresh)
        used.zero_()
        new_key, new_u, new_noise = draws(w, method, seed=seed)
        key.copy_(new_key)
        u.copy_(new_u)
        if noise is not None:
            noise.copy_(new_noise)
        graph.replay()
        torch.cuda.synchronize()
        w_ref, used_ref = fresh.clone(), torch.zeros_like(used)
        want = reference.reactivate_(w_ref, used_ref, key, u, noise, THR, method)
        for g, e in zip(out, want, strict=True):
            assert torch.equal(g, e)
        assert torch.equal(used, used_ref)
        tol = 0.0 if method != "scaled_gaussian" else 1e-6
        torch.testing.assert_close(w, w_ref, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# The whole CUDA backend (glue + kernels) on CPU, kernels under the host emulation
# ---------------------------------------------------------------------------------------------


def _schemas(*names: str) -> list[str]:
    """The schemas of ``names`` as csrc/ops.cpp defines them (its m.def string literals)."""
    text = (REPO / "csrc" / "ops.cpp").read_text()
    found = {}
    for block in re.findall(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", text):
        schema = "".join(re.findall(r'"([^"]*)"', block))
        found[schema.split("(", 1)[0]] = schema
    return [found[name] for name in names]


_EMULATED_OPS = (
    """
#include "emulation/torch_glue_emulation.h"
#include "filter_stats.cu"
#include "reactivate.cu"

TORCH_LIBRARY(craft_ext_emu, m) {
"""
    + "".join(f'  m.def("{s}");\n' for s in _schemas("filter_stats", "reactivate_"))
    + "}\n"
)


def _cuda_include() -> str | None:
    """The CUDA toolkit's include directory (for cuda_fp16.h etc.), or None."""
    import os
    import subprocess

    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isfile(os.path.join(home, "include", "cuda_fp16.h")):
        return os.path.join(home, "include")
    if shutil.which("nvcc") is None:
        return None
    out = subprocess.run(
        ["nvcc", "--dryrun", "-x", "cu", "-c", "-", "-o", os.devnull],
        input="",
        capture_output=True,
        text=True,
    )
    for line in out.stderr.splitlines():
        if line.startswith("#$ INCLUDES="):
            return line.split('"')[1].split()[0].removeprefix("-I")
    return None


@pytest.fixture(scope="module")
def emulated_ops():
    """torch.ops.craft_ext_emu: csrc/cuda/*.cu built for CPU (one to two minutes to compile)."""
    include = _cuda_include()
    if include is None or shutil.which("ninja") is None or shutil.which("c++") is None:
        pytest.skip("needs the CUDA toolkit headers, ninja and a C++ compiler")
    from torch.utils.cpp_extension import load_inline

    load_inline(
        # one build per checkout: concurrent runs from other checkouts must not swap sources
        name=f"craft_ext_cuda_emulated_ops_{hashlib.sha1(str(REPO).encode()).hexdigest()[:10]}",
        cpp_sources=[_EMULATED_OPS],
        extra_include_paths=[str(REPO / "csrc" / "cuda"), str(REPO / "csrc"), include],
        extra_cflags=["-O1", "-std=c++20", "-pthread"],
        extra_ldflags=["-pthread"],
        is_python_module=False,
    )
    return torch.ops.craft_ext_emu


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_filter_stats_matches_reference(emulated_ops, dtype):
    for shape in [(3, 1), (9, 27), (5, 8), (6, 1025)]:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1])).to(dtype)
        w[0] *= 1e-4
        assert_stats_close(emulated_ops.filter_stats(w), reference.filter_stats(w))
    base = torch.randn(12, 8, 3, 3, generator=torch.Generator().manual_seed(1)).to(dtype)
    for layout in LAYOUTS:
        x = layout_view(base, layout)
        assert_stats_close(emulated_ops.filter_stats(x), reference.filter_stats(x.contiguous()))


@pytest.mark.slow
@pytest.mark.parametrize("method", craft_ext.METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_reactivate_matches_reference(emulated_ops, dtype, method):
    g = torch.Generator().manual_seed(2)
    cases = [((16, 3, 3, 3), None)] + [((20, 6, 3, 3), layout) for layout in LAYOUTS]
    cases += [((40, 5), None), ((7, 1), None)]
    for shape, layout in cases:
        base = torch.randn(shape, generator=g, dtype=torch.float64) * 0.1
        base[torch.randperm(shape[0], generator=g)[: shape[0] // 2]] *= 1e-3
        base = base.to(dtype)
        base0 = base.clone()
        w = base if layout is None else layout_view(base, layout)
        n = w.shape[0]
        used = torch.rand(n, generator=g) < 0.3
        key, u = torch.rand(n, generator=g), torch.rand(n, generator=g)
        noise = None if method == "craft" else torch.randn(w.shape, generator=g)
        w_ref, used_ref = w.clone(), used.clone()
        got = emulated_ops.reactivate_(w, used, key, u, noise, THR, method)
        want = reference.reactivate_(w_ref, used_ref, key, u, noise, THR, method)
        for name, a, b in zip(FIELDS, got, want, strict=True):
            assert torch.equal(a, b), (name, shape, layout)
        assert torch.equal(used, used_ref), (shape, layout)
        # every method bit for bit: scaled_gaussian's mean/std are the reference's std_mean
        assert torch.equal(w, w_ref), (shape, layout)
        if layout not in (None, "channels_last"):  # views: writes landed in base, only there
            expected = base0.clone()
            layout_view(expected, layout).copy_(w_ref)
            assert torch.equal(base, expected) and not torch.equal(base, base0), (shape, layout)


@pytest.mark.slow
def test_emulated_pairing_rules_match_reference(emulated_ops):
    """Donors, spent donors and reactivated rows over many inactive / spent mixes, NaN rows."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 16, 33):
        for frac_inactive in (0.0, 0.3, 0.7, 1.0):
            for used_frac in (0.0, 0.5, 1.0):
                w0 = torch.randn(n, 9, generator=g) * 0.1
                w0[torch.randperm(n, generator=g)[: round(frac_inactive * n)]] *= 1e-3
                if n > 4:
                    w0[n // 2, 3] = float("nan")  # neither inactive nor a donor
                used0 = torch.rand(n, generator=g) < used_frac
                key, u = torch.rand(n, generator=g), torch.rand(n, generator=g)
                for method in craft_ext.METHODS:
                    noise = None if method == "craft" else torch.randn(w0.shape, generator=g)
                    w, used, w_ref, used_ref = w0.clone(), used0.clone(), w0.clone(), used0.clone()
                    got = emulated_ops.reactivate_(w, used, key, u, noise, THR, method)
                    want = reference.reactivate_(w_ref, used_ref, key, u, noise, THR, method)
                    case = (n, frac_inactive, used_frac, method)
                    for name, a, b in zip(FIELDS, got, want, strict=True):
                        assert torch.equal(a, b), (name, *case)
                    assert torch.equal(used, used_ref), case
                    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.slow
@pytest.mark.parametrize("method", craft_ext.METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_channel_matches_reference(emulated_ops, dtype, method):
    """The CUDA backend's folded detection (filter_stats epilogue, pairing on folded L1) and
    channel rewrite (pairing.h) against the reference, bit for bit."""
    g = torch.Generator().manual_seed(3)
    for n in (1, 9, 64):
        w = (torch.randn(n, 3, 3, 3, generator=g, dtype=torch.float64) * 0.1).to(dtype)
        w[torch.randperm(n, generator=g)[: n // 4]] *= 1e-3
        bn = [
            torch.rand(n, generator=g) + 0.1,  # gamma
            torch.randn(n, generator=g),  # beta
            torch.randn(n, generator=g),  # running_mean
            torch.rand(n, generator=g) + 0.1,  # running_var
        ]
        bn[0][torch.randperm(n, generator=g)[: max(1, n // 5)]] = 1e-5  # dead through BN
        if n > 4:
            bn[0][2], bn[3][3] = float("nan"), float("inf")  # neither inactive nor donors
        slope, bias = torch.rand(n, generator=g), torch.randn(n, generator=g)
        used = torch.rand(n, generator=g) < 0.3
        key, u = torch.rand(n, generator=g), torch.rand(n, generator=g)
        noise = None if method == "craft" else torch.randn(w.shape, generator=g)
        for folded in (False, True):
            a = [t.clone() for t in (w, used, bias, *bn, slope)]
            b = [t.clone() for t in (w, used, bias, *bn, slope)]
            got = emulated_ops.reactivate_(*a[:2], key, u, noise, THR, method, *a[2:], 1e-5, folded)
            want = reference.reactivate_(*b[:2], key, u, noise, THR, method, *b[2:], 1e-5, folded)
            for name, x, y in zip(FIELDS, got, want, strict=True):
                assert torch.equal(x, y), (name, n, folded)
            for x, y in zip(a, b, strict=True):
                assert torch.equal(x.nan_to_num(), y.nan_to_num()), (n, folded)
            stats = emulated_ops.filter_stats(w, bn[0], bn[3], 1e-5)
            ref = reference.filter_stats(w, bn[0], bn[3], 1e-5)
            assert torch.equal(stats[0].nan_to_num(), ref[0].nan_to_num())
            for x, y in zip(stats[1:], ref[1:], strict=True):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, equal_nan=True)
