"""The train state: the pytree that is sharded, donated, checkpointed and restored, and
how it is initialised directly into its shardings."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jdiff.networks import Networks
from jdiff.train import sharding as shard_lib


@flax.struct.dataclass
class TrainState:
  """step: int32 []; params / ema_params: {'denoiser', 'text'}; opt_state: optax state;
  rng: uint32 key data of the run's base key; nonfinite_streak: int32 [] consecutive
  skipped (non-finite) updates."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_streak: jax.Array


def init_state(networks: Networks, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """A fresh, boxed TrainState (use under jax.eval_shape / jit, then nn.unbox)."""
  k_params, k_run = jax.random.split(rng)
  params = networks.init_params(k_params)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=jax.tree.map(jnp.copy, params),
      opt_state=tx.init(params),
      rng=jax.random.key_data(k_run),
      nonfinite_streak=jnp.zeros((), jnp.int32),
  )


def state_shardings(networks: Networks, tx: optax.GradientTransformation, mesh, rules) -> tuple[Any, Any]:
  """(abstract unboxed TrainState, its NamedShardings) from the logical axis names."""
  boxed = jax.eval_shape(lambda r: init_state(networks, tx, r), jax.random.key(0))
  shardings = shard_lib.tree_shardings(boxed, mesh, rules)
  return nn.unbox(boxed), shardings


def create_state(networks: Networks, tx: optax.GradientTransformation, mesh, rules, seed: int):
  """Initialises the state directly into its shardings. Returns (state, shardings)."""
  _, shardings = state_shardings(networks, tx, mesh, rules)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda r: nn.unbox(init_state(networks, tx, r)), out_shardings=shardings)(
        jax.random.key(seed))
  return state, shardings


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings: the restore target for a checkpoint."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

