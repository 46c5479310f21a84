"""The benchmark's analytic FLOP count against XLA's own count of the compiled forward."""

import jax
import jax.numpy as jnp
import pytest

from jdiff import bench
from jdiff.train import state as state_lib

from test_train import get_config


def xla_forward_flops(networks, batch):
  params = jax.eval_shape(lambda: networks.init_params(jax.random.key(0)))
  params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.tree.map(lambda b: b.value if hasattr(b, "value") else b,
                                                                            params, is_leaf=lambda b: hasattr(b, "value")))
  res = networks.resolution
  x = jnp.zeros((batch, res, res, networks.channels))
  tokens = jnp.zeros((batch, networks.max_len), jnp.int32)

  def fwd(p):
    cond = networks.encode(p["text"], tokens)
    return networks.predict(p["denoiser"], x, jnp.zeros((batch,)), cond)

  cost = jax.jit(fwd).lower(params).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


@pytest.mark.parametrize("name,overrides", [
    ("mmdit_256", dict(model__depth=3, model__width=256, model__num_heads=4, model__patch_size=2,
                       data__resolution=16, text__width=256, text__num_heads=4, model__scan=False)),
    ("dit_256", dict(model__depth=2, model__width=256, model__num_heads=4, model__patch_size=2, data__resolution=16,
                     text__width=256, text__num_heads=4, model__scan=False)),
])
def test_analytic_flops_match_xla_within_elementwise_overhead(name, overrides):
  config = get_config(name, model__dtype="float32", model__attention="xla", **overrides)
  networks = state_lib.build_networks(config)
  batch = 2
  flops = bench.model_flops(networks, batch, networks.seq_len())
  analytic = flops["denoiser_forward"] + flops["text_forward"]
  xla = xla_forward_flops(networks, batch)
  # XLA also counts normalisation, activations and softmax: a few percent on top of the matmuls.
  assert analytic <= xla <= 1.05 * analytic, (analytic, xla)
  assert flops["train_step"] == pytest.approx(3 * analytic)


def test_peak_table():
  assert bench.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert bench.peak_flops("TPU v5 lite", "bfloat16") == 197e12
  assert bench.peak_flops("cpu", "float32") is None


def test_run_reports_consistent_numbers():
  """The benchmark's real train step on the tiny config: its derived fields agree with each
  other, with the analytic count, with XLA's count of the same step, and with the state size."""
  import flax.linen as nn
  config = get_config("mmdit_256")
  r = bench.run(config, steps=2, warmup=1)
  networks = state_lib.build_networks(config)
  b = config.train.batch_size
  assert r["batch"] == b and r["image_tokens"] == networks.seq_len()
  assert r["images_per_s"] == pytest.approx(b / r["step_time_s"])
  assert r["tokens_per_s"] == pytest.approx(b * networks.seq_len() / r["step_time_s"])
  assert r["step_time_min_s"] <= r["step_time_s"]
  assert r["flops_per_step"] == bench.model_flops(networks, b, networks.seq_len())["train_step"]
  # Without remat XLA counts the same matmuls plus elementwise work and the optimizer update.
  assert r["flops_per_step"] <= r["xla_flops_per_step"] <= 1.3 * r["flops_per_step"]
  params = jax.eval_shape(lambda: nn.unbox(networks.init_params(jax.random.key(0))))
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  assert r["peak_memory_bytes"] >= 4 * param_bytes  # params, EMA and Adam's two moments at least
  assert r["mfu"] is None  # no peak rate for CPUs


def test_run_rejects_frozen_objectives():
  config = get_config("mmdit_256")
  config.objective = "dpo"
  with pytest.raises(ValueError, match="flow objective"):
    bench.run(config, steps=1, warmup=0)
