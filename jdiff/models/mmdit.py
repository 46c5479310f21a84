"""MMDiT (Esser et al., 2024: "Scaling Rectified Flow Transformers", SD3).

Two token streams, image and text, each with its own weights; one joint attention over
their concatenation (image tokens first, then text), with RMSNorm on Q and K per
stream. Both streams are modulated (adaLN-Zero) by c = embed(t) + embed(pooled text).
The last block's text stream only supplies keys and values: its outputs are never read,
so it has no attention output projection and no MLP. SD3.5 Medium (MMDiT-X) adds to its
first `dual_attention_depth` blocks a second attention over the image tokens alone.

Size rule (SD3): depth d gives width 64*d and d heads of 64; variant 'd24' is SD3's 2B.
Parameter names follow the structure of diffusers' SD3Transformer2DModel so that weights
map one to one.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models import base
from jdiff.models import layers as L

HEAD_DIM = 64


def parse_variant(variant: str) -> dict[str, int]:
  """'d24' -> dict(depth=24, width=1536, num_heads=24)."""
  m = re.fullmatch(r"d(\d+)", variant)
  if not m or int(m.group(1)) < 1:
    raise ValueError(f"unknown MMDiT variant {variant!r}; expected 'd<depth>', e.g. 'd24'")
  d = int(m.group(1))
  return dict(depth=d, width=HEAD_DIM * d, num_heads=d)


class JointBlock(nn.Module):
  """One MMDiT block on (image [B, N, D], text [B, M, D]) conditioned on c [B, D]."""

  num_heads: int
  mlp_ratio: float = 4.0
  qk_norm: bool = True
  context_pre_only: bool = False
  dual_attention: bool = False
  attention: str = "default"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora: L.LoRA | None = None

  @nn.compact
  def __call__(self, carry: tuple[jax.Array, jax.Array], cond):
    """carry (x, ctx); cond is c [B, D], or (c, rope) with rope = (cos, sin) [N+M, head_dim]
    rotary tables for the joint sequence [image; text] (Flux's double-stream blocks)."""
    c, rope = cond if isinstance(cond, tuple) else (cond, None)
    x, ctx = carry
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
    width = x.shape[-1]
    head_dim = L.check_divisible(width, self.num_heads)

    # Image stream modulation: shift, scale, gate for attention and for the MLP (and, with
    # dual attention, for the second, image-only attention: SD3.5's MMDiT-X).
    mods = L.Modulation(9 if self.dual_attention else 6, width, name="x_adaLN", **kw)(c)
    x_shift, x_scale, x_gate, x_shift2, x_scale2, x_gate2 = mods[:6]
    if self.dual_attention:  # both attentions read the same LayerNorm of x, modulated apart
      a_shift, a_scale, a_gate = mods[6:]
      hx, hx2 = L.norm_modulate_many(x, (x_shift, a_shift), (x_scale, a_scale), self.dtype)
    else:
      hx = L.norm_modulate(x, x_shift, x_scale, self.dtype)
    if self.context_pre_only:
      # SD3's AdaLayerNormContinuous: (scale, shift), in that order.
      c_scale, c_shift = L.Modulation(2, width, name="ctx_adaLN", **kw)(c)
    else:
      c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = L.Modulation(6, width, name="ctx_adaLN", **kw)(c)
    hc = L.norm_modulate(ctx, c_shift, c_scale, self.dtype)

    qx, kx, vx = L.QKV(self.num_heads, head_dim, self.qk_norm, name="x_qkv", **kw)(hx)
    qc, kc, vc = L.QKV(self.num_heads, head_dim, self.qk_norm, name="ctx_qkv", **kw)(hc)
    q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((qx, qc), (kx, kc), (vx, vc)))
    if rope is not None:
      q, k = L.apply_rope(q, rope), L.apply_rope(k, rope)
    out = L.dot_product_attention(q, k, v, self.attention)
    n = x.shape[1]

    x = x + x_gate[:, None] * L.attention_out(out[:, :n], width, name="x_attn_out", **kw)
    if self.dual_attention:
      q2, k2, v2 = L.QKV(self.num_heads, head_dim, self.qk_norm, name="x_qkv2", **kw)(hx2)
      out2 = L.dot_product_attention(q2, k2, v2, self.attention)
      x = x + a_gate[:, None] * L.attention_out(out2, width, name="x_attn2_out", **kw)
    hx = L.norm_modulate(x, x_shift2, x_scale2, self.dtype)
    x = x + x_gate2[:, None] * L.MLP(int(width * self.mlp_ratio), name="x_mlp", **kw)(hx)
    x = L.constrain(x, "activation_batch", "activation_length", "activation_embed")
    if self.context_pre_only:
      return (x, ctx), None

    ctx = ctx + c_gate[:, None] * L.attention_out(out[:, n:], width, name="ctx_attn_out", **kw)
    hc = L.norm_modulate(ctx, c_shift2, c_scale2, self.dtype)
    ctx = ctx + c_gate2[:, None] * L.MLP(int(width * self.mlp_ratio), name="ctx_mlp", **kw)(hc)
    ctx = L.constrain(ctx, "activation_batch", "activation_length", "activation_embed")
    return (x, ctx), None


class MMDiT(base.PatchTransformer):
  """SD3-style multimodal diffusion transformer.

  Call: x [B, H, W, C], t [B] in [0, 1], context [B, M, context_dim] text tokens,
  pooled [B, pooled_dim] pooled text, guidance [B] (guidance_embed only: a distilled
  student's guidance scale) -> prediction [B, H, W, out_channels].
  """

  in_channels: int = 16
  context_dim: int = 4096
  pooled_dim: int = 2048
  pos_embed_max_size: int = 96
  dual_attention_depth: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, *, context: jax.Array, pooled: jax.Array,
               guidance: jax.Array | None = None, labels: jax.Array | None = None) -> jax.Array:
    del labels  # one call signature for every model
    h, c, ctx, grid = self.embed_text_conditioned(x, t, context, pooled, guidance)

    if not 0 <= self.dual_attention_depth <= self.depth:
      raise ValueError(f"dual_attention_depth={self.dual_attention_depth} must be in [0, depth={self.depth}]")
    block = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qk_norm=self.qk_norm,
                 attention=self.attention, **self._kw)
    stack = dict(scan=self.scan, remat=self.remat, **block)
    # Blocks 0 .. dual_attention_depth-1 carry the second attention (SD3.5 Medium: 13 of 24).
    num_dual = min(self.dual_attention_depth, self.depth - 1)
    carry = L.run_blocks(JointBlock, num_dual, (h, ctx), c, name="dual_blocks", dual_attention=True, **stack)
    carry = L.run_blocks(JointBlock, self.depth - 1 - num_dual, carry, c, name="blocks", **stack)
    (h, _), _ = JointBlock(context_pre_only=True, dual_attention=self.dual_attention_depth == self.depth,
                           name="last_block", **block)(carry, c)
    # SD3's AdaLayerNormContinuous: (scale, shift).
    return self.output_head(h, c, grid, scale_first=True)


def make(variant: str = "d24", *, depth: int | None = None, width: int | None = None,
         num_heads: int | None = None, dtype: str = "float32", param_dtype: str = "float32",
         **kwargs) -> MMDiT:
  """Builds an MMDiT from 'd<depth>' (width 64*d, d heads); explicit sizes override the rule."""
  size = parse_variant(variant)
  for key, value in dict(depth=depth, width=width, num_heads=num_heads).items():
    if value is not None:
      size[key] = value
  return MMDiT(**size, dtype=L.as_dtype(dtype), param_dtype=L.as_dtype(param_dtype), **kwargs)
