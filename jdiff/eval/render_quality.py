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

from typing import Iterable

import numpy as np

from jdiff.data import shapes
from jdiff.eval import adherence

# Mean |image - nearest clean render| (0-255) below which an image counts as clean: above what
# the analyser's estimates leave on clean renders at 24-64 px, below the mildest degradation
# of the web split (jdiff.data.degrade) on most images.
CLEAN = 2.0


def nearest_render(image: np.ndarray) -> np.ndarray | None:
  """The clean render (uint8 [H, W, 3]) of the scene the adherence analyser reads in `image`;
  None when it finds no shape."""
  found = adherence.analyse(image, with_layout=True)
  if found["shape"] is None:
    return None
  h, w = np.asarray(image).shape[:2]
  scene = shapes.Scene(found["color"], found["shape"], found["size"], found["position"], found["background"],
                       center=found["center"], half_extent=found["half_extent"])
  return shapes.render(scene, (h, w))


def residual(image: np.ndarray) -> float:
  """Mean |image - nearest_render(image)| over pixels and channels (0-255); an image with no
  shape is compared with the plain palette background nearest its border."""
  img = np.asarray(image, np.float32)
  ref = nearest_render(image)
  if ref is None:
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    name = adherence.nearest_background(np.median(border, axis=0))
    ref = np.broadcast_to(np.asarray(shapes.BACKGROUNDS[name], np.float32), img.shape)
  return float(np.abs(img - ref).mean())


def score(images: Iterable[np.ndarray]) -> dict[str, float]:
  """{'clean': fraction of images with residual <= CLEAN, 'residual': mean residual,
  'residual_se': its standard error, 'n'}."""
  r = np.array([residual(image) for image in images], np.float64)
  if not len(r):
    raise ValueError("no images to score")
  return dict(clean=float((r <= CLEAN).mean()), residual=float(r.mean()),
              residual_se=float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else 0.0, n=len(r))
