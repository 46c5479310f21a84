"""Rewards for online RL (the grpo objective): images and their prompts -> one score each.

A reward is either a JAX function, traced into the train step,
  fn(images: float32 [N, H, W, C] in [-1, 1], tokens: int32 [N, L]) -> float32 [N],
or a host function, called from the jitted step through `jax.pure_callback`,
  fn(images: uint8 [N, H, W, C], prompts: list[str]) -> float32 [N]
(prompts decoded from the byte tokens). Both are deterministic, so a resumed run scores
its rollouts exactly as the uninterrupted one did.

Adding a reward: write the function, add a `Reward` to REWARDS and its name to
jdiff.config.REWARDS (the config module imports no NumPy, so it keeps the names).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import errors
from jdiff import tokens as tokens_lib
from jdiff.data import pixels
from jdiff.data import shapes
from jdiff.eval import adherence


@dataclasses.dataclass(frozen=True)
class Reward:
  fn: Callable[..., np.ndarray | jax.Array]
  host: bool  # True: NumPy on uint8 images and prompt strings; False: traced JAX
  needs_shapes_captions: bool = False  # reads the attributes from shapes captions
  doc: str = ""


def brightness(images: jax.Array, tokens: jax.Array) -> jax.Array:
  """The image's mean brightness in [0, 1] (a reward with an obvious optimum, for tests)."""
  del tokens
  return jnp.mean((images.astype(jnp.float32) + 1.0) / 2.0, axis=tuple(range(1, images.ndim)))


def _hits(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
  """bool [N, 4]: which of colour, shape, size, position each image shows as its prompt says."""
  out = np.zeros((len(prompts), len(shapes.ATTRIBUTES)), bool)
  for i, (image, prompt) in enumerate(zip(images, prompts)):
    target = shapes.parse_caption(prompt)
    if target is None:
      raise errors.InvalidArgument(f"the adherence reward reads shapes captions; {prompt!r} does not name one "
                                   "colour, shape, size and position")
    out[i] = adherence.correct(image, target)
  return out


def adherence_fraction(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
  """The fraction of the four attributes the image gets right (0, 0.25, ..., 1)."""
  return _hits(images, prompts).mean(axis=1).astype(np.float32)


def adherence_all(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
  """1 when the image gets all four attributes right, else 0."""
  return _hits(images, prompts).all(axis=1).astype(np.float32)


REWARDS = {
    "adherence": Reward(adherence_fraction, host=True, needs_shapes_captions=True,
                        doc="fraction of colour, shape, size, position right (jdiff.eval.adherence)"),
    "adherence_all": Reward(adherence_all, host=True, needs_shapes_captions=True,
                            doc="1 if all four attributes are right, else 0"),
    "brightness": Reward(brightness, host=False, doc="mean pixel brightness in [0, 1]"),
}


def get(name: str) -> Reward:
  if name not in REWARDS:
    raise errors.InvalidArgument(f"unknown reward {name!r}; expected one of {tuple(REWARDS)}")
  return REWARDS[name]


def score(reward: Reward, images: jax.Array, tokens: jax.Array) -> jax.Array:
  """The reward of model-space images [N, H, W, C] in [-1, 1] for their prompts' tokens
  [N, L], inside or outside jit: float32 [N]."""
  if not reward.host:
    return reward.fn(images, tokens).astype(jnp.float32)

  def host(images, tokens):
    prompts = [tokens_lib.detokenize(t) for t in np.asarray(tokens)]
    return np.asarray(reward.fn(pixels.to_uint8(images), prompts), np.float32).reshape(len(prompts))

  out = jax.ShapeDtypeStruct((images.shape[0],), jnp.float32)
  return jax.pure_callback(host, out, images, tokens, vmap_method="sequential")
