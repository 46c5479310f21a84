"""Small models and inputs shared by the tests."""

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax

from jdiff import models
from jdiff.models import layers

import xla_env

TINY_MMDIT = dict(name="mmdit", variant="d2", in_channels=4, context_dim=24, pooled_dim=12,
                  pos_embed_max_size=16)
TINY_FLUX = dict(name="flux", variant="schnell", depth=1, single_depth=2, width=64, num_heads=2,
                 in_channels=4, context_dim=24, pooled_dim=12, axes_dims=(8, 12, 12))
TINY_DIT_TEXT = dict(name="dit", variant="S/2", depth=2, width=64, num_heads=4, in_channels=3,
                     pooled_dim=12, pos_embed_max_size=16)
TINY_DIT_CLASS = dict(name="dit", variant="S/2", depth=2, width=64, num_heads=4, in_channels=3,
                      num_classes=10, pos_embed_max_size=16)


def inputs(cfg, batch=2, size=(16, 16), seed=0, text_len=5):
  """(x, t, cond) for a model config."""
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (batch, *size, cfg["in_channels"]))
  t = jax.random.uniform(ks[1], (batch,))
  cond = {}
  if cfg.get("num_classes"):
    cond["labels"] = jax.random.randint(ks[2], (batch,), 0, cfg["num_classes"] + 1)
  else:
    cond["pooled"] = jax.random.normal(ks[2], (batch, cfg["pooled_dim"]))
  if cfg["name"] in ("mmdit", "flux"):
    cond["context"] = jax.random.normal(ks[3], (batch, text_len, cfg["context_dim"]))
  return x, t, cond


def init(cfg, x, t, cond, seed=0):
  """(model, params). Jitted: op by op, a model's many small ops would each be dispatched and
  compiled on their own, which costs the suite more than compiling the whole init once."""
  model = models.build(cfg)
  return model, nn.unbox(jax.jit(model.init)(jax.random.key(seed), x, t, **cond))


def perturb(params, scale=0.05, seed=1):
  """Zero-initialised layers make outputs trivially 0; add noise so comparisons bite.
  Jitted, as init: op by op it compiles three programs per parameter shape."""
  return _perturb(params, scale, seed)


@functools.partial(jax.jit, static_argnums=2)
def _perturb(params, scale, seed):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape, p.dtype)
                                   for p, k in zip(leaves, keys)])


def block_groups(cfg, model):
  """(name, depth) of each stack of blocks that scan=True stacks on a 'layers' axis."""
  if cfg["name"] == "flux":
    return [("double_blocks", model.depth), ("single_blocks", model.single_depth)]
  return [("blocks", model.depth - 1 if cfg["name"] == "mmdit" else model.depth)]


def to_scanned(params, groups):
  return layers.stack_groups(params, groups)


def to_unrolled(params, groups):
  return layers.unstack_groups(params, [name for name, _ in groups])


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def benchmark_module(name):
  """benchmarks/<name>.py as a module (the scripts are not a package)."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def cli(*args, check=True, timeout=600):
  """Runs `python -m <args>` from the repository root on one CPU device; returns the process."""
  env = xla_env.env()
  proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(proc.stderr[-3000:])
  return proc


def randomize_norms(model):
  """Random norm parameters in a PyTorch reference model (scales around 1, biases around 0),
  so parity tests exercise them; its linear layers keep PyTorch's (non-zero) init."""
  import torch

  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and p.ndim == 1:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
  return model


def torch_state_dict(model):
  """A PyTorch module's state dict as numpy arrays."""
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def assert_parity(ours, ref):
  """The parity requirement: same shape, max |ours - ref| <= 1e-4 x max |ref|."""
  import numpy as np

  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  np.testing.assert_array_less(np.abs(ours - ref).max(), 1e-4 * np.abs(ref).max())
