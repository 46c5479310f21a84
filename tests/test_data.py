"""The embedded shapes data, the analyser, real-data sources and the grain pipeline."""

import dataclasses
import io
import json
import os

import chex
import numpy as np
import pytest
from PIL import Image

from jdiff import config_checks
from jdiff import tokens
from jdiff.data import decode, pipeline, pixels, shapes, sources
from jdiff.eval import adherence

DATA = dict(source="shapes", resolution=32, shapes_size=1_000_000, shapes_seed=0, read_threads=1,
            prefetch=8, num_workers=0, worker_chunk=32, tfds_name="", tfds_split="train",
            tfds_data_dir="", arrayrecord_pattern="", image_key="image", caption_key="caption")


def test_pixel_conversions_are_exact_inverses_in_numpy_and_under_jit():
  import jax
  values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  model = pixels.from_uint8(values)
  assert model.dtype == np.float32 and model.min() == -1.0 and model.max() == 1.0
  np.testing.assert_allclose(model.ravel()[[0, 128, 255]], [-1.0, 128 / 127.5 - 1.0, 1.0], atol=1e-7)
  jitted = np.asarray(jax.jit(pixels.from_uint8)(values))  # XLA multiplies by 1/127.5: 1 ulp
  np.testing.assert_allclose(jitted, model, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(pixels.to_uint8(model), values)
  np.testing.assert_array_equal(pixels.to_uint8(jitted), values)
  # Out-of-range model outputs clip; values between levels round to the nearest.
  np.testing.assert_array_equal(pixels.to_uint8(np.array([-1.5, 1.5, 2 / 255 - 1 + 0.4 / 127.5])), [0, 255, 1])


def test_shapes_are_a_pure_function_of_the_index():
  a, b = shapes.ShapesSource(32), shapes.ShapesSource(32)
  for i in (0, 7, 123_456):
    np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
    assert a[i]["caption"] == b[i]["caption"]
  assert a[1]["caption"] != a[2]["caption"] or not np.array_equal(a[1]["image"], a[2]["image"])
  assert not np.array_equal(shapes.ShapesSource(32, seed=1)[0]["image"], a[0]["image"])


def test_any_resolution_renders_the_same_scene():
  lo, hi = shapes.ShapesSource(32)[5], shapes.ShapesSource(128)[5]
  assert lo["image"].shape == (32, 32, 3) and hi["image"].shape == (128, 128, 3)
  assert lo["caption"] == hi["caption"]
  down = np.asarray(Image.fromarray(hi["image"]).resize((32, 32), Image.Resampling.BOX), np.float32)
  assert np.abs(down - lo["image"]).mean() < 3.0


def test_held_out_pairs_never_appear_in_training():
  train = shapes.ShapesSource(16, "train")
  held = shapes.ShapesSource(16, "held_out")
  seen_pairs, seen = set(), {a: set() for a in shapes.ATTRIBUTES}
  for i in range(3000):
    ex = train[i]
    seen_pairs.add((ex["color"], ex["shape"]))
    for a in shapes.ATTRIBUTES:
      seen[a].add(ex[a])
  assert not seen_pairs & shapes.HELD_OUT
  assert seen_pairs == {(c, s) for c in shapes.COLORS for s in shapes.SHAPES} - shapes.HELD_OUT
  assert seen["color"] == set(shapes.COLORS) and seen["shape"] == set(shapes.SHAPES)
  assert seen["position"] == set(shapes.POSITIONS) and seen["size"] == set(shapes.SIZES)
  for i in range(300):
    assert (held[i]["color"], held[i]["shape"]) in shapes.HELD_OUT


def test_new_color_split_mixes_the_new_colour_with_training_scenes():
  new = shapes.ShapesSource(16, "new_color")
  colors = [new[i]["color"] for i in range(1000)]
  pink = sum(c in shapes.NEW_COLORS for c in colors)
  assert 430 <= pink <= 570  # half, binomial(1000, 0.5) +- 4.4 sigma
  assert set(colors) - set(shapes.NEW_COLORS) == set(shapes.COLORS)
  assert not set(shapes.NEW_COLORS) & set(shapes.COLORS)
  assert all(a["color"] in shapes.NEW_COLORS for _, a in shapes.benchmark("new_color", 30))


def test_prompts_split_draws_every_pair_and_the_new_colour_half_the_time():
  """'prompts': half the new colour, the other half every colour-shape pair, the held-out
  ones at their share of the pairs (3 of 18: 1/12 of all records)."""
  src = shapes.ShapesSource(16, "prompts")
  pairs = [(ex["color"], ex["shape"]) for ex in (src[i] for i in range(2400))]
  pink = sum(c in shapes.NEW_COLORS for c, _ in pairs)
  held_out = sum(p in shapes.HELD_OUT for p in pairs)
  share = len(shapes.HELD_OUT) / (len(shapes.COLORS) * len(shapes.SHAPES)) / 2
  assert abs(pink - 1200) <= 4 * (2400 * 0.25) ** 0.5
  assert abs(held_out - 2400 * share) <= 4 * (2400 * share * (1 - share)) ** 0.5
  assert set(pairs) == {(c, s) for c in (*shapes.COLORS, *shapes.NEW_COLORS) for s in shapes.SHAPES}
  assert all(ex["caption"] for ex in (src[i] for i in range(10)))


def test_captions_name_every_attribute_in_varied_templates():
  src = shapes.ShapesSource(16)
  phrases = {"top left": "top left", "middle center": "center", "bottom center": "bottom"}
  forms = set()
  for i in range(200):
    ex = src[i]
    cap = ex["caption"]
    for a in ("color", "shape", "size"):
      assert ex[a] in cap, (a, cap)
    if ex["position"] in phrases:
      assert phrases[ex["position"]] in cap
    forms.add(cap.split()[0])
  assert len(forms) >= 4


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("split", ["train", "held_out", "new_color"])
def test_analyser_reads_renders(resolution, split):
  src = shapes.ShapesSource(resolution, split, seed=3)
  examples = [src[i] for i in range(500)]
  acc = adherence.score([e["image"] for e in examples], examples)
  for a in shapes.ATTRIBUTES:
    assert acc[a] >= 0.99, (a, acc)


def test_analyser_tolerates_noise_and_rejects_empty_images():
  src = shapes.ShapesSource(32, seed=4)
  rng = np.random.default_rng(0)
  examples = [src[i] for i in range(300)]
  noisy = [np.clip(e["image"] + rng.normal(0, 8, e["image"].shape), 0, 255).astype(np.uint8) for e in examples]
  acc = adherence.score(noisy, examples)
  for a in shapes.ATTRIBUTES:
    assert acc[a] >= 0.97, (a, acc)
  blank = np.full((32, 32, 3), 128, np.uint8)
  assert adherence.analyse(blank)["color"] is None
  assert adherence.score([blank], [examples[0]])["all"] == 0.0


def test_verdict_grid_frames_renders_green_and_wrong_targets_red(tmp_path):
  """A render under its own attributes is framed green; under another colour, red, and the
  .txt names the colour as read wrong."""
  from PIL import Image

  from jdiff.eval import benchmark
  src = shapes.ShapesSource(24, seed=5)
  examples = [src[i] for i in range(4)]
  targets = [{a: e[a] for a in shapes.ATTRIBUTES} for e in examples]
  targets[1] = dict(targets[1], color="green" if targets[1]["color"] != "green" else "red")
  path = tmp_path / "v" / "seen.png"
  images = np.stack([e["image"] for e in examples])
  verdicts = [adherence.correct(image, target) for image, target in zip(images, targets)]
  benchmark.write_verdict_grid(images, ["p0", "p1", "p2", "p3"], verdicts, str(path), upscale=2)
  grid = np.asarray(Image.open(path))[::2, ::2]
  frames = [tuple(grid[2, 2 + i * (24 + 2 * benchmark.FRAME + 2)]) for i in range(4)]
  assert frames == [benchmark.RIGHT, benchmark.WRONG, benchmark.RIGHT, benchmark.RIGHT]
  assert (tmp_path / "v" / "seen.txt").read_text().splitlines()[:2] == ["0\tright\tp0", "1\twrong: color\tp1"]


def test_benchmark_prompts():
  seen = shapes.benchmark("train", 36)
  held = shapes.benchmark("held_out", 36)
  assert seen == shapes.benchmark("train", 36)
  assert all((a["color"], a["shape"]) not in shapes.HELD_OUT for _, a in seen)
  assert all((a["color"], a["shape"]) in shapes.HELD_OUT for _, a in held)
  assert {a["position"] for _, a in seen} == set(shapes.POSITIONS)
  assert sum(a["size"] == "small" for _, a in seen) == 18


def test_tokenizer():
  toks = tokens.tokenize(["ab", ""], 5)
  np.testing.assert_array_equal(toks, [[1, 99, 100, 0, 0], [1, 0, 0, 0, 0]])
  assert tokens.detokenize(tokens.tokenize("a red circle", 64)) == "a red circle"
  assert tokens.tokenize("x" * 100, 8).tolist() == [1] + [ord("x") + 2] * 7


def _take(p, n):
  return [next(p) for _ in range(n)]


def test_pipeline_batches_are_seeded_and_resumable():
  a = pipeline.make_pipeline(DATA, global_batch=4, max_len=48, seed=0)
  b = pipeline.make_pipeline(DATA, global_batch=4, max_len=48, seed=0)
  c = pipeline.make_pipeline(DATA, global_batch=4, max_len=48, seed=1)
  first = _take(a, 3)
  assert first[0]["image"].shape == (4, 32, 32, 3) and first[0]["image"].dtype == np.uint8
  assert first[0]["tokens"].shape == (4, 48) and first[0]["tokens"].dtype == np.int32
  for x, y in zip(first, _take(b, 3)):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not np.array_equal(first[0]["image"], next(c)["image"])
  state = a.iterator.get_state()
  ahead = _take(a, 2)
  a.iterator.set_state(state)
  for x, y in zip(ahead, _take(a, 2)):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])


def test_read_threads_by_source_and_batches_independent_of_threads():
  """read_threads=-1 picks by source (1 for the GIL-bound embedded renders, 8 for file
  sources); whatever the thread count, the pipeline yields the same batches."""
  assert [pipeline.read_threads(dict(DATA, source=s, read_threads=-1))
          for s in ("shapes", "preference", "tfds", "arrayrecord", "cache")] == [1, 1, 8, 8, 8]
  assert pipeline.read_threads(dict(DATA, read_threads=3)) == 3
  with pytest.raises(ValueError, match="read_threads=-2"):
    pipeline.read_threads(dict(DATA, read_threads=-2))
  batches = [_take(pipeline.make_pipeline(dict(DATA, read_threads=n), global_batch=4, max_len=16, seed=0), 3)
             for n in (-1, 0, 4)]
  for other in batches[1:]:
    for x, y in zip(batches[0], other):
      np.testing.assert_array_equal(x["image"], y["image"])
      np.testing.assert_array_equal(x["tokens"], y["tokens"])
  from jdiff import config as config_lib
  c = config_lib.base()
  c.data.read_threads = -3
  with pytest.raises(ValueError, match="data.read_threads=-3"):
    config_checks.validate(c)


def test_worker_processes_give_the_same_batches_and_portable_resume_states():
  """data.num_workers > 0 yields the batches of the threaded pipeline whatever the chunk
  size (dividing the batch, not dividing it, larger, 1), and the saved state (only the
  stream position) restores into any threads/workers setting, including grain's own
  thread-iterator state from earlier checkpoints."""
  cfg = dict(DATA, resolution=8)
  make = lambda **kw: pipeline.make_pipeline(dict(cfg, **kw), global_batch=4, max_len=16, seed=0,
                                             process_index=0, process_count=1)
  reference = _take(make(read_threads=2), 5)
  for chunk in (1, 3, 8):
    other = make(num_workers=2, worker_chunk=chunk)
    for x, y in zip(_take(other, 3), reference):
      chex.assert_trees_all_equal(x, y)
    other.iterator.close()
  workers = make(num_workers=2)
  for x, y in zip(_take(workers, 2), reference):
    chex.assert_trees_all_equal(x, y)
  state = workers.iterator.get_state()
  assert json.loads(state) == {"next_index": 8}
  workers.iterator.close()
  for resumed in (make(read_threads=1), make(num_workers=3, worker_chunk=5)):
    resumed.iterator.set_state(state)
    for x, y in zip(_take(resumed, 3), reference[2:]):
      chex.assert_trees_all_equal(x, y)
    resumed.iterator.close()
  old = make()  # what grain.checkpoint wrote for grain's own thread iterator
  old.iterator.set_state(json.dumps({"next_index": 12}, indent=4).encode())
  chex.assert_trees_all_equal(next(old), reference[3])
  with pytest.raises(ValueError, match="no 'next_index'"):
    old.iterator.set_state(b'{"iterators_in_use_states": []}')


def test_processes_read_disjoint_shards_covering_an_epoch():
  cfg = dict(DATA, shapes_size=24, resolution=8)
  seen = []
  for pi in range(2):
    p = pipeline.make_pipeline(cfg, global_batch=4, max_len=64, seed=0, process_index=pi, process_count=2)
    batches = _take(p, 6)  # 6 batches of 2 = 12 records = half an epoch each
    seen.append({tokens.detokenize(t) + str(img.tobytes()) for b in batches for t, img in zip(b["tokens"], b["image"])})
  assert len(seen[0]) == len(seen[1]) == 12  # no repeats within a process's half epoch
  assert not seen[0] & seen[1]  # and none across processes: together they cover all 24


def test_global_batches_do_not_depend_on_the_number_of_processes():
  cfg = dict(DATA, shapes_size=40, resolution=8)
  one = _take(pipeline.make_pipeline(cfg, global_batch=8, max_len=64, seed=3, process_index=0, process_count=1), 3)
  parts = [_take(pipeline.make_pipeline(cfg, global_batch=8, max_len=64, seed=3, process_index=pi,
                                        process_count=4), 3) for pi in range(4)]
  for b in range(3):
    for key in ("image", "tokens"):
      np.testing.assert_array_equal(np.concatenate([parts[pi][b][key] for pi in range(4)]), one[b][key])


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _example(image_bytes, caption):
  from tensorflow_datasets.proto import tf_example_pb2

  ex = tf_example_pb2.Example()
  ex.features.feature["image"].bytes_list.value.append(image_bytes)
  ex.features.feature["caption"].bytes_list.value.append(caption.encode())
  return ex.SerializeToString()


def test_arrayrecord_source_decodes_resizes_and_skips_corrupt_records(tmp_path):
  from array_record.python import array_record_module

  path = str(tmp_path / "data.array_record")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
  for i, color in enumerate(colors):
    writer.write(_example(_png(np.full((20, 30, 3), color, np.uint8)), f"caption {i}"))
  writer.write(_example(b"not an image", "broken"))
  writer.write(b"not even a proto")
  writer.close()
  cfg = dict(DATA, source="arrayrecord", arrayrecord_pattern=str(tmp_path / "*.array_record"), resolution=8)
  # threads; worker processes, with the corrupt records inside chunks of 3 and sent alone
  for overrides in ({}, dict(num_workers=2, worker_chunk=3), dict(num_workers=2, worker_chunk=1)):
    p = pipeline.make_pipeline(dict(cfg, **overrides), global_batch=4, max_len=16, seed=0)
    batch = next(p)
    assert batch["image"].shape == (4, 8, 8, 3)
    got = {tuple(int(v) for v in img[4, 4]) for img in batch["image"]}
    assert got == set(colors)
    assert {tokens.detokenize(t) for t in batch["tokens"]} == {f"caption {i}" for i in range(4)}
    assert p.skipped == 2, overrides
    p.iterator.close()


def test_missing_sources_fail_fast(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"data.path: nothing at .*\*\.ar"):
    sources.make_source(dict(DATA, source="arrayrecord", arrayrecord_pattern=str(tmp_path / "*.ar")))
  with pytest.raises(FileNotFoundError, match="'nope'"):
    sources.make_source(dict(DATA, source="tfds", tfds_name="nope", tfds_data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match="unknown data.source"):
    sources.make_source(dict(DATA, source="lmdb"))


def test_tfds_source_on_a_dataset_the_test_writes(tmp_path):
  import tensorflow_datasets as tfds

  class JdiffTinyCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)), "caption": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(6):
        # Encoded bytes keep TFDS from needing TensorFlow to write the images.
        yield i, {"image": io.BytesIO(_png(np.full((12, 16, 3), 40 * i, np.uint8))), "caption": f"image {i}"}

  JdiffTinyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  cfg = dict(DATA, source="tfds", tfds_name="jdiff_tiny_captions", tfds_data_dir=str(tmp_path), resolution=8)
  src = sources.make_source(cfg)
  assert len(src) == 6
  p = pipeline.make_pipeline(cfg, global_batch=6, max_len=16, seed=0)
  batch = next(p)
  values = sorted(int(img[0, 0, 0]) for img in batch["image"])
  assert values == [0, 40, 80, 120, 160, 200]
  by_value = {int(img[0, 0, 0]): tokens.detokenize(t) for img, t in zip(batch["image"], batch["tokens"])}
  assert by_value[80] == "image 2"


def _full_grid_coverage(shape, center, h, height, width, ss=4):
  """The definition: the fraction of an ss x ss grid of sample points per pixel inside the shape."""
  ys = (np.arange(height * ss, dtype=np.float32) + 0.5) / (height * ss)
  xs = (np.arange(width * ss, dtype=np.float32) + 0.5) / (width * ss)
  dx, dy = xs[None, :] - center[0], ys[:, None] - center[1]
  inside = {"circle": dx**2 + dy**2 <= h**2, "square": (np.abs(dx) <= h) & (np.abs(dy) <= h),
            "triangle": (dy >= -h) & (dy <= h) & (np.abs(dx) <= (dy + h) / 2)}[shape]
  return inside.reshape(height, ss, width, ss).mean(axis=(1, 3), dtype=np.float32)


def test_rendering_only_the_bounding_box_equals_the_full_supersampled_grid():
  """Coverage and render (bounding box only, counts by slice sums, colours by lookup) equal
  the definition: the mean over the full supersampled grid, blended in float32."""
  rng = np.random.default_rng(0)
  for i in range(200):
    scene, _ = shapes.scene_for(0, "train" if i % 2 else "held_out", i)
    shape, center, h = scene.shape, scene.center, scene.half_extent
    if i % 10 == 0:  # partly or wholly out of the frame
      center = tuple(rng.uniform(-0.5, 1.5, size=2))
    for hw in [(16, 16), (24, 40), (64, 64)] + ([(256, 256)] if i % 5 == 0 else []):
      expected = _full_grid_coverage(shape, center, h, *hw)
      np.testing.assert_array_equal(shapes.coverage(shape, center, h, *hw), expected)
      image = shapes.render(dataclasses.replace(scene, center=center), hw)
      bg = np.asarray(shapes.BACKGROUNDS[scene.background], np.float32)
      fg = np.asarray(shapes.COLORS[scene.color], np.float32)
      np.testing.assert_array_equal(image, np.round(bg + expected[..., None] * (fg - bg)).astype(np.uint8))


def test_preference_pairs_differ_in_exactly_the_named_attribute():
  """Read back with the adherence analyser: the preferred render matches the caption's
  scene, the rejected one differs from it in the named attribute only."""
  src = shapes.PreferencePairsSource(resolution=32, size=10_000)
  changed, agree = [], 0
  n = 120
  for i in range(n):
    r = src[i]
    preferred, rejected, text, attribute = shapes.preference_pair(0, "train", i)
    assert r["caption"] == text and r["changed"] == attribute
    assert getattr(preferred, attribute) != getattr(rejected, attribute)
    for a in shapes.ATTRIBUTES:
      if a != attribute:
        assert getattr(preferred, a) == getattr(rejected, a)
    seen_w, seen_l = adherence.analyse(r["image_w"]), adherence.analyse(r["image_l"])
    agree += all(seen_w[a] == getattr(preferred, a) for a in shapes.ATTRIBUTES) and \
        all(seen_l[a] == getattr(rejected, a) for a in shapes.ATTRIBUTES)
    changed.append(attribute)
  assert agree >= 0.99 * n
  assert set(changed) == set(shapes.ATTRIBUTES)  # every attribute gets corrupted somewhere
  # Held-out pairs stay held out in the preferred image.
  preferred, _, _, _ = shapes.preference_pair(0, "held_out", 3)
  assert (preferred.color, preferred.shape) in shapes.HELD_OUT


def _write_pairs(directory, resolution=16, indices=(3, 7, 11)):
  import json
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  image_l = rng.integers(0, 256, (len(indices), resolution, resolution, 3), dtype=np.uint8)
  wrong = np.array([[False, True, False, False], [False, True, False, True], [True, False, False, False]])
  np.savez(directory / "pairs.npz", index=np.array(indices), image_l=image_l, wrong=wrong[:len(indices)])
  (directory / "meta.json").write_text(json.dumps(dict(workdir="w", step=5, split="train", shapes_seed=0,
                                                       resolution=resolution)))
  return image_l


def test_generated_pairs_source_pairs_the_caption_render_with_the_stored_sample(tmp_path):
  """data.pairs_dir: record i = (render of the caption of training record index[i], the
  model's stored sample for it); the wrong attributes travel as 'changed'."""
  image_l = _write_pairs(tmp_path / "p")
  data_cfg = dict(source="preference", pairs_dir=str(tmp_path / "p"), resolution=16, shapes_split="train",
                  shapes_size=100, shapes_seed=0)
  src = sources.make_source(data_cfg)
  assert isinstance(src, sources.GeneratedPairsSource) and len(src) == 3
  rec = src[1]
  scene, caption = shapes.scene_for(0, "train", 7)
  np.testing.assert_array_equal(rec["image_w"], shapes.render(scene, 16))
  np.testing.assert_array_equal(rec["image_l"], image_l[1])
  assert rec["caption"] == caption and rec["changed"] == "shape,position"
  # Evaluation splits keep the embedded pairs; a resolution mismatch and a missing file fail clearly.
  assert isinstance(sources.make_source(data_cfg, split="held_out"), shapes.PreferencePairsSource)
  with pytest.raises(ValueError, match="16px samples"):
    sources.make_source(dict(data_cfg, resolution=32))
  with pytest.raises(FileNotFoundError, match="jdiff.pairs"):
    sources.make_source(dict(data_cfg, pairs_dir=str(tmp_path / "missing")))
  # The pipeline turns the records into a training batch of pairs.
  from jdiff import config as config_lib
  full = config_lib.base().data
  full.update(data_cfg, read_threads=1, prefetch=2, caption_dropout=0.0)
  batch = next(pipeline.make_pipeline(full, global_batch=2, max_len=32, seed=0, process_index=0, process_count=1))
  assert batch["image_w"].shape == batch["image_l"].shape == (2, 16, 16, 3)


def _write_cache(directory, n, record_format):
  """A latent cache of n small records: the present format (latents.RecordWriter) or the first
  one (npz in ArrayRecord's default compression, meta without 'record_format')."""
  from array_record.python import array_record_module

  from jdiff.data import latents
  rng = np.random.default_rng(0)
  records = [dict(latent_mean=rng.standard_normal((4, 4, 2)).astype(np.float16),
                  latent_logvar=rng.standard_normal((4, 4, 2)).astype(np.float16),
                  context=rng.standard_normal((5, 8)).astype(np.float16),
                  pooled=rng.standard_normal(6).astype(np.float32)) for _ in range(n)]
  os.makedirs(directory, exist_ok=True)
  shapes_meta = dict(latent_shape=[4, 4, 2], context_shape=[5, 8], pooled_dim=6, dtype="float16")
  if record_format == "npz":
    writer = array_record_module.ArrayRecordWriter(os.path.join(directory, "records-00000.array_record"),
                                                   "group_size:1")
    for i, r in enumerate(records):
      buf = io.BytesIO()
      np.savez(buf, **r, caption=np.str_(f"caption {i}"), index=np.int64(i))
      writer.write(buf.getvalue())
    writer.close()
    with open(os.path.join(directory, latents.META), "w") as f:
      json.dump(dict(num_records=n, files=["records-00000.array_record"], **shapes_meta), f)
  else:
    writer = latents.RecordWriter(directory, records_per_file=7)
    for i, r in enumerate(records):
      writer.write(r, f"caption {i}", i)
    meta = writer.write_meta(**shapes_meta)
    assert meta["num_records"] == n and len(meta["files"]) == 4 and meta["record_format"] == latents.RECORD_FORMAT
  return records


@pytest.mark.parametrize("record_format", ["safetensors", "npz"])
def test_cache_records_read_back_through_the_pipeline(tmp_path, record_format):
  """Cache records (the present safetensors format across several files, and the first npz
  format) come back exactly through grain's read threads, none skipped: np.load's header
  parsing is not thread-safe on Python 3.11 and once dropped records as corrupt."""
  from jdiff.data import latents
  records = _write_cache(str(tmp_path), 24, record_format)
  src = latents.CacheSource(str(tmp_path))
  assert len(src) == 24
  for i in (0, 7, 23):
    chex.assert_trees_all_equal(src[i], records[i])
  cfg = dict(DATA, source="cache", cache_dir=str(tmp_path), read_threads=8, prefetch=16)
  p = pipeline.make_pipeline(cfg, global_batch=8, max_len=16, seed=0, process_index=0, process_count=1)
  batches = _take(p, 12)  # four epochs
  seen = np.concatenate([b["pooled"] for b in batches])
  assert p.skipped == 0
  expected = sorted(tuple(r["pooled"]) for r in records)
  for epoch in np.split(seen, 4):  # each epoch: every record once
    assert sorted(map(tuple, epoch)) == expected
  if record_format == "safetensors":  # worker processes, records sent in chunks: the same batches
    workers = pipeline.make_pipeline(dict(cfg, num_workers=2, worker_chunk=3), global_batch=8, max_len=16,
                                     seed=0, process_index=0, process_count=1)
    assert (p.worker_chunk, workers.worker_chunk) == (0, 3)  # small records: the configured chunk
    for x, y in zip(_take(workers, 4), batches):
      chex.assert_trees_all_equal(x, y)
    workers.iterator.close()


def _resize_then_crop(pil, resolution):
  """The definition to_rgb implements: bicubic resize of the short side to `resolution`,
  centre crop."""
  pil = pil.convert("RGB")
  w, h = pil.size
  scale = resolution / min(w, h)
  if scale != 1:
    pil = pil.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                     Image.Resampling.BICUBIC, reducing_gap=None if scale > 0.5 else 2.0)
  w, h = pil.size
  left, top = (w - resolution) // 2, (h - resolution) // 2
  return np.asarray(pil.crop((left, top, left + resolution, top + resolution)), np.uint8)


def test_to_rgb_resamples_only_the_crop_and_drafts_large_jpegs():
  """to_rgb resizes only the centre crop (within one level of resizing the whole image, for
  down- and upscaling, wide and tall) and decodes JPEGs >= 2x the target in the DCT domain
  (within a fraction of a level on average of the full decode)."""
  rng = np.random.default_rng(0)
  for h, w in [(384, 512), (512, 384), (300, 700), (1000, 800), (100, 60), (64, 64), (40, 64)]:
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    got = decode.to_rgb(arr, 64)
    assert got.shape == (64, 64, 3)
    assert np.abs(got.astype(int) - _resize_then_crop(Image.fromarray(arr), 64).astype(int)).max() <= 1
  scene, _ = shapes.scene_for(0, "train", 5)
  for h, w in [(768, 1024), (1080, 1920)]:
    buf = io.BytesIO()
    Image.fromarray(shapes.render(scene, (h, w))).save(buf, format="JPEG", quality=90)
    got = decode.to_rgb(buf.getvalue(), 128)
    full = _resize_then_crop(Image.open(io.BytesIO(buf.getvalue())), 128)
    diff = np.abs(got.astype(int) - full.astype(int))
    assert got.shape == (128, 128, 3) and diff.mean() < 0.25, diff.mean()


def test_worker_chunks_stay_under_a_size_cap():
  """data.worker_chunk elements per transfer, fewer for large elements (a 2.8 MB latent
  record: 5, so 16 MiB), at least one; a corrupt first element leaves the setting."""
  image = {"image": np.zeros((256, 256, 3), np.uint8), "tokens": np.zeros(64, np.int32)}
  assert pipeline.worker_chunk(32, image) == 32
  record = {"latent_mean": np.zeros((32, 32, 16), np.float16), "latent_logvar": np.zeros((32, 32, 16), np.float16),
            "context": np.zeros((333, 4096), np.float16), "pooled": np.zeros(2048, np.float32)}
  assert pipeline.worker_chunk(32, record) == pipeline.WORKER_CHUNK_BYTES // 2_801_664 == 5
  assert pipeline.worker_chunk(32, {"huge": np.zeros(2**25, np.uint8)}) == 1
  assert pipeline.worker_chunk(3, image) == 3
  assert pipeline.worker_chunk(32, decode.Corrupt(0, "read: broken")) == 32


def test_select_pairs_each_wrong_sample_with_a_right_one_of_its_caption():
  """pairs.select: every sample with an attribute wrong is rejected; preferred='sample' pairs
  the j-th wrong sample of a caption with its (j mod r)-th right one (the cleanest first) and
  drops captions with none right; 'render' keeps every wrong sample and stores no preferred image."""
  from jdiff.eval import on_policy
  index = np.array([5, 5, 5, 5, 9, 9, 2, 2])
  images = np.arange(8, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
  wrong = np.zeros((8, 4), bool)
  wrong[[0, 2, 3], 1] = True  # caption 5: samples 0, 2, 3 wrong, 1 right
  wrong[[4, 5], 0] = True     # caption 9: no sample right
  wrong[7, 3] = True          # caption 2: sample 7 wrong, 6 right
  got = on_policy.select(index, images, wrong, "sample")
  np.testing.assert_array_equal(got["index"], [5, 5, 5, 2])
  np.testing.assert_array_equal(got["image_l"][:, 0, 0, 0], [0, 2, 3, 7])
  np.testing.assert_array_equal(got["image_w"][:, 0, 0, 0], [1, 1, 1, 6])
  np.testing.assert_array_equal(got["wrong"], wrong[[0, 2, 3, 7]])
  # Two right samples alternate.
  wrong2 = wrong.copy()
  wrong2[2] = False
  np.testing.assert_array_equal(on_policy.select(index, images, wrong2, "sample")["image_w"][:2, 0, 0, 0], [1, 2])
  # ... the cleanest first: with sample 2 the cleaner right one, it leads.
  artefacts = np.array([0.0, 5.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
  np.testing.assert_array_equal(on_policy.select(index, images, wrong2, "sample", artefacts)["image_w"][:2, 0, 0, 0],
                                [2, 1])
  got = on_policy.select(index, images, wrong, "render")
  assert "image_w" not in got
  np.testing.assert_array_equal(got["index"], [5, 5, 5, 9, 9, 2])
  # Nothing wrong: empty arrays of the right shapes.
  none = on_policy.select(index, images, np.zeros((8, 4), bool), "sample")
  assert none["image_w"].shape == none["image_l"].shape == (0, 2, 2, 3) and none["wrong"].shape == (0, 4)


def test_generate_pairs_lines_up_captions_samples_and_verdicts(tmp_path, monkeypatch):
  """pairs.generate with preferred='sample' on held-out captions: with a stand-in model whose
  sample k of a caption is its render for even k and a blank image for odd k, every pair is
  (render, blank) of the same record, batches of several captions included, and the meta
  records the adherence of all samples. Renders of held-out captions are refused."""
  import types
  from jdiff import config as config_lib
  from jdiff import inference
  from jdiff.eval import on_policy
  config = config_lib.base()
  config.data.resolution = 24
  stand_in = types.SimpleNamespace(config=config, step=7)
  monkeypatch.setattr(inference, "load", lambda workdir: stand_in)
  scenes = {text: scene for scene, text in (shapes.scene_for(0, "held_out", i) for i in range(6))}

  def fake_generate(model, texts, *, num_steps, cfg_scale, seed, first_index):
    assert model is stand_in and first_index % 4 == 0
    return np.stack([shapes.render(scenes[t], 24) if (first_index + n) % 2 == 0 else np.zeros((24, 24, 3), np.uint8)
                     for n, t in enumerate(texts)])

  monkeypatch.setattr(inference, "generate", fake_generate)
  meta = on_policy.generate("w", str(tmp_path / "p"), num=6, batch=8, preferred="sample", samples_per_caption=4,
                        split="held_out")
  assert meta["num_pairs"] == 12 and meta["split"] == "held_out" and meta["adherence"]["color"] == 0.5
  with np.load(tmp_path / "p" / "pairs.npz") as z:
    np.testing.assert_array_equal(z["index"], np.repeat(np.arange(6), 2))
    for i, w, l in zip(z["index"], z["image_w"], z["image_l"]):
      np.testing.assert_array_equal(w, shapes.render(shapes.scene_for(0, "held_out", int(i))[0], 24))
      assert not l.any()
  src = sources.GeneratedPairsSource(str(tmp_path / "p"), 24)
  np.testing.assert_array_equal(src[3]["image_w"], shapes.render(shapes.scene_for(0, "held_out", 1)[0], 24))
  with pytest.raises(ValueError, match="unseen colour-shape pairs"):
    on_policy.generate("w", str(tmp_path / "q"), num=2, split="held_out")
  with pytest.raises(ValueError, match="must be >= 2"):
    on_policy.generate("w", str(tmp_path / "q"), num=2, preferred="sample")
  # A held-out pairs file without preferred images is refused rather than rendered.
  with np.load(tmp_path / "p" / "pairs.npz") as z:
    np.savez(tmp_path / "p" / "pairs.npz", index=z["index"], image_l=z["image_l"], wrong=z["wrong"])
  with pytest.raises(ValueError, match="without preferred ones"):
    sources.GeneratedPairsSource(str(tmp_path / "p"), 24)


def test_stray_pixels_are_zero_on_flat_renders_and_count_a_speck():
  """benchmarks/stray_pixels.py: a render's flat regions add nothing, so the score of a
  render is its edges' alone; one pixel set off by d in one channel of a flat region adds
  (d per channel) / (H W C) to the image's mean."""
  import helpers
  stray = helpers.benchmark_module("stray_pixels").stray_pixels
  flat = np.full((1, 12, 12, 3), 90, np.uint8)
  assert stray(flat)[0] == 0.0
  speck = flat.copy()
  speck[0, 5, 5, 1] = 190
  np.testing.assert_allclose(stray(speck)[0], 100 / (12 * 12 * 3))
  scene, _ = shapes.scene_for(0, "train", 1)
  render = shapes.render(scene, 24)[None]
  noisy = np.clip(render.astype(int) + np.random.default_rng(0).integers(-40, 41, render.shape), 0, 255).astype(np.uint8)
  assert stray(noisy)[0] > 2 * stray(render)[0]
