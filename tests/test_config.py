"""The config module (its allowed values agree with the registries that implement them, and
loading a config file imports nothing heavier than ml_collections) and the entry points' shared set-up."""

import os
import subprocess
import sys

import pytest

from jdiff import config as config_lib
from jdiff import diffusion, models
from jdiff.data import decode, files, sources
from jdiff.eval import evaluator
from jdiff.models import layers, text
from jdiff.interop import sd3_pipeline
from jdiff.train import objectives, optim

import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_allowed_values_are_the_registries():
  assert config_lib.MODELS == tuple(models.MODELS)
  assert config_lib.ATTENTION == tuple(layers.ATTENTION_IMPLS)
  assert config_lib.REMAT == tuple(layers.REMAT_POLICIES)
  assert config_lib.TEXT_ENCODERS == tuple(text.TEXT_ENCODERS) + tuple(sd3_pipeline.TEXT_RECIPES)
  assert config_lib.FROZEN_TEXT == tuple(sd3_pipeline.TEXT_RECIPES)
  assert config_lib.DATA_SOURCES == sources.SOURCES
  assert config_lib.CAPTION_FROM == files.CAPTION_FROM
  assert config_lib.MISSING_CAPTIONS == files.MISSING_CAPTION
  assert config_lib.LOSS_MASKS == decode.LOSS_MASKS
  assert config_lib.EVAL_METRICS == evaluator.NAMES
  assert config_lib.PREDICTIONS == diffusion.PREDICTIONS
  assert config_lib.WEIGHTINGS == diffusion.WEIGHTINGS
  assert config_lib.TIMESTEP_KINDS == diffusion.TIMESTEP_KINDS
  assert config_lib.SHIFT_KINDS == diffusion.SHIFT_KINDS
  assert config_lib.SAMPLERS == diffusion.METHODS
  assert config_lib.SCHEDULES == optim.SCHEDULES
  allowed = {name for names in config_lib.STAGE_OBJECTIVES.values() for name in names}
  assert allowed == set(objectives.OBJECTIVES)


def test_loading_and_validating_a_config_file_imports_no_jax():
  code = ("import sys; from jdiff import config, config_checks; "
          "[config_checks.validate(config.load(f'configs/{f}')) for f in ('mmdit_256.py:cpu', 'mmdit_256.py:cpu_long', 'dit_256.py')]; "
          "heavy = sorted(m for m in ('jax', 'flax', 'grain', 'optax', 'numpy') if m in sys.modules); "
          "print(heavy); assert not heavy, heavy")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr + out.stdout


def test_reuse_host_memory_stops_the_page_faults_of_repeated_large_allocations():
  """A 64 MiB buffer allocated, touched and freed over and over (as XLA:CPU does with a
  step's temporaries): with glibc's defaults every round faults all its pages in again;
  after cli.reuse_host_memory() the rounds reuse the same heap memory. In a subprocess: the
  setting is process-wide."""
  code = r"""
import ctypes, resource
from jdiff import cli
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def faults():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(5):
    p = libc.malloc(64 << 20)  # plain malloc, as XLA's allocator (NumPy asks for huge pages)
    ctypes.memset(p, 1, 64 << 20)
    libc.free(p)
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
default = faults()
changed = cli.reuse_host_memory()
faults()  # the first round grows the heap
print(changed, default, faults())
"""
  if not sys.platform.startswith("linux"):
    pytest.skip("glibc's malloc: Linux only")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr
  changed, default, reused = out.stdout.split()
  assert changed == "True"
  pages = 5 * (64 << 20) // 4096
  assert int(default) > 0.9 * pages and int(reused) < 0.02 * pages, (default, reused)
  off = subprocess.run([sys.executable, "-c", "from jdiff import cli; print(cli.reuse_host_memory())"], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, JDIFF_MALLOC="system"))
  assert off.stdout.strip() == "False", off.stderr


def test_print_config_lists_every_field_with_its_value_and_comment():
  import helpers

  c = config_lib.base()
  c.data.resolution = 48
  text = config_lib.describe(c)
  lines = {line.split(" = ")[0]: line for line in text.splitlines() if not line.startswith("#")}
  flat = dict(config_lib._flatten(c))
  assert set(lines) == set(flat)  # every field, once
  assert lines["data.resolution"].startswith("data.resolution = 48  # square training resolution")
  assert lines["data.caption_dropout"].endswith("# P(caption -> empty) for classifier-free guidance")
  # A comment block above a field documents it; a section's own comment heads the section.
  assert "# flow: flow matching" in lines["objective"]
  assert any(line.startswith("# grpo: Online RL with a verifiable reward") for line in text.splitlines())
  proc = helpers.cli("jdiff.main", "--config=configs/mmdit_256.py:cpu", "--print_config", "--config.train.num_steps=7")
  assert "train.num_steps = 7" in proc.stdout and "data.buckets.pixels = 0" in proc.stdout
  # Piped into a reader that is gone before the first line (`| head -1` that stopped): no
  # traceback, exit status 1 (`true` exits at once; Python needs seconds to start).
  cmd = f"{sys.executable} -m jdiff.main --config=configs/mmdit_256.py:cpu --print_config | true"
  piped = subprocess.run(["bash", "-c", cmd + "; exit ${PIPESTATUS[0]}"], cwd=ROOT, env=xla_env.env(),
                         capture_output=True, text=True)
  assert piped.returncode == 1 and "Traceback" not in piped.stderr, piped.stderr[-2000:]
