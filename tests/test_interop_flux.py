"""Flux parity: diffusers' FluxTransformer2DModel (fed by its pipeline's packing and ids)
against jdiff's Flux with converted weights, in float32 on CPU; and lossless import/export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from jdiff.interop import flux, mapping
from jdiff.models import flux as flux_model

import helpers

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20,
            axes_dims_rope=(4, 6, 6))


def reference(guidance, seed=0):
  """A tiny diffusers Flux with PyTorch's default init and random norm scales."""
  torch.manual_seed(seed)
  model = FluxTransformer2DModel(**TINY, guidance_embeds=guidance).eval()
  return helpers.randomize_norms(model)


state_dict = helpers.torch_state_dict


def inputs(size, batch=2, text_len=5, seed=0):
  rng = np.random.default_rng(seed)
  return dict(x=rng.standard_normal((batch, *size, 4), np.float32), t=rng.uniform(size=batch).astype(np.float32),
              context=rng.standard_normal((batch, text_len, 24), np.float32),
              pooled=rng.standard_normal((batch, 20), np.float32),
              guidance=rng.uniform(1.0, 5.0, size=batch).astype(np.float32))


def torch_forward(model, a):
  b, h, w, c = a["x"].shape
  latents = torch.from_numpy(a["x"].transpose(0, 3, 1, 2).copy())
  packed = FluxPipeline._pack_latents(latents, b, c, h, w)
  img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
  txt_ids = torch.zeros(a["context"].shape[1], 3)
  kwargs = dict(guidance=torch.from_numpy(a["guidance"])) if model.config.guidance_embeds else {}
  with torch.no_grad():
    out = model(hidden_states=packed, encoder_hidden_states=torch.from_numpy(a["context"]),
                pooled_projections=torch.from_numpy(a["pooled"]), timestep=torch.from_numpy(a["t"]),
                img_ids=img_ids, txt_ids=txt_ids, return_dict=False, **kwargs)[0]
  vae_scale = 8  # _unpack_latents takes pixel sizes
  return FluxPipeline._unpack_latents(out, h * vae_scale, w * vae_scale, vae_scale).numpy().transpose(0, 2, 3, 1)


def jdiff_forward(config, params, a, scan=False):
  kwargs = flux.model_kwargs(config)
  model = flux_model.Flux(**kwargs, scan=scan, attention="xla")
  params = flux.scan_layout(jax.tree.map(jnp.asarray, params), kwargs, scan)
  guidance = a["guidance"] if kwargs["guidance_embed"] else None
  return np.asarray(model.apply({"params": params}, a["x"], a["t"], context=a["context"], pooled=a["pooled"],
                                guidance=guidance))


assert_parity = helpers.assert_parity


@pytest.mark.parametrize("guidance", [False, True], ids=["schnell-like", "dev-like"])
def test_flux_forward_matches_diffusers(guidance):
  ref_model = reference(guidance)
  config = dict(ref_model.config)
  params = flux.to_jdiff(config, state_dict(ref_model))
  for size in [(8, 8), (4, 6)]:
    a = inputs(size)
    assert_parity(jdiff_forward(config, params, a), torch_forward(ref_model, a))


def test_flux_scanned_matches_unrolled_and_layouts_round_trip():
  ref_model = reference(True)
  config = dict(ref_model.config)
  params = flux.to_jdiff(config, state_dict(ref_model))
  a = inputs((8, 8))
  np.testing.assert_allclose(jdiff_forward(config, params, a, scan=True), jdiff_forward(config, params, a),
                             atol=1e-5)
  kwargs = flux.model_kwargs(config)
  back = flux.unrolled_layout(flux.scan_layout(jax.tree.map(jnp.asarray, params), kwargs, True))
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_flux_import_export_is_lossless_and_loads_in_diffusers(tmp_path):
  ref_model = reference(True, seed=2)
  sd = state_dict(ref_model)
  config = flux.diffusers_config(flux.model_kwargs(dict(ref_model.config)))
  params = flux.to_jdiff(config, sd)
  back = flux.to_diffusers(config, params)
  assert set(back) == set(sd)
  for key in sd:
    assert back[key].dtype == sd[key].dtype and back[key].shape == sd[key].shape, key
    np.testing.assert_array_equal(back[key], sd[key], err_msg=key)
  mapping.save_safetensors(back, str(tmp_path), config)
  loaded = FluxTransformer2DModel.from_pretrained(str(tmp_path)).eval()
  a = inputs((8, 8), seed=4)
  assert_parity(jdiff_forward(config, params, a), torch_forward(loaded, a))


def test_flux_guidance_is_required_when_embedded():
  ref_model = reference(True)
  config = dict(ref_model.config)
  kwargs = flux.model_kwargs(config)
  a = inputs((4, 4))
  with pytest.raises(ValueError, match="guidance"):
    flux_model.Flux(**kwargs).apply({"params": flux.to_jdiff(config, state_dict(ref_model))}, a["x"], a["t"],
                                    context=a["context"], pooled=a["pooled"])
