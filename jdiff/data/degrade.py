"""What makes the shapes data look like web data: degraded images and noisy captions.

The 'web' split of the embedded shapes (pre-training data) draws each record's scene as
'train' does, then applies each image degradation and each caption fault independently
with its rate (config.data.web):

  noise      sensor noise: Gaussian, sigma 5-15 grey levels per pixel and channel
  blur       Gaussian blur, sigma 0.8-1.6 pixels
  jpeg       blocky compression: JPEG at quality 10-35
  cast       colour cast: each channel scaled by 0.85-1.15 and shifted by -25..25
  clutter    1-3 small blobs of off-palette colours anywhere in the frame
  occlusion  a bar of an off-palette colour across part of the shape
  crop       an off-centre crop of 55-85% of the side whose edge cuts through the shape,
             scaled back: the shape grows, moves and is cut by the frame (its caption's
             size and position may then no longer hold, as with cropped web images)

  wrong      the caption names one attribute wrong (another colour, shape, size or place)
  missing    the caption leaves out one or two attributes

Captions come from more templates than 'train' (short tags to long sentences). Everything is
a pure function of the record's random generator, so a record is the same on every read.
"""

from __future__ import annotations

import dataclasses
import io
import re
from typing import Any, Mapping

import numpy as np
from PIL import Image
from scipy import ndimage

DEGRADATIONS = ("noise", "blur", "jpeg", "cast", "clutter", "occlusion", "crop")
CAPTION_FAULTS = ("wrong", "missing")
RATES = DEGRADATIONS + CAPTION_FAULTS

# Templates of the web split: {size} {color} {shape} {where} {background} may each be left
# out by a 'missing' fault (the word and the space before it go).
WEB_TEMPLATES = (
    "{size} {color} {shape} {where}",
    "a {size} {color} {shape} {where}",
    "{color} {shape}, {size}, {where}",
    "photo of a {size} {color} {shape} {where}, {background} background",
    "a {size} {color} {shape} {where} on a {background} background, high quality, 4k",
    "image: {color} {shape}, {size}, {where}",
    "my {size} {color} {shape} {where} lol",
    "{where} there is a {size} {color} {shape} and nothing else",
)
_OFF_PALETTE = np.array([(90, 60, 30), (200, 180, 140), (60, 110, 110), (170, 90, 120), (100, 100, 40),
                         (30, 60, 90)], np.uint8)


def degrade(image: np.ndarray, center: tuple[float, float], half_extent: float, rng: np.random.Generator,
            rates: Mapping[str, float]) -> tuple[np.ndarray, tuple[str, ...]]:
  """image uint8 [H, W, 3] of a scene whose shape sits at `center` (x, y) with `half_extent`
  (fractions of the side) -> (degraded image, the degradations applied, in DEGRADATIONS order).
  A degradation is applied with probability rates[name]; the draw for each name happens
  whatever the others do, so one record's choices do not shift another's."""
  draws = {name: rng.random() for name in DEGRADATIONS}  # drawn first: applied set independent of params
  applied = tuple(name for name in DEGRADATIONS if draws[name] < rates.get(name, 0.0))
  h, w = image.shape[:2]
  x = image.astype(np.float32)
  if "crop" in applied:
    # A window of 55-85% of the side whose edge cuts through the shape along one axis (the
    # subject cut by the frame), kept inside the frame, scaled back to the full size.
    side = rng.uniform(0.55, 0.85)
    axis = int(rng.integers(2))
    edge = center[axis] + rng.uniform(-0.5, 0.5) * half_extent  # where the frame cuts the shape
    side = min(side, max(edge, 1 - edge))  # a window that fits on one side of the cut
    start = edge if edge + side <= 1 else edge - side
    c = center[1 - axis]  # along the other axis the window holds the shape's centre
    other = rng.uniform(max(0.0, c - side + 0.1 * side), min(1 - side, c - 0.1 * side) + 1e-9)
    left, top = (other, start) if axis else (start, other)
    box = (left * w, top * h, (left + side) * w, (top + side) * h)
    x = np.asarray(Image.fromarray(x.astype(np.uint8)).resize((w, h), Image.BILINEAR, box=box), np.float32)
  if "clutter" in applied:
    ys, xs = (np.arange(h)[:, None] + 0.5) / h, (np.arange(w)[None, :] + 0.5) / w
    for _ in range(int(rng.integers(1, 4))):
      r = rng.uniform(0.03, 0.07)
      cx, cy = rng.uniform(0, 1, size=2)
      blob = ((xs - cx) ** 2 + (ys - cy) ** 2) <= r * r
      x[blob] = _OFF_PALETTE[rng.integers(len(_OFF_PALETTE))]
  if "occlusion" in applied:
    # A bar across the shape's box, covering a quarter to a half of it, from one side.
    thick = rng.uniform(0.25, 0.5) * 2 * half_extent
    cx, cy = center
    if rng.random() < 0.5:  # horizontal bar
      y0 = cy - half_extent + rng.uniform(0, 2 * half_extent - thick)
      rows = slice(int(np.clip(y0 * h, 0, h)), int(np.clip(np.ceil((y0 + thick) * h), 0, h)))
      cols = slice(int(np.clip((cx - 1.3 * half_extent) * w, 0, w)), int(np.clip((cx + 1.3 * half_extent) * w, 0, w)))
    else:
      x0 = cx - half_extent + rng.uniform(0, 2 * half_extent - thick)
      cols = slice(int(np.clip(x0 * w, 0, w)), int(np.clip(np.ceil((x0 + thick) * w), 0, w)))
      rows = slice(int(np.clip((cy - 1.3 * half_extent) * h, 0, h)), int(np.clip((cy + 1.3 * half_extent) * h, 0, h)))
    x[rows, cols] = _OFF_PALETTE[rng.integers(len(_OFF_PALETTE))]
  if "cast" in applied:
    x = x * rng.uniform(0.85, 1.15, size=3) + rng.uniform(-25, 25, size=3)
  if "blur" in applied:
    x = ndimage.gaussian_filter(x, sigma=(rng.uniform(0.8, 1.6),) * 2 + (0,), mode="nearest")
  if "noise" in applied:
    x = x + rng.normal(0.0, rng.uniform(5, 15), size=x.shape)
  out = np.clip(np.round(x), 0, 255).astype(np.uint8)
  if "jpeg" in applied:
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="JPEG", quality=int(rng.integers(10, 36)))
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
  return out, applied


@dataclasses.dataclass(frozen=True)
class NoisyCaption:
  text: str
  faults: tuple[str, ...]  # of CAPTION_FAULTS
  named: dict[str, str]  # attribute -> the value the caption names (wrong ones included)


def noisy_caption(attributes: Mapping[str, str], background: str, phrases: Mapping[str, str],
                  choices: Mapping[str, Any], rng: np.random.Generator, rates: Mapping[str, float]) -> NoisyCaption:
  """A web caption of a scene's attributes (color, shape, size, position): one of
  WEB_TEMPLATES, with a wrong attribute and/or one or two left out at their rates.
  `phrases` turn a position into words; `choices` lists each attribute's values."""
  draws = {name: rng.random() for name in CAPTION_FAULTS}
  faults = tuple(name for name in CAPTION_FAULTS if draws[name] < rates.get(name, 0.0))
  named = dict(attributes)
  wrong = None
  if "wrong" in faults:
    wrong = list(choices)[int(rng.integers(len(choices)))]
    named[wrong] = str(rng.choice([v for v in choices[wrong] if v != attributes[wrong]]))
  template = WEB_TEMPLATES[int(rng.integers(len(WEB_TEMPLATES)))]
  if "missing" in faults:  # one or two of the attributes the caption names right
    others = [a for a in choices if a != wrong]
    for attribute in rng.choice(others, size=int(rng.integers(1, 3)), replace=False):
      named.pop(str(attribute))
  words = dict(size=named.get("size"), color=named.get("color"), shape=named.get("shape"),
               where=phrases[named["position"]] if "position" in named else None, background=background)
  if "shape" not in named:
    words["shape"] = "shape"  # "a large red shape": the noun stays, the attribute goes
  text = template
  for key, value in words.items():
    text = text.replace("{" + key + "}", value) if value is not None else text.replace(" {" + key + "}", "").replace(
        "{" + key + "} ", "").replace("{" + key + "}", "")
  text = re.sub(r",(\s*,)+", ",", " ".join(text.split()))  # "red circle,, top left": a left-out field's comma
  return NoisyCaption(text.strip(" ,"), faults, named)
