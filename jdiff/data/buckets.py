"""Aspect-ratio buckets: images trained near their own shape instead of centre-cropped square.

A bucket is an image shape (height, width), both multiples of `step`, with about `pixels`
pixels; the set spans aspect ratios from 1:max_aspect to max_aspect:1. Each image goes to
the bucket nearest its aspect ratio (in log ratio), is resized to cover it and centre-cropped,
which cuts no more than the bucket's rounding away. An image smaller than its bucket by more
than `max_upscale` is left out (counted).

Every global batch holds one bucket (static shapes: one compiled train step per bucket). The
order of batches is a pure function of (seed, batch number) -- `Schedule` -- so a run resumes
exactly from a batch count, and every process computes the same global batch and reads its
own rows of it:

- each bucket's records form an endless stream of per-epoch permutations (seed, bucket, epoch);
  the bucket's k-th batch is elements [kB, (k+1)B) of its stream, so a record waits at most one
  bucket-epoch however the batch size divides the bucket;
- global epoch e holds n_b(e) = floor((e+1) N_b / B) - floor(e N_b / B) batches of bucket b
  (N_b its records): buckets are drawn in proportion to their data and an epoch covers every
  record once, up to a batch carried over; the epoch's batches are shuffled with (seed, e).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from jdiff import errors


def bucket_shapes(pixels: int, step: int, max_aspect: float = 4.0) -> list[tuple[int, int]]:
  """(height, width) pairs, multiples of `step`, each the largest height for its width with
  height x width <= pixels, aspect ratio within [1/max_aspect, max_aspect]; sorted by w/h."""
  if step <= 0 or pixels < step * step or max_aspect < 1:
    raise errors.InvalidArgument(f"data.buckets: pixels={pixels}, step={step}, max_aspect={max_aspect}: need "
                                 "pixels >= step^2 > 0 and max_aspect >= 1")
  shapes = set()
  for width in range(step, pixels // step + 1, step):
    height = pixels // width // step * step
    if height >= step and max(height / width, width / height) <= max_aspect:
      shapes.update({(height, width), (width, height)})
  return sorted(shapes, key=lambda s: (s[1] / s[0], s[0]))


def assign(sizes: np.ndarray, shapes: Sequence[tuple[int, int]], max_upscale: float) -> np.ndarray:
  """sizes [N, 2] of (width, height) -> bucket number per image (the nearest aspect ratio in
  log ratio; ties to the larger bucket), or -1 where covering the bucket would upscale by
  more than max_upscale."""
  sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
  log_aspect = np.log(np.array([w / h for h, w in shapes]))
  area = np.array([h * w for h, w in shapes], np.float64)
  ratio = np.log(sizes[:, 0] / sizes[:, 1])
  # Nearest in log aspect; among equally near buckets the one with more pixels.
  distance = np.abs(ratio[:, None] - log_aspect[None, :])
  best = np.lexsort((-area[None, :].repeat(len(sizes), 0), np.round(distance, 12)), axis=1)[:, 0]
  hw = np.array(shapes, np.float64)[best]
  scale = np.maximum(hw[:, 1] / sizes[:, 0], hw[:, 0] / sizes[:, 1])  # the cover resize
  return np.where(scale <= max_upscale + 1e-9, best, -1)


class Schedule:
  """Global batch j -> (bucket, the record indices of that batch): see the module docstring."""

  def __init__(self, bucket_of_record: np.ndarray, num_buckets: int, batch_size: int, seed: int):
    bucket_of_record = np.asarray(bucket_of_record)
    self.members = [np.flatnonzero(bucket_of_record == b) for b in range(num_buckets)]
    self.counts = np.array([len(m) for m in self.members], np.int64)
    self.batch_size, self.seed = batch_size, seed
    if not (self.counts >= batch_size).any():
      raise errors.InvalidArgument(f"no bucket holds a batch of {batch_size} images (bucket sizes "
                                   f"{self.counts.tolist()}): lower train.batch_size or use fewer buckets")

  def batches_through(self, epoch: int) -> int:
    """Batches in global epochs 0..epoch-1."""
    return int((epoch * self.counts // self.batch_size).sum())

  @functools.lru_cache(maxsize=4)
  def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Global epoch `epoch`'s batches: (bucket of each, that bucket's batch number k)."""
    first = epoch * self.counts // self.batch_size
    n = (epoch + 1) * self.counts // self.batch_size - first
    buckets = np.repeat(np.arange(len(self.counts)), n)
    buckets = buckets[np.random.default_rng([self.seed, epoch, 0x6275]).permutation(len(buckets))]
    k = np.empty(len(buckets), np.int64)
    for b in np.flatnonzero(n):
      where = np.flatnonzero(buckets == b)
      k[where] = first[b] + np.arange(len(where))
    return buckets, k

  @functools.lru_cache(maxsize=64)
  def _permutation(self, bucket: int, epoch: int) -> np.ndarray:
    return self.members[bucket][np.random.default_rng([self.seed, bucket, epoch, 0x7065]).permutation(
        int(self.counts[bucket]))]

  def locate(self, j: int) -> tuple[int, int]:
    """Global batch j -> (global epoch, position in it)."""
    # batches_through grows about linearly: start from the estimate, then step to the exact epoch.
    epoch = max(0, j // max(1, int(self.counts.sum() // self.batch_size)) - 1)
    while self.batches_through(epoch + 1) <= j:
      epoch += 1
    while epoch > 0 and self.batches_through(epoch) > j:
      epoch -= 1
    return epoch, j - self.batches_through(epoch)

  def batch(self, j: int) -> tuple[int, np.ndarray]:
    """(bucket, record indices [batch_size]) of global batch j."""
    epoch, position = self.locate(j)
    buckets, k = self.epoch_order(epoch)
    b, first = int(buckets[position]), int(k[position]) * self.batch_size
    n = int(self.counts[b])
    stream = np.arange(first, first + self.batch_size)
    out = np.empty(self.batch_size, np.int64)
    for bucket_epoch in np.unique(stream // n):
      sel = stream // n == bucket_epoch
      out[sel] = self._permutation(b, int(bucket_epoch))[stream[sel] % n]
    return b, out


def describe(shapes: Sequence[tuple[int, int]], counts: Sequence[int]) -> str:
  """'HxW: n' for the buckets that hold images, for the log."""
  return ", ".join(f"{h}x{w}: {n}" for (h, w), n in zip(shapes, counts) if n)

