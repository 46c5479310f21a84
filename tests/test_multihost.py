"""Two processes on localhost (CPU, gloo collectives, 2 fake devices each) train the same
steps as one process with 4 devices and the same global batch: same loss trajectory."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import helpers
import xla_env

# Two JAX processes that share 2 cores: never beside the Inception tests (test_fid.py), whose
# CPU load slows one of them far behind the other (the trainer's barrier before step 1 keeps
# that from failing gloo's 30 s set-up deadline; this keeps the tests' time down).
pytestmark = [pytest.mark.xdist_group("cpu_heavy"), pytest.mark.heavy]

STEPS = 4
COMMON = ["--config=configs/mmdit_256.py:test", f"--config.train.num_steps={STEPS}", "--config.train.log_every=1",
          "--config.train.sample_every=0", "--config.train.checkpoint_every=100", "--config.mesh.data=4",
          "--config.train.batch_size=8"]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return np.array([r["loss"] for r in rows]), np.array([r["grad_norm"] for r in rows])


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_follow_the_single_process_trajectory(tmp_path):
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  subprocess.run([sys.executable, "-m", "jdiff.main", *COMMON, f"--workdir={single}"], cwd=helpers.ROOT,
                 env=xla_env.env(4), check=True, capture_output=True, timeout=600)
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "jdiff.main", *COMMON, f"--workdir={multi}",
                             f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
                            cwd=helpers.ROOT, env=xla_env.env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  for out, _ in outs:
    assert json.loads(out.strip().splitlines()[-1])["step"] == STEPS
  loss_1, grad_1 = _losses(single)
  loss_2, grad_2 = _losses(multi)
  assert len(loss_1) == len(loss_2) == STEPS
  assert loss_1[0] != loss_1[-1]  # it trains
  np.testing.assert_allclose(loss_2, loss_1, rtol=1e-5)
  np.testing.assert_allclose(grad_2, grad_1, rtol=1e-4)


def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path):
  """A preemption notice reaches one host: both processes save the same step and exit with
  the resumable status (75), and the run resumes from that step to the end."""
  import time

  from jdiff.workdir import checkpoint as ckpt_lib

  work = str(tmp_path / "multi")
  flags = [*COMMON[:1], "--config.train.num_steps=100000", *COMMON[2:]]

  def start(steps_flag):
    port = _free_port()
    args = [a for a in flags if not a.startswith("--config.train.num_steps")] + [steps_flag]
    return [subprocess.Popen([sys.executable, "-m", "jdiff.main", *args, f"--workdir={work}",
                              f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
                             cwd=helpers.ROOT, env=xla_env.env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
            for i in range(2)]

  procs = start("--config.train.num_steps=100000")
  metrics = os.path.join(work, "metrics.jsonl")
  deadline = time.time() + 300
  while not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3) and time.time() < deadline:
    assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
    time.sleep(0.2)
  procs[1].send_signal(15)  # SIGTERM to the second process only
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 75, err[-3000:]
  summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  stopped = summaries[0]["step"]
  assert summaries[1]["step"] == stopped and all(s["stopped_by"] == "signal 15" for s in summaries)
  assert ckpt_lib.Checkpoints(work, read_only=True).latest_step() == stopped
  procs = start(f"--config.train.num_steps={stopped + 2}")
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert [json.loads(out.strip().splitlines()[-1])["step"] for out, _ in outs] == [stopped + 2] * 2
