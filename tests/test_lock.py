"""One run per workdir: the lock file, its stale and foreign cases, and two real runs."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from jdiff.train import lock

import helpers


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def _write(workdir, **holder):
  with open(os.path.join(workdir, lock.FILE), "w") as f:
    json.dump(dict(since="2026-01-01 00:00:00", command="jdiff.main ...", **holder), f)


def test_a_held_workdir_refuses_a_second_run_and_is_free_after_release(tmp_path):
  me = lock.acquire(str(tmp_path))
  held = json.load(open(tmp_path / lock.FILE))
  assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and lock.alive(held)
  with pytest.raises(lock.WorkdirInUse, match=f"in use by process {os.getpid()} on host {socket.gethostname()}"):
    lock.acquire(str(tmp_path))
  lock.release(str(tmp_path), me)
  assert os.listdir(tmp_path) == []
  with lock.hold(str(tmp_path)):
    assert os.path.exists(tmp_path / lock.FILE)
  assert os.listdir(tmp_path) == []


def test_a_dead_process_lock_is_taken_over_with_a_warning(tmp_path, caplog):
  pid = _dead_pid()
  _write(tmp_path, host=socket.gethostname(), pid=pid, start=None)
  with caplog.at_level(logging.WARNING, logger="jdiff.train.lock"):
    me = lock.acquire(str(tmp_path))
  assert f"taking over the lock of process {pid}" in caplog.text
  assert json.load(open(tmp_path / lock.FILE))["pid"] == os.getpid()
  lock.release(str(tmp_path), me)
  assert os.listdir(tmp_path) == []  # nothing left behind: no stale copy, no temporary file


def test_a_reused_pid_does_not_keep_a_stale_lock(tmp_path):
  # This process's pid, but the lock's process started at another time: a dead run whose
  # pid was given to us.
  _write(tmp_path, host=socket.gethostname(), pid=os.getpid(), start="1")
  if lock._start_time(os.getpid()) is None:
    pytest.skip("no /proc: the start time cannot be checked")
  me = lock.acquire(str(tmp_path))
  lock.release(str(tmp_path), me)


def test_a_lock_from_another_host_is_respected_and_names_the_file(tmp_path):
  _write(tmp_path, host="some-other-host", pid=1234, start="5")
  with pytest.raises(lock.WorkdirInUse, match=r"process 1234 on host some-other-host .*remove .*jdiff\.lock"):
    lock.acquire(str(tmp_path))
  assert json.load(open(tmp_path / lock.FILE))["host"] == "some-other-host"  # left alone


def test_a_second_jdiff_main_into_a_running_workdir_fails_at_once(tmp_path):
  workdir = str(tmp_path / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  args = [sys.executable, "-m", "jdiff.main", "--config=configs/mmdit_256.py:test", f"--workdir={workdir}",
          "--config.train.sample_every=0", "--config.train.checkpoint_every=100000"]
  first = subprocess.Popen(args + ["--config.train.num_steps=100000"], cwd=helpers.ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(workdir, lock.FILE)):
      assert first.poll() is None and time.time() < deadline, "the first run did not start"
      time.sleep(0.2)
    second = subprocess.run(args + ["--config.train.num_steps=4"], cwd=helpers.ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert second.returncode != 0
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith("error: workdir") and f"in use by process {first.pid}" in last, second.stderr[-2000:]
    assert first.poll() is None  # the running job is untouched
  finally:
    first.kill()
    first.wait()


def test_an_unreadable_lock_is_removed_only_once_it_is_old(tmp_path):
  path = tmp_path / lock.FILE
  path.write_text("{not json")  # a lock being written, or a damaged one
  with pytest.raises(lock.WorkdirInUse, match="could not take the lock"):
    lock.acquire(str(tmp_path))  # fresh: it may be another run's lock being created
  assert path.read_text() == "{not json"
  old = time.time() - 120
  os.utime(path, (old, old))
  me = lock.acquire(str(tmp_path))
  assert json.load(open(path))["pid"] == os.getpid()
  lock.release(str(tmp_path), me)
  assert os.listdir(tmp_path) == []
