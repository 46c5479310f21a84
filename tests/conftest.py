"""Test setup: 8 fake CPU devices, set before JAX initialises (never in library code), and
one persistent XLA compilation cache for the session and the CLI subprocesses it starts
(many tests compile the same train step; the cache only skips recompiling identical
programs). `pytest -n auto` (pytest-xdist) runs the tests in up to four worker processes
that share the cache."""

import os
import shutil
import tempfile

import pytest

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_cache = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jdiff_test_xla_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
  """`-n auto`: one worker per core this process may use, at most four (each worker holds its
  own JAX runtime with 8 fake devices and peaks at a few GB while a sharded step compiles)."""
  del config
  return max(1, min(len(os.sched_getaffinity(0)), 4))


def pytest_sessionfinish(session, exitstatus):
  if _cache:
    shutil.rmtree(_cache, ignore_errors=True)
