"""Records -> images: decoding and resizing (to_rgb), a record's image and loss mask at a
shape (decode_image), and the Corrupt marker that stands in for a record that cannot be read
or decoded (Guarded wraps a source so reading one never raises)."""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Mapping

import numpy as np
from PIL import Image

from jdiff.data import files


@dataclasses.dataclass(frozen=True)
class Corrupt:
  """Stands in for a record that could not be read or decoded."""

  index: int
  error: str


class Guarded:
  """Wraps a source so a record that fails to read becomes a `Corrupt` marker."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    try:
      return self._source[index]
    except Exception as e:  # a broken record must not stop a long run
      return Corrupt(int(index), f"read: {e!r}")

  def __repr__(self) -> str:
    return f"Guarded({self._source!r})"


def to_rgb(image: Any, resolution: int | tuple[int, int], alpha: bool = False) -> np.ndarray:
  """Encoded bytes or an array -> uint8 [height, width, 3] (`resolution`: a side, or (height,
  width)): resize to cover that shape (bicubic, antialiased), centre-crop the rest. alpha:
  [height, width, 4], the image's alpha channel last (255 where it has none).

  A JPEG at least twice the target size is decoded at 1/2, 1/4 or 1/8 scale in the DCT
  domain (Pillow's `draft`; still at least the target size), which is most of the decode
  time saved for large photos. Downscaling by less than 2x resamples only the crop (Pillow's `box`:
  the sample positions of resizing the whole image, within one level of rounding); from 2x
  down (reduced by an integer factor first, on the whole image's grid) and upscaling resize
  the whole image, then crop.
  """
  height, width = (resolution, resolution) if isinstance(resolution, (int, np.integer)) else resolution
  if isinstance(image, (bytes, bytearray, memoryview)):
    pil = Image.open(io.BytesIO(bytes(image)))
    if pil.format == "JPEG":
      scale = max(width / pil.size[0], height / pil.size[1])
      if scale <= 0.5:
        pil.draft("RGB", (math.ceil(pil.size[0] * scale), math.ceil(pil.size[1] * scale)))
    pil.load()
  else:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or arr.dtype != np.uint8:
      raise ValueError(f"expected a uint8 [H, W, 1|3|4] image, got {arr.dtype} {arr.shape}")
    if arr.shape[:2] == (height, width) and arr.shape[-1] == 3 and not alpha:
      return arr
    pil = Image.fromarray(arr if arr.shape[-1] != 1 else arr[..., 0])
  pil = pil.convert("RGBA" if alpha else "RGB")
  w, h = pil.size
  scale = max(width / w, height / h)
  # The resized size, and the crop's offset in it.
  rw, rh = max(width, round(w * scale)), max(height, round(h * scale))
  left, top = (rw - width) // 2, (rh - height) // 2
  if 0.5 < scale < 1:
    sx, sy = w / rw, h / rh
    return np.asarray(pil.resize((width, height), Image.Resampling.BICUBIC,
                                 box=(left * sx, top * sy, (left + width) * sx, (top + height) * sy)),
                      np.uint8)
  if (rw, rh) != (w, h):  # upscaling, or >= 2x down (an integer reduction first, on the whole image)
    pil = pil.resize((rw, rh), Image.Resampling.BICUBIC, reducing_gap=None if scale > 0.5 else 2.0)
  return np.asarray(pil.crop((left, top, left + width, top + height)), np.uint8)


IMAGE_KEYS = ("image", "image_w", "image_l")  # a captioned image, or a preference pair
LOSS_MASKS = ("none", "alpha", "file")  # config.data.loss_mask


def decode_image(record: Mapping[str, Any], shape: int | tuple[int, int], loss_mask: str = "none"
                 ) -> dict[str, np.ndarray]:
  """A record's image at `shape` {'image': uint8 [h, w, 3]}, with data.loss_mask's weights
  {'mask': uint8 [h, w, 1]} unless it is 'none': the image's alpha channel ('alpha'), or the
  record's 'mask' image (a mask file: resized to the image's size first, then cropped as the
  image is; all 255 where the record has none)."""
  if loss_mask == "alpha":
    rgba = to_rgb(record["image"], shape, alpha=True)
    return dict(image=np.ascontiguousarray(rgba[..., :3]), mask=np.ascontiguousarray(rgba[..., 3:]))
  out = dict(image=to_rgb(record["image"], shape))
  if loss_mask == "file":
    mask = record.get("mask")
    if mask is None:
      out["mask"] = np.full(out["image"].shape[:2] + (1,), 255, np.uint8)
    else:
      with Image.open(io.BytesIO(bytes(mask))) as pil:
        gray = pil.convert("L").resize(files.header_size(record["image"]), Image.Resampling.BILINEAR)
      out["mask"] = to_rgb(np.asarray(gray)[..., None], shape)[..., :1]
  return out
