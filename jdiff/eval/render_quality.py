"""Render quality of shapes images: how far an image is from the nearest clean render.

Caption adherence asks whether an image shows the caption's attributes; this asks whether it
looks like the clean data, whatever it shows. The adherence analyser reads the image's scene
(background, colour, shape, size and centre); the scene is drawn again with the dataset's
own renderer in the exact palette colours, and the score is the mean absolute difference
per pixel and channel between the two (0-255). Every way an image departs from a clean
render adds to it: sensor noise and specks, blur (the shape's edge spreads), blocky
compression, colour casts (the background and shape colours leave the palette), clutter
and occlusion (pixels that the one shape does not explain), a shape cut by the frame.

A clean render scores a fraction of one grey level (the analyser's size and centre are
estimates); `CLEAN` is the threshold below which an image counts as clean. It is
deterministic and needs no download or learned model.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from jdiff.data import shapes
from jdiff.eval import adherence

# Mean |image - nearest clean render| (0-255) below which an image counts as clean: above what
# the analyser's estimates leave on clean renders at 24-64 px, below the mildest degradation
# of the web split (jdiff.data.degrade) on most images.
CLEAN = 2.0


def nearest_render(image: np.ndarray, found: Mapping[str, Any] | None = None) -> np.ndarray:
  """The clean render (uint8 [H, W, 3]) of the scene the adherence analyser reads in `image`
  (`found`: its analysis with layout, if the caller has it); the plain palette background
  the analyser reads when it finds no shape."""
  found = found or adherence.analyse(image, with_layout=True)
  h, w = np.asarray(image).shape[:2]
  if found["shape"] is None:
    return np.broadcast_to(np.asarray(shapes.BACKGROUNDS[found["background"]], np.uint8), (h, w, 3))
  scene = shapes.Scene(found["color"], found["shape"], found["size"], found["position"], found["background"],
                       center=found["center"], half_extent=found["half_extent"])
  return shapes.render(scene, (h, w))


def residual(image: np.ndarray, found: Mapping[str, Any] | None = None) -> float:
  """Mean |image - nearest_render(image)| over pixels and channels (0-255)."""
  return float(np.abs(np.asarray(image, np.float32) - nearest_render(image, found)).mean())


def residuals(images: Sequence[np.ndarray], analyses: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
  """float64 [N]: each image's `residual`; `analyses` as in `score`."""
  analyses = analyses or [None] * len(images)
  return np.array([residual(image, found) for image, found in zip(images, analyses, strict=True)], np.float64)


def score(images: Sequence[np.ndarray], analyses: Sequence[Mapping[str, Any]] | None = None) -> dict[str, float]:
  """{'clean': fraction of images with residual <= CLEAN, 'residual': mean residual,
  'residual_se': its standard error, 'n'}; `analyses`: the images' analyses with layout, if
  the caller has them."""
  return summarise(residuals(images, analyses))


def summarise(r: np.ndarray) -> dict[str, float]:
  """`score` from the images' residuals [N]."""
  if not len(r):
    raise ValueError("no images to score")
  return dict(clean=float((r <= CLEAN).mean()), residual=float(r.mean()),
              residual_se=float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else 0.0, n=len(r))
