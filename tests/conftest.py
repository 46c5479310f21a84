"""Test setup: 8 fake CPU devices and the test processes' XLA settings (xla_env.py), set
before JAX initialises (never in library code), and one persistent XLA compilation cache
for the session and the CLI subprocesses it starts (many tests compile the same train step;
the cache only skips recompiling identical programs). `pytest -n auto` (pytest-xdist) runs
the tests in up to four worker processes that share the cache."""

import fcntl
import os
import shutil
import tempfile

import pytest

import xla_env

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_env.flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_cache = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jdiff_test_xla_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"



@pytest.fixture(autouse=True, scope="session")
def _single_replica_saves():
  """Orbax splits the device-to-host copy of a replicated array among its replicas, one
  sliced program per array shape and device; on 8 fake devices sharing 2 cores those
  compilations cost seconds per save and buy nothing. What is saved is the same."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
                                          override=True)
  yield


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory, worker_id):
  """shared_run(name, *cli_args) -> workdir: a run of `python -m jdiff.main *cli_args
  --workdir=...` trained once per session under `name` and shared by the xdist workers (the
  first to ask trains it, under a file lock; the others wait and reuse it). Module-scoped
  fixtures would be trained again by every worker, and again whenever a worker comes back
  to the module after another one's tests. Tests only read these runs, or copy them."""
  import helpers  # pylint: disable=g-import-not-at-top

  base = tmp_path_factory.getbasetemp()
  root = base if worker_id == "master" else base.parent  # the session's, not the worker's

  def run(name: str, *args: str) -> str:
    work, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not done.exists():
        shutil.rmtree(work, ignore_errors=True)
        helpers.cli("jdiff.main", *args, f"--workdir={work}")
        done.write_text(" ".join(args))
      elif done.read_text() != " ".join(args):
        raise ValueError(f"shared run {name!r} was trained with other arguments: {done.read_text()}")
    return str(work)

  return run


@pytest.fixture(scope="session")
def tiny_run(shared_run):
  """A finished run of configs/mmdit_256.py:test through `python -m jdiff.main` (4 steps, one
  device, no sample grids). Tests only read it: sample or evaluate it, or start another run
  from it with init_from."""
  return shared_run("tiny_run", "--config=configs/mmdit_256.py:test", "--config.train.sample_every=0")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
  """`-n auto`: one worker per core this process may use, at most four (each worker holds its
  own JAX runtime with 8 fake devices and peaks at a few GB while a sharded step compiles)."""
  del config
  return max(1, min(len(os.sched_getaffinity(0)), 4))


def pytest_collection_modifyitems(session, config, items):
  """Tests marked `heavy` (tens of seconds each) run first. xdist hands the first quarter of
  the collection out at the start and the rest on demand, so with the long tests in that first
  part the workers end on short ones and finish together, instead of one worker running a
  long test alone at the end. A stable sort: every other order is kept."""
  del session, config
  items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


def pytest_sessionfinish(session, exitstatus):
  if _cache:
    shutil.rmtree(_cache, ignore_errors=True)
