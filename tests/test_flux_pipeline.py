"""Flux pipelines end to end on a tiny random one written by diffusers (tests/flux_fixture.py):
Flux's text recipe against FluxPipeline.encode_prompt, the import of a pipeline directory,
the latent cache, LoRA training with the guidance input, and the files diffusers loads."""

import json
import os

import numpy as np
import pytest
import torch

from jdiff.workdir import run_config
from jdiff.interop import sd3_pipeline

import flux_fixture
import helpers

PROMPTS = ["a small red circle in the center", "a large blue square on the left", ""]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("flux_pipeline"))
  flux_fixture.make_pipeline(path, seed=3)
  return path


def test_flux_text_recipe_matches_diffusers_encode_prompt(pipeline_dir):
  """context = T5 last hidden states at max_sequence_length tokens, pooled = CLIP-L's pooled
  output, as FluxPipeline.encode_prompt computes them (its text ids are zeros)."""
  from diffusers import FluxPipeline

  pipe = FluxPipeline.from_pretrained(pipeline_dir)
  with torch.no_grad():
    context, pooled, text_ids = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=flux_fixture.T5_LEN)
  ours = sd3_pipeline.load_text_encoder("flux", pipeline_dir, flux_fixture.T5_LEN).encode(PROMPTS)
  assert ours["context"].shape == (3, flux_fixture.T5_LEN, 32) and ours["pooled"].shape == (3, 8)
  helpers.assert_parity(ours["context"], context.numpy())
  helpers.assert_parity(ours["pooled"], pooled.numpy())
  assert not text_ids.numpy().any()


def last_json(proc):
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.heavy
def test_flux_lora_tune_end_to_end(pipeline_dir, tmp_path):
  """README's worked example as a user runs it: import the Flux-dev pipeline -> cache a
  folder of captioned images (Flux's text recipe and VAE latents) -> LoRA tune a few steps (guidance input 1, Flux's shift) -> export the adapters in
  both namings and the merged pipeline -> diffusers loads each and reproduces jdiff's tuned
  transformer."""
  import jax
  import safetensors.numpy
  from diffusers import FluxPipeline

  from jdiff import inference
  from jdiff.interop import flux, lora_files
  from jdiff.models import flux as flux_model
  import test_interop_flux as tflux

  base, cache, tuned = (str(tmp_path / n) for n in ("base", "cache", "tuned"))
  helpers.cli("jdiff.convert", "import", f"--src={pipeline_dir}", f"--workdir={base}")
  config = run_config.load(base)
  assert config.model.name == "flux" and config.model.guidance_embed and config.text.encoder == "flux"
  assert config.text.t5_len == 512 and config.autoencoder.path == os.path.abspath(pipeline_dir)
  assert dict(config.diffusion.shift) == dict(config.diffusion.shift, kind="flux", base_seq_len=256,
                                              max_seq_len=4096, base_shift=0.5, max_shift=1.15)
  cfg = ["--config=configs/flux_tune.py:test", f"--config.init_from={base}",
         f"--config.text.t5_len={flux_fixture.T5_LEN}"]
  images = tmp_path / "my_images"  # README's worked example: a folder of images with captions beside them
  images.mkdir()
  from PIL import Image
  from jdiff.data import shapes
  for i in range(8):
    scene, caption = shapes.scene_for(0, "train", i)
    Image.fromarray(shapes.render(scene, 32)).save(images / f"{i}.png")
    (images / f"{i}.txt").write_text(caption)
  meta = last_json(helpers.cli("jdiff.cache", *cfg, "--config.data.source=folder", f"--config.data.path={images}",
                               f"--out={cache}", "--batch_size=4"))
  assert meta["num_records"] == 8
  assert meta["latent_shape"] == [8, 8, 16] and meta["context_shape"] == [flux_fixture.T5_LEN, 32]
  assert meta["pooled_dim"] == 8
  summary = last_json(helpers.cli("jdiff.main", *cfg, f"--config.data.cache_dir={cache}", f"--workdir={tuned}",
                                  "--config.model.dtype=float32"))
  assert summary["step"] == 3 and np.isfinite(summary["loss"])
  model = inference.load(tuned)
  assert model.config.diffusion.shift.kind == "flux" and model.networks.lora.rank == 2

  # jdiff's tuned transformer (EMA params with their adapters), in float32.
  kwargs = flux.model_kwargs(dict(FluxPipeline.from_pretrained(pipeline_dir).transformer.config))
  net = flux_model.Flux(**kwargs, attention="xla", lora=model.networks.lora)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), model.params["denoiser"])
  a = tflux.inputs((8, 8), seed=5)
  a = dict(a, x=np.concatenate([a["x"]] * 4, -1), context=np.random.default_rng(1).standard_normal(
      (2, 5, 32)).astype(np.float32), pooled=np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32))
  ours = np.asarray(net.apply({"params": params}, a["x"], a["t"], context=a["context"], pooled=a["pooled"],
                              guidance=a["guidance"]))
  lora = [k for k, _ in jax.tree_util.tree_flatten_with_path(params)[0] if "lora_b" in jax.tree_util.keystr(k)]
  assert lora  # the adapters trained: B left zero
  assert any(np.abs(v).max() > 0 for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
             if "lora_b" in jax.tree_util.keystr(p))

  for naming in lora_files.NAMINGS:
    out = last_json(helpers.cli("jdiff.convert", "export_lora", f"--workdir={tuned}", f"--out={tmp_path / naming}",
                                f"--naming={naming}"))
    pipe = FluxPipeline.from_pretrained(pipeline_dir)
    tensors = safetensors.numpy.load_file(out["file"])
    if naming == "kohya":  # diffusers sizes kohya's single-block linear1 for the 12B model only
      assert any("_linear1." in k for k in tensors)
      tensors = {k: v for k, v in tensors.items() if "_linear1." not in k}
      pipe.load_lora_weights({k: torch.from_numpy(v) for k, v in tensors.items()})
      off = jax.tree.map(lambda x: x, params)
      for i in range(kwargs["single_depth"]):
        for node in (*off[f"single_blocks_{i}"]["qkv"].values(), off[f"single_blocks_{i}"]["mlp_in"]):
          if "lora_b" in node:
            node["lora_b"] = np.zeros_like(node["lora_b"])
      want = np.asarray(net.apply({"params": off}, a["x"], a["t"], context=a["context"], pooled=a["pooled"],
                                  guidance=a["guidance"]))
    else:
      pipe.load_lora_weights(str(tmp_path / naming))
      want = ours
    helpers.assert_parity(want, tflux.torch_forward(pipe.transformer.eval(), a))

  exported = last_json(helpers.cli("jdiff.convert", "export", f"--workdir={tuned}", f"--out={tmp_path / 'export'}"))
  assert exported["pipeline"] == str(tmp_path / "export")
  pipe = FluxPipeline.from_pretrained(str(tmp_path / "export"))
  helpers.assert_parity(ours, tflux.torch_forward(pipe.transformer.eval(), a))


def test_flow_loss_feeds_the_configured_guidance_input():
  """A guidance-embedded model under the flow loss gets diffusion.guidance as its guidance
  input: the loss equals one computed with that input given by hand, and another value gives
  another loss."""
  import jax
  import jax.numpy as jnp
  import flax.linen as nn

  from jdiff import diffusion
  from jdiff import networks as networks_lib
  from jdiff.train import objectives
  import test_train

  config = test_train.get_config(data__caption_dropout=0.0)
  with config.unlocked():
    config.model.update(name="flux", variant="schnell", depth=1, single_depth=1, width=32, num_heads=2,
                        axes_dims=(4, 6, 6), guidance_embed=True, patch_size=2, pos_embed_max_size=0)
  networks = networks_lib.build_networks(config)
  params = nn.unbox(jax.jit(networks.init_params)(jax.random.key(0)))
  rng = np.random.default_rng(0)
  # Every weight random: at init the zeroed output layers would hide the guidance input.
  params = jax.tree.map(lambda p: jnp.asarray(0.2 * rng.standard_normal(p.shape), p.dtype), params)
  res = config.data.resolution
  batch = dict(image=rng.integers(0, 256, (3, res, res, 3), np.uint8),
               tokens=np.stack([np.arange(config.text.max_len) % 50 + 3] * 3).astype(np.int32))
  keys = jax.random.split(jax.random.key(1), 3)

  def loss(guidance):
    with config.unlocked():
      config.diffusion.guidance = guidance
    return np.asarray(objectives.flow_loss(params, batch, keys, None, networks=networks, config=config,
                                           frozen=None)[0])

  n = objectives.noised(batch, keys, networks, config)
  cond = dict(networks.conditioning(params, n.inputs), guidance=jnp.full((3,), 2.5))
  by_hand = diffusion.flow_loss(networks.predict(params["denoiser"], n.x_t, n.t, cond), n.x0, n.eps, n.t,
                                prediction=config.diffusion.prediction, weighting=config.diffusion.weighting)
  np.testing.assert_allclose(loss(2.5), np.asarray(by_hand), rtol=1e-6)
  assert np.abs(loss(2.5) - loss(1.0)).max() > 1e-6 * np.abs(loss(1.0)).max()


def test_a_schnell_pipeline_imports_without_guidance(tmp_path):
  """Flux-schnell (no guidance embedding): the import sets diffusers' 256 T5 tokens and a
  model without the guidance input."""
  from jdiff.hf import workdirs

  flux_fixture.make_pipeline(str(tmp_path / "schnell"), seed=4, guidance=False)
  config = workdirs.import_dir(str(tmp_path / "schnell"), str(tmp_path / "base"))
  assert config.model.name == "flux" and not config.model.guidance_embed
  assert config.text.encoder == "flux" and config.text.t5_len == 256 and config.diffusion.shift.kind == "flux"


def test_true_cfg_guides_a_guidance_embedded_model():
  """sample.true_cfg_scale: for a guidance-embedded model, v = v_u + s (v_c - v_u) where both
  forwards get the guidance input cfg_scale; s = 1 is the one-forward embedded velocity; a
  model without the embedding ignores it."""
  import jax
  import jax.numpy as jnp
  import flax.linen as nn

  from jdiff import inference
  from jdiff import networks as networks_lib
  import test_train

  config = test_train.get_config()
  with config.unlocked():
    config.model.update(name="flux", variant="schnell", depth=1, single_depth=1, width=32, num_heads=2,
                        axes_dims=(4, 6, 6), guidance_embed=True, patch_size=2, pos_embed_max_size=0)
  networks = networks_lib.build_networks(config)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: jnp.asarray(0.2 * rng.standard_normal(p.shape), p.dtype),
                        nn.unbox(jax.jit(networks.init_params)(jax.random.key(0))))
  inputs = dict(tokens=jnp.asarray(np.stack([np.arange(config.text.max_len) % 50 + 3] * 2), jnp.int32))
  nulls = {k: jnp.asarray(np.stack([v] * 2)) for k, v in networks.null_inputs().items()}
  res = config.data.resolution
  x = jnp.asarray(rng.standard_normal((2, res, res, 3)), jnp.float32)
  t = jnp.asarray([0.3, 0.7], jnp.float32)

  def raw(inp, w):
    cond = dict(networks.conditioning(params, inp), guidance=jnp.full((2,), w))
    return networks.predict(params["denoiser"], x, t, cond)

  v = lambda s: inference.guided_velocity(networks, params, inputs, nulls, 3.5, "v", s)(x, t)
  want = raw(nulls, 3.5) + 2.0 * (raw(inputs, 3.5) - raw(nulls, 3.5))
  np.testing.assert_allclose(v(2.0), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(v(1.0), raw(inputs, 3.5), rtol=1e-6, atol=1e-6)
  assert inference.forwards_per_image(networks, 10, 3.5, "euler", 2.0) == 20
  assert inference.forwards_per_image(networks, 10, 3.5, "euler") == 10
