"""Helpers shared by the tests (importable as ``helpers``: tests/ is on pytest's pythonpath).

Triton kernels run on CPU through the interpreter when no GPU is present; TRITON_INTERPRET
must be set before triton (and craft_ext, which imports the kernels) is imported, which is why
this module sets it first.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# gloo (the CPU DDP tests) on the loopback interface; spawned workers inherit it
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import pytest  # noqa: E402

import craft_ext  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
OPCHECK_TESTS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)


def devices() -> list[str]:
    return ["cpu", "cuda"] if CUDA else ["cpu"]


def backend_params() -> list:
    """(device, backend) pairs to test; tests skip the ones that cannot run here."""
    pairs = [("cpu", "cpp"), ("cpu", "triton"), ("cpu", "reference")]
    if CUDA:
        pairs += [("cuda", "cuda"), ("cuda", "triton"), ("cuda", "reference")]
    return [
        pytest.param(dev, be, id=f"{dev}-{be}", marks=[pytest.mark.cuda] if dev == "cuda" else [])
        for dev, be in pairs
    ]


def require_backend(device: str, backend: str, op: str) -> None:
    """Skip unless ``backend`` can run ``op`` on ``device`` (says why)."""
    if backend not in craft_ext.available_backends(device, op):
        if backend in ("cpp", "cuda") and not craft_ext.extension_loaded():
            pytest.skip(f"compiled extension not loaded ({craft_ext.extension_error()})")
        pytest.skip(f"backend {backend} cannot run {op} on {device} here")


def lfw_path() -> Path:
    """Where the LFW 112x112 data set is expected: ``$CRAFT_LFW_DIR`` or beside the checkout."""
    return Path(os.environ.get("CRAFT_LFW_DIR", REPO.parent / "shared" / "data" / "lfw112"))


def spawn(fn, args: tuple, nprocs: int = 2, deadline_s: float = 120.0) -> None:
    """``torch.multiprocessing.spawn`` that fails (instead of hanging CI) when the workers have
    not all finished within ``deadline_s`` seconds; a worker's error is re-raised as usual.

    Workers that use DDP on gloo must free the DDP module (and ``gc.collect()``) before
    ``destroy_process_group()``, as ``craft_ext.train.Trainer.close`` does: otherwise a process
    can hang at exit (a GIL deadlock between DDP's Reducer destructor and gloo's threads).
    """
    import sys
    import time

    import torch.multiprocessing as mp

    # workers unpickle ``fn`` by module name (``tests.test_x`` under --import-mode=importlib):
    # spawned children get the parent's sys.path
    added = str(REPO) not in sys.path
    if added:
        sys.path.append(str(REPO))
    try:
        ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    finally:
        if added:
            sys.path.remove(str(REPO))
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=2):
        if time.monotonic() > end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers did not finish within {deadline_s:.0f} s")
