"""Aspect-ratio buckets (jdiff/data/buckets.py): the bucket set, assignment, the batch schedule,
the bucketed pipeline, the per-bucket shift, and a bucketed training run that resumes exactly."""

import collections
import io
import os

import chex
import jax
import numpy as np
import pytest
from PIL import Image

from jdiff import diffusion
from jdiff.data import buckets, pipeline

import test_train


def test_bucket_shapes_are_the_largest_multiples_within_the_pixel_budget():
  shapes = buckets.bucket_shapes(256 * 256, 64, 4.0)
  # By hand: widths 128..512 in steps of 64 with height = floor(65536 / w / 64) * 64, both ways round.
  assert shapes == [(512, 128), (448, 128), (384, 128), (320, 192), (256, 256), (192, 320), (128, 384), (128, 448),
                    (128, 512)]
  for pixels, step, aspect in ((256 * 256, 64, 4.0), (512 * 512, 32, 2.0), (1024 * 1024, 64, 4.0)):
    shapes = buckets.bucket_shapes(pixels, step, aspect)
    for h, w in shapes:
      assert h % step == 0 and w % step == 0 and h * w <= pixels and max(h / w, w / h) <= aspect
      assert (h + step) * w > pixels or h * (w + step) > pixels  # the largest height for its width, or vice versa
      assert (w, h) in shapes
    assert (int(pixels**0.5), int(pixels**0.5)) in shapes
  with pytest.raises(ValueError, match="pixels >= step"):
    buckets.bucket_shapes(100, 64)


def test_assign_takes_the_nearest_aspect_ratio_and_refuses_large_upscales():
  shapes = buckets.bucket_shapes(256 * 256, 64, 4.0)
  sizes = np.array([[400, 200], [200, 400], [300, 300], [1000, 250], [5000, 100], [100, 100], [257, 256]])
  got = [shapes[b] if b >= 0 else None for b in buckets.assign(sizes, shapes, max_upscale=2.0)]
  # 2:1 -> 320x192 (5:3, |log(2/1.667)| = 0.18 < |log(3/2)| = 0.41); 1:1 -> 256x256; 4:1 -> 128x512;
  # 50:1 -> the widest; 100x100 needs 2.56x to cover 256x256: left out.
  assert got == [(192, 320), (320, 192), (256, 256), (128, 512), (128, 512), None, (256, 256)]
  assert buckets.assign(np.array([[100, 100]]), shapes, max_upscale=3.0).tolist() == [4]


def _schedule(counts=(37, 12, 0, 64, 5), batch=8, seed=0):
  which = np.concatenate([np.full(n, b) for b, n in enumerate(counts)] + [np.full(3, -1)])
  which = which[np.random.default_rng(1).permutation(len(which))]
  return buckets.Schedule(which, len(counts), batch, seed), which


def test_schedule_covers_every_record_once_an_epoch_in_proportion_and_is_a_pure_function():
  s, which = _schedule()
  for epochs in (1, 3, 10):
    seen = collections.Counter()
    per_bucket = collections.Counter()
    for j in range(s.batches_through(epochs)):
      b, records = s.batch(j)
      assert (which[records] == b).all() and len(records) == 8
      seen.update(records.tolist())
      per_bucket[b] += 1
    for b, n in enumerate(s.counts):
      # floor(E * N_b / B) batches of bucket b: buckets drawn in proportion to their data
      assert per_bucket[b] == epochs * n // 8
      if n >= 8:
        # each record of the bucket E times, give or take the one batch carried over
        counts = [seen[r] for r in np.flatnonzero(which == b)]
        assert epochs - 1 <= min(counts) and max(counts) <= epochs, (b, epochs, min(counts), max(counts))
  assert not set(seen) & set(np.flatnonzero(which < 0).tolist())
  # Pure function of (seed, j): a fresh schedule, out of order, gives the same batches; another seed does not.
  t, _ = _schedule()
  for j in (57, 3, 120, 0):
    np.testing.assert_array_equal(s.batch(j)[1], t.batch(j)[1])
  u, _ = _schedule(seed=1)
  assert any(not np.array_equal(s.batch(j)[1], u.batch(j)[1]) for j in range(5))
  # When the batch divides every bucket, an epoch is exactly every record once.
  e, which = _schedule(counts=(16, 8, 24))
  seen = collections.Counter(r for j in range(e.batches_through(1)) for r in e.batch(j)[1].tolist())
  assert sorted(seen) == list(np.flatnonzero(which >= 0)) and set(seen.values()) == {1}


def _png(size, color):
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, format="PNG")
  return buf.getvalue()


def write_two_aspect_folder(root, n_wide=10, n_tall=6, corrupt=1):
  os.makedirs(root, exist_ok=True)
  for i in range(n_wide + n_tall + corrupt):
    stem = os.path.join(root, f"{i:03d}")
    if i >= n_wide + n_tall:
      data, caption = b"\x89PNG broken", "broken"
    else:
      size = (40, 20) if i < n_wide else (20, 40)
      data, caption = _png(size, (10 * i, 255 - 10 * i, 128)), f"{'wide' if i < n_wide else 'tall'} {i}"
    with open(stem + ".png", "wb") as f:
      f.write(data)
    with open(stem + ".txt", "w") as f:
      f.write(caption)


BUCKETS = dict(pixels=256, step=8, max_aspect=4.0, max_upscale=2.0, max_buckets=16)


def _resumes_from_its_state(p, cfg):
  """A new pipeline set to p's state gives p's next five batches; returns it."""
  state = p.iterator.get_state()
  rest = [next(p) for _ in range(5)]
  q = pipeline.make_pipeline(cfg, global_batch=4, max_len=16, seed=0, process_index=0, process_count=1)
  q.iterator.set_state(state)
  for a, b in zip(rest, [next(q) for _ in range(5)]):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  return q


def test_bucketed_pipeline_one_shape_per_batch_resumes_and_splits_by_process(tmp_path):
  write_two_aspect_folder(tmp_path)
  cfg = dict(source="folder", path=str(tmp_path), resolution=16, read_threads=2, prefetch=8, num_workers=0,
             worker_chunk=4, arrayrecord_pattern="", image_key="image", caption_key="caption", caption_from="auto",
             missing_caption="skip", buckets=BUCKETS)
  p = pipeline.make_pipeline(cfg, global_batch=4, max_len=16, seed=0, process_index=0, process_count=1)
  # 40x20 -> 8x24 (3:1 is nearer 2:1 than 1:1 in log ratio... |log 1.5| = 0.41 < |log 2| = 0.69); 20x40 -> 24x8
  assert sorted(p.shapes) == [(8, 24), (24, 8)]
  batches = [next(p) for _ in range(12)]
  shapes = collections.Counter(b["image"].shape for b in batches)
  assert set(shapes) == {(4, 8, 24, 3), (4, 24, 8, 3)}
  from jdiff import tokens
  for b in batches:
    words = {tokens.detokenize(t).split()[0] for t in b["tokens"]}
    assert words == ({"wide"} if b["image"].shape[1] == 8 else {"tall"})  # captions travel with their images
  assert p.skipped == 0  # the corrupt image has no readable header: left out when the buckets are built
  q = _resumes_from_its_state(p, cfg)
  # Two processes' rows of each global batch are the one process's batch.
  halves = [pipeline.make_pipeline(cfg, global_batch=4, max_len=16, seed=0, process_index=i, process_count=2)
            for i in range(2)]
  for whole in batches[:6]:
    parts = [next(h) for h in halves]
    np.testing.assert_array_equal(np.concatenate([x["image"] for x in parts]), whole["image"])
  # Worker processes give the same batches.
  w = pipeline.make_pipeline(dict(cfg, num_workers=2), global_batch=4, max_len=16, seed=0)
  for whole in batches[:3]:
    np.testing.assert_array_equal(next(w)["image"], whole["image"])
  for it in (p, q, w, *halves):
    it.iterator.close()


def test_a_record_that_fails_to_decode_is_replaced_within_its_batch_and_counted(tmp_path):
  write_two_aspect_folder(tmp_path, corrupt=0)
  with open(tmp_path / "003.png", "r+b") as f:  # garbage image data: the size reads, the decode fails
    f.seek(f.read().index(b"IDAT") + 4)
    f.write(b"\xff" * 8)
  cfg = dict(source="folder", path=str(tmp_path), resolution=16, read_threads=1, prefetch=8, num_workers=0,
             worker_chunk=4, arrayrecord_pattern="", image_key="image", caption_key="caption", caption_from="auto",
             missing_caption="skip", buckets=BUCKETS)
  p = pipeline.make_pipeline(cfg, global_batch=4, max_len=16, seed=0)
  batches = [next(p) for _ in range(10)]
  assert all(b["image"].shape[0] == 4 for b in batches) and p.skipped >= 1
  p.iterator.close()


def test_each_bucket_trains_with_its_own_resolution_shift():
  """objectives.noised draws t under resolution_shift of the batch's own token count."""
  from jdiff import networks as networks_lib
  from jdiff.train import objectives

  config = test_train.get_config()
  config.diffusion.shift.update(kind="sd3", base_seq_len=16)
  networks = networks_lib.build_networks(config)
  keys = jax.random.split(jax.random.key(0), 256)
  ts = {}
  for h, w in ((8, 24), (24, 32), (16, 16)):
    batch = dict(image=np.zeros((256, h, w, 3), np.uint8), tokens=np.zeros((256, config.text.max_len), np.int32))
    t = objectives.noised(batch, keys, networks, config).t
    k_t = objectives.streams(keys, 4)[1]
    seq = (h // 4) * (w // 4)
    expected = diffusion.training_timesteps(k_t, seq, config.diffusion.timesteps, config.diffusion.shift)
    np.testing.assert_allclose(t, expected, rtol=0, atol=0)
    ts[seq] = float(np.mean(t))
  assert ts[12] < ts[16] < ts[48]  # more tokens, more shift towards noise


@pytest.mark.heavy
def test_bucketed_training_resumes_bit_identically(tmp_path):
  write_two_aspect_folder(tmp_path / "data")
  over = dict(data__source="folder", data__path=str(tmp_path / "data"), data__buckets__pixels=256,
              data__buckets__step=8, train__batch_size=4, train__sample_every=0, train__checkpoint_every=3)
  config = test_train.get_config(train__num_steps=6, **over)
  full = test_train.run(config, tmp_path / "full")
  assert full["step"] == 6
  test_train.run(test_train.get_config(train__num_steps=3, **over), tmp_path / "resumed")
  test_train.run(config, tmp_path / "resumed")
  a, a_data, _ = test_train.restored(tmp_path / "full", config)
  b, b_data, _ = test_train.restored(tmp_path / "resumed", config)
  chex.assert_trees_all_equal(a.params, b.params)
  chex.assert_trees_all_equal(a.opt_state, b.opt_state)
  assert a_data == b_data


def test_multi_resolution_batches_hold_one_side_each_in_proportion_and_resume():
  """data.buckets.sides: every batch is square at one side, the sides come in proportion to
  the weights, the embedded shapes are drawn at the side itself (not resized), and the
  stream resumes from its state."""
  from jdiff.data import shapes
  cfg = dict(source="shapes", shapes_split="train", shapes_size=4000, shapes_seed=0, resolution=16, read_threads=1,
             prefetch=8, num_workers=0, worker_chunk=4, caption_dropout=0.0,
             buckets=dict(BUCKETS, pixels=0, sides=(16, 24), weights=(3.0, 1.0)))
  p = pipeline.make_pipeline(cfg, global_batch=4, max_len=16, seed=0, process_index=0, process_count=1)
  assert sorted(p.shapes) == [(16, 16), (24, 24)]
  batches = [next(p) for _ in range(400)]
  sides = np.array([b["image"].shape[1] for b in batches])
  assert {b["image"].shape[1:] for b in batches} == {(16, 16, 3), (24, 24, 3)}
  assert abs(np.mean(sides == 24) - 0.25) < 0.05  # 400 batches: binomial SE 0.022
  q = _resumes_from_its_state(p, cfg)
  for it in (p, q):
    it.iterator.close()
  source = shapes.ShapesSource(16, "web", size=6, web=dict(noise=0.5, blur=0.5))
  source.render_at(np.array([16, 24, 24, 16, 24, 16]))
  for i, side in enumerate([16, 24, 24, 16, 24, 16]):
    alone = shapes.ShapesSource(side, "web", size=6, web=dict(noise=0.5, blur=0.5))[i]
    np.testing.assert_array_equal(source[i]["image"], alone["image"])
    assert source[i]["caption"] == alone["caption"]


@pytest.mark.parametrize("fields, message", [
    (dict(sides=(16, 24), pixels=256), "not both"),
    (dict(sides=(16, 18)), "multiples of model.patch_size"),
    (dict(sides=(16, 24), weights=(1.0,)), "one positive weight per side"),
    (dict(sides=(16, 24), weights=(1.0, 0.0)), "one positive weight per side"),
])
def test_multi_resolution_settings_are_checked(fields, message):
  from jdiff import config_checks
  config = test_train.get_config()
  config.data.buckets.update(fields)
  with pytest.raises(ValueError, match=message):
    config_checks.validate(config)
