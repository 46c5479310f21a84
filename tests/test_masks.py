"""Masked loss (data.loss_mask): the weighted flow loss, masks from alpha channels and mask
files through the pipeline, and a training run that reads them."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jdiff import diffusion
from jdiff.data import latents
from jdiff.data import pipeline

import test_train


def test_masked_flow_loss_is_the_mean_squared_error_over_the_weighted_area():
  rng = np.random.default_rng(0)
  pred, x0, eps = (jnp.asarray(rng.standard_normal((2, 4, 6, 3)), jnp.float32) for _ in range(3))
  t = jnp.array([0.3, 0.8])
  mask = np.zeros((2, 4, 6, 1), np.float32)
  mask[0, :, :3] = 1.0  # sample 0: the left half
  mask[1, 1, 2] = 0.5  # sample 1: one pixel at half weight
  got = diffusion.flow_loss(pred, x0, eps, t, mask=jnp.asarray(mask))
  sq = np.square(np.asarray(pred) - (np.asarray(eps) - np.asarray(x0)))  # v-prediction: target eps - x0
  np.testing.assert_allclose(got, [sq[0, :, :3].mean(), sq[1, 1, 2].mean()], rtol=1e-6)
  ones = diffusion.flow_loss(pred, x0, eps, t, mask=jnp.ones((2, 4, 6, 1)))
  np.testing.assert_allclose(ones, diffusion.flow_loss(pred, x0, eps, t), rtol=1e-6)
  assert float(diffusion.flow_loss(pred, x0, eps, t, mask=jnp.zeros((2, 4, 6, 1)))[0]) == 0.0
  grad = jax.grad(lambda p: diffusion.flow_loss(p, x0, eps, t, mask=jnp.asarray(mask)).sum())(pred)
  assert np.all(np.asarray(grad)[0, :, 3:] == 0) and np.all(np.asarray(grad)[0, :, :3] != 0)


def _write(root, name, image, mask=None):
  Image.fromarray(image).save(os.path.join(root, name + ".png"))
  with open(os.path.join(root, name + ".txt"), "w") as f:
    f.write(f"caption of {name}")
  if mask is not None:
    Image.fromarray(mask).save(os.path.join(root, name + "-masklabel.png"))


def _data(root, **over):
  return dict(source="folder", path=str(root), resolution=8, read_threads=1, prefetch=8, num_workers=0, worker_chunk=4,
              arrayrecord_pattern="", image_key="image", caption_key="caption", caption_from="auto",
              missing_caption="skip", mask_suffix="-masklabel.png", **over)


def test_masks_from_alpha_and_from_mask_files_are_cropped_with_their_image(tmp_path):
  # 16x8 (w x h) image: covers 8x8 by halving, centre crop = columns 4..11 of the original.
  rgba = np.zeros((8, 16, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:, :8, 3] = 255  # opaque left half
  Image.fromarray(rgba).save(tmp_path / "a.png")
  (tmp_path / "a.txt").write_text("left half")
  p = pipeline.make_pipeline(_data(tmp_path, loss_mask="alpha"), global_batch=1, max_len=16, seed=0)
  batch = next(p)
  p.iterator.close()
  assert batch["image"].shape == (1, 8, 8, 3) and batch["mask"].shape == (1, 8, 8, 1)
  assert batch["mask"][0, :, 0, 0].min() == 255 and batch["mask"][0, :, -1, 0].max() == 0  # left opaque, right not
  np.testing.assert_array_equal(batch["mask"][0, :, :, 0] > 127, np.arange(8)[None, :].repeat(8, 0) < 4)

  # A mask file at half the image's size (16x8 image, 8x4 mask), resized to the image first.
  files = tmp_path / "files"
  files.mkdir()
  mask = np.zeros((4, 8), np.uint8)
  mask[:, 4:] = 255  # right half
  _write(files, "b", np.full((8, 16, 3), 90, np.uint8), mask)
  _write(files, "c", np.full((8, 8, 3), 30, np.uint8))  # no mask file: learnt whole
  p = pipeline.make_pipeline(_data(files, loss_mask="file"), global_batch=2, max_len=16, seed=0)
  batch = next(p)
  p.iterator.close()
  by_value = {int(img[0, 0, 0]): m[..., 0] for img, m in zip(batch["image"], batch["mask"])}
  assert set(by_value) == {90, 30}  # the mask file is not read as an image of its own
  assert (by_value[30] == 255).all()
  np.testing.assert_array_equal(by_value[90] > 127, np.arange(8)[None, :].repeat(8, 0) >= 4)


def test_training_with_a_loss_mask_reads_masks_into_the_step(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(6):
    rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.arange(16)[None, :] < 8 + i, 255, 0)
    Image.fromarray(rgba).save(tmp_path / f"{i}.png")
    (tmp_path / f"{i}.txt").write_text(f"image {i}")
  over = dict(data__source="folder", data__path=str(tmp_path), train__sample_every=0, train__batch_size=2)
  masked = test_train.run(test_train.get_config(data__loss_mask="alpha", **over), tmp_path / "masked")
  whole = test_train.run(test_train.get_config(**over), tmp_path / "whole")
  assert masked["step"] == whole["step"] == 4
  masked, whole = masked["last_metrics"]["loss"], whole["last_metrics"]["loss"]
  assert np.isfinite(masked) and masked != whole


def test_latent_mask_averages_each_latents_pixels():
  mask = np.zeros((4, 6, 1), np.uint8)
  mask[:2, :2] = 255  # one whole 2x2 block
  mask[2:, 4:5] = 255  # half of another
  mask[0, 2] = 100  # a quarter of a third at 100
  np.testing.assert_array_equal(latents.latent_mask(mask, 2)[..., 0], [[255, 25, 0], [0, 0, 128]])
