"""Captioned images the way people keep them: a folder tree, webdataset tar shards, parquet files.

Each source indexes its files once when it is built (so a missing or empty dataset fails
before any compute, naming the path) and then reads record i at random, as grain needs for a
seeded shuffle that resumes exactly. Record i is {'image': encoded bytes, 'caption': a str,
or a tuple of alternatives that `PickCaption` chooses from per epoch}. Images without a
caption are counted and left out of the index when they are built (or kept with the empty
caption: data.missing_caption='empty'); undecodable images are skipped later by the pipeline,
which counts them with the other corrupt records.

Locations (config.data.path): a directory, a file pattern with glob wildcards and {a,b} or
{000..009} braces (webdataset's shard notation), or several of these separated by commas.
"""

from __future__ import annotations

import collections
import csv
import glob
import io
import json
import logging
import os
import tarfile
import threading
from typing import Any, Sequence

import braceexpand
import numpy as np
from PIL import Image

from jdiff import errors

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
MANIFESTS = ("metadata.jsonl", "metadata.json", "metadata.csv")  # at a folder's root: file_name + caption
CAPTION_FROM = ("auto", "filename")
MISSING_CAPTION = ("skip", "empty")


def expand(path: str | Sequence[str], suffix: str = "") -> list[str]:
  """config.data.path -> the matching paths: commas separate entries, braces expand, globs
  match (sorted within each entry); an entry that matches nothing fails, naming it. With a
  suffix, a directory stands for the files under it that end with it."""
  entries = [p.strip() for p in (path.split(",") if isinstance(path, str) else path) if p.strip()]
  if not entries:
    raise errors.InvalidArgument("data.path is empty: set it to a directory, a file pattern or a list of them")
  out = []
  for entry in entries:
    for pattern in braceexpand.braceexpand(os.path.expanduser(entry)):
      found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern] if os.path.exists(pattern) else []
      if not found:
        raise errors.NotFound(f"data.path: nothing at {pattern!r}" + (f" (from {entry!r})" if pattern != entry else ""))
      for p in found:
        if suffix and os.path.isdir(p):
          inside = sorted(glob.glob(os.path.join(p, "**", "*" + suffix), recursive=True))
          if not inside:
            raise errors.NotFound(f"data.path: no {suffix} files under {p!r}")
          out.extend(inside)
        else:
          out.append(p)
  return out


def header_size(image: Any) -> tuple[int, int]:
  """(width, height) of encoded bytes (only the header is parsed) or an array."""
  if isinstance(image, (bytes, bytearray, memoryview)):
    with Image.open(io.BytesIO(bytes(image))) as pil:
      return pil.size
  arr = np.asarray(image)
  return arr.shape[1], arr.shape[0]


def split_lines(text: str) -> tuple[str, ...]:
  """A caption file's text -> its captions, one per non-empty line ('' if it has none: an empty
  caption file is an explicit empty caption)."""
  lines = tuple(line.strip() for line in text.splitlines() if line.strip())
  return lines or ("",)


def read_caption_file(text: str, kind: str, key: str, where: str) -> str | tuple[str, ...]:
  """A caption file's text -> its caption: a .json object's `key`, or a .txt's lines."""
  if kind != "json":
    return split_lines(text)
  caption = caption_from_json(json.loads(text), key, where)
  if caption is None:
    raise ValueError(f"{where} has no {key!r}")
  return caption


def caption_from_json(value: Any, key: str, where: str) -> str | None:
  """A sidecar/manifest JSON value -> the caption under `key` (None if absent or null)."""
  if not isinstance(value, dict):
    raise errors.InvalidArgument(f"{where}: expected a JSON object with a {key!r} field, got {type(value).__name__}")
  caption = value.get(key)
  return None if caption is None else str(caption)


def _summary(kind: str, where: str, kept: int, missing: int, missing_caption: str) -> None:
  if not kept:
    raise errors.NotFound(f"{kind} {where}: no captioned images" + (
        f" ({missing} images have no caption; data.missing_caption='empty' keeps them)" if missing else ""))
  if missing:
    action = "skipped" if missing_caption == "skip" else "kept with an empty caption"
    log.warning("%s %s: %d images, %d without a caption %s", kind, where, kept + (missing if missing_caption ==
                                                                                    "skip" else 0), missing, action)


class FolderSource:
  """A directory tree of images (.jpg .jpeg .png .webp, any case), each captioned by

  - caption_from='auto': a same-name .txt beside it (one caption per line; one is picked per
    epoch), else a same-name .json object's `caption_key`, else a manifest at the root
    (metadata.jsonl / .json / .csv: `file_name` relative to the root, and `caption_key`);
  - caption_from='filename': its file name without the extension, '_' read as a space.

  With a mask_suffix, files named NAME + mask_suffix are not images but the loss masks of
  NAME's image (record['mask'], for data.loss_mask='file').
  """

  def __init__(self, path: str | Sequence[str], *, caption_key: str = "caption", caption_from: str = "auto",
               missing_caption: str = "skip", mask_suffix: str = ""):
    if caption_from not in CAPTION_FROM or missing_caption not in MISSING_CAPTION:
      raise errors.InvalidArgument(f"data.caption_from={caption_from!r} / data.missing_caption={missing_caption!r}: "
                                   f"expected one of {CAPTION_FROM} / {MISSING_CAPTION}")
    self.roots = expand(path)
    for root in self.roots:
      if not os.path.isdir(root):
        raise errors.NotFound(f"data.path: {root!r} is not a directory (data.source='folder')")
    self._key = caption_key
    self.paths: list[str] = []
    self.captions: list[str | None] = []  # None: read the sidecar when the record is read
    self._sidecar: list[str | None] = []
    self.masks: list[str | None] = []  # NAME + mask_suffix beside the image, if there is one
    missing = 0
    for root in self.roots:
      manifest = self._manifest(root) if caption_from == "auto" else {}
      for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        names = set(filenames)
        for name in sorted(filenames):
          stem, ext = os.path.splitext(name)
          if ext.lower() not in IMAGE_EXTENSIONS or (mask_suffix and name.endswith(mask_suffix)):
            continue
          image = os.path.join(dirpath, name)
          caption, sidecar = None, None
          if caption_from == "filename":
            caption = stem.replace("_", " ").strip()
          elif stem + ".txt" in names:
            sidecar = os.path.join(dirpath, stem + ".txt")
          elif stem + ".json" in names:
            sidecar = os.path.join(dirpath, stem + ".json")
          else:
            caption = manifest.get(os.path.relpath(image, root).replace(os.sep, "/"))
          if caption is None and sidecar is None:
            missing += 1
            if missing_caption == "skip":
              continue
            caption = ""
          self.paths.append(image)
          self.captions.append(caption)
          self._sidecar.append(sidecar)
          self.masks.append(os.path.join(dirpath, stem + mask_suffix) if mask_suffix and stem + mask_suffix in names
                            else None)
    _summary("folder", ", ".join(map(repr, self.roots)), len(self.paths), missing, missing_caption)
    self.missing = missing

  def _manifest(self, root: str) -> dict[str, str]:
    """The root's manifest, if any: {file_name relative to the root: caption}."""
    for name in MANIFESTS:
      path = os.path.join(root, name)
      if not os.path.exists(path):
        continue
      with open(path, encoding="utf-8") as f:
        if name.endswith(".jsonl"):
          rows = [json.loads(line) for line in f if line.strip()]
        elif name.endswith(".json"):
          rows = json.load(f)
        else:
          rows = list(csv.DictReader(f))
      if not isinstance(rows, list):
        raise errors.InvalidArgument(f"{path}: expected a list of objects with 'file_name' and {self._key!r}")
      out = {}
      for i, row in enumerate(rows):
        where = f"{path} row {i + 1}"
        if not isinstance(row, dict) or "file_name" not in row:
          raise errors.InvalidArgument(f"{where}: no 'file_name' field")
        if self._key not in row:
          raise errors.InvalidArgument(f"{where}: no {self._key!r} field (it has {sorted(row)}); set data.caption_key")
        caption = caption_from_json(row, self._key, where)
        if caption is not None:
          out[os.path.normpath(row["file_name"]).replace(os.sep, "/")] = caption
      return out
    return {}

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    caption, sidecar = self.captions[index], self._sidecar[index]
    if sidecar is not None:
      with open(sidecar, encoding="utf-8") as f:
        caption = read_caption_file(f.read(), os.path.splitext(sidecar)[1].lstrip("."), self._key, sidecar)
    with open(self.paths[index], "rb") as f:
      record = dict(image=f.read(), caption=caption)
    if self.masks[index] is not None:
      with open(self.masks[index], "rb") as f:
        record["mask"] = f.read()
    return record

  def image_size(self, index: int) -> tuple[int, int]:
    """(width, height), from the file's header."""
    with Image.open(self.paths[index]) as pil:
      return pil.size

  def __repr__(self) -> str:
    return f"FolderSource({', '.join(self.roots)}: {len(self)} images)"


def _member_key(name: str) -> tuple[str, str]:
  """A tar member name -> (sample key, extension), webdataset's convention: the key is the
  path up to the first dot of the file name, the extension the rest (lowercased)."""
  directory, base = os.path.split(name)
  stem, dot, ext = base.partition(".")
  return os.path.join(directory, stem), ext.lower() if dot else ""


class WebDatasetSource:
  """webdataset tar shards: members grouped into samples by key (webdataset's convention),
  each sample an image member (jpg, jpeg, png, webp) and a caption member (.txt: one caption
  per line, one picked per epoch; else .json's `caption_key`).

  The shards are indexed once (member offsets from the tar headers) and read at random
  from there; compressed shards cannot be read at random and are refused.
  """

  def __init__(self, path: str | Sequence[str], *, caption_key: str = "caption", missing_caption: str = "skip"):
    if missing_caption not in MISSING_CAPTION:
      raise errors.InvalidArgument(f"data.missing_caption={missing_caption!r}: expected one of {MISSING_CAPTION}")
    self.shards = expand(path, ".tar")
    self._key = caption_key
    # Per sample: shard number, (offset, size) of the image, (offset, size, ext) of the caption or None.
    self.samples: list[tuple[int, tuple[int, int], tuple[int, int, str] | None]] = []
    missing = 0
    for shard_id, shard in enumerate(self.shards):
      if shard.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst")):
        raise errors.InvalidArgument(f"{shard}: compressed tar shards cannot be read at random; decompress them "
                                     "(the images inside are compressed already)")
      members: dict[str, dict[str, tuple[int, int]]] = collections.defaultdict(dict)
      try:
        with tarfile.open(shard, "r:") as tar:
          for m in tar:
            if m.isfile():
              key, ext = _member_key(m.name)
              members[key][ext] = (m.offset_data, m.size)
      except (tarfile.TarError, OSError) as e:
        raise errors.InvalidArgument(f"{shard}: not a readable tar file ({e})") from e
      for key, parts in members.items():
        image = next((parts[e] for e in (x.lstrip(".") for x in IMAGE_EXTENSIONS) if e in parts), None)
        if image is None:
          continue
        caption = next(((*parts[e], e) for e in ("txt", "json") if e in parts), None)
        if caption is None:
          missing += 1
          if missing_caption == "skip":
            continue
        self.samples.append((shard_id, image, caption))
    _summary("webdataset", f"{len(self.shards)} shards ({self.shards[0]} ...)", len(self.samples), missing,
             missing_caption)
    self.missing = missing

  def _read(self, shard: int, offset: int, size: int) -> bytes:
    with open(self.shards[shard], "rb") as f:
      f.seek(offset)
      return f.read(size)

  def __len__(self) -> int:
    return len(self.samples)

  def __getitem__(self, index: int) -> dict[str, Any]:
    shard, image, caption = self.samples[index]
    text: str | tuple[str, ...] = ""
    if caption is not None:
      text = read_caption_file(self._read(shard, caption[0], caption[1]).decode("utf-8"), caption[2], self._key,
                               f"sample {index} of {self.shards[shard]}")
    return dict(image=self._read(shard, *image), caption=text)

  def __repr__(self) -> str:
    return f"WebDatasetSource({len(self.shards)} shards, {len(self)} samples)"


class ParquetSource:
  """Parquet files with an image column (encoded bytes, or the {'bytes', 'path'} struct of
  Hugging Face datasets' Image feature) and a caption column, read with pyarrow.

  Rows with a null caption are counted when the source is built (from the caption column
  alone) and skipped, or kept with the empty caption. A record is read from its row group,
  which is decoded once and kept for the next reads (a few per thread): shuffled reads
  decode a row group per record, so `python -m jdiff.prepare`'s ArrayRecord files are the
  fast path for large data.
  """

  CACHED_ROW_GROUPS = 4

  def __init__(self, path: str | Sequence[str], *, image_key: str = "image", caption_key: str = "caption",
               missing_caption: str = "skip"):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  # only this source needs it

    if missing_caption not in MISSING_CAPTION:
      raise errors.InvalidArgument(f"data.missing_caption={missing_caption!r}: expected one of {MISSING_CAPTION}")
    self.files = expand(path, ".parquet")
    self._image_key, self._key, self._empty = image_key, caption_key, missing_caption == "empty"
    rows, missing = [], 0  # rows: per file, [row group, row] of each kept record
    for number, name in enumerate(self.files):
      try:
        f = pq.ParquetFile(name)
      except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise errors.InvalidArgument(f"{name}: not a readable parquet file ({e})") from e
      for column in (image_key, caption_key):
        if column not in f.schema_arrow.names:
          field = "image_key" if column == image_key else "caption_key"
          raise errors.InvalidArgument(f"{name} has no column {column!r} (it has {f.schema_arrow.names}); "
                                       f"set data.{field}")
      for group in range(f.num_row_groups):
        valid = f.read_row_group(group, columns=[caption_key]).column(0).is_valid().to_numpy(zero_copy_only=False)
        missing += int((~valid).sum())
        keep = np.arange(len(valid)) if self._empty else np.flatnonzero(valid)
        rows.append(np.stack([np.full(len(keep), number), np.full(len(keep), group), keep], 1))
    self._rows = np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 3), np.int64)
    _summary("parquet", f"{len(self.files)} files ({self.files[0]} ...)", len(self._rows), missing, missing_caption)
    self.missing = missing
    self._local = threading.local()

  def __getstate__(self) -> dict[str, Any]:  # to worker processes: the files reopen there
    return {k: v for k, v in self.__dict__.items() if k != "_local"}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._local = threading.local()

  def _row_group(self, number: int, group: int):
    # Each thread reads through its own ParquetFile objects: one shared between read threads
    # crashes pyarrow.
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    cache = getattr(self._local, "cache", None)
    if cache is None:
      cache = self._local.cache = collections.OrderedDict()
      self._local.files = {}
    table = cache.get((number, group))
    if table is None:
      handle = self._local.files.get(number)
      if handle is None:
        handle = self._local.files[number] = pq.ParquetFile(self.files[number])
      table = handle.read_row_group(group, columns=[self._image_key, self._key])
      cache[(number, group)] = table
      if len(cache) > self.CACHED_ROW_GROUPS:
        cache.popitem(last=False)
    else:
      cache.move_to_end((number, group))
    return table

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, index: int) -> dict[str, Any]:
    number, group, row = (int(v) for v in self._rows[index])
    table = self._row_group(number, group)
    image = table.column(0)[row].as_py()
    if isinstance(image, dict):  # Hugging Face's Image feature: {'bytes': ..., 'path': ...}
      if image.get("bytes") is None:
        raise ValueError(f"row {row} of row group {group} of {self.files[number]}: the image holds no bytes, "
                         f"only the path {image.get('path')!r}")
      image = image["bytes"]
    caption = table.column(1)[row].as_py()
    return dict(image=image, caption="" if caption is None else str(caption))

  def __repr__(self) -> str:
    return f"ParquetSource({len(self.files)} files, {len(self)} rows)"


def caption_choice(caption: Any, seed: int, index: int) -> str:
  """A record's caption as text (UTF-8 bytes decoded); of alternative captions, one, a pure
  function of (seed, stream position): each epoch reaches the record at another position and
  so may pick another line."""
  if isinstance(caption, (tuple, list)):
    caption = caption[0] if len(caption) == 1 else caption[
        int(np.random.default_rng([seed, index, 0x6361]).integers(len(caption)))]
  if isinstance(caption, (bytes, np.bytes_)):
    return bytes(caption).decode("utf-8")
  return str(caption)
