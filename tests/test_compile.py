"""The ops trace whole under torch.compile(fullgraph=True) with the default backend, and run
without host synchronisation on every backend (GPU checks run when a GPU is present)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import CUDA

import craft_ext
from craft_ext import reference

THR = 1e-3


def _inputs(device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 3, 3, 3, generator=g) * 0.1
    w[:3] *= 1e-4
    bn = torch.nn.BatchNorm2d(16).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.2, 1.0, generator=g)
        bn.weight[5:7] = 1e-6  # dead through BN only
        bn.running_var.uniform_(0.5, 1.5, generator=g)
    fmap = torch.randn(2, 8, 5, 5, generator=g)
    return w.to(device), bn.to(device), fmap.to(device)


CASES = {
    "filter_stats": lambda w, bn, fm: craft_ext.filter_stats(w),
    "filter_stats_folded": lambda w, bn, fm: craft_ext.filter_stats(w, bn=bn),
    "reactivate_": lambda w, bn, fm: craft_ext.reactivate_(w),
    "reactivate_folded": lambda w, bn, fm: craft_ext.reactivate_(w, bn=bn, criterion="folded"),
    "feature_map_stats": lambda w, bn, fm: craft_ext.feature_map_stats(fm),
}


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("case", list(CASES))
def test_default_backend_traces_fullgraph(case, compiler):
    """No backend argument: dispatch (the use_backend stack, $CRAFT_EXT_BACKEND, the cached
    backend tables) must be traceable, and the compiled call must equal the eager one."""
    torch._dynamo.reset()
    fn = CASES[case]
    w, bn, fm = _inputs()
    torch.manual_seed(1)  # reactivate_ without a generator draws from the default one
    want = fn(w.clone(), copy.deepcopy(bn), fm)  # the BN-aware rewrite changes bn: copies
    torch.manual_seed(1)
    # inductor's own RNG would draw other numbers: fallback_random keeps torch's
    with torch._inductor.config.patch(fallback_random=True):
        got = torch.compile(fn, fullgraph=True, backend=compiler)(w.clone(), copy.deepcopy(bn), fm)
    for g, e in zip(got, want, strict=True):
        if e is None:
            assert g is None
        else:
            torch.testing.assert_close(g, e, rtol=0, atol=0, equal_nan=True)


def test_use_backend_is_honoured_under_compile():
    """A use_backend block changes what the compiled function runs (Dynamo guards on it)."""
    torch._dynamo.reset()
    calls = []
    real = reference.filter_stats

    def spy(*args):
        calls.append(1)
        return real(*args)

    w, _, _ = _inputs()
    fn = torch.compile(lambda x: craft_ext.filter_stats(x), fullgraph=True, backend="eager")
    fn(w)
    assert not calls or not craft_ext.extension_loaded()  # default: the C++ kernel
    reference.filter_stats = spy
    try:
        with craft_ext.use_backend("reference"):
            fn(w)
    finally:
        reference.filter_stats = real
    assert calls, "the reference must run inside use_backend('reference')"


# ---------------------------------------------------------------------------------------------
# No host synchronisation on the GPU, for every backend a user can end up with
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
@pytest.mark.parametrize("case", list(CASES))
def test_no_host_sync_on_gpu(backend, case):
    if backend not in craft_ext.available_backends("cuda", "reactivate_"):
        pytest.skip(f"{backend} is not available on cuda here")
    w, bn, fm = _inputs("cuda")
    fn = CASES[case]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with craft_ext.use_backend(backend if case != "feature_map_stats" or backend != "cuda"
                                   else "auto"):  # fmt: skip
            fn(w, bn, fm)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
