"""Every Triton kernel of ``kernels/`` compiles for an H100 (sm_90), on a machine without a GPU.

The interpreter that runs the kernels on CPU elsewhere in the suite does not specialise: it
never turns an integer argument equal to 1 into a ``constexpr`` (so ``n.to(tl.int64)`` works
there and fails to compile on a GPU), and it never lowers to PTX. This module closes that gap
by running the *real* JIT launch path (``JITFunction.run``: the binder that specialises the
arguments, ``triton.compile`` for the target, ``CompiledKernel._init_handles`` and the launch
call) with a stand-in driver that reports an sm_90 device and launches nothing:

* each op is called with CPU tensors of the shapes, dtypes and layouts the other test modules
  use (their ``SHAPES`` constants are imported, so the two cannot drift) plus size-1 dims;
  the JIT specialises those arguments exactly as at a GPU launch: integers equal to 1 become
  constexprs, integers and pointers divisible by 16 get divisibility hints, i32 / i64 by value
  (CPU tensors are 64-byte aligned, CUDA ones 256: the same hints for every view);
* the host code takes its GPU branch: ``filter_stats``' tile table and ``connection_scores``'
  tiles and SM count (132, an H100 SXM) are set to what a CUDA device gets;
* each kernel compiles through TTIR, TTGIR, LLVM IR, PTX and ``ptxas`` to a cubin; the stand-in
  driver checks the launch as CUDA would (shared memory <= 227 KiB, grid y / z <= 65535, x <
  2^31) and records it (kernel, specialised signature, options, PTX and SASS).

That runs in worker processes (``TRITON_INTERPRET=0``: the kernels are ``JITFunction`` there,
and the stand-in driver never leaks into the test process; ``CRAFT_COMPILE_JOBS`` of them,
default one per core up to 4), once per session; the tests then read their reports. Each
distinct specialisation compiles once (the JIT's own cache); later runs hit Triton's on-disk
cache (``TRITON_CACHE_DIR``). About 150 distinct compiles, ~1 s each on one core.

What it catches: any kernel that fails to compile for sm_90 under a specialisation the tests'
shapes produce (front end, layouts, LLVM, ptxas), shared memory beyond an H100's, grids beyond
CUDA's limits, FMA contraction where bit-equality is promised (PTX and SASS). What it cannot
catch: anything that needs a real launch (wrong results, illegal addresses, races, speed),
register or thread limits the driver checks at module load, other targets (sm_80, sm_100).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TARGET = ("cuda", 90, 32)  # backend, compute capability, warp size: H100
H100 = {"max_shared_mem": 232448, "multiprocessor_count": 132}  # H100 SXM, opt-in shared
MAX_GRID = (2**31 - 1, 65535, 65535)
DTYPES = ["float32", "float16", "bfloat16", "float64"]
WORKER_TIMEOUT_S = 1500
# kernels whose SASS is checked for FMA (cuobjdump): those promising bit-equality
SASS_OF = {"_rewrite_rows_kernel"}

# --------------------------------------------------------------------------------------------
# Cases: plain JSON (built here, run in the worker)
# --------------------------------------------------------------------------------------------


def _case(op: str, shape, dtype: str = "float32", layout: str = "contiguous", **kw) -> dict:
    tags = "-".join(f"{k}={v}" for k, v in kw.items() if k != "conv")
    name = "-".join(
        [
            op,
            "x".join(map(str, shape)),
            dtype,
            layout,
            *([kw["conv"]["id"]] if "conv" in kw else []),
        ]
    )
    name += f"-{tags}" if tags else ""
    return {"id": name, "op": op, "shape": list(shape), "dtype": dtype, "layout": layout, "kw": kw}


def _conv(cin, cout, kernel, stride, padding, dilation, n=6, hw=(7, 6)) -> tuple[list, dict]:
    geo = {"cin": cin, "cout": cout, "kernel": kernel, "stride": stride, "padding": padding}
    parts = {"k": kernel, "s": stride, "p": padding, "d": dilation}
    tag = "".join(
        k + "x".join(map(str, v if isinstance(v, tuple) else [v])) for k, v in parts.items()
    )
    geo.update(dilation=dilation, id=f"conv{cin}-{cout}-{tag}")
    return [n, cin, *hw], geo


def _cases() -> list[dict]:
    """The shapes, dtypes and layouts of the kernels' own tests, plus size-1 dims.

    Every shape of a test module runs in float32 (the specialisations come from the shapes:
    which integers are 1 or multiples of 16, and the tile sizes); every dtype runs on the shapes
    with size-1 dims and on a typical one; the variants (BatchNorm fold, method, layouts,
    ``return_corr``, position splits) on the shapes their tests use. Distinct specialisations
    compile once, so duplicates cost nothing.
    """
    from test_connection_scores import CONV_CASES
    from test_feature_map_stats import SHAPES as MAP_SHAPES
    from test_filter_stats import SHAPES as FILTER_SHAPES
    from test_reactivate import SHAPES as REACTIVATE_SHAPES

    layouts = ["channels_last", "row_slice", "transposed", "channel_slice"]
    cases = []
    # filter_stats: test_filter_stats (SHAPES x DTYPES, the BN fold on its four shapes, layouts
    # of (24, 6, 3, 3), (512, 512, 3, 3)) plus size-1 dims
    for shape in dict.fromkeys([*FILTER_SHAPES, (1, 1), (16, 1, 1, 1), (512, 512, 3, 3)]):
        cases.append(_case("filter_stats", shape))
    for shape in [(1, 3, 3, 3), (13, 1), (129, 8, 3, 3)]:
        for dtype in DTYPES:
            cases.append(_case("filter_stats", shape, dtype, fold="bn"))
            if dtype != "float32":
                cases.append(_case("filter_stats", shape, dtype))
    for shape in [(1, 3, 3, 3), (7, 5), (64, 3, 3, 3)]:
        cases.append(_case("filter_stats", shape, fold="var_only"))
    for layout in layouts:
        cases.append(_case("filter_stats", (24, 6, 3, 3), "float32", layout))
    # reactivate_: test_reactivate (SHAPES x DTYPES x methods, the BN channel, layouts of
    # (20, 6, 3, 3)) plus size-1 dims
    methods = ("craft", "scaled_gaussian", "random")
    for shape in dict.fromkeys([*REACTIVATE_SHAPES, (1, 1), (129, 3, 3, 3)]):
        for method in methods:
            cases.append(_case("reactivate", shape, method=method))
    for shape in [(1, 3, 3, 3), (64, 3, 3, 3)]:
        for dtype in DTYPES[1:]:
            for method in methods:
                cases.append(_case("reactivate", shape, dtype, method=method))
    for n in (1, 129):
        for method in methods:
            cases.append(_case("reactivate", (n, 3, 3, 3), method=method, channel=True))
    for layout in layouts:
        for method in methods:
            cases.append(_case("reactivate", (20, 6, 3, 3), "float32", layout, method=method))
    # the launch option dropped, as Inductor does for user kernels in a compiled graph: the
    # kernel itself must still round mean + std * z twice
    for dtype in ("float32", "bfloat16"):
        cases.append(_case("reactivate", (64, 3, 3, 3), dtype, method="scaled_gaussian", nofuse=0))
    # feature_map_stats: test_feature_map_stats (SHAPES, dtypes on (2, 9, 6, 5), layouts of
    # (3, 10, 6, 7), 112x112 maps) plus B = 1 (issue 13: (1, 64, 56, 56), (1, 3, 5, 5)), C = 1,
    # 1x1 maps, several Gram tiles and the benchmark's B=100, C=64
    extra = [(1, 64, 56, 56), (1, 3, 5, 5), (1, 6, 112, 112), (2, 12, 16, 16), (3, 1, 4, 4)]
    extra += [(4, 130, 1, 1), (100, 64, 112, 112), (2, 512, 7, 7)]
    for shape in dict.fromkeys([*MAP_SHAPES, *extra]):
        cases.append(_case("feature_map_stats", shape, return_corr=True))
    for shape in [(1, 1, 1, 1), (1, 64, 56, 56), (1, 3, 5, 5), (2, 9, 6, 5), (2, 70, 5, 6)]:
        for dtype in DTYPES:
            if dtype != "float32":
                cases.append(_case("feature_map_stats", shape, dtype, return_corr=True))
            cases.append(_case("feature_map_stats", shape, dtype, return_corr=False))
    for layout in ["channels_last", "channel_slice", "transposed"]:
        for shape in [(3, 10, 6, 7), (1, 64, 56, 56)]:
            cases.append(_case("feature_map_stats", shape, "float32", layout, return_corr=True))
    # connection_scores: test_connection_scores (CONV_CASES, channels_last, half precision,
    # position splits, Linear layers as 1x1 maps, float64)
    for spec in CONV_CASES:
        shape, geo = _conv(*spec)
        cases.append(_case("connection_scores", shape, conv=geo))
        shape, geo = _conv(*spec, n=5, hw=(5, 4))
        cases.append(_case("connection_scores", shape, "float32", "channels_last", conv=geo))
    for dtype in DTYPES[1:]:
        shape, geo = _conv(2, 3, 3, 1, 1, 1, n=5, hw=(4, 4))
        cases.append(_case("connection_scores", shape, dtype, conv=geo))
    shape, geo = _conv(2, 3, 3, 2, 1, 1, n=4, hw=(6, 5))
    for splits in (1, 2, 5, 100):
        cases.append(_case("connection_scores", shape, conv=geo, splits=splits))
    for n, fin, fout in [(12, 7, 5), (20, 18, 17), (2, 1, 1)]:
        for dtype in ("float32", "float64"):
            cases.append(_case("connection_scores", (n, fin), dtype, linear=fout))
    return cases


CASES = _cases()


# --------------------------------------------------------------------------------------------
# The worker: a separate interpreter-free process with a compile-only sm_90 driver
# --------------------------------------------------------------------------------------------


def _install_compile_only_driver(records: list[dict]) -> None:
    """Make Triton's JIT compile for ``TARGET`` and launch nothing; record every launch."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class Utils:
        """The few ``driver.utils`` calls a compile and a (skipped) module load make."""

        def get_device_properties(self, device):
            return dict(H100)

        def load_binary(self, name, kernel, shared, device):
            # (module, function, n_regs, n_spills, n_max_threads): the launcher below never
            # touches a module; 1024 threads is every sm_90 kernel's ceiling
            return 1, 1, 0, 0, 1024

        def unload_module(self, module):
            pass

    class Launcher:
        """Stands in for the CUDA launcher: checks the grid as cuLaunchKernel would."""

        def __init__(self, src, metadata):
            self.name = metadata.name

        def __call__(self, gx, gy, gz, stream, function, packed, launch_meta, *rest):
            for axis, (size, limit) in enumerate(zip((gx, gy, gz), MAX_GRID, strict=True)):
                if not 0 <= size <= limit:
                    raise RuntimeError(f"{self.name}: grid[{axis}] = {size} > CUDA's {limit}")

    class CompileOnlyDriver(DriverBase):
        def __init__(self):
            self.utils = Utils()
            self.launcher_cls = Launcher

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError("compile-only driver: no launcher is generated")

        def get_current_target(self):
            return GPUTarget(*TARGET)

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError("compile-only driver: nothing runs")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    driver.set_active(CompileOnlyDriver())
    real_run = JITFunction.run
    sass: set = set()

    def run(self, *args, grid, warmup, **kwargs):
        kernel = real_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        meta = kernel.metadata
        const = {k[0]: v for k, v in kernel.src.constants.items() if len(k) == 1}
        attrs = {str(k[0]): v for k, v in kernel.src.attrs.items() if len(k) == 1}
        records.append(
            {
                "kernel": self.fn.__name__,
                "hash": kernel.hash,
                "signature": dict(kernel.src.signature),
                "constexprs": {self.arg_names[i]: _plain(v) for i, v in const.items()},
                "divisible_by_16": [
                    self.arg_names[int(i)] for i, v in attrs.items() if ["tt.divisibility", 16] in v
                ],
                "num_warps": meta.num_warps,
                "shared": meta.shared,
                "enable_fp_fusion": meta.enable_fp_fusion,
                "target": [meta.target.backend, meta.target.arch],
                "grid": None if callable(grid) else list(grid),
                "ptx": kernel.asm["ptx"],
                "cubin_bytes": len(kernel.asm["cubin"]),
                "sass_fma": _count_sass_fma(kernel) if _wants_sass(self, kernel, sass) else None,
            }
        )
        return kernel

    JITFunction.run = run
    assert driver.active.get_current_target().arch == TARGET[1]


def _wants_sass(fn, kernel, seen: set) -> bool:
    """Disassemble one compile per kernel of ``SASS_OF``, pointer dtypes and flag constexprs
    (METHOD, IS_F64, ...; not the tile sizes): cuobjdump takes about a second a call."""
    if fn.fn.__name__ not in SASS_OF:
        return False
    pointers = tuple(v for v in kernel.src.signature.values() if v.startswith("*"))
    flags = tuple(
        (fn.arg_names[k[0]], str(v))
        for k, v in kernel.src.constants.items()
        if fn.arg_names[k[0]].isupper() and not fn.arg_names[k[0]].startswith("BLOCK")
    )
    key = (fn.fn.__name__, pointers, flags)
    if key in seen:
        return False
    seen.add(key)
    return True


_SASS_FMA = re.compile(r"\b(?:FFMA|DFMA|HFMA2)(?:\.\w+)*\s+\w+,(?!\s*-RZ,\s*RZ,)")


def _count_sass_fma(kernel) -> int:
    """Fused multiply-adds in the cubin's SASS (cuobjdump); -1 without cuobjdump. ptxas moves
    constants with ``HFMA2.MMA R, -RZ, RZ, a, b`` (0 * 0 + constant): not counted."""
    try:
        sass = kernel.asm["sass"]
    except (OSError, subprocess.CalledProcessError):
        return -1
    return len(_SASS_FMA.findall(sass))


def _plain(value):
    """A JSON-able form of a constexpr value (ints, bools, strings, dtypes)."""
    value = getattr(value, "value", value)
    return value if isinstance(value, (int, float, bool, str, type(None))) else str(value)


def _use_gpu_host_paths() -> None:
    """Host code picks tiles by device; CPU tensors here must get what a CUDA tensor gets."""
    from craft_ext.kernels import connection_scores, filter_stats

    filter_stats._TILE["interpreter"] = filter_stats._TILE["gpu"]
    filter_stats._MAX_BLOCK_K["interpreter"] = filter_stats._MAX_BLOCK_K["gpu"]
    connection_scores._device_kind = lambda _device: "cuda"
    connection_scores._sm_count = lambda _device: H100["multiprocessor_count"]


def _tensor(shape, dtype: str, layout: str, seed: int = 0):
    """A CPU tensor of ``shape`` in ``layout``: contiguous, channels_last, or a view (every
    other row, channels 1.. of a wider tensor, the last two dims transposed)."""
    import torch

    full = list(shape)
    if layout == "row_slice":
        full[0] *= 2
    elif layout == "channel_slice":
        full[1] += 3
    elif layout == "transposed":
        full[2], full[3] = full[3], full[2]
    if math.prod(full) > 2**20:  # values do not matter to a compile: skip the RNG
        x = torch.zeros(full)
    else:
        x = torch.randn(full, generator=torch.Generator().manual_seed(seed))
    x = x.to(getattr(torch, dtype))
    if layout == "row_slice":
        return x[::2]
    if layout == "channel_slice":
        return x[:, 1 : 1 + shape[1]]
    if layout == "transposed":
        return x.transpose(2, 3)
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last)
    return x


def _run_case(case: dict) -> None:
    import torch
    from torch import nn

    from craft_ext import sparsify

    ops = torch.ops.craft_ext
    shape, dtype, layout, kw = case["shape"], case["dtype"], case["layout"], case["kw"]
    if case["op"] == "filter_stats":
        w = _tensor(shape, dtype, layout)
        n = w.shape[0]
        var = torch.rand(n) + 0.5 if kw.get("fold", "none") != "none" else None
        gamma = torch.randn(n) if kw.get("fold") == "bn" else None
        ops.filter_stats_triton(w, gamma, var, 1e-5)
    elif case["op"] == "reactivate":
        w = _tensor(shape, dtype, layout) * 0.1
        n = w.shape[0]
        w[: max(1, n // 2)] *= 1e-4  # some inactive filters
        used = torch.zeros(n, dtype=torch.bool)
        key, u = torch.rand(n), torch.rand(n)
        method = kw["method"]
        noise = None if method == "craft" else torch.randn(w.shape)
        extra = ()
        if kw.get("channel"):
            vec = [torch.randn(n) for _ in range(4)]
            extra = (vec[0], vec[1], vec[2], vec[3], torch.rand(n) + 0.5, torch.rand(n), 1e-5)
            extra = (*extra, True)
        if "nofuse" not in kw:
            ops.reactivate_triton_(w, used, key, u, noise, 1e-3, method, *extra)
        else:  # launch without enable_fp_fusion (Triton's default: fusion on)
            real = torch.library.wrap_triton

            def dropping(kernel):
                launcher = real(kernel)

                class _Grid:
                    def __getitem__(self, grid):
                        fn = launcher[grid]

                        def launch(*args, **kwargs):
                            kwargs.pop("enable_fp_fusion", None)
                            return fn(*args, **kwargs)

                        return launch

                return _Grid()

            torch.library.wrap_triton = dropping
            try:
                ops.reactivate_triton_(w, used, key, u, noise, 1e-3, method, *extra)
            finally:
                torch.library.wrap_triton = real
    elif case["op"] == "feature_map_stats":
        x = _tensor(shape, dtype, layout)
        ops.feature_map_stats_triton(x, 0.02, 0.95, kw["return_corr"])
    elif case["op"] == "connection_scores":
        if "linear" in kw:
            mod = nn.Linear(shape[1], kw["linear"])
            x = _tensor(shape, dtype, layout)
            y = torch.randn(shape[0], kw["linear"]).to(x.dtype)
            geometry = sparsify._check_pair(mod, x, y)
            x, y = x.reshape(shape[0], shape[1], 1, 1), y.reshape(shape[0], -1, 1, 1)
            ops.connection_scores_triton(x, y, *geometry, False)
            return
        geo = kw["conv"]
        mod = nn.Conv2d(
            geo["cin"],
            geo["cout"],
            geo["kernel"],
            stride=geo["stride"],
            padding=geo["padding"],
            dilation=geo["dilation"],
        )
        x = _tensor(shape, dtype, layout)
        with torch.no_grad():
            y = mod.to(torch.float64)(x.double()).to(x.dtype)
        geometry = sparsify._check_pair(mod, x, y)
        ops.connection_scores_triton(x, y, *geometry, True, kw.get("splits", 0))
    else:
        raise ValueError(f"unknown op {case['op']!r}")


_PTX_FMA = re.compile(r"^\s*(?:@!?%\w+\s+)?fma\.", flags=re.M)
_PTX_DOWNCAST = re.compile(r"\bcvt(?:\.\w+)*\.b?f16(?:x2)?\.f32\b")


def _worker(cases_path: str, report_path: str) -> None:
    """Compile the cases of ``cases_path`` (JSON); write the report to ``report_path``."""
    import time

    report: dict = {"cases": {}, "skip": None}
    try:
        import torch
        import triton
        from triton import knobs
        from triton.backends import backends

        if "nvidia" not in backends:
            raise RuntimeError("triton has no NVIDIA backend")
        ptxas = knobs.nvidia.ptxas.path
        if not ptxas or not Path(ptxas).exists():
            raise RuntimeError("ptxas not found")
        report["versions"] = {"triton": triton.__version__, "torch": torch.__version__}
    except Exception as exc:  # noqa: BLE001 - any broken backend is a reason to skip
        report["skip"] = f"Triton's CUDA compiler is unavailable: {type(exc).__name__}: {exc}"
        Path(report_path).write_text(json.dumps(report))
        return

    records: list[dict] = []
    _install_compile_only_driver(records)
    from triton.runtime.jit import JITFunction

    from craft_ext import kernels  # registers the Triton ops; kernels are JITFunctions here

    report["kernels"] = sorted(
        name
        for mod in vars(kernels).values()
        if getattr(mod, "__name__", "").startswith(kernels.__name__ + ".")
        for name, obj in vars(mod).items()
        if isinstance(obj, JITFunction) and name.endswith("_kernel")
    )
    _use_gpu_host_paths()
    start = time.perf_counter()
    for case in json.loads(Path(cases_path).read_text()):
        del records[:]
        t0 = time.perf_counter()
        try:
            _run_case(case)
            error = None
        except Exception as exc:  # noqa: BLE001 - reported per case
            error = f"{type(exc).__name__}: {str(exc)[-3000:]}"
        for rec in records:
            ptx = rec.pop("ptx")
            rec["ptx_fma"] = len(_PTX_FMA.findall(ptx))
            rec["ptx_downcasts"] = sorted(set(_PTX_DOWNCAST.findall(ptx)))
        report["cases"][case["id"]] = {
            "error": error,
            "launches": list(records),
            "seconds": round(time.perf_counter() - t0, 3),
        }
    report["seconds"] = round(time.perf_counter() - start, 1)
    Path(report_path).write_text(json.dumps(report))


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """Compile every case in ``CRAFT_COMPILE_JOBS`` worker processes (default: up to 4, one
    per core); their merged report."""
    jobs = int(os.environ.get("CRAFT_COMPILE_JOBS", "0")) or min(4, os.cpu_count() or 1)
    tmp = tmp_path_factory.mktemp("triton_compile")
    env = dict(os.environ, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    procs = []
    for j in range(jobs):  # contiguous shards: cases of one op share specialisations
        shard = CASES[j * len(CASES) // jobs : (j + 1) * len(CASES) // jobs]
        (tmp / f"cases{j}.json").write_text(json.dumps(shard))
        cmd = [sys.executable, __file__, "--worker", str(tmp / f"cases{j}.json")]
        cmd.append(str(tmp / f"report{j}.json"))
        err = (tmp / f"stderr{j}.txt").open("w")
        procs.append((subprocess.Popen(cmd, env=env, stderr=err, cwd=Path(__file__).parent), err))
    merged: dict = {"cases": {}, "kernels": [], "seconds": 0.0}
    try:
        for j, (proc, err) in enumerate(procs):
            code = proc.wait(timeout=WORKER_TIMEOUT_S)
            err.close()
            if code != 0:
                log = (tmp / f"stderr{j}.txt").read_text()[-4000:]
                pytest.fail(f"compile worker {j} failed ({code}):\n{log}")
            out = json.loads((tmp / f"report{j}.json").read_text())
            if out["skip"]:
                pytest.skip(out["skip"])
            merged["cases"].update(out["cases"])
            merged["kernels"] = sorted(set(merged["kernels"]) | set(out["kernels"]))
            merged["seconds"] = max(merged["seconds"], out["seconds"])
    finally:
        for proc, err in procs:
            if proc.poll() is None:
                proc.kill()
            err.close()
    return merged


def _launches(report: dict, kernel: str) -> list[tuple[str, dict]]:
    return [
        (case_id, launch)
        for case_id, case in report["cases"].items()
        for launch in case["launches"]
        if launch["kernel"] == kernel
    ]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_compiles_for_sm90(report, case):
    got = report["cases"][case["id"]]
    assert got["error"] is None, got["error"]
    assert got["launches"], "no kernel was launched"
    for launch in got["launches"]:
        assert launch["target"] == list(TARGET[:2])
        assert launch["cubin_bytes"] > 0


def test_every_kernel_is_compiled(report):
    """Each ``@triton.jit`` kernel of ``kernels/`` is launched by some case (a new kernel needs
    a case here)."""
    compiled = {
        launch["kernel"] for case in report["cases"].values() for launch in case["launches"]
    }
    assert report["kernels"], "no kernels found"
    assert set(report["kernels"]) <= compiled, set(report["kernels"]) - compiled


def test_arguments_are_specialised_as_at_a_gpu_launch(report):
    """The cases went through the JIT's specialisation, not around it: an integer argument
    equal to 1 is a constexpr (B = 1: ``batch``, issue 13; K = 1: ``k``), one divisible by 16
    and the pointers of fresh tensors carry ``tt.divisibility = 16``."""
    fms = report["cases"]["feature_map_stats-1x3x5x5-float32-contiguous-return_corr=True"]
    with_batch = [launch for launch in fms["launches"] if "batch" in launch["signature"]]
    assert with_batch
    for launch in with_batch:
        assert launch["signature"]["batch"] == "constexpr", launch["kernel"]
        assert launch["constexprs"]["batch"] == 1
    (stats,) = report["cases"]["filter_stats-13x1-float32-contiguous"]["launches"]
    assert stats["signature"]["k"] == "constexpr" and stats["constexprs"]["k"] == 1
    (stats,) = report["cases"]["filter_stats-64x3x3x3-float32-contiguous"]["launches"]
    assert stats["signature"]["k"] == "i32" and stats["signature"]["w_ptr"] == "*fp32"
    assert {"n_rows", "w_ptr", "max_ptr"} <= set(stats["divisible_by_16"])
    assert "k" not in stats["divisible_by_16"]  # 27


def test_bit_exact_rewrite_has_no_fma(report):
    """``reactivate_``'s rewrite kernel promises the reference's bits (``mean + std * z``
    rounded twice): it is compiled with ``enable_fp_fusion=False``, its PTX has no ``fma``,
    its SASS (cuobjdump) no FFMA / DFMA / HFMA2, and every float32 -> 16-bit conversion rounds
    to nearest even (``cvt.rn``), as torch's ``.to``."""
    launches = _launches(report, "_rewrite_rows_kernel")
    assert launches
    dropped = [c for c, _ in launches if "nofuse" in c]
    assert len(dropped) == 2, "the cases without the launch option must have run"
    for case_id, launch in launches:
        # Triton's default is fusion on: only the option-less launches have it
        assert launch["enable_fp_fusion"] is ("nofuse" in case_id), case_id
        assert launch["ptx_fma"] == 0, f"{case_id}: {launch['ptx_fma']} fma in the PTX"
        assert launch["sass_fma"] in (0, -1, None), f"{case_id}: {launch['sass_fma']} SASS FMA"
        for cvt in launch["ptx_downcasts"]:
            assert cvt.startswith("cvt.rn."), f"{case_id}: {cvt}"
    assert sum(launch["sass_fma"] is not None for _, launch in launches) >= 8  # method x dtype
    # craft negates (a sign flip, no conversion); the other methods round float32 results
    sixteen = [launch for c, launch in launches if "float16" in c and "method=craft" not in c]
    assert sixteen and all(launch["ptx_downcasts"] for launch in sixteen)


if __name__ == "__main__" and sys.argv[1] == "--worker":
    _worker(*sys.argv[2:])
