"""Sharded forward passes on 8 fake CPU devices (see conftest.py) equal the single-device ones.

Batch 4 puts one sample on each batch shard: without the explicit FSDP weight gather in
models/layers/partitioning.py, XLA's SPMD partitioner swaps batch elements there (docs/notes.md).
"""

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

from jdiff import models
from jdiff.train import sharding as S

from helpers import TINY_DIT_TEXT, TINY_FLUX, TINY_MMDIT, inputs, perturb

RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("modulation", "tensor"),
)


def test_eight_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("cfg", [TINY_MMDIT, TINY_DIT_TEXT, TINY_FLUX], ids=["mmdit", "dit", "flux"])
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("batch,mesh_shape", [(4, (2, 2, 2)), (8, (2, 2, 2)), (4, (1, 4, 2))])
def test_sharded_forward_equals_single_device(cfg, scan, batch, mesh_shape):
  cfg = dict(cfg, scan=scan)
  model = models.build(cfg)
  x, t, cond = inputs(cfg, batch=batch)
  mesh = S.make_mesh(dict(zip(S.MESH_AXES, mesh_shape)))
  init = lambda k: model.init(k, x, t, **cond)
  params, shardings = S.init_sharded(init, mesh, RULES, jax.random.key(0))
  # Parameters really are split: the MLP kernels over fsdp x tensor, for instance.
  blocks = "double_blocks" if cfg["name"] == "flux" else "blocks"
  fc1 = params["params"][blocks if scan else blocks + "_0"]
  fc1 = fc1["mlp" if cfg["name"] == "dit" else "x_mlp"]["fc1"]["kernel"]
  assert fc1.sharding.spec[-2:] == ("fsdp", "tensor")
  assert fc1.addressable_shards[0].data.size == fc1.size // (mesh_shape[1] * mesh_shape[2])

  params = jax.device_put(perturb(jax.device_get(params)), shardings)
  ref = jax.jit(model.apply)(jax.device_get(params), x, t, **cond)

  batch_sharding = S.logical_sharding(mesh, RULES, "activation_batch")
  x_s, t_s, cond_s = jax.device_put((x, t, cond), batch_sharding)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    out = jax.jit(lambda p, x, t, c: model.apply(p, x, t, **c))(params, x_s, t_s, cond_s)
  assert out.addressable_shards[0].data.shape[0] == batch // (mesh_shape[0] * mesh_shape[1])
  assert float(np.abs(np.asarray(ref)).max()) > 1e-2
  chex.assert_trees_all_close(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_mesh_shapes_and_errors():
  assert S.mesh_shape(dict(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
  assert S.mesh_shape(dict(data=1, fsdp=-1, tensor=2), 8) == (1, 4, 2)
  with pytest.raises(ValueError, match="cannot fill"):
    S.mesh_shape(dict(data=-1, fsdp=3, tensor=1), 8)
  with pytest.raises(ValueError, match="needs 4 devices"):
    S.mesh_shape(dict(data=2, fsdp=2, tensor=1), 8)
  with pytest.raises(ValueError, match="at most one -1"):
    S.mesh_shape(dict(data=-1, fsdp=-1, tensor=1), 8)


def test_sharded_splash_attention_equals_single_device():
  """The Pallas kernel runs per shard (shard_map over batch and heads) under the mesh."""
  cfg = dict(TINY_MMDIT, attention="splash")
  model = models.build(cfg)
  x, t, cond = inputs(cfg, batch=4)
  mesh = S.make_mesh(dict(zip(S.MESH_AXES, (2, 2, 2))))
  params, shardings = S.init_sharded(lambda k: model.init(k, x, t, **cond), mesh, RULES, jax.random.key(0))
  params = jax.device_put(perturb(jax.device_get(params)), shardings)
  ref = models.build(dict(TINY_MMDIT, attention="xla")).apply(jax.device_get(params), x, t, **cond)
  x_s, t_s, cond_s = jax.device_put((x, t, cond), S.logical_sharding(mesh, RULES, "activation_batch"))
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    out = jax.jit(lambda p, x, t, c: model.apply(p, x, t, **c))(params, x_s, t_s, cond_s)
  chex.assert_trees_all_close(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
