"""Text encoders. `ByteEncoder` is the trainable default for the embedded data: UTF-8
bytes in (jdiff/tokens.py), no vocabulary file, token embeddings and a pooled vector out.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff import tokens
from jdiff.models import layers as L

VOCAB_SIZE = tokens.VOCAB_SIZE
PAD, BOS, SPACE = tokens.PAD, tokens.BOS, tokens.SPACE


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
  """tokens [B, T] int32 -> dict(context [B, T/downsample, width], pooled [B, width]).

  Bytes are embedded with learned positions and mixed locally by a 1D convolution over
  `conv_kernel` neighbouring bytes (so word-like n-gram features form in one layer). Then
  either `max_words` > 0: byte states are averaged within each space-separated word (no
  vocabulary needed; BOS is word 0) into max_words word tokens with learned word
  positions, plus, with `word_buckets` > 0, an embedding looked up by a hash of the
  word's bytes (the hashing trick: whole-word identity from the first step), or `downsample` > 1: every `downsample` adjacent states are merged
  (concatenate, project), as in CANINE/Charformer. Transformer blocks run on the result.
  `pooled` is the mean of the final states over non-padding tokens.

  Output length: max_words if set, else T / downsample.
  """

  width: int = 256
  depth: int = 2
  num_heads: int = 4
  max_len: int = 64
  conv_kernel: int = 0  # 0: no convolution
  downsample: int = 1
  max_words: int = 0  # > 0: pool bytes into this many word tokens (words beyond are dropped)
  word_buckets: int = 0  # > 0: also add a hashed embedding of each whole word (hashing trick)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _pool_words(self, tokens, x, valid):
    del valid
    words, valid = _pool_words_impl(tokens, x, self.max_words)
    if self.word_buckets:
      # Unit scale: every word starts as a distinct direction, so the denoiser can tell
      # "top" from "bottom" from the first step (at 0.02 position words stayed unused).
      table = self.param("word_embed",
                         nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
                         (self.word_buckets, self.width), self.param_dtype)
      bucket = (word_hashes(tokens, self.max_words) % self.word_buckets).astype(jnp.int32)
      words = words + L.embed(table, bucket, self.dtype)
    pos = self.param("word_pos_embed",
                     nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
                     (self.max_words, self.width), self.param_dtype)
    return words + L.gathered(pos.astype(self.dtype), ("length", "embed"))[None], valid

  @nn.compact
  def __call__(self, tokens: jax.Array) -> dict[str, jax.Array]:
    b, n = tokens.shape
    if n > self.max_len:
      raise ValueError(f"{n} tokens exceed the text encoder's max_len={self.max_len}")
    if n % self.downsample:
      raise ValueError(f"{n} tokens are not divisible by downsample={self.downsample}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    valid = tokens != PAD
    table = self.param("embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                       (VOCAB_SIZE, self.width), self.param_dtype)
    pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
                     (self.max_len, self.width), self.param_dtype)
    x = L.embed(table, tokens, self.dtype)
    x = x + L.gathered(pos.astype(self.dtype), ("length", "embed"))[None, :n]
    if self.conv_kernel:
      conv = nn.Conv(self.width, (self.conv_kernel,), padding="SAME", name="conv", **kw,
                     kernel_init=nn.with_logical_partitioning(L.xavier, ("kernel_size", "embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(L.zeros, ("mlp",)))
      x = x + nn.gelu(conv(x * valid[..., None].astype(x.dtype)), approximate=True)
    if self.max_words:
      x, valid = self._pool_words(tokens, x, valid)
    elif self.downsample > 1:
      s = self.downsample
      x = x.reshape(b, n // s, s * self.width)
      x = L.dense(self.width, ("mlp", "embed"), name="merge", **kw)(x)
      valid = valid.reshape(b, n // s, s).any(-1)
    x = L.constrain(x, "activation_batch", "activation_length", "activation_embed")
    m = valid.shape[1]
    mask = (valid[:, None, None, :] & valid[:, None, :, None])  # [B, 1, M, M]
    # Padding queries attend to themselves only, so no softmax row is empty.
    mask = mask | jnp.eye(m, dtype=bool)[None, None]
    for i in range(self.depth):
      x, _ = EncoderBlock(self.num_heads, name=f"blocks_{i}", **kw)(x, mask)
    x = L.affine_layer_norm("final_norm", self.dtype, self.param_dtype)(x)
    w = valid.astype(x.dtype)[..., None]
    pooled = (x * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
    return dict(context=x.astype(jnp.float32), pooled=pooled.astype(jnp.float32))


def _word_index(tokens, max_words):
  """Word index per byte [B, T] (BOS is word 0; word k > 0 is the k-th run of non-space
  bytes; spaces, padding and words past max_words get max_words, i.e. nowhere) and each
  byte's offset inside its word [B, T]."""
  prev = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)), constant_values=SPACE)
  is_byte = (tokens != SPACE) & (tokens != PAD) & (tokens != BOS)
  starts = is_byte & ((prev == SPACE) | (prev == BOS))
  word = jnp.where(is_byte | (tokens == BOS), jnp.cumsum(starts, axis=1), max_words)
  word = jnp.minimum(word, max_words)
  pos = jnp.arange(tokens.shape[1])[None]
  offset = pos - jax.lax.cummax(jnp.where(starts, pos, 0), axis=1)
  return word, offset


def _pool_words_impl(tokens, x, max_words):
  """Mean of byte states per word: ([B, T], [B, T, D]) -> ([B, W, D], valid [B, W])."""
  word, _ = _word_index(tokens, max_words)
  onehot = jax.nn.one_hot(word, max_words, dtype=x.dtype)  # [B, T, W]; index max_words -> zeros
  counts = onehot.sum(1)  # [B, W]
  words = jnp.einsum("btw,btd->bwd", onehot, x) / jnp.maximum(counts, 1.0)[..., None]
  return words, counts > 0


_HASH_BASE = np.uint32(0x01000193)  # FNV prime


def word_hashes(tokens, max_words):
  """A 32-bit polynomial hash of each word's bytes: [B, T] -> uint32 [B, max_words].

  sum_i (token_i * P^offset_i) mod 2^32 over the word's bytes, then an avalanche mix, so
  equal words get equal hashes wherever they stand (a hashing-trick vocabulary).
  """
  word, offset = _word_index(tokens, max_words)
  powers = jnp.asarray(_powers(tokens.shape[1]))
  contrib = tokens.astype(jnp.uint32) * powers[offset]
  h = jax.vmap(lambda c, w: jax.ops.segment_sum(c, w, num_segments=max_words + 1))(contrib, word)[:, :max_words]
  h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
  h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def _powers(n: int) -> np.ndarray:
  """P^0 ... P^(n-1) mod 2^32."""
  out = np.ones(n, np.uint32)
  for i in range(1, n):
    out[i] = (int(out[i - 1]) * int(_HASH_BASE)) % 2**32
  return out


TEXT_ENCODERS = {"bytes": ByteEncoder}


def build(text_cfg) -> nn.Module:
  """config.text -> text encoder module (`encoder` picks it; other fields are its arguments)."""
  kwargs = dict(text_cfg)
  name = kwargs.pop("encoder")
  for key in ("pipeline", "t5_len"):  # fields of the frozen 'sd3' encoders
    kwargs.pop(key, None)
  if name not in TEXT_ENCODERS:
    raise ValueError(f"unknown text encoder {name!r}; expected one of {tuple(TEXT_ENCODERS)}")
  for key in ("dtype", "param_dtype"):
    if key in kwargs:
      kwargs[key] = L.as_dtype(kwargs[key])
  return TEXT_ENCODERS[name](**kwargs)
