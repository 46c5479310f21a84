"""The train state and the networks it trains.

`Networks` bundles the denoiser and the text encoder with the few static facts the step
needs; `TrainState` is the pytree that is sharded, donated, checkpointed and restored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdiff import models
from jdiff.models import text as text_lib
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


@dataclasses.dataclass(frozen=True)
class Networks:
  """The modules of a text-to-image model and their input geometry."""

  denoiser: nn.Module
  text: nn.Module
  resolution: int
  channels: int
  max_len: int

  @property
  def patch_size(self) -> int:
    return self.denoiser.patch_size

  def encode(self, text_params: Any, tokens: jax.Array) -> dict[str, jax.Array]:
    """tokens [B, T] -> conditioning {'context': [B, T, D], 'pooled': [B, D]}."""
    return self.text.apply({"params": text_params}, tokens)

  def predict(self, denoiser_params: Any, x: jax.Array, t: jax.Array, cond: Mapping[str, jax.Array]):
    """x [B, H, W, C], t [B] -> prediction [B, H, W, C]."""
    return self.denoiser.apply({"params": denoiser_params}, x, t, **cond)

  def seq_len(self, height: int | None = None, width: int | None = None) -> int:
    """Image tokens for an H x W image (default: the training resolution)."""
    h, w = height or self.resolution, width or self.resolution
    return (h // self.patch_size) * (w // self.patch_size)

  def null_tokens(self) -> np.ndarray:
    """The empty caption, the unconditional input of classifier-free guidance: [max_len]."""
    return text_lib.tokenize("", self.max_len)

  def init_params(self, rng: jax.Array) -> dict[str, Any]:
    """Boxed (LogicallyPartitioned) parameters {'denoiser', 'text'}."""
    k_text, k_model = jax.random.split(rng)
    tokens = jnp.zeros((1, self.max_len), jnp.int32)
    text_params = self.text.init(k_text, tokens)["params"]
    cond = jax.eval_shape(lambda: self.text.apply({"params": nn.unbox(text_params)}, tokens))
    cond = {k: jnp.zeros(v.shape, v.dtype) for k, v in cond.items()}
    x = jnp.zeros((1, self.resolution, self.resolution, self.channels), jnp.float32)
    denoiser_params = self.denoiser.init(k_model, x, jnp.zeros((1,)), **cond)["params"]
    return {"denoiser": denoiser_params, "text": text_params}


def build_networks(config) -> Networks:
  """config -> Networks; the denoiser's conditioning widths follow the text encoder."""
  text = text_lib.build(config.text)
  extra = dict(pooled_dim=text.width)
  if config.model.name in ("mmdit", "flux"):
    extra["context_dim"] = text.width
  denoiser = models.build({**config.model, **extra})
  return Networks(denoiser, text, config.data.resolution, config.model.in_channels, config.text.max_len)


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


def param_count(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
