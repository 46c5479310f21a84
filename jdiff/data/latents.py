"""Latent and text-embedding cache: frozen encoders run once over a dataset, training reads
their outputs back.

    python -m jdiff.cache --config=configs/sd3_tune.py --out=DIR [--num_records=N]

reads config.data (shapes / tfds / arrayrecord) at config.data.resolution, encodes each
image with the VAE at config.autoencoder.path (posterior mean and log-variance; training
draws its own sample) and each caption with the SD3 text encoders of config.text.pipeline,
and writes

    DIR/meta.json                 shapes, dtypes, latent scaling, where it came from
    DIR/records-*.array_record    one record per image: safetensors bytes (the arrays; the
                                  caption and source index in its metadata), uncompressed
    DIR/conditioning.npz          the empty caption (caption dropout, CFG) and the
                                  config.sample.prompts (sample grids), encoded

Training with data.source='cache' and data.cache_dir=DIR reads these records through the
same grain pipeline (shuffle, shard, batch) as images.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from typing import Any

from array_record.python import array_record_module
import grain
import numpy as np
import safetensors.numpy

from jdiff import errors

log = logging.getLogger(__name__)

META = "meta.json"
CONDITIONING = "conditioning.npz"
BUCKETS = "buckets.npy"  # a cache written with data.buckets: each record's bucket (meta['buckets']: latent shapes)
RECORD_KEYS = ("latent_mean", "latent_logvar", "context", "pooled")
MASK_KEY = "mask"  # uint8 [h, w, 1] loss weights at latent resolution, in caches written with data.loss_mask


# Records are safetensors bytes in uncompressed ArrayRecord files: large float16 records
# barely compress, and safetensors parses without the copies and zip checks of npz, whose
# header parsing is also not thread-safe. Caches of the first format (npz in ArrayRecord's
# default compression; meta without 'record_format') still read.
RECORD_FORMAT = "safetensors"
WRITER_OPTIONS = "group_size:1,uncompressed"
# np.load parses each npz member's header with ast.literal_eval, and CPython 3.11's AST
# constructor is not thread-safe: under grain's read threads it sporadically raised
# SystemError ('AST constructor recursion depth mismatch'), and the record was skipped as
# corrupt. Old-format records are decoded under this lock.
_NPZ_LOCK = threading.Lock()


def latent_mask(mask: np.ndarray, factor: int) -> np.ndarray:
  """uint8 [H, W, 1] pixel loss weights -> [H/factor, W/factor, 1]: each latent's weight is the
  mean over the factor x factor pixels it encodes (rounded)."""
  h, w = mask.shape[0] // factor, mask.shape[1] // factor
  blocks = mask[:h * factor, :w * factor, 0].astype(np.float32).reshape(h, factor, w, factor)
  return np.rint(blocks.mean(axis=(1, 3)))[..., None].astype(np.uint8)


def _to_bytes(arrays: dict[str, np.ndarray], caption: str, index: int) -> bytes:
  return safetensors.numpy.save(arrays, metadata=dict(caption=caption, index=str(index)))


def _from_bytes(data: bytes, record_format: str) -> dict[str, np.ndarray]:
  if record_format == RECORD_FORMAT:
    return safetensors.numpy.load(data)
  with _NPZ_LOCK, np.load(io.BytesIO(data), allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def read_meta(cache_dir: str) -> dict[str, Any]:
  path = os.path.join(cache_dir, META)
  if not os.path.exists(path):
    raise errors.NotFound(f"{path} not found: data.cache_dir must be a directory written by "
                          "`python -m jdiff.cache`")
  with open(path) as f:
    return json.load(f)


def read_conditioning(cache_dir: str) -> dict[str, Any]:
  """{'null': {'context' [L, D], 'pooled' [P]}, 'prompts': [...], 'prompt_context' [N, L, D],
  'prompt_pooled' [N, P]} as float32."""
  with np.load(os.path.join(cache_dir, CONDITIONING), allow_pickle=False) as f:
    return dict(null=dict(context=f["null_context"].astype(np.float32), pooled=f["null_pooled"].astype(np.float32)),
                prompts=[str(p) for p in f["prompts"]], prompt_context=f["prompt_context"].astype(np.float32),
                prompt_pooled=f["prompt_pooled"].astype(np.float32))


class CacheSource:
  """Random access to a cache's records: {'latent_mean', 'latent_logvar' [h, w, c],
  'context' [L, D], 'pooled' [P]} in the cache's storage dtype, and 'mask' [h, w, 1] uint8 if
  it was written with data.loss_mask (`masked`). A cache written with
  aspect-ratio buckets has `bucket_of_record` (else None): record i's latents are
  meta['buckets'][bucket_of_record[i]] in height and width."""

  def __init__(self, cache_dir: str):
    self.meta = read_meta(cache_dir)
    paths = [os.path.join(cache_dir, p) for p in self.meta["files"]]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
      raise errors.NotFound(f"cache {cache_dir!r} is incomplete: missing {missing[:3]}")
    self._records = grain.sources.ArrayRecordDataSource(paths)
    self._format = self.meta.get("record_format", "npz")
    self.masked = self.meta.get("loss_mask", "none") != "none"
    self.keys = RECORD_KEYS + ((MASK_KEY,) if self.masked else ())
    self.bucket_of_record = None
    if "buckets" in self.meta:
      self.bucket_of_record = np.load(os.path.join(cache_dir, BUCKETS))
      if len(self.bucket_of_record) != len(self._records):
        raise errors.InvalidArgument(f"cache {cache_dir!r}: {BUCKETS} has {len(self.bucket_of_record)} entries for "
                                     f"{len(self._records)} records")

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = _from_bytes(self._records[index], self._format)
    return {k: record[k] for k in self.keys}

  def __repr__(self) -> str:
    return f"CacheSource({self._records!r})"


class RecordWriter:
  """Appends records (RECORD_FORMAT) to out_dir/records-NNNNN.array_record,
  `records_per_file` per file; `files` lists the files written (for meta.json)."""

  def __init__(self, out_dir: str, records_per_file: int = 4096):
    self.out_dir, self.records_per_file = out_dir, records_per_file
    self.files: list[str] = []
    self.written = 0
    self._writer = None

  def write(self, arrays: dict[str, np.ndarray], caption: str, index: int) -> None:
    if self._writer is None or self.written % self.records_per_file == 0:
      self.close()
      self.files.append(f"records-{len(self.files):05d}.array_record")
      self._writer = array_record_module.ArrayRecordWriter(os.path.join(self.out_dir, self.files[-1]),
                                                           WRITER_OPTIONS)
    self._writer.write(_to_bytes(arrays, caption, index))
    self.written += 1

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def write_meta(self, **fields: Any) -> dict[str, Any]:
    """Closes the last file and writes out_dir/meta.json: `fields` (shapes, dtype, where the
    records came from) plus what this writer knows (num_records, files, record_format)."""
    self.close()
    meta = dict(num_records=self.written, files=self.files, record_format=RECORD_FORMAT, **fields)
    with open(os.path.join(self.out_dir, META), "w") as f:
      json.dump(meta, f, indent=2)
    return meta
