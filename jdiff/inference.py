"""Text-to-image generation with trained weights: load a workdir, turn prompts into images.

Used by the trainer (sample grids), `python -m jdiff.sample` and `python -m jdiff.evaluate`,
and importable from a notebook:

    model = jdiff.inference.load("runs/demo")
    images = jdiff.inference.generate(model, ["a large red circle in the top left"])
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from jdiff import diffusion
from jdiff.models import text as text_lib
from jdiff.train import checkpoint as ckpt_lib
from jdiff.train import state as state_lib


@dataclasses.dataclass
class Model:
  """Networks plus the weights to sample with (usually EMA) and the config they came from."""

  networks: state_lib.Networks
  params: Any
  config: ml_collections.ConfigDict
  step: int | None = None


def load(workdir: str, step: int | None = None) -> Model:
  """The EMA weights of `workdir`'s latest (or given) checkpoint, on the default device."""
  config = ckpt_lib.load_config(workdir)
  networks = state_lib.build_networks(config)
  abstract = jax.eval_shape(lambda: nn.unbox(networks.init_params(jax.random.key(0))))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
  ema, _, step = ckpt_lib.restore_ema(workdir, abstract, step)
  return Model(networks, ema, config, step)


@functools.lru_cache(maxsize=8)
def _sampler(networks: state_lib.Networks, num_steps: int, method: str, cfg_scale: float,
             prediction: str, shift_cfg: tuple, resolution: int):
  """A jitted (params, tokens [B, T], null [B, T], keys [B]) -> images [B, H, W, C] in [-1, 1]."""
  times = diffusion.inference_times(num_steps, networks.seq_len(resolution, resolution), dict(shift_cfg))
  shape = (resolution, resolution, networks.channels)

  @jax.jit
  def run(params, tokens, null_tokens, keys):
    cond = networks.encode(params["text"], tokens)
    uncond = networks.encode(params["text"], null_tokens) if cfg_scale != 1.0 else None
    model_fn = lambda x, t, c: networks.predict(params["denoiser"], x, t, c)
    noise = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
    velocity = diffusion.guided_velocity(model_fn, cond, uncond, cfg_scale, prediction)
    return diffusion.solve(velocity, noise, times, method)

  return run


def to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 [0, 255]."""
  return np.asarray(np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255), np.uint8)


def generate(model: Model, prompts: Sequence[str], *, num_steps: int | None = None,
             cfg_scale: float | None = None, method: str | None = None, seed: int = 0,
             batch_size: int | None = None, resolution: int | None = None) -> np.ndarray:
  """Images for `prompts`: uint8 [N, H, W, C].

  Sampler settings default to config.sample; the schedule is shifted for `resolution`
  (default: the training resolution) exactly as in training. Image i's noise comes from
  fold_in(key(seed), i), so an image does not depend on the batch it is drawn in.
  """
  s = model.config.sample
  num_steps = num_steps or s.num_steps
  cfg_scale = s.cfg_scale if cfg_scale is None else cfg_scale
  method = method or s.method
  batch_size = batch_size or s.batch_size
  resolution = resolution or model.networks.resolution
  shift_cfg = tuple(sorted(dict(model.config.diffusion.shift).items()))
  run = _sampler(model.networks, num_steps, method, float(cfg_scale), model.config.diffusion.prediction,
                 shift_cfg, resolution)
  tokens = text_lib.tokenize(list(prompts), model.networks.max_len)
  null = np.broadcast_to(model.networks.null_tokens(), tokens.shape)
  base = jax.random.key(seed)
  out = []
  for start in range(0, len(prompts), batch_size):
    stop = min(start + batch_size, len(prompts))
    # Pad the last batch to a full one so the sampler compiles once.
    idx = np.arange(start, start + batch_size).clip(max=stop - 1)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(idx))
    images = run(model.params, jnp.asarray(tokens[idx]), jnp.asarray(null[idx]), keys)
    out.append(to_uint8(images)[: stop - start])
  return np.concatenate(out)


def grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """[N, H, W, C] -> one image tiling them in rows, 2-pixel gaps."""
  n, h, w, c = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  out = np.full((rows * (h + 2) + 2, columns * (w + 2) + 2, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, columns)
    out[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + col * (w + 2): 2 + col * (w + 2) + w] = img
  return out


def save_png(image: np.ndarray, path: str, upscale: int = 1) -> None:
  pil = Image.fromarray(image)
  if upscale > 1:
    pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.Resampling.NEAREST)
  pil.save(path)
