"""Compile craft_ext's C++/CUDA kernels (``craft_ext._C``) against the torch that imports them.

An isolated ``pip install .`` (pip's default) builds without torch, so the package ships its
sources (``craft_ext/csrc``) and, when no ``craft_ext/_C*.so`` was built at install time,
``import craft_ext`` compiles them once with ``torch.utils.cpp_extension.load`` (ninja) into a
cache entry and loads them from there on every later import::

    $TORCH_EXTENSIONS_DIR/craft_ext/<entry>/                        if TORCH_EXTENSIONS_DIR is set
    ${XDG_CACHE_HOME:-~/.cache}/torch_extensions/craft_ext/<entry>/   otherwise

``<entry>`` is ``torch<version>-py<XY>-<cpu|cu<XYZ>>-<hash>``; the hash covers the sources,
the compiler flags, torch's version and git revision, Python, the platform, the CUDA toolkit
and the CUDA architectures. Another torch or edited sources therefore get a new entry, compiled
before use: a stale entry is never loaded. An entry is used only once its ``build.json`` (written
last, atomically) records the same key; ``build.log`` holds the compiler output. A file lock
(``<entry>.lock`` beside it) makes processes that start together (DDP ranks, parallel test
workers) compile once: the others wait, then load the result. A failed compile is recorded
(``failed.json``) and not retried at every import until the compiler or toolkit found changes
or ``python -m craft_ext.build`` is run.

Sources and flags are the ones ``setup.py`` uses for an install-time build (it loads this file
by path): the C++ CPU kernels always; the CUDA kernels too when torch has CUDA
(``torch.version.cuda``) and a CUDA toolkit is found (``CUDA_HOME``, ``CUDA_PATH``, ``nvcc`` on
``PATH`` or ``/usr/local/cuda``), or ``FORCE_CUDA=1``; torch's standard flags (its C++ standard
included) plus ``-O3 -ffp-contract=off -DNDEBUG``.

Command line (also the ``craft-build`` console script)::

    python -m craft_ext.build            compile now if needed (ahead of time), and report
    python -m craft_ext.build --force    recompile this torch's entry from scratch
    python -m craft_ext.build --clean    delete the cache's other (stale) entries

This module imports nothing from craft_ext and imports torch only inside functions.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import NamedTuple, TextIO

# -ffp-contract=off: no floating-point contraction, kernels round like the PyTorch references
# (mean + std * z). -DNDEBUG: setuptools passes it (Python's CFLAGS), torch's JIT does not; so
# torch's debug-only header asserts are off in both builds.
CXX_FLAGS = ("-O3", "-ffp-contract=off", "-DNDEBUG")
# No --use_fast_math: it flushes float32 denormals to zero (cvt.rn.ftz, setp.ftz), so a
# filter of denormals would get max_abs 0. The kernels are memory bound.
NVCC_FLAGS = ("-O3", "-lineinfo")
CUDA_DEFINE = "-DCRAFT_EXT_WITH_CUDA"
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"  # A100, H100/H200
SOURCE_SUFFIXES = frozenset({".c", ".cc", ".cpp", ".cu", ".cuh", ".h", ".hpp"})
KEY_FORMAT = 1  # bump when the cache layout or the build recipe changes
LIB_NAME = "_C.pyd" if sys.platform == "win32" else "_C.so"

_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]\s*(.*)$")


def truthy(name: str) -> bool:
    """Whether environment variable ``name`` is set to 1/true/yes/on."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


class BuildError(RuntimeError):
    """The kernels could not be compiled; ``log`` is the compiler log when there is one."""

    def __init__(self, what: str, fix: str, log: Path | None = None) -> None:
        self.what, self.fix, self.log = what, fix, log
        where = f"; log: {log}" if log is not None else ""
        super().__init__(f"{what}{where}. To fix: {fix}")


class ExtensionConfig(NamedTuple):
    """What to compile: sources relative to the csrc directory, flags, CUDA or not."""

    with_cuda: bool
    sources: tuple[str, ...]
    cxx_flags: tuple[str, ...]
    nvcc_flags: tuple[str, ...]
    cuda_home: str | None
    cuda_arch_list: str | None


# --------------------------------------------------------------------------------------------
# what to build (shared with setup.py)


def find_cuda_home() -> str | None:
    """The CUDA toolkit directory, found as ``torch.utils.cpp_extension.CUDA_HOME`` is
    (``CUDA_HOME``, ``CUDA_PATH``, ``nvcc`` on ``PATH``, ``/usr/local/cuda``), without
    importing torch.utils.cpp_extension, which asks the CUDA driver for devices."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home is None:
        nvcc = shutil.which("nvcc")
        if nvcc is not None:
            home = os.path.dirname(os.path.dirname(nvcc))
        elif os.path.exists("/usr/local/cuda"):
            home = "/usr/local/cuda"
    return home


def source_dir() -> Path | None:
    """The C++/CUDA sources: ``craft_ext/csrc`` installed, ``csrc/`` in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    return None


def extension_config(csrc: Path, torch_module: ModuleType | None = None) -> ExtensionConfig:
    """Sources and flags for ``craft_ext._C``, as setup.py and the first-use build use them.

    CUDA sources are compiled when ``FORCE_CUDA=1``, or when torch was built with CUDA and a
    toolkit is found; whether a GPU is visible does not matter.
    """
    if torch_module is None:
        import torch as torch_module
    cuda_home = find_cuda_home()
    with_cuda = truthy("FORCE_CUDA") or (
        torch_module.version.cuda is not None and cuda_home is not None
    )
    sources = sorted(p.name for p in csrc.glob("*.cpp"))
    sources += sorted(f"cpu/{p.name}" for p in (csrc / "cpu").glob("*.cpp"))
    cxx, nvcc = list(CXX_FLAGS), list(NVCC_FLAGS)
    if with_cuda:
        sources += sorted(f"cuda/{p.name}" for p in (csrc / "cuda").glob("*.cu"))
        cxx.append(CUDA_DEFINE)
        nvcc.append(CUDA_DEFINE)
    return ExtensionConfig(
        with_cuda=with_cuda,
        sources=tuple(sources),
        cxx_flags=tuple(cxx),
        nvcc_flags=tuple(nvcc) if with_cuda else (),
        cuda_home=cuda_home if with_cuda else None,
        cuda_arch_list=(os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST)
        if with_cuda
        else None,
    )


def describe(config: ExtensionConfig) -> str:
    """``"C++ CPU"`` or ``"C++ CPU + CUDA"``."""
    return "C++ CPU + CUDA" if config.with_cuda else "C++ CPU"


# --------------------------------------------------------------------------------------------
# the cache


def cache_root() -> Path:
    """Where compiled kernels are cached: ``$TORCH_EXTENSIONS_DIR/craft_ext`` if set, else
    ``$XDG_CACHE_HOME/torch_extensions/craft_ext`` (``~/.cache/...`` without XDG_CACHE_HOME),
    beside torch's own JIT extensions."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root).expanduser() / "craft_ext"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "torch_extensions" / "craft_ext"


def cache_key(
    csrc: Path, config: ExtensionConfig, torch_module: ModuleType | None = None
) -> dict[str, object]:
    """Everything the compiled library depends on, with a hash of every source file."""
    if torch_module is None:
        import torch as torch_module
    key: dict[str, object] = {
        "format": KEY_FORMAT,
        "torch": torch_module.__version__,
        "torch_git": getattr(torch_module.version, "git_version", None),
        "torch_cuda": torch_module.version.cuda,
        "python": ".".join(map(str, sys.version_info[:2])) + getattr(sys, "abiflags", ""),
        "implementation": sys.implementation.cache_tag,
        "platform": f"{sys.platform}-{platform.machine()}",
        "config": config._asdict(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    for path in sorted(p for p in csrc.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file()):
        rel = path.relative_to(csrc).as_posix().encode()
        digest.update(len(rel).to_bytes(4, "little") + rel)
        data = path.read_bytes()
        digest.update(len(data).to_bytes(8, "little") + data)
    key["hash"] = digest.hexdigest()
    return json.loads(json.dumps(key))  # as read back from build.json (tuples become lists)


def entry_name(key: dict[str, object]) -> str:
    """``torch<version>-py<XY>-<cpu|cu<XYZ>>-<hash16>``: the key's cache directory name."""
    config = key["config"]
    assert isinstance(config, dict)
    kind = f"cu{str(key['torch_cuda']).replace('.', '')}" if config["with_cuda"] else "cpu"
    py = "py" + str(key["python"]).replace(".", "")
    name = f"torch{key['torch']}-{py}-{kind}-{str(key['hash'])[:16]}"
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", name)


class Target(NamedTuple):
    """One build: sources, config, key and cache entry."""

    csrc: Path
    config: ExtensionConfig
    key: dict[str, object]
    entry: Path

    @property
    def library(self) -> Path:
        return self.entry / LIB_NAME

    @property
    def log(self) -> Path:
        return self.entry / "build.log"


def target(csrc: Path | None = None, root: Path | None = None) -> Target:
    """The cache entry for this torch, Python and these sources (nothing is built)."""
    csrc = csrc if csrc is not None else source_dir()
    if csrc is None:
        raise BuildError(
            "craft_ext's C++ sources (csrc/) are missing from this installation",
            "reinstall craft_ext (`pip install .` from a checkout, or the wheel)",
        )
    config = extension_config(csrc)
    key = cache_key(csrc, config)
    return Target(csrc, config, key, (root or cache_root()) / entry_name(key))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def ready(t: Target) -> bool:
    """Whether the entry holds a complete build for exactly this key."""
    stamp = _read_json(t.entry / "build.json")
    return stamp is not None and stamp.get("key") == t.key and t.library.is_file()


# --------------------------------------------------------------------------------------------
# locking


@contextlib.contextmanager
def _locked(path: Path, say: _Say) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (released when the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd):
            try:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "?"
            except OSError:
                holder = "?"
            say(f"waiting for another process ({holder}) compiling the kernels into {path.stem}")
            _lock(fd)
            say.waited = True
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"pid {os.getpid()} on {platform.node()}".encode())
        yield
    finally:
        os.close(fd)


if sys.platform == "win32":  # pragma: no cover - not tested on Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _lock(fd: int) -> None:
        while not _try_lock(fd):
            time.sleep(0.5)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)


# --------------------------------------------------------------------------------------------
# compiling


class _Say:
    """One-line messages to stderr, prefixed ``craft_ext:``."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.quiet, self.stream, self.waited = quiet, stream or sys.stderr, False

    def __call__(self, message: str, end: str = "\n") -> None:
        if not self.quiet:
            print(f"craft_ext: {message}", file=self.stream, end=end, flush=True)


class _Progress:
    """Shows ninja's ``[done/total]`` steps: a live line on a terminal, a line per step else."""

    def __init__(self, say: _Say, start: float) -> None:
        self.say, self.start = say, start
        self.tty = not say.quiet and hasattr(say.stream, "isatty") and say.stream.isatty()
        self.text = "compiling"
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True) if self.tty else None

    def __enter__(self) -> _Progress:
        if self._ticker is not None:
            self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            print(file=self.say.stream, flush=True)

    def _show(self) -> None:
        line = f"  {self.text} ({time.monotonic() - self.start:.0f} s)"
        with self._mutex:
            if self.tty:  # rewrite the same line
                print(f"\r\033[Kcraft_ext: {line}", end="", file=self.say.stream, flush=True)
            else:
                self.say(line)

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self._show()

    def feed(self, line: str) -> None:
        step = _NINJA_STEP.match(line.strip())
        if step is None:
            return
        done, total, command = step.groups()
        source = re.search(r"\s-c\s+(\S+)", command)
        if source is not None:
            what = Path(source.group(1).strip(chr(34) + chr(39))).name
        elif "-shared" in command or LIB_NAME in command:
            what = f"{LIB_NAME} (link)"
        else:
            what = command.split(" ", 1)[0]
        self.text = f"[{done}/{total}] {what} done"
        self._show()


def _tool_path() -> str:
    """PATH for the compile: the interpreter's scripts folder and ninja's first (a venv's
    ``bin`` is not on PATH when its python is run without activating the venv)."""
    extra = [os.path.dirname(sys.executable)]
    with contextlib.suppress(Exception):
        import sysconfig

        extra.append(sysconfig.get_path("scripts"))
    with contextlib.suppress(Exception):
        import ninja  # the PyPI package (a runtime dependency of craft_ext)

        extra.append(str(ninja.BIN_DIR))
    return os.pathsep.join([*dict.fromkeys(extra), os.environ.get("PATH", "")])


def _toolchain(config: ExtensionConfig, path: str) -> dict[str, str | None]:
    """The tools a compile would use (None: not found)."""
    cxx = os.environ.get("CXX", "cl" if sys.platform == "win32" else "c++")
    tools = {"cxx": shutil.which(cxx, path=path) or None, "ninja": shutil.which("ninja", path=path)}
    if config.with_cuda:
        nvcc = Path(config.cuda_home or "", "bin", "nvcc")
        tools["nvcc"] = str(nvcc) if nvcc.is_file() else None
    return tools


def _check_toolchain(config: ExtensionConfig, tools: dict[str, str | None]) -> None:
    cxx = os.environ.get("CXX", "c++")
    if tools["cxx"] is None:
        raise BuildError(
            f"no C++ compiler: `{cxx}` is not on PATH",
            "install one (e.g. `apt-get install g++`, or `conda install gxx`) or point CXX at "
            "it, then run `python -m craft_ext.build`",
        )
    if tools["ninja"] is None:
        raise BuildError(
            "ninja is not installed", "`pip install ninja`, then run `python -m craft_ext.build`"
        )
    if config.with_cuda and tools.get("nvcc") is None:
        raise BuildError(
            f"torch has CUDA but the CUDA toolkit at {config.cuda_home} has no bin/nvcc",
            "install the CUDA toolkit matching torch.version.cuda and set CUDA_HOME, or unset "
            "FORCE_CUDA / set CUDA_HOME to an empty folder for a CPU-only build",
        )


def _first_error(log: Path) -> str:
    """What failed, from a build log: the first compiler error, else the exception that ended
    the build, else the last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return "see the log"
    lines = [line for line in lines if line]
    patterns = (
        r"(^|:\s*)(fatal )?error\b",  # gcc / clang / nvcc: "file:line:col: error: ..."
        r"^[A-Za-z_][\w.]*(Error|Exception): ",  # the exception ending a traceback (last)
        r"^FAILED: ",
    )
    for i, pattern in enumerate(patterns):
        found = [line for line in lines if re.search(pattern, line)]
        if found:
            return (found[-1] if i == 1 else found[0])[:300]
    return lines[-1][:300] if lines else "no output"


_CHILD = (
    "import importlib.util as u, sys; s = u.spec_from_file_location('craft_ext_build', "
    "sys.argv[1]); m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m); "
    "sys.exit(m._compile_child(sys.argv[2]))"
)


def _compile_child(spec_json: str) -> int:
    """Run in a separate interpreter: compile with torch.utils.cpp_extension.load and load the
    result once (output: the build log). Returns the exit status."""
    spec = json.loads(spec_json)
    if spec["cuda_arch_list"]:
        os.environ["TORCH_CUDA_ARCH_LIST"] = spec["cuda_arch_list"]
    from torch.utils import cpp_extension

    version = getattr(cpp_extension, "min_supported_cpython", "0x030A0000")
    limited_api = f"-DPy_LIMITED_API={version}"  # as torch's BuildExtension (py_limited_api)
    build_dir = spec["entry"]
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(build_dir, "lock"))  # torch's own baton, left by a killed build
    print(f"craft_ext: torch {spec['torch']}, sources {spec['csrc']}", flush=True)
    module = cpp_extension.load(
        name="_C",
        sources=[os.path.join(spec["csrc"], s) for s in spec["sources"]],
        extra_cflags=[*spec["cxx_flags"], limited_api],
        extra_cuda_cflags=[*spec["nvcc_flags"], limited_api] if spec["with_cuda"] else None,
        extra_include_paths=[spec["csrc"]],
        build_directory=build_dir,
        verbose=True,
        with_cuda=spec["with_cuda"],
        is_python_module=True,
    )
    print(f"craft_ext: built and loaded {module.__file__}", flush=True)
    return 0


def _compile(t: Target, say: _Say, tools: dict[str, str | None], path: str) -> None:
    import torch

    t.entry.mkdir(parents=True, exist_ok=True)
    for name in ("build.json", "failed.json"):
        with contextlib.suppress(FileNotFoundError):
            (t.entry / name).unlink()
    spec = {
        "torch": torch.__version__,
        "csrc": str(t.csrc),
        "entry": str(t.entry),
        **t.config._asdict(),
    }
    env = {**os.environ, "PATH": path}
    cuda_note = ", longer with CUDA" if t.config.with_cuda else ""
    say(
        f"compiling the {describe(t.config)} kernels for torch {torch.__version__}, once "
        f"(~2 min for the C++ kernels on 2 cores{cuda_note})"
    )
    say(f"  into {t.entry}")
    say(f"  log: {t.log}")
    start = time.monotonic()
    with (
        open(t.log, "w") as log,
        _Progress(say, start) as progress,
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(Path(__file__).resolve()), json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=env,
            cwd=t.entry,
        ) as proc,
    ):
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                progress.feed(line)
            code = proc.wait()
        except BaseException:  # Ctrl-C: stop the compiler too, record nothing
            proc.kill()
            raise
    elapsed = time.monotonic() - start
    if code != 0 or not t.library.is_file():
        reason = _first_error(t.log)
        _write_json(
            t.entry / "failed.json",
            {"key": t.key, "tools": tools, "reason": reason, "time": time.time()},
        )
        raise BuildError(
            f"compiling the {describe(t.config)} kernels failed after {elapsed:.0f} s ({reason})",
            "read the log; a compiler with C++20 support (GCC >= 10 or Clang >= 12) is needed"
            + (" and a CUDA toolkit matching torch.version.cuda" if t.config.with_cuda else "")
            + "; then run `python -m craft_ext.build`",
            t.log,
        )
    _write_json(
        t.entry / "build.json",
        {"key": t.key, "tools": tools, "seconds": round(elapsed, 1), "time": time.time()},
    )
    say(f"compiled in {elapsed:.0f} s; later imports load the kernels from {t.entry}")


def ensure_built(
    force: bool = False,
    retry_failed: bool = False,
    quiet: bool = False,
    csrc: Path | None = None,
    root: Path | None = None,
) -> Path:
    """Path of the compiled ``_C`` library for this torch, compiling it first if needed.

    Args:
        force: recompile even if the cache entry is complete.
        retry_failed: compile again even if the last attempt with the same tools failed
            (otherwise that failure is raised again at once).
        quiet: no messages on stderr.
        csrc, root: sources and cache root (default: this package's, :func:`cache_root`).

    Raises:
        BuildError: the kernels could not be compiled (what failed, the log, how to fix).
    """
    t = target(csrc, root)
    if not force and ready(t):
        return t.library
    say = _Say(quiet)
    path = _tool_path()
    try:
        t.entry.parent.mkdir(parents=True, exist_ok=True)
        probe = t.entry.parent / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise BuildError(
            f"the kernel cache {t.entry.parent} is not writable ({exc})",
            "set TORCH_EXTENSIONS_DIR to a writable folder, or run `python -m craft_ext.build` "
            "once as a user who can write there",
        ) from exc
    with _locked(t.entry.with_name(t.entry.name + ".lock"), say):
        if not force and ready(t):  # another process compiled it while we waited
            if say.waited:
                say(f"kernels compiled by the other process are ready ({t.entry})")
            return t.library
        tools = _toolchain(t.config, path)
        _check_toolchain(t.config, tools)
        failed = _read_json(t.entry / "failed.json")
        if (
            failed is not None
            and not (force or retry_failed)
            and failed.get("key") == t.key
            and failed.get("tools") == tools
        ):
            raise BuildError(
                f"an earlier compile of the kernels for this torch failed ({failed.get('reason')}) "
                "and is not retried at every import",
                "read the log, fix the compiler or toolkit, then run `python -m craft_ext.build`",
                t.log,
            )
        if force and t.entry.exists():
            trash = t.entry.with_name(f"{t.entry.name}.old-{os.getpid()}")
            os.replace(t.entry, trash)  # a loaded library stays valid while its file is deleted
            shutil.rmtree(trash, ignore_errors=True)
        _compile(t, say, tools, path)
    return t.library


def load(library: Path) -> ModuleType:
    """Import a compiled library as ``craft_ext._C`` (registers ``torch.ops.craft_ext.*``)."""
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.ExtensionFileLoader("craft_ext._C", str(library))
    spec = importlib.util.spec_from_file_location("craft_ext._C", library, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules["craft_ext._C"] = module
    parent = sys.modules.get("craft_ext")
    if parent is not None:
        parent._C = module  # type: ignore[attr-defined]
    return module


def clean(keep: Path | None, root: Path | None = None, quiet: bool = False) -> list[Path]:
    """Delete cache entries other than ``keep`` (skipping any being compiled right now)."""
    root = root or cache_root()
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for entry in sorted(p for p in root.iterdir() if p.is_dir()):
        if keep is not None and entry.resolve() == keep.resolve():
            continue
        lock = entry.with_name(entry.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if not _try_lock(fd):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            lock.unlink()
    _Say(quiet)(f"removed {len(removed)} stale cache entr{'y' if len(removed) == 1 else 'ies'}")
    return removed


# --------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    """``python -m craft_ext.build``: compile the kernels now (if needed) and report."""
    parser = argparse.ArgumentParser(
        prog="python -m craft_ext.build",
        description="Compile craft_ext's C++/CUDA kernels for the installed torch into the "
        f"cache ({cache_root()}; TORCH_EXTENSIONS_DIR moves it), as the first "
        "`import craft_ext` would.",
    )
    parser.add_argument("--force", action="store_true", help="recompile from scratch")
    parser.add_argument(
        "--clean", action="store_true", help="delete cache entries of other torch versions/sources"
    )
    args = parser.parse_args(argv)

    from craft_ext import _extension

    say = _Say(stream=sys.stdout)
    info = _extension.EXTENSION_INFO
    prebuilt = info.get("origin") == "prebuilt"
    try:
        t = target()
        if args.force or not (prebuilt or ready(t)):
            ensure_built(force=args.force, retry_failed=True)
        if not _extension.extension_loaded() and "craft_ext._C" not in sys.modules:
            load(t.library)  # check it imports here too
    except (BuildError, ImportError, OSError) as exc:
        _Say()(f"ERROR: {exc}")
        return 1
    if args.clean:
        clean(keep=t.entry)
    if prebuilt:
        say(f"kernels ({describe(t.config)}) in use: the prebuilt {info.get('path')}")
        say(f"  (imports use it before the cache; cache entry for this torch: {t.entry})")
    else:
        say(f"kernels ({describe(t.config)}) ready in {t.entry}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
