"""The fine-tune path end to end, as a user runs it, on a tiny random SD3 pipeline:
import -> cache -> tune a few steps -> export -> diffusers loads the export and its
transformer gives jdiff's outputs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import torch

from jdiff.workdir import checkpoint as ckpt_lib
from jdiff import inference
from jdiff.workdir import run_config
from jdiff.interop import mapping, sd3, sd3_pipeline
from jdiff.models import mmdit

import helpers
import sd3_fixture


def last_json(proc):
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("sd3_pipeline"))
  sd3_fixture.make_pipeline(path, seed=7)
  return path


def test_import_matches_the_source_weights(pipeline_dir, tmp_path):
  work = str(tmp_path / "base")
  helpers.cli("jdiff.convert", "import", f"--src={pipeline_dir}", f"--workdir={work}")
  config = run_config.load(work)
  assert config.model.name == "mmdit" and config.model.dual_attention_depth == 1
  assert config.text.encoder == "sd3" and config.diffusion.shift.kind == "fixed"
  assert config.diffusion.shift.shift == 3.0
  _, kwargs, params = sd3_pipeline.load_transformer(pipeline_dir)
  abstract = lambda scan: jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), sd3.scan_layout(params, kwargs, scan))
  restored, lineage, step = ckpt_lib.restore_ema(work, {"denoiser": abstract(config.model.scan)})
  assert step == 0 and lineage[0]["stage"] == "import"
  jax.tree.map(np.testing.assert_array_equal, sd3.unrolled_layout(restored["denoiser"]), params)
  # Asking for the other layout is an error naming what the checkpoint lacks, not a tree
  # with holes.
  with pytest.raises(ValueError, match="has no .*blocks.*another model layout"):
    ckpt_lib.restore_ema(work, {"denoiser": abstract(not config.model.scan)})


@pytest.mark.heavy
def test_tune_from_converted_weights_and_export_to_diffusers(pipeline_dir, tmp_path):
  from diffusers import StableDiffusion3Pipeline

  base, cache, tuned, out = (str(tmp_path / n) for n in ("base", "cache", "tuned", "export"))
  helpers.cli("jdiff.convert", "import", f"--src={pipeline_dir}", f"--workdir={base}")
  cfg = ["--config=configs/sd3_tune.py:test", f"--config.init_from={base}"]
  meta = last_json(helpers.cli("jdiff.cache", *cfg, "--config.data.source=shapes", f"--out={cache}",
                               "--num_records=12", "--batch_size=5"))
  assert meta["num_records"] == 12 and meta["latent_shape"] == [8, 8, 16]
  assert meta["context_shape"] == [sd3_fixture.CLIP_MAX_LEN + 256, 32] and meta["pooled_dim"] == 20
  summary = last_json(helpers.cli("jdiff.main", *cfg, f"--config.data.cache_dir={cache}", f"--workdir={tuned}",
                                  "--config.model.dtype=float32"))
  assert summary["step"] == 3 and np.isfinite(summary["loss"])
  assert os.path.exists(os.path.join(tuned, "samples", "step_0000003.png"))
  lineage = ckpt_lib.read_lineage(tuned)
  assert [e["stage"] for e in lineage] == ["import", "tune"]
  assert lineage[0]["init_from"] == os.path.abspath(pipeline_dir) and lineage[1]["init_from"] == base
  # Sampling a prompt the cache does not hold encodes it with the pipeline's text encoders and
  # decodes the latents with its VAE.
  result = last_json(helpers.cli("jdiff.sample", f"--workdir={tuned}", "--prompt=a green triangle on the left",
                                 "--num_steps=2", "--upscale=1", f"--out={tmp_path / 'gen'}"))
  from PIL import Image
  assert np.asarray(Image.open(result["images"][0])).shape == (16, 16, 3)
  exported = last_json(helpers.cli("jdiff.convert", "export", f"--workdir={tuned}", f"--out={out}"))
  assert exported["step"] == 3 and exported["pipeline"] == out

  # diffusers' own pipeline loads the export; its transformer equals jdiff's tuned EMA weights.
  pipe = StableDiffusion3Pipeline.from_pretrained(out)
  model = inference.load(tuned)
  kwargs = sd3.model_kwargs(dict(pipe.transformer.config))
  ours_model = mmdit.MMDiT(**kwargs, attention="xla")
  params = sd3.unrolled_layout(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), model.params["denoiser"]))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 16), np.float32)
  t = np.array([0.3, 0.8], np.float32)
  context = rng.standard_normal((2, 7, 32), np.float32)
  pooled = rng.standard_normal((2, 20), np.float32)
  ours = np.asarray(ours_model.apply({"params": params}, x, t, context=context, pooled=pooled))
  with torch.no_grad():
    theirs = pipe.transformer(hidden_states=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                              encoder_hidden_states=torch.from_numpy(context),
                              pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t * 1000),
                              return_dict=False)[0].numpy().transpose(0, 2, 3, 1)
  np.testing.assert_array_less(np.abs(ours - theirs).max(), 1e-4 * np.abs(theirs).max())
  # Training moved the weights away from the imported ones.
  original = mapping.load_safetensors(os.path.join(pipeline_dir, "transformer"))
  new = mapping.load_safetensors(os.path.join(out, "transformer"))
  assert set(new) == set(original)
  assert any(not np.array_equal(new[k], original[k]) for k in original)
  # The tuned run records where it came from, and ran with its own runtime settings.
  assert model.config.stage == "tune" and model.config.model.dtype == "float32"
  assert model.config.model.dual_attention_depth == 1  # the architecture came from the import


@pytest.mark.heavy
def test_a_cache_written_with_buckets_trains_one_step_per_bucket(pipeline_dir, tmp_path):
  """jdiff.cache with data.buckets encodes each image at its bucket's shape and records the
  bucket; training on the cache batches by bucket and compiles a step for each."""
  import test_buckets
  from jdiff.data import latents as cache_lib

  test_buckets.write_two_aspect_folder(tmp_path / "images")  # 10 images 40x20, 6 of 20x40, one corrupt
  base, cache, tuned = (str(tmp_path / n) for n in ("base", "cache", "tuned"))
  helpers.cli("jdiff.convert", "import", f"--src={pipeline_dir}", f"--workdir={base}")
  cfg = ["--config=configs/sd3_tune.py:test", f"--config.init_from={base}"]
  meta = last_json(helpers.cli("jdiff.cache", *cfg, "--config.data.source=folder",
                               f"--config.data.path={tmp_path / 'images'}", "--config.data.buckets.pixels=256",
                               "--config.data.buckets.step=8", f"--out={cache}", "--batch_size=4"))
  assert meta["num_records"] == 16 and meta["latent_shape"] == [8, 8, 16]
  full = json.load(open(os.path.join(cache, cache_lib.META)))
  assert full["bucket_pixels"] == [[24, 8], [8, 24]] and full["buckets"] == [[12, 4], [4, 12]]  # by aspect ratio
  source = cache_lib.CacheSource(cache)
  for i in range(len(source)):  # every record's latents have its bucket's shape
    assert source[i]["latent_mean"].shape == (*full["buckets"][source.bucket_of_record[i]], 16)
  assert sorted(np.bincount(source.bucket_of_record).tolist()) == [6, 10]
  proc = helpers.cli("jdiff.main", *cfg, f"--config.data.cache_dir={cache}", f"--workdir={tuned}",
                     "--config.model.dtype=float32", "--config.train.num_steps=4", "--config.train.sample_every=0")
  assert last_json(proc)["step"] == 4 and np.isfinite(last_json(proc)["loss"])
  assert "train step for 4x12 compiled" in proc.stderr and "train step for 12x4 compiled" in proc.stderr


@pytest.mark.heavy
def test_a_cache_written_with_loss_masks_holds_them_at_latent_resolution(pipeline_dir, tmp_path):
  """jdiff.cache with data.loss_mask stores each image's mask pooled to the latent grid; training
  on the cache weights the flow loss with them."""
  from jdiff.data import latents as cache_lib

  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  for i in range(6):  # 16x16 RGBA: opaque in the first 4 + 2i columns
    rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.arange(16)[None, :] < 4 + 2 * i, 255, 0)
    Image.fromarray(rgba).save(images / f"{i}.png")
    (images / f"{i}.txt").write_text(f"image {i}")
  base, cache, tuned = (str(tmp_path / n) for n in ("base", "cache", "tuned"))
  helpers.cli("jdiff.convert", "import", f"--src={pipeline_dir}", f"--workdir={base}")
  cfg = ["--config=configs/sd3_tune.py:test", f"--config.init_from={base}"]
  helpers.cli("jdiff.cache", *cfg, "--config.data.source=folder", f"--config.data.path={images}",
              "--config.data.loss_mask=alpha", f"--out={cache}", "--batch_size=4")
  source = cache_lib.CacheSource(cache)
  assert source.masked and len(source) == 6
  for i in range(6):
    record = source[i]
    assert record["mask"].shape == record["latent_mean"].shape[:2] + (1,)  # 2x2 of the 16x16 pixels per latent
    # record i is image i (no buckets, none skipped): opaque in its first 2 + i latent columns
    np.testing.assert_array_equal(record["mask"][..., 0], np.where(np.arange(8)[None, :].repeat(8, 0) < 2 + i, 255, 0))
  proc = helpers.cli("jdiff.main", *cfg, f"--config.data.cache_dir={cache}", f"--workdir={tuned}",
                     "--config.model.dtype=float32", "--config.train.num_steps=2", "--config.train.sample_every=0")
  assert last_json(proc)["step"] == 2 and np.isfinite(last_json(proc)["loss"])
  assert "the cache holds loss masks (written with data.loss_mask='alpha'): they weight the flow loss" in proc.stderr
