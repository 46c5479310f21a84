"""Dense projections (with optional LoRA adapters), embedding lookups, and the MLPs built
from them."""

from __future__ import annotations

import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jdiff.models.layers.lora import LoRA, dequantize_kernel
from jdiff.models.layers.partitioning import constrain, gathered

Dtype = Any

xavier = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()


def as_dtype(name: str | Dtype) -> Dtype:
  """'float32' / 'bfloat16' / a dtype -> jnp dtype (configs hold strings)."""
  return jnp.dtype(name)


class Dense(nn.Module):
  """y = x @ kernel + bias, kernel [in, out] with logical `axes`, bias [out] with axes[1].

  Parameters are stored in param_dtype, cast to dtype and gathered (see `gathered`)
  before use; names match nn.Dense ('kernel', 'bias'). With `lora` set and this layer's
  module path matching lora.targets, it adds the low-rank adapter 'lora_a', 'lora_b', and
  with lora.quantize_base holds its kernel in 8 bits beside 'kernel_scale' (see `LoRA`).
  """

  features: int
  axes: tuple[str, str]
  use_bias: bool = True
  init: Callable = xavier
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoRA | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    spec = self.lora
    adapted = spec is not None and spec.rank > 0 and re.fullmatch(spec.targets, "/".join(self.path))
    shape = (x.shape[-1], self.features)
    if adapted and spec.quantize_base:
      # 8 bits gathered, then dequantized: FSDP moves a quarter of float32's bytes. The
      # initial values are placeholders for the base model's (lora.quantize_like).
      q = self.param("kernel", nn.with_logical_partitioning(zeros, self.axes), shape, jnp.dtype(spec.quantize_base))
      scale = self.param("kernel_scale", nn.with_logical_partitioning(nn.initializers.ones, (None, self.axes[1])),
                         (1, self.features), jnp.float32)
      kernel = dequantize_kernel(gathered(q, self.axes), gathered(scale, (None, self.axes[1])), self.dtype)
    else:
      kernel = gathered(self.param("kernel", nn.with_logical_partitioning(self.init, self.axes), shape,
                                   self.param_dtype).astype(self.dtype), self.axes)
    # As a 2D matmul over all leading axes: for [B, L, D] inputs XLA:CPU otherwise transposes
    # the backward's residual gradient for each weight gradient inside huge loop fusions (a
    # much slower CPU step). A bitcast on every backend.
    x2 = x.astype(self.dtype).reshape(-1, x.shape[-1])
    y = jnp.dot(x2, kernel)
    if adapted:
      lora_dtype = spec.param_dtype or self.param_dtype
      a = self.param("lora_a", nn.with_logical_partitioning(
          nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"), (self.axes[0], None)),
                     (x.shape[-1], spec.rank), lora_dtype)
      b = self.param("lora_b", nn.with_logical_partitioning(zeros, (None, self.axes[1])),
                     (spec.rank, self.features), lora_dtype)
      y = y + jnp.dot(jnp.dot(x2, a.astype(self.dtype)), b.astype(self.dtype)) * jnp.asarray(spec.scale, self.dtype)
    y = y.reshape(x.shape[:-1] + (self.features,))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(zeros, (self.axes[1],)),
                        (self.features,), self.param_dtype)
      y = y + gathered(bias.astype(self.dtype), (self.axes[1],))
    return y


def dense(
    features: int,
    axes: tuple[str, str],
    *,
    name: str,
    dtype: Dtype,
    param_dtype: Dtype,
    init: Callable = xavier,
    use_bias: bool = True,
    lora: LoRA | None = None,
) -> Dense:
  """A `Dense` layer (keyword shorthand used throughout the models)."""
  return Dense(features, axes, use_bias=use_bias, init=init, dtype=dtype, param_dtype=param_dtype,
               lora=lora, name=name)


def embed(table: jax.Array, ids: jax.Array, dtype: Dtype, axes: tuple[str, str] = ("vocab", "embed"),
          one_hot: bool | None = None) -> jax.Array:
  """Rows of a trainable table [V, D] (logical `axes`) for integer ids [...] -> [..., D].

  one_hot=None picks by backend: on GPU/TPU a one-hot matmul, since a gather's gradient is a
  scatter-add whose atomic updates serialise on repeated ids (the byte encoder's word-bucket
  lookups repeat ids in every batch) while the one-hot product's gradient is a dense matmul; on CPU a gather, which costs less there.
  Both give the same values (one non-zero term per row).
  """
  w = gathered(table.astype(dtype), axes)
  if one_hot is None:
    one_hot = jax.default_backend() != "cpu"
  if not one_hot:
    return jnp.take(w, ids, axis=0)
  return jnp.dot(jax.nn.one_hot(ids, table.shape[0], dtype=w.dtype), w)


class MLP(nn.Module):
  """Dense -> GELU (tanh) -> Dense.  x: [B, L, D] -> [B, L, D]."""

  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoRA | None = None  # adapters on matching Dense layers (see LoRA)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
    h = dense(self.hidden, ("embed", "mlp"), name="fc1", **kw)(x)
    h = constrain(nn.gelu(h, approximate=True), "activation_batch", "activation_length", "activation_mlp")
    h = checkpoint_name(h, "mlp_activation")
    return dense(x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(h)


class CondMLP(nn.Module):
  """Dense -> SiLU -> Dense, for timestep features and pooled text: [B, F] -> [B, D]."""

  width: int
  init: Callable = xavier
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoRA | None = None  # adapters on matching Dense layers (see LoRA)
  zero_out: bool = False  # fc2 starts at zero: the MLP adds nothing until trained

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
    h = nn.silu(dense(self.width, ("cond", "mlp"), name="fc1", init=self.init, **kw)(x))
    out_init = nn.initializers.zeros if self.zero_out else self.init
    return dense(self.width, ("mlp", "embed"), name="fc2", init=out_init, **kw)(h)
