"""What DiT and MMDiT share: their common fields, the input stem (patches + positions,
timestep embedding) and the output head (adaLN, LayerNorm, zero-initialised projection,
unpatchify)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models import layers as L


class PatchTransformer(nn.Module):
  """Base of the diffusion transformers: fields and stems, no blocks."""

  depth: int = 12
  width: int = 768
  num_heads: int = 12
  patch_size: int = 2
  in_channels: int = 4
  out_channels: int | None = None
  pooled_dim: int = 0
  mlp_ratio: float = 4.0
  qk_norm: bool = True
  pos_embed_max_size: int = 64
  pos_embed_base_size: int | None = None
  pos_embed_interpolate: int = 0  # the grid side positions were learned at (L.cropped_sincos_2d); 0: crop
  time_scale: float = 1000.0
  guidance_embed: bool = False  # embed a guidance scale like t (guidance-distilled models)
  attention: str = "default"
  scan: bool = False
  remat: str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # Low-rank adapters on the Dense layers whose path matches lora.targets (None: none). Every
  # layer the model builds gets it, so the adapted forward depends only on this field and
  # the params.
  lora: L.LoRA | None = None

  @property
  def _kw(self) -> dict[str, Any]:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)

  def embed_inputs(self, x: jax.Array, t: jax.Array):
    """x [B, H, W, C], t [B] -> (tokens [B, N, D], conditioning c [B, D], patch grid (h, w))."""
    if x.shape[-1] != self.in_channels:
      raise ValueError(f"expected {self.in_channels} input channels, got shape {x.shape}")
    grid = (x.shape[1] // self.patch_size, x.shape[2] // self.patch_size)
    h = L.PatchEmbed(self.width, self.patch_size, self.pos_embed_max_size, self.pos_embed_base_size,
                     self.pos_embed_interpolate, name="patch_embed", **self._kw)(x.astype(self.dtype))
    c = L.TimestepEmbed(self.width, self.time_scale, name="t_embed", **self._kw)(t)
    return h, c, grid

  def embed_guidance(self, c: jax.Array, guidance: jax.Array | None) -> jax.Array:
    """c + embed(guidance [B]) for guidance-embedding models (the scale w goes through the
    timestep embedding's sinusoid at time_scale, as in FLUX.1-dev); c unchanged otherwise.
    The embedding's output layer starts at zero, so a student made from a teacher by adding
    it starts as the teacher's conditional model for every w."""
    if not self.guidance_embed:
      if guidance is not None:
        raise ValueError("guidance was passed to a model without guidance_embed")
      return c
    if guidance is None:
      raise ValueError("this model embeds the guidance scale: pass guidance [B]")
    return c + L.TimestepEmbed(self.width, self.time_scale, zero_out=True, name="guidance_embed",
                               **self._kw)(guidance)

  def embed_text_conditioned(self, x: jax.Array, t: jax.Array, context: jax.Array, pooled: jax.Array,
                             guidance: jax.Array | None):
    """The stems of the text-stream models (MMDiT, Flux): image tokens, c = embed(t) [+ embed(w)]
    + embed(pooled), and text tokens projected to the width.
    Returns (tokens [B, N, D], c [B, D], text tokens [B, M, D], patch grid (h, w))."""
    if context.shape[-1] != self.context_dim or pooled.shape[-1] != self.pooled_dim:
      raise ValueError(f"expected context [..., {self.context_dim}] and pooled [..., {self.pooled_dim}], "
                       f"got {context.shape} and {pooled.shape}")
    h, c, grid = self.embed_inputs(x, t)
    c = self.embed_guidance(c, guidance) + self.pooled_embed(pooled)
    ctx = L.dense(self.width, ("cond", "embed"), name="context_embed", **self._kw)(context.astype(self.dtype))
    return h, c, L.constrain(ctx, "activation_batch", "activation_length", "activation_embed"), grid

  def pooled_embed(self, pooled: jax.Array) -> jax.Array:
    """Pooled text [B, pooled_dim] -> [B, D], added to the conditioning."""
    return L.CondMLP(self.width, name="pooled_embed", **self._kw)(pooled.astype(self.dtype))

  def output_head(self, h: jax.Array, c: jax.Array, grid: tuple[int, int], *, scale_first: bool) -> jax.Array:
    """Final adaLN + projection to patches + unpatchify: [B, N, D] -> [B, H, W, out] (float32).

    The projection is zero-initialised, so the model outputs exactly 0 at init.
    scale_first: the two modulation vectors are (scale, shift) as in SD3, else (shift,
    scale) as in DiT, so that reference weights map one to one.
    """
    first, second = L.Modulation(2, self.width, name="final_adaLN", **self._kw)(c)
    shift, scale = (second, first) if scale_first else (first, second)
    h = L.norm_modulate(h, shift, scale, self.dtype)
    out = self.out_channels or self.in_channels
    h = L.dense(self.patch_size**2 * out, ("embed", "patch"), name="final_proj", init=L.zeros, **self._kw)(h)
    return L.unpatchify(h, grid, self.patch_size).astype(jnp.float32)
