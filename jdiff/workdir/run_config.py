"""A run's config in its workdir (WORKDIR/config.json): written when a run starts, read by
everything that opens the run, and inherited by tune configs (model.name='inherit');
`prepare`, the one way from a config file to the config a run starts with."""

from __future__ import annotations

import json

import ml_collections
from etils import epath

from jdiff import config as config_lib
from jdiff import config_checks
from jdiff import errors


def path(workdir: str) -> epath.Path:
  """WORKDIR/config.json."""
  return epath.Path(workdir) / "config.json"


def load(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with (workdir/config.json)."""
  file = path(workdir)
  if not file.exists():
    raise errors.NotFound(f"{file} not found: is {workdir!r} a jdiff workdir?")
  return ml_collections.ConfigDict(json.loads(file.read_text()))


def write(workdir: str, config: ml_collections.ConfigDict) -> None:
  file = path(workdir)
  file.parent.mkdir(parents=True, exist_ok=True)
  file.write_text(config.to_json_best_effort(indent=2))


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """model.name='inherit': take the architecture (the model, text and autoencoder sections
  except config.RUNTIME_FIELDS; diffusion.shift and text.t5_len unless this config changes
  them from the defaults) from the config of the init_from workdir (e.g. one written by
  `python -m jdiff.convert import`), so a tune config need not restate an imported model.
  Other configs are returned as they are."""
  if config.model.name != "inherit":
    return config
  if not config.init_from:
    raise errors.InvalidArgument("config.model.name='inherit' takes the model from config.init_from, which is not set")
  parent = load(config.init_from)
  out = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
  for section in config_lib.INHERITED:
    for key, value in parent[section].items():
      if key not in config_lib.RUNTIME_FIELDS:
        out[section][key] = value
  # The timestep shift is the model's schedule (an import reads it from the pipeline's
  # scheduler: SD3's fixed 3, Flux's mu linear in the token count): inherited too, unless
  # this config sets one of its own.
  base = config_lib.base()
  if config.diffusion.shift.to_dict() == base.diffusion.shift.to_dict():
    out.diffusion.shift = ml_collections.ConfigDict(parent.diffusion.shift.to_dict())
  # Likewise the T5 token count the import chose (Flux-dev 512, schnell 256), a runtime field.
  if config.text.t5_len == base.text.t5_len:
    out.text.t5_len = parent.text.t5_len
  out.lock()
  return out


def prepare(config: ml_collections.ConfigDict, *, encoding: bool = False) -> ml_collections.ConfigDict:
  """The config a run starts with: `resolve`d, then validated (jdiff.config_checks; encoding:
  for `python -m jdiff.cache`, which reads the data a frozen-encoder run trains on). Every
  entry point calls it before any work, and so does the trainer for library callers; on a
  prepared config it returns the same config, unchanged."""
  config = resolve(config)
  config_checks.validate(config, encoding=encoding)
  return config
