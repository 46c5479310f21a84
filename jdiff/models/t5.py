"""T5 encoder (Raffel et al., 2020; v1.1 gated-GELU variant used by SD3 and Flux), as
transformers' T5EncoderModel.

Pre-RMSNorm transformer without absolute positions: a learned relative-position bias
[buckets, heads], computed once (first layer's table) and added to every layer's
attention logits. Attention logits are not scaled by 1/sqrt(head_dim) (T5 folds it into
its initialisation); projections have no biases.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.models import layers as L

FEED_FORWARDS = ("gated-gelu", "relu")


def relative_position_buckets(length: int, num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
  """Bidirectional T5 buckets [length, length] of key - query offsets: half the buckets for
  each sign, exact for |offset| < num_buckets/4, logarithmic up to max_distance. Computed
  in float32 like the reference so that boundary offsets land in the same bucket."""
  rel = np.arange(length)[None, :] - np.arange(length)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  rel = np.abs(rel)
  max_exact = half // 2
  far = np.maximum(rel, max_exact).astype(np.float32)  # the log branch is only used where rel >= max_exact
  scaled = (np.log(far / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
            * np.float32(half - max_exact))
  large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
  return buckets + np.where(rel < max_exact, rel, large)


class T5Layer(nn.Module):
  num_heads: int
  head_dim: int
  mlp_dim: int
  feed_forward: str = "gated-gelu"
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, bias: jax.Array, mask: jax.Array | None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = h.shape[-1]
    x = L.rms_norm("attn_norm", self.dtype, self.param_dtype, "embed", self.eps)(h)
    q, k, v = L.QKV(self.num_heads, self.head_dim, qk_norm=False, use_bias=False, name="qkv", **kw)(x)
    attn = jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), mask=mask, scale=1.0)
    attn = attn.reshape(attn.shape[:2] + (-1,))
    h = h + L.dense(width, ("heads", "embed"), name="attn_out", use_bias=False, **kw)(attn)
    x = L.rms_norm("mlp_norm", self.dtype, self.param_dtype, "embed", self.eps)(h)
    if self.feed_forward == "gated-gelu":
      gate = nn.gelu(L.dense(self.mlp_dim, ("embed", "mlp"), name="wi_0", use_bias=False, **kw)(x), approximate=True)
      x = gate * L.dense(self.mlp_dim, ("embed", "mlp"), name="wi_1", use_bias=False, **kw)(x)
    else:
      x = nn.relu(L.dense(self.mlp_dim, ("embed", "mlp"), name="wi", use_bias=False, **kw)(x))
    h = h + L.dense(width, ("mlp", "embed"), name="wo", use_bias=False, **kw)(x)
    return L.constrain(h, "activation_batch", "activation_length", "activation_embed")


class T5Encoder(nn.Module):
  """ids [B, T] (int), mask [B, T] (1 = token, optional) -> {'last_hidden_state': [B, T, D]}."""

  vocab_size: int = 32128
  width: int = 4096
  depth: int = 24
  num_heads: int = 64
  head_dim: int = 64
  mlp_dim: int = 10240
  feed_forward: str = "gated-gelu"
  num_buckets: int = 32
  max_distance: int = 128
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> dict[str, jax.Array]:
    if self.feed_forward not in FEED_FORWARDS:
      raise ValueError(f"unknown T5 feed-forward {self.feed_forward!r}; expected one of {FEED_FORWARDS}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    table = self.param("token_embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
                       (self.vocab_size, self.width), self.param_dtype)
    rel = self.param("relative_attention_bias", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                             ("norm", "heads")),
                     (self.num_buckets, self.num_heads), self.param_dtype)
    length = ids.shape[1]
    buckets = relative_position_buckets(length, self.num_buckets, self.max_distance)
    bias = jnp.transpose(rel[jnp.asarray(buckets)], (2, 0, 1))[None]  # [1, heads, T, T]
    attn_mask = None if mask is None else mask.astype(bool)[:, None, None, :]
    h = jnp.take(table, ids, axis=0).astype(self.dtype)
    for i in range(self.depth):
      h = T5Layer(self.num_heads, self.head_dim, self.mlp_dim, self.feed_forward, self.eps, name=f"layers_{i}",
                  **kw)(h, bias, attn_mask)
    return dict(last_hidden_state=L.rms_norm("final_norm", self.dtype, self.param_dtype, "embed", self.eps)(h))
