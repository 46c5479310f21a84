"""Attention: the backends (XLA, cuDNN, a CPU kernel, Pallas splash), the QKV projection
with QK-RMSNorm, and the output projection."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff import errors
from jdiff.models.layers.dense import dense
from jdiff.models.layers.lora import LoRA
from jdiff.models.layers.norms import rms_norm
from jdiff.models.layers.partitioning import compute_rules, constrain

Dtype = Any

ATTENTION_IMPLS = {"default": None, "xla": "xla", "cudnn": "cudnn"}


def check_backend(implementation: str) -> None:
  """Fails at start-up, not at compilation, for an attention kernel this platform lacks
  (tracing cuDNN's kernel elsewhere is allowed: tests and cost analyses do)."""
  backend = jax.default_backend()
  if ATTENTION_IMPLS.get(implementation) == "cudnn" and backend != "gpu":
    raise errors.InvalidArgument(f"config.model.attention='cudnn' needs an NVIDIA GPU, and this run's JAX "
                                 f"backend is {backend!r}: use 'default' (cuDNN where it helps) or 'xla'")


def dot_product_attention(q, k, v, implementation: str = "default") -> jax.Array:
  """Softmax attention with scale 1/sqrt(head_dim).  q: [B, T, N, H]; k, v: [B, S, N, H].

  'default' takes cuDNN's fused kernel on GPU for 16-bit inputs (faster than XLA's attention
  there) and XLA elsewhere.
  'splash' or 'splash:<block>' runs the Pallas splash-attention kernel (TPU; interpreted
  elsewhere, for tests) with query/key blocks of <block> tokens (default 512).
  """
  name, _, arg = implementation.partition(":")
  if name == "splash":
    return splash_attention(q, k, v, int(arg) if arg else 512)
  if implementation not in ATTENTION_IMPLS:
    raise errors.InvalidArgument(f"unknown attention implementation {implementation!r}; "
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
  sizes).
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
    raise errors.InvalidArgument(f"splash attention blocks must be multiples of 128, got {block}")
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
  spec = nn.logical_to_mesh_axes(("activation_batch", None, "activation_heads", None), compute_rules(tuple(rules)))
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


class QKV(nn.Module):
  """Query, key and value projections [B, L, D] -> 3 x [B, L, N, H], with optional QK-RMSNorm."""

  num_heads: int
  head_dim: int
  qk_norm: bool = True
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoRA | None = None  # adapters on matching Dense layers (see LoRA)

  @nn.compact
  def __call__(self, x: jax.Array):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias, lora=self.lora)
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


def attention_out(x: jax.Array, width: int, *, name: str, dtype: Dtype, param_dtype: Dtype,
                  lora: LoRA | None = None):
  """[B, L, N, H] -> [B, L, width]: merge heads and project."""
  x = x.reshape(x.shape[:2] + (-1,))
  return dense(width, ("heads", "embed"), name=name, dtype=dtype, param_dtype=param_dtype, lora=lora)(x)


def check_divisible(width: int, num_heads: int) -> int:
  """head_dim for a width split into num_heads heads, with a clear error if it does not divide."""
  if width % num_heads:
    raise errors.InvalidArgument(f"width {width} is not divisible by num_heads {num_heads}")
  return width // num_heads
