"""pytest configuration: test environment (see helpers.py) and shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import CUDA, lfw_path

import craft_ext


def pytest_report_header(config):
    return (
        f"craft_ext {craft_ext.__version__} from {Path(craft_ext.__file__).parent}; "
        f"extension_loaded={craft_ext.extension_loaded()}; "
        f"cpu backends (reactivate_)={craft_ext.available_backends('cpu', 'reactivate_')}; "
        f"cuda={CUDA}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
    )


@pytest.fixture
def lfw_dir() -> Path:
    """The LFW 112x112 data set beside the checkout (CI has it); skip if absent."""
    path = lfw_path()
    if not (path / "images").is_dir():
        pytest.skip(f"LFW data not found at {path}")
    return path
