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
from jdiff.train import optim
from jdiff.train import sharding as shard_lib


@flax.struct.dataclass
class TrainState:
  """step: int32 []; params: {'denoiser', 'text'}; ema_params: the same tree with the moving
  average of the trainable parameters (optim.trainable) and optax.MaskedNode() in place of the
  frozen ones, which never change, so that a LoRA run over a large frozen base does not hold
  the base twice (`averaged` gives the whole tree); opt_state: optax state; rng: uint32 key
  data of the run's base key; nonfinite_streak: int32 [] consecutive skipped (non-finite)
  updates."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_streak: jax.Array


  def averaged(self) -> Any:
    """The parameters to sample with: the EMA of the trainable ones, the frozen ones as they are."""
    return averaged(self.params, self.ema_params)


def ema_init(params: Any, trainable: str) -> Any:
  """A fresh EMA tree: a copy of each parameter matching `trainable` (optim.trainable), a
  MaskedNode for the others. Boxed and plain trees alike."""
  mask = optim.trainable_mask(params, trainable)
  return jax.tree.map(lambda p, m: jax.tree.map(jnp.copy, p) if m else optax.MaskedNode(), params, mask,
                      is_leaf=optim.is_box)


def averaged(params: Any, ema: Any) -> Any:
  """`ema` with each MaskedNode (a frozen parameter) replaced by the parameter itself."""
  return optim.merge_trainable(ema, params)


def init_state(networks: Networks, tx: optax.GradientTransformation, rng: jax.Array, trainable: str = ""
               ) -> TrainState:
  """A fresh, boxed TrainState (use under jax.eval_shape / jit, then nn.unbox); trainable:
  optim.trainable, the parameters that get an EMA."""
  k_params, k_run = jax.random.split(rng)
  params = networks.init_params(k_params)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=ema_init(params, trainable),
      opt_state=tx.init(params),
      rng=jax.random.key_data(k_run),
      nonfinite_streak=jnp.zeros((), jnp.int32),
  )


def state_shardings(networks: Networks, tx: optax.GradientTransformation, mesh, rules, trainable: str = ""
                    ) -> tuple[Any, Any]:
  """(abstract unboxed TrainState, its NamedShardings) from the logical axis names."""
  boxed = jax.eval_shape(lambda r: init_state(networks, tx, r, trainable), jax.random.key(0))
  shardings = shard_lib.tree_shardings(boxed, mesh, rules)
  return nn.unbox(boxed), shardings


def create_state(networks: Networks, tx: optax.GradientTransformation, mesh, rules, seed: int, trainable: str = ""):
  """Initialises the state directly into its shardings. Returns (state, shardings)."""
  _, shardings = state_shardings(networks, tx, mesh, rules, trainable)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda r: nn.unbox(init_state(networks, tx, r, trainable)), out_shardings=shardings)(
        jax.random.key(seed))
  return state, shardings


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings: the restore target for a checkpoint."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

