"""ODE samplers for the flow path: Euler and Heun from t = 1 (noise) to t = 0 (data).

dx/dt = v(x, t); stepping to a smaller t integrates the ODE backwards in time, so
each step adds (t_next - t) * v with t_next < t.

Classifier-free guidance: v = v_u + w*(v_c - v_u), with the conditional and the
unconditional branch evaluated in one batched forward pass of size 2B.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jdiff.diffusion import flow

METHODS = ("euler", "heun")

# model_fn(x [B, ...], t [B], cond pytree with leading B) -> prediction [B, ...]
ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def guided_velocity(
    model_fn: ModelFn,
    cond: Any,
    uncond: Any = None,
    cfg_scale: float = 1.0,
    prediction: str = "v",
) -> VelocityFn:
  """The (guided) velocity field v(x, t) for a trained model.

  Args:
    model_fn: the network; returns its prediction in view `prediction`.
    cond: conditioning pytree, leaves with leading batch axis B.
    uncond: the null conditioning (same structure as `cond`); required when cfg_scale != 1.
    cfg_scale: guidance weight w, a number or one per sample [B]; the number 1 means no
      guidance (one forward of size B).
    prediction: 'v', 'eps' or 'x0'; the prediction is converted to velocity.

  Returns:
    velocity(x [B, ...], t [B]) -> v [B, ...], differentiable in the model's parameters.
  """
  if isinstance(cfg_scale, (int, float)) and cfg_scale == 1.0:
    return lambda x, t: flow.convert(model_fn(x, t, cond), prediction, "v", x, t)
  if uncond is None:
    raise ValueError("classifier-free guidance (cfg_scale != 1) needs `uncond`")
  both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)

  def velocity(x, t):
    x2, t2 = jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0)
    v_c, v_u = jnp.split(flow.convert(model_fn(x2, t2, both), prediction, "v", x2, t2), 2)
    w = jnp.asarray(cfg_scale, jnp.float32)
    return v_u + w.reshape(w.shape + (1,) * (x.ndim - w.ndim)) * (v_c - v_u)

  return velocity


def embedded_guidance_velocity(model_fn: ModelFn, cond: Any, guidance_scale: float | jax.Array,
                               prediction: str = "v") -> VelocityFn:
  """The velocity of a guidance-distilled model (guidance_embed): one forward of size B with
  cond['guidance'] = w (a scalar, or one scale per sample [B]), instead of the 2B forward of
  classifier-free guidance."""

  def velocity(x, t):
    w = jnp.broadcast_to(jnp.asarray(guidance_scale, jnp.float32), (x.shape[0],))
    return flow.convert(model_fn(x, t, dict(cond, guidance=w)), prediction, "v", x, t)

  return velocity


def solve(velocity: VelocityFn, x1: jax.Array, times: jax.Array, method: str = "euler") -> jax.Array:
  """Integrates dx/dt = v(x, t) along `times`.

  Args:
    velocity: v(x [B, ...], t [B]) -> [B, ...].
    x1: [B, ...] the state at times[0] (noise when times[0] = 1).
    times: [N+1] decreasing times, e.g. `sampling_times`, or [N+1, B]: a grid per sample.
    method: 'euler' (N evaluations) or 'heun' (2N evaluations, second order).

  Returns:
    [B, ...] the state at times[-1].
  """
  if method not in METHODS:
    raise ValueError(f"unknown sampler {method!r}; expected one of {METHODS}")
  batch = x1.shape[0]

  def v(x, t):
    return velocity(x, jnp.broadcast_to(t, (batch,)).astype(jnp.float32)).astype(x.dtype)

  def step(x, ts):
    t, t_next = ts
    dt = jnp.reshape(t_next - t, (-1,) + (1,) * (x.ndim - 1))  # [1 or B, 1, ...]
    v0 = v(x, t)
    if method == "euler":
      return x + dt * v0, None
    v1 = v(x + dt * v0, t_next)
    return x + 0.5 * dt * (v0 + v1), None

  x0, _ = jax.lax.scan(step, x1, (times[:-1], times[1:]))
  return x0


def sample(
    model_fn: ModelFn,
    rng: jax.Array,
    shape: tuple[int, ...],
    cond: Any,
    times: jax.Array,
    *,
    uncond: Any = None,
    cfg_scale: float = 1.0,
    method: str = "euler",
    prediction: str = "v",
    dtype: Any = jnp.float32,
) -> jax.Array:
  """Draws samples: noise from `rng`, then integrates the guided field over `times`.

  Args:
    model_fn, cond, uncond, cfg_scale, prediction: see `guided_velocity`.
    rng: PRNG key for the initial noise; the output is a deterministic function of it.
    shape: [B, ...] of the output (e.g. [B, H, W, C]).
    times: [N+1] decreasing from 1 to 0, e.g. `inference_times(N, seq_len, shift_cfg)`.
    method: 'euler' or 'heun'.

  Returns:
    [B, ...] samples at times[-1].
  """
  noise = jax.random.normal(rng, shape, dtype)
  return solve(guided_velocity(model_fn, cond, uncond, cfg_scale, prediction), noise, times, method)
