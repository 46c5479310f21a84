"""Checkpoints that survive bad files and bad disks: checksums, fallback to the newest
checkpoint that restores, an explicit restore step, failed and interrupted saves."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import chex
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jdiff.workdir import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ml_collections.ConfigDict({"seed": 0})


def _state(step):
  return {"step": jnp.asarray(step), "w": jnp.arange(4096, dtype=jnp.float32) * step}


def _iterator():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def _write(workdir, steps):
  """Checkpoints at `steps` of a state whose values say their step; the data iterator is
  advanced `step` records at each."""
  ckpt = ckpt_lib.Checkpoints(str(workdir), keep=10)
  it, seen = _iterator(), 0
  for step in steps:
    for _ in range(step - seen):
      next(it)
    seen = step
    ckpt.save(step, _state(step), it, CONFIG, [{"stage": "test", "step": step}])
  ckpt.close()


def _restore(workdir, step=None, read_only=False):
  ckpt = ckpt_lib.Checkpoints(str(workdir), read_only=read_only)
  it = _iterator()
  try:
    state, lineage, got = ckpt.restore(jax.eval_shape(lambda: _state(0)), it, step)
  finally:
    ckpt.close()
  return state, lineage, got, next(it)


def _step_dir(workdir, step):
  return os.path.join(ckpt_lib.checkpoint_dir(str(workdir)), str(step))


def _largest_file(step_dir, under="state"):
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, under)) for f in fs]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_byte(step_dir):
  path = _largest_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0x10]))


def _remove_item(step_dir):
  import shutil
  shutil.rmtree(os.path.join(step_dir, "data"))


def _garble_metadata(step_dir):
  with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
    f.write('{"tree_metadata": {"unterminated')


def test_checksums_cover_every_file_and_verify_clean(tmp_path):
  _write(tmp_path, [2])
  step_dir = _step_dir(tmp_path, 2)
  sums = json.load(open(os.path.join(step_dir, ckpt_lib.CHECKSUMS)))["files"]
  on_disk = {os.path.relpath(os.path.join(d, f), step_dir) for d, _, fs in os.walk(step_dir) for f in fs}
  assert set(sums) == {rel for rel in on_disk if "/" in rel}  # every file of every item
  assert any(rel.startswith("state/") for rel in sums) and any(rel.startswith("data/") for rel in sums)
  assert ckpt_lib.verify_checksums(step_dir) is None


@pytest.mark.parametrize("damage, expect", [
    (_truncate, "truncated"),
    (_flip_byte, "checksum mismatch"),
    (_remove_item, "is missing"),
    (_garble_metadata, "state/_METADATA"),
])
def test_damaged_latest_is_set_aside_and_the_next_older_restores(tmp_path, caplog, damage, expect):
  _write(tmp_path, [2, 4, 6])
  damage(_step_dir(tmp_path, 6))
  with caplog.at_level(logging.ERROR, logger="jdiff.workdir.checkpoint"):
    state, lineage, step, next_record = _restore(tmp_path)
  assert step == 4 and int(state["step"]) == 4
  np.testing.assert_array_equal(state["w"], np.asarray(_state(4)["w"]))
  assert lineage == [{"stage": "test", "step": 4}]
  assert next_record == 4  # the data iterator is rewound to step 4's position
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 1, lines  # one line per bad checkpoint
  assert "step 6" in lines[0] and ckpt_lib.checkpoint_dir(str(tmp_path)).name in lines[0] and expect in lines[0]
  aside = os.listdir(ckpt_lib.aside_dir(str(tmp_path)))
  assert len(aside) == 1 and aside[0].startswith("6.corrupt.")  # kept, not deleted
  assert sorted(ckpt_lib.Checkpoints(str(tmp_path), read_only=True).manager.all_steps()) == [2, 4]


def test_a_flipped_byte_without_checksums_would_restore_silently(tmp_path):
  """Why the checksums exist: Orbax reads a changed data byte back without complaint."""
  _write(tmp_path, [2])
  step_dir = _step_dir(tmp_path, 2)
  os.remove(os.path.join(step_dir, ckpt_lib.CHECKSUMS))
  _flip_byte(step_dir)
  state, _, step, _ = _restore(tmp_path)
  assert step == 2
  assert not np.array_equal(state["w"], np.asarray(_state(2)["w"]))


def test_when_nothing_restores_the_error_lists_every_step_and_moves_nothing(tmp_path):
  _write(tmp_path, [2, 4])
  _truncate(_step_dir(tmp_path, 4))
  _flip_byte(_step_dir(tmp_path, 2))
  with pytest.raises(ckpt_lib.CheckpointError) as err:
    _restore(tmp_path)
  message = str(err.value)
  assert "\n" not in message and "step 4:" in message and "step 2:" in message
  assert sorted(os.listdir(ckpt_lib.checkpoint_dir(str(tmp_path)))) == ["2", "4"]
  assert not os.path.exists(ckpt_lib.aside_dir(str(tmp_path)))


def test_explicit_restore_step_restores_it_and_sets_newer_aside(tmp_path):
  _write(tmp_path, [2, 4, 6])
  with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint at step 5 .*steps: 6, 4, 2"):
    _restore(tmp_path, step=5)
  state, _, step, next_record = _restore(tmp_path, step=2)
  assert step == 2 and int(state["step"]) == 2 and next_record == 2
  assert sorted(n.split(".")[:2] for n in os.listdir(ckpt_lib.aside_dir(str(tmp_path)))) == [
      ["4", "superseded"], ["6", "superseded"]]
  # The run goes on from step 2: later saves are not skipped as older than step 6.
  _write(tmp_path, [3])
  assert _restore(tmp_path)[2] == 3


def test_explicit_restore_step_that_is_damaged_fails_without_falling_back(tmp_path):
  _write(tmp_path, [2, 4])
  _truncate(_step_dir(tmp_path, 2))
  with pytest.raises(ckpt_lib.CheckpointError, match="checkpoint step 2 .* cannot be restored: step 2: .*truncated"):
    _restore(tmp_path, step=2)
  assert sorted(os.listdir(ckpt_lib.checkpoint_dir(str(tmp_path)))) == ["2", "4"]


def test_read_only_restore_falls_back_without_moving_anything(tmp_path):
  _write(tmp_path, [2, 4])
  _truncate(_step_dir(tmp_path, 4))
  assert _restore(tmp_path, read_only=True)[2] == 2
  assert sorted(os.listdir(ckpt_lib.checkpoint_dir(str(tmp_path)))) == ["2", "4"]


def _run_script(body, tmp_path):
  script = textwrap.dedent("""
      import os, resource, signal, sys
      import jax, jax.numpy as jnp, grain, ml_collections
      from jdiff.workdir import checkpoint as ckpt_lib
      workdir = sys.argv[1]
      config = ml_collections.ConfigDict({"seed": 0})
      it = iter(grain.MapDataset.range(10).to_iter_dataset())
      small = {"w": jnp.ones((1000,))}
      big = {"w": jax.random.normal(jax.random.key(0), (400_000,))}  # 1.6 MB, incompressible: over the limit below
      ckpt = ckpt_lib.Checkpoints(workdir, keep=5)
      ckpt.save(1, small, it, config, [])
      ckpt.wait()
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
      soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
      def disk_full(): resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, hard))
      def disk_freed(): resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
      """) + textwrap.dedent(body)
  return subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                        timeout=300, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_failed_save_is_not_committed_and_later_saves_go_on(tmp_path):
  """A save that hits a full disk (a file size limit): one error line, no committed step,
  the partial files removed, and the next save (after space is freed) commits."""
  proc = _run_script("""
      disk_full()
      ckpt.save(2, big, it, config, [])
      ckpt.save(3, small, it, config, [])  # learns that step 2 failed; step 3 fits
      assert ckpt.failed_in_a_row == 1, ckpt.failed_in_a_row
      disk_freed()
      ckpt.save(4, big, it, config, [])
      ckpt.close()
      assert ckpt.failed_in_a_row == 0
      """, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(ckpt_lib.checkpoint_dir(str(tmp_path)))) == ["1", "3", "4"]
  errors = [l for l in proc.stderr.splitlines() if "step 2" in l]
  assert len(errors) == 2, errors  # when Orbax's thread fails, and when the next save learns of it
  assert "could not be written" in errors[0] and "File too large" in errors[0]
  assert "training continues" in errors[1] and "latest: step 1" in errors[1]
  assert "Traceback" not in proc.stderr
  for step in (1, 3, 4):
    assert ckpt_lib.verify_checksums(_step_dir(tmp_path, step)) is None


def test_saves_failing_in_a_row_stop_the_run(tmp_path):
  proc = _run_script("""
      disk_full()
      try:
        for step in range(2, 2 + ckpt_lib.MAX_FAILED_SAVES + 1):
          ckpt.save(step, big, it, config, [])
        ckpt.close()
      except ckpt_lib.CheckpointError as e:
        print("STOPPED:", e)
      """, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  stopped = [l for l in proc.stdout.splitlines() if l.startswith("STOPPED:")]
  assert stopped and f"{ckpt_lib.MAX_FAILED_SAVES} saves in a row failed" in stopped[0]
  assert os.listdir(ckpt_lib.checkpoint_dir(str(tmp_path))) == ["1"]


def test_a_save_killed_before_commit_leaves_the_previous_checkpoint_latest(tmp_path):
  """Killed (SIGKILL) with every file of step 2 written but not yet committed: the next
  start restores step 1 and cleans up the partial directory."""
  proc = _run_script("""
      ckpt_lib.write_checksums = lambda step_dir: os.kill(os.getpid(), signal.SIGKILL)
      ckpt.save(2, big, it, config, [])
      ckpt.wait()
      """, tmp_path)
  assert proc.returncode == -9
  assert any(n.startswith("2.") for n in os.listdir(ckpt_lib.checkpoint_dir(str(tmp_path))))
  ckpt = ckpt_lib.Checkpoints(str(tmp_path))
  it = iter(grain.MapDataset.range(10).to_iter_dataset())
  state, _, step = ckpt.restore(jax.eval_shape(lambda: {"w": jnp.ones((1000,))}), it)
  ckpt.close()
  assert step == 1
  chex.assert_trees_all_equal(state, {"w": jnp.ones((1000,))})
  assert os.listdir(ckpt_lib.checkpoint_dir(str(tmp_path))) == ["1"]
