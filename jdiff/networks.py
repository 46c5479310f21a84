"""The networks of a text-to-image model, built from a config.

`Networks` bundles the denoiser and the text encoder with the few static facts the
objectives, the sampler and the trainer need (input geometry, latent scaling, the cached
empty caption); `build_networks` resolves config.model, config.text, config.lora and
config.autoencoder into it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff import errors
from jdiff import models
from jdiff import tokens
from jdiff.data import latents
from jdiff.interop import sd3_pipeline
from jdiff.models import layers as L
from jdiff.models import text as text_lib


@dataclasses.dataclass(frozen=True)
class Networks:
  """The modules of a text-to-image model and their input geometry.

  text: the trainable text encoder (params['text']), or None when the conditioning comes
  precomputed with the data (frozen SD3 encoders, see data/latents.py); `cached` then holds
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
  cache_meta: Any = dataclasses.field(default=None, compare=False, hash=False)  # the cache's meta.json

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
        raise errors.InvalidArgument("no cached embedding of the empty caption: set data.cache_dir to a cache")
      return dict(self.cached["null"])
    return dict(tokens=tokens.tokenize("", self.max_len))

  def null_tokens(self) -> np.ndarray:
    return tokens.tokenize("", self.max_len)

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
  """config -> Networks, once per run: the denoiser's conditioning widths follow the text
  encoder (or the latent cache's meta.json, read here), with config.lora.rank > 0 it
  carries LoRA adapters, and its input geometry is checked against the patch size."""
  lora = (L.LoRA(config.lora.rank, float(config.lora.alpha), config.lora.targets, config.lora.param_dtype or None,
                 config.lora.quantize_base) if config.lora.rank > 0 else None)
  if config.text.encoder in sd3_pipeline.TEXT_RECIPES:
    networks = _latent_networks(config, lora)
  else:
    text = text_lib.build(config.text)
    extra = dict(pooled_dim=text.width)
    if config.model.name in ("mmdit", "flux"):
      extra["context_dim"] = text.width
    denoiser = models.build({**config.model, **extra}, lora=lora)
    networks = Networks(denoiser, text, config.data.resolution, config.model.in_channels, config.text.max_len)
  _check_geometry(networks, config)
  return networks


def _latent_networks(config, lora: L.LoRA | None) -> Networks:
  """Frozen pipeline encoders (SD3, Flux): the conditioning comes precomputed (data/latents.py) and the inputs
  are VAE latents, whose geometry comes from the autoencoder's config."""

  vae = sd3_pipeline.vae_geometry(config.autoencoder.path)
  if config.data.resolution % vae["factor"]:
    raise errors.InvalidArgument(
        f"config.data.resolution={config.data.resolution} is not divisible by the VAE's factor "
        f"{vae['factor']}")
  has_cache = bool(config.data.cache_dir) and os.path.exists(os.path.join(config.data.cache_dir, latents.META))
  extra, cached, meta = {}, None, None
  if has_cache:
    meta = latents.read_meta(config.data.cache_dir)
    if config.model.in_channels != meta["latent_shape"][-1]:
      raise errors.InvalidArgument(f"config.model.in_channels={config.model.in_channels} but the cache holds "
                                   f"{meta['latent_shape'][-1]}-channel latents")
    if meta["resolution"] != config.data.resolution:
      raise errors.InvalidArgument(
          f"config.data.resolution={config.data.resolution} but the cache in {config.data.cache_dir} "
          f"was written at {meta['resolution']}")
    extra = dict(pooled_dim=meta["pooled_dim"], context_dim=meta["context_shape"][-1])
    cached = latents.read_conditioning(config.data.cache_dir)
  denoiser = models.build({**config.model, **extra}, lora=lora)
  return Networks(denoiser, None, config.data.resolution // vae["factor"], vae["channels"], 0, latent=True,
                  latent_scale=vae["scaling_factor"], latent_shift=vae["shift_factor"], cached=cached,
                  cache_meta=meta)


def _check_geometry(networks: Networks, config) -> None:
  """The denoiser's input (pixels or latents) must split into patches its position table covers."""
  resolution, patch = networks.resolution, networks.patch_size
  if resolution % patch:
    raise errors.InvalidArgument(f"the model's input size {resolution} (data.resolution, or its latent size) is not "
                                 f"divisible by model.patch_size={patch}")
  grid = resolution // patch
  if config.model.name != "flux" and grid > config.model.pos_embed_max_size:
    raise errors.InvalidArgument(f"the patch grid ({grid}) exceeds config.model.pos_embed_max_size="
                                 f"{config.model.pos_embed_max_size}")
  patch_dim = patch**2 * networks.channels
  if patch_dim > networks.denoiser.width:
    # The noise in a patch then cannot pass the patch embedding, so v = eps - x0 is not
    # learnable (docs/notes.md: a loss stuck for every t).
    logging.warning("a patch holds %d values but the model width is %d: the network cannot see all "
                    "of a patch's noise and v/eps prediction will plateau; use a smaller patch or a "
                    "wider model", patch_dim, networks.denoiser.width)


def param_count(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
