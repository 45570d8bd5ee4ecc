"""Compiling the kernels: what setup.py and the first-use build share, the compile cache (keys,
stale entries, failures, locking) and, end to end, a wheel built with pip's build isolation
installed in a fresh venv (compiled once on first import by two processes at once)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import REPO

from craft_ext import build

CSRC = REPO / "csrc"
TORCH_VERSION = torch.__version__.split("+")[0]


def _fake_compiler(tmp_path: Path, name: str = "fake-c++") -> tuple[Path, Path]:
    """A C++ 'compiler' that records its arguments, answers version probes and fails every
    compile: (script, record)."""
    record = tmp_path / f"{name}.calls"
    script = tmp_path / name
    script.write_text(
        f'#!/bin/sh\necho "$*" >> "{record}"\n'
        'case " $* " in *" -c "*) ;; *) echo 12.2.0; exit 0;; esac\n'
        'echo "fake-c++: error: this compiler always fails" >&2\nexit 1\n'
    )
    script.chmod(0o755)
    return script, record


def _compile_calls(record: Path) -> list[str]:
    """Recorded calls that compiled a source file (not version probes)."""
    if not record.exists():
        return []
    return [line for line in record.read_text().splitlines() if " -c " in f" {line} "]


@pytest.fixture
def csrc_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "csrc"
    shutil.copytree(CSRC, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("FORCE_CUDA", "TORCH_CUDA_ARCH_LIST", "CXX", "TORCH_EXTENSIONS_DIR"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# --------------------------------------------------------------------------------------------
# what is compiled


def test_config_uses_torch_standard_flags_and_no_contraction(clean_env):
    config = build.extension_config(CSRC)
    assert "-ffp-contract=off" in config.cxx_flags
    assert not [f for f in config.cxx_flags + config.nvcc_flags if f.startswith("-std")]
    assert config.sources[0] == "ops.cpp"
    assert {f"cpu/{p.name}" for p in (CSRC / "cpu").glob("*.cpp")} <= set(config.sources)
    assert config.with_cuda == (
        torch.version.cuda is not None and build.find_cuda_home() is not None
    )
    if not config.with_cuda:
        assert not [s for s in config.sources if s.endswith(".cu")]


def test_force_cuda_adds_the_cuda_sources_and_define(clean_env):
    clean_env.setenv("FORCE_CUDA", "1")
    config = build.extension_config(CSRC)
    assert config.with_cuda
    assert {f"cuda/{p.name}" for p in (CSRC / "cuda").glob("*.cu")} <= set(config.sources)
    assert build.CUDA_DEFINE in config.cxx_flags and build.CUDA_DEFINE in config.nvcc_flags
    assert config.cuda_arch_list == build.DEFAULT_CUDA_ARCH_LIST
    assert not [f for f in config.nvcc_flags if f.startswith("-std") or "fast_math" in f]


def test_setup_py_compiles_the_same_sources_and_flags_and_ships_csrc(clean_env):
    """setup.py (an install-time build) and the first-use build compile the same thing."""
    import runpy

    import setuptools

    captured: dict = {}
    clean_env.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    clean_env.delenv("CRAFT_EXT_NO_EXTENSION", raising=False)
    clean_env.setattr(sys, "argv", ["setup.py", "--name"])
    runpy.run_path(str(REPO / "setup.py"), run_name="__main__")
    config = build.extension_config(CSRC)
    (ext,) = captured["ext_modules"]
    assert ext.name == "craft_ext._C"
    assert ext.sources == [os.path.join("csrc", *s.split("/")) for s in config.sources]
    assert ext.extra_compile_args["cxx"] == list(config.cxx_flags)
    assert ext.extra_compile_args.get("nvcc", []) == list(config.nvcc_flags)
    assert captured["package_dir"]["craft_ext.csrc"] == "csrc"
    assert {"craft_ext.csrc", "craft_ext.csrc.cpu", "craft_ext.csrc.cuda"} <= set(
        captured["packages"]
    )
    assert "*.cpp" in captured["package_data"]["craft_ext.csrc"]


def test_cache_root_follows_torch_and_xdg(clean_env, tmp_path):
    clean_env.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert build.cache_root() == tmp_path / "ext" / "craft_ext"
    clean_env.delenv("TORCH_EXTENSIONS_DIR")
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_root() == tmp_path / "xdg" / "torch_extensions" / "craft_ext"
    clean_env.delenv("XDG_CACHE_HOME")
    clean_env.setenv("HOME", str(tmp_path / "home"))
    assert build.cache_root() == tmp_path / "home" / ".cache" / "torch_extensions" / "craft_ext"


def test_entry_depends_on_torch_python_sources_and_flags(clean_env, csrc_copy):
    config = build.extension_config(csrc_copy)
    name = build.entry_name(build.cache_key(csrc_copy, config))
    major, minor = sys.version_info[:2]
    assert name.startswith(f"torch{torch.__version__}-py{major}{minor}-")
    assert name == build.entry_name(build.cache_key(csrc_copy, config))  # deterministic

    other_torch = types.SimpleNamespace(
        __version__="2.12.0+cpu",
        version=types.SimpleNamespace(cuda=None, git_version="0" * 40),
    )
    assert build.entry_name(build.cache_key(csrc_copy, config, other_torch)) != name
    flags = config._replace(cxx_flags=(*config.cxx_flags, "-g"))
    assert build.entry_name(build.cache_key(csrc_copy, flags)) != name
    with (csrc_copy / "common.h").open("a") as f:
        f.write("// edited\n")
    assert build.entry_name(build.cache_key(csrc_copy, config)) != name


# --------------------------------------------------------------------------------------------
# the cache: stale entries, failures, locking (a failing fake compiler: no real compile)


def _stale_entry(t: build.Target, torch_version: str) -> None:
    """A complete-looking entry at ``t.entry`` that another torch built."""
    t.entry.mkdir(parents=True)
    t.library.write_bytes(b"not a library")
    key = json.loads(json.dumps(t.key))
    key["torch"] = torch_version
    (t.entry / "build.json").write_text(json.dumps({"key": key}))


def test_stale_entry_is_rebuilt_not_loaded(clean_env, tmp_path, csrc_copy):
    fake, record = _fake_compiler(tmp_path)
    clean_env.setenv("CXX", str(fake))
    root = tmp_path / "cache"
    t = build.target(csrc_copy, root)
    _stale_entry(t, "2.12.0+cpu")
    assert not build.ready(t)

    with pytest.raises(build.BuildError) as err:
        build.ensure_built(quiet=True, csrc=csrc_copy, root=root)
    assert any("ops.cpp" in call for call in _compile_calls(record)), "no rebuild attempted"
    assert not (t.entry / "build.json").exists()  # the stale stamp is gone
    assert err.value.log == t.log and t.log.is_file()
    assert "fake-c++: error" in str(err.value) and "To fix:" in str(err.value)


def test_failed_compile_is_remembered_until_tools_change(clean_env, tmp_path, csrc_copy):
    fake, record = _fake_compiler(tmp_path)
    clean_env.setenv("CXX", str(fake))
    root = tmp_path / "cache"
    with pytest.raises(build.BuildError):
        build.ensure_built(quiet=True, csrc=csrc_copy, root=root)
    calls = len(_compile_calls(record))
    assert calls > 0

    with pytest.raises(build.BuildError, match="earlier compile"):  # not retried at import
        build.ensure_built(quiet=True, csrc=csrc_copy, root=root)
    assert len(_compile_calls(record)) == calls

    with pytest.raises(build.BuildError, match="fake-c\\+\\+: error"):  # the build command
        build.ensure_built(retry_failed=True, quiet=True, csrc=csrc_copy, root=root)
    assert len(_compile_calls(record)) > calls

    other, other_record = _fake_compiler(tmp_path, "other-c++")  # another compiler: retried
    clean_env.setenv("CXX", str(other))
    with pytest.raises(build.BuildError, match="fake-c\\+\\+: error"):
        build.ensure_built(quiet=True, csrc=csrc_copy, root=root)
    assert _compile_calls(other_record)


def test_missing_compiler_says_so(clean_env, tmp_path, csrc_copy):
    clean_env.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises(build.BuildError, match="no C\\+\\+ compiler") as err:
        build.ensure_built(quiet=True, csrc=csrc_copy, root=tmp_path / "cache")
    assert "apt-get install g++" in str(err.value)


def test_unwritable_cache_says_so(clean_env, tmp_path, csrc_copy):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    with pytest.raises(build.BuildError, match="not writable") as err:
        build.ensure_built(quiet=True, csrc=csrc_copy, root=blocked / "cache")
    assert "TORCH_EXTENSIONS_DIR" in str(err.value)


HOLD_LOCK = """
import importlib.util, pathlib, sys, time
spec = importlib.util.spec_from_file_location("b", sys.argv[1])
b = importlib.util.module_from_spec(spec)
sys.modules["b"] = b
spec.loader.exec_module(b)
with b._locked(pathlib.Path(sys.argv[2]), b._Say()):
    print("locked", flush=True)
    time.sleep(3)
"""


def test_lock_makes_a_second_process_wait(tmp_path):
    lock = tmp_path / "entry.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, build.__file__, str(lock)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        messages: list[str] = []
        start = time.monotonic()
        with build._locked(lock, _Recorder(messages)):
            waited = time.monotonic() - start
    finally:
        holder.wait(timeout=60)
    assert waited > 1.0
    assert len(messages) == 1 and f"pid {holder.pid}" in messages[0]


class _Recorder(build._Say):
    def __init__(self, messages: list[str]) -> None:
        super().__init__()
        self.messages = messages

    def __call__(self, message: str, end: str = "\n") -> None:
        self.messages.append(message)


# --------------------------------------------------------------------------------------------
# end to end: a wheel built with build isolation, in a fresh venv


def _source_files(repo: Path) -> list[str]:
    """The checkout's files (tracked and new, not ignored), as `pip install git+...` sees
    them; without git, everything but build outputs."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=repo,
            capture_output=True,
            check=True,
        ).stdout.decode()
        return [f for f in out.split("\0") if f and (repo / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "build", "dist", "__pycache__", ".pytest_cache"}
        return [
            p.relative_to(repo).as_posix()
            for p in repo.rglob("*")
            if p.is_file()
            and not skip & set(p.relative_to(repo).parts)
            and p.suffix not in {".so", ".pyd", ".o"}
            and ".egg-info" not in p.as_posix()
        ]


def _venv_env(cache: Path, **extra: str) -> dict[str, str]:
    """The environment of a user of the venv: none of this test run's craft_ext settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CRAFT_EXT_", "PYTHON", "PIP_NO_BUILD"))
        and k not in {"TORCH_EXTENSIONS_DIR", "CXX", "VIRTUAL_ENV", "FORCE_CUDA"}
    }
    env.update(TORCH_EXTENSIONS_DIR=str(cache), PYTHONNOUSERSITE="1", **extra)
    env.setdefault("MAX_JOBS", os.environ.get("MAX_JOBS", "2"))
    return env


def _run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


PROBE = """
import json, sys, time, warnings
warnings.simplefilter("always")
start = time.perf_counter()
import torch, craft_ext, craft_ext._extension as ext
from craft_ext import reference
seconds = time.perf_counter() - start
w = torch.randn(16, 3, 3, 3)
w[3] = 0
got = craft_ext.filter_stats(w, backend="cpp" if craft_ext.extension_loaded() else None)
want = reference.filter_stats(w)
print(json.dumps({
    "file": craft_ext.__file__,
    "loaded": craft_ext.extension_loaded(),
    "error": craft_ext.extension_error(),
    "info": ext.EXTENSION_INFO,
    "c_file": getattr(sys.modules.get("craft_ext._C"), "__file__", None),
    "backends": craft_ext.available_backends("cpu", "filter_stats"),
    "equal": all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, want)),
    "import_seconds": seconds,
}))
"""


def _probe(venv_python: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(venv_python), "-c", PROBE],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen, timeout: float = 120) -> tuple[dict, str, int]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0 or "ImportError" in err, err[-3000:]
    lines = out.strip().splitlines()
    return (json.loads(lines[-1]) if lines else {}), err, proc.returncode


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """A wheel built from this checkout with pip's build isolation (no torch in the build
    environment), installed in a new venv holding only torch and ninja (the wheel's other
    dependencies are not needed to import craft_ext and would cost a minute)."""
    if not (REPO / "setup.py").is_file():
        pytest.skip("needs the source checkout")
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    for rel in _source_files(REPO):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    cache = base / "cache"
    env = _venv_env(cache)
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(base / "dist"), str(src)],
        timeout=600,
        env=env,
    )
    (wheel,) = (base / "dist").glob("craft_ext-*.whl")
    _run([sys.executable, "-m", "venv", str(base / "venv")], timeout=300, env=env)
    python = base / "venv" / "bin" / "python"
    _run(
        [str(python), "-m", "pip", "install", "-q", f"torch=={TORCH_VERSION}", "ninja"],
        timeout=900,
        env=env,
    )
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], timeout=300, env=env)
    yield {"base": base, "wheel": wheel, "python": python, "cache": cache}
    shutil.rmtree(base / "venv", ignore_errors=True)  # ~1 GB of torch; pytest keeps tmp dirs


@pytest.fixture(scope="module")
def first_imports(venv) -> list[tuple[dict, str, int]]:
    """Two processes importing craft_ext at once on the empty cache."""
    assert not venv["cache"].exists()
    env = _venv_env(venv["cache"])
    procs = [_probe(venv["python"], env, venv["base"])]
    time.sleep(0.5)
    procs.append(_probe(venv["python"], env, venv["base"]))
    return [_result(p, timeout=1800) for p in procs]


@pytest.mark.slow
def test_wheel_ships_sources_and_no_binary(venv):
    with zipfile.ZipFile(venv["wheel"]) as whl:
        names = whl.namelist()
        metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "craft_ext/csrc/ops.cpp" in names
    assert {f"craft_ext/csrc/{p.relative_to(CSRC).as_posix()}" for p in CSRC.rglob("*.cpp")} <= set(
        names
    )
    assert not [n for n in names if n.endswith((".so", ".pyd", ".o"))]
    assert "Requires-Dist: ninja" in metadata
    assert venv["wheel"].name.endswith("-py3-none-any.whl")


@pytest.mark.slow
def test_isolated_wheel_compiles_once_on_first_import(venv, first_imports):
    """Two processes start at once on an empty cache: one compiles, the other waits; both
    load the same library and run the C++ filter_stats kernel."""
    site = venv["base"] / "venv"
    compiled = [err for _, err, _ in first_imports if "craft_ext: compiling" in err]
    assert len(compiled) == 1, [err[-2000:] for _, err, _ in first_imports]
    assert "(link)" in compiled[0]  # progress shown
    assert any("waiting for another process" in err for _, err, _ in first_imports)
    libraries = set()
    for result, err, code in first_imports:
        assert code == 0, err[-3000:]
        assert Path(result["file"]).is_relative_to(site), result["file"]  # the wheel's copy
        assert result["loaded"], result["error"]
        assert "cpp" in result["backends"]
        assert result["equal"]
        assert "RuntimeWarning" not in err
        libraries.add(result["c_file"])
    (library,) = libraries
    assert Path(library).is_relative_to(venv["cache"])
    assert (Path(library).parent / "build.json").is_file()


@pytest.mark.slow
def test_warm_cache_loads_without_compiler(venv, first_imports, tmp_path):
    fake, record = _fake_compiler(tmp_path)
    env = _venv_env(venv["cache"], CXX=str(fake))
    result, err, code = _result(_probe(venv["python"], env, tmp_path))
    assert code == 0 and result["loaded"], err
    assert result["info"]["origin"] == "cache"
    assert result["info"]["seconds"] < 0.5, result["info"]
    assert not record.exists(), record.read_text()
    assert "craft_ext: compiling" not in err


@pytest.mark.slow
def test_installed_stale_entry_is_rebuilt(venv, first_imports, tmp_path):
    """The compiled entry, stamped as built by another torch: not loaded, a compile starts."""
    library = Path(first_imports[0][0]["c_file"])
    stale_root = tmp_path / "cache"
    stale = stale_root / "craft_ext" / library.parent.name
    shutil.copytree(library.parent, stale)
    stamp = json.loads((stale / "build.json").read_text())
    stamp["key"]["torch"] = "2.12.0+cpu"
    (stale / "build.json").write_text(json.dumps(stamp))
    fake, record = _fake_compiler(tmp_path)
    result, err, code = _result(
        _probe(venv["python"], _venv_env(stale_root, CXX=str(fake)), tmp_path)
    )
    assert code == 0 and not result["loaded"]
    assert result["c_file"] is None
    assert _compile_calls(record)
    assert result["equal"]  # the reference path still works


@pytest.mark.slow
def test_failure_warns_once_and_require_makes_it_an_error(venv, tmp_path):
    fake, record = _fake_compiler(tmp_path)
    cache = tmp_path / "cache"
    result, err, code = _result(_probe(venv["python"], _venv_env(cache, CXX=str(fake)), tmp_path))
    assert code == 0 and not result["loaded"]
    warnings = [line for line in err.splitlines() if "RuntimeWarning: craft_ext:" in line]
    assert len(warnings) == 1, err
    log = result["info"]["log"]
    assert log and Path(log).is_file() and log in warnings[0]
    assert "fake-c++: error" in warnings[0] and "python -m craft_ext.build" in warnings[0]

    _, err, code = _result(
        _probe(
            venv["python"],
            _venv_env(cache, CXX=str(fake), CRAFT_EXT_REQUIRE_EXTENSION="1"),
            tmp_path,
        )
    )
    assert code != 0 and "ImportError" in err and "CRAFT_EXT_REQUIRE_EXTENSION=1" in err

    calls = len(_compile_calls(record))
    result, err, code = _result(
        _probe(
            venv["python"], _venv_env(cache, CXX=str(fake), CRAFT_EXT_NO_EXTENSION="1"), tmp_path
        )
    )
    assert code == 0 and not result["loaded"] and "RuntimeWarning" not in err
    assert len(_compile_calls(record)) == calls


@pytest.mark.slow
def test_build_command_reports_ready(venv, first_imports, tmp_path):
    env = _venv_env(venv["cache"])
    out = _run([str(venv["python"]), "-m", "craft_ext.build"], timeout=300, env=env, cwd=tmp_path)
    assert "ready in" in out.stdout and "craft_ext: compiling" not in out.stderr
    assert "RuntimeWarning" not in out.stderr
    assert (venv["base"] / "venv" / "bin" / "craft-build").is_file()
