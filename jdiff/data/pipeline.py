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
import io
import json
import logging
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import flags
import grain
import jax
import numpy as np
from PIL import Image

from jdiff import errors
from jdiff import tokens
from jdiff.data import files
from jdiff.data import sources

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Corrupt:
  """Stands in for a record that could not be read or decoded."""

  index: int
  error: str


class _Guarded:
  """Wraps a source so a record that fails to read becomes a `Corrupt` marker."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    try:
      return self._source[index]
    except Exception as e:  # a broken record must not stop a long run
      return Corrupt(int(index), f"read: {e!r}")

  def __repr__(self) -> str:
    return f"_Guarded({self._source!r})"


def to_rgb(image: Any, resolution: int) -> np.ndarray:
  """Encoded bytes or an array -> uint8 [resolution, resolution, 3]: resize the short side
  (bicubic, antialiased), centre-crop.

  A JPEG at least twice the target size is decoded at 1/2, 1/4 or 1/8 scale in the DCT
  domain (Pillow's `draft`; still at least the target size), which is most of the decode
  time saved for large photos. Downscaling by less than 2x resamples only the crop (Pillow's `box`:
  the sample positions of resizing the whole image, within one level of rounding); from 2x
  down (reduced by an integer factor first, on the whole image's grid) and upscaling resize
  the whole image, then crop.
  """
  if isinstance(image, (bytes, bytearray, memoryview)):
    pil = Image.open(io.BytesIO(bytes(image)))
    if pil.format == "JPEG":
      scale = resolution / min(pil.size)
      if scale <= 0.5:
        pil.draft("RGB", (math.ceil(pil.size[0] * scale), math.ceil(pil.size[1] * scale)))
    pil.load()
  else:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or arr.dtype != np.uint8:
      raise ValueError(f"expected a uint8 [H, W, 1|3|4] image, got {arr.dtype} {arr.shape}")
    if arr.shape[:2] == (resolution, resolution) and arr.shape[-1] == 3:
      return arr
    pil = Image.fromarray(arr if arr.shape[-1] != 1 else arr[..., 0])
  pil = pil.convert("RGB")
  w, h = pil.size
  scale = resolution / min(w, h)
  # The resized size, and the crop's offset in it.
  rw, rh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
  left, top = (rw - resolution) // 2, (rh - resolution) // 2
  if 0.5 < scale < 1:
    sx, sy = w / rw, h / rh
    return np.asarray(pil.resize((resolution, resolution), Image.Resampling.BICUBIC,
                                 box=(left * sx, top * sy, (left + resolution) * sx, (top + resolution) * sy)),
                      np.uint8)
  if (rw, rh) != (w, h):  # upscaling, or >= 2x down (an integer reduction first, on the whole image)
    pil = pil.resize((rw, rh), Image.Resampling.BICUBIC, reducing_gap=None if scale > 0.5 else 2.0)
  return np.asarray(pil.crop((left, top, left + resolution, top + resolution)), np.uint8)


IMAGE_KEYS = ("image", "image_w", "image_l")  # a captioned image, or a preference pair


class Preprocess(grain.transforms.MapWithIndex):
  """record -> {'image': uint8 [R, R, 3], 'tokens': int32 [max_len]} or Corrupt (preference
  pairs: 'image_w' and 'image_l' instead of 'image')."""

  def __init__(self, resolution: int, max_len: int):
    self.resolution, self.max_len = resolution, max_len

  def map_with_index(self, index: int, record):
    if isinstance(record, Corrupt):
      return record
    try:
      caption = files.caption_choice(record["caption"], 0, index)  # (one already picked by PickCaption)
      images = {k: to_rgb(record[k], self.resolution) for k in IMAGE_KEYS if k in record}
      if not images:
        raise KeyError(f"no image field among {IMAGE_KEYS}")
      return dict(images, tokens=tokens.tokenize(caption, self.max_len))
    except Exception as e:  # undecodable image, missing field, bad text
      return Corrupt(int(index), f"decode: {e!r}")


class CheckCached(grain.transforms.MapWithIndex):
  """A cache record, checked against the cache's shapes (a damaged record becomes Corrupt)."""

  def __init__(self, meta: Mapping[str, Any]):
    self.shapes = dict(latent_mean=tuple(meta["latent_shape"]), latent_logvar=tuple(meta["latent_shape"]),
                       context=tuple(meta["context_shape"]), pooled=(meta["pooled_dim"],))

  def map_with_index(self, index: int, record):
    if isinstance(record, Corrupt):
      return record
    try:
      for key, shape in self.shapes.items():
        if record[key].shape != shape:
          raise ValueError(f"{key} has shape {record[key].shape}, expected {shape}")
      return {k: record[k] for k in self.shapes}
    except Exception as e:
      return Corrupt(int(index), f"cache: {e!r}")


class SkipCorrupt(grain.transforms.Filter):
  """Drops Corrupt markers, counting and logging them (runs in the main process)."""

  def __init__(self):
    self.skipped = 0

  def filter(self, element) -> bool:
    if isinstance(element, Corrupt):
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
  and the Corrupt markers ("corrupt"), for SkipCorrupt.unpack in the main process."""
  good = [e for e in elements if not isinstance(e, Corrupt)]
  rows = {key: np.stack([e[key] for e in good]) for key in good[0]} if good else None
  return {"rows": rows, "corrupt": [e for e in elements if isinstance(e, Corrupt)]}


WORKER_CHUNK_BYTES = 16 * 2**20


def worker_chunk(configured: int, element: Any) -> int:
  """Elements per worker transfer: data.worker_chunk, fewer if that many `element`s would
  exceed WORKER_CHUNK_BYTES (large records such as latent-cache records, whose full chunks
  would, with several workers and their prefetch buffers, exhaust shared memory)."""
  if isinstance(element, Corrupt):
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
    if isinstance(record, Corrupt) or not isinstance(record.get("caption"), (tuple, list)):
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
    if isinstance(element, Corrupt):
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

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self.iterator

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self.iterator)

  @property
  def skipped(self) -> int:
    return self.skip.skipped


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
  ds = grain.MapDataset.source(_Guarded(source)).seed(seed).shuffle().repeat(None)
  ds = ds.map_with_index(PickCaption(seed))
  ds = ProcessRows(ds, pi, pc, global_batch // pc)
  if data_cfg["source"] == "cache":
    ds = ds.map_with_index(CheckCached(source.meta))
  else:
    ds = ds.map_with_index(Preprocess(data_cfg["resolution"], max_len))
  ds = ds.map_with_index(TagIndex())
  skip = SkipCorrupt()
  local_batch, threads, chunk = global_batch // pc, read_threads(data_cfg), 0
  if data_cfg["num_workers"] > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside app.run (notebooks) use defaults
      flags.FLAGS.mark_as_parsed()
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
