"""The pixel convention: images are uint8 in [0, 255] in datasets, caches and outputs, and
float32 in [-1, 1] in model space (a pixel-space denoiser's input and output, a VAE's input).
Every conversion goes through these two functions."""

from __future__ import annotations

import numpy as np


def from_uint8(images):
  """uint8 [..., C] in [0, 255] -> float32 in [-1, 1]; NumPy in, NumPy out; JAX in, JAX out
  (usable inside jit)."""
  return images.astype(np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 [0, 255] (NumPy, on the host), rounded and clipped."""
  return np.asarray(np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255), np.uint8)
