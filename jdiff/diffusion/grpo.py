"""Flow-GRPO math (Liu et al. 2025): the flow ODE's SDE counterpart, its Gaussian steps'
log-probabilities, group-normalised advantages and the clipped policy objective.

The SDE. For x_t = (1 - t) x0 + t eps the score is -(x + (1 - t) v) / t (since
E[eps | x_t] = x + (1 - t) v), and for any sigma_t the reverse-time SDE
  dx = [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt + sigma_t dw      (dt < 0)
has the ODE's marginals. Flow-GRPO takes sigma_t = a sqrt(t / (1 - t)) (a: the noise level),
with t in the denominator capped at the grid's second time so that the first step from t = 1
stays finite. One Euler-Maruyama step from t to t' = t + dt is a Gaussian
  x' ~ N(mu, s^2 I),  mu = x + [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt,  s = sigma_t sqrt(-dt),
so the policy (the network behind v) has a log-probability for every step of a trajectory.

Conventions as in Flow-GRPO: a step's log-probability and the KL between two steps are
averaged over the dimensions of x (not summed), which keeps policy ratios near 1 and is why
the clip range is small (1e-4 for images of thousands of dimensions).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp


def _bcast(a: jax.Array, x: jax.Array) -> jax.Array:
  """A scalar or [B] array shaped to broadcast against x [B, ...]."""
  a = jnp.asarray(a, jnp.float32)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) if a.ndim else a


def sde_sigma(t: jax.Array, t_cap: jax.Array | float, noise_level: float) -> jax.Array:
  """sigma_t = a sqrt(t / (1 - min(t, t_cap))): the SDE's diffusion coefficient; t_cap < 1
  (the sampling grid's second time) keeps it finite at t = 1."""
  return noise_level * jnp.sqrt(t / (1.0 - jnp.minimum(t, t_cap)))


def sde_step(x: jax.Array, v: jax.Array, t: jax.Array, t_next: jax.Array, t_cap: jax.Array | float,
             noise_level: float) -> tuple[jax.Array, jax.Array]:
  """The Gaussian of one SDE step from t to t_next < t given the velocity v at (x, t); t,
  t_next and t_cap are scalars or [B]. Returns (mean [B, ...], std broadcastable against x)."""
  tb, dt = _bcast(t, x), _bcast(t_next - t, x)
  sigma = sde_sigma(tb, _bcast(t_cap, x), noise_level)
  mean = x + (v + sigma**2 / (2.0 * tb) * (x + (1.0 - tb) * v)) * dt
  return mean, sigma * jnp.sqrt(-dt)


def log_prob(x_next: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """log N(x_next; mean, std^2 I) averaged over the non-batch dimensions: [B]."""
  z = (x_next - mean) / std
  per_dim = -0.5 * z**2 - jnp.log(std) - 0.5 * math.log(2.0 * math.pi)
  return jnp.mean(jnp.broadcast_to(per_dim, x_next.shape), axis=tuple(range(1, x_next.ndim)))


def kl(mean: jax.Array, mean_ref: jax.Array, std: jax.Array) -> jax.Array:
  """KL(N(mean, std^2) || N(mean_ref, std^2)) per dimension, averaged over the non-batch
  dimensions: [B]. Exact for two Gaussian steps of the same std."""
  per_dim = (mean - mean_ref) ** 2 / (2.0 * std**2)
  return jnp.mean(jnp.broadcast_to(per_dim, mean.shape), axis=tuple(range(1, mean.ndim)))


def rollout(velocity: Callable[[jax.Array, jax.Array], jax.Array], x1: jax.Array, times: jax.Array,
            noise: jax.Array, noise_level: float) -> tuple[jax.Array, jax.Array]:
  """A trajectory of the SDE from x1 along `times`.

  Args:
    velocity: v(x [B, ...], t [B]) -> [B, ...] (the policy, guided or not).
    x1: [B, ...] the state at times[0] = 1 (noise).
    times: [K + 1] decreasing from 1 to 0 (the shifted sampling grid).
    noise: [K, B, ...] standard normal noise for the K steps.
    noise_level: a in sigma_t = a sqrt(t / (1 - t)).

  Returns:
    (states [K + 1, B, ...] from x1 to the final sample, log-probabilities [K, B] of each step
    under the policy).
  """
  t_cap = times[1]
  batch = x1.shape[0]

  def step(x, inputs):
    t, t_next, z = inputs
    v = velocity(x, jnp.full((batch,), t, jnp.float32)).astype(jnp.float32)
    mean, std = sde_step(x, v, t, t_next, t_cap, noise_level)
    x_next = mean + std * z
    return x_next, (x_next, log_prob(x_next, mean, std))

  _, (states, log_probs) = jax.lax.scan(step, x1, (times[:-1], times[1:], noise))
  return jnp.concatenate([x1[None], states]), log_probs


def group_advantages(rewards: jax.Array, clip: float = 5.0, eps: float = 1e-4) -> jax.Array:
  """GRPO's advantages: each reward standardised within its group of images of one prompt,
  (r - mean) / (std + eps), clipped to [-clip, clip]. rewards: [num_prompts, G]."""
  mean = rewards.mean(axis=1, keepdims=True)
  std = rewards.std(axis=1, keepdims=True)
  return jnp.clip((rewards - mean) / (std + eps), -clip, clip)


def clipped_objective(log_prob_new: jax.Array, log_prob_old: jax.Array, advantage: jax.Array,
                      clip_range: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """PPO's clipped surrogate as a loss to minimise: max(-A r, -A clip(r, 1 - e, 1 + e)) with
  r = exp(log_prob_new - log_prob_old). Returns (loss [B], ratio [B], whether the clipped
  term was taken [B])."""
  ratio = jnp.exp(log_prob_new - log_prob_old)
  unclipped = -advantage * ratio
  clipped = -advantage * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  return jnp.maximum(unclipped, clipped), ratio, clipped > unclipped
