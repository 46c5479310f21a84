"""Validation loss: the flow-matching error of a model on fixed held-apart data, at fixed
timesteps and fixed noise, so that runs trained with different timestep densities, shifts
or prediction targets are scored on the same scale.

The score is the velocity error ||v_pred - (eps - x0)||^2 (mean over pixels), whatever the
model predicts (its output is converted to a velocity), averaged over examples at each of
`num_times` evenly spaced t_i = (i + 1/2) / num_times, then over the t_i. No shift and no
weighting are applied: every noise level counts the same. Examples come from the embedded
shapes data drawn with another seed than training's (same distribution, other images).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff import networks as networks_lib
from jdiff import tokens
from jdiff.data import pixels
from jdiff.data import shapes

# Added to config.data.shapes_seed: the validation images are never training images.
SEED_OFFSET = 7919


@functools.lru_cache(maxsize=4)
def _examples(seed: int, resolution: int, num: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(images in model space float32 [num, R, R, 3], tokens int32 [num, max_len])."""
  source = shapes.ShapesSource(resolution, "train", size=num, seed=seed)
  records = [source[i] for i in range(num)]
  images = pixels.from_uint8(np.stack([r["image"] for r in records]))
  return images, tokens.tokenize([r["caption"] for r in records], max_len)


def times(num_times: int) -> np.ndarray:
  """The evaluation timesteps: (i + 1/2) / num_times, i < num_times (float32)."""
  return ((np.arange(num_times) + 0.5) / num_times).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _error_fn(networks: networks_lib.Networks, prediction: str):
  @jax.jit
  def error(params, x0, base_key, time_index, example_index, t, toks):
    # Example j's noise at time i: a key folded from (i, j), so the draws do not depend on
    # the batching, and are made inside the compiled function.
    keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(base_key, time_index), j))(example_index)
    eps = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(keys)
    x_t = diffusion.interpolate(x0, eps, t)
    cond = networks.conditioning(params, {"tokens": toks})
    if networks.denoiser.guidance_embed:
      # A guidance-distilled student at w = 1 is its teacher's conditional prediction: the
      # same quantity as every other model's loss.
      cond["guidance"] = jnp.ones_like(t)
    pred = networks.predict(params["denoiser"], x_t, t, cond)
    v = diffusion.convert(pred, prediction, "v", x_t, t)
    return diffusion.velocity_error(v, eps - x0)
  return error


def loss(networks: networks_lib.Networks, params: Any, config, *, num_examples: int | None = None,
         num_times: int | None = None, batch_size: int = 64) -> dict[str, float]:
  """{'val_loss': mean over t, 'val_loss/t=0.06': mean at that t, ...} of `params` (pixel-space
  models with the byte text encoder on the shapes data; see eval.benchmark.applies).

  Guidance-embedding students are scored at guidance scale 1 (their conditional prediction).
  The noise of example j at time i is fixed (a key folded from (i, j)), so two calls on the
  same params agree exactly and two models are compared on the same draws.
  """
  v = config.eval
  num_examples = num_examples or v.val_examples
  num_times = num_times or v.val_times
  if networks.latent or networks.text is None:
    raise ValueError("the validation loss scores pixel-space models with the byte text encoder")
  x0_all, toks_all = _examples(config.data.shapes_seed + SEED_OFFSET, networks.resolution, num_examples,
                               networks.max_len)
  error = _error_fn(networks, config.diffusion.prediction)
  base = jax.random.key(v.seed)
  out = {}
  per_time = []
  for i, t in enumerate(times(num_times)):
    errs = []
    for start in range(0, num_examples, batch_size):
      idx = np.arange(start, start + batch_size).clip(max=num_examples - 1)  # full batches: one compile
      e = error(params, jnp.asarray(x0_all[idx]), base, i, jnp.asarray(idx), jnp.full((batch_size,), t),
                jnp.asarray(toks_all[idx]))
      errs.append(np.asarray(e)[: min(batch_size, num_examples - start)])
    per_time.append(float(np.mean(np.concatenate(errs))))
    out[f"val_loss/t={t:.2f}"] = per_time[-1]
  out["val_loss"] = float(np.mean(per_time))
  return out
