"""SD3 / SD3.5 parity: diffusers' SD3Transformer2DModel against jdiff's MMDiT with converted
weights, in float32 on CPU; and lossless import/export."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel

from jdiff.interop import lora_files, mapping, sd3
from jdiff.models import layers, mmdit

import helpers

TINY = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
            caption_projection_dim=32, pooled_projection_dim=20, pos_embed_max_size=12)
VARIANTS = {
    "sd3": dict(qk_norm=None, dual_attention_layers=()),
    "sd3.5-large": dict(qk_norm="rms_norm", dual_attention_layers=()),
    "sd3.5-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
    "dual-everywhere": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1, 2)),
}


def reference(variant, seed=0):
  """A tiny diffusers SD3 transformer with every tensor random: PyTorch's default init for
  the linear layers (nothing zero, unlike jdiff's adaLN-Zero init) and random norm scales."""
  torch.manual_seed(seed)
  model = SD3Transformer2DModel(**TINY, **VARIANTS[variant]).eval()
  return helpers.randomize_norms(model)


state_dict = helpers.torch_state_dict


def torch_forward(model, x, t, context, pooled):
  with torch.no_grad():
    out = model(hidden_states=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                encoder_hidden_states=torch.from_numpy(context), pooled_projections=torch.from_numpy(pooled),
                timestep=torch.from_numpy(t * 1000.0), return_dict=False)[0]
  return out.numpy().transpose(0, 2, 3, 1)


def inputs(size, batch=2, text_len=5, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((batch, *size, TINY["in_channels"]), np.float32),
          rng.uniform(size=batch).astype(np.float32),
          rng.standard_normal((batch, text_len, TINY["joint_attention_dim"]), np.float32),
          rng.standard_normal((batch, TINY["pooled_projection_dim"]), np.float32))


def jdiff_forward(config, params, x, t, context, pooled, scan=False):
  kwargs = sd3.model_kwargs(config)
  model = mmdit.MMDiT(**kwargs, scan=scan, attention="xla")
  params = sd3.scan_layout(jax.tree.map(jnp.asarray, params), kwargs, scan)
  return np.asarray(model.apply({"params": params}, x, t, context=context, pooled=pooled))


assert_parity = helpers.assert_parity


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sd3_forward_matches_diffusers(variant):
  ref_model = reference(variant)
  config = dict(ref_model.config)
  params = sd3.to_jdiff(config, state_dict(ref_model))
  # The training resolution and a smaller, non-square one, from the same weights.
  for size in [(8, 8), (4, 6)]:
    args = inputs(size)
    assert_parity(jdiff_forward(config, params, *args), torch_forward(ref_model, *args))


def test_sd3_scanned_layout_matches_unrolled():
  ref_model = reference("sd3.5-medium")
  config = dict(ref_model.config)
  params = sd3.to_jdiff(config, state_dict(ref_model))
  args = inputs((8, 8))
  np.testing.assert_allclose(jdiff_forward(config, params, *args, scan=True),
                             jdiff_forward(config, params, *args), atol=1e-5)
  kwargs = sd3.model_kwargs(config)
  back = sd3.unrolled_layout(sd3.scan_layout(jax.tree.map(jnp.asarray, params), kwargs, True))
  jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("variant", ["sd3", "sd3.5-medium"])
def test_sd3_import_export_is_lossless(variant):
  sd = state_dict(reference(variant))
  config = sd3.diffusers_config(sd3.model_kwargs(dict(reference(variant).config)))
  back = sd3.to_diffusers(config, sd3.to_jdiff(config, sd))
  assert set(back) == set(sd)
  for key in sd:
    assert back[key].dtype == sd[key].dtype and back[key].shape == sd[key].shape, key
    np.testing.assert_array_equal(back[key], sd[key], err_msg=key)


def test_sd3_exported_directory_loads_in_diffusers(tmp_path):
  """jdiff params -> diffusers directory -> SD3Transformer2DModel.from_pretrained: same output."""
  ref_model = reference("sd3.5-medium", seed=3)
  config = dict(ref_model.config)
  params = sd3.to_jdiff(config, state_dict(ref_model))
  export_config = sd3.diffusers_config(sd3.model_kwargs(config))
  mapping.save_safetensors(sd3.to_diffusers(export_config, params), str(tmp_path), export_config)
  loaded = SD3Transformer2DModel.from_pretrained(str(tmp_path)).eval()
  args = inputs((8, 8), seed=5)
  assert_parity(jdiff_forward(config, params, *args), torch_forward(loaded, *args))
  # And the directory reads back through jdiff's own loader, bit for bit.
  again = sd3.to_jdiff(mapping.read_config(str(tmp_path)), mapping.load_safetensors(str(tmp_path)))
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_a_from_scratch_mmdit_exports_with_its_position_grid(tmp_path):
  """A jdiff MMDiT trained from scratch has no pos_embed_base_size (unit-spaced positions).
  It exports as sample_size = pos_embed_max_size * patch_size, whose diffusers table is the
  same grid: the loaded transformer gives jdiff's outputs."""
  ref_model = reference("sd3.5-large", seed=4)
  params = sd3.to_jdiff(dict(ref_model.config), state_dict(ref_model))
  kwargs = dict(sd3.model_kwargs(dict(ref_model.config)), pos_embed_base_size=None)
  export_config = sd3.diffusers_config(kwargs)
  assert export_config["sample_size"] == TINY["pos_embed_max_size"] * TINY["patch_size"]
  mapping.save_safetensors(sd3.to_diffusers(export_config, params), str(tmp_path), export_config)
  loaded = SD3Transformer2DModel.from_pretrained(str(tmp_path)).eval()
  x, t, context, pooled = inputs((8, 8), seed=6)
  ours = mmdit.MMDiT(**kwargs, attention="xla").apply({"params": jax.tree.map(jnp.asarray, params)}, x, t,
                                                      context=context, pooled=pooled)
  assert_parity(np.asarray(ours), torch_forward(loaded, x, t, context, pooled))


def test_sd3_mismatched_weights_fail_with_the_keys_named():
  ref_model = reference("sd3")
  sd = state_dict(ref_model)
  wrong = dict(ref_model.config, qk_norm="rms_norm")  # config says QK norm, weights have none
  with pytest.raises(ValueError, match="missing .*norm_q"):
    sd3.to_jdiff(wrong, sd)
  with pytest.raises(ValueError, match="dual_attention_layers"):
    sd3.model_kwargs(dict(ref_model.config, dual_attention_layers=(1, 2)))


def test_lora_export_in_diffusers_naming_loads_and_matches_the_adapted_forward():
  """lora_files' PEFT-format state dict, loaded by diffusers (load_lora_adapter,
  via peft) into the reference model, gives jdiff's adapted forward."""
  ref = reference("sd3.5-medium")
  config = dict(ref.config)
  kwargs = sd3.model_kwargs(config)
  x, t, context, pooled = inputs((8, 8))
  spec = layers.LoRA(rank=4, alpha=2.0)
  model = mmdit.MMDiT(**kwargs, attention="xla", lora=spec)
  fresh = nn.unbox(model.init(jax.random.key(0), x, t, context=context, pooled=pooled)["params"])
  adapters = {p: np.asarray(v) for p, v in mapping._flatten(fresh) if p[-1].startswith("lora_")}
  keys = jax.random.split(jax.random.key(1), len(adapters))
  params = sd3.to_jdiff(config, state_dict(ref))
  for (path, value), k in zip(adapters.items(), keys):  # B is zero at init: make every adapter matter
    node = params
    for part in path[:-1]:
      node = node[part]
    node[path[-1]] = value if path[-1] == "lora_a" else np.asarray(0.1 * jax.random.normal(k, value.shape))
  ours = np.asarray(model.apply({"params": params}, x, t, context=context, pooled=pooled))
  plain = jdiff_forward(config, params, x, t, context, pooled)  # a plain model: adapters unused
  tensors = lora_files.to_peft(lora_files.adapters_from_params(sd3.rules(kwargs), params, spec.scale))
  assert len(tensors) == len(adapters) and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in tensors)
  assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in tensors
  ref.load_lora_adapter({k: torch.from_numpy(v) for k, v in tensors.items()}, prefix="transformer")
  theirs = torch_forward(ref, x, t, context, pooled)
  helpers.assert_parity(ours, theirs)
  assert np.abs(ours - plain).max() > 1e-2 * np.abs(plain).max()  # the adapters changed the output
