"""Text encoders. `ByteEncoder` is the trainable default for the embedded data: UTF-8
bytes in, no vocabulary file, token embeddings and a pooled vector out.

Tokens: 0 = padding, 1 = BOS (always first, so the empty caption of classifier-free
guidance is a valid one-token sequence), 2 + b for byte b.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.models import layers as L

PAD, BOS, BYTE_OFFSET = 0, 1, 2
VOCAB_SIZE = 256 + BYTE_OFFSET


def tokenize(captions: Sequence[str] | str, max_len: int) -> np.ndarray:
  """Captions -> int32 [N, max_len] (or [max_len] for one string): BOS, UTF-8 bytes, padding.

  Longer captions are cut at max_len tokens.
  """
  single = isinstance(captions, str)
  out = np.zeros((1 if single else len(captions), max_len), np.int32)
  for i, text in enumerate([captions] if single else captions):
    ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)[: max_len - 1] + BYTE_OFFSET
    out[i, 0] = BOS
    out[i, 1 : 1 + len(ids)] = ids
  return out[0] if single else out


def detokenize(tokens: np.ndarray) -> str:
  ids = np.asarray(tokens)
  return bytes((ids[ids >= BYTE_OFFSET] - BYTE_OFFSET).astype(np.uint8)).decode("utf-8", "replace")


class EncoderBlock(nn.Module):
  """Pre-LN transformer block with a padding mask."""

  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry, mask):
    x = carry
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    h = L.affine_layer_norm("norm1", self.dtype, self.param_dtype)(x)
    q, k, v = L.QKV(self.num_heads, L.check_divisible(width, self.num_heads), qk_norm=False,
                    name="attn", **kw)(h)
    a = jax.nn.dot_product_attention(q, k, v, mask=mask)
    x = x + L.attention_out(a, width, name="attn_out", **kw)
    h = L.affine_layer_norm("norm2", self.dtype, self.param_dtype)(x)
    x = x + L.MLP(int(width * self.mlp_ratio), name="mlp", **kw)(h)
    return x, None


class ByteEncoder(nn.Module):
  """tokens [B, T] int32 -> dict(context [B, T, width], pooled [B, width]).

  `pooled` is the mean of the final states over non-padding tokens.
  """

  width: int = 256
  depth: int = 2
  num_heads: int = 4
  max_len: int = 64
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> dict[str, jax.Array]:
    if tokens.shape[-1] > self.max_len:
      raise ValueError(f"{tokens.shape[-1]} tokens exceed the text encoder's max_len={self.max_len}")
    valid = tokens != PAD
    table = self.param("embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                       (VOCAB_SIZE, self.width), self.param_dtype)
    pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
                     (self.max_len, self.width), self.param_dtype)
    x = jnp.take(L.gathered(table.astype(self.dtype), ("vocab", "embed")), tokens, axis=0)
    x = x + L.gathered(pos.astype(self.dtype), ("length", "embed"))[None, : tokens.shape[-1]]
    x = L.constrain(x, "activation_batch", "activation_length", "activation_embed")
    mask = (valid[:, None, None, :] & valid[:, None, :, None])  # [B, 1, T, T]
    # Padding queries attend to themselves only, so no softmax row is empty.
    mask = mask | jnp.eye(tokens.shape[-1], dtype=bool)[None, None]
    for i in range(self.depth):
      x, _ = EncoderBlock(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype, name=f"blocks_{i}")(x, mask)
    x = L.affine_layer_norm("final_norm", self.dtype, self.param_dtype)(x)
    w = valid.astype(x.dtype)[..., None]
    pooled = (x * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
    return dict(context=x.astype(jnp.float32), pooled=pooled.astype(jnp.float32))


TEXT_ENCODERS = {"bytes": ByteEncoder}


def build(text_cfg) -> nn.Module:
  """config.text -> text encoder module (`encoder` picks it; other fields are its arguments)."""
  kwargs = dict(text_cfg)
  name = kwargs.pop("encoder")
  if name not in TEXT_ENCODERS:
    raise ValueError(f"unknown text encoder {name!r}; expected one of {tuple(TEXT_ENCODERS)}")
  for key in ("dtype", "param_dtype"):
    if key in kwargs:
      kwargs[key] = L.as_dtype(kwargs[key])
  return TEXT_ENCODERS[name](**kwargs)
