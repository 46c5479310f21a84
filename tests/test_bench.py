"""The benchmark's analytic FLOP count against XLA's own count of the compiled forward."""

import jax
import jax.numpy as jnp
import pytest

from jdiff.train import speed
from jdiff.train import flops as flops_lib
from jdiff import networks as networks_lib
from jdiff.train import optim

from helpers import benchmark_module
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
  networks = networks_lib.build_networks(config)
  batch = 2
  flops = flops_lib.model_flops(networks, batch, networks.seq_len())
  analytic = flops["denoiser_forward"] + flops["text_forward"]
  xla = xla_forward_flops(networks, batch)
  # XLA also counts normalisation, activations and softmax: a few percent on top of the matmuls.
  assert analytic <= xla <= 1.05 * analytic, (analytic, xla)
  assert flops["train_step"] == pytest.approx(3 * analytic)


def test_a_frozen_text_encoder_counts_forward_only():
  config = get_config("mmdit_256")
  networks = networks_lib.build_networks(config)
  assert optim.trains_text(networks, "") and optim.trains_text(networks, "text/.*")
  assert not optim.trains_text(networks, "denoiser/.*") and not optim.trains_text(networks, ".*lora_.*")
  full = flops_lib.model_flops(networks, 4, networks.seq_len())
  frozen = flops_lib.model_flops(networks, 4, networks.seq_len(), text_trainable=False)
  assert frozen["text_forward"] == full["text_forward"] > 0
  assert frozen["train_step"] == pytest.approx(3 * full["denoiser_forward"] + full["text_forward"])
  assert full["train_step"] - frozen["train_step"] == pytest.approx(2 * full["text_forward"])
  # bench counts what the run trains.
  config.optim.trainable = "denoiser/.*"
  r = speed.run(config, steps=1, warmup=0)  # no warm-up is allowed
  assert r["flops_per_step"] == pytest.approx(frozen["train_step"] * config.train.batch_size / 4)


def test_peak_table():
  assert speed.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert speed.peak_flops("TPU v5 lite", "bfloat16") == 197e12
  assert speed.peak_flops("cpu", "float32") is None


def test_run_reports_consistent_numbers_and_its_profile_summarises(tmp_path):
  """The benchmark's real train step on the tiny config: its derived fields agree with each
  other, with the analytic count, with XLA's count of the same step, and with the state
  size; the trace it takes afterwards is read back by benchmarks/profile_summary.py."""
  import flax.linen as nn
  config = get_config("mmdit_256")
  r = speed.run(config, steps=2, warmup=1, profile_dir=str(tmp_path))
  networks = networks_lib.build_networks(config)
  b = config.train.batch_size
  assert r["batch"] == b and r["image_tokens"] == networks.seq_len()
  assert r["images_per_s"] == pytest.approx(b / r["step_time_s"])
  assert r["tokens_per_s"] == pytest.approx(b * networks.seq_len() / r["step_time_s"])
  assert r["step_time_min_s"] <= r["step_time_s"]
  assert r["flops_per_step"] == flops_lib.model_flops(networks, b, networks.seq_len())["train_step"]
  # Without remat XLA counts the same matmuls plus elementwise work and the optimizer update.
  assert r["flops_per_step"] <= r["xla_flops_per_step"] <= 1.3 * r["flops_per_step"]
  params = jax.eval_shape(lambda: nn.unbox(networks.init_params(jax.random.key(0))))
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  assert r["peak_memory_bytes"] >= 4 * param_bytes  # params, EMA and Adam's two moments at least
  assert r["mfu"] is None  # no peak rate for CPUs
  # The trace: the summary finds the step's ops and maps them to their source layers.
  assert (tmp_path / "train_step.hlo.txt").exists()
  text = _profile_summary().summarize(str(tmp_path), top=200)
  assert "ms of op time per step" in text
  assert "x_mlp/fc1/dot_general" in text  # the MLP's matmul, mapped to its source through the HLO
  assert "bwd " in text and "fwd " in text


def test_run_rejects_frozen_objectives():
  config = get_config("mmdit_256")
  config.objective = "dpo"
  with pytest.raises(ValueError, match="flow objective"):
    speed.run(config, steps=1, warmup=0)


def _profile_summary():
  return benchmark_module("profile_summary")


def test_gpu_checks_row_specs():
  """benchmarks/gpu_checks.py rows: positional variant:batch[:remat[:attention]], then any
  section.field=value config overrides, applied to the config each row benchmarks."""
  gc = benchmark_module("gpu_checks")
  assert gc.row_overrides("d24:128") == {"model.variant": "d24", "train.batch_size": 128}
  assert gc.row_overrides("d24:128:dots_no_batch:cudnn:optim.mu_dtype=bfloat16:optim.lr=0.001") == {
      "model.variant": "d24", "train.batch_size": 128, "model.remat": "dots_no_batch", "model.attention": "cudnn",
      "optim.mu_dtype": "bfloat16", "optim.lr": 0.001}
  c = gc.config("test", overrides=gc.row_overrides("d2:4:none:optim.mu_dtype=bfloat16"))
  assert (c.model.variant, c.train.batch_size, c.model.remat, c.optim.mu_dtype) == ("d2", 4, "none", "bfloat16")
  assert c.model.patch_size == 2 and c.model.in_channels == 16  # SD3's latent geometry
  with pytest.raises(ValueError, match="expected variant:batch"):
    gc.row_overrides("d24")


def test_profile_summary_parses_hlo_instructions():
  ps = _profile_summary()
  hlo = "\n".join([
      '  %input_add_reduce_fusion.2 = (bf16[128,24,64]{2,1,0}, bf16[128,256,24,64]{3,2,1,0}) fusion(%a, %b), '
      'kind=kInput, calls=%fused_add_reduce.2, metadata={op_name="jit(train_step)/transpose(jvp(MMDiT))/'
      'while/body/blocks/x_qkv/k/reduce_sum"}',
      '  %custom-call.7 = (bf16[4096,1536]{1,0}, s8[0]{0}) custom-call(%p, %q), '
      'custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(train_step)/jvp(MMDiT)/blocks_3/x_mlp/fc1/dot_general"}',
      '  ROOT %loop_select_fusion = f32[23,1536]{1,0} fusion(%c), kind=kLoop, calls=%fs',
  ])
  ops = ps.parse_hlo(hlo)
  assert ops["input_add_reduce_fusion.2"][0] == "fusion:kInput"
  assert ops["custom-call.7"][0] == "matmul (cublas)"
  assert ops["loop_select_fusion"] == ("fusion:kLoop", "")
  assert ps._source_key(ops["input_add_reduce_fusion.2"][1]) == "bwd MMDiT/blocks/x_qkv/k/reduce_sum"
  assert ps._source_key(ops["custom-call.7"][1]) == "fwd MMDiT/blocks/x_mlp/fc1/dot_general"
  # GPU kernels: fusions by their HLO name with '_' for '.', library kernels by prefix.
  ops.update({ps._kernel_name(k): v for k, v in ops.items()})
  assert ps._classify("input_add_reduce_fusion_2", ops)[0] == "fusion:kInput"
  assert ps._classify("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_TNN", ops)[0] == "matmul (cublas)"
  assert ps._classify("cudnn_generated_fort_native_sdpa", ops)[0] == "attention (cudnn)"


def _traced_matmul_flops(gc, config):
  """(all matmul FLOPs, weight-GEMM FLOPs) of the config's traced train step."""
  counts = gc.collect_matmuls(gc.step_jaxpr(config)[0])
  total = sum(op.flops * n for op, n in counts.items())
  return total, total - sum(op.flops * n for op, n in counts.items() if op.batched)


@pytest.mark.parametrize("name", ["mmdit_256", "dit_256"])
def test_analytic_flops_match_an_exact_count_of_the_traced_steps_matmuls(name):
  """benchmarks/gemm_ceiling.py counts every dot and convolution of the traced train step
  (scan bodies times their length). Without remat that count is the analytic formula's
  (within the word-pooling product, which the formula leaves out, and the input
  gradients of the first layers, which training never computes); scanned and unrolled
  blocks give the same count; under dots_no_batch the weight GEMMs are not run again
  (their outputs are saved) while the attention products are."""
  gc = benchmark_module("gemm_ceiling")
  base = dict(model__depth=3, model__width=128, model__num_heads=2, model__patch_size=2, data__resolution=16)
  counts = {}
  for scan, remat in ((False, "none"), (True, "none"), (True, "dots_no_batch")):
    config = get_config(name, model__dtype="float32", model__attention="xla", model__scan=scan, model__remat=remat,
                        **base)
    counts[scan, remat] = _traced_matmul_flops(gc, config)
  networks = networks_lib.build_networks(config)
  analytic = flops_lib.model_flops(networks, config.train.batch_size, networks.seq_len())["train_step"]
  total, gemms = counts[False, "none"]
  assert 0.985 * analytic <= total <= 1.015 * analytic, (total, analytic)
  assert counts[True, "none"] == pytest.approx((total, gemms), rel=1e-9)
  remat_total, remat_gemms = counts[True, "dots_no_batch"]
  assert remat_gemms == pytest.approx(gemms, rel=1e-9)
  assert remat_total > total  # attention's batched products are recomputed


def test_gemm_ceiling_times_every_matmul_and_sums_consistently():
  gc = benchmark_module("gemm_ceiling")
  config = get_config("mmdit_256")
  s = gc.measure(config, reps=2, top=5)
  networks = networks_lib.build_networks(config)
  assert s["train_flops"] == flops_lib.model_flops(networks, config.train.batch_size, networks.seq_len())["train_step"]
  assert s["gemm_flops_per_s"] == pytest.approx(s["gemm_flops"] / s["gemm_time_s"])
  # Everything the analytic count covers is a weight GEMM or an attention product.
  assert s["gemm_flops"] + s["batched_dot_flops"] == pytest.approx(s["train_flops"], rel=0.02)
  assert s["distinct_gemms"] > 10 and s["gemm_time_s"] > 0 and s["batched_dot_time_s"] > 0
  assert s["mfu_ceiling"] is None  # no peak rate for CPUs
