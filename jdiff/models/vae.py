"""Convolutional VAE (AutoencoderKL, as in Stable Diffusion and diffusers), NHWC.

Encoder: conv, down blocks (ResNet blocks, then a stride-2 conv except at the last),
a mid block (ResNet, single-head self-attention, ResNet), GroupNorm-SiLU-conv to the
mean and log-variance of a diagonal Gaussian. The decoder mirrors it with nearest 2x
upsampling. Latents enter the diffusion model as (z - shift_factor) * scaling_factor:
SD/SDXL 4-channel latents use (0.18215 / 0.13025, no shift), SD3 and Flux 16-channel
latents (1.5305, 0.0609) and (0.3611, 0.1159).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models import layers as L

CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")


def conv(features: int, kernel: int, name: str, stride: int = 1, padding: Any = "SAME", **kw) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, name=name,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)), **kw)


def group_norm(name: str, groups: int, eps: float = 1e-6, **kw) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), **kw)


class ResnetBlock(nn.Module):
  features: int
  groups: int = 32
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = conv(self.features, 3, "conv1", **kw)(nn.silu(group_norm("norm1", self.groups, **kw)(x)))
    h = conv(self.features, 3, "conv2", **kw)(nn.silu(group_norm("norm2", self.groups, **kw)(h)))
    if x.shape[-1] != self.features:
      x = conv(self.features, 1, "shortcut", **kw)(x)
    return x + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over all positions, with GroupNorm and a residual."""

  groups: int = 32
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hgt, wid, c = x.shape
    h = group_norm("norm", self.groups, **kw)(x).reshape(b, hgt * wid, c)
    q, k, v = L.QKV(1, c, qk_norm=False, name="qkv", **kw)(h)
    out = jax.nn.dot_product_attention(q, k, v)
    return x + L.attention_out(out, c, name="out", **kw).reshape(x.shape)


class MidBlock(nn.Module):
  attention: bool = True
  groups: int = 32
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(groups=self.groups, dtype=self.dtype, param_dtype=self.param_dtype)
    x = ResnetBlock(x.shape[-1], name="res_0", **kw)(x)
    if self.attention:
      x = AttentionBlock(name="attn", **kw)(x)
    return ResnetBlock(x.shape[-1], name="res_1", **kw)(x)


class Encoder(nn.Module):
  channels: Sequence[int]
  layers_per_block: int
  out_features: int
  groups: int = 32
  mid_attention: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = conv(self.channels[0], 3, "conv_in", **kw)(x)
    for i, ch in enumerate(self.channels):
      for j in range(self.layers_per_block):
        h = ResnetBlock(ch, self.groups, name=f"down_{i}_res_{j}", **kw)(h)
      if i < len(self.channels) - 1:
        # Pad right and bottom by one, then a 3x3 stride-2 conv (as the SD VAE does).
        h = conv(ch, 3, f"down_{i}_downsample", stride=2, padding=((0, 1), (0, 1)), **kw)(h)
    h = MidBlock(self.mid_attention, self.groups, name="mid", **kw)(h)
    h = nn.silu(group_norm("norm_out", self.groups, **kw)(h))
    return conv(self.out_features, 3, "conv_out", **kw)(h)


class Decoder(nn.Module):
  channels: Sequence[int]
  layers_per_block: int
  out_features: int
  groups: int = 32
  mid_attention: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = list(reversed(self.channels))
    h = conv(channels[0], 3, "conv_in", **kw)(z)
    h = MidBlock(self.mid_attention, self.groups, name="mid", **kw)(h)
    for i, ch in enumerate(channels):
      for j in range(self.layers_per_block + 1):
        h = ResnetBlock(ch, self.groups, name=f"up_{i}_res_{j}", **kw)(h)
      if i < len(channels) - 1:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour 2x
        h = conv(ch, 3, f"up_{i}_upsample", **kw)(h)
    h = nn.silu(group_norm("norm_out", self.groups, **kw)(h))
    return conv(self.out_features, 3, "conv_out", **kw)(h)


class AutoencoderKL(nn.Module):
  """encode: images [B, H, W, 3] in [-1, 1] -> (mean, logvar) [B, H/f, W/f, latent_channels];
  decode: z [B, H/f, W/f, latent_channels] -> images. f = 2^(len(channels)-1).
  `to_latents` / `from_latents` apply the scaling and shift factors."""

  channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 16
  groups: int = 32
  mid_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(groups=self.groups, mid_attention=self.mid_attention, dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(self.channels, self.layers_per_block, 2 * self.latent_channels, **kw)
    self.decoder = Decoder(self.channels, self.layers_per_block, self.out_channels, **kw)
    ckw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.use_quant_conv:
      self.quant_conv = conv(2 * self.latent_channels, 1, "quant_conv", **ckw)
    if self.use_post_quant_conv:
      self.post_quant_conv = conv(self.latent_channels, 1, "post_quant_conv", **ckw)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = self.encoder(x.astype(self.dtype))
    if self.use_quant_conv:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jax.Array) -> jax.Array:
    z = z.astype(self.dtype)
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Reconstruction through the posterior mean (or a sample, given rng)."""
    mean, logvar = self.encode(x)
    z = mean if rng is None else sample(rng, mean, logvar)
    return self.decode(z)

  def to_latents(self, z: jax.Array) -> jax.Array:
    return (z - self.shift_factor) * self.scaling_factor

  def from_latents(self, latents: jax.Array) -> jax.Array:
    return latents / self.scaling_factor + self.shift_factor


def sample(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """z ~ N(mean, exp(logvar)): the posterior sample."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
