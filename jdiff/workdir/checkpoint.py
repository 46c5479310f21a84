"""Checkpoints: one Orbax CheckpointManager per workdir with four named items.

  state    the TrainState (params, EMA, optimizer, step, rng), sharded arrays
  data     the grain iterator position of every process
  config   the run's config as JSON
  lineage  the chain of stages that led here: [{stage, workdir, init_from, from_step}, ...]

Restoring takes an abstract state whose leaves carry the *current* mesh's shardings, so
a checkpoint written on one mesh restores onto another.

Integrity. Every checkpoint carries CHECKSUMS (size and CRC-32 of each of its files), written
into Orbax's temporary directory before the atomic rename that commits it, so a committed
checkpoint always has them and a save killed midway leaves only a temporary directory that
Orbax ignores and the next writable open removes. Restoring checks them first: a truncated,
missing or changed file is found before any of it is used. A run resumes from the newest checkpoint that restores; newer ones
that do not are moved to WORKDIR/checkpoints_aside/ (never deleted) with one log line each.
A write error during an asynchronous save (a full disk) is reported when the next save or
the end of the run finds it; the failed step is never committed.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
import zlib
from typing import Any, Callable

import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from jdiff import config as config_lib
from jdiff import errors
from jdiff.workdir import run_config

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "config", "lineage")
CHECKSUMS = "jdiff_checksums.json"
MAX_FAILED_SAVES = 3  # consecutive failed saves (a full disk) after which a run stops
_ORBAX_TMP = ".orbax-checkpoint-tmp"  # Orbax's name for a step being written: STEP + this


class CheckpointError(errors.UserError, RuntimeError):
  """A checkpoint that cannot be written or restored; the message is one line for the user."""


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


def aside_dir(workdir: str) -> epath.Path:
  """Where checkpoints that do not restore (or that an explicit restore_step supersedes) go."""
  return epath.Path(workdir) / "checkpoints_aside"


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):  # zlib releases the GIL on large buffers
      crc = zlib.crc32(chunk, crc)
  return crc


# Step-level files that Orbax writes or rewrites when it commits, after the checksums.
_WRITTEN_AT_COMMIT = frozenset({CHECKSUMS, "_CHECKPOINT_METADATA", "commit_success.txt"})


def _files(root: str) -> list[str]:
  """The files of a checkpoint that its checksums cover: all of its items' files."""
  rels = (os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
  return sorted(rel for rel in rels if rel not in _WRITTEN_AT_COMMIT)


def write_checksums(step_dir: str) -> None:
  """Records the size and CRC-32 of every file under `step_dir` in step_dir/CHECKSUMS."""
  sums = {rel: [os.path.getsize(os.path.join(step_dir, rel)), _crc32(os.path.join(step_dir, rel))]
          for rel in _files(step_dir)}
  tmp = os.path.join(step_dir, CHECKSUMS + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"algorithm": "crc32", "files": sums}, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, CHECKSUMS))


def verify_checksums(step_dir: str) -> str | None:
  """What is wrong with the files of a checkpoint against its CHECKSUMS (None: nothing;
  a checkpoint written before checksums existed is not checked)."""
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.exists(path):
    return None if os.path.isdir(step_dir) else f"{step_dir} does not exist"
  try:
    with open(path) as f:
      sums = json.load(f)["files"]
  except (OSError, ValueError, KeyError) as e:
    return f"its checksum file is unreadable ({e})"
  for rel, (size, crc) in sums.items():
    full = os.path.join(step_dir, rel)
    if not os.path.exists(full):
      return f"{rel} is missing"
    if os.path.getsize(full) != size:
      return f"{rel} has {os.path.getsize(full)} bytes, {size} when written (truncated or overwritten)"
    if _crc32(full) != crc:
      return f"{rel} has changed since it was written (checksum mismatch)"
  return None


def _one_line(e: BaseException) -> str:
  """An exception as one line; a long one keeps its start and its end, where TensorStore and
  the OS put the cause (e.g. 'No space left on device')."""
  text = " ".join(str(e).split())
  if len(text) > 400:
    text = f"{text[:150]} ... {text[-250:]}"
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _Drop(logging.Filter):
  """Drops log records whose message starts with `prefix`."""

  def __init__(self, prefix: str):
    super().__init__()
    self.prefix = prefix

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(self.prefix)


def _drop_unretrieved_save_futures(record: logging.LogRecord) -> bool:
  """asyncio reports the futures of a failed save's other writes, when they are collected
  (often after the run ended), as 'exception was never retrieved' with a traceback each; the
  failure itself was already reported as one line."""
  text = record.getMessage()
  return not ("exception was never retrieved" in text and _ORBAX_TMP in text)


logging.getLogger("asyncio").addFilter(_drop_unretrieved_save_futures)


class _OneLineSaveErrors(logging.Filter):
  """Orbax logs a failed background save (a full disk) as several tracebacks, one per thread
  that saw it; this keeps the first, as one line naming the step, and drops the rest (the
  next save or the end of the run reports the failure again as a CheckpointError)."""

  def __init__(self, owner: "Checkpoints"):
    super().__init__()
    self.owner = owner
    self.reported: int | None = None

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or "orbax" not in record.pathname:
      return True
    step = self.owner._saving
    if self.reported == step:
      return False
    self.reported = step
    error = record.exc_info[1] if record.exc_info else None
    record.msg, record.args = "checkpoint step %s could not be written: %s", (
        step, _one_line(error) if error is not None else record.getMessage())
    record.exc_info = record.exc_text = None
    return True


class Checkpoints:
  """Saves and restores the four items of a run in `workdir`/checkpoints."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.directory = checkpoint_dir(self.workdir)
    # Read-only opens (sampling, evaluation, init_from) are what was asked for: Orbax's
    # warning that the directory is read-only says nothing to the user, so it is dropped.
    absl_log = logging.getLogger("absl")
    quiet = _Drop("Given directory is read only")
    if read_only:
      absl_log.addFilter(quiet)
    self.read_only = read_only
    self.async_save = async_save
    self._saving: int | None = None  # the step of the save in flight
    self.failed_in_a_row = 0
    try:
      self.manager = ocp.CheckpointManager(
          self.directory,
          item_names=ITEMS,
          # read_only: what Orbax would reset (with a warning each) is not set at all.
          options=ocp.CheckpointManagerOptions(
              max_to_keep=None if read_only else keep,
              save_interval_steps=0 if read_only else 1,
              enable_async_checkpointing=async_save,
              async_options=ocp.AsyncOptions(post_finalization_callback=self._seal) if async_save else None,
              # Partial saves are removed by _remove_partial_saves instead: Orbax removes
              # them in a background thread that only a later save waits for, so a restore
              # could still see them.
              cleanup_tmp_directories=False,
              create=not read_only, read_only=read_only),
      )
    finally:
      absl_log.removeFilter(quiet)
    if not read_only:
      # A save that a kill or a full disk interrupted left a temporary directory.
      self._remove_partial_saves()
    self._save_errors = _OneLineSaveErrors(self)
    absl_log.addFilter(self._save_errors)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _seal(self) -> None:
    """Writes the checksums of the step being saved, after its files are complete and
    before Orbax commits it (called by Orbax's save thread; the first process writes)."""
    if self._saving is None or jax.process_index() != 0:
      return
    root = self.directory
    pending = sorted(root.glob(f"{self._saving}{_ORBAX_TMP}*"))
    # Storage without atomic rename (object stores) writes the step in place.
    step_dir = pending[-1] if pending else root / str(self._saving)
    write_checksums(os.fspath(step_dir))

  def save(self, step: int, state: Any, data_iterator: Any, config: ml_collections.ConfigDict,
           lineage: list[dict[str, Any]], force: bool = False) -> bool:
    """Starts an (async) save of all items at `step`; returns whether one was started."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        lineage=ocp.args.JsonSave({"stages": lineage}),
    )
    return self._save(step, args, force)

  def _save(self, step: int, args: ocp.args.Composite, force: bool = False) -> bool:
    """Starts saving `args` at `step`, after learning the fate of the previous save; a
    synchronous save gets its checksums here, an asynchronous one in _seal."""
    # The previous save's fate is known here (and _seal must not see the new step before).
    self._count(self._finish_previous())
    self._saving = step
    try:
      started = self.manager.save(step, args=args, force=force)
      if not self.async_save and started and jax.process_index() == 0:
        write_checksums(os.fspath(self.directory / str(step)))
    except Exception as e:  # noqa: BLE001 -- a write error before the save went to the background
      self._saving = None
      self._remove_partial_saves()
      self._count(CheckpointError(f"saving checkpoint step {step} in {self.directory} failed "
                                  f"({_one_line(e)}); the earlier checkpoints are intact "
                                  f"({self._latest_text()})"))
      return False
    return started

  def _finish_previous(self) -> CheckpointError | bool | None:
    """Waits for the save in flight: None if there was none, True if it committed, else its error."""
    had = self._saving is not None
    try:
      self.wait()
    except CheckpointError as e:
      return e
    return True if had else None

  def _count(self, outcome: CheckpointError | bool | None) -> None:
    """Counts failed saves in a row: logs a failure, and after MAX_FAILED_SAVES raises it."""
    if outcome is True:
      self.failed_in_a_row = 0
    elif isinstance(outcome, CheckpointError):
      self.failed_in_a_row += 1
      if self.failed_in_a_row >= MAX_FAILED_SAVES:
        raise CheckpointError(f"{outcome}; {self.failed_in_a_row} saves in a row failed, so the run stops")
      log.error("%s; training continues and saves again at the next checkpoint step", outcome)

  def restore(self, abstract_state: Any, data_iterator: Any, step: int | None = None):
    """Restores (state, lineage, step) from the newest checkpoint that restores completely
    (or exactly `step`) and rewinds `data_iterator` to its position."""
    def restore_items(s):
      restored = self.manager.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.checkpoint.CheckpointRestore(data_iterator),
          lineage=ocp.args.JsonRestore(),
      ))
      return restored.state, restored.lineage["stages"]
    (state, lineage), step = self.first_restorable(restore_items, step)
    return state, lineage, step

  def first_restorable(self, restore: Callable[[int], Any], step: int | None = None) -> tuple[Any, int]:
    """(restore(s), s) for the newest step s whose checksums hold and whose restore succeeds,
    or for exactly `step`. Newer checkpoints are moved aside (unless read-only), each with
    one log line saying why; if none restores, raises CheckpointError listing what was tried."""
    where = self.directory
    steps = sorted(self.manager.all_steps(), reverse=True)
    if step is not None and step not in steps:
      raise CheckpointError(f"there is no checkpoint at step {step} in {where} (steps: "
                            f"{', '.join(map(str, steps)) or 'none'})")
    failed = []
    for s in ([step] if step is not None else steps):
      problem = verify_checksums(os.fspath(where / str(s)))
      if problem is None:
        try:
          result = restore(s)
        except Exception as e:  # noqa: BLE001 -- whatever Orbax, TensorStore or json raise for bad files
          problem = _one_line(e)
      if problem is not None:
        failed.append((s, problem))
        continue
      reasons = dict(failed)
      for newer in [x for x in steps if x > s]:
        why = reasons.get(newer, f"superseded by the requested step {s}")
        if self.read_only:
          log.error("checkpoint step %d in %s is not used: %s", newer, where, why)
        else:
          moved = self._set_aside(newer, "corrupt" if newer in reasons else "superseded")
          log.error("checkpoint step %d in %s is not used (%s): moved to %s", newer, where, why, moved)
      return result, s
    tried = "; ".join(f"step {s}: {p}" for s, p in failed)
    if step is not None:
      raise CheckpointError(f"checkpoint step {step} in {where} cannot be restored: {tried}")
    raise CheckpointError(f"no checkpoint in {where} restores ({tried}); they are left in place: "
                          "move them away to start afresh, or set train.restore_step")

  def _latest_text(self) -> str:
    latest = self.latest_step()
    return "none yet" if latest is None else f"latest: step {latest}"

  def _remove_partial_saves(self, reload: bool = True) -> None:
    """Removes every uncommitted (temporary) step directory, never a checkpoint; called only
    while no save is in flight. After a failed save this frees the space a full disk needs
    for the next one. The failed save's other TensorStore writes may still be unwinding and
    recreate directories, so after removing any it looks again until none comes back."""
    if jax.process_index() == 0:
      for _ in range(20):
        partial = [p.get() for p in ocp.path.step.all_temporary_paths(self.directory)]
        if not partial:
          break
        for path in partial:
          path.rmtree(missing_ok=True)
        time.sleep(0.1)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("jdiff checkpoint remove partial saves")
    if reload:
      self.manager.reload()

  def _set_aside(self, step: int, why: str) -> epath.Path:
    """Moves checkpoint `step` to aside_dir (first process; the others wait for it)."""
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    dest = aside_dir(self.workdir) / f"{step}.{why}.{stamp}"
    if jax.process_index() == 0:
      dest.parent.mkdir(parents=True, exist_ok=True)
      os.rename(self.directory / str(step), dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jdiff checkpoint aside {step}")
    self.manager.reload()
    return dest

  def wait(self) -> None:
    """Waits for the save in flight; raises CheckpointError if it failed (never committed)."""
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001 -- a write error of the save thread, e.g. a full disk
      step, self._saving = self._saving, None
      self._remove_partial_saves()
      raise CheckpointError(f"saving checkpoint step {step} in {self.directory} failed "
                            f"({_one_line(e)}); it was not committed, the earlier checkpoints are intact "
                            f"({self._latest_text()})") from e
    self._saving = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()
      if not self.read_only:
        self._remove_partial_saves(reload=False)
      logging.getLogger("absl").removeFilter(self._save_errors)


def save_weights(workdir: str, params: Any, config: ml_collections.ConfigDict, lineage: list[dict[str, Any]],
                 step: int = 0) -> None:
  """A weights-only checkpoint (params = EMA params, no optimizer or data state) that later
  runs start from with config.init_from; written by `python -m jdiff.convert import`."""
  run_config.write(workdir, config)
  ckpt = Checkpoints(workdir, async_save=False)
  ckpt._save(step, ocp.args.Composite(
      state=ocp.args.StandardSave({"step": step, "params": params, "ema_params": params}),
      config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
      lineage=ocp.args.JsonSave({"stages": lineage}),
  ))
  ckpt.close()


def _restore_subtree(workdir: str, subtree: Callable[["Checkpoints", int], dict[str, Any]], step: int | None = None):
  """Restores only the named parts of a state checkpoint (e.g. EMA params), onto the
  shardings of the ShapeDtypeStructs that subtree(checkpoints, step) gives. Returns (restored subtree,
  lineage, step)."""
  ckpt = _open_read_only(workdir)

  def restore(s):
    item = subtree(ckpt, s)
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype), item)
    return ckpt.manager.restore(s, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        lineage=ocp.args.JsonRestore(),
    ))

  try:
    restored, step = ckpt.first_restorable(restore, step)
  finally:
    ckpt.close()
  # A partial restore hands back the abstract value of anything the checkpoint lacks.
  missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(restored.state)
             if isinstance(leaf, jax.ShapeDtypeStruct)]
  if missing:
    raise errors.InvalidArgument(f"{checkpoint_dir(workdir)} step {step} has no {', '.join(missing[:5])}"
                                 f"{f' (and {len(missing) - 5} more)' if len(missing) > 5 else ''}: the checkpoint was "
                                 "written for another model layout or version")
  return restored.state, restored.lineage["stages"], step


def _split_by(abstract: Any, saved: Any) -> tuple[Any, Any]:
  """(the part of `abstract` whose leaves `saved` (a checkpoint's metadata tree) holds, the
  rest); None for an empty part."""
  if isinstance(abstract, dict):
    parts = {k: _split_by(v, saved.get(k) if isinstance(saved, dict) else None) for k, v in abstract.items()}
    held = {k: h for k, (h, _) in parts.items() if h is not None}
    rest = {k: r for k, (_, r) in parts.items() if r is not None}
    return held or None, rest or None
  return (abstract, None) if saved is not None else (None, abstract)


def _merge(a: Any, b: Any) -> Any:
  if a is None or b is None:
    return b if a is None else a
  if isinstance(a, dict):
    return {k: _merge(a.get(k), b.get(k)) for k in {**a, **b}}
  raise ValueError("a parameter restored twice")


def restore_ema(workdir: str, abstract_params: Any, step: int | None = None):
  """The EMA params of `workdir`'s latest (or given) checkpoint: (ema, lineage, step). A
  training checkpoint keeps no average of its frozen parameters (train.state.TrainState):
  those come from its params, which they equal."""
  def subtree(ckpt, s):
    saved = ocp.PyTreeCheckpointHandler().metadata(ckpt.directory / str(s) / "state")
    saved = getattr(saved, "tree", saved) or {}
    held, rest = (_split_by(abstract_params, saved["ema_params"]) if saved.get("ema_params") is not None
                  else (abstract_params, None))  # no readable metadata: all from the EMA, as it was
    return {k: v for k, v in (("ema_params", held), ("params", rest)) if v is not None}

  tree, lineage, step = _restore_subtree(workdir, subtree, step)
  return _merge(tree.get("ema_params"), tree.get("params")), lineage, step


def read_lineage(workdir: str, step: int | None = None) -> list[dict[str, Any]]:
  """The stage lineage stored with `workdir`'s latest (or given) checkpoint."""
  ckpt = _open_read_only(workdir)
  try:
    restored, _ = ckpt.first_restorable(
        lambda s: ckpt.manager.restore(s, args=ocp.args.Composite(lineage=ocp.args.JsonRestore())), step)
  finally:
    ckpt.close()
  return restored.lineage["stages"]


def _open_read_only(workdir: str) -> Checkpoints:
  ckpt = Checkpoints(workdir, read_only=True)
  if ckpt.latest_step() is None:
    ckpt.close()
    raise errors.NotFound(f"no checkpoint found in {checkpoint_dir(workdir)}")
  return ckpt


def check_same_model(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume `workdir` with a config whose model differs from the one its
  checkpoints hold (the architecture fields of config.INHERITED), before any restore."""
  path = run_config.path(workdir)
  if not path.exists():
    return
  stored = json.loads(path.read_text())
  differ = []
  for section in config_lib.INHERITED:  # compared as JSON: tuples and lists alike
    old, new = stored.get(section, {}), json.loads(config[section].to_json_best_effort())
    for key in sorted(set(old) | set(new)):
      if key not in config_lib.RUNTIME_FIELDS and old.get(key) != new.get(key):
        differ.append(f"{section}.{key}: {old.get(key)!r} there, {new.get(key)!r} now")
  if differ:
    raise CheckpointError(f"{workdir} holds checkpoints of another model ({'; '.join(differ)}): resume with "
                          "the same model fields, use a new workdir, or start a new workdir from this one's "
                          f"weights with --config.init_from={workdir}")
