"""train_and_evaluate(config, workdir): the training loop.

Order of business:
  1. validate the config, build the mesh, the networks and the optimizer;
  2. resume: a checkpoint already in workdir > config.init_from > scratch;
  3. compile the step ahead of time and log its memory analysis;
  4. loop: global batch -> step -> (every N) log, checkpoint, sample grid;
  5. on SIGTERM or after max_nonfinite bad steps in a row, save and stop cleanly.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import re
import signal
import threading
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from jdiff.workdir import checkpoint as ckpt_lib
from jdiff import cli
from jdiff import errors
from jdiff import inference
from jdiff import networks as networks_lib
from jdiff.workdir import run_config
from jdiff.data import pipeline as pipeline_lib
from jdiff.eval import curves
from jdiff.eval import evaluator as evaluator_lib
from jdiff.models import layers as L
from jdiff.train import lock as lock_lib
from jdiff.train import metrics as metrics_lib
from jdiff.train import grpo as grpo_lib
from jdiff.train import objectives
from jdiff.train import optim
from jdiff.train import sharding as shard_lib
from jdiff.train import state as state_lib
from jdiff.train import step as step_lib

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """Raised after config.train.max_nonfinite consecutive non-finite steps."""


# How long a process waits for the others to finish compiling before step 1: XLA compiles on
# each host independently and a large step on a busy host can take many minutes.
_COMPILE_BARRIER_TIMEOUT_S = 3600
_barriers = itertools.count()  # a barrier's name is used once (jdiff.stages trains several runs per process)


def _meet_before_first_step() -> None:
  """Several processes: wait on the coordination service until every one has compiled its
  steps. The first collective of a step sets up its communicator (gloo on CPU, NCCL on GPU)
  under a short fixed deadline (30 s for gloo), which a host that compiles more slowly than the
  others would miss; this barrier's deadline is generous instead."""
  if jax.process_count() > 1:
    ocp.multihost.get_barrier_sync_fn()(key=f"jdiff: every process compiled its train steps ({next(_barriers)})",
                                        timeout_ms=_COMPILE_BARRIER_TIMEOUT_S * 1000)


class _StopFlag:
  """Stops training at a step boundary after SIGTERM/SIGINT; the loop then saves a checkpoint.

  One process: Python handlers set the flag. Several processes: a signal reaches one host at a
  time, and a host that stopped alone would leave the others waiting in a collective, so
  SIGTERM is left to JAX's preemption notifier (jax.distributed installs it) and every
  process asks the coordination service each step whether a preemption notice has arrived
  (`reached_preemption_sync_point`): all of them stop at the same step. SIGINT (Ctrl-C)
  keeps its default there.
  """

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}
    self._synced = jax.process_count() > 1

  def __enter__(self):
    if cli.interrupt_pending():  # Ctrl-C during start-up whose KeyboardInterrupt got lost
      raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
      for sig in (() if self._synced else (signal.SIGTERM, signal.SIGINT)):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    log.warning("received signal %d: saving a checkpoint and stopping", signum)
    self.signal = signum

  def stop_before(self, step: int) -> bool:
    """Whether to stop before running `step` (every process gets the same answer)."""
    if self._synced and multihost_utils.reached_preemption_sync_point(step):
      log.warning("preemption notice (SIGTERM to a process of the job): every process saves at step %d and "
                  "stops", step)
      self.signal = signal.SIGTERM
    return self.signal is not None

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _lineage_entry(config, workdir: str, from_step: int | None) -> dict[str, Any]:
  return dict(stage=config.stage, workdir=os.path.abspath(workdir), init_from=config.init_from or "",
              from_step=from_step)


def batch_spec(config, networks, shape: tuple[int, int] | None = None) -> dict[str, tuple[tuple[int, ...], Any]]:
  """name -> (global shape, dtype) of a training batch (of images of `shape` = (height, width);
  default: the square data.resolution)."""
  b = config.train.batch_size
  if networks.text is None:
    meta = networks.cache_meta
    if meta is None:
      raise errors.InvalidArgument(f"no latent cache in data.cache_dir={config.data.cache_dir!r}: write one with "
                                   "`python -m jdiff.cache`")
    store = np.dtype(meta["dtype"])
    latent = (b, *(shape or meta["latent_shape"][:2]), meta["latent_shape"][2])
    spec = dict(latent_mean=(latent, store), latent_logvar=(latent, store),
                context=((b, *meta["context_shape"]), store), pooled=((b, meta["pooled_dim"]), np.float32))
    if meta.get("loss_mask", "none") != "none":  # written with data.loss_mask: weights at latent resolution
      spec["mask"] = (latent[:3] + (1,), np.uint8)
    return spec
  height, width = shape or (config.data.resolution, config.data.resolution)
  image = ((b, height, width, config.model.in_channels), np.uint8)
  images = {key: image for key in objectives.get(config.objective).images}
  if config.data.loss_mask != "none":
    images["mask"] = ((b, height, width, 1), np.uint8)
  return dict(images, tokens=((b, config.text.max_len), np.int32))


def load_parent(workdir: str, mesh, rules) -> tuple[objectives.Frozen, Any, list[dict[str, Any]], int]:
  """The model of an earlier stage's workdir, laid out on `mesh`: (Frozen(networks), its EMA
  params, lineage, step). Adapters of a LoRA stage are merged into their kernels, so the
  result is the plain model whose outputs the adapted one gave."""
  parent_config = run_config.load(workdir)
  networks = networks_lib.build_networks(parent_config)
  boxed = jax.eval_shape(lambda: networks.init_params(jax.random.key(0)))
  target = state_lib.abstract_with_shardings(nn.unbox(boxed), shard_lib.tree_shardings(boxed, mesh, rules))
  ema, lineage, step = ckpt_lib.restore_ema(workdir, target)
  if networks.lora is not None:
    ema = jax.jit(functools.partial(L.merge_lora, spec=networks.lora))(ema)
    networks = networks.without_lora()
  return objectives.Frozen(networks), ema, lineage, step


def compile_step(networks, tx, config, mesh, rules, state_shardings, abstract_state, frozen=None,
                 frozen_params=None, shape: tuple[int, int] | None = None):
  """The jitted, donated train step, lowered and compiled ahead of step 1 (for images of
  `shape` = (height, width): an aspect-ratio bucket; default: the square data.resolution).
  With a frozen reference/teacher, the step takes its params as a fourth (not donated) argument."""
  batch_sharding = shard_lib.logical_sharding(mesh, rules, "activation_batch")
  abstract_batch = {k: jax.ShapeDtypeStruct(spec_shape, dtype, sharding=batch_sharding)
                    for k, (spec_shape, dtype) in batch_spec(config, networks, shape).items()}
  replicated = shard_lib.replicated(mesh)
  frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen_params)
  step = grpo_lib.train_step if config.objective == "grpo" else step_lib.train_step
  step_fn = jax.jit(
      functools.partial(step, networks=networks, tx=tx, config=config, frozen=frozen),
      in_shardings=(state_shardings, batch_sharding, replicated, frozen_shardings),
      out_shardings=(state_shardings, replicated),
      donate_argnums=0,
  )
  t0 = time.time()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = step_fn.lower(state_lib.abstract_with_shardings(abstract_state, state_shardings),
                             abstract_batch, jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
                             jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                          frozen_params)).compile()
  recomputed = xla_rematerialized(compiled.as_text())
  if recomputed:
    log.warning("XLA recomputes %d instructions of the train step to fit it in device memory, which slows "
                "the step: lower train.batch_size, or save fewer "
                "activations (model.remat=dots_no_batch_attention or dots_no_batch)", recomputed)
  mem = compiled.memory_analysis()
  if mem is not None:
    log.info("train step%s compiled in %.1fs; memory per device: arguments %.1f MB, outputs %.1f MB, "
             "temporaries %.1f MB, generated code %.1f MB", f" for {shape[0]}x{shape[1]}" if shape else "",
             time.time() - t0,
             mem.argument_size_in_bytes / 2**20, mem.output_size_in_bytes / 2**20,
             mem.temp_size_in_bytes / 2**20, mem.generated_code_size_in_bytes / 2**20)
  else:
    log.info("train step compiled in %.1fs", time.time() - t0)
  return compiled, batch_sharding


def _check_bucket(config, networks, shape: tuple[int, int]) -> None:
  """An aspect-ratio bucket's patch grid must fit the model's position table."""
  grid = max(shape) // networks.patch_size
  limit = config.model.pos_embed_max_size
  if limit and grid > limit:
    raise errors.InvalidArgument(
        f"bucket {shape[0]}x{shape[1]} is {grid} patches long, beyond model.pos_embed_max_size={limit}: raise it, or "
        "lower data.buckets.pixels or max_aspect")


def xla_rematerialized(hlo_text: str) -> int:
  """How many instructions XLA's own rematerialisation pass cloned into a compiled module
  (named 'NAME.remat', 'NAME.remat2', ...): it does that only when the program would not fit
  in device memory otherwise. (jax.checkpoint's recomputation is not counted: it is planned
  and keeps the instructions' own names.)"""
  return len(re.findall(r"^\s*(?:ROOT\s+)?%[\w.\-]+\.remat\d* = ", hlo_text, re.M))


def initial_state(config, workdir, networks, tx, mesh, rules, ckpt, pipeline, parent=None):
  """Resume order: a checkpoint in workdir > config.init_from > scratch. parent:
  `load_parent(config.init_from)`, needed when there is no checkpoint and init_from is set.

  Returns (state, shardings, abstract_state, lineage).
  """
  abstract, shardings = state_lib.state_shardings(networks, tx, mesh, rules, config.optim.trainable)
  if ckpt.latest_step() is not None:
    target = state_lib.abstract_with_shardings(abstract, shardings)
    state, lineage, step = ckpt.restore(target, pipeline.iterator, config.train.restore_step)
    log.info("resuming from %s at step %d", ckpt.workdir, step)
    return state, shardings, abstract, lineage
  if config.train.restore_step is not None:
    raise ckpt_lib.CheckpointError(f"train.restore_step={config.train.restore_step}: there is no checkpoint in "
                                   f"{ckpt_lib.checkpoint_dir(workdir)}")
  state, _ = state_lib.create_state(networks, tx, mesh, rules, config.seed, config.optim.trainable)
  if config.init_from:
    _, ema, parent_lineage, from_step = parent
    log.info("starting from the EMA params of %s (step %d) with a fresh optimizer", config.init_from, from_step)
    # Block stacks follow this config's model.scan whatever the parent's was. Parameters the
    # parent lacks (new LoRA adapters, a student's guidance embedding) keep their fresh init;
    # a parameter both have must agree in shape. With lora.quantize_base the adapted kernels
    # are quantized here.
    # One compiled program for the whole tree (eagerly, a program per leaf shape), which also
    # lays the parameters and their EMA out on the state's shardings.
    def carry_over(ema, base):
      params = _overlay(base, L.quantize_like(L.match_layout(ema, base), base))
      return params, state_lib.ema_init(params, config.optim.trainable)

    params, ema = jax.jit(carry_over, out_shardings=(shardings.params, shardings.ema_params))(ema, state.params)
    state = state.replace(params=params, ema_params=ema)
    return state, shardings, abstract, parent_lineage + [_lineage_entry(config, workdir, from_step)]
  log.info("starting from scratch")
  return state, shardings, abstract, [_lineage_entry(config, workdir, None)]


def _overlay(base, new, path=""):
  """`base` with every leaf that `new` has replaced by a copy of new's (a copy: the state is
  donated to the step, while `new` may also serve as the frozen reference/teacher)."""
  if isinstance(base, dict):
    return {k: _overlay(v, new[k], f"{path}/{k}") if k in new else v for k, v in base.items()}
  if base.shape != new.shape:
    raise errors.InvalidArgument(f"parameter {path.lstrip('/')} has shape {new.shape} in config.init_from but "
                                 f"{base.shape} in this config")
  return jnp.array(new, dtype=base.dtype, copy=True)


def write_samples(config, networks, params, workdir: str, step: int, writer: metrics_lib.MetricWriter) -> str:
  """A grid of config.sample.prompts drawn with fixed noise from `params` (the EMA)."""
  model = inference.Model(networks, jax.device_get(params), config, step)
  images = inference.generate(model, list(config.sample.prompts), seed=config.sample.seed)
  grid = inference.grid(images, columns=min(len(images), 4))
  path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    inference.save_png(grid, path, upscale=max(1, 256 // networks.resolution))
    with open(path[:-4] + ".txt", "w") as f:
      f.write("\n".join(f"{i}: {p}" for i, p in enumerate(config.sample.prompts)) + "\n")
    writer.image(step, "samples", grid)
  return path


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains until config.train.num_steps (resuming if workdir holds a checkpoint), holding
  the workdir's lock (jdiff.train.lock: raises WorkdirInUse if another run holds it).

  Returns a summary: {'step', 'stopped_by', 'last_metrics', 'samples', 'eval'}.
  """
  config = run_config.prepare(config)
  os.makedirs(workdir, exist_ok=True)
  with lock_lib.hold(workdir):  # one run per workdir
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  rules = shard_lib.rules_tuple(config.sharding.logical_rules)
  mesh = shard_lib.make_mesh(config.mesh)
  L.check_backend(config.model.attention)
  networks = networks_lib.build_networks(config)
  tx = optim.make_optimizer(config.optim, optim.num_updates(config))
  pipeline = pipeline_lib.make_pipeline(config.data, global_batch=config.train.batch_size,
                                        max_len=config.text.max_len, seed=config.seed)
  ckpt = ckpt_lib.Checkpoints(workdir, keep=config.train.keep_checkpoints)
  if ckpt.latest_step() is not None:
    ckpt_lib.check_same_model(config, workdir)
  # The init_from model is restored once: to start from (no checkpoint yet) and/or as the
  # frozen reference/teacher of the objective.
  objective = objectives.check(config)
  frozen_objective = objective.frozen
  parent = None
  if config.init_from and (ckpt.latest_step() is None or frozen_objective):
    parent = load_parent(config.init_from, mesh, rules)
  evaluator = evaluator_lib.Evaluator(config)  # loads FID's reference and network now: a wrong path fails before any work
  state, shardings, abstract, lineage = initial_state(config, workdir, networks, tx, mesh, rules, ckpt, pipeline,
                                                      parent)
  if jax.process_index() == 0:  # only now: a start that fails leaves the workdir as it was
    run_config.write(workdir, config)
  log.info("mesh %s; %s denoiser params, %s text params", dict(mesh.shape),
           f"{networks_lib.param_count(state.params['denoiser']):,}",
           f"{networks_lib.param_count(state.params.get('text', {})):,}")
  n_train = optim.count_trainable(state.params, config.optim.trainable)
  log.info("%s of %s parameters train (optim.trainable=%r)", f"{n_train:,}",
           f"{networks_lib.param_count(state.params):,}", config.optim.trainable)
  if (networks.cache_meta or {}).get("loss_mask", "none") != "none":
    log.info("the cache holds loss masks (written with data.loss_mask=%r): %s", networks.cache_meta["loss_mask"],
             "they weight the flow loss" if config.objective == "flow" else f"objective {config.objective!r} ignores them")
  frozen, frozen_params = None, None
  if frozen_objective:
    frozen, frozen_params, _, from_step = parent
    log.info("objective %r: frozen %s from %s (step %d)", config.objective, objective.frozen_role,
             config.init_from, from_step)
  steps = {}  # (height, width) of an aspect-ratio bucket (None: square data) -> its compiled step
  for shape in pipeline.shapes or (None,):
    if shape is not None:
      _check_bucket(config, networks, shape)
    steps[shape], batch_sharding = compile_step(networks, tx, config, mesh, rules, shardings, abstract, frozen,
                                                frozen_params, shape)

  writer = None
  t = config.train
  # grpo: each prompt of the batch is drawn group_size times
  images_per_step = t.batch_size * (config.grpo.group_size if config.objective == "grpo" else 1)
  start = int(jax.device_get(state.step))
  run_rng = jnp.copy(state.rng)
  history, last_metrics, stopped_by, samples, evals = [], {}, "num_steps", [], []
  last_saved = start if ckpt.latest_step() == start else None
  bar = tqdm.tqdm(total=t.num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                  disable=jax.process_index() != 0)
  tick = time.time()

  def save(step: int, force: bool = False):
    nonlocal last_saved
    if last_saved != step:
      ckpt.save(step, state, pipeline.iterator, config, lineage, force=force)
      last_saved = step

  _meet_before_first_step()
  try:
    with _StopFlag() as stop:
      # metrics.jsonl appears only once SIGTERM is caught: a signal after it saves and exits
      # with the resumable status (a scheduler, or a test, may take the file as "training").
      writer = metrics_lib.MetricWriter(workdir, config)
      for step in range(start, t.num_steps):
        if stop.stop_before(step):
          stopped_by = f"signal {stop.signal}"
          break
        host = next(pipeline)
        compiled = steps[tuple(host["latent_mean" if "latent_mean" in host else "image"].shape[1:3])
                         if pipeline.shapes else None]
        state, metrics = compiled(state, pipeline_lib.to_global(host, batch_sharding), run_rng, frozen_params)
        history.append(metrics)
        done = step + 1
        bar.update(1)
        if done % t.log_every == 0 or done == t.num_steps:
          fetched = jax.device_get(history)  # waits for the steps to finish
          now = time.time()
          last_metrics = metrics_lib.summarize(fetched, now - tick, images_per_step)
          last_metrics["skipped_records"] = pipeline.skipped
          history, tick = [], now
          writer.scalars(done, last_metrics)
          bar.set_postfix(loss=f"{last_metrics['loss']:.4f}", refresh=False)
          if last_metrics["nonfinite_streak"] >= t.max_nonfinite:
            raise NonFiniteError(f"{last_metrics['nonfinite_streak']} consecutive non-finite steps at step "
                                 f"{done} (train.max_nonfinite={t.max_nonfinite}); params are from the last "
                                 "finite step")
        if done % t.checkpoint_every == 0:
          save(done)
        if t.sample_every and done % t.sample_every == 0:
          samples.append(write_samples(config, networks, state.averaged(), workdir, done, writer))
          tick = time.time()  # do not count sampling in steps/s
        if evaluator.on and config.eval.every and done % config.eval.every == 0 and done != t.num_steps:
          evals.append(evaluator(config, networks, state.averaged(), workdir, done, writer))
          tick = time.time()
    step_now = int(jax.device_get(state.step))
    save(step_now, force=True)
    if t.sample_every and stopped_by == "num_steps" and step_now % t.sample_every:
      samples.append(write_samples(config, networks, state.averaged(), workdir, step_now, writer))
    # A finished run started again does not evaluate its last step a second time.
    if evaluator.on and config.eval.at_end and stopped_by == "num_steps" and not evaluator_lib.evaluated(workdir, step_now):
      evals.append(evaluator(config, networks, state.averaged(), workdir, step_now, writer))
    elif jax.process_index() == 0:  # the curves of the whole run (the evaluator has just drawn them)
      curves.write(workdir)
  finally:
    bar.close()
    ckpt.close()
    if writer is not None:
      writer.close()
  log.info("stopped at step %d (%s)", step_now, stopped_by)
  return dict(step=step_now, stopped_by=stopped_by, last_metrics=last_metrics, samples=samples,
              eval=evals[-1] if evals else None)
