"""Memory for big models: float32 adapters on a bfloat16 base, 8-bit base kernels
(lora.quantize_base), and the EMA and gradients of the trainable parameters only."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import errors, models
from jdiff.models import layers
from jdiff.models.layers import lora as lora_lib
from jdiff.train import optim

import helpers
from helpers import TINY_FLUX, TINY_MMDIT, inputs, perturb


def _paths(tree):
  return {optim.param_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("qtype", lora_lib.QUANTIZED)
def test_quantized_kernel_is_within_half_a_step_of_the_float_one(qtype):
  """Per output channel (also per layer of a scanned stack [layers, in, out]) the scale is
  absmax / the type's bound (e4m3's largest value; int8: 127.5, qwix's bound, whose top bucket
  rounds to 127), and dequantizing gives back every weight to within half a
  quantization step (int8) or e4m3's relative rounding (3 mantissa bits: 2^-4)."""
  w = jax.random.normal(jax.random.key(0), (3, 40, 24)) * jnp.linspace(0.1, 3.0, 24)
  q, scale = lora_lib.quantize_kernel(w, qtype)
  assert q.dtype == jnp.dtype(qtype) and q.shape == w.shape and scale.shape == (3, 1, 24)
  top = float(jnp.finfo(qtype).max) if qtype.startswith("float8") else 127.5
  np.testing.assert_allclose(scale, jnp.abs(w).max(axis=1, keepdims=True) / top, rtol=1e-6)
  err = jnp.abs(lora_lib.dequantize_kernel(q, scale, jnp.float32) - w)
  if qtype == "int8":
    assert bool((err <= scale / 2 * (1 + 1e-4)).all())  # float32 rounding of x / scale
  else:
    assert bool((err <= jnp.abs(w) * 2.0 ** -4 + 1e-6).all())
  assert float(err.max()) > 0  # it is lossy


@pytest.mark.heavy
@pytest.mark.parametrize("cfg", [TINY_FLUX, TINY_MMDIT], ids=["flux", "mmdit"])
@pytest.mark.parametrize("qtype,tolerance", [("int8", 0.02), ("float8_e4m3fn", 0.06)])
def test_quantized_base_forward_is_close_to_bfloat16(cfg, qtype, tolerance):
  """A LoRA model whose adapted kernels are 8-bit (quantized from the bfloat16 base with
  quantize_like) gives the bfloat16 model's output to within `tolerance` of its RMS: int8 2%,
  fp8 e4m3 6% (these tiny models measure about 1% and 3.5%, where bfloat16 itself is 0.6% from
  float32); only the adapted kernels are 8-bit, and the adapters stay float32."""
  cfg = dict(cfg, dtype="bfloat16", param_dtype="bfloat16")
  x, t, cond = inputs(cfg, batch=2)
  spec = layers.LoRA(rank=4, alpha=4.0, targets=r".*")
  base_model = models.build(cfg, lora=spec)
  params = perturb(nn.unbox(jax.jit(base_model.init)(jax.random.key(0), x, t, **cond))["params"], scale=0.05)
  q_model = models.build(cfg, lora=layers.LoRA(rank=4, alpha=4.0, targets=r".*", quantize_base=qtype))
  shapes = jax.eval_shape(lambda: nn.unbox(q_model.init(jax.random.key(0), x, t, **cond))["params"])
  q_params = layers.quantize_like(params, shapes)
  chex.assert_trees_all_equal_shapes_and_dtypes(q_params, shapes)
  flat = _paths(q_params)
  assert {k for k, v in flat.items() if v.dtype == jnp.dtype(qtype)} == {
      k for k in flat if k.endswith("/kernel")}
  assert all(v.dtype == jnp.float32 for k, v in flat.items() if "lora_" in k or k.endswith("kernel_scale"))
  ref = jax.jit(base_model.apply)({"params": params}, x, t, **cond).astype(jnp.float32)
  out = jax.jit(q_model.apply)({"params": q_params}, x, t, **cond).astype(jnp.float32)
  rms = float(jnp.sqrt(jnp.mean(ref ** 2)))
  rel = float(jnp.sqrt(jnp.mean((out - ref) ** 2))) / rms
  assert rms > 1e-2 and 0 < rel < tolerance, rel
  # Merging dequantizes: the plain float model on the merged kernels gives the quantized
  # adapted model's output.
  plain = models.build(dict(cfg, dtype="float32", param_dtype="float32"))
  merged = layers.merge_lora(q_params, q_model.lora)
  assert not any(k.endswith("kernel_scale") or "lora_" in k for k in _paths(merged))
  q32 = models.build(dict(cfg, dtype="float32", param_dtype="float32"), lora=q_model.lora)
  chex.assert_trees_all_close(jax.jit(plain.apply)({"params": merged}, x, t, **cond),
                              jax.jit(q32.apply)({"params": q_params}, x, t, **cond), atol=1e-5, rtol=1e-5)


def test_adapters_keep_their_own_dtype_on_a_bfloat16_base():
  """lora.param_dtype: float32 adapters beside bfloat16 kernels (None: the base's dtype)."""
  cfg = dict(TINY_FLUX, param_dtype="bfloat16")
  x, t, cond = inputs(cfg, batch=1)
  for dtype, want in (("float32", jnp.float32), (None, jnp.bfloat16)):
    model = models.build(cfg, lora=layers.LoRA(rank=2, param_dtype=dtype))
    flat = _paths(jax.eval_shape(lambda m=model: nn.unbox(m.init(jax.random.key(0), x, t, **cond))["params"]))
    assert {v.dtype for k, v in flat.items() if "lora_" in k} == {jnp.dtype(want)}
    assert {v.dtype for k, v in flat.items() if k.endswith("/kernel")} == {jnp.dtype(jnp.bfloat16)}


def test_eight_bit_parameters_cannot_train():
  params = {"denoiser": {"a": {"kernel": jnp.zeros((2, 2), jnp.int8), "lora_a": jnp.zeros((2, 1))}}}
  assert optim.count_trainable(params, ".*lora_.*") == 2
  with pytest.raises(errors.InvalidArgument, match="8-bit parameters, which cannot train.*denoiser/a/kernel"):
    optim.count_trainable(params, "")
  with pytest.raises(errors.InvalidArgument, match="matches no parameter"):
    optim.count_trainable(params, "nothing")


def test_split_trainable_differentiates_only_the_trainable_parameters():
  """The train step's gradient is taken with respect to the trainable half of
  split_trainable: the frozen parameters are closed over, get no gradient, and merge back."""
  params = {"a": {"kernel": jnp.arange(4.0).reshape(2, 2), "lora_a": jnp.ones((2, 1))}, "b": jnp.ones(3)}
  trainable, frozen = optim.split_trainable(params, ".*lora_.*")
  assert len(jax.tree.leaves(trainable)) == 1 and len(jax.tree.leaves(frozen)) == 2
  chex.assert_trees_all_equal(optim.merge_trainable(trainable, frozen), params)
  loss = lambda tr: jnp.sum(optim.merge_trainable(tr, frozen)["a"]["kernel"] @ tr["a"]["lora_a"])
  grads = jax.grad(loss)(trainable)
  assert len(jax.tree.leaves(grads)) == 1
  np.testing.assert_array_equal(grads["a"]["lora_a"], params["a"]["kernel"].sum(0, keepdims=True).T)


@pytest.mark.heavy
def test_qlora_run_from_a_base_quantizes_it_trains_adapters_resumes_and_exports(tmp_path):
  """A LoRA run with lora.quantize_base=int8 on a bfloat16 base, as a user runs it: the base's
  adapted kernels are stored as int8 (exactly quantize_kernel of the parent's float32 ones), only the
  float32 adapters move and carry EMA state, two steps resumed equal two straight, the adapters
  export, and merging puts them onto the dequantized kernels."""
  from jdiff.workdir import checkpoint as ckpt_lib
  from jdiff.hf import workdirs
  from test_train import get_config, restored, run

  # Three steps: after one only the zero-initialised final layer has moved, and the blocks'
  # zero adaLN gates still pass no gradient to their adapters.
  base = get_config(train__num_steps=3, train__sample_every=0, eval__at_end=False)
  run(base, tmp_path / "base")
  lora = dict(lora__rank=4, lora__alpha=4.0, lora__quantize_base="int8", model__param_dtype="bfloat16",
              optim__trainable=".*lora_.*", optim__lr=1e-2, optim__warmup_steps=0, train__sample_every=0,
              eval__at_end=False, train__checkpoint_every=1, init_from=str(tmp_path / "base"))
  config = get_config(train__num_steps=2, **lora)
  run(config, tmp_path / "straight")
  run(get_config(train__num_steps=1, **lora), tmp_path / "resumed")
  run(config, tmp_path / "resumed")
  a, _, _ = restored(tmp_path / "straight", config)
  b, _, _ = restored(tmp_path / "resumed", config)
  chex.assert_trees_all_equal(a, b)

  parent, _, _ = restored(tmp_path / "base", base)
  before, after = _paths(parent.averaged()), _paths(a.params)
  eight_bit = [k for k, v in after.items() if v.dtype == jnp.int8]
  assert eight_bit and all(k.endswith("/kernel") and k.replace("/kernel", "/lora_a") in after for k in eight_bit)
  for k in eight_bit:
    q, scale = lora_lib.quantize_kernel(before[k], "int8")  # from the parent's float32, not via bfloat16
    np.testing.assert_array_equal(after[k], q, err_msg=k)
    np.testing.assert_array_equal(after[k + "_scale"], scale, err_msg=k)
  adapters = {k: v for k, v in after.items() if "lora_" in k}
  assert {v.dtype for v in adapters.values()} == {jnp.dtype(jnp.float32)}
  assert any(np.abs(v).max() > 0 for k, v in adapters.items() if k.endswith("lora_b"))
  assert set(_paths(a.ema_params)) == set(adapters)  # no EMA of the frozen base
  # The adapters export as a LoRA file; merged, they sit on the dequantized kernels.
  exported = workdirs.export_lora_dir(str(tmp_path / "straight"), str(tmp_path / "lora"))
  assert exported["num_tensors"] == len(adapters)
  ema, _, _ = ckpt_lib.restore_ema(str(tmp_path / "straight"), jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
      a.params))
  merged = _paths(layers.merge_lora(jax.device_get(ema), layers.LoRA(4, 4.0, quantize_base="int8")))
  k = eight_bit[0]
  avg = _paths(a.averaged())
  want = (lora_lib.dequantize_kernel(after[k], after[k + "_scale"], jnp.float32)
          + avg[k.replace("/kernel", "/lora_a")] @ avg[k.replace("/kernel", "/lora_b")])  # alpha / rank = 1
  np.testing.assert_allclose(merged[k], want, rtol=1e-5, atol=1e-6)


def test_bfloat16_adam_moments_on_flux_lora():
  """optim.mu_dtype='bfloat16' on a Flux LoRA: Adam's first moment is bfloat16 for the
  adapters only (the frozen base has no optimizer state), and the updates match float32
  moments' to bfloat16 precision over a few steps."""
  import ml_collections

  cfg = dict(TINY_FLUX, param_dtype="bfloat16")
  x, t, cond = inputs(cfg, batch=2)
  model = models.build(cfg, lora=layers.LoRA(rank=2))
  params = perturb(nn.unbox(model.init(jax.random.key(0), x, t, **cond))["params"])
  w = jax.random.normal(jax.random.key(3), x.shape)
  # Jitted: op by op, each of Flux's small ops would be dispatched and compiled on its own.
  grad = jax.jit(jax.grad(lambda tr, fr: jnp.sum(w * model.apply({"params": optim.merge_trainable(tr, fr)}, x, t,
                                                                  **cond))))

  def run(mu_dtype):
    ocfg = ml_collections.ConfigDict(dict(lr=1e-3, schedule="constant", warmup_steps=0, end_lr_factor=0.0, b1=0.9,
                                          b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0, mu_dtype=mu_dtype,
                                          trainable=".*lora_.*"))
    tx = optim.make_optimizer(ocfg, 10)
    state = tx.init(params)
    p = params
    for _ in range(3):
      trainable, frozen = optim.split_trainable(p, ".*lora_.*")
      g = grad(trainable, frozen)
      updates, state = jax.jit(tx.update)(optim.merge_trainable(g, jax.tree.map(jnp.zeros_like, p)), state, p)
      p = jax.tree.map(lambda a, u: a + u.astype(a.dtype), p, updates)
    return p, state

  p16, s16 = run("bfloat16")
  p32, _ = run("")
  mu = [leaf for leaf in jax.tree.leaves(s16) if getattr(leaf, "ndim", 0) == 2]
  assert mu and {m.dtype for m in mu} >= {jnp.dtype(jnp.bfloat16)}
  n_adapter = sum(v.size for k, v in _paths(params).items() if "lora_" in k)
  assert sum(m.size for m in mu if m.dtype == jnp.bfloat16) == n_adapter
  a16, a32 = ({k: v for k, v in _paths(p).items() if "lora_b" in k} for p in (p16, p32))
  assert max(float(jnp.abs(v).max()) for v in a32.values()) > 1e-3
  chex.assert_trees_all_close(a16, a32, atol=3e-5, rtol=2e-2)


def test_lora_memory_counts_the_flux_dev_state_by_hand():
  """benchmarks/lora_memory.py's state bytes for Flux-dev (abstract shapes, nothing
  allocated) against hand arithmetic: rank-r adapters on the 12 projections of each of 19
  double blocks (8 of width D -> D, 4 of the MLP D <-> 4D) and the 5 of each of 38 single
  blocks (q, k, v, MLP in D -> 4D, out 5D -> D), float32; Adam's two moments (the first in
  bfloat16 with mu_dtype) and the EMA of the adapters only; an int8 base saves a byte per
  adapted kernel weight and adds a float32 scale per output channel."""
  lm = helpers.benchmark_module("lora_memory")
  d, r = 3072, 16
  adapters = r * d * (19 * (8 * 2 + 4 * 5) + 38 * (3 * 2 + 5 + 6))
  rows = {}
  for base, mu in (("bfloat16", ""), ("int8", ""), ("int8", "bfloat16")):
    config = lm.tune_config("flux-dev", 1024, 1, r, base, "full", mu)
    rows[base, mu] = lm._state_bytes(config, "flux-dev")
  bf16, int8, int8_mu16 = rows["bfloat16", ""], rows["int8", ""], rows["int8", "bfloat16"]
  assert bf16["adapters"] == int8["adapters"] == 4 * adapters
  assert bf16["ema"] == bf16["adapters"]
  assert bf16["optimizer"] == 2 * bf16["adapters"] + 8  # mu, nu and two int32 step counts
  assert int8_mu16["optimizer"] == 3 * adapters * 2 + 8
  kernels = d * d * (19 * 8 + 38 * 3) + 4 * d * d * (19 * 4 + 38) + 5 * d * d * 38  # adapted kernel weights
  scales = d * (19 * 10 + 38 * 4) + 4 * d * (19 * 2 + 38)  # their output channels
  assert int8["base"] == bf16["base"] - kernels + 4 * scales
  assert bf16["base"] == 2 * bf16["base_params"] and bf16["base_params"] > 11.8e9
