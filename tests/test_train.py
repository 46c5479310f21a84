"""The trainer end to end on tiny configs: resume, sharding, init_from, failures, CLIs."""

import dataclasses
import functools
import json
import logging
import os
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdiff.workdir import checkpoint as ckpt_lib
from jdiff import config as config_lib
from jdiff import networks as networks_lib
from jdiff.data import pipeline as pipeline_lib
from jdiff.data import pixels
from jdiff.models import layers as L
from jdiff.train import metrics as metrics_lib
from jdiff.train import optim, trainer
from jdiff.train import sharding as shard_lib
from jdiff.train import state as state_lib
from jdiff.train import step as step_lib

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(name="mmdit_256", variant="test", **overrides):
  config = config_lib.load(os.path.join(ROOT, "configs", f"{name}.py:{variant}"))
  config.mesh.data = 1  # one device unless a test asks for more
  config.update_from_flattened_dict({key.replace("__", "."): value for key, value in overrides.items()})
  return config


def run(config, workdir):
  return trainer.train_and_evaluate(config, str(workdir))


def restored(workdir, config):
  """(state, data iterator state) of the latest checkpoint in `workdir`, on one device."""
  networks = networks_lib.build_networks(config)
  tx = optim.make_optimizer(config.optim, config.train.num_steps)
  mesh = shard_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  abstract, shardings = state_lib.state_shardings(networks, tx, mesh, shard_lib.rules_tuple(config.sharding.logical_rules),
                                                 config.optim.trainable)
  p = pipeline_lib.make_pipeline(config.data, global_batch=config.train.batch_size,
                                 max_len=config.text.max_len, seed=config.seed)
  ckpt = ckpt_lib.Checkpoints(str(workdir), read_only=True)
  state, lineage, _ = ckpt.restore(state_lib.abstract_with_shardings(abstract, shardings), p.iterator)
  ckpt.close()
  return jax.device_get(state), p.iterator.get_state(), lineage


def test_resumed_equals_uninterrupted(tmp_path):
  config = get_config(train__num_steps=6, train__checkpoint_every=3, train__sample_every=0)
  full = run(config, tmp_path / "full")
  assert full["step"] == 6
  half = get_config(train__num_steps=3, train__checkpoint_every=3, train__sample_every=0)
  assert run(half, tmp_path / "resumed")["step"] == 3
  resumed = run(config, tmp_path / "resumed")  # same workdir: picks up at step 3
  assert resumed["step"] == 6
  a, a_data, _ = restored(tmp_path / "full", config)
  b, b_data, _ = restored(tmp_path / "resumed", config)
  assert int(a.step) == int(b.step) == 6
  chex.assert_trees_all_equal(a.params, b.params)
  chex.assert_trees_all_equal(a.ema_params, b.ema_params)
  chex.assert_trees_all_equal(a.opt_state, b.opt_state)
  chex.assert_trees_all_equal(a.rng, b.rng)
  assert a_data == b_data  # same position in the same data order
  lines = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [2, 4, 6]
  assert all(np.isfinite(l["loss"]) and l["loss"] > 0 for l in lines)
  assert any(k.startswith("loss_t") for k in lines[0])


def test_run_resumes_past_a_damaged_checkpoint_to_the_uninterrupted_result(tmp_path, caplog):
  """The newest checkpoint truncated (a failed copy, a full disk during a sync): the restart
  sets it aside, resumes from the one before, and ends where an uninterrupted run ends."""
  config = get_config(train__num_steps=6, train__checkpoint_every=2, train__sample_every=0)
  run(config, tmp_path / "full")
  run(get_config(train__num_steps=4, train__checkpoint_every=2, train__sample_every=0), tmp_path / "resumed")
  state_dir = os.path.join(ckpt_lib.checkpoint_dir(str(tmp_path / "resumed")), "4", "state")
  largest = max((os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs), key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 3)
  with caplog.at_level(logging.INFO):
    assert run(config, tmp_path / "resumed")["step"] == 6
  assert any("checkpoint step 4" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
  assert any("resuming from" in r.getMessage() and "at step 2" in r.getMessage() for r in caplog.records)
  assert os.listdir(ckpt_lib.aside_dir(str(tmp_path / "resumed")))[0].startswith("4.corrupt.")
  a, a_data, _ = restored(tmp_path / "full", config)
  b, b_data, _ = restored(tmp_path / "resumed", config)
  chex.assert_trees_all_equal(a, b)
  assert a_data == b_data


def test_resume_with_another_model_is_refused_and_leaves_the_workdir_as_it_was(tmp_path):
  work = tmp_path / "w"
  run(get_config(train__num_steps=2, train__sample_every=0), work)
  before = {name: open(work / name, "rb").read() for name in ("config.json", "metrics.jsonl")}
  with pytest.raises(ckpt_lib.CheckpointError, match=r"text.width: 32 there, 48 now.*init_from="):
    run(get_config(train__num_steps=4, text__width=48, train__sample_every=0), work)
  assert {name: open(work / name, "rb").read() for name in before} == before
  # Fields that say how to run, not what the model is, may change on resume.
  assert run(get_config(train__num_steps=4, train__sample_every=0, model__remat="full"), work)["step"] == 4


def _tiny_state_and_batch(config, mesh, seed=0):
  networks = networks_lib.build_networks(config)
  tx = optim.make_optimizer(config.optim, config.train.num_steps)
  rules = shard_lib.rules_tuple(config.sharding.logical_rules)
  state, shardings = state_lib.create_state(networks, tx, mesh, rules, seed)
  p = pipeline_lib.make_pipeline(config.data, global_batch=config.train.batch_size,
                                 max_len=config.text.max_len, seed=0)
  return networks, tx, rules, state, shardings, next(p)


def _step_on(mesh, config, host_state=None):
  networks, tx, rules, state, shardings, batch = _tiny_state_and_batch(config, mesh)
  if host_state is not None:
    state = jax.device_put(host_state, shardings)
  compiled, batch_sharding = trainer.compile_step(networks, tx, config, mesh, rules, shardings,
                                                  jax.eval_shape(lambda: state))
  rng = jnp.copy(state.rng)
  new_state, metrics = compiled(state, pipeline_lib.to_global(batch, batch_sharding), rng, None)
  return jax.device_get(new_state), jax.device_get(metrics)


@pytest.mark.heavy
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)])
def test_sharded_train_step_equals_single_device(shape):
  config = get_config(train__batch_size=8)
  # Non-zero params so every layer matters: take one step on one device first.
  one = shard_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  warm, _ = _step_on(one, config)
  ref_state, ref_metrics = _step_on(one, config, warm)
  mesh = shard_lib.make_mesh(dict(zip(shard_lib.MESH_AXES, shape)))
  state, metrics = _step_on(mesh, config, warm)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(state.params, ref_state.params, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(state.ema_params, ref_state.ema_params, atol=1e-5, rtol=1e-5)


def test_grad_accumulation_equals_one_big_batch():
  one = shard_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  config = get_config(train__batch_size=8)
  warm, _ = _step_on(one, config)
  a, ma = _step_on(one, config, warm)
  b, mb = _step_on(one, get_config(train__batch_size=8, train__grad_accum=4), warm)
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
  chex.assert_trees_all_close(a.params, b.params, atol=1e-6, rtol=1e-5)


@pytest.mark.heavy
def test_checkpoint_restores_onto_another_mesh(tmp_path):
  """Also with Adam's first moment in bfloat16 (optim.mu_dtype): it restores as saved."""
  config = get_config(train__num_steps=2, train__sample_every=0, optim__mu_dtype="bfloat16")
  config.mesh.update(data=8, fsdp=1, tensor=1)
  run(config, tmp_path)
  saved, _, _ = restored(tmp_path, config)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  networks = networks_lib.build_networks(config)
  tx = optim.make_optimizer(config.optim, config.train.num_steps)
  mesh = shard_lib.make_mesh(config.mesh)
  rules = shard_lib.rules_tuple(config.sharding.logical_rules)
  abstract, shardings = state_lib.state_shardings(networks, tx, mesh, rules)
  p = pipeline_lib.make_pipeline(config.data, global_batch=8, max_len=config.text.max_len, seed=0)
  ckpt = ckpt_lib.Checkpoints(str(tmp_path), read_only=True)
  state, _, _ = ckpt.restore(state_lib.abstract_with_shardings(abstract, shardings), p.iterator)
  ckpt.close()
  kernel = state.params["denoiser"]["last_block"]["x_mlp"]["fc1"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert len(kernel.addressable_shards) == 8
  chex.assert_trees_all_equal(jax.device_get(state), saved)
  adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  assert {x.dtype for x in jax.tree.leaves(adam[0].mu)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(adam[0].nu)} == {jnp.dtype(jnp.float32)}
  # And training continues on the new mesh.
  config.train.num_steps = 4
  assert run(config, tmp_path)["step"] == 4


@pytest.mark.heavy
def test_init_from_starts_from_ema_with_fresh_optimizer_and_records_lineage(tmp_path):
  """The parent ran scanned blocks, the child runs them unrolled: the parent's stacks are
  unstacked for it."""
  first = get_config(train__num_steps=3, train__sample_every=0, model__scan=True, model__depth=3)
  run(first, tmp_path / "stage1")
  stage1, _, lineage1 = restored(tmp_path / "stage1", first)
  assert [e["stage"] for e in lineage1] == ["pretrain"]
  assert "blocks" in stage1.ema_params["denoiser"]

  second = get_config(train__num_steps=1, train__sample_every=0, model__scan=False, model__depth=3)
  second.stage = "posttrain"
  second.init_from = str(tmp_path / "stage1")
  # Zero learning rate: after one step the params must still be stage 1's EMA.
  second.optim.update(lr=0.0, warmup_steps=0)
  run(second, tmp_path / "stage2")
  stage2, _, lineage2 = restored(tmp_path / "stage2", second)
  assert "blocks" not in stage2.params["denoiser"] and "blocks_1" in stage2.params["denoiser"]
  chex.assert_trees_all_close(stage2.params, L.match_layout(stage1.ema_params, stage2.params), atol=1e-7)
  assert int(stage2.step) == 1
  adam = stage2.opt_state[1][0]
  assert int(adam.count) == 1  # fresh optimizer: one update, not four
  assert [e["stage"] for e in lineage2] == ["pretrain", "posttrain"]
  assert lineage2[1]["init_from"] == str(tmp_path / "stage1") and lineage2[1]["from_step"] == 3


def test_nan_batch_is_skipped_without_touching_params():
  config = get_config(train__batch_size=8)
  one = shard_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  networks, tx, rules, state, shardings, batch = _tiny_state_and_batch(config, one)
  step = jax.jit(functools.partial(step_lib.train_step, networks=networks, tx=tx, config=config))
  bad = dict(batch, image=batch["image"].astype(np.float32))
  bad["image"][3, 2, 2, 1] = np.nan
  before = jax.device_get(state)
  after, metrics = step(state, bad, before.rng)
  after = jax.device_get(after)
  assert int(metrics["nonfinite"]) == 1 and int(after.nonfinite_streak) == 1 and int(after.step) == 1
  chex.assert_trees_all_equal(after.params, before.params)
  chex.assert_trees_all_equal(after.ema_params, before.ema_params)
  chex.assert_trees_all_equal(after.opt_state, before.opt_state)
  good, metrics = step(jax.device_put(after), batch, before.rng)
  assert int(metrics["nonfinite"]) == 0 and int(good.nonfinite_streak) == 0
  assert not np.allclose(jax.device_get(good.params["denoiser"]["final_proj"]["kernel"]),
                         before.params["denoiser"]["final_proj"]["kernel"])


def test_trainer_stops_after_max_nonfinite(tmp_path, monkeypatch):
  config = get_config(train__num_steps=10, train__log_every=1, train__max_nonfinite=2, train__sample_every=0)
  # Every image becomes NaN inside the compiled step.
  monkeypatch.setattr(pixels, "from_uint8", lambda images: jnp.full(images.shape, jnp.nan))
  with pytest.raises(trainer.NonFiniteError, match="2 consecutive non-finite steps"):
    run(config, tmp_path)


def test_sigterm_saves_and_stops_cleanly_then_resumes(tmp_path, monkeypatch):
  config = get_config(train__num_steps=6, train__checkpoint_every=100, train__sample_every=0)
  real_next = pipeline_lib.Pipeline.__next__
  calls = {"n": 0}

  def next_then_signal(self):
    calls["n"] += 1
    if calls["n"] == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_next(self)

  monkeypatch.setattr(pipeline_lib.Pipeline, "__next__", next_then_signal)
  summary = run(config, tmp_path / "run")
  assert summary["stopped_by"] == f"signal {signal.SIGTERM}" and summary["step"] == 3
  assert ckpt_lib.Checkpoints(str(tmp_path / "run"), read_only=True).latest_step() == 3
  monkeypatch.setattr(pipeline_lib.Pipeline, "__next__", real_next)
  assert run(config, tmp_path / "run")["step"] == 6
  run(config, tmp_path / "straight")
  a, _, _ = restored(tmp_path / "run", config)
  b, _, _ = restored(tmp_path / "straight", config)
  chex.assert_trees_all_equal(a.params, b.params)


_cli = helpers.cli


@pytest.mark.heavy
def test_cli_train_sample_evaluate(tmp_path):
  work = str(tmp_path / "w")
  out = _cli("jdiff.main", "--config=configs/mmdit_256.py:test", f"--workdir={work}")
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["step"] == 4 and np.isfinite(summary["loss"])
  assert os.path.exists(os.path.join(work, "samples", "step_0000004.png"))
  assert os.listdir(os.path.join(work, "tb"))
  prompt = "a small green square in the bottom left"
  out = _cli("jdiff.sample", f"--workdir={work}", f"--prompt={prompt}", "--num_images=2", "--num_steps=3",
             "--upscale=1", f"--out={tmp_path / 'gen'}")
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["step"] == 4 and len(result["images"]) == 2
  from PIL import Image
  assert np.asarray(Image.open(result["images"][0])).shape == (16, 16, 3)
  proc = _cli("jdiff.main", "--config=configs/mmdit_256.py:test", f"--workdir={work}",
              "--config.train.restore_step=3", "--config.train.num_steps=6", check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: there is no checkpoint at step 3 in "), \
      proc.stderr[-2000:]
  grids = tmp_path / "verdicts"
  out = _cli("jdiff.evaluate", f"--workdir={work}", "--num_samples=3", "--num_steps=2", f"--grids={grids}")
  scores = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(scores) == {"seen", "held_out", "new_color"}
  for split in scores.values():
    assert split["n"] == 3
    for key in ("color", "shape", "size", "position", "all"):
      assert 0.0 <= split[key] <= 1.0
  _check_verdict_grids(grids, scores, num=3, side=16)


def _check_verdict_grids(grids, scores, num, side, upscale=4):
  """Each tile of a split's grid is framed by the analyser's verdict on the image inside it,
  and its .txt line says the same; the grid's share of right images is the split's 'all'."""
  from PIL import Image

  from jdiff.data import shapes
  from jdiff.eval import adherence, benchmark
  for name, split in benchmark.SPLITS.items():
    grid = np.asarray(Image.open(grids / f"{name}.png"))[::upscale, ::upscale]
    lines = (grids / f"{name}.txt").read_text().splitlines()
    prompts = shapes.benchmark(split, num)
    assert len(lines) == num
    tile, f = side + 2 * benchmark.FRAME, benchmark.FRAME
    for i, ((prompt, target), line) in enumerate(zip(prompts, lines)):
      x0 = 2 + i * (tile + 2)  # one row: inference.grid's 2-pixel gaps
      framed = grid[2:2 + tile, x0:x0 + tile]
      right = adherence.correct(framed[f:-f, f:-f], target)
      assert tuple(framed[0, 0]) == (benchmark.RIGHT if right.all() else benchmark.WRONG)
      wrong = [a for a, r in zip(shapes.ATTRIBUTES, right) if not r]
      assert line == f"{i}\t{'right' if not wrong else 'wrong: ' + ','.join(wrong)}\t{prompt}"
    assert sum("\tright\t" in line for line in lines) / num == scores[name]["all"]


@pytest.mark.parametrize("flag,message", [
    ("--config.model.bogus=1", "bogus"),
    ("--config.model.remat=sometimes", "model.remat='sometimes'"),
    ("--config.train.batch_size=-4", "train.batch_size=-4"),
    ("--config.data.source=tfds", "needs data.tfds_name"),
    ("--config.data.source=folder", "needs data.path"),
    ("--config.data.caption_from=exif", "data.caption_from='exif'"),
    ("--config.data.loss_mask=alpha", "weights the flow loss of images read from files"),
    ("--config.data.shapes_split=held_out", "only objectives that read captions, never images, may use it"),
    ("--config.eval.metrics=('adherence','fid')", "eval.metrics ['fid'] need eval.fid_stats"),
    ("--config.eval.metrics=('fdi',)", "config.eval.metrics='fdi' is not one of"),
])
def test_bad_config_fails_fast_with_a_clear_message(tmp_path, flag, message):
  proc = _cli("jdiff.main", "--config=configs/mmdit_256.py:test", f"--workdir={tmp_path}", flag, check=False)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_missing_dataset_fails_fast(tmp_path):
  proc = _cli("jdiff.main", "--config=configs/mmdit_256.py:test", f"--workdir={tmp_path / 'w'}",
              "--config.data.source=tfds", "--config.data.tfds_name=no_such_dataset",
              f"--config.data.tfds_data_dir={tmp_path}", check=False)
  assert proc.returncode != 0
  assert "no_such_dataset" in proc.stderr and "not available" in proc.stderr
  assert not os.path.exists(os.path.join(tmp_path, "w", "checkpoints"))


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # inside ml_collections' flag parser
def test_config_load_equals_the_config_flag():
  """config.load('file.py:arg') gives what --config=file.py:arg gives jdiff.main: the
  file's get_config(arg), locked; a missing file fails at once with its name."""
  from ml_collections.config_flags import config_flags as cf

  spec = os.path.join(ROOT, "configs", "stages.py:test")
  loaded = config_lib.load(spec)
  assert loaded.to_dict() == cf.ConfigFileFlagParser("config").parse(spec).to_dict()
  assert loaded.base.data.resolution == 16 and loaded.stages.pretrain.train.num_steps == 3
  with pytest.raises(AttributeError):
    loaded.no_such_field = 1  # locked, as under the flag
  with pytest.raises(FileNotFoundError, match="nope.py"):
    config_lib.load(os.path.join(ROOT, "configs", "nope.py:cpu"))


def test_dit_config_trains():
  config = get_config("dit_256", train__num_steps=2, train__sample_every=0)
  networks = networks_lib.build_networks(config)
  assert type(networks.denoiser).__name__ == "DiT"
  one = shard_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  state, metrics = _step_on(one, config)
  assert np.isfinite(metrics["loss"]) and int(state.step) == 1


def test_frozen_parameters_stay_bit_identical(tmp_path):
  """optim.trainable: only the matching parameters (here one block and the text encoder's
  final layers) move; every other parameter and its EMA is bit-identical after training. The
  optimizer state and the EMA are held for the trainable parameters only, and the EMA read
  back for sampling (checkpoint.restore_ema) takes the frozen ones from the params."""
  pattern = r"denoiser/blocks_0/.*|text/.*norm.*"
  config = get_config(optim__trainable=pattern, train__num_steps=3, train__sample_every=0, eval__at_end=False)
  init = get_config(train__num_steps=1, train__sample_every=0, eval__at_end=False)
  run(init, tmp_path / "base")  # non-zero starting weights
  config.init_from = str(tmp_path / "base")
  run(config, tmp_path / "tuned")
  before, _, _ = restored(tmp_path / "base", init)
  after, _, lineage = restored(tmp_path / "tuned", config)
  mask = optim.trainable_mask(after.params, pattern)
  trained = lambda tree: sum(x.size for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask)) if m)
  assert sum(x.size for x in jax.tree.leaves(after.ema_params)) == trained(after.params)
  ema, _, _ = ckpt_lib.restore_ema(str(tmp_path / "tuned"), jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
      after.params))
  chex.assert_trees_all_equal(jax.device_get(ema), after.averaged())
  moved, frozen = 0, 0
  for path_mask, b, a, ea in zip(jax.tree.leaves(mask), jax.tree.leaves(before.averaged()),
                                 jax.tree.leaves(after.params), jax.tree.leaves(after.averaged())):
    if path_mask:
      moved += int(not np.array_equal(a, b))
    else:
      frozen += 1
      np.testing.assert_array_equal(a, b)
      np.testing.assert_array_equal(ea, b)
  assert moved > 5 and frozen > 20
  # The optimizer holds state only for what trains.
  adam = [s for s in jax.tree.leaves(after.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)][0]
  assert sum(x.size for x in jax.tree.leaves(adam.mu)) == trained(after.params)
  with pytest.raises(ValueError, match="matches no parameter"):
    run(get_config(optim__trainable="nothing/.*", train__num_steps=1), tmp_path / "none")


def test_read_only_checkpoints_open_without_orbax_warning(tmp_path, caplog):
  """Opening a run's checkpoints read-only (sample, evaluate, init_from) logs no warning that
  the directory is read-only; the filter is gone afterwards."""
  ckpt_lib.checkpoint_dir(str(tmp_path)).mkdir(parents=True)
  import logging  # pylint: disable=g-import-not-at-top
  with caplog.at_level(logging.WARNING):
    ckpt = ckpt_lib.Checkpoints(str(tmp_path), read_only=True)
    assert ckpt.latest_step() is None
    ckpt.close()
    logging.getLogger("absl").warning("Given directory is read only=after")
  messages = [r.getMessage() for r in caplog.records]
  assert messages == ["Given directory is read only=after"], messages


def test_weights_and_biases_offline_run_is_written_and_continued_on_resume(tmp_path, monkeypatch):
  """config.wandb.project with mode 'offline': the run's metrics and sample grids go into
  WORKDIR/wandb (for `wandb sync`), and a resumed run continues the same W&B run id."""
  for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
    monkeypatch.setenv(var, str(tmp_path / var.lower()))
  monkeypatch.setenv("WANDB_SILENT", "true")
  work = tmp_path / "run"
  over = dict(wandb__project="jdiff-test", wandb__tags=("ci",), train__checkpoint_every=2)
  run(get_config(train__num_steps=2, **over), work)
  run(get_config(train__num_steps=4, **over), work)  # resumes from step 2
  run_id = (work / metrics_lib.MetricWriter.WANDB_ID).read_text().strip()
  runs = sorted(d for d in os.listdir(work / "wandb") if d.startswith("offline-run-"))
  assert len(runs) == 2 and all(d.endswith("-" + run_id) for d in runs)
  history = b"".join((work / "wandb" / d / f"run-{run_id}.wandb").read_bytes() for d in runs)
  for key in (b"loss", b"grad_norm", b"jdiff-test"):
    assert key in history
  images = [f for d in runs for f in os.listdir(work / "wandb" / d / "files" / "media" / "images")]
  assert any(f.startswith("samples_") and f.endswith(".png") for f in images)


def test_evaluator_builds_the_asked_metric_families_and_skips_shapes_only_ones_elsewhere(monkeypatch, caplog):
  """The registry: a family is built only when a run evaluates and asks for one of its names;
  adherence and val_loss are skipped (with a log line) on data other than the shapes."""
  from jdiff.eval import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top
  built = []
  monkeypatch.setattr(evaluator_lib, "METRICS", tuple(
      dataclasses.replace(f, build=lambda config, names, f=f: built.append(tuple(names)) or f.names[0])
      for f in evaluator_lib.METRICS))
  c = config_lib.load("configs/mmdit_256.py:cpu")
  with c.unlocked():
    c.eval.metrics = ("adherence", "kid", "val_loss")
    c.eval.every, c.eval.at_end = 0, True
  assert evaluator_lib.Evaluator(c).scores == ["adherence", "val_loss", "fid"] and built == [
      ("adherence",), ("val_loss",), ("kid",)]
  built.clear()
  with c.unlocked():
    c.data.source, c.data.path = "folder", "/nowhere"
  with caplog.at_level(logging.INFO, logger=evaluator_lib.__name__):
    assert evaluator_lib.Evaluator(c).scores == ["fid"] and built == [("kid",)]
  assert "['adherence', 'val_loss'] score runs on the shapes data" in caplog.text
  built.clear()
  with c.unlocked():
    c.eval.at_end = False
  assert not evaluator_lib.Evaluator(c).on and not built  # a run that never evaluates loads nothing
