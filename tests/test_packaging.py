"""Packaging promises: light import, the compiled extension, the kernels namespace, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import craft_ext

PACKAGE_PARENT = Path(craft_ext.__file__).resolve().parent.parent
FROM_SOURCE = (PACKAGE_PARENT / "setup.py").is_file()


def _env() -> dict[str, str]:
    """Environment in which a subprocess imports the same craft_ext as this test run."""
    return {**os.environ, "PYTHONPATH": str(PACKAGE_PARENT)}


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_does_not_initialise_cuda(tmp_path):
    out = _python(
        "import torch, craft_ext; assert not torch.cuda.is_initialized(); print('ok')", tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


@pytest.mark.skipif(
    os.environ.get("CRAFT_EXT_REQUIRE_EXTENSION") != "1",
    reason="set CRAFT_EXT_REQUIRE_EXTENSION=1 (as .ci/run does) to require the compiled kernels",
)
def test_compiled_extension_is_loaded():
    assert craft_ext.extension_loaded(), craft_ext.extension_error()


def test_built_extension_loads_without_compiler(tmp_path):
    """A prebuilt (install-time) or cached (first-use) extension loads in a new process with
    no compiler call and no noticeable delay."""
    if not craft_ext.extension_loaded():
        pytest.skip(f"compiled extension not loaded ({craft_ext.extension_error()})")
    record = tmp_path / "calls"
    fake = tmp_path / "fake-c++"
    fake.write_text(f'#!/bin/sh\necho "$*" >> "{record}"\nexit 1\n')
    fake.chmod(0o755)
    code = (
        "import json, craft_ext, craft_ext._extension as e; "
        "print(json.dumps([craft_ext.extension_loaded(), e.EXTENSION_INFO]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**_env(), "CXX": str(fake)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    loaded, info = json.loads(out.stdout.splitlines()[-1])
    assert loaded and info["origin"] in {"prebuilt", "cache"}, info
    assert info["seconds"] < 0.5, info
    assert not record.exists(), record.read_text()
    assert "craft_ext: compiling" not in out.stderr


@pytest.mark.skipif(FROM_SOURCE, reason="checks the installed layout; craft_ext is a checkout")
def test_kernels_live_under_craft_ext_only(tmp_path):
    """Installed, the Triton kernels are craft_ext.kernels; no top-level `kernels` package."""
    code = (
        "import importlib.util, craft_ext, craft_ext._extension as e; "
        "print(importlib.util.find_spec('kernels') is None, e.KERNELS is not None, "
        "getattr(e.KERNELS, '__name__', None))"
    )
    out = _python(code, tmp_path)
    assert out.returncode == 0, out.stderr
    no_top_level, have_kernels, name = out.stdout.split()
    assert no_top_level == "True"
    if have_kernels == "True":
        assert name == "craft_ext.kernels"


def test_demo_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "craft_ext.demo", "--filters", "16", "--inactive", "5"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=_env(),
    )
    assert out.returncode == 0, out.stderr
    assert "reactivated 5" in out.stdout
    assert "inactive  0/16" in out.stdout


def test_every_public_submodule_is_an_attribute():
    """``craft_ext.<module>`` works (lazily) for every public module and subpackage."""
    pkg = Path(craft_ext.__file__).resolve().parent
    names = {p.stem for p in pkg.glob("*.py") if not p.stem.startswith("_")}
    names |= {p.parent.name for p in pkg.glob("*/__init__.py") if p.parent.name != "kernels"}
    for name in sorted(names):
        assert getattr(craft_ext, name).__name__ == f"craft_ext.{name}", name
