"""DiT with adaLN-Zero (Peebles & Xie, 2023), conditioned on a class label or a pooled text vector.

Sizes (DiT paper, Table 1); the variant name adds the patch size, e.g. 'XL/2':
  S: depth 12, width 384, 6 heads     B: depth 12, width 768, 12 heads
  L: depth 24, width 1024, 16 heads   XL: depth 28, width 1152, 16 heads
patch 2, 4 or 8.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models import base
from jdiff.models import layers as L

SIZES = {
    "S": dict(depth=12, width=384, num_heads=6),
    "B": dict(depth=12, width=768, num_heads=12),
    "L": dict(depth=24, width=1024, num_heads=16),
    "XL": dict(depth=28, width=1152, num_heads=16),
}
PATCH_SIZES = (2, 4, 8)


def parse_variant(variant: str) -> dict[str, int]:
  """'XL/2' -> dict(depth=28, width=1152, num_heads=16, patch_size=2)."""
  size, _, patch = variant.partition("/")
  if size not in SIZES or not patch.isdigit() or int(patch) not in PATCH_SIZES:
    raise ValueError(f"unknown DiT variant {variant!r}; expected SIZE/PATCH with SIZE in "
                     f"{tuple(SIZES)} and PATCH in {PATCH_SIZES}, e.g. 'XL/2'")
  return dict(SIZES[size], patch_size=int(patch))


class DiTBlock(nn.Module):
  """x + gate*Attn(adaLN(x)); x + gate*MLP(adaLN(x)), six modulation vectors from c."""

  num_heads: int
  mlp_ratio: float = 4.0
  qk_norm: bool = False
  attention: str = "default"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora: L.LoRA | None = None

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array):
    """x: [B, L, D]; c: [B, D] -> ([B, L, D], None)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
    width = x.shape[-1]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = L.Modulation(
        6, width, name="adaLN", **kw)(c)
    h = L.norm_modulate(x, shift_msa, scale_msa, self.dtype)
    q, k, v = L.QKV(self.num_heads, L.check_divisible(width, self.num_heads), self.qk_norm,
                    name="attn", **kw)(h)
    h = L.attention_out(L.dot_product_attention(q, k, v, self.attention), width, name="attn_out", **kw)
    x = x + gate_msa[:, None] * h
    h = L.norm_modulate(x, shift_mlp, scale_mlp, self.dtype)
    x = x + gate_mlp[:, None] * L.MLP(int(width * self.mlp_ratio), name="mlp", **kw)(h)
    return L.constrain(x, "activation_batch", "activation_length", "activation_embed"), None


class DiT(base.PatchTransformer):
  """Diffusion transformer on image patches.

  Conditioning: `labels` [B] (int, num_classes is the null label for classifier-free
  guidance) when num_classes > 0, else `pooled` [B, pooled_dim] text vectors.
  """

  num_classes: int = 0
  qk_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, *, labels: jax.Array | None = None,
               pooled: jax.Array | None = None, context: jax.Array | None = None) -> jax.Array:
    """x: [B, H, W, C]; t: [B] in [0, 1] -> prediction [B, H, W, out_channels].

    `context` (text tokens) is accepted and ignored, so every model shares one call.
    """
    del context
    h, c, grid = self.embed_inputs(x, t)
    if self.num_classes > 0:
      if labels is None:
        raise ValueError("class-conditional DiT needs `labels`")
      table = self.param("label_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     ("vocab", "embed")),
                         (self.num_classes + 1, self.width), self.param_dtype)
      c = c + L.embed(table, labels, self.dtype)
    elif self.pooled_dim > 0:
      if pooled is None:
        raise ValueError("text-conditional DiT needs `pooled`")
      c = c + self.pooled_embed(pooled)
    h = L.run_blocks(DiTBlock, self.depth, h, c, name="blocks", scan=self.scan, remat=self.remat,
                     num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qk_norm=self.qk_norm,
                     attention=self.attention, **self._kw)
    return self.output_head(h, c, grid, scale_first=False)


def make(variant: str = "S/2", *, depth: int | None = None, width: int | None = None,
         num_heads: int | None = None, patch_size: int | None = None, dtype: str = "float32",
         param_dtype: str = "float32", **kwargs) -> DiT:
  """Builds a DiT from a variant name ('XL/2'); explicit sizes override the table."""
  size = parse_variant(variant)
  for key, value in dict(depth=depth, width=width, num_heads=num_heads, patch_size=patch_size).items():
    if value is not None:
      size[key] = value
  return DiT(**size, dtype=L.as_dtype(dtype), param_dtype=L.as_dtype(param_dtype), **kwargs)
