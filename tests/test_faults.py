"""Faults injected into real `python -m jdiff.main` runs on the tiny test config: kill -9 at
random moments (during steps and during asynchronous saves), a full disk. The kill cases
must end bit-identical to an uninterrupted run; the disk case must stop with one line."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import chex
import pytest

import helpers
import xla_env
from jdiff.workdir import checkpoint as ckpt_lib
from test_train import get_config, restored

STEPS = 8
FLAGS = ["--config=configs/mmdit_256.py:test", f"--config.train.num_steps={STEPS}", "--config.train.log_every=1",
         "--config.train.checkpoint_every=1", "--config.train.sample_every=0"]
ENV = xla_env.env()


def _start(workdir, max_file_kib=None):
  """jdiff.main in a subprocess; with max_file_kib, under a file size limit that makes larger
  writes fail with EFBIG, as a full disk fails them (SIGXFSZ ignored, as bash sets it up)."""
  cmd = [sys.executable, "-m", "jdiff.main", *FLAGS, f"--workdir={workdir}"]
  if max_file_kib is not None:
    cmd = ["bash", "-c", f'trap "" XFSZ; ulimit -f {max_file_kib}; exec "$@"', "bash", *cmd]
  return subprocess.Popen(cmd, cwd=helpers.ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lines(path):
  return sum(1 for _ in open(path)) if os.path.exists(path) else 0


@pytest.mark.heavy
def test_random_kill_9_then_resume_ends_bit_identical(tmp_path):
  """Six attempts are each killed with SIGKILL a random 0-0.6 s after they logged a step
  (with a checkpoint every step, most kills land in an asynchronous save); then the run goes
  to the end. The final state and data position equal an uninterrupted run's."""
  helpers.cli("jdiff.main", *FLAGS, f"--workdir={tmp_path / 'straight'}")
  rng = random.Random(0)
  work = tmp_path / "killed"
  metrics = work / "metrics.jsonl"
  kills = 0
  for _ in range(6):
    proc = _start(work)
    seen = _lines(metrics)
    deadline = time.time() + 300
    while proc.poll() is None and _lines(metrics) <= seen and time.time() < deadline:
      time.sleep(0.05)
    time.sleep(rng.uniform(0, 0.6))
    proc.kill()
    kills += proc.wait() == -signal.SIGKILL
    proc.communicate()
  proc = _start(work)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert kills >= 3  # the faults happened
  config = get_config(train__num_steps=STEPS)
  a, a_data, _ = restored(tmp_path / "straight", config)
  b, b_data, _ = restored(work, config)
  assert int(a.step) == int(b.step) == STEPS
  chex.assert_trees_all_equal(a, b)  # params, EMA, optimizer state, step, rng
  assert a_data == b_data


def test_full_disk_stops_the_run_with_one_line_and_commits_nothing(tmp_path):
  """Every file larger than 64 KiB fails to write (the checkpoint's array files; logs and
  metrics stay small): each save fails, three in a row stop the run with exit status 2."""
  work = tmp_path / "w"
  proc = _start(work, max_file_kib=64)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 2, err[-3000:]
  # No traceback at all: not through jdiff's code, and not the 'Event loop is closed' ones
  # of TensorStore's callbacks while a failed save unwinds (cli drops those; printed from
  # several threads at once, they had split the error line).
  assert "Traceback" not in err and "exception was never retrieved" not in err, err[-3000:]
  errors = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, err[-3000:]
  last = errors[0]
  assert last.startswith("error: saving checkpoint step 3 ") and "3 saves in a row failed" in last, last
  assert "File too large" in last
  assert [n for n in os.listdir(ckpt_lib.checkpoint_dir(str(work))) if not n.startswith(".")] == []


EVERY_2 = [a for a in FLAGS if "num_steps" not in a and "checkpoint_every" not in a] + [
    "--config.train.checkpoint_every=2"]


@pytest.fixture
def straight_6(shared_run):
  """An uninterrupted 6-step run with checkpoints every 2 steps."""
  return shared_run("faults_straight_6", *EVERY_2, "--config.train.num_steps=6")


@pytest.fixture
def stopped_at_4(shared_run):
  """The same run stopped after 4 steps (checkpoints 2 and 4); each test damages a copy."""
  return shared_run("faults_stopped_at_4", *EVERY_2, "--config.train.num_steps=4")


@pytest.mark.heavy
@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "remove_item"])
def test_damaged_latest_checkpoint_through_the_cli(tmp_path, straight_6, stopped_at_4, damage):
  """The newest checkpoint damaged between two runs of the same command: the second run
  names it in one line, sets it aside, resumes from the one before and ends bit-identical
  to an uninterrupted run."""
  import test_checkpoint

  flags = EVERY_2
  work = tmp_path / "damaged"
  shutil.copytree(stopped_at_4, work)
  getattr(test_checkpoint, f"_{damage}")(os.path.join(ckpt_lib.checkpoint_dir(str(work)), "4"))
  proc = helpers.cli("jdiff.main", *flags, "--config.train.num_steps=6", f"--workdir={work}")
  named = [l for l in proc.stderr.splitlines() if "checkpoint step 4" in l]
  assert len(named) == 1 and "checkpoints_aside" in named[0], proc.stderr[-3000:]
  config = get_config(train__num_steps=6)
  a, a_data, _ = restored(straight_6, config)
  b, b_data, _ = restored(work, config)
  chex.assert_trees_all_equal(a, b)
  assert a_data == b_data
