"""Text-to-image generation with trained weights: load a workdir, turn prompts into images.

Used by the trainer (sample grids), `python -m jdiff.sample` and `python -m jdiff.evaluate`,
and importable from a notebook:

    model = jdiff.inference.load("runs/demo")
    images = jdiff.inference.generate(model, ["a large red circle in the top left"])
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from jdiff.workdir import checkpoint as ckpt_lib
from jdiff import diffusion
from jdiff import errors
from jdiff import networks as networks_lib
from jdiff.workdir import run_config
from jdiff import tokens
from jdiff.data import pixels
from jdiff.models import layers
from jdiff.interop import sd3_pipeline

log = logging.getLogger(__name__)
_WARNED_CUT: set[tuple[str, int]] = set()  # (prompt, room): warn once per process, not every sampling


@dataclasses.dataclass
class Model:
  """Networks plus the weights to sample with (usually EMA) and the config they came from.

  Latent models with a pipeline's frozen text encoders also use the VAE decoder of
  config.autoencoder.path and, for prompts the cache does not hold, the text encoders of
  config.text.pipeline; both are loaded on first use.
  """

  networks: networks_lib.Networks
  params: Any
  config: ml_collections.ConfigDict
  step: int | None = None
  text_encoder: Any = None
  vae: Any = None

  def _encoder(self):
    if self.text_encoder is None:
      if not self.config.text.pipeline:
        raise errors.InvalidArgument("these prompts are not in the cache and config.text.pipeline is not set")
      self.text_encoder = sd3_pipeline.load_text_encoder(self.config.text.encoder, self.config.text.pipeline,
                                                         self.config.text.t5_len, self.config.text.dtype)
    return self.text_encoder

  def inputs(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """The conditioning inputs of `prompts`, batched: {'tokens'} or {'context', 'pooled'}."""
    if self.networks.text is not None:
      room = self.networks.max_len - 1  # after BOS
      for p in dict.fromkeys(prompts):
        if len(p.encode("utf-8")) > room and (p, room) not in _WARNED_CUT:
          _WARNED_CUT.add((p, room))
          log.warning("prompt %r is %d bytes, longer than the text encoder reads (text.max_len=%d): it is cut "
                      "to %r", p, len(p.encode("utf-8")), self.networks.max_len,
                      p.encode("utf-8")[:room].decode("utf-8", "ignore"))
      return dict(tokens=tokens.tokenize(list(prompts), self.networks.max_len))
    cached = self.networks.cached
    if cached is not None and all(p in cached["prompts"] for p in prompts):
      idx = [cached["prompts"].index(p) for p in prompts]
      return dict(context=cached["prompt_context"][idx], pooled=cached["prompt_pooled"][idx])
    return self._encoder().encode(list(prompts))

  def null_inputs(self) -> dict[str, np.ndarray]:
    """The empty caption's inputs (no batch axis)."""
    if self.networks.text is None and self.networks.cached is None:
      return {k: v[0] for k, v in self._encoder().encode([""]).items()}
    return self.networks.null_inputs()

  def decode(self, x: jax.Array) -> np.ndarray:
    """Model-space samples -> images in [-1, 1] (the VAE decoder for latent models)."""
    if not self.networks.latent:
      return np.asarray(x)
    if self.vae is None:
      module, params = sd3_pipeline.load_vae(self.config.autoencoder.path, self.config.autoencoder.dtype)
      self.vae = (jax.jit(lambda p, z: module.apply(p, z, method=module.decode)), params)
    decode, params = self.vae
    n = self.networks
    return np.asarray(decode(params, x / n.latent_scale + n.latent_shift))


def load(workdir: str, step: int | None = None) -> Model:
  """The EMA weights of `workdir`'s latest (or given) checkpoint, on the default device."""
  config = run_config.load(workdir)
  try:
    layers.check_backend(config.model.attention)
  except errors.InvalidArgument:  # trained on a GPU, sampled elsewhere: same numbers, other kernel
    log.info("sampling with attention 'default': %s trained with 'cudnn', which needs a GPU", workdir)
    config.model.attention = "default"
  networks = networks_lib.build_networks(config)
  abstract = jax.eval_shape(lambda: nn.unbox(networks.init_params(jax.random.key(0))))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
  ema, _, step = ckpt_lib.restore_ema(workdir, abstract, step)
  return Model(networks, ema, config, step)


def guided_velocity(networks: networks_lib.Networks, params: Any, inputs: Mapping[str, jax.Array],
                    null: Mapping[str, jax.Array] | None, w: jax.Array | float, prediction: str,
                    true_cfg_scale: float = 1.0):
  """A model's guided velocity field v(x, t) for conditioning `inputs` at scale w (scalar or
  [B]): classifier-free guidance with the null conditioning inputs `null` (two forwards; one
  when w is the constant 1); for a guidance-embedded model, w is its guidance input (one
  forward), and true_cfg_scale != 1 adds classifier-free guidance at that scale (two)."""
  cond = networks.conditioning(params, inputs)
  model_fn = lambda x, t, c: networks.predict(params["denoiser"], x, t, c)
  if networks.denoiser.guidance_embed:
    if true_cfg_scale == 1.0:
      return diffusion.embedded_guidance_velocity(model_fn, cond, w, prediction)
    guidance = lambda x: jnp.broadcast_to(jnp.asarray(w, jnp.float32), x.shape[:1])
    guided_fn = lambda x, t, c: model_fn(x, t, dict(c, guidance=guidance(x)))
    return diffusion.guided_velocity(guided_fn, cond, networks.conditioning(params, null), true_cfg_scale, prediction)
  uncond = None if isinstance(w, (int, float)) and w == 1.0 else networks.conditioning(params, null)
  return diffusion.guided_velocity(model_fn, cond, uncond, w, prediction)


@functools.lru_cache(maxsize=8)
def _sampler(networks: networks_lib.Networks, num_steps: int, method: str, cfg_scale: float,
             prediction: str, shift_cfg: tuple, size: tuple[int, int], true_cfg_scale: float = 1.0):
  """A jitted (params, inputs, null inputs, keys [B]) -> model-space samples [B, H, W, C]
  (size = (H, W))."""
  times = diffusion.inference_times(num_steps, networks.seq_len(*size), dict(shift_cfg))
  shape = (*size, networks.channels)

  @jax.jit
  def run(params, inputs, null_inputs, keys):
    noise = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
    velocity = guided_velocity(networks, params, inputs, null_inputs, cfg_scale, prediction, true_cfg_scale)
    return diffusion.solve(velocity, noise, times, method)

  return run


def forwards_per_image(networks: networks_lib.Networks, num_steps: int, cfg_scale: float, method: str,
                       true_cfg_scale: float = 1.0) -> int:
  """Network evaluations per image: steps x (2 with classifier-free guidance, else 1) x
  (2 for Heun)."""
  embedded = networks.denoiser.guidance_embed
  branches = 2 if (true_cfg_scale != 1.0 if embedded else cfg_scale != 1.0) else 1
  return num_steps * branches * (2 if method == "heun" else 1)


def check_size(model: Model, resolution: int | tuple[int, int]) -> tuple[int, int]:
  """A side or (height, width) -> (height, width), checked against the model's patch size and
  position table."""
  size = (resolution, resolution) if isinstance(resolution, (int, np.integer)) else tuple(resolution)
  p, limit = model.networks.patch_size, model.config.model.pos_embed_max_size
  if len(size) != 2 or min(size) <= 0 or size[0] % p or size[1] % p:
    raise errors.InvalidArgument(f"image size {size}: height and width must be positive multiples of the patch size "
                                 f"{p}")
  if limit and max(size) // p > limit:
    raise errors.InvalidArgument(f"image size {size[0]}x{size[1]} is {max(size) // p} patches long; the model's "
                                 f"position table (model.pos_embed_max_size) covers {limit}")
  return int(size[0]), int(size[1])


def generate(model: Model, prompts: Sequence[str], *, num_steps: int | None = None,
             cfg_scale: float | None = None, method: str | None = None, seed: int = 0,
             batch_size: int | None = None, resolution: int | tuple[int, int] | None = None,
             first_index: int = 0, true_cfg_scale: float | None = None) -> np.ndarray:
  """Images for `prompts`: uint8 [N, H, W, C].

  Sampler settings default to config.sample; the schedule is shifted for `resolution`
  (the model-space size: a side, or (height, width), multiples of the patch size within the
  model's position table; default: the training one) exactly as in training. For a
  guidance-distilled model (model.guidance_embed) cfg_scale is its guidance input, and
  true_cfg_scale (default config.sample's) adds classifier-free guidance. Image i's
  noise comes from fold_in(key(seed), first_index + i), so an image does not depend on its
  batch (and a long list can be generated in chunks with the same result).
  """
  if not len(prompts):
    raise errors.InvalidArgument("no prompts to sample")
  s = model.config.sample
  num_steps = s.num_steps if num_steps is None else num_steps
  cfg_scale = s.cfg_scale if cfg_scale is None else cfg_scale
  true_cfg_scale = s.get("true_cfg_scale", 1.0) if true_cfg_scale is None else true_cfg_scale
  method = method or s.method
  batch_size = batch_size or s.batch_size
  size = check_size(model, resolution or model.networks.resolution)
  shift_cfg = tuple(sorted(dict(model.config.diffusion.shift).items()))
  run = _sampler(model.networks, num_steps, method, float(cfg_scale), model.config.diffusion.prediction,
                 shift_cfg, size, float(true_cfg_scale))
  inputs = model.inputs(prompts)
  null = model.null_inputs()
  base = jax.random.key(seed)
  out = []
  for start in range(0, len(prompts), batch_size):
    stop = min(start + batch_size, len(prompts))
    # Pad the last batch to a full one so the sampler compiles once.
    idx = np.arange(start, start + batch_size).clip(max=stop - 1)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(first_index + idx))
    batch = {k: jnp.asarray(v[idx]) for k, v in inputs.items()}
    nulls = {k: jnp.asarray(np.broadcast_to(v, (batch_size,) + v.shape)) for k, v in null.items()}
    samples = run(model.params, batch, nulls, keys)
    out.append(pixels.to_uint8(model.decode(samples))[: stop - start])
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


MIN_VIEW_SIDE = 256  # upscale=0 enlarges small images to at least this short side


def write_samples(model: Model, prompts: Sequence[str], out: str, *, num_images: int = 1, upscale: int = 0,
                  **generate_kwargs) -> dict[str, Any]:
  """Samples `num_images` per prompt (`generate`'s keyword arguments) and writes OUT/<i>.png,
  OUT/grid.png (a prompt's images in a row when num_images > 1) and OUT/prompts.txt (i: prompt),
  enlarged `upscale` times (0: to a short side of at least MIN_VIEW_SIDE). The images of an
  earlier call in OUT are removed first; other files are left alone. Returns the paths."""
  prompts = [p for p in prompts for _ in range(num_images)]
  images = generate(model, prompts, **generate_kwargs)
  os.makedirs(out, exist_ok=True)
  stale = [n for n in os.listdir(out) if re.fullmatch(r"\d{4}\.png|grid\.png|prompts\.txt", n)]
  for name in stale:  # an earlier run's images: none may stay beside a prompts.txt that does not list them
    os.remove(os.path.join(out, name))
  upscale = upscale or max(1, math.ceil(MIN_VIEW_SIDE / min(images.shape[1:3])))
  paths = []
  for i, image in enumerate(images):
    paths.append(os.path.join(out, f"{i:04d}.png"))
    save_png(image, paths[-1], upscale)
  save_png(grid(images, columns=num_images if num_images > 1 else None), os.path.join(out, "grid.png"), upscale)
  with open(os.path.join(out, "prompts.txt"), "w") as f:
    f.write("\n".join(f"{i:04d}: {p}" for i, p in enumerate(prompts)) + "\n")
  return {"step": model.step, "images": paths, "grid": os.path.join(out, "grid.png")}
