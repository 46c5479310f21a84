"""The train state and the networks it trains.

`Networks` bundles the denoiser and the text encoder with the few static facts the step
needs; `TrainState` is the pytree that is sharded, donated, checkpointed and restored.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdiff import models
from jdiff.models import layers as L
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
  """The modules of a text-to-image model and their input geometry.

  text: the trainable text encoder (params['text']), or None when the conditioning comes
  precomputed with the data (frozen SD3 encoders, see data/cache.py); `cached` then holds
  the cached empty-caption and sample-prompt embeddings. latent_scale/latent_shift: in
  latent space, the VAE's scaling and shift factors (model input = (z - shift) * scale).
  """

  denoiser: nn.Module
  text: nn.Module | None
  resolution: int  # side of the denoiser's input (pixels, or latents)
  channels: int
  max_len: int
  latent: bool = False
  latent_scale: float = 1.0
  latent_shift: float = 0.0
  cached: Any = dataclasses.field(default=None, compare=False, hash=False)

  @property
  def patch_size(self) -> int:
    return self.denoiser.patch_size

  @property
  def lora(self) -> L.LoRA | None:
    """The denoiser's adapters (None: a plain model)."""
    return self.denoiser.lora

  def without_lora(self) -> "Networks":
    """The same networks with a plain denoiser (for params whose adapters were merged)."""
    return dataclasses.replace(self, denoiser=self.denoiser.clone(lora=None))

  def encode(self, text_params: Any, tokens: jax.Array) -> dict[str, jax.Array]:
    """tokens [B, T] -> conditioning {'context': [B, T, D], 'pooled': [B, D]}."""
    return self.text.apply({"params": text_params}, tokens)

  def conditioning(self, params: Any, inputs: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """{'tokens'} (trainable encoder) or {'context', 'pooled'} (precomputed) -> conditioning."""
    if self.text is None:
      return dict(context=inputs["context"].astype(jnp.float32), pooled=inputs["pooled"].astype(jnp.float32))
    return self.encode(params["text"], inputs["tokens"])

  def null_inputs(self) -> dict[str, np.ndarray]:
    """The empty caption, the unconditional input of classifier-free guidance (no batch axis)."""
    if self.text is None:
      if self.cached is None:
        raise ValueError("no cached embedding of the empty caption: set data.cache_dir to a cache")
      return dict(self.cached["null"])
    return dict(tokens=text_lib.tokenize("", self.max_len))

  def null_tokens(self) -> np.ndarray:
    return text_lib.tokenize("", self.max_len)

  def predict(self, denoiser_params: Any, x: jax.Array, t: jax.Array, cond: Mapping[str, jax.Array]):
    """x [B, H, W, C], t [B] -> prediction [B, H, W, C]."""
    return self.denoiser.apply({"params": denoiser_params}, x, t, **cond)

  def seq_len(self, height: int | None = None, width: int | None = None) -> int:
    """Image tokens for an H x W input (default: the training resolution)."""
    h, w = height or self.resolution, width or self.resolution
    return (h // self.patch_size) * (w // self.patch_size)

  def init_params(self, rng: jax.Array) -> dict[str, Any]:
    """Boxed (LogicallyPartitioned) parameters {'denoiser'[, 'text']}."""
    k_text, k_model = jax.random.split(rng)
    out = {}
    if self.text is None:
      cond = dict(context=jnp.zeros((1, 1, self.denoiser.context_dim)), pooled=jnp.zeros((1, self.denoiser.pooled_dim)))
    else:
      tokens = jnp.zeros((1, self.max_len), jnp.int32)
      out["text"] = self.text.init(k_text, tokens)["params"]
      cond = jax.eval_shape(lambda: self.text.apply({"params": nn.unbox(out["text"])}, tokens))
      cond = {k: jnp.zeros(v.shape, v.dtype) for k, v in cond.items()}
    x = jnp.zeros((1, self.resolution, self.resolution, self.channels), jnp.float32)
    if self.denoiser.guidance_embed:
      cond["guidance"] = jnp.ones((1,))
    out["denoiser"] = self.denoiser.init(k_model, x, jnp.zeros((1,)), **cond)["params"]
    return out


def build_networks(config) -> Networks:
  """config -> Networks; the denoiser's conditioning widths follow the text encoder (or the
  cache), and with config.lora.rank > 0 it carries LoRA adapters."""
  lora = L.LoRA(config.lora.rank, float(config.lora.alpha), config.lora.targets) if config.lora.rank > 0 else None
  if config.text.encoder == "sd3":
    # Frozen SD3 encoders: conditioning comes precomputed (data/cache.py), inputs are VAE latents.
    from jdiff.data import cache  # pylint: disable=g-import-not-at-top
    from jdiff.interop import sd3_pipeline  # pylint: disable=g-import-not-at-top

    vae = sd3_pipeline.vae_geometry(config.autoencoder.path)
    has_cache = bool(config.data.cache_dir) and os.path.exists(os.path.join(config.data.cache_dir, cache.META))
    extra = {}
    if has_cache:
      meta = cache.read_meta(config.data.cache_dir)
      extra = dict(pooled_dim=meta["pooled_dim"], context_dim=meta["context_shape"][-1])
    denoiser = models.build({**config.model, **extra}, lora=lora)
    return Networks(denoiser, None, config.data.resolution // vae["factor"], vae["channels"], 0, latent=True,
                    latent_scale=vae["scaling_factor"], latent_shift=vae["shift_factor"],
                    cached=cache.read_conditioning(config.data.cache_dir) if has_cache else None)
  text = text_lib.build(config.text)
  extra = dict(pooled_dim=text.width)
  if config.model.name in ("mmdit", "flux"):
    extra["context_dim"] = text.width
  denoiser = models.build({**config.model, **extra}, lora=lora)
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
