"""Input-pipeline throughput against what the train step consumes.

  python benchmarks/loader.py [--seconds=20] [--threads=config,8] [--workers=2] [--worker_chunk=32]
                             [--cache_records=512] [--jpeg_records=512] [--jpeg_sources=folder,parquet]
                             [--keep=DIR]

Builds the real grain pipeline (make_pipeline: shuffle, per-process rows, render/decode,
resize, tokenise or read cached arrays, batch) and counts images per second after a
warm-up batch, with the config's read threads, other thread counts (--threads) and
worker processes (--workers), for:
- cpu: the CPU demo config (24 px shapes); demand --demand_cpu, measured with
  `python -m jdiff.bench --config=configs/mmdit_256.py:cpu`;
- gpu: the GPU default (256 px shapes, batch 256); demand --demand_gpu, the H100 run in
  BENCHMARKS.md;
- cache: a latent cache in SD3's shapes at 256 px (latents 32x32x16 mean and log-variance,
  context 333x4096 and pooled 2048, float16, 2.8 MB per record; synthetic values written
  to a temporary directory with jdiff's own cache writer), batch 128; demand
  --demand_cache, an estimate: the H100's d24 step at that latent size ran 263 images/s
  with 16 text tokens, and with SD3's 333 the analytic FLOPs per image (jdiff.bench's
  formula: 256 + 333 tokens through every block) are 2.24x, so ~118 images/s at the same
  MFU;
- jpeg_<source>: real-data decoding: 512x384 JPEGs (quality 90) with captions, written as
  each of --jpeg_sources (tf.train.Example ArrayRecord records; a folder of .jpg + .txt;
  webdataset tar shards of 256; parquet with Hugging Face's Image struct in row groups of
  100), decoded, resized and centre-cropped to the GPU default's 256 px; demand --demand_gpu.
The loader must supply at least 5x.
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(variant):
  from jdiff import config as config_lib

  return config_lib.load(os.path.join(ROOT, "configs", f"mmdit_256.py:{variant}"))


def sd3_cache(directory, records, context_len=333):
  """Writes `records` synthetic cache records in SD3's 256 px shapes; returns the directory."""
  from jdiff.data import latents

  rng = np.random.default_rng(0)
  latent = rng.standard_normal((2, 32, 32, 16)).astype(np.float16)
  context = rng.standard_normal((context_len, 4096)).astype(np.float16)
  pooled = rng.standard_normal(2048).astype(np.float32)
  writer = latents.RecordWriter(directory, records_per_file=256)
  for i in range(records):
    writer.write(dict(latent_mean=latent[0] + np.float16(i % 7), latent_logvar=latent[1], context=context,
                      pooled=pooled), f"record {i}", i)
  writer.write_meta(skipped=0, latent_shape=[32, 32, 16], context_shape=[context_len, 4096], pooled_dim=2048,
                    dtype="float16")
  return directory


def jpegs(records, size=(512, 384)):
  """`records` (JPEG bytes, caption) pairs: shapes rendered at `size` = (width, height), quality
  90, standing in for photos."""
  import io

  from PIL import Image

  from jdiff.data import shapes

  for i in range(records):
    scene, caption = shapes.scene_for(0, "train", i)
    buf = io.BytesIO()
    Image.fromarray(shapes.render(scene, size[::-1])).save(buf, format="JPEG", quality=90)
    yield buf.getvalue(), caption


def write_arrayrecord(directory, records):
  """tf.train.Example records of image bytes and caption, as real-data ArrayRecord files hold
  them; returns their glob pattern."""
  from array_record.python import array_record_module
  from tensorflow_datasets.proto import tf_example_pb2

  os.makedirs(directory, exist_ok=True)
  writer = array_record_module.ArrayRecordWriter(os.path.join(directory, "images.array_record"), "group_size:1")
  for image, caption in records:
    example = tf_example_pb2.Example()
    example.features.feature["image"].bytes_list.value.append(image)
    example.features.feature["caption"].bytes_list.value.append(caption.encode())
    writer.write(example.SerializeToString())
  writer.close()
  return os.path.join(directory, "*.array_record")


def write_folder(directory, records):
  """NNNNNN.jpg + NNNNNN.txt in subdirectories of 1000; returns the directory."""
  for i, (image, caption) in enumerate(records):
    sub = os.path.join(directory, f"{i // 1000:03d}")
    os.makedirs(sub, exist_ok=True)
    with open(os.path.join(sub, f"{i:06d}.jpg"), "wb") as f:
      f.write(image)
    with open(os.path.join(sub, f"{i:06d}.txt"), "w") as f:
      f.write(caption)
  return directory


def write_webdataset(directory, records, per_shard=256):
  """Tar shards of NNNNNN.jpg + NNNNNN.txt members; returns their brace pattern."""
  import io
  import tarfile

  os.makedirs(directory, exist_ok=True)
  tar, shard = None, -1
  for i, (image, caption) in enumerate(records):
    if i % per_shard == 0:
      if tar is not None:
        tar.close()
      shard += 1
      tar = tarfile.open(os.path.join(directory, f"shard-{shard:05d}.tar"), "w")
    for name, payload in ((f"{i:06d}.jpg", image), (f"{i:06d}.txt", caption.encode())):
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  tar.close()
  return os.path.join(directory, f"shard-{{00000..{shard:05d}}}.tar")


def write_parquet(directory, records, row_group=100):
  """Parquet files with Hugging Face's Image struct column and a text column (row groups of
  100 images, as the datasets library writes image data); returns the directory."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  os.makedirs(directory, exist_ok=True)
  rows = list(records)
  table = pa.table({"image": [{"bytes": image, "path": None} for image, _ in rows],
                    "caption": [caption for _, caption in rows]})
  pq.write_table(table, os.path.join(directory, "train-00000.parquet"), row_group_size=row_group)
  return directory


WRITERS = dict(arrayrecord=("arrayrecord_pattern", write_arrayrecord), folder=("path", write_folder),
               webdataset=("path", write_webdataset), parquet=("path", write_parquet))


def rate(c, seconds, **data_overrides):
  from jdiff.data import pipeline

  data = dict(c.data, **data_overrides)
  p = pipeline.make_pipeline(data, global_batch=c.train.batch_size, max_len=c.text.max_len, seed=0,
                             process_index=0, process_count=1)
  # Warm-up: every worker process has started and sent its first chunk (on 2 cores, eight
  # workers take seconds to start; counting that time would measure the start, not the rate).
  chunk = getattr(p, "worker_chunk", 1)  # (1: a tree from before worker chunks)
  for _ in range(1 + -(-data["num_workers"] * chunk // c.train.batch_size)):
    next(p)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    n += len(next(iter(next(p).values())))
  return n / (time.perf_counter() - t0), chunk


def measure(name, c, demand, args):
  """One JSON line per mode (thread counts, worker counts) for config `c`."""
  from jdiff.data import pipeline

  modes = [dict(read_threads=c.data.read_threads if t == "config" else int(t)) for t in args.threads.split(",") if t]
  modes += [dict(num_workers=int(w), **({"worker_chunk": args.worker_chunk} if args.worker_chunk else {}))
            for w in args.workers.split(",") if w]
  for overrides in modes:
    r, chunk = rate(c, args.seconds, **overrides)
    data = dict(c.data, **overrides)
    print(json.dumps(dict(config=name, resolution=c.data.resolution, batch=c.train.batch_size,
                          read_threads=pipeline.read_threads(data), num_workers=data["num_workers"],
                          **({"worker_chunk": chunk} if data["num_workers"] else {}),
                          images_per_s=round(r, 1), step_demand=demand, headroom=round(r / demand, 2))),
          flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--seconds", type=float, default=20)
  ap.add_argument("--demand_cpu", type=float, default=408.5, help="images/s the CPU demo step consumes")
  ap.add_argument("--demand_gpu", type=float, default=389.4, help="images/s of the GPU default step (H100)")
  ap.add_argument("--demand_cache", type=float, default=118.0,
                  help="images/s of d24 at 256 px latents with SD3's text length (H100, estimated)")
  ap.add_argument("--cache_records", type=int, default=512, help="records of the synthetic SD3 cache (0: skip)")
  ap.add_argument("--jpeg_records", type=int, default=512, help="JPEGs written in each --jpeg_sources format (0: skip)")
  ap.add_argument("--jpeg_sources", default="arrayrecord,folder,webdataset,parquet",
                  help="comma-separated data sources to write the JPEGs as and read back")
  ap.add_argument("--keep", default="", help="write the JPEG datasets here and keep them (default: a temporary "
                                             "directory, removed)")
  ap.add_argument("--threads", default="config,8",
                  help="comma-separated read-thread counts to try ('config': the config's own setting)")
  ap.add_argument("--workers", default="2", help="comma-separated worker-process counts to try besides threads")
  ap.add_argument("--worker_chunk", type=int, default=0,
                  help="elements a worker sends at once (0: the config's data.worker_chunk)")
  args = ap.parse_args()
  runs = [("cpu", config("cpu"), args.demand_cpu), ("gpu", config("gpu"), args.demand_gpu)]
  tmp = tempfile.mkdtemp(prefix="jdiff_loader_cache_")
  if args.cache_records:
    c = config("gpu")
    c.update_from_flattened_dict({"data.source": "cache", "data.cache_dir": sd3_cache(tmp, args.cache_records),
                                  "train.batch_size": 128})
    runs.append(("cache", c, args.demand_cache))
  for source in args.jpeg_sources.split(",") if args.jpeg_records else ():
    field, write = WRITERS[source]
    c = config("gpu")
    c.update_from_flattened_dict({"data.source": source, f"data.{field}": write(
        os.path.join(args.keep or tmp, f"jpeg_{source}"), jpegs(args.jpeg_records))})
    runs.append((f"jpeg_{source}", c, args.demand_gpu))
  try:
    for name, c, demand in runs:
      measure(name, c, demand, args)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
