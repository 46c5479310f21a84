"""The config module: its allowed values agree with the registries that implement them, and
loading a config file imports nothing heavier than ml_collections."""

import os
import subprocess
import sys

from jdiff import config as config_lib
from jdiff import diffusion, models
from jdiff.data import sources
from jdiff.models import layers, text
from jdiff.train import objectives, optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_allowed_values_are_the_registries():
  assert config_lib.MODELS == tuple(models.MODELS)
  assert config_lib.ATTENTION == tuple(layers.ATTENTION_IMPLS)
  assert config_lib.REMAT == tuple(layers.REMAT_POLICIES)
  assert config_lib.TEXT_ENCODERS == tuple(text.TEXT_ENCODERS) + ("sd3",)
  assert config_lib.DATA_SOURCES == sources.SOURCES
  assert config_lib.PREDICTIONS == diffusion.PREDICTIONS
  assert config_lib.WEIGHTINGS == diffusion.WEIGHTINGS
  assert config_lib.TIMESTEP_KINDS == diffusion.TIMESTEP_KINDS
  assert config_lib.SHIFT_KINDS == diffusion.SHIFT_KINDS
  assert config_lib.SAMPLERS == diffusion.METHODS
  assert config_lib.SCHEDULES == optim.SCHEDULES
  allowed = {name for names in config_lib.STAGE_OBJECTIVES.values() for name in names}
  assert allowed == set(objectives.OBJECTIVES)


def test_loading_and_validating_a_config_file_imports_no_jax():
  code = ("import sys; from jdiff import config; "
          "[config.validate(config.load(f'configs/{f}')) for f in ('mmdit_256.py:cpu', 'mmdit_256.py:cpu_long', 'dit_256.py')]; "
          "heavy = sorted(m for m in ('jax', 'flax', 'grain', 'optax', 'numpy') if m in sys.modules); "
          "print(heavy); assert not heavy, heavy")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr + out.stdout
