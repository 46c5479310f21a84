"""What turns inputs into tokens and conditioning: patches, 2D sin-cos and rotary
positions, timestep embeddings."""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.models.layers.dense import CondMLP, dense
from jdiff.models.layers.lora import LoRA
from jdiff.models.layers.partitioning import constrain

Dtype = Any


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], tokens in row-major order, features (p_row, p_col, C)."""
  b, h, w, c = x.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, grid: tuple[int, int], patch_size: int) -> jax.Array:
  """Inverse of `patchify`: [B, h*w, p*p*C] -> [B, h*p, w*p, C] for grid = (h, w)."""
  b, _, f = x.shape
  (h, w), p = grid, patch_size
  c = f // (p * p)
  x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c)


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """[len(pos), dim]: sin then cos of pos * 10000^(-2i/dim), i < dim/2 (float64)."""
  omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.outer(pos.astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


@functools.lru_cache(maxsize=32)
def cropped_sincos_2d(dim: int, grid: tuple[int, int], max_size: int, base_size: int | None,
                      interpolate: int = 0):
  """2D sin-cos position table [h*w, dim] for grid (h, w), cut from the centre of max_size^2.

  As in SD3: the table is defined on a max_size x max_size grid whose coordinates are
  scaled by base_size / max_size (base_size None: unit spacing), and each resolution
  takes its centred crop, so one set of weights serves every grid up to max_size.
  The first dim/2 channels encode the column, the last dim/2 the row.

  interpolate > 0 (position interpolation): the grid side the model learned its positions
  at. Every grid then spans the extent of that one's crop, token i of n at the coordinate of
  fractional place (i + 1/2) / n, so a token keeps its place in the frame when the resolution
  changes (a model fine-tuned at another resolution keeps what it learned of layout); at
  that side the table is the crop itself.
  """
  h, w = grid
  if dim % 4:
    raise ValueError(f"2D sin-cos embedding needs a width divisible by 4, got {dim}")
  if h > max_size or w > max_size:
    raise ValueError(f"patch grid {h}x{w} exceeds pos_embed_max_size={max_size}; "
                     "raise pos_embed_max_size or use smaller images")
  # Grid coordinates in float32 as arange / (max_size / base_size), the rest in float64:
  # this reproduces diffusers' SD3 table bit for bit (tests/test_interop_sd3.py).
  coords = np.arange(max_size, dtype=np.float32)
  if base_size is not None:
    coords = coords / np.float32(max_size / base_size)
  if interpolate:
    start = (max_size - interpolate) // 2
    scale = np.float32(1.0 if base_size is None else base_size / max_size)
    rows, cols = ((start + (np.arange(n, dtype=np.float64) + 0.5) * interpolate / n - 0.5) * scale for n in (h, w))
  else:
    top, left = (max_size - h) // 2, (max_size - w) // 2
    rows, cols = coords[top:top + h], coords[left:left + w]
  col_emb = sincos_1d(dim // 2, np.tile(cols, h))
  row_emb = sincos_1d(dim // 2, np.repeat(rows, w))
  return np.concatenate([col_emb, row_emb], axis=1).astype(np.float32)


class PatchEmbed(nn.Module):
  """[B, H, W, C] -> tokens [B, (H/p)*(W/p), D] plus the cropped 2D sin-cos position table
  (none when pos_embed_max_size is 0: models with rotary positions)."""

  width: int
  patch_size: int
  pos_embed_max_size: int
  pos_embed_base_size: int | None = None
  pos_embed_interpolate: int = 0  # see cropped_sincos_2d
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoRA | None = None  # adapters on matching Dense layers (see LoRA)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    grid = (x.shape[1] // self.patch_size, x.shape[2] // self.patch_size)
    tokens = dense(self.width, ("patch", "embed"), name="proj", dtype=self.dtype,
                   param_dtype=self.param_dtype, lora=self.lora)(patchify(x, self.patch_size))
    if self.pos_embed_max_size:
      pos = cropped_sincos_2d(self.width, grid, self.pos_embed_max_size, self.pos_embed_base_size,
                              self.pos_embed_interpolate)
      tokens = tokens + jnp.asarray(pos, self.dtype)[None]
    return constrain(tokens, "activation_batch", "activation_length", "activation_embed")


def rope_tables(ids: np.ndarray, axes_dims: Sequence[int], theta: float = 10000.0):
  """Rotary tables (cos, sin), each [S, sum(axes_dims)] float32, for positions ids [S, n_axes].

  Axis a rotates its own axes_dims[a] channels by angles ids[:, a] * theta^(-2i/axes_dims[a]);
  channels come in interleaved pairs (2i, 2i+1) sharing one angle, as in Flux.
  Computed in float64 on the host (positions are static).
  """
  ids = np.asarray(ids, np.float64)
  if ids.shape[-1] != len(axes_dims):
    raise ValueError(f"position ids have {ids.shape[-1]} axes but axes_dims has {len(axes_dims)}")
  angles = []
  for a, dim in enumerate(axes_dims):
    if dim % 2:
      raise ValueError(f"rotary axis dims must be even, got {tuple(axes_dims)}")
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles.append(np.repeat(np.outer(ids[:, a], freqs), 2, axis=1))
  angles = np.concatenate(angles, axis=1)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotates interleaved channel pairs of x [B, S, N, H] by the tables (cos, sin) [S, H].

  (a, b) -> (a cos - b sin, b cos + a sin), in float32, returned in x's dtype.
  """
  cos, sin = (jnp.asarray(r, jnp.float32)[None, :, None, :] for r in rope)
  xf = x.astype(jnp.float32)
  pairs = xf.reshape(x.shape[:-1] + (-1, 2))
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return (xf * cos + rotated * sin).astype(x.dtype)


def timestep_features(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features [B, dim] of t [B]: cos then sin of t * max_period^(-i/(dim/2))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbed(nn.Module):
  """t in [0, 1] [B] -> [B, D]: sinusoidal features of t*time_scale, then CondMLP.

  time_scale=1000 matches the DiT/SD3 convention of embedding timesteps in [0, 1000].
  """

  width: int
  time_scale: float = 1000.0
  freq_dim: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoRA | None = None  # adapters on matching Dense layers (see LoRA)
  zero_out: bool = False  # see CondMLP

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    feats = timestep_features(t * self.time_scale, self.freq_dim).astype(self.dtype)
    return CondMLP(self.width, init=nn.initializers.normal(0.02), dtype=self.dtype,
                   param_dtype=self.param_dtype, lora=self.lora, zero_out=self.zero_out, name="mlp")(feats)
