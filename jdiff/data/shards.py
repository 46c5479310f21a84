"""Convert any data source into sharded ArrayRecord files: the fast path for large data
(the library behind `python -m jdiff.prepare`).

  python -m jdiff.prepare --config=configs/mmdit_256.py --config.data.source=folder \\
      --config.data.path=/data/my_images --out=/data/my_images_ar [--records_per_shard=4096] [--workers=8]

Then train with --config.data.source=arrayrecord --config.data.path=OUT.

Record i of the source goes to shard i // records_per_shard as a tf.train.Example with the
image's original encoded bytes (arrays, as the embedded shapes give them, are written as
PNG) and its captions (a caption file's lines as one value each; training picks one per
epoch, as from the folder). Images that do not decode are left out and counted by reason.
Worker processes write whole shards, each to a temporary file renamed into place, then its
summary (SHARD.json) beside it: a shard with its summary is done, so running the same
command again after a kill writes only the missing shards, and the same files. With
--process_count=N each of N processes (say, the hosts of a job) writes the shards k with
k % N == --process_index. The totals are printed as one JSON line and, once every shard
is there, written to OUT/summary.json, with the images' sizes in OUT/sizes.npy (which
aspect-ratio buckets read instead of every image's header).
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import json
import logging
import math
import multiprocessing
import os
import re
from typing import Any, Mapping

import numpy as np
from PIL import Image
import tqdm

from jdiff import errors
from jdiff.data import files
from jdiff.data import sources

log = logging.getLogger(__name__)

SHARD = "shard-{:05d}-of-{:05d}"  # + .array_record (the records) and .json (the shard's summary)
PLAN = "prepare.json"  # what OUT is a conversion of; a later run into OUT must match it
SUMMARY = "summary.json"
SIZES = sources.PREPARED_SIZES  # (width, height) of every record in shard order, once all shards are written
EXAMPLES = 5  # skipped records named per shard summary

_source = None  # the worker process's source


def _init_worker(source) -> None:
  global _source
  _source = source


def encoded(image: Any) -> bytes:
  """A record's image as encoded bytes that decode (checked: a full decode), arrays as PNG."""
  if isinstance(image, (bytes, bytearray, memoryview)):
    data = bytes(image)
    with Image.open(io.BytesIO(data)) as pil:
      pil.load()
    return data
  arr = np.asarray(image)
  if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected encoded bytes or a uint8 [H, W, 1|3|4] image, got {arr.dtype} {arr.shape}")
  buf = io.BytesIO()
  Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
  return buf.getvalue()


def caption_values(caption: Any) -> list[bytes]:
  """A record's caption, or its alternatives, as UTF-8 values."""
  values = caption if isinstance(caption, (tuple, list)) else [caption]
  return [bytes(v) if isinstance(v, (bytes, np.bytes_)) else str(v).encode("utf-8") for v in values]


def example(image: bytes, captions: list[bytes], image_key: str = "image", caption_key: str = "caption") -> bytes:
  """A serialized tf.train.Example, as sources.ArrayRecordExamples reads it."""
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top  # slow import

  ex = tf_example_pb2.Example()
  ex.features.feature[image_key].bytes_list.value.append(image)
  ex.features.feature[caption_key].bytes_list.value.extend(captions)
  return ex.SerializeToString(deterministic=True)  # map entries in key order: the same bytes every run


def _write_json(path: str, value: Mapping[str, Any]) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=1)
  os.replace(path + ".tmp", path)


def write_shard(out_dir: str, shard: int, num_shards: int, start: int, stop: int) -> dict[str, Any]:
  """Writes records [start, stop) of the worker's source as shard `shard`; returns its summary."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  base = os.path.join(out_dir, SHARD.format(shard, num_shards))
  kept, skipped, examples, sizes = 0, collections.Counter(), [], []
  writer = array_record_module.ArrayRecordWriter(base + ".array_record.tmp", "group_size:1")
  try:
    for i in range(start, stop):
      try:
        record = _source[i]
        image = encoded(record["image"])
        data = example(image, caption_values(record["caption"]))
      except Exception as e:  # an undecodable image or a record that cannot be read: counted, not fatal
        skipped[type(e).__name__] += 1
        if len(examples) < EXAMPLES:
          examples.append(re.sub(r" at 0x[0-9a-f]+", "", f"record {i}: {e!r}")[:300])  # no addresses: same files
        continue
      writer.write(data)
      sizes.append(list(files.header_size(image)))
      kept += 1
  finally:
    writer.close()
  os.replace(base + ".array_record.tmp", base + ".array_record")
  summary = dict(shard=shard, records=[start, stop], kept=kept, skipped=dict(skipped), examples=examples, sizes=sizes)
  _write_json(base + ".json", summary)
  return summary


def _plan(out_dir: str, plan: dict[str, Any]) -> None:
  """Records what OUT converts, or checks that an earlier run into OUT converted the same."""
  path = os.path.join(out_dir, PLAN)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    differ = sorted(k for k in set(plan) | set(old) if old.get(k) != plan.get(k))
    if differ:
      raise errors.InvalidArgument(
          f"{out_dir} holds a conversion with other {', '.join(differ)} (see its {PLAN}); use another --out, or "
          "remove it to start over")
    return
  os.makedirs(out_dir, exist_ok=True)
  _write_json(path, plan)


def totals(out_dir: str, num_shards: int) -> dict[str, Any]:
  """The summaries of the shards written so far, added up."""
  done, kept, skipped, examples, sizes = 0, 0, collections.Counter(), [], []
  for shard in range(num_shards):
    path = os.path.join(out_dir, SHARD.format(shard, num_shards) + ".json")
    if os.path.exists(path):
      with open(path) as f:
        s = json.load(f)
      done, kept = done + 1, kept + s["kept"]
      skipped.update(s["skipped"])
      examples.extend(s["examples"][:EXAMPLES - len(examples)])
      sizes.extend(s["sizes"])
  return dict(shards_done=done, shards=num_shards, kept=kept, skipped=dict(skipped), skipped_examples=examples,
              sizes=sizes)


def prepare(data_cfg: Mapping[str, Any], out_dir: str, *, records_per_shard: int = 4096, workers: int = 1,
            num_records: int | None = None, split: str = "train", process_index: int = 0,
            process_count: int = 1) -> dict[str, Any]:
  """Converts config.data's source (its first num_records records) into ArrayRecord shards in
  out_dir; returns the totals (this process's shards and any others already written)."""
  if data_cfg["source"] in ("cache", "preference"):
    raise errors.InvalidArgument(f"data.source={data_cfg['source']!r}: prepare converts captioned images; "
                                 "set the source to read")
  if not 0 <= process_index < process_count:
    raise errors.InvalidArgument(f"--process_index={process_index} must be below --process_count={process_count}")
  source = sources.make_source(data_cfg, split)
  n = len(source) if num_records is None else min(num_records, len(source))
  num_shards = math.ceil(n / records_per_shard)
  data = {k: v for k, v in dict(data_cfg).items() if k in ("source", "path", "arrayrecord_pattern", "tfds_name",
                                                              "tfds_split", "tfds_data_dir", "image_key", "caption_key",
                                                              "caption_from", "missing_caption", "shapes_size",
                                                              "shapes_seed", "shapes_split")}
  _plan(out_dir, dict(data=data, split=split, num_records=n, records_per_shard=records_per_shard))
  todo = [k for k in range(process_index, num_shards, process_count)
          if not os.path.exists(os.path.join(out_dir, SHARD.format(k, num_shards) + ".json"))]
  jobs = [(out_dir, k, num_shards, k * records_per_shard, min(n, (k + 1) * records_per_shard)) for k in todo]
  log.info("%s: %d records in %d shards; %d shards to write here", source, n, num_shards, len(jobs))
  bar = tqdm.tqdm(total=sum(stop - start for *_, start, stop in jobs), desc="prepare", unit="img",
                  dynamic_ncols=True)
  try:
    if workers == 1 or len(jobs) <= 1:
      _init_worker(source)
      for job in jobs:
        bar.update(write_shard(*job)["records"][1] - job[3])
    else:
      # spawn: the workers start without this process's threads (grain, pyarrow).
      with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), multiprocessing.get_context("spawn"),
                                                  initializer=_init_worker, initargs=(source,)) as pool:
        for future in concurrent.futures.as_completed([pool.submit(write_shard, *job) for job in jobs]):
          start, stop = future.result()["records"]
          bar.update(stop - start)
  finally:
    bar.close()
  result = dict(out=out_dir, records=n, missing_caption=getattr(source, "missing", 0), **totals(out_dir, num_shards))
  sizes = np.asarray(result.pop("sizes"), np.int32).reshape(-1, 2)
  if result["shards_done"] == num_shards:
    # For aspect-ratio buckets, which then need not read every image's header.
    np.save(os.path.join(out_dir, SIZES + ".tmp.npy"), sizes)
    os.replace(os.path.join(out_dir, SIZES + ".tmp.npy"), os.path.join(out_dir, SIZES))
    _write_json(os.path.join(out_dir, SUMMARY), result)
  return result
