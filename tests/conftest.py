"""Shared fixtures: a hermetic library cache for the tests, with the CPU library built into it
once per session (the run half never builds; ``lean_tvm.build.ensure_library`` does)."""

import os
import sys
import tempfile

import pytest

os.environ.setdefault("LEAN_TVM_CACHE", os.path.join(tempfile.gettempdir(), "lean_tvm_test_cache"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # helpers, paged_cases


@pytest.fixture(scope="session", autouse=True)
def cpu_library():
    """The CPU operator library in the test cache (built here on first use; needs apache-tvm)."""
    try:
        import tvm  # noqa: F401
    except ImportError:
        return None
    from lean_tvm import build

    return build.ensure_library("cpu")
