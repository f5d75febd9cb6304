"""Shared fixtures: a hermetic library cache for the tests."""

import os
import tempfile

os.environ.setdefault("LEAN_TVM_CACHE", os.path.join(tempfile.gettempdir(), "lean_tvm_test_cache"))
