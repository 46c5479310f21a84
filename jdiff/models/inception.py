"""InceptionV3 as the FID network computes it (the TensorFlow graph of 2015-12-05 that FID,
KID and the Inception score are defined with), in NHWC.

It differs from the ImageNet classifier in torchvision in three places that change the
features: average pools inside the blocks leave the padding out of the mean, the last
block's pool branch takes a max instead of a mean, and the classifier has 1008 outputs.
Module names follow torchvision's Inception3 (Conv2d_1a_3x3, Mixed_5b/branch1x1, ...) so that
the FID weights file maps onto the tree key by key (jdiff/interop/inception.py).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon in this graph
POOL_FEATURES = 2048  # the pool3 features of FID and KID
NUM_LOGITS = 1008


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
  """Conv (no bias) -> batch norm with frozen statistics -> ReLU."""

  features: int
  kernel: int | Sequence[int]
  stride: int = 1
  padding: int | Sequence[int] = 0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel), strides=self.stride, padding=((ph, ph), (pw, pw)), use_bias=False,
                dtype=self.dtype, name="conv")(x)
    bn = lambda name, init: self.param(name, init, (self.features,), jnp.float32)
    scale, bias = bn("scale", nn.initializers.ones), bn("bias", nn.initializers.zeros)
    mean, var = bn("mean", nn.initializers.zeros), bn("var", nn.initializers.ones)
    y = (x.astype(jnp.float32) - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias
    return nn.relu(y).astype(self.dtype)


def _avg_pool_same(x: jax.Array) -> jax.Array:
  """3x3, stride 1, padding 1, the mean over the in-image taps only (TensorFlow's SAME pool)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x: jax.Array, stride: int = 2, padding: int = 0) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((padding, padding),) * 2)


class InceptionA(nn.Module):
  pool_features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = lambda name, *a, **k: BasicConv(*a, dtype=self.dtype, name=name, **k)
    b1 = c("branch1x1", 64, 1)(x)
    b5 = c("branch5x5_2", 64, 5, padding=2)(c("branch5x5_1", 48, 1)(x))
    b3 = c("branch3x3dbl_1", 64, 1)(x)
    b3 = c("branch3x3dbl_3", 96, 3, padding=1)(c("branch3x3dbl_2", 96, 3, padding=1)(b3))
    bp = c("branch_pool", self.pool_features, 1)(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = lambda name, *a, **k: BasicConv(*a, dtype=self.dtype, name=name, **k)
    b3 = c("branch3x3", 384, 3, stride=2)(x)
    bd = c("branch3x3dbl_2", 96, 3, padding=1)(c("branch3x3dbl_1", 64, 1)(x))
    bd = c("branch3x3dbl_3", 96, 3, stride=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = lambda name, *a, **k: BasicConv(*a, dtype=self.dtype, name=name, **k)
    c7 = self.channels_7x7
    b1 = c("branch1x1", 192, 1)(x)
    b7 = c("branch7x7_1", c7, 1)(x)
    b7 = c("branch7x7_3", 192, (7, 1), padding=(3, 0))(c("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7))
    bd = c("branch7x7dbl_1", c7, 1)(x)
    bd = c("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
    bd = c("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
    bd = c("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
    bd = c("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
    bp = c("branch_pool", 192, 1)(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = lambda name, *a, **k: BasicConv(*a, dtype=self.dtype, name=name, **k)
    b3 = c("branch3x3_2", 320, 3, stride=2)(c("branch3x3_1", 192, 1)(x))
    b7 = c("branch7x7x3_1", 192, 1)(x)
    b7 = c("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = c("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = c("branch7x7x3_4", 192, 3, stride=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
  """max_pool: the FID graph's last block pools its pool branch with a max, the one before with
  a (padding-free) mean."""

  max_pool: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = lambda name, *a, **k: BasicConv(*a, dtype=self.dtype, name=name, **k)
    b1 = c("branch1x1", 320, 1)(x)
    b3 = c("branch3x3_1", 384, 1)(x)
    b3 = jnp.concatenate([c("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                          c("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], axis=-1)
    bd = c("branch3x3dbl_2", 384, 3, padding=1)(c("branch3x3dbl_1", 448, 1)(x))
    bd = jnp.concatenate([c("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                          c("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], axis=-1)
    pooled = _max_pool(x, stride=1, padding=1) if self.max_pool else _avg_pool_same(x)
    bp = c("branch_pool", 192, 1)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """[B, 299, 299, 3] images scaled to [-1, 1] -> {'pool': [B, 2048] float32 (pool3: FID, KID),
  'logits': [B, 1008] (with `logits`)}."""

  logits: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    c = lambda name, *a, **k: BasicConv(*a, dtype=self.dtype, name=name, **k)
    x = x.astype(self.dtype)
    x = c("Conv2d_2b_3x3", 64, 3, padding=1)(c("Conv2d_2a_3x3", 32, 3)(c("Conv2d_1a_3x3", 32, 3, stride=2)(x)))
    x = c("Conv2d_4a_3x3", 192, 3)(c("Conv2d_3b_1x1", 80, 1)(_max_pool(x)))
    x = _max_pool(x)
    for name, pool in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool, dtype=self.dtype, name=name)(x)
    x = InceptionB(dtype=self.dtype, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, dtype=self.dtype, name=name)(x)
    x = InceptionD(dtype=self.dtype, name="Mixed_7a")(x)
    x = InceptionE(dtype=self.dtype, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, dtype=self.dtype, name="Mixed_7c")(x)
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    out = {"pool": pool}
    if self.logits:
      out["logits"] = nn.Dense(NUM_LOGITS, dtype=jnp.float32, name="fc")(pool)
    return out
