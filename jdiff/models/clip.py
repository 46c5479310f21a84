"""CLIP (Radford et al., 2021): the text encoder as transformers' CLIPTextModel(WithProjection)
and the vision tower as CLIPVisionModel(WithProjection).

Text: a pre-LayerNorm transformer with causal self-attention over token + learned position
embeddings; the pooled vector is the final-LayerNormed state at the end-of-text token,
optionally projected (text_embeds). SD3 feeds the projected pooled vector to adaLN and
the penultimate layer's states (hidden_states[-2]) to the text stream.

Vision: a ViT over patches plus a class token, LayerNormed before the first layer (the
'pre_layrnorm' of transformers' key names), with full self-attention; the pooled vector is the
class token's last state after a LayerNorm, optionally projected (image_embeds). The CLIP
score compares image_embeds with text_embeds.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models import layers as L

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "gelu": lambda x: nn.gelu(x, approximate=False),  # OpenCLIP (e.g. bigG)
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
}


class EncoderLayer(nn.Module):
  num_heads: int
  mlp_dim: int
  act: str = "quick_gelu"
  eps: float = 1e-5
  causal: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, mask: jax.Array | None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = h.shape[-1]
    x = L.affine_layer_norm("ln1", self.dtype, self.param_dtype, self.eps)(h)
    q, k, v = L.QKV(self.num_heads, L.check_divisible(width, self.num_heads), qk_norm=False, name="qkv", **kw)(x)
    attn = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.causal)
    h = h + L.attention_out(attn, width, name="attn_out", **kw)
    x = L.affine_layer_norm("ln2", self.dtype, self.param_dtype, self.eps)(h)
    x = ACTIVATIONS[self.act](L.dense(self.mlp_dim, ("embed", "mlp"), name="fc1", **kw)(x))
    h = h + L.dense(width, ("mlp", "embed"), name="fc2", **kw)(x)
    return L.constrain(h, "activation_batch", "activation_length", "activation_embed")


class CLIPText(nn.Module):
  """ids [B, T] (int), mask [B, T] (1 = token, optional; SD3 passes none) ->
  {'hidden_states': (embeddings, layer 1, ..., layer L) each [B, T, D],
   'last_hidden_state': [B, T, D] (final LayerNorm), 'pooled': [B, D],
   'text_embeds': [B, projection_dim] (when projection_dim)}."""

  vocab_size: int = 49408
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  max_len: int = 77
  act: str = "quick_gelu"
  eps: float = 1e-5
  projection_dim: int | None = None
  eos_token_id: int = 49407
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> dict[str, Any]:
    if self.act not in ACTIVATIONS:
      raise ValueError(f"unknown activation {self.act!r}; expected one of {tuple(ACTIVATIONS)}")
    if ids.shape[1] > self.max_len:
      raise ValueError(f"{ids.shape[1]} tokens exceed max_len={self.max_len}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    embed = lambda name, n, axis: self.param(
        name, nn.with_logical_partitioning(nn.initializers.normal(0.02), (axis, "embed")), (n, self.width),
        self.param_dtype)
    tokens = embed("token_embedding", self.vocab_size, "vocab")
    positions = embed("position_embedding", self.max_len, "length")
    h = (jnp.take(tokens, ids, axis=0) + positions[None, : ids.shape[1]]).astype(self.dtype)
    attn_mask = None if mask is None else mask.astype(bool)[:, None, None, :]
    states = [h]
    for i in range(self.depth):
      h = EncoderLayer(self.num_heads, self.mlp_dim, self.act, self.eps, name=f"layers_{i}", **kw)(h, attn_mask)
      states.append(h)
    last = L.affine_layer_norm("final_norm", self.dtype, self.param_dtype, self.eps)(h)
    # Pool at the first end-of-text token (the legacy eos id 2 meant: the largest id).
    eos = jnp.argmax(ids, axis=-1) if self.eos_token_id == 2 else jnp.argmax(ids == self.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
    out = dict(hidden_states=tuple(states), last_hidden_state=last, pooled=pooled)
    if self.projection_dim:
      out["text_embeds"] = L.dense(self.projection_dim, ("embed", "cond"), name="text_projection", use_bias=False,
                                   **kw)(pooled)
    return out


class CLIPVision(nn.Module):
  """pixels [B, S, S, 3] (normalised with the CLIP mean and std: see jdiff.eval.clip_score) ->
  {'last_hidden_state': [B, 1 + P, D], 'pooled': [B, D], 'image_embeds': [B, projection_dim]
  (when projection_dim)}."""

  image_size: int = 224
  patch_size: int = 32
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  act: str = "quick_gelu"
  eps: float = 1e-5
  projection_dim: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> dict[str, Any]:
    if self.act not in ACTIVATIONS:
      raise ValueError(f"unknown activation {self.act!r}; expected one of {tuple(ACTIVATIONS)}")
    if pixels.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"CLIP vision takes {self.image_size}x{self.image_size} images, got {pixels.shape[1:3]}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False, name="patch_embedding",
                **kw)(pixels.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, self.width)
    cls = self.param("class_embedding", nn.initializers.normal(0.02), (self.width,), self.param_dtype)
    positions = self.param("position_embedding", nn.initializers.normal(0.02), (x.shape[1] + 1, self.width),
                           self.param_dtype)
    h = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, self.width)), x], axis=1)
    h = L.affine_layer_norm("pre_norm", self.dtype, self.param_dtype, self.eps)(h + positions[None].astype(self.dtype))
    for i in range(self.depth):
      h = EncoderLayer(self.num_heads, self.mlp_dim, self.act, self.eps, causal=False, name=f"layers_{i}",
                       **kw)(h, None)
    pooled = L.affine_layer_norm("post_norm", self.dtype, self.param_dtype, self.eps)(h[:, 0])
    out = dict(last_hidden_state=h, pooled=pooled)
    if self.projection_dim:
      out["image_embeds"] = L.dense(self.projection_dim, ("embed", "cond"), name="visual_projection",
                                    use_bias=False, **kw)(pooled)
    return out
