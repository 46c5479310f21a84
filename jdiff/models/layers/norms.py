"""Normalisations: affine LayerNorm, RMSNorm (QK-norm), and adaLN modulation with its
fused LayerNorm."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jdiff.models.layers.dense import dense, zeros
from jdiff.models.layers.lora import LoRA

Dtype = Any


def affine_layer_norm(name: str, dtype: Dtype, param_dtype: Dtype, eps: float = 1e-5) -> nn.LayerNorm:
  """LayerNorm with learned scale and bias (for encoders without adaLN)."""
  return nn.LayerNorm(
      epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(zeros, ("norm",)), name=name,
  )


def rms_norm(name: str, dtype: Dtype, param_dtype: Dtype, axis_name: str = "kv", eps: float = 1e-6):
  """RMSNorm with a learned scale over the last axis (statistics in float32)."""
  return RMSNorm(eps=eps, dtype=dtype, param_dtype=param_dtype, axis_name=axis_name, name=name)


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * scale over the last axis, statistics in float32: what
  flax's nn.RMSNorm computes (same parameter), with a hand-written backward that keeps
  only x for it (1/rms is recomputed there, in the pass that needs mean(dy scale x))."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axis_name: str = "kv"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    return _rms_norm(x, scale, self.eps, jnp.dtype(self.dtype or jnp.result_type(x, scale)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rms_norm(x, scale, eps, dtype):
  return _rms_norm_fwd(x, scale, eps, dtype)[0]


def _rms_norm_fwd(x, scale, eps, dtype):
  xf = x.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (xf * inv * scale.astype(jnp.float32)).astype(dtype), (x, scale)


def _rms_norm_bwd(eps, dtype, res, dy):
  del dtype
  x, scale = res
  xf = x.astype(jnp.float32)
  dyf = dy.astype(jnp.float32)
  g = dyf * scale.astype(jnp.float32)
  # Two passes over (x, dy): the row reductions (1/rms recomputed beside mean(g x)), then dx
  # with the column sums for dscale.
  inv = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  c = inv * inv * inv * jnp.mean(g * xf, axis=-1, keepdims=True)
  dx = inv * g - xf * c  # = inv (g - x^ mean(g x^)), x^ = x inv
  dscale = dyf * (xf * inv)
  if x.ndim >= 3:  # summed over axis 1 first, as x's bias gradient is (same pass on XLA:GPU)
    dscale = jax.lax.optimization_barrier(jnp.sum(dscale, axis=1))
  dscale = jnp.sum(dscale.reshape(-1, x.shape[-1]), axis=0)
  return dx.astype(x.dtype), dscale.astype(scale.dtype)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x * (1 + scale) + shift.  x: [B, L, D]; shift, scale: [B, D]."""
  return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def norm_modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, dtype: Dtype, eps: float = 1e-6) -> jax.Array:
  """adaLN: modulate(LayerNorm(x), shift, scale), the LayerNorm without parameters, with
  float32 statistics and eps inside the square root.  x: [B, L, D]; shift, scale: [B, D].

  One function with a hand-written backward (dx = (g - mean g - x^ mean(g x^)) / sigma
  with g = dy (1 + scale)), which keeps only x and the per-token statistics for it.
  """
  return norm_modulate_many(x, (shift,), (scale,), dtype, eps)[0]


def norm_modulate_many(x: jax.Array, shifts: Sequence[jax.Array], scales: Sequence[jax.Array], dtype: Dtype,
                       eps: float = 1e-6) -> tuple[jax.Array, ...]:
  """`norm_modulate` of one x under several (shift, scale) pairs, normalising x once (SD3.5's
  dual-attention blocks modulate the same LayerNorm of the block input twice)."""
  mean, inv = _layer_norm_stats(x, eps)
  return _norm_modulate(x, mean, inv, tuple(shifts), tuple(scales), jnp.dtype(dtype))


def _layer_norm_stats(x, eps):
  """Per-row mean and 1/sigma of x [..., D] in float32, [..., 1] each, named 'norm_stats' for
  remat policies (REMAT_POLICIES). Inputs of the normalisation under stop_gradient: their
  part of x's gradient is in its backward."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  inv = jax.lax.rsqrt(jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True) + eps)
  return tuple(checkpoint_name(jax.lax.stop_gradient(s), "norm_stats") for s in (mean, inv))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _norm_modulate(x, mean, inv, shifts, scales, dtype):
  return _norm_modulate_fwd(x, mean, inv, shifts, scales, dtype)[0]


def _normalized(x, mean, inv):
  return (x.astype(jnp.float32) - mean) * inv


def _norm_modulate_fwd(x, mean, inv, shifts, scales, dtype):
  xhat = _normalized(x, mean, inv)
  ys = tuple(modulate(xhat, shift.astype(jnp.float32), scale.astype(jnp.float32)).astype(dtype)
             for shift, scale in zip(shifts, scales))
  return ys, (x, mean, inv, shifts, scales)


def _norm_modulate_bwd(dtype, res, dys):
  del dtype
  x, mean, inv, shifts, scales = res
  xhat = _normalized(x, mean, inv)
  dyfs = [dy.astype(jnp.float32) for dy in dys]
  # The LayerNorm's backward is linear in g = sum_k dy_k (1 + scale_k): one pass for all pairs.
  g = sum(dyf * (1.0 + scale.astype(jnp.float32)[:, None, :]) for dyf, scale in zip(dyfs, scales))
  dx = inv * (g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
  dshifts = tuple(jnp.sum(dyf, axis=1).astype(shift.dtype) for dyf, shift in zip(dyfs, shifts))
  dscales = tuple(jnp.sum(dyf * xhat, axis=1).astype(scale.dtype) for dyf, scale in zip(dyfs, scales))
  # mean and inv depend on x through stop_gradient: dx above carries their part.
  return dx.astype(x.dtype), jnp.zeros_like(mean), jnp.zeros_like(inv), dshifts, dscales


_norm_modulate.defvjp(_norm_modulate_fwd, _norm_modulate_bwd)


class Modulation(nn.Module):
  """adaLN: n per-sample vectors [B, D] from the conditioning c [B, D_c], via Dense(silu(c)).

  Zero-initialised, so at init every shift, scale and gate is 0: blocks start as the
  identity and the model's output is exactly 0 (adaLN-Zero).
  """

  n: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoRA | None = None  # adapters on matching Dense layers (see LoRA)

  @nn.compact
  def __call__(self, c: jax.Array) -> list[jax.Array]:
    out = dense(
        self.n * self.features, ("embed", "modulation"), name="linear", init=zeros,
        dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora,
    )(nn.silu(c))
    return jnp.split(out, self.n, axis=-1)
