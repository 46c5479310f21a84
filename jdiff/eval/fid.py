"""FID and KID: InceptionV3 pool3 features in JAX, statistics and distances as the reference
tools compute them.

The features come from the FID network (jdiff/models/inception.py, the TensorFlow graph of
2015-12-05 with pytorch-fid's / torch-fidelity's weights file). Images reach it at 299x299
through a named resize, since the resize alone moves FID by points:

  'tf1_bilinear'  TensorFlow 1's bilinear resize (no half-pixel offset), as in the original TF
                  FID code, ADM's evaluation suite and torch-fidelity (jitted, on device);
  'pil_bicubic'   PIL's bicubic on float channels, clean-fid's 'clean' mode (on the host);
  'none'          the images are 299x299 already.

The network's input scaling is the graph's own: (x - 128) / 128 for x in [0, 255].
Statistics are float64 on the host (numpy/scipy), as in pytorch-fid: FID is |mu1 - mu2|^2 +
tr(S1 + S2 - 2 sqrtm(S1 S2)); KID is the unbiased MMD^2 with the kernel (x.y / d + 1)^3,
averaged over random subsets (Binkowski et al. 2018).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import scipy.linalg
import tqdm

from jdiff import errors
from jdiff.data import decode, files, sources
from jdiff.interop import inception as inception_io
from jdiff.models import inception

log = logging.getLogger(__name__)

SIZE = 299
RESIZES = ("tf1_bilinear", "pil_bicubic", "none")


def tf1_bilinear(images: jax.Array, size: tuple[int, int] = (SIZE, SIZE)) -> jax.Array:
  """[B, H, W, C] -> [B, size, C] float32 by TensorFlow 1's resize_bilinear(align_corners=False):
  output pixel i samples the input at i * in / out (no half-pixel centres), between the two
  nearest rows/columns, the upper one clamped to the edge."""
  x = images.astype(jnp.float32)

  def axis(n_in: int, n_out: int):
    pos = jnp.arange(n_out, dtype=jnp.float32) * jnp.float32(n_in / n_out)
    lo = jnp.floor(pos).astype(jnp.int32)
    return lo, jnp.minimum(lo + 1, n_in - 1), pos - lo.astype(jnp.float32)

  y_lo, y_hi, dy = axis(x.shape[1], size[0])
  x_lo, x_hi, dx = axis(x.shape[2], size[1])
  rows_lo, rows_hi = x[:, y_lo], x[:, y_hi]
  lerp = lambda a, b, f: a + (b - a) * f
  dx = dx[None, None, :, None]
  top = lerp(rows_lo[:, :, x_lo], rows_lo[:, :, x_hi], dx)
  bottom = lerp(rows_hi[:, :, x_lo], rows_hi[:, :, x_hi], dx)
  return lerp(top, bottom, dy[None, :, None, None])


def pil_bicubic(images: np.ndarray, size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
  """[B, H, W, C] -> [B, size, C] float32 by PIL's bicubic filter on each channel in float
  ('F') mode, clipped to [0, 255]: clean-fid's resize (no quantisation after it)."""
  out = np.empty((len(images), size[0], size[1], images.shape[-1]), np.float32)
  for i, image in enumerate(np.asarray(images)):
    for c in range(image.shape[-1]):
      channel = Image.fromarray(image[..., c].astype(np.float32), mode="F")
      out[i, ..., c] = np.asarray(channel.resize((size[1], size[0]), Image.Resampling.BICUBIC))
  return np.clip(out, 0, 255)


class Features:
  """InceptionV3 pool3 features [N, 2048] float32 of uint8 (or [0, 255] float) RGB images of any
  size, in jitted batches split over this host's devices (params replicated). `params`:
  InceptionV3 params (interop.inception.load_params)."""

  def __init__(self, params: Mapping[str, Any], resize: str = "tf1_bilinear", batch_size: int = 64):
    if resize not in RESIZES:
      raise ValueError(f"unknown resize {resize!r}; expected one of {RESIZES}")
    devices = jax.local_devices()
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    rows, replicated = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)) for spec in (("data",), ()))
    self.resize, self.devices = resize, len(devices)
    self.batch_size = -(-batch_size // self.devices) * self.devices  # whole rows per device
    self.params = jax.device_put(params, replicated)
    model = inception.InceptionV3()

    def features(params, images):
      if resize == "tf1_bilinear":
        images = tf1_bilinear(images)
      x = (images.astype(jnp.float32) - 128.0) / 128.0
      return model.apply({"params": params}, x)["pool"]

    self._features = jax.jit(features, in_shardings=(replicated, rows), out_shardings=rows)

  @classmethod
  def load(cls, weights: str, resize: str = "tf1_bilinear", batch_size: int = 64) -> "Features":
    return cls(inception_io.load_params(weights), resize, batch_size)

  def __call__(self, images: np.ndarray | jax.Array) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected [N, H, W, 3] RGB images, got shape {images.shape}")
    if self.resize == "none" and images.shape[1:3] != (SIZE, SIZE):
      raise ValueError(f"resize='none' needs {SIZE}x{SIZE} images, got {images.shape[1]}x{images.shape[2]}")
    # Every batch is padded to one size (one compilation): the full batch, or for a set smaller
    # than that the set rounded up to whole rows per device.
    size = min(self.batch_size, -(-len(images) // self.devices) * self.devices)
    out = []
    for start in range(0, len(images), size):
      batch = images[start:start + size]
      n = len(batch)
      if self.resize == "pil_bicubic":
        batch = pil_bicubic(batch)
      if n < size:
        batch = np.concatenate([batch, np.repeat(batch[-1:], size - n, axis=0)])
      out.append(np.asarray(self._features(self.params, batch))[:n])
    return np.concatenate(out) if out else np.zeros((0, inception.POOL_FEATURES), np.float32)


def source_images(source, resolution: int, num_images: int | None = None, batch_size: int = 64
                  ) -> Iterator[tuple[np.ndarray, list[str]]]:
  """(uint8 images [b, R, R, 3] at `resolution`, their captions) of the first `num_images`
  records of a data source (sources.make_source; default: all), resized and centre-cropped as
  training reads them; records that do not decode are skipped and logged."""
  n = len(source) if num_images is None else min(num_images, len(source))
  images, captions, skipped = [], [], 0
  for i in range(n):
    try:
      record = source[i]
      images.append(decode.decode_image(record, resolution)["image"])
      captions.append(files.caption_choice(record.get("caption", ""), 0, i))
    except Exception as e:  # as in training: a broken record is skipped
      skipped += 1
      log.warning("skipping record %d: %r", i, e)
    if len(images) == batch_size or (i == n - 1 and images):
      yield np.stack(images), captions
      images, captions = [], []
  if skipped:
    log.warning("%d of %d records skipped", skipped, n)


def dataset_features(features: Features, data_cfg: Mapping[str, Any], num_images: int | None = None,
                     split: str = "train") -> tuple[np.ndarray, list[str]]:
  """Features of config.data's images (source_images) and their captions, with a progress bar."""
  source = sources.make_source(data_cfg, split)
  out, captions = [], []
  total = len(source) if num_images is None else min(num_images, len(source))
  with tqdm.tqdm(total=total, desc="features", unit="img", dynamic_ncols=True) as bar:
    for images, caps in source_images(source, data_cfg["resolution"], num_images, features.batch_size):
      out.append(features(images))
      captions += caps
      bar.update(len(images))
  if not out:
    raise errors.InvalidArgument("no image of the source could be decoded")
  return np.concatenate(out), captions


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mu [D], sigma [D, D]) of features [N, D] in float64 (sigma: the unbiased covariance)."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f"statistics need [N >= 2, D] features, got shape {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
  """|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)). As pytorch-fid: if the
  product is singular enough that sqrtm is not finite, eps is added to both diagonals; an
  imaginary part of the root beyond rounding is an error."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                     f"{sigma2.shape}")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    log.warning("FID: sqrtm(sigma1 sigma2) is singular; adding %g to the diagonals", eps)
    offset = np.eye(len(sigma1)) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: sqrtm has an imaginary part {np.max(np.abs(covmean.imag)):.3g}")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
  """The unbiased MMD^2 estimate between samples x [m, D] and y [n, D] under the kernel
  k(a, b) = (a.b / D + coef0)^degree: the within-set means leave out the diagonal."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  d = x.shape[1]
  kernel = lambda a, b: (a @ b.T / d + coef0) ** degree
  k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
  m, n = len(x), len(y)
  within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
  within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
  return float(within_x + within_y - 2 * k_xy.mean())


def kid(x: np.ndarray, y: np.ndarray, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
        ) -> tuple[float, float]:
  """KID: (mean, std) of polynomial_mmd2 over `num_subsets` random subsets of `subset_size`
  features of each set (drawn without replacement; all of a set when it is smaller)."""
  rng = np.random.default_rng(seed)
  size = min(subset_size, len(x), len(y))
  if size < 2:
    raise ValueError(f"KID needs at least 2 features per set, got {len(x)} and {len(y)}")
  values = [polynomial_mmd2(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
            for _ in range(num_subsets)]
  return float(np.mean(values)), float(np.std(values))


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, **meta: Any) -> None:
  """An .npz with 'mu' and 'sigma' (the layout pytorch-fid and ADM's suite read), plus `meta`
  (e.g. resize, num_images) as extra arrays."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in meta.items()})


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of a statistics .npz written by save_stats, pytorch-fid or ADM's suite."""
  reference = Reference.load(path)
  return reference.mu, reference.sigma


@dataclasses.dataclass(frozen=True)
class Reference:
  """Reference statistics (jdiff.fid_stats, or pytorch-fid/ADM: mu and sigma only): the
  features (KID), the captions (prompts for generated images) and the resize they were made
  with, where the file holds them."""

  path: str
  mu: np.ndarray
  sigma: np.ndarray
  features: np.ndarray | None
  captions: list[str] | None
  resize: str

  @classmethod
  def load(cls, path: str) -> "Reference":
    if not os.path.exists(path):
      raise errors.NotFound(f"no FID statistics at {path!r} (write them with python -m jdiff.fid_stats)")
    with np.load(path) as f:
      if "mu" not in f.files or "sigma" not in f.files:
        raise errors.InvalidArgument(f"{path} has no 'mu' and 'sigma' arrays (found {f.files[:8]})")
      mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
      extra = {k: np.asarray(f[k]) for k in ("features", "captions", "resize") if k in f.files}
    captions = [str(c) for c in extra["captions"]] if "captions" in extra else None
    return cls(path, mu, sigma, extra.get("features"), captions, str(extra.get("resize", "tf1_bilinear")))


def write_reference(data_cfg, out: str, weights: str, *, resize: str = "tf1_bilinear", batch_size: int = 64,
                    num_images: int | None = None, split: str = "train", save_features: bool = True) -> dict[str, Any]:
  """The reference statistics of a dataset's first `num_images` records (default: all),
  written to `out` (.npz) with, for KID, the features and captions too; returns a summary."""
  features = Features.load(weights, resize, batch_size)
  feats, captions = dataset_features(features, data_cfg, num_images, split)
  mu, sigma = statistics(feats)
  extra = dict(features=feats, captions=np.array(captions, dtype=np.str_)) if save_features else {}
  save_stats(out, mu, sigma, resize=resize, num_images=len(feats), resolution=data_cfg.resolution,
             source=data_cfg.source, **extra)
  return dict(out=out, num_images=len(feats), resize=resize, resolution=data_cfg.resolution)
