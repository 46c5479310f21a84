"""The grain input pipeline: seeded shuffle -> one of each record's alternative captions -> this
process's rows -> decode, resize, tokenise
-> skip corrupt records -> batch -> global jax.Arrays on the mesh.

Each process reads only its own rows of each global batch of the globally shuffled index
order (ProcessRows); together the processes cover every record once per epoch, and the
global batches do not depend on the number of processes. The iterator's state (a position in that
order) is saved in every checkpoint, so a resumed run continues with the same batches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import concurrent.futures
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import flags
import grain
import jax
import numpy as np

from jdiff import errors
from jdiff import tokens
from jdiff.data import buckets as buckets_lib
from jdiff.data import latents
from jdiff.data import decode as decode_lib
from jdiff.data import files
from jdiff.data import sources

log = logging.getLogger(__name__)


class Preprocess(grain.transforms.MapWithIndex):
  """record -> {'image': uint8 [R, R, 3], 'tokens': int32 [max_len]} or decode_lib.Corrupt (preference
  pairs: 'image_w' and 'image_l' instead of 'image')."""

  def __init__(self, resolution: int, max_len: int, loss_mask: str = "none"):
    self.resolution, self.max_len, self.loss_mask = resolution, max_len, loss_mask

  def map_with_index(self, index: int, record):
    if isinstance(record, decode_lib.Corrupt):
      return record
    try:
      caption = files.caption_choice(record["caption"], 0, index)  # (one already picked by PickCaption)
      if self.loss_mask != "none":
        return dict(decode_lib.decode_image(record, self.resolution, self.loss_mask),
                    tokens=tokens.tokenize(caption, self.max_len))
      images = {k: decode_lib.to_rgb(record[k], self.resolution) for k in decode_lib.IMAGE_KEYS if k in record}
      if not images:
        raise KeyError(f"no image field among {decode_lib.IMAGE_KEYS}")
      return dict(images, tokens=tokens.tokenize(caption, self.max_len))
    except Exception as e:  # undecodable image, missing field, bad text
      return decode_lib.Corrupt(int(index), f"decode: {e!r}")


class CheckCached(grain.transforms.MapWithIndex):
  """A cache record, checked against the cache's shapes (a damaged record becomes decode_lib.Corrupt)."""

  def __init__(self, meta: Mapping[str, Any]):
    self.shapes = dict(latent_mean=tuple(meta["latent_shape"]), latent_logvar=tuple(meta["latent_shape"]),
                       context=tuple(meta["context_shape"]), pooled=(meta["pooled_dim"],))
    if meta.get("loss_mask", "none") != "none":
      self.shapes[latents.MASK_KEY] = tuple(meta["latent_shape"][:2]) + (1,)

  def map_with_index(self, index: int, record):
    if isinstance(record, decode_lib.Corrupt):
      return record
    try:
      for key, shape in self.shapes.items():
        if record[key].shape != shape:
          raise ValueError(f"{key} has shape {record[key].shape}, expected {shape}")
      return {k: record[k] for k in self.shapes}
    except Exception as e:
      return decode_lib.Corrupt(int(index), f"cache: {e!r}")


class SkipCorrupt(grain.transforms.Filter):
  """Drops decode_lib.Corrupt markers, counting and logging them (runs in the main process)."""

  def __init__(self):
    self.skipped = 0

  def filter(self, element) -> bool:
    if isinstance(element, decode_lib.Corrupt):
      self.skipped += 1
      log.warning("skipping corrupt record %d (%s); %d skipped so far", element.index, element.error,
                  self.skipped)
      return False
    return True

  def unpack(self, chunk: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    """A pack_chunk output -> its stacked good rows, counting and logging the corrupt ones."""
    for marker in chunk["corrupt"]:
      self.filter(marker)
    return chunk["rows"]


def pack_chunk(elements: Sequence[Any]) -> dict[str, Any]:
  """Consecutive elements as one: the good ones stacked ("rows", None if there are none)
  and the decode_lib.Corrupt markers ("corrupt"), for SkipCorrupt.unpack in the main process."""
  good = [e for e in elements if not isinstance(e, decode_lib.Corrupt)]
  rows = {key: np.stack([e[key] for e in good]) for key in good[0]} if good else None
  return {"rows": rows, "corrupt": [e for e in elements if isinstance(e, decode_lib.Corrupt)]}


WORKER_CHUNK_BYTES = 16 * 2**20


def worker_chunk(configured: int, element: Any) -> int:
  """Elements per worker transfer: data.worker_chunk, fewer if that many `element`s would
  exceed WORKER_CHUNK_BYTES (large records such as latent-cache records, whose full chunks
  would, with several workers and their prefetch buffers, exhaust shared memory)."""
  if isinstance(element, decode_lib.Corrupt):
    return configured
  size = sum(np.asarray(v).nbytes for v in element.values())
  return max(1, min(configured, WORKER_CHUNK_BYTES // max(size, 1)))


class PickCaption(grain.transforms.MapWithIndex):
  """A record with alternative captions (a caption file's lines) -> one of them, drawn from
  (seed, position in the global stream): another draw each epoch, and the same one whatever
  the number of processes (this map runs before ProcessRows splits the stream)."""

  def __init__(self, seed: int):
    self.seed = seed

  def map_with_index(self, index: int, record):
    if isinstance(record, decode_lib.Corrupt) or not isinstance(record.get("caption"), (tuple, list)):
      return record
    return {**record, "caption": files.caption_choice(record["caption"], self.seed, index)}


class ProcessRows(grain.MapDataset):
  """This process's rows of every global batch: element k is global element
  (k // L) * G + p * L + k % L of `parent` (L = G / P rows per process, p = this process).

  Global batch b is then elements [b*G, (b+1)*G) of the shuffled order, laid out by
  process, whatever the number of processes: the same run on 1 or N hosts sees the same
  batches in the same order.
  """

  def __init__(self, parent: grain.MapDataset, process_index: int, process_count: int, local_batch: int):
    super().__init__(parent)
    self._p, self._n, self._local = process_index, process_count, local_batch
    self._length = len(parent) // process_count

  def __len__(self) -> int:
    return self._length

  def parent_index(self, index: int) -> int:
    batch, row = divmod(index, self._local)
    return batch * self._local * self._n + self._p * self._local + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self.parent_index(index)]

  def __str__(self) -> str:
    return f"ProcessRows(process={self._p}/{self._n}, rows={self._local})"


INDEX_KEY = "_index"  # each element's position in this process's stream, dropped from batches


class TagIndex(grain.transforms.MapWithIndex):
  """Adds the element's position in the process's stream (ProcessRows index) as INDEX_KEY."""

  def map_with_index(self, index: int, element):
    if isinstance(element, decode_lib.Corrupt):
      return element
    return {**element, INDEX_KEY: np.int64(index)}


class ResumableBatches:
  """The batch iterator, with a checkpoint state that is only the stream position:
  {"next_index": k}, one past the last element delivered (elements arrive in order, with
  threads or worker processes alike). Restoring rebuilds the iterator from element k, so a
  run may resume with other data.read_threads or data.num_workers than it was saved with;
  grain's own state records its internal structure (per-worker positions) and restores
  only into the same one. The state of runs saved by grain's thread iterator,
  {"next_index": k} with the same meaning, restores as well.

  Checkpointed through grain.checkpoint.CheckpointSave/Restore (the bytes protocol).
  """

  def __init__(self, build: Callable[[int], Iterator[dict[str, np.ndarray]]]):
    self._build = build
    self._next_index = 0
    self._it = build(0)

  def __iter__(self) -> "ResumableBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    self._next_index = int(batch.pop(INDEX_KEY).max()) + 1
    return batch

  def get_state(self) -> bytes:
    return json.dumps({"next_index": self._next_index}).encode()

  def set_state(self, state: bytes | str | Mapping[str, Any]) -> None:
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    if "next_index" not in state:
      raise ValueError(f"data iterator state {state!r} has no 'next_index': it was saved by grain's worker "
                       "iterator of an earlier jdiff; resume with that version, or start the data anew")
    self.close()
    self._next_index = int(state["next_index"])
    self._it = self._build(self._next_index)

  def start_prefetch(self) -> None:
    """Called by grain's checkpoint restore; prefetching starts with the first batch."""

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


@dataclasses.dataclass
class Pipeline:
  """A per-process iterator of host batches plus its skip counter."""

  iterator: ResumableBatches
  skip: SkipCorrupt
  per_process_batch: int
  worker_chunk: int = 0  # elements per worker transfer (0: no worker processes)
  shapes: tuple[tuple[int, int], ...] = ()  # aspect-ratio buckets: the (height, width) of batches to expect

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self.iterator

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self.iterator)

  @property
  def skipped(self) -> int:
    return self.skip.skipped


def image_sizes(source, threads: int = 16) -> np.ndarray:
  """[N, 2] (width, height) of every record's image ((0, 0): unreadable), read in threads;
  progress is logged on large data."""
  size_of = getattr(source, "image_size", None) or (lambda i: files.header_size(source[i]["image"]))

  def one(i: int) -> tuple[int, int]:
    try:
      return size_of(i)
    except Exception:  # counted by the caller, skipped like a corrupt record
      return (0, 0)

  out, last = np.zeros((len(source), 2), np.int64), time.time()
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for i, size in enumerate(pool.map(one, range(len(source)), chunksize=256)):
      out[i] = size
      if time.time() - last > 10:
        log.info("reading image sizes for the buckets: %d of %d", i + 1, len(source))
        last = time.time()
  return out


class _BatchPlan:
  """Endless sequence: element j = (bucket, this process's record indices) of global batch j."""

  def __init__(self, schedule: buckets_lib.Schedule, process_index: int, process_count: int):
    self.schedule, self.p, self.local = schedule, process_index, schedule.batch_size // process_count

  def __len__(self) -> int:
    return 2**62

  def __getitem__(self, j: int) -> tuple[int, np.ndarray]:
    bucket, records = self.schedule.batch(int(j))
    return bucket, records[self.p * self.local:(self.p + 1) * self.local]


class ReadBucketBatch(grain.transforms.MapWithIndex):
  """(bucket, record indices) of global batch j -> this process's rows {'image' [L, h, w, 3],
  'tokens', INDEX_KEY: j, CORRUPT_KEY: the decode_lib.Corrupt markers} (latent: a latent cache's records).
  A record that cannot be read is replaced by another row of the batch (or, if none can be
  read, by the bucket's next readable record), so that every process delivers every batch
  whole."""

  def __init__(self, source, shapes, schedule: buckets_lib.Schedule, max_len: int, seed: int, process_index: int,
               loss_mask: str = "none", latent: bool = False):
    self.source, self.shapes, self.schedule = decode_lib.Guarded(source), shapes, schedule
    self.max_len, self.seed, self.p, self.loss_mask, self.latent = max_len, seed, process_index, loss_mask, latent

  def _row(self, index: int, position: int, shape: tuple[int, int]):
    record = self.source[int(index)]
    if isinstance(record, decode_lib.Corrupt):
      return record
    try:
      if self.latent:  # checked against their bucket's latent shape
        for key in ("latent_mean", "latent_logvar", latents.MASK_KEY):
          if key in record and record[key].shape[:2] != tuple(shape):
            raise ValueError(f"{key} has shape {record[key].shape}, expected {tuple(shape)} (its bucket)")
        return dict(record)
      caption = files.caption_choice(record["caption"], self.seed, position)
      return dict(decode_lib.decode_image(record, shape, self.loss_mask), tokens=tokens.tokenize(caption, self.max_len))
    except Exception as e:  # undecodable image, missing field, bad text
      return decode_lib.Corrupt(int(index), f"decode: {e!r}")

  def map_with_index(self, j: int, plan):
    bucket, records = plan
    shape, local = self.shapes[bucket], len(records)
    first = j * self.schedule.batch_size + self.p * local  # global stream position of row 0
    rows = [self._row(i, first + r, shape) for r, i in enumerate(records)]
    corrupt = [r for r in rows if isinstance(r, decode_lib.Corrupt)]
    good = [r for r in rows if not isinstance(r, decode_lib.Corrupt)]
    members = self.schedule.members[bucket]
    start = int(np.random.default_rng([self.seed, j]).integers(len(members)))
    for k in range(len(members)) if not good else ():
      row = self._row(members[(start + k) % len(members)], first, shape)
      if not isinstance(row, decode_lib.Corrupt):
        good = [row]
        break
    if not good:
      raise RuntimeError(f"bucket {shape[0]}x{shape[1]}: none of its {len(members)} images can be read")
    rows = [good[k % len(good)] for k in range(local)] if corrupt else good
    return {**{key: np.stack([r[key] for r in rows]) for key in rows[0]}, INDEX_KEY: np.int64(j), CORRUPT_KEY: corrupt}


CORRUPT_KEY = "_corrupt"


def assign_buckets(buckets_cfg: Mapping[str, Any], source, seed: int = 0) -> tuple[list[tuple[int, int]], np.ndarray]:
  """data.buckets over `source`: (bucket shapes, bucket number of each record; -1: left out),
  logged with the counts. With data.buckets.sides each record gets a side at random (seeded,
  in proportion to the weights); a source that draws its images (the embedded shapes) then
  draws each at its side, any other is resized to it."""
  if buckets_cfg.get("sides"):
    sides = list(buckets_cfg["sides"])
    weights = np.asarray(buckets_cfg.get("weights") or [1.0] * len(sides), np.float64)
    which = np.random.default_rng([seed, 0x6D7273]).choice(len(sides), size=len(source), p=weights / weights.sum())
    if hasattr(source, "render_at"):
      source.render_at(np.asarray(sides, np.int32)[which])
    counts = np.bincount(which, minlength=len(sides))
    log.info("multi-resolution buckets (side: records): %s", ", ".join(f"{s}: {n}" for s, n in zip(sides, counts)))
    return [(s, s) for s in sides], which
  shapes = buckets_lib.bucket_shapes(buckets_cfg["pixels"], buckets_cfg["step"], buckets_cfg["max_aspect"])
  sizes = image_sizes(source)
  readable = (sizes > 0).all(1)
  which = np.full(len(sizes), -1)
  which[readable] = buckets_lib.assign(sizes[readable], shapes, buckets_cfg["max_upscale"])
  counts = np.bincount(which[which >= 0], minlength=len(shapes))
  log.info("aspect-ratio buckets (height x width: images): %s; %d unreadable, %d smaller than their bucket / "
           "data.buckets.max_upscale=%s left out", buckets_lib.describe(shapes, counts), int((~readable).sum()),
           int(((which < 0) & readable).sum()), buckets_cfg["max_upscale"])
  used = int((counts > 0).sum())
  if used > buckets_cfg["max_buckets"]:
    raise errors.InvalidArgument(
        f"the data fills {used} buckets, more than data.buckets.max_buckets={buckets_cfg['max_buckets']} (one "
        "compiled train step each): raise data.buckets.step or lower max_aspect, or raise max_buckets")
  return shapes, which


def _bucketed(data_cfg: Mapping[str, Any], source, *, global_batch: int, max_len: int, seed: int, pi: int,
              pc: int) -> Pipeline:
  """The pipeline of data.buckets, or of a latent cache written with them: one bucket per
  global batch (buckets.py)."""
  latent = data_cfg["source"] == "cache"
  if latent:  # the cache's buckets, fixed when it was written
    shapes, which = [tuple(s) for s in source.meta["buckets"]], source.bucket_of_record
  else:
    shapes, which = assign_buckets(data_cfg["buckets"], source, seed)
  schedule = buckets_lib.Schedule(which, len(shapes), global_batch, seed)
  used = tuple(shapes[b] for b in np.flatnonzero(schedule.counts >= 1))
  skip = SkipCorrupt()
  ds = grain.MapDataset.source(_BatchPlan(schedule, pi, pc)).map_with_index(
      ReadBucketBatch(source, shapes, schedule, max_len, seed, pi, data_cfg.get("loss_mask", "none"), latent))

  def count(batch):
    for marker in batch.pop(CORRUPT_KEY):
      skip.filter(marker)
    return batch

  def build(start: int):
    part = ds[start:] if start else ds
    threads = read_threads(data_cfg)  # each thread reads whole batches
    it = part.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(
        threads, data_cfg["prefetch"] // global_batch)))
    if data_cfg["num_workers"] > 0:
      _flags_for_workers()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg["num_workers"]))
    return iter(it.map(count))

  return Pipeline(ResumableBatches(build), skip, global_batch // pc, 0, used)


def _flags_for_workers() -> None:
  """grain's worker processes read absl flags; outside app.run (notebooks) they use defaults."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


EMBEDDED_SOURCES = ("shapes", "preference")  # generated in Python: threads only contend for the GIL


def read_threads(data_cfg: Mapping[str, Any]) -> int:
  """config.data.read_threads, with -1 resolved by source.

  The embedded sources render in short NumPy calls that hold the GIL, so one read thread
  (beside the training loop) is fastest: more threads contend for it and run slower. Files
  and image decoders release it,
  so tfds / arrayrecord / cache reads get 8.
  """
  n = data_cfg["read_threads"]
  if n == -1:
    return 1 if data_cfg["source"] in EMBEDDED_SOURCES else 8
  if n < 0:
    raise errors.InvalidArgument(f"data.read_threads={n}: expected >= 0, or -1 (by source)")
  return n


def make_pipeline(data_cfg: Mapping[str, Any], *, global_batch: int, max_len: int, seed: int,
                  split: str = "train", process_index: int | None = None,
                  process_count: int | None = None) -> Pipeline:
  """Builds this process's shard of the input pipeline (an endless, reshuffled stream).

  Args:
    data_cfg: config.data.
    global_batch: batch size over all processes; must divide by process_count.
    max_len: text tokens per caption.
    seed: shuffle seed.
    split: the source split to read.
    process_index, process_count: default to jax.process_index() / process_count().
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if global_batch % pc:
    raise errors.InvalidArgument(f"batch size {global_batch} is not divisible by {pc} processes")
  source = sources.make_source(data_cfg, split)
  if len(source) < pc:
    raise errors.InvalidArgument(f"{source!r} has {len(source)} records, fewer than {pc} processes")
  cached_buckets = getattr(source, "bucket_of_record", None) is not None
  buckets = data_cfg.get("buckets") or {}
  if buckets.get("pixels") or buckets.get("sides") or cached_buckets:
    return _bucketed(data_cfg, source, global_batch=global_batch, max_len=max_len, seed=seed, pi=pi, pc=pc)
  ds = grain.MapDataset.source(decode_lib.Guarded(source)).seed(seed).shuffle().repeat(None)
  ds = ds.map_with_index(PickCaption(seed))
  ds = ProcessRows(ds, pi, pc, global_batch // pc)
  if data_cfg["source"] == "cache":
    ds = ds.map_with_index(CheckCached(source.meta))
  else:
    ds = ds.map_with_index(Preprocess(data_cfg["resolution"], max_len, data_cfg.get("loss_mask", "none")))
  ds = ds.map_with_index(TagIndex())
  skip = SkipCorrupt()
  local_batch, threads, chunk = global_batch // pc, read_threads(data_cfg), 0
  if data_cfg["num_workers"] > 0:
    _flags_for_workers()
    chunk = worker_chunk(data_cfg["worker_chunk"], ds[0])  # sized by the stream's first element

  def build(start: int):
    part = ds[start:] if start else ds
    if not data_cfg["num_workers"]:
      it = part.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=data_cfg["prefetch"]))
      return iter(it.filter(skip).batch(local_batch, drop_remainder=True))
    # Worker processes prepare and send `chunk` consecutive elements at a time (one
    # transfer per array instead of per element and array); the main process counts the
    # corrupt ones and cuts the rest into batches, which are then those of the threaded path.
    it = part.batch(chunk, drop_remainder=True, batch_fn=pack_chunk).to_iter_dataset(  # endless: no remainder
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=-(-data_cfg["prefetch"] // chunk)))
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg["num_workers"]))
    it = it.map(skip.unpack).filter(lambda rows: rows is not None)
    return iter(grain.experimental.RebatchIterDataset(it, local_batch, drop_remainder=True))

  return Pipeline(ResumableBatches(build), skip, local_batch, chunk)


def to_global(batch: Mapping[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """Per-process host batch -> global jax.Arrays laid out by `sharding` along the batch axis."""
  out = {}
  for key, value in batch.items():
    spec = jax.sharding.PartitionSpec(sharding.spec[0], *([None] * (value.ndim - 1)))
    out[key] = jax.make_array_from_process_local_data(
        jax.sharding.NamedSharding(sharding.mesh, spec), value)
  return out
