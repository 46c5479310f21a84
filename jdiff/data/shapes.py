"""The embedded "shapes" dataset: captioned renders generated from an index, no files.

Each example is one shape (circle, square, triangle) of a named colour and size at one
of nine grid positions on a plain background, rendered with 4x4 supersampled
antialiasing at any resolution, with a caption from varied templates that always names
size, colour, shape and position (and sometimes the background).

Compositional test split: the (colour, shape) pairs in HELD_OUT never appear in
'train'; 'held_out' contains only them. Every colour and every shape is still seen in
training, so the held-out split measures generalisation to new combinations.

New attribute: the colour in NEW_COLORS ('pink') never appears in 'train' or 'held_out'.
The 'new_color' split, for teaching it to a trained model (a LoRA tune stage), draws half
its examples in the new colour and half from the 'train' distribution.

Captions only: 'prompts' draws the new colour half the time and otherwise any colour-shape
pair, HELD_OUT's too, for objectives that read no image of it (the prompts of online RL and
of on-policy distillation, which learns from the teacher's outputs from noise): a tuned
model is asked for every pair, and its student should follow it on every pair.

Pre-training and fine-tuning data, as in production: 'web' draws its scenes as 'train' does,
degrades its images and garbles its captions at the rates of config.data.web (sensor noise,
blur, compression, colour casts, clutter, occlusion, off-centre crops; wrong or missing
attributes, more caption templates: jdiff/data/degrade.py); 'curated' is clean renders with
exact, detailed captions (every attribute and the background), for supervised fine-tuning
on a small number of records (data.shapes_size).

Everything is a pure function of (seed, split, index) and, for 'web', the rates: every
process, worker and restart sees the same example for the same index.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from jdiff.data import degrade

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (150, 60, 200),
    "orange": (240, 130, 30),
}
NEW_COLORS = {"pink": (250, 120, 200)}  # absent from pre-training: see the 'new_color' split
ALL_COLORS = {**COLORS, **NEW_COLORS}
BACKGROUNDS = {"black": (20, 20, 20), "gray": (128, 128, 128), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle")
# Half-extent of the shape as a fraction of the image side.
SIZES = {"small": 0.11, "large": 0.18}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
POSITIONS = tuple(f"{r} {c}" for r in ROWS for c in COLS)
HELD_OUT = frozenset({("blue", "triangle"), ("yellow", "circle"), ("purple", "square")})
SPLITS = ("train", "held_out", "new_color", "web", "curated", "prompts")
ATTRIBUTES = ("color", "shape", "size", "position")

# Jitter keeps the data from being 1458 fixed images while every attribute stays readable.
_CENTER_JITTER = 0.03
_SIZE_JITTER = 0.08
_SUPERSAMPLE = 4

_PHRASES = {
    "top left": "in the top left", "top center": "at the top", "top right": "in the top right",
    "middle left": "on the left", "middle center": "in the center", "middle right": "on the right",
    "bottom left": "in the bottom left", "bottom center": "at the bottom",
    "bottom right": "in the bottom right",
}
_TEMPLATES = (
    "a {size} {color} {shape} {where}",
    "a {size} {color} {shape} {where} on a {background} background",
    "{where}, a {size} {color} {shape}",
    "a picture of a {size} {color} {shape} {where}",
    "one {size} {color} {shape}, {where}",
    "{size} {color} {shape} {where}, {background} background",
)
BENCHMARK_TEMPLATE = _TEMPLATES[0]
CURATED_TEMPLATE = _TEMPLATES[1]  # every attribute and the background


@dataclasses.dataclass(frozen=True)
class Scene:
  """One example's attributes and its continuous layout (fractions of the image side)."""

  color: str
  shape: str
  size: str
  position: str
  background: str
  center: tuple[float, float] = (0.5, 0.5)  # (x, y), y down
  half_extent: float = 0.15

  def attributes(self) -> dict[str, str]:
    return {a: getattr(self, a) for a in ATTRIBUTES}


def caption(scene: Scene, template: str = BENCHMARK_TEMPLATE) -> str:
  return template.format(size=scene.size, color=scene.color, shape=scene.shape,
                         where=_PHRASES[scene.position], background=scene.background)


def parse_caption(text: str) -> dict[str, str] | None:
  """The attributes a caption names (colour, shape, size, position), read back from any of the
  caption templates; None when one of them is missing or ambiguous (e.g. a caption cut before
  its position phrase)."""
  words = text.lower().replace(",", " ").split()
  found = {}
  for attribute, names in (("color", ALL_COLORS), ("shape", SHAPES), ("size", SIZES)):
    hits = {w for w in words if w in names}
    if len(hits) != 1:
      return None
    found[attribute] = hits.pop()
  padded = " " + " ".join(words) + " "
  # The longest phrase first: "in the top left" also holds "the top".
  where = [p for p, phrase in _PHRASES.items() if f" {phrase} " in padded]
  where = [p for p in where if not any(_PHRASES[p] != _PHRASES[q] and _PHRASES[p] in _PHRASES[q] for q in where)]
  if len(where) != 1:
    return None
  found["position"] = where[0]
  return found


def coverage(shape: str, center: tuple[float, float], half_extent: float,
             height: int, width: int) -> np.ndarray:
  """Fraction of each pixel [H, W] (float32 in [0, 1]) inside the shape.

  The shape's bounding box is centred on `center`; the triangle points up with base
  and height 2*half_extent.
  """
  out = np.zeros((height, width), np.float32)
  (r0, r1, c0, c1), count = _coverage_box(shape, center, half_extent, height, width)
  out[r0:r1, c0:c1] = count / np.float32(_SUPERSAMPLE**2)  # exact: a small integer over 16
  return out


def _coverage_box(shape: str, center: tuple[float, float], half_extent: float, height: int, width: int):
  """((r0, r1, c0, c1), count) over the pixels that can be covered: count (uint8
  [r1-r0, c1-c0]) is how many of the pixel's ss x ss sample points are inside the shape."""
  ss = _SUPERSAMPLE
  ys = (np.arange(height * ss, dtype=np.float32) + 0.5) / (height * ss)
  xs = (np.arange(width * ss, dtype=np.float32) + 0.5) / (width * ss)
  h = half_extent
  # Only pixels that meet the shape's bounding box (plus a one-pixel margin) can be covered:
  # supersample those alone (the same sample points, so the same values as the full grid).
  r0, r1 = (int(np.clip(np.floor((center[1] + s * h) * height) + s, 0, height)) for s in (-1, 1))
  c0, c1 = (int(np.clip(np.floor((center[0] + s * h) * width) + s, 0, width)) for s in (-1, 1))
  r1, c1 = min(height, r1 + 1), min(width, c1 + 1)
  if r0 >= r1 or c0 >= c1:
    return (0, 0, 0, 0), np.zeros((0, 0), np.uint8)
  dx = xs[None, c0 * ss:c1 * ss] - center[0]
  dy = ys[r0 * ss:r1 * ss, None] - center[1]
  if shape == "circle":
    inside = dx**2 + dy**2 <= h**2
  elif shape == "square":
    inside = (np.abs(dx) <= h) & (np.abs(dy) <= h)
  elif shape == "triangle":
    inside = (dy >= -h) & (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
  else:
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
  # Count per ss x ss block by adding its row and column slices: NumPy reduces short strided
  # axes (reshape + sum over axes 1 and 3) far slower, and that dominated a 256 px render.
  blocks = inside.view(np.uint8).reshape(r1 - r0, ss, c1 - c0, ss)
  rows = blocks[:, 0].copy()
  for i in range(1, ss):
    rows += blocks[:, i]
  count = rows[..., 0].copy()
  for i in range(1, ss):
    count += rows[..., i]
  return (r0, r1, c0, c1), count


def render(scene: Scene, resolution: int | tuple[int, int]) -> np.ndarray:
  """Draws a scene: uint8 [H, W, 3]."""
  height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
  bg = np.asarray(BACKGROUNDS[scene.background], np.float32)
  fg = np.asarray(ALL_COLORS[scene.color], np.float32)
  image = np.empty((height, width, 3), np.uint8)
  # Uncovered pixels: the background exactly (filled a row at a time: broadcasting a
  # 3-vector over every pixel is much slower).
  image.reshape(height, width * 3)[:] = np.tile(bg.astype(np.uint8), width)
  (r0, r1, c0, c1), count = _coverage_box(scene.shape, scene.center, scene.half_extent, height, width)
  # A covered pixel's colour depends only on its sample count: blend the ss*ss + 1 possible
  # colours once (coverage count / ss^2, exact in float32) and look them up.
  alpha = np.arange(_SUPERSAMPLE**2 + 1, dtype=np.float32) / np.float32(_SUPERSAMPLE**2)
  colours = np.round(bg + alpha[:, None] * (fg - bg)).astype(np.uint8)
  image[r0:r1, c0:c1] = np.take(colours, count, axis=0)
  return image


def _layout(rng: np.random.Generator, position: str, size: str) -> dict[str, Any]:
  row, col = position.split()
  cx = (COLS.index(col) + 0.5) / 3 + rng.uniform(-_CENTER_JITTER, _CENTER_JITTER)
  cy = (ROWS.index(row) + 0.5) / 3 + rng.uniform(-_CENTER_JITTER, _CENTER_JITTER)
  h = SIZES[size] * (1 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER))
  return dict(center=(float(cx), float(cy)), half_extent=float(h))


def scene_for(seed: int, split: str, index: int) -> tuple[Scene, str]:
  """The scene and caption of example `index` of `split`, a pure function of its arguments."""
  if split not in SPLITS:
    raise ValueError(f"unknown shapes split {split!r}; expected one of {SPLITS}")
  rng = np.random.default_rng([seed, SPLITS.index(split), index])
  if split in ("new_color", "prompts") and rng.random() < 0.5:
    color, shape = str(rng.choice(list(NEW_COLORS))), str(rng.choice(SHAPES))
  elif split == "prompts":  # every pair, the unseen ones too: captions only (see the docstring)
    color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
  else:
    while True:
      color = str(rng.choice(list(COLORS)))
      shape = str(rng.choice(SHAPES))
      if ((color, shape) in HELD_OUT) == (split == "held_out"):
        break
  size = str(rng.choice(list(SIZES)))
  position = str(rng.choice(POSITIONS))
  background = str(rng.choice(list(BACKGROUNDS)))
  scene = Scene(color, shape, size, position, background, **_layout(rng, position, size))
  template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
  return scene, caption(scene, CURATED_TEMPLATE if split == "curated" else template)


_CHOICES = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES), "position": POSITIONS}


def web_example(seed: int, index: int, resolution: int | tuple[int, int], rates: Mapping[str, float]
                ) -> tuple[np.ndarray, degrade.NoisyCaption, tuple[str, ...], Scene]:
  """Record `index` of the 'web' split: (degraded image, noisy caption, the degradations
  applied, the true scene)."""
  scene, _ = scene_for(seed, "web", index)
  rng = np.random.default_rng([seed, SPLITS.index("web"), index, 2])
  noisy = degrade.noisy_caption(scene.attributes(), scene.background, _PHRASES, _CHOICES, rng, rates)
  image, applied = degrade.degrade(render(scene, resolution), scene.center, scene.half_extent, rng, rates)
  return image, noisy, applied, scene


class ShapesSource:
  """grain random-access source: record i -> {'image': uint8 [H, W, 3], 'caption': str, attributes}."""

  def __init__(self, resolution: int = 64, split: str = "train", size: int = 1_000_000, seed: int = 0,
               web: Mapping[str, float] | None = None):
    if split not in SPLITS:
      raise ValueError(f"unknown shapes split {split!r}; expected one of {SPLITS}")
    self.resolution, self.split, self.size, self.seed = resolution, split, size, seed
    self.web = dict(web or {})  # the 'web' split's rates (degrade.RATES)
    self.sides: np.ndarray | None = None  # per-record resolution (`render_at`) instead of `resolution`

  def render_at(self, sides: np.ndarray) -> None:
    """Draws record i at sides[i] x sides[i] from now on (multi-resolution training)."""
    if len(sides) != self.size:
      raise ValueError(f"{len(sides)} sides for {self.size} records")
    self.sides = np.asarray(sides)

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self.size:
      raise IndexError(f"index {index} out of range for {self.size} examples")
    resolution = self.resolution if self.sides is None else int(self.sides[index])
    if self.split == "web":
      image, noisy, _, scene = web_example(self.seed, int(index), resolution, self.web)
      return dict(image=image, caption=noisy.text, **scene.attributes())
    scene, text = scene_for(self.seed, self.split, int(index))
    return dict(image=render(scene, resolution), caption=text, **scene.attributes())

  def __repr__(self) -> str:
    return f"ShapesSource(resolution={self.resolution}, split={self.split!r}, size={self.size}, seed={self.seed})"


def preference_pair(seed: int, split: str, index: int) -> tuple[Scene, Scene, str, str]:
  """(preferred scene, rejected scene, caption, changed attribute) for preference data.

  The preferred scene matches its caption; the rejected one is the same scene with one
  attribute (colour, shape, size or position, chosen from the index) set to another
  value, laid out afresh where size or position changed. The caption describes the
  preferred scene.
  """
  scene, text = scene_for(seed, split, index)
  rng = np.random.default_rng([seed, SPLITS.index(split), index, 1])
  attribute = ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]
  choices = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES), "position": list(POSITIONS)}
  value = str(rng.choice([v for v in choices[attribute] if v != getattr(scene, attribute)]))
  rejected = dataclasses.replace(scene, **{attribute: value})
  if attribute in ("size", "position"):
    rejected = dataclasses.replace(rejected, **_layout(rng, rejected.position, rejected.size))
  return scene, rejected, text, attribute


class PreferencePairsSource(ShapesSource):
  """grain random-access source of preference pairs: record i -> {'image_w': preferred uint8
  [H, W, 3], 'image_l': rejected, 'caption': str, 'changed': the attribute that differs}."""

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self.size:
      raise IndexError(f"index {index} out of range for {self.size} examples")
    preferred, rejected, text, changed = preference_pair(self.seed, self.split, int(index))
    return dict(image_w=render(preferred, self.resolution), image_l=render(rejected, self.resolution),
                caption=text, changed=changed)

  def __repr__(self) -> str:
    return "PreferencePairs" + super().__repr__()


def benchmark(split: str, num: int, seed: int = 1234) -> list[tuple[str, dict[str, str]]]:
  """Evaluation prompts: (caption, attributes) with the canonical template, balanced over
  positions and sizes; 'held_out' uses only HELD_OUT colour-shape pairs, 'new_color' only
  the NEW_COLORS."""
  rng = np.random.default_rng([seed, SPLITS.index(split)])
  if split == "new_color":
    pairs = [(c, s) for c in NEW_COLORS for s in SHAPES]
  else:
    pairs = [(c, s) for c in COLORS for s in SHAPES if ((c, s) in HELD_OUT) == (split == "held_out")]
  out = []
  for i in range(num):
    color, shape = pairs[rng.integers(len(pairs))]
    scene = Scene(color, shape, tuple(SIZES)[i % 2], POSITIONS[(i // 2) % len(POSITIONS)],
                  str(rng.choice(list(BACKGROUNDS))))
    out.append((caption(scene), scene.attributes()))
  return out

