"""Image folders, webdataset shards and parquet files (jdiff/data/files.py) on data the tests write:
images of several sizes, aspect ratios and formats, some corrupt and some without a caption."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from jdiff import tokens
from jdiff.data import decode, files, pipeline, sources

DATA = dict(source="folder", path="", resolution=8, read_threads=2, prefetch=8, num_workers=0, worker_chunk=4,
            arrayrecord_pattern="", image_key="image", caption_key="caption", caption_from="auto",
            missing_caption="skip")

# (relative path, size (w, h), format, caption): a caption is a str, a list of lines (.txt with
# several lines), a dict (.json sidecar), 'MANIFEST:<text>' (in metadata.jsonl), or None (none).
ITEMS = [
    ("a.png", (40, 24), "PNG", "red wide"),  # RGBA
    ("b.jpg", (24, 48), "JPEG", ["green tall", "a tall green one", "tall and green"]),
    ("c.webp", (33, 33), "WEBP", {"caption": "blue square"}),
    ("sub/d.PNG", (64, 16), "PNG", "MANIFEST:yellow strip"),
    ("sub/e.png", (30, 20), "PNG", None),
    ("sub/deeper/f.jpeg", (20, 30), "JPEG", "white tall"),
]
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (255, 255, 255)]
CORRUPT = ("g.png", "a broken one")  # a caption, but bytes that are not an image


def _encode(size, fmt, color, rgba=False):
  img = Image.new("RGBA" if rgba else "RGB", size, color + ((255,) if rgba else ()))
  buf = io.BytesIO()
  img.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {"quality": 100} if fmt == "JPEG" else {}))
  return buf.getvalue()


def _items():
  """[(relative path, encoded bytes, colour, caption)]."""
  return [(path, _encode(size, fmt, color, rgba=path == "a.png"), color, caption)
          for (path, size, fmt, caption), color in zip(ITEMS, COLORS)]


def _captions(caption):
  """The captions a record may have: its alternatives."""
  if isinstance(caption, list):
    return set(caption)
  if isinstance(caption, dict):
    return {caption["caption"]}
  return {caption.removeprefix("MANIFEST:")}


def write_folder(root):
  manifest = []
  for path, data, _, caption in _items():
    full = os.path.join(root, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "wb") as f:
      f.write(data)
    stem = os.path.splitext(full)[0]
    if isinstance(caption, list):
      with open(stem + ".txt", "w") as f:
        f.write("\n".join(caption) + "\n\n")
    elif isinstance(caption, dict):
      with open(stem + ".json", "w") as f:
        json.dump(caption, f)
    elif isinstance(caption, str) and caption.startswith("MANIFEST:"):
      manifest.append(dict(file_name=path, caption=caption.removeprefix("MANIFEST:")))
    elif caption is not None:
      with open(stem + ".txt", "w") as f:
        f.write(caption)
  with open(os.path.join(root, CORRUPT[0]), "wb") as f:
    f.write(b"\x89PNG not really")
  with open(os.path.join(root, "g.txt"), "w") as f:
    f.write(CORRUPT[1])
  with open(os.path.join(root, "notes.md"), "w") as f:  # not an image: ignored
    f.write("hello")
  with open(os.path.join(root, "metadata.jsonl"), "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in manifest)


def write_shards(root):
  """The folder's data as two webdataset shards (the manifest's caption as a .txt member)."""
  os.makedirs(root, exist_ok=True)
  items = _items() + [(CORRUPT[0], b"\x89PNG not really", None, CORRUPT[1])]
  paths = []
  for shard, part in enumerate((items[:4], items[4:])):
    path = os.path.join(root, f"shard-{shard:03d}.tar")
    with tarfile.open(path, "w") as tar:
      for name, data, _, caption in part:
        key, ext = os.path.splitext(name)
        members = [(ext.lower(), data)]
        if isinstance(caption, list):
          members.append((".txt", "\n".join(caption).encode()))
        elif isinstance(caption, dict):
          members.append((".json", json.dumps(caption).encode()))
        elif caption is not None:
          members.append((".txt", caption.removeprefix("MANIFEST:").encode()))
        for suffix, payload in members:
          info = tarfile.TarInfo(key + suffix)
          info.size = len(payload)
          tar.addfile(info, io.BytesIO(payload))
    paths.append(path)
  return paths


def write_parquet(root):
  """Two files: plain binary images, and Hugging Face's {'bytes', 'path'} struct; a null caption."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  os.makedirs(root, exist_ok=True)
  items = _items() + [(CORRUPT[0], b"\x89PNG not really", None, CORRUPT[1])]

  def caption(c):
    return None if c is None else sorted(_captions(c))[0]
  first, second = items[:3], items[3:]
  pq.write_table(pa.table({"image": [d for _, d, _, _ in first], "text": [caption(c) for *_, c in first]}),
                 os.path.join(root, "part-0.parquet"), row_group_size=2)
  pq.write_table(pa.table({"image": [{"bytes": d, "path": n} for n, d, _, _ in second],
                           "text": [caption(c) for *_, c in second]}),
                 os.path.join(root, "part-1.parquet"), row_group_size=3)


def _decoded_colours(src):
  """{caption alternatives: centre colour of the decoded image} over every record of `src`."""
  out = {}
  for i in range(len(src)):
    rec = src[i]
    try:
      img = decode.to_rgb(rec["image"], 8)
    except Exception:  # the corrupt record
      img = None
    caption = rec["caption"]
    key = tuple(sorted(caption)) if isinstance(caption, tuple) else (caption,)
    out[key] = None if img is None else tuple(int(v) for v in img[4, 4])
  return out


def _expected(skip_missing=True):
  out = {}
  for _, _, color, caption in _items():
    if caption is None:
      if skip_missing:
        continue
      out[("",)] = color
    else:
      out[tuple(sorted(_captions(caption)))] = color
  out[(CORRUPT[1],)] = None
  return out


def _close(a, b):
  """Decoded colours match within JPEG's rounding."""
  assert a.keys() == b.keys()
  for k in a:
    assert (a[k] is None) == (b[k] is None), k
    if a[k] is not None:
      assert np.abs(np.subtract(a[k], b[k])).max() <= 3, (k, a[k], b[k])


def test_folder_source_reads_every_caption_kind_and_counts_images_without_one(tmp_path):
  write_folder(tmp_path)
  src = sources.make_source(dict(DATA, path=str(tmp_path)))
  assert len(src) == 6 and src.missing == 1  # 5 captioned images + the corrupt one; e.png has none
  _close(_decoded_colours(src), _expected())
  kept = sources.make_source(dict(DATA, path=str(tmp_path), missing_caption="empty"))
  assert len(kept) == 7 and kept.missing == 1
  _close(_decoded_colours(kept), _expected(skip_missing=False))
  named = sources.make_source(dict(DATA, path=str(tmp_path), caption_from="filename"))
  assert sorted(named[i]["caption"] for i in range(len(named))) == list("abcdefg")


def test_webdataset_source_equals_the_folder(tmp_path):
  shards = write_shards(tmp_path)
  src = sources.make_source(dict(DATA, source="webdataset", path=str(tmp_path / "shard-{000..001}.tar")))
  assert src.shards == shards and len(src) == 6 and src.missing == 1
  _close(_decoded_colours(src), _expected())
  same = sources.make_source(dict(DATA, source="webdataset", path=",".join(shards)))
  assert [same[i]["image"] for i in range(6)] == [src[i]["image"] for i in range(6)]


def test_parquet_source_reads_bytes_and_hugging_face_image_structs(tmp_path):
  write_parquet(tmp_path)
  cfg = dict(DATA, source="parquet", path=str(tmp_path), caption_key="text")
  src = sources.make_source(cfg)
  assert len(src) == 6 and src.missing == 1
  expected = {(sorted(k)[0],): v for k, v in _expected().items()}
  _close(_decoded_colours(src), expected)
  assert len(sources.make_source(dict(cfg, missing_caption="empty"))) == 7
  with pytest.raises(ValueError, match=r"no column 'caption' .*set data.caption_key"):
    sources.make_source(dict(cfg, caption_key="caption"))


@pytest.mark.parametrize("kind", ["folder", "webdataset", "parquet"])
def test_pipeline_skips_corrupt_images_and_resumes_exactly(tmp_path, kind):
  {"folder": write_folder, "webdataset": write_shards, "parquet": write_parquet}[kind](tmp_path)
  cfg = dict(DATA, source=kind, path=str(tmp_path), caption_key="text" if kind == "parquet" else "caption")
  p = pipeline.make_pipeline(cfg, global_batch=3, max_len=32, seed=1)
  batches = [next(p) for _ in range(8)]  # 24 good records: four epochs of 6, one corrupt skipped per epoch
  assert p.skipped in (4, 5)  # the fifth epoch's corrupt record may come before its fourth good one
  seen = [tokens.detokenize(t) for b in batches for t in b["tokens"]]
  allowed = set().union(*(_captions(c) for *_, c in _items() if c is not None))
  assert set(seen) <= allowed
  if kind != "parquet":  # the .txt lines: one picked per epoch, and over four epochs not always the same
    assert len(set(seen) & set(ITEMS[1][3])) >= 2
  assert all(b["image"].shape == (3, 8, 8, 3) for b in batches)
  state = p.iterator.get_state()
  rest = [next(p) for _ in range(4)]
  q = pipeline.make_pipeline(cfg, global_batch=3, max_len=32, seed=1)
  q.iterator.set_state(state)
  for a, b in zip(rest, [next(q) for _ in range(4)]):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  p.iterator.close(), q.iterator.close()


def test_caption_choice_depends_on_the_global_position_only():
  lines = ("one", "two", "three")
  picks = [files.caption_choice(lines, 0, i) for i in range(300)]
  counts = [picks.count(x) for x in lines]
  assert min(counts) > 70  # uniform: 100 each expected
  assert picks == [files.caption_choice(lines, 0, i) for i in range(300)]
  assert picks != [files.caption_choice(lines, 1, i) for i in range(300)]
  # Two processes together see the captions one process sees (PickCaption runs before the split).
  source = [dict(image=np.zeros((8, 8, 3), np.uint8), caption=lines)] * 12
  import grain

  def stream(pi, pc):
    ds = grain.MapDataset.source(source).seed(3).shuffle().repeat(None).map_with_index(pipeline.PickCaption(3))
    ds = pipeline.ProcessRows(ds, pi, pc, 4 // pc)
    return [ds[i]["caption"] for i in range(24 // pc)]
  one, (a, b) = stream(0, 1), (stream(0, 2), stream(1, 2))
  merged = [x for k in range(6) for x in a[2 * k:2 * k + 2] + b[2 * k:2 * k + 2]]
  assert merged == one


def test_bad_locations_fail_before_compute_naming_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing at .*nope"):
    sources.make_source(dict(DATA, path=str(tmp_path / "nope")))
  with pytest.raises(FileNotFoundError, match="no captioned images"):
    sources.make_source(dict(DATA, path=str(tmp_path)))
  with pytest.raises(ValueError, match="needs data.path"):
    sources.make_source(dict(DATA, source="webdataset"))
  with pytest.raises(FileNotFoundError, match=r"shard-00\[0-1\]|shard-000.tar"):
    sources.make_source(dict(DATA, source="webdataset", path=str(tmp_path / "shard-{000..001}.tar")))
  (tmp_path / "x.tar.gz").write_bytes(b"")
  with pytest.raises(ValueError, match="compressed tar shards"):
    sources.make_source(dict(DATA, source="webdataset", path=str(tmp_path / "x.tar.gz")))
  (tmp_path / "y.tar").write_bytes(b"garbage" * 100)
  with pytest.raises(ValueError, match="not a readable tar"):
    sources.make_source(dict(DATA, source="webdataset", path=str(tmp_path / "y.tar")))
  (tmp_path / "z.parquet").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="not a readable parquet"):
    sources.make_source(dict(DATA, source="parquet", path=str(tmp_path / "z.parquet")))
  with pytest.raises(FileNotFoundError, match="no captioned images"):  # images, but none captioned
    (tmp_path / "only.png").write_bytes(_encode((4, 4), "PNG", (1, 2, 3)))
    sources.make_source(dict(DATA, path=str(tmp_path)))


def test_training_through_the_cli_on_a_folder_counts_what_it_skipped(tmp_path):
  """`python -m jdiff.main` on a folder: trains, and metrics.jsonl counts the corrupt image."""
  import helpers

  write_folder(tmp_path / "data")
  work = tmp_path / "w"
  helpers.cli("jdiff.main", "--config=configs/mmdit_256.py:test", f"--workdir={work}", "--config.data.source=folder",
              f"--config.data.path={tmp_path / 'data'}", "--config.train.num_steps=6", "--config.train.log_every=6",
              "--config.train.sample_every=0", "--config.train.batch_size=4")
  with open(work / "metrics.jsonl") as f:
    last = [json.loads(line) for line in f][-1]
  # 6 steps of batch 4 read 24 good records: four or five passes over the 5 good images, one corrupt in each.
  assert last["step"] == 6 and last["skipped_records"] in (4, 5), last
  assert np.isfinite(last["loss"])


def _same_file(a, b):
  """Two output files hold the same: the same records for ArrayRecord files (whose padding
  bytes are not reproducible), the same bytes otherwise."""
  if str(a).endswith(".array_record"):
    import grain

    ra, rb = (grain.sources.ArrayRecordDataSource([str(p)]) for p in (a, b))
    return len(ra) == len(rb) and all(ra[i] == rb[i] for i in range(len(ra)))
  return a.read_bytes() == b.read_bytes()


def _records(src):
  """{(image bytes, caption alternatives)} of the records of `src` whose image decodes."""
  from jdiff.data import shards

  out = set()
  for i in range(len(src)):
    rec = src[i]
    try:
      shards.encoded(rec["image"])
    except Exception:
      continue
    caption = rec["caption"]
    values = caption if isinstance(caption, tuple) else (caption,)
    out.add((bytes(rec["image"]), tuple(v.decode() if isinstance(v, bytes) else v for v in values)))
  return out


@pytest.mark.parametrize("kind", ["folder", "parquet"])
def test_prepare_writes_arrayrecord_shards_that_read_as_the_source(tmp_path, kind):
  """Worker processes (spawn: the source is pickled to them), shards of 2 records; the
  arrayrecord source over the output holds exactly the source's decodable records."""
  from jdiff.data import shards

  {"folder": write_folder, "parquet": write_parquet}[kind](tmp_path / "in")
  cfg = dict(DATA, source=kind, path=str(tmp_path / "in"), caption_key="text" if kind == "parquet" else "caption")
  result = shards.prepare(cfg, str(tmp_path / "out"), records_per_shard=2, workers=2)
  assert result["shards"] == result["shards_done"] == 3 and result["kept"] == 5 and result["missing_caption"] == 1
  assert result["skipped"] == {"UnidentifiedImageError": 1}
  with open(tmp_path / "out" / shards.SUMMARY) as f:
    assert json.load(f) == json.loads(json.dumps(result))
  prepared = sources.make_source(dict(DATA, source="arrayrecord", path=str(tmp_path / "out")))
  assert len(prepared) == 5
  assert _records(prepared) == _records(sources.make_source(cfg))
  # The images' sizes come with the shards (for aspect-ratio buckets), equal to their headers.
  assert np.load(tmp_path / "out" / shards.SIZES).shape == (5, 2)
  assert [prepared.image_size(i) for i in range(5)] == [files.header_size(prepared[i]["image"]) for i in range(5)]


def test_prepare_resumes_after_a_kill_to_the_same_files_and_splits_work_by_process(tmp_path, monkeypatch):
  from jdiff.data import shards

  write_folder(tmp_path / "in")
  cfg = dict(DATA, path=str(tmp_path / "in"))
  whole = tmp_path / "whole"
  shards.prepare(cfg, str(whole), records_per_shard=1)
  # A killed run: shards 0 and 2 finished, shard 1 renamed but without its summary, shard 3 half-written.
  killed = tmp_path / "killed"
  shards.prepare(cfg, str(killed), records_per_shard=1, process_index=0, process_count=2)  # shards 0, 2, 4
  for shard in (4,):
    os.remove(killed / (shards.SHARD.format(shard, 6) + ".json"))
  (killed / (shards.SHARD.format(3, 6) + ".array_record.tmp")).write_bytes(b"partial")
  assert not (killed / shards.SUMMARY).exists()
  calls = []
  real = shards.write_shard
  monkeypatch.setattr(shards, "write_shard", lambda *job: calls.append(job[1]) or real(*job))
  result = shards.prepare(cfg, str(killed), records_per_shard=1)
  assert sorted(calls) == [1, 3, 4, 5] and result["shards_done"] == 6
  names = sorted(os.listdir(whole))
  assert names == sorted(os.listdir(killed)) and not any(n.endswith(".tmp") for n in names)
  for name in names:
    if name == shards.SUMMARY:  # the same but for the output directory it names
      a, b = (json.loads((d / name).read_text()) for d in (whole, killed))
      assert a.pop("out") != b.pop("out") and a == b
    else:
      assert _same_file(whole / name, killed / name), name
  with pytest.raises(ValueError, match="other records_per_shard"):
    shards.prepare(cfg, str(killed), records_per_shard=2)


def test_prepare_cli_on_webdataset_shards(tmp_path):
  import helpers

  write_shards(tmp_path)
  proc = helpers.cli("jdiff.prepare", "--config=configs/mmdit_256.py:test", "--config.data.source=webdataset",
                     f"--config.data.path={tmp_path}", f"--out={tmp_path / 'out'}", "--records_per_shard=4",
                     "--workers=2")
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert (result["records"], result["kept"], result["shards_done"], result["missing_caption"]) == (6, 5, 2, 1)
  prepared = sources.make_source(dict(DATA, source="arrayrecord", path=str(tmp_path / "out" / "*.array_record")))
  assert _records(prepared) == _records(sources.make_source(dict(DATA, source="webdataset", path=str(tmp_path))))


def test_prepare_killed_with_sigkill_resumes_to_the_same_files(tmp_path):
  """SIGKILL once the first shard is done, then the same command: the files of an uninterrupted run."""
  import signal
  import subprocess
  import sys
  import time

  import helpers
  import xla_env
  from jdiff import config as config_lib
  from jdiff.data import shards

  args = ["--config=configs/mmdit_256.py:test", "--num_records=400", "--records_per_shard=10", "--workers=1"]
  out = tmp_path / "killed"
  env = xla_env.env()
  proc = subprocess.Popen([sys.executable, "-m", "jdiff.prepare", *args, f"--out={out}"], cwd=helpers.ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = out / (shards.SHARD.format(0, 40) + ".json")
  deadline = time.time() + 120
  while not first.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = [n for n in os.listdir(out) if n.endswith(".json") and n.startswith("shard")]
  assert 1 <= len(done) < 40, len(done)  # killed part way
  helpers.cli("jdiff.prepare", *args, f"--out={out}")
  whole = tmp_path / "whole"
  shards.prepare(config_lib.load(os.path.join(helpers.ROOT, "configs", "mmdit_256.py:test")).data, str(whole),
                      records_per_shard=10, num_records=400)
  names = sorted(n for n in os.listdir(whole) if n != shards.SUMMARY)
  assert names == sorted(n for n in os.listdir(out) if n != shards.SUMMARY) and len(names) == 82  # + sizes.npy
  for name in names:
    assert _same_file(whole / name, out / name), name


def test_parquet_reads_from_many_threads_at_once(tmp_path):
  """Grain reads with several threads; pyarrow's ParquetFile must not be shared between them."""
  import concurrent.futures

  import pyarrow as pa
  import pyarrow.parquet as pq

  images = [_encode((12, 8), "PNG", (i, 255 - i, 7)) for i in range(200)]
  pq.write_table(pa.table({"image": images, "caption": [f"image {i}" for i in range(200)]}),
                 tmp_path / "data.parquet", row_group_size=7)
  src = sources.make_source(dict(DATA, source="parquet", path=str(tmp_path)))
  order = np.random.default_rng(0).integers(0, 200, 3000)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    got = list(pool.map(lambda i: src[int(i)], order))
  assert all(r["caption"] == f"image {i}" and r["image"] == images[i] for r, i in zip(got, order))
