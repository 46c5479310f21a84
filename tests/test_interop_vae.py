"""AutoencoderKL parity: diffusers' AutoencoderKL against jdiff's, encode and decode, for
SD-style (4-channel, quant convs) and SD3/Flux-style (16-channel, no quant convs) VAEs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from jdiff.interop import mapping
from jdiff.interop import vae as vae_io
from jdiff.models import vae

import helpers

CASES = {
    "sd": dict(latent_channels=4, block_out_channels=(8, 16), scaling_factor=0.18215),
    "sd3": dict(latent_channels=16, block_out_channels=(8, 16, 16), use_quant_conv=False, use_post_quant_conv=False,
                scaling_factor=1.5305, shift_factor=0.0609),
}


def reference(case, seed=0):
  torch.manual_seed(seed)
  c = CASES[case]
  model = AutoencoderKL(in_channels=3, out_channels=3, layers_per_block=1, norm_num_groups=4, sample_size=16,
                        down_block_types=("DownEncoderBlock2D",) * len(c["block_out_channels"]),
                        up_block_types=("UpDecoderBlock2D",) * len(c["block_out_channels"]), **c).eval()
  return helpers.randomize_norms(model)


state_dict = helpers.torch_state_dict


assert_parity = helpers.assert_parity


nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
nhwc = lambda x: x.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("case", list(CASES))
def test_vae_encode_decode_match_diffusers(case):
  ref = reference(case)
  config = dict(ref.config)
  kwargs = vae_io.model_kwargs(config)
  model = vae.AutoencoderKL(**kwargs)
  params = {"params": jax.tree.map(jnp.asarray, vae_io.to_jdiff(config, state_dict(ref)))}
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, size=(2, 16, 24, 3)).astype(np.float32)  # non-square
  mean, logvar = model.apply(params, jnp.asarray(x), method=model.encode)
  with torch.no_grad():
    dist = ref.encode(nchw(x)).latent_dist
  factor = 2 ** (len(kwargs["channels"]) - 1)
  assert mean.shape == (2, 16 // factor, 24 // factor, kwargs["latent_channels"])
  assert_parity(mean, nhwc(dist.mean))
  assert_parity(logvar, nhwc(dist.logvar))
  z = rng.standard_normal(mean.shape).astype(np.float32)
  with torch.no_grad():
    decoded = ref.decode(nchw(z)).sample
  assert_parity(model.apply(params, jnp.asarray(z), method=model.decode), nhwc(decoded))
  # Scaling as the SD3/Flux pipelines apply it.
  latents = model.apply(params, mean, method=model.to_latents)
  expected = (nhwc(dist.mean) - (ref.config.shift_factor or 0.0)) * ref.config.scaling_factor
  np.testing.assert_allclose(latents, expected, atol=1e-4 * np.abs(expected).max())
  np.testing.assert_allclose(model.apply(params, latents, method=model.from_latents), mean, atol=1e-5)


def test_vae_import_export_is_lossless_and_loads_in_diffusers(tmp_path):
  ref = reference("sd3", seed=1)
  sd = state_dict(ref)
  config = dict(ref.config)
  back = vae_io.to_diffusers(config, vae_io.to_jdiff(config, sd))
  assert set(back) == set(sd)
  for key in sd:
    np.testing.assert_array_equal(back[key], sd[key], err_msg=key)
  ref.save_config(tmp_path)
  mapping.save_safetensors(back, str(tmp_path), mapping.read_config(str(tmp_path)))
  loaded = AutoencoderKL.from_pretrained(tmp_path)
  for key, value in state_dict(loaded).items():
    np.testing.assert_array_equal(value, sd[key], err_msg=key)
