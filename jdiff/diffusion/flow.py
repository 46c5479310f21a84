"""The rectified-flow path, its targets, the conversions between parametrisations, and the loss.

Path: x_t = (1 - t)*x0 + t*eps, eps ~ N(0, I); t = 0 is data, t = 1 is noise.
Velocity: v = dx_t/dt = eps - x0.

Given x_t, any one of (v, eps, x0, score) fixes the others:
  x0  = x_t - t*v                 eps = x_t + (1 - t)*v
  v   = (eps - x_t) / (1 - t)     x0  = (x_t - t*eps) / (1 - t)
  v   = (x_t - x0) / t            eps = (x_t - (1 - t)*x0) / t
  score = grad log p_t(x_t) = -E[eps | x_t] / t   (x_t | x0 ~ N((1-t)*x0, t^2 I))
DDPM's noise prediction is the `eps` view and score matching the `score` view of this
one path. Every conversion goes through (x0, eps), so there is one formula per view.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

PREDICTIONS = ("v", "eps", "x0")
VIEWS = ("v", "eps", "x0", "score")
WEIGHTINGS = ("none", "eps", "x0", "sigma_sqrt", "cosmap")

# Divisions by t or 1 - t are kept finite at the path's end points.
_TINY = 1e-5


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
  """t [B] -> [B, 1, ..., 1] matching x's rank."""
  t = jnp.asarray(t, x.dtype)
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = (1 - t)*x0 + t*eps.  x0, eps: [B, ...]; t: [B]."""
  tb = _bcast(t, x0)
  return (1.0 - tb) * x0 + tb * eps


def velocity_target(x0: jax.Array, eps: jax.Array) -> jax.Array:
  """v = eps - x0, the regression target of flow matching."""
  return eps - x0


def to_x0_eps(pred: jax.Array, kind: str, x_t: jax.Array, t: jax.Array):
  """Recovers (x0, eps) from one view of the path at (x_t, t).

  Args:
    pred: [B, ...] a prediction of kind `kind` ('v', 'eps', 'x0' or 'score').
    x_t: [B, ...] the point on the path.
    t: [B] times.

  Returns:
    (x0, eps), each [B, ...].
  """
  tb = _bcast(t, x_t)
  if kind == "v":
    return x_t - tb * pred, x_t + (1.0 - tb) * pred
  if kind in ("eps", "score"):
    eps = pred if kind == "eps" else -tb * pred
    return (x_t - tb * eps) / jnp.maximum(1.0 - tb, _TINY), eps
  if kind == "x0":
    return pred, (x_t - (1.0 - tb) * pred) / jnp.maximum(tb, _TINY)
  raise ValueError(f"unknown view {kind!r}; expected one of {VIEWS}")


def from_x0_eps(x0: jax.Array, eps: jax.Array, kind: str, t: jax.Array) -> jax.Array:
  """The `kind` view ('v', 'eps', 'x0' or 'score') of the pair (x0, eps) at times t [B]."""
  if kind == "v":
    return eps - x0
  if kind == "eps":
    return eps
  if kind == "x0":
    return x0
  if kind == "score":
    return -eps / jnp.maximum(_bcast(t, eps), _TINY)
  raise ValueError(f"unknown view {kind!r}; expected one of {VIEWS}")


def convert(pred: jax.Array, src: str, dst: str, x_t: jax.Array, t: jax.Array) -> jax.Array:
  """Converts a prediction between views of the path: v, eps, x0, score.

  Args:
    pred: [B, ...] prediction in view `src`.
    src, dst: views, each one of ('v', 'eps', 'x0', 'score').
    x_t: [B, ...]; t: [B].
  """
  if src == dst:
    return pred
  x0, eps = to_x0_eps(pred, src, x_t, t)
  return from_x0_eps(x0, eps, dst, t)


def loss_weight(t: jax.Array, weighting: str) -> jax.Array:
  """Per-sample weight w(t) [B] on the velocity-space squared error.

  'none': 1 (plain flow matching). 'eps': (1-t)^2 and 'x0': t^2, the velocity-space
  forms of eps-MSE and x0-MSE (for fixed x_t, eps - eps_hat = (1-t)(v - v_hat) and
  x0 - x0_hat = -t (v - v_hat)). 'sigma_sqrt': t^-2 and 'cosmap': 2 / (pi (1 - 2t + 2t^2)),
  the two weightings of the SD3 training recipes.
  """
  if weighting == "none":
    return jnp.ones_like(t)
  if weighting == "eps":
    return (1.0 - t) ** 2
  if weighting == "x0":
    return t**2
  if weighting == "sigma_sqrt":
    return 1.0 / jnp.maximum(t, _TINY) ** 2
  if weighting == "cosmap":
    return 2.0 / (math.pi * (1.0 - 2.0 * t + 2.0 * t**2))
  raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")


def flow_loss(
    pred: jax.Array,
    x0: jax.Array,
    eps: jax.Array,
    t: jax.Array,
    *,
    prediction: str = "v",
    weighting: str = "none",
    mask: jax.Array | None = None,
) -> jax.Array:
  """Per-sample flow-matching loss, taken in velocity space.

  Args:
    pred: [B, ...] network output, in view `prediction` ('v', 'eps' or 'x0').
    x0: [B, ...] data; eps: [B, ...] noise; t: [B] times used to build x_t.
    weighting: see `loss_weight`.
    mask: optional [B, H, W, 1] weights in [0, 1] for [B, H, W, C] inputs: the squared error
      is averaged with these weights (over the masked area, so the loss keeps its scale
      whatever the area; an all-zero mask gives 0).

  Returns:
    [B] float32: w(t) * mean((v_hat - v)^2) over all non-batch axes (mask-weighted).
  """
  if prediction not in PREDICTIONS:
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
  pred, x0, eps = (a.astype(jnp.float32) for a in (pred, x0, eps))
  v_hat = convert(pred, prediction, "v", interpolate(x0, eps, t), t)
  sq = jnp.square(v_hat - velocity_target(x0, eps))
  axes = tuple(range(1, pred.ndim))
  if mask is None:
    err = jnp.mean(sq, axis=axes)
  else:
    m = jnp.broadcast_to(mask.astype(jnp.float32), sq.shape)
    err = jnp.sum(m * sq, axis=axes) / jnp.maximum(jnp.sum(m, axis=axes), 1e-6)
  return loss_weight(t.astype(jnp.float32), weighting) * err
