"""Checkpoints: one Orbax CheckpointManager per workdir with four named items.

  state    the TrainState (params, EMA, optimizer, step, rng), sharded arrays
  data     the grain iterator position of every process
  config   the run's config as JSON
  lineage  the chain of stages that led here: [{stage, workdir, init_from, from_step}, ...]

Restoring takes an abstract state whose leaves carry the *current* mesh's shardings, so
a checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from jdiff import config as config_lib

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "config", "lineage")


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


class _Drop(logging.Filter):
  """Drops log records whose message starts with `prefix`."""

  def __init__(self, prefix: str):
    super().__init__()
    self.prefix = prefix

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(self.prefix)


class Checkpoints:
  """Saves and restores the four items of a run in `workdir`/checkpoints."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
    # Read-only opens (sampling, evaluation, init_from) are what was asked for: Orbax's
    # warning that the directory is read-only says nothing to the user, so it is dropped.
    absl_log = logging.getLogger("absl")
    quiet = _Drop("Given directory is read only")
    if read_only:
      absl_log.addFilter(quiet)
    try:
      self.manager = ocp.CheckpointManager(
          checkpoint_dir(self.workdir),
          item_names=ITEMS,
          # read_only: what Orbax would reset (with a warning each) is not set at all.
          options=ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep,
                                               save_interval_steps=0 if read_only else 1,
                                               enable_async_checkpointing=async_save,
                                               create=not read_only, read_only=read_only),
      )
    finally:
      absl_log.removeFilter(quiet)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any, config: ml_collections.ConfigDict,
           lineage: list[dict[str, Any]], force: bool = False) -> bool:
    """Starts an (async) save of all items at `step`; returns whether one was started."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        lineage=ocp.args.JsonSave({"stages": lineage}),
    )
    return self.manager.save(step, args=args, force=force)

  def restore(self, abstract_state: Any, data_iterator: Any, step: int | None = None):
    """Restores (state, lineage) at `step` (default: latest) and rewinds `data_iterator`."""
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
        lineage=ocp.args.JsonRestore(),
    ))
    return restored.state, restored.lineage["stages"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def save_weights(workdir: str, params: Any, config: ml_collections.ConfigDict, lineage: list[dict[str, Any]],
                 step: int = 0) -> None:
  """A weights-only checkpoint (params = EMA params, no optimizer or data state) that later
  runs start from with config.init_from; written by `python -m jdiff.convert import`."""
  write_config(workdir, config)
  ckpt = Checkpoints(workdir, async_save=False)
  ckpt.manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"step": step, "params": params, "ema_params": params}),
      config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
      lineage=ocp.args.JsonSave({"stages": lineage}),
  ))
  ckpt.close()


def _restore_subtree(workdir: str, subtree: dict[str, Any], step: int | None = None):
  """Restores only the named parts of a state checkpoint (e.g. EMA params), onto the
  shardings of `subtree`'s ShapeDtypeStructs. Returns (restored subtree, lineage, step)."""
  ckpt = Checkpoints(workdir, read_only=True)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint found in {checkpoint_dir(workdir)}")
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype), subtree)
  restored = ckpt.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=subtree, restore_args=restore_args, partial_restore=True),
      lineage=ocp.args.JsonRestore(),
  ))
  ckpt.close()
  # A partial restore hands back the abstract value of anything the checkpoint lacks.
  missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(restored.state)
             if isinstance(leaf, jax.ShapeDtypeStruct)]
  if missing:
    raise ValueError(f"{checkpoint_dir(workdir)} step {step} has no {', '.join(missing[:5])}"
                     f"{f' (and {len(missing) - 5} more)' if len(missing) > 5 else ''}: the checkpoint was "
                     "written for another model layout or version")
  return restored.state, restored.lineage["stages"], step


def restore_ema(workdir: str, abstract_params: Any, step: int | None = None):
  """The EMA params of `workdir`'s latest (or given) checkpoint: (ema, lineage, step)."""
  tree, lineage, step = _restore_subtree(workdir, {"ema_params": abstract_params}, step)
  return tree["ema_params"], lineage, step


def read_lineage(workdir: str, step: int | None = None) -> list[dict[str, Any]]:
  """The stage lineage stored with `workdir`'s latest (or given) checkpoint."""
  ckpt = Checkpoints(workdir, read_only=True)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint found in {checkpoint_dir(workdir)}")
  lineage = ckpt.manager.restore(step, args=ocp.args.Composite(lineage=ocp.args.JsonRestore())).lineage
  ckpt.close()
  return lineage["stages"]


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with (workdir/config.json)."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a jdiff workdir?")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  path = epath.Path(workdir) / "config.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(config.to_json_best_effort(indent=2))


def resolve_inherited(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """model.name='inherit': take the architecture (the model, text and autoencoder sections,
  except config.RUNTIME_FIELDS) from the config of the init_from workdir (e.g. one written by
  `python -m jdiff.convert import`), so a tune config need not restate an imported model.
  Other configs are returned as they are."""
  if config.model.name != "inherit":
    return config
  if not config.init_from:
    raise ValueError("config.model.name='inherit' takes the model from config.init_from, which is not set")
  parent = load_config(config.init_from)
  out = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
  for section in config_lib.INHERITED:
    for key, value in parent[section].items():
      if key not in config_lib.RUNTIME_FIELDS:
        out[section][key] = value
  out.lock()
  return out
