"""Low-rank adapters (LoRA): the spec a model carries as a field, 8-bit storage of the
adapted layers' frozen kernels (QLoRA style, through qwix), and merging adapters into their
kernels."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import qwix

# Storage types of a quantized base kernel (lora.quantize_base).
QUANTIZED = ("int8", "float8_e4m3fn")


@dataclasses.dataclass(frozen=True)
class LoRA:
  """Low-rank adapters (Hu et al., 2021). A model given a LoRA (its `lora` field, passed
  down to every layer it builds) adds adapters to the Dense layers whose module path matches
  `targets` (a regex over paths like 'blocks_0/x_qkv/q' or 'blocks/x_mlp/fc1'; by default
  the attention and MLP projections inside the transformer blocks):
  y = x W + (alpha / rank) (x A) B, A [in, rank] (Kaiming-uniform), B [rank, out] (zeros),
  so an adapted model starts as its base.

  param_dtype: the adapters' storage dtype whatever the base's (model.param_dtype): a base held
  in bfloat16 keeps float32 adapters, and with them float32 optimizer state, since Adam's
  state takes its parameters' dtype. None: the base's.

  quantize_base: '' or one of QUANTIZED: the adapted layers' kernels, which stay frozen, are
  stored in 8 bits ('kernel') with a float32 scale per output channel ('kernel_scale'), and
  dequantized to the compute dtype where they are used (Dettmers et al., 2023, QLoRA, with
  per-channel absmax scales instead of NF4 blocks)."""

  rank: int
  alpha: float = 1.0
  targets: str = r"(.*_)?blocks?(_\d+)?/.*(qkv2?/[qkv]|attn2?_out|mlp/fc[12]|mlp_in|out)"
  param_dtype: str | None = "float32"
  quantize_base: str = ""

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


# Jitted per kernel: called eagerly (on a loaded model, outside a train step), a kernel's
# handful of ops would otherwise each compile on their own, for every kernel shape.
@functools.partial(jax.jit, static_argnums=1)
def quantize_kernel(kernel: jax.Array, qtype: str) -> tuple[jax.Array, jax.Array]:
  """(8-bit kernel, float32 scales): absmax scales per output channel, i.e. over every axis
  but the input one (-2), so a scanned stack [layers, in, out] gets scales [layers, 1, out]."""
  per_channel = tuple(i for i in range(kernel.ndim) if i != kernel.ndim - 2)
  q = qwix.quantize(jnp.asarray(kernel, jnp.float32), jnp.dtype(qtype), channelwise_axes=per_channel,
                    scale_dtype=jnp.float32)
  return q.qvalue, q.scale


@functools.partial(jax.jit, static_argnums=2)
def dequantize_kernel(kernel: jax.Array, scale: jax.Array, dtype: Any) -> jax.Array:
  """The float kernel in `dtype` that an 8-bit kernel and its scales stand for."""
  return qwix.dequantize(qwix.QArray(kernel, scale.astype(jnp.float32))).astype(dtype)


def quantize_like(params: Any, like: Any) -> Any:
  """`params` (float) with each kernel that `like` (params or shapes of the same model)
  holds quantized, i.e. with a 'kernel_scale' beside it, quantized to like's kernel dtype."""
  if not isinstance(params, dict) or not isinstance(like, dict):
    return params
  out = {k: quantize_like(v, like[k]) if k in like else v for k, v in params.items()}
  if "kernel_scale" in like and "kernel" in out and "kernel_scale" not in out:
    out["kernel"], out["kernel_scale"] = quantize_kernel(out["kernel"], jnp.dtype(like["kernel"].dtype).name)
  return out


def dequantize(params: Any, dtype: Any = jnp.float32) -> Any:
  """`params` with every quantized kernel (one with a 'kernel_scale') back in `dtype`."""
  if not isinstance(params, dict) and not hasattr(params, "items"):
    return params
  params = {k: dequantize(v, dtype) for k, v in params.items()}
  if "kernel_scale" in params:
    params["kernel"] = dequantize_kernel(params["kernel"], params.pop("kernel_scale"), dtype)
  return params


def merge_lora(params: Any, spec: LoRA) -> Any:
  """Folds every adapter into its kernel (W + scale A B) and drops the adapter parameters:
  the plain model's params, giving the adapted model's outputs. A quantized base kernel is
  dequantized first (the merged kernel is float32)."""
  return _merge(dequantize(params) if spec.quantize_base else params, spec.scale)


def _merge(params: Any, scale: float) -> Any:
  if isinstance(params, dict) or hasattr(params, "items"):
    params = dict(params)
    if "lora_a" in params and "lora_b" in params:
      params["kernel"] = _merged_kernel(params["kernel"], params.pop("lora_a"), params.pop("lora_b"), scale)
    return {k: _merge(v, scale) for k, v in params.items()}
  return params


@jax.jit
def _merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """W + scale A B, in float32, back in W's dtype."""
  delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32)) * scale
  return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
