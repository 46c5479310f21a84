"""Random-access sources of captioned images: the embedded shapes, image folders, webdataset
shards, parquet files (files.py), TFDS and ArrayRecord.

Every source returns records {'image': uint8 [H, W, 3] or encoded bytes, 'caption':
str or bytes} (preference pairs: 'image_w' and 'image_l' instead of 'image'); `pipeline.py` decodes, resizes and tokenises them. Sources are checked
when they are built, so a missing dataset fails before any compute.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import grain
import numpy as np

from jdiff.data import latents
from jdiff.data import files
from jdiff.data import shapes
from jdiff import errors

SOURCES = ("shapes", "preference", "folder", "webdataset", "parquet", "tfds", "arrayrecord", "cache")
PAIRS_FILE = "pairs.npz"  # in a pairs directory written by `python -m jdiff.pairs`
PREPARED_SIZES = "sizes.npy"  # beside `python -m jdiff.prepare`'s shards (prepare.SIZES)


class ArrayRecordExamples:
  """ArrayRecord files of serialized tf.train.Example records with image and caption features.

  The image feature holds encoded image bytes (PNG/JPEG); the caption holds UTF-8 bytes, one
  value or several alternatives (as `python -m jdiff.prepare` writes a caption file's lines).
  Parsed with the tf.train.Example proto that ships with tensorflow-datasets (no TF).
  `pattern`: data.path's forms (files.expand); a directory stands for its .array_record files.
  """

  def __init__(self, pattern: str, image_key: str = "image", caption_key: str = "caption"):
    paths = files.expand(pattern, ".array_record")
    self._records = grain.sources.ArrayRecordDataSource(paths)
    self._image_key, self._caption_key = image_key, caption_key
    # The images' sizes, when these are every shard of a `python -m jdiff.prepare` output.
    self._sizes = None
    folder = os.path.dirname(paths[0])
    sizes = os.path.join(folder, PREPARED_SIZES)
    if all(os.path.dirname(p) == folder for p in paths) and os.path.exists(sizes):
      loaded = np.load(sizes)
      if len(loaded) == len(self._records):
        self._sizes = loaded

  def image_size(self, index: int) -> tuple[int, int]:
    """(width, height): from prepare's sizes.npy, else the image's header."""
    if self._sizes is not None:
      return int(self._sizes[index][0]), int(self._sizes[index][1])
    return files.header_size(self[index]["image"])

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    # tensorflow_datasets takes seconds to import: only the sources that read its formats load it.
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top

    features = tf_example_pb2.Example.FromString(self._records[index]).features.feature
    captions = features[self._caption_key].bytes_list.value
    return dict(image=features[self._image_key].bytes_list.value[0],
                caption=captions[0] if len(captions) == 1 else tuple(captions))

  def __repr__(self) -> str:
    return f"ArrayRecordExamples({self._records!r})"


class TfdsExamples:
  """A TFDS dataset prepared in ArrayRecord format, read through tfds.data_source.

  Images are left encoded (SkipDecoding) so that a corrupt one is skipped by the
  pipeline instead of failing inside TFDS.
  """

  def __init__(self, name: str, split: str, data_dir: str | None, image_key: str, caption_key: str):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # slow to import: see above

    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False,
                                      decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as e:  # TFDS raises several types for a missing or unprepared dataset.
      where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
      raise errors.NotFound(
          f"TFDS dataset {name!r} (split {split!r}) is not available under {where}: {e}. "
          "Prepare it with file_format='array_record', or set data.tfds_data_dir.") from e
    self._image_key, self._caption_key = image_key, caption_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._source[index]
    return dict(image=record[self._image_key], caption=record[self._caption_key])

  def __repr__(self) -> str:
    return f"TfdsExamples({self._source!r})"


class GeneratedPairsSource:
  """grain random-access source over a pairs directory: record i -> {'image_w': the
  caption's render, or the model's stored right sample (pairs written with
  preferred='sample'), 'image_l': the model's wrong sample, 'caption', 'changed': the wrong
  attributes joined by ','}."""

  def __init__(self, directory: str, resolution: int):
    path = os.path.join(directory, PAIRS_FILE)
    if not os.path.exists(path):
      raise errors.NotFound(
          f"no {PAIRS_FILE} in {directory!r}: write it with `python -m jdiff.pairs --out={directory}`")
    with open(os.path.join(directory, "meta.json")) as f:
      self.meta = json.load(f)
    if self.meta["resolution"] != resolution:
      raise errors.InvalidArgument(
          f"pairs in {directory} are {self.meta['resolution']}px samples; data.resolution is {resolution}")
    with np.load(path) as z:
      self.index, self.image_l, self.wrong = z["index"], z["image_l"], z["wrong"]
      self.image_w = z["image_w"] if "image_w" in z else None
    if self.image_w is None and self.meta["split"] == "held_out":
      raise errors.InvalidArgument(f"{directory} holds rejected samples of held-out captions without preferred ones: "
                                   "rendering them would train on the benchmark's unseen pairs")
    self.resolution = resolution

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, i: int) -> dict[str, Any]:
    scene, text = shapes.scene_for(self.meta["shapes_seed"], self.meta["split"], int(self.index[i]))
    changed = ",".join(a for a, w in zip(shapes.ATTRIBUTES, self.wrong[i]) if w)
    image_w = shapes.render(scene, self.resolution) if self.image_w is None else self.image_w[i]
    return dict(image_w=image_w, image_l=self.image_l[i], caption=text, changed=changed)

  def __repr__(self) -> str:
    return f"GeneratedPairsSource({len(self)} pairs of {self.meta['workdir']} step {self.meta['step']})"


def make_source(data_cfg: Mapping[str, Any], split: str = "train"):
  """config.data -> a random-access source (len and getitem)."""
  kind = data_cfg["source"]
  if kind == "preference" and data_cfg.get("pairs_dir") and split == "train":
    return GeneratedPairsSource(data_cfg["pairs_dir"], data_cfg["resolution"])
  if kind in ("shapes", "preference"):
    cls = shapes.ShapesSource if kind == "shapes" else shapes.PreferencePairsSource
    split = data_cfg.get("shapes_split", "train") if split == "train" else split
    web = data_cfg.get("web")
    return cls(data_cfg["resolution"], split, size=data_cfg["shapes_size"], seed=data_cfg["shapes_seed"],
               web=dict(web) if web is not None else None)
  if kind == "tfds":
    if not data_cfg["tfds_name"]:
      raise errors.InvalidArgument("data.source='tfds' needs data.tfds_name")
    return TfdsExamples(data_cfg["tfds_name"], data_cfg["tfds_split"] if split == "train" else split,
                        data_cfg["tfds_data_dir"], data_cfg["image_key"], data_cfg["caption_key"])
  if kind == "cache":
    if not data_cfg["cache_dir"]:
      raise errors.InvalidArgument("data.source='cache' needs data.cache_dir")
    return latents.CacheSource(data_cfg["cache_dir"])
  if kind == "arrayrecord":
    pattern = data_cfg["arrayrecord_pattern"] or data_cfg.get("path", "")
    return ArrayRecordExamples(pattern, data_cfg["image_key"], data_cfg["caption_key"])
  if kind in ("folder", "webdataset", "parquet"):
    path, captions = data_cfg.get("path", ""), dict(caption_key=data_cfg["caption_key"],
                                                    missing_caption=data_cfg.get("missing_caption", "skip"))
    if not path:
      raise errors.InvalidArgument(f"data.source={kind!r} needs data.path (a directory, a file pattern or a list)")
    if kind == "folder":
      return files.FolderSource(path, caption_from=data_cfg.get("caption_from", "auto"),
                                mask_suffix=data_cfg.get("mask_suffix", ""), **captions)
    if kind == "webdataset":
      return files.WebDatasetSource(path, **captions)
    return files.ParquetSource(path, image_key=data_cfg["image_key"], **captions)
  raise errors.InvalidArgument(f"unknown data.source {kind!r}; expected one of {SOURCES}")
