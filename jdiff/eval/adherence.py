"""Caption adherence on the shapes benchmark: read an image back into attributes.

`analyse` is deterministic and uses no learned model:
  1. background = median of the border pixels;
  2. foreground colour = median of the pixels furthest from the background, snapped to
     the nearest named colour;
  3. soft coverage alpha per pixel = projection of (pixel - bg) onto (fg - bg);
  4. shape = the template (rendered with the dataset's own renderer at the measured
     area and centroid) closest to alpha; size from that shape's half-extent;
  5. position = the 3x3 cell holding the shape's centre.
`score` turns analyses of generated images into per-attribute accuracies.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np

from jdiff.data import shapes

# Area of each shape in units of half_extent^2, and its centroid offset below the box centre.
_AREA = {"circle": math.pi, "square": 4.0, "triangle": 2.0}
_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0}
_SIZE_SPLIT = math.sqrt(shapes.SIZES["small"] * shapes.SIZES["large"])
_PALETTE = np.array(list(shapes.ALL_COLORS.values()), np.float32)
_BACKDROPS = np.array(list(shapes.BACKGROUNDS.values()), np.float32)
# A pixel this far (RGB distance) from the background belongs to the foreground.
_FG_THRESHOLD = 60.0


def _nearest(color: np.ndarray, table: np.ndarray, names: Iterable[str]) -> str:
  return list(names)[int(np.argmin(np.linalg.norm(table - color, axis=-1)))]


def analyse(image: np.ndarray, with_layout: bool = False) -> dict[str, Any]:
  """Attributes of one shapes image.

  Args:
    image: [H, W, 3] uint8 (or float in [0, 255]).
    with_layout: also return the fitted shape's 'center' (x, y) and 'half_extent'
      (fractions of the image side, as shapes.Scene holds them; None without a shape).

  Returns:
    dict with color, shape, size, position, background; the first four are None when
    no foreground is found.
  """
  img = np.asarray(image, np.float32)
  h, w, _ = img.shape
  border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
  bg = np.median(border, axis=0)
  out: dict[str, Any] = dict(background=_nearest(bg, _BACKDROPS, shapes.BACKGROUNDS),
                             color=None, shape=None, size=None, position=None)
  if with_layout:
    out.update(center=None, half_extent=None)
  dist = np.linalg.norm(img - bg, axis=-1)
  if np.count_nonzero(dist > _FG_THRESHOLD) < 2:
    return out
  core = dist >= 0.8 * np.percentile(dist[dist > _FG_THRESHOLD], 90)
  fg = np.median(img[core], axis=0)
  out["color"] = _nearest(fg, _PALETTE, shapes.ALL_COLORS)

  direction = fg - bg
  alpha = np.clip((img - bg) @ direction / max(float(direction @ direction), 1e-6), 0.0, 1.0)
  alpha = np.where(dist > 0.5 * _FG_THRESHOLD, alpha, 0.0)  # drop faint noise far from the shape
  area = float(alpha.sum()) / (h * w)
  ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
  cy = float((alpha.sum(1) * ys).sum() / alpha.sum())
  cx = float((alpha.sum(0) * xs).sum() / alpha.sum())

  best = None
  for shape in shapes.SHAPES:
    half = math.sqrt(area / _AREA[shape])
    center = (cx, cy - _CENTROID_DY[shape] * half)
    err = float(np.abs(shapes.coverage(shape, center, half, h, w) - alpha).sum())
    if best is None or err < best[0]:
      best = (err, shape, half, center)
  _, shape, half, (x, y) = best
  out["shape"] = shape
  out["size"] = "small" if half < _SIZE_SPLIT else "large"
  row = shapes.ROWS[min(max(int(y * 3), 0), 2)]
  col = shapes.COLS[min(max(int(x * 3), 0), 2)]
  out["position"] = f"{row} {col}"
  if with_layout:
    out.update(center=(x, y), half_extent=half)
  return out


def correct(image: np.ndarray, target: Mapping[str, str]) -> np.ndarray:
  """bool [4]: whether the image shows each of the target's attributes (shapes.ATTRIBUTES order)."""
  return verdict(analyse(image), target)


def verdict(found: Mapping[str, Any], target: Mapping[str, str]) -> np.ndarray:
  """`correct` from an image's analysis (`analyse`), for callers that use it for more."""
  return np.array([found[a] == target[a] for a in shapes.ATTRIBUTES])


def score(images: Iterable[np.ndarray], targets: Iterable[Mapping[str, str]]) -> dict[str, float]:
  """Per-attribute accuracy of images against their target attributes, plus 'all'
  (every attribute right) and the count 'n'."""
  return tally(correct(image, target) for image, target in zip(images, targets))


def tally(verdicts: Iterable[np.ndarray]) -> dict[str, float]:
  """`score` from the images' verdicts (`correct`, bool [4] each)."""
  hits = {a: 0 for a in shapes.ATTRIBUTES}
  all_right = n = 0
  for right in verdicts:
    for a, r in zip(shapes.ATTRIBUTES, right):
      hits[a] += r
    all_right += all(right)
    n += 1
  if n == 0:
    raise ValueError("no images to score")
  return {**{a: hits[a] / n for a in shapes.ATTRIBUTES}, "all": all_right / n, "n": n}
