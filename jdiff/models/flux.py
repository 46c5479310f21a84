"""Flux-style transformer (Black Forest Labs' FLUX.1, as in diffusers' FluxTransformer2DModel).

Double-stream blocks (MMDiT joint blocks: separate weights per stream, joint attention),
then single-stream blocks over the concatenated [image; text] sequence, where attention
and MLP run in parallel from one modulated LayerNorm and share one output projection.
Positions are rotary (RoPE) over (text, row, column) ids, applied after QK-RMSNorm:
text tokens have ids (0, 0, 0), image token (i, j) has (0, i, j). No absolute position
table. Guidance-distilled models (FLUX.1-dev) also embed the guidance scale, like t.

Tokens are 2x2 patches of latents, NHWC as everywhere in jdiff; diffusers packs the same
patches channel-first ((C, p_row, p_col)), which the weight converter reorders.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.models import base
from jdiff.models import layers as L
from jdiff.models.mmdit import JointBlock

VARIANTS = {
    # FLUX.1-dev (guidance-distilled) and FLUX.1-schnell.
    "dev": dict(depth=19, single_depth=38, width=3072, num_heads=24, guidance_embed=True),
    "schnell": dict(depth=19, single_depth=38, width=3072, num_heads=24, guidance_embed=False),
}


class SingleBlock(nn.Module):
  """Single-stream block on h [B, S, D]: h + gate * Out([Attn(n); GELU(MLP_in(n))]),
  n = modulated LayerNorm(h), with rotary positions."""

  num_heads: int
  mlp_ratio: float = 4.0
  qk_norm: bool = True
  attention: str = "default"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora: L.LoRA | None = None

  @nn.compact
  def __call__(self, h: jax.Array, cond):
    c, rope = cond
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
    width = h.shape[-1]
    head_dim = L.check_divisible(width, self.num_heads)
    shift, scale, gate = L.Modulation(3, width, name="adaLN", **kw)(c)
    hn = L.norm_modulate(h, shift, scale, self.dtype)
    q, k, v = L.QKV(self.num_heads, head_dim, self.qk_norm, name="qkv", **kw)(hn)
    attn = L.dot_product_attention(L.apply_rope(q, rope), L.apply_rope(k, rope), v, self.attention)
    mlp = L.dense(int(width * self.mlp_ratio), ("embed", "mlp"), name="mlp_in", **kw)(hn)
    mlp = L.constrain(nn.gelu(mlp, approximate=True), "activation_batch", "activation_length", "activation_mlp")
    both = jnp.concatenate([attn.reshape(h.shape[:2] + (-1,)), mlp], axis=-1)
    h = h + gate[:, None] * L.dense(width, ("mlp", "embed"), name="out", **kw)(both)
    return L.constrain(h, "activation_batch", "activation_length", "activation_embed"), None


class Flux(base.PatchTransformer):
  """Call: x [B, H, W, C], t [B] in [0, 1], context [B, M, context_dim], pooled
  [B, pooled_dim], guidance [B] (guidance_embed only) -> prediction [B, H, W, out_channels]."""

  single_depth: int = 38
  in_channels: int = 16
  context_dim: int = 4096
  pooled_dim: int = 768
  axes_dims: Sequence[int] = (16, 56, 56)
  rope_theta: float = 10000.0
  pos_embed_max_size: int = 0  # rotary positions only

  def rope(self, grid: tuple[int, int], text_len: int) -> tuple[jax.Array, jax.Array]:
    """Rotary tables for the sequence [image (row-major grid); text]: 2 x [N+M, head_dim]."""
    h, w = grid
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    image = np.stack([np.zeros(h * w), rows.ravel(), cols.ravel()], axis=1)
    ids = np.concatenate([image, np.zeros((text_len, 3))])
    cos, sin = L.rope_tables(ids, self.axes_dims, self.rope_theta)
    return jnp.asarray(cos), jnp.asarray(sin)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, *, context: jax.Array, pooled: jax.Array,
               guidance: jax.Array | None = None, labels: jax.Array | None = None) -> jax.Array:
    del labels
    head_dim = L.check_divisible(self.width, self.num_heads)
    if sum(self.axes_dims) != head_dim:
      raise ValueError(f"axes_dims {tuple(self.axes_dims)} must sum to the head dim {head_dim}")
    h, c, ctx, grid = self.embed_text_conditioned(x, t, context, pooled, guidance)
    cond = (c, self.rope(grid, ctx.shape[1]))

    block = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qk_norm=self.qk_norm,
                 attention=self.attention, scan=self.scan, remat=self.remat, **self._kw)
    h, ctx = L.run_blocks(JointBlock, self.depth, (h, ctx), cond, name="double_blocks", **block)
    n = h.shape[1]
    joint = L.run_blocks(SingleBlock, self.single_depth, jnp.concatenate([h, ctx], axis=1), cond,
                         name="single_blocks", **block)
    return self.output_head(joint[:, :n], c, grid, scale_first=True)


def make(variant: str = "dev", *, depth: int | None = None, single_depth: int | None = None,
         width: int | None = None, num_heads: int | None = None, dtype: str = "float32",
         param_dtype: str = "float32", **kwargs) -> Flux:
  """Builds a Flux from a named variant ('dev', 'schnell'); explicit sizes override it."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown Flux variant {variant!r}; expected one of {tuple(VARIANTS)}")
  size = dict(VARIANTS[variant])
  for key, value in dict(depth=depth, single_depth=single_depth, width=width, num_heads=num_heads).items():
    if value is not None:
      size[key] = value
  size.update(kwargs)
  return Flux(**size, dtype=L.as_dtype(dtype), param_dtype=L.as_dtype(param_dtype))
