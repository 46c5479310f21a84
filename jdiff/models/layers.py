"""Layers shared by the diffusion transformers.

Images are NHWC. Every parameter carries logical axis names and activations are
constrained with logical names; `config.sharding.logical_rules` maps these names onto
the mesh axes (data, fsdp, tensor), so this file never mentions a mesh.

Parameter axes:   embed (model width), mlp (MLP hidden), heads (heads*head_dim),
                  kv (head_dim), modulation (n*width of adaLN), cond (conditioning
                  inputs), patch (p*p*C), vocab (token/label tables), length
                  (learned positions), norm, layers (scan).
Activation axes:  activation_batch, activation_length, activation_embed,
                  activation_heads, activation_kv, activation_mlp.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import re
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

Dtype = Any

ATTENTION_IMPLS = {"default": None, "xla": "xla", "cudnn": "cudnn"}


def _cudnn_attention_saveable(prim, *_, **__) -> bool:
  """True for cuDNN's fused attention forward, whose outputs (attention output and softmax
  statistics) are its backward's residuals. The kernel is bound inside
  jax.nn.dot_product_attention, out of reach of jax.ad_checkpoint.checkpoint_name, so the
  policy matches the primitive by name."""
  return prim.name == "dot_product_attention_fwd_wrapper"


# dots_no_batch, and cuDNN attention keeps its forward outputs for the backward instead of
# running the forward kernel again (GPU: [B, T, D] + f32 [B, N, T] more per attention)
_DOTS_NO_BATCH_ATTENTION = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _cudnn_attention_saveable)

# 'none' runs blocks without rematerialisation; the others wrap each block in nn.remat.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_no_batch_attention": _DOTS_NO_BATCH_ATTENTION,
    # and the MLP's GELU output (fc2's input), so the backward does not run the GELU again
    # ([B, T, 4D] more per block), and the adaLN LayerNorms' statistics (mean and 1/sigma,
    # f32 [B, T] each): recomputed, XLA:GPU writes the normalised x in f32 between the
    # backward's row and column reductions (d24 H100 estimate -7 ms a step, BENCHMARKS.md)
    "dots_no_batch_attention_mlp": jax.checkpoint_policies.save_from_both_policies(
        _DOTS_NO_BATCH_ATTENTION, jax.checkpoint_policies.save_only_these_names("mlp_activation", "norm_stats")),
}

xavier = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """Constrains an activation's sharding by logical axis names (no-op without rules)."""
  return nn.with_logical_constraint(x, names)


# Mesh axes that only shard parameter *storage* (ZeRO-3 / FSDP): a weight is kept split
# over them and all-gathered where it is used, so compute sees it sharded only over the
# remaining axes (e.g. tensor). Making the gather explicit also keeps XLA's SPMD
# partitioner away from a miscompile it makes when it is left to reshard activations
# against fsdp-sharded weights on its own (docs/notes.md).
STORAGE_ONLY_AXES = ("fsdp",)


@functools.lru_cache(maxsize=16)
def _compute_rules(rules: tuple) -> tuple:
  def drop(axes):
    if axes is None or isinstance(axes, str):
      return None if axes in STORAGE_ONLY_AXES else axes
    kept = tuple(a for a in axes if a not in STORAGE_ONLY_AXES)
    return kept if len(kept) > 1 else (kept[0] if kept else None)
  return tuple((name, drop(axes)) for name, axes in rules)


def gathered(w: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """A weight with logical `axes`, constrained to its compute sharding (no-op without rules)."""
  rules = nn.get_logical_axis_rules()
  if not rules:
    return w
  return nn.with_logical_constraint(w, axes, rules=_compute_rules(tuple(rules)))


@dataclasses.dataclass(frozen=True)
class LoRA:
  """Low-rank adapters (Hu et al., 2021) on the Dense layers whose module path matches
  `targets` (a regex over paths like 'blocks_0/x_qkv/q' or 'blocks/x_mlp/fc1'; by default
  the attention and MLP projections inside the transformer blocks):
  y = x W + (alpha / rank) (x A) B, A [in, rank] (Kaiming-uniform), B [rank, out] (zeros),
  so an adapted model starts as its base."""

  rank: int
  alpha: float = 1.0
  targets: str = r"(.*_)?blocks?(_\d+)?/.*(qkv2?/[qkv]|attn2?_out|mlp/fc[12]|mlp_in|out)"

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


_LORA: contextvars.ContextVar = contextvars.ContextVar("jdiff_lora", default=None)


@contextlib.contextmanager
def use_lora(spec: LoRA | None) -> Iterator[None]:
  """Within this context (at init and apply alike), Dense layers matching spec.targets carry
  LoRA parameters 'lora_a' and 'lora_b'. None: no adapters."""
  token = _LORA.set(spec)
  try:
    yield
  finally:
    _LORA.reset(token)


def merge_lora(params: Any, spec: LoRA) -> Any:
  """Folds every adapter into its kernel (W + scale A B) and drops the adapter parameters:
  the plain model's params, giving the adapted model's outputs."""
  if isinstance(params, dict) or hasattr(params, "items"):
    params = dict(params)
    if "lora_a" in params and "lora_b" in params:
      a, b = params.pop("lora_a"), params.pop("lora_b")
      delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32)) * spec.scale
      params["kernel"] = (params["kernel"].astype(jnp.float32) + delta).astype(params["kernel"].dtype)
    return {k: merge_lora(v, spec) for k, v in params.items()}
  return params


class Dense(nn.Module):
  """y = x @ kernel + bias, kernel [in, out] with logical `axes`, bias [out] with axes[1].

  Parameters are stored in param_dtype, cast to dtype and gathered (see `gathered`)
  before use; names match nn.Dense ('kernel', 'bias'). Inside `use_lora`, matching layers
  add a low-rank adapter (see `LoRA`).
  """

  features: int
  axes: tuple[str, str]
  use_bias: bool = True
  init: Callable = xavier
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(self.init, self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    # As a 2D matmul over all leading axes: for [B, L, D] inputs XLA:CPU otherwise transposes
    # the backward's residual gradient for each weight gradient inside huge loop fusions
    # (1.7x slower training step on CPU; BENCHMARKS.md). A bitcast on every backend.
    x2 = x.astype(self.dtype).reshape(-1, x.shape[-1])
    y = jnp.dot(x2, gathered(kernel.astype(self.dtype), self.axes))
    spec = _LORA.get()
    if spec is not None and spec.rank > 0 and re.fullmatch(spec.targets, "/".join(self.path)):
      a = self.param("lora_a", nn.with_logical_partitioning(
          nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"), (self.axes[0], None)),
                     (x.shape[-1], spec.rank), self.param_dtype)
      b = self.param("lora_b", nn.with_logical_partitioning(zeros, (None, self.axes[1])),
                     (spec.rank, self.features), self.param_dtype)
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
) -> Dense:
  """A `Dense` layer (keyword shorthand used throughout the models)."""
  return Dense(features, axes, use_bias=use_bias, init=init, dtype=dtype, param_dtype=param_dtype,
               name=name)


def embed(table: jax.Array, ids: jax.Array, dtype: Dtype, axes: tuple[str, str] = ("vocab", "embed"),
          one_hot: bool | None = None) -> jax.Array:
  """Rows of a trainable table [V, D] (logical `axes`) for integer ids [...] -> [..., D].

  one_hot=None picks by backend: on GPU/TPU a one-hot matmul, since a gather's gradient is a
  scatter-add whose atomic updates serialise on repeated ids (the byte encoder's 2048
  word-bucket lookups took 14 ms of a 495 ms d24 step on an H100, BENCHMARKS.md) while the
  one-hot product's gradient is a dense matmul; on CPU a gather, which costs less there.
  Both give the same values (one non-zero term per row).
  """
  w = gathered(table.astype(dtype), axes)
  if one_hot is None:
    one_hot = jax.default_backend() != "cpu"
  if not one_hot:
    return jnp.take(w, ids, axis=0)
  return jnp.dot(jax.nn.one_hot(ids, table.shape[0], dtype=w.dtype), w)


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

  @nn.compact
  def __call__(self, c: jax.Array) -> list[jax.Array]:
    out = dense(
        self.n * self.features, ("embed", "modulation"), name="linear", init=zeros,
        dtype=self.dtype, param_dtype=self.param_dtype,
    )(nn.silu(c))
    return jnp.split(out, self.n, axis=-1)


class MLP(nn.Module):
  """Dense -> GELU (tanh) -> Dense.  x: [B, L, D] -> [B, L, D]."""

  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.hidden, ("embed", "mlp"), name="fc1", **kw)(x)
    h = constrain(nn.gelu(h, approximate=True), "activation_batch", "activation_length", "activation_mlp")
    h = checkpoint_name(h, "mlp_activation")
    return dense(x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(h)


def dot_product_attention(q, k, v, implementation: str = "default") -> jax.Array:
  """Softmax attention with scale 1/sqrt(head_dim).  q: [B, T, N, H]; k, v: [B, S, N, H].

  'default' takes cuDNN's fused kernel on GPU for 16-bit inputs (2.1x faster than XLA's
  attention for the default config on an H100, BENCHMARKS.md) and XLA elsewhere.
  'splash' or 'splash:<block>' runs the Pallas splash-attention kernel (TPU; interpreted
  elsewhere, for tests) with query/key blocks of <block> tokens (default 512).
  """
  name, _, arg = implementation.partition(":")
  if name == "splash":
    return splash_attention(q, k, v, int(arg) if arg else 512)
  if implementation not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention implementation {implementation!r}; "
                     f"expected one of {tuple(ATTENTION_IMPLS) + ('splash', 'splash:<block>')}")
  impl = ATTENTION_IMPLS[implementation]
  backend = jax.default_backend()
  if implementation == "default" and backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
    impl = "cudnn"
  if impl != "cudnn" and backend == "cpu":
    return _attention_heads_major(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation=impl)


@jax.custom_vjp
def _attention_heads_major(q, k, v) -> jax.Array:
  """Softmax attention (what jax.nn.dot_product_attention computes: float32 logits and
  softmax, scale 1/sqrt(head_dim)) for XLA:CPU, with a hand-written backward.

  q, k, v go to [B, N, T, H] first (XLA:CPU otherwise copies operands around every
  product). As in flash attention, the softmax is normalised after the product with v:
  o = (exp(s - max s) @ v) / l with l the row sums, so the [T, S] probabilities are never
  divided, and the backward needs no [T, S] reduction: with P = exp(s - max s) / l,
  dS = P * (dO v^T - rowsum(dO * o)). The scale goes onto q (exact for power-of-4 head
  sizes). BENCHMARKS.md has what this saved.
  """
  return _attention_heads_major_fwd(q, k, v)[0]


def _attention_heads_major_fwd(q, k, v):
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  logits = jnp.einsum("bnth,bnsh->bnts", qt, kt, preferred_element_type=jnp.float32)
  e = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
  inv = 1.0 / e.sum(axis=-1, keepdims=True)  # [B, N, T, 1]
  e = e.astype(v.dtype)
  o = jnp.einsum("bnts,bnsh->bnth", e, vt, preferred_element_type=jnp.float32) * inv
  o = o.astype(v.dtype)
  return o.transpose(0, 2, 1, 3), (qt, kt, vt, e, inv, o)


def _attention_heads_major_bwd(res, do):
  qt, kt, vt, e, inv, o = res
  dot = do.transpose(0, 2, 1, 3)
  g = (dot.astype(jnp.float32) * inv).astype(vt.dtype)  # dO / l
  dv = jnp.einsum("bnts,bnth->bnsh", e, g)
  rowdot = jnp.sum(dot.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True) * inv
  dp = jnp.einsum("bnth,bnsh->bnts", g, vt, preferred_element_type=jnp.float32)
  ds = (e.astype(jnp.float32) * (dp - rowdot)).astype(qt.dtype)  # P * (dP - rowsum(dO * o))
  scale = jnp.asarray(qt.shape[-1] ** -0.5, qt.dtype)
  dq = jnp.einsum("bnts,bnsh->bnth", ds, kt) * scale
  dk = jnp.einsum("bnts,bnth->bnsh", ds, qt)
  return tuple(x.transpose(0, 2, 1, 3) for x in (dq, dk, dv))


_attention_heads_major.defvjp(_attention_heads_major_fwd, _attention_heads_major_bwd)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


@functools.lru_cache(maxsize=64)
def _splash_kernel(padded: int, length: int, heads: int, block: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  keep = np.zeros((padded, padded), bool)
  keep[:, :length] = True  # padded keys are masked; padded query rows are cut off afterwards
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  with jax.ensure_compile_time_eval():  # the mask tables are constants, also when built under jit
    return sk.make_splash_mha(sm.MultiHeadMask([sm.NumpyMask(keep)] * heads), head_shards=1, q_seq_shards=1,
                              block_sizes=sizes, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int = 512) -> jax.Array:
  """Self-attention [B, S, N, H] through Pallas splash attention.

  The sequence is padded to a multiple of the block (itself at least 128 and at most the
  padded length) with the padded keys masked out. Under a mesh with logical rules, runs
  per shard (shard_map over the batch and head axes) since the kernel is not partitioned
  by XLA. Off TPU the kernel runs in Pallas interpret mode.
  """
  if block % 128:
    raise ValueError(f"splash attention blocks must be multiples of 128, got {block}")
  length, head_dim = q.shape[1], q.shape[-1]
  block = min(block, _round_up(length, 128))
  padded = _round_up(length, block)
  interpret = jax.default_backend() != "tpu"

  def local(q, k, v):
    kernel = _splash_kernel(padded, length, q.shape[2], block, interpret)
    prep = lambda x: jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    out = jax.vmap(kernel)(prep(q * jnp.asarray(head_dim**-0.5, q.dtype)), prep(k), prep(v))
    return out.transpose(0, 2, 1, 3)[:, :length]

  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return local(q, k, v)
  spec = nn.logical_to_mesh_axes(("activation_batch", None, "activation_heads", None), _compute_rules(tuple(rules)))
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


class QKV(nn.Module):
  """Query, key and value projections [B, L, D] -> 3 x [B, L, N, H], with optional QK-RMSNorm."""

  num_heads: int
  head_dim: int
  qk_norm: bool = True
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
    width = self.num_heads * self.head_dim
    names = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
    q, k, v = (
        constrain(
            dense(width, ("embed", "heads"), name=n, **kw)(x).reshape(
                x.shape[:2] + (self.num_heads, self.head_dim)),
            *names)
        for n in ("q", "k", "v")
    )
    if self.qk_norm:
      q = rms_norm("q_norm", self.dtype, self.param_dtype)(q)
      k = rms_norm("k_norm", self.dtype, self.param_dtype)(k)
    return q, k, v


def attention_out(x: jax.Array, width: int, *, name: str, dtype: Dtype, param_dtype: Dtype):
  """[B, L, N, H] -> [B, L, width]: merge heads and project."""
  x = x.reshape(x.shape[:2] + (-1,))
  return dense(width, ("heads", "embed"), name=name, dtype=dtype, param_dtype=param_dtype)(x)


# --- patches and positions ---------------------------------------------------------------


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
def cropped_sincos_2d(dim: int, grid: tuple[int, int], max_size: int, base_size: int | None):
  """2D sin-cos position table [h*w, dim] for grid (h, w), cut from the centre of max_size^2.

  As in SD3: the table is defined on a max_size x max_size grid whose coordinates are
  scaled by base_size / max_size (base_size None: unit spacing), and each resolution
  takes its centred crop, so one set of weights serves every grid up to max_size.
  The first dim/2 channels encode the column, the last dim/2 the row.
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
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    grid = (x.shape[1] // self.patch_size, x.shape[2] // self.patch_size)
    tokens = dense(self.width, ("patch", "embed"), name="proj", dtype=self.dtype,
                   param_dtype=self.param_dtype)(patchify(x, self.patch_size))
    if self.pos_embed_max_size:
      pos = cropped_sincos_2d(self.width, grid, self.pos_embed_max_size, self.pos_embed_base_size)
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


class CondMLP(nn.Module):
  """Dense -> SiLU -> Dense, for timestep features and pooled text: [B, F] -> [B, D]."""

  width: int
  init: Callable = xavier
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  zero_out: bool = False  # fc2 starts at zero: the MLP adds nothing until trained

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(dense(self.width, ("cond", "mlp"), name="fc1", init=self.init, **kw)(x))
    out_init = nn.initializers.zeros if self.zero_out else self.init
    return dense(self.width, ("mlp", "embed"), name="fc2", init=out_init, **kw)(h)


class TimestepEmbed(nn.Module):
  """t in [0, 1] [B] -> [B, D]: sinusoidal features of t*time_scale, then CondMLP.

  time_scale=1000 matches the DiT/SD3 convention of embedding timesteps in [0, 1000].
  """

  width: int
  time_scale: float = 1000.0
  freq_dim: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  zero_out: bool = False  # see CondMLP

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    feats = timestep_features(t * self.time_scale, self.freq_dim).astype(self.dtype)
    return CondMLP(self.width, init=nn.initializers.normal(0.02), dtype=self.dtype,
                   param_dtype=self.param_dtype, zero_out=self.zero_out, name="mlp")(feats)


# --- block stacks ------------------------------------------------------------------------


def run_blocks(
    block_cls: type[nn.Module],
    depth: int,
    carry: Any,
    cond: jax.Array,
    *,
    name: str,
    scan: bool,
    remat: str,
    **block_kwargs,
) -> Any:
  """Applies `depth` blocks of `block_cls` (call: (carry, cond) -> (carry, None)).

  Must be called from a compact method. scan=True runs them under nn.scan with params
  stacked on a leading 'layers' axis under `name` (compile time flat in depth);
  scan=False creates `name`_0 ... `name`_{depth-1}. `remat` names a policy in
  REMAT_POLICIES ('none' = no rematerialisation).
  """
  if depth == 0:
    return carry
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {remat!r}; expected one of {tuple(REMAT_POLICIES)}")
  cls = block_cls
  if remat != "none":
    cls = nn.remat(cls, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
  if scan:
    stack = nn.scan(
        cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=nn.broadcast,
        length=depth,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(name=name, **block_kwargs)
    carry, _ = stack(carry, cond)
    return carry
  for i in range(depth):
    carry, _ = cls(name=f"{name}_{i}", **block_kwargs)(carry, cond)
  return carry


def as_dtype(name: str | Dtype) -> Dtype:
  """'float32' / 'bfloat16' / a dtype -> jnp dtype (configs hold strings)."""
  return jnp.dtype(name)


def stack_unrolled(params: dict, name: str, depth: int) -> dict:
  """Unrolled block params {name_0 ... name_{depth-1}} -> scanned {name: stacked}.

  Moves weights between the scan=False and scan=True layouts of the same model.
  """
  params = dict(params)
  blocks = [params.pop(f"{name}_{i}") for i in range(depth)]
  params[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return params


def unstack_scanned(params: dict, name: str) -> dict:
  """Inverse of `stack_unrolled`."""
  params = dict(params)
  stacked = params.pop(name)
  depth = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(depth):
    params[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params


def stack_groups(params: dict, groups: Sequence[tuple[str, int]]) -> dict:
  """`stack_unrolled` for several block stacks [(name, depth), ...]; empty stacks are skipped."""
  for name, depth in groups:
    if depth:
      params = stack_unrolled(params, name, depth)
  return params


def unstack_groups(params: dict, names: Sequence[str]) -> dict:
  """`unstack_scanned` for every stack in `names` that `params` holds."""
  for name in names:
    if name in params:
      params = unstack_scanned(params, name)
  return params


def match_layout(params: Any, like: Any) -> Any:
  """`params` with its block stacks in the layout of `like` (params of the same model, or
  their shapes): a scanned stack `name` becomes name_0 ... name_{n-1} where `like` has those,
  and unrolled blocks become one stack where `like` has `name`. So a model trained with
  scan=True can start a scan=False run, and the reverse. Everything else is left as it is."""
  if not isinstance(params, dict) or not isinstance(like, dict):
    return params
  out = dict(params)
  for name in like:
    if name not in out and f"{name}_0" in out:
      depth = next(i for i in range(len(out) + 1) if f"{name}_{i}" not in out)
      out = stack_unrolled(out, name, depth)
  for name in list(out):
    if name not in like and f"{name}_0" in like and f"{name}_0" not in out:
      out = unstack_scanned(out, name)
  return {k: match_layout(v, like[k]) if k in like else v for k, v in out.items()}


def check_divisible(width: int, num_heads: int) -> int:
  """head_dim for a width split into num_heads heads, with a clear error if it does not divide."""
  if width % num_heads:
    raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
  return width // num_heads


__all__: Sequence[str] = [
    "ATTENTION_IMPLS", "REMAT_POLICIES", "STORAGE_ONLY_AXES", "constrain", "gathered", "LoRA", "use_lora",
    "merge_lora", "Dense", "dense", "affine_layer_norm", "rms_norm", "RMSNorm", "modulate", "norm_modulate",
    "norm_modulate_many", "Modulation", "MLP", "dot_product_attention", "splash_attention", "QKV",
    "attention_out", "patchify", "unpatchify", "sincos_1d", "cropped_sincos_2d", "PatchEmbed", "rope_tables",
    "apply_rope", "timestep_features", "CondMLP", "TimestepEmbed", "run_blocks", "as_dtype", "stack_unrolled",
    "unstack_scanned", "stack_groups", "unstack_groups", "match_layout", "check_divisible",
]
