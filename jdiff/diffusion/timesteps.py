"""Training-time samplers for t and the resolution-aware time shift.

Convention (docs/design.md): t in [0, 1], t = 0 is data, t = 1 is noise.

The shift t' = s*t / (1 + (s-1)*t) moves mass towards noise for s > 1. Larger
images keep more signal at the same t (neighbouring pixels are correlated), so
they need a larger s to see the same effective noise level. `resolution_shift`
derives s from a sample's own token count; the very same function feeds
`time_shift` for training t and for the sampling schedule, so training and
sampling can never disagree.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jdiff import errors

SHIFT_KINDS = ("sd3", "flux", "fixed", "none")
TIMESTEP_KINDS = ("uniform", "logit_normal", "mode", "cosmap")


def time_shift(t: jax.Array, shift: jax.Array | float) -> jax.Array:
  """Shifts times: t' = s*t / (1 + (s-1)*t).

  Args:
    t: times in [0, 1], any shape.
    shift: s > 0, broadcastable against `t` (a scalar or one value per sample).

  Returns:
    Shifted times, same shape as `t`; 0 and 1 are fixed points and s = 1 is the identity.
  """
  return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(
    seq_len: jax.Array | int,
    kind: str,
    *,
    base_seq_len: int = 256,
    factor: float = 1.0,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    shift: float = 1.0,
) -> jax.Array:
  """The shift s for images of `seq_len` tokens.

  Args:
    seq_len: image tokens per sample, (H/p)*(W/p); an int or an array [B].
    kind: 'sd3': s = factor * sqrt(seq_len / base_seq_len) (SD3 paper, Sec. 5.3.2);
      'flux': s = exp(mu), mu linear in seq_len through (base_seq_len, base_shift) and
      (max_seq_len, max_shift); 'fixed': s = shift; 'none': s = 1.
    base_seq_len, factor: 'sd3' and 'flux' parameters (base_seq_len is shared).
    max_seq_len, base_shift, max_shift: 'flux' parameters.
    shift: the 'fixed' value.

  Returns:
    s as a float32 array shaped like `seq_len`.
  """
  n = jnp.asarray(seq_len, jnp.float32)
  if kind == "sd3":
    return factor * jnp.sqrt(n / base_seq_len)
  if kind == "flux":
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return jnp.exp(base_shift + slope * (n - base_seq_len))
  if kind == "fixed":
    if shift <= 0:
      raise errors.InvalidArgument(f"fixed shift must be > 0, got {shift}")
    return jnp.full_like(n, shift)
  if kind == "none":
    return jnp.ones_like(n)
  raise errors.InvalidArgument(f"unknown shift kind {kind!r}; expected one of {SHIFT_KINDS}")


def sample_timesteps(
    rng: jax.Array,
    shape: tuple[int, ...],
    kind: str,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    scale: float = 1.29,
) -> jax.Array:
  """Draws training times t in [0, 1] (before any shift).

  Args:
    rng: a PRNG key.
    shape: output shape, usually (B,).
    kind: 'uniform'; 'logit_normal': t = sigmoid(u), u ~ N(mean, std^2);
      'mode': t = 1 - u - scale*(cos^2(pi*u/2) - 1 + u), u ~ U(0, 1) (SD3 eq. 20);
      'cosmap': t = 1 - 1/(tan(pi*u/2) + 1), u ~ U(0, 1) (SD3 eq. 21).
    mean, std: logit-normal parameters (SD3's best: 0, 1).
    scale: mode parameter; the density stays positive for scale in [-1, 2/(pi-2)].

  Returns:
    float32 times of `shape`.
  """
  if kind == "logit_normal":
    return jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape, jnp.float32))
  u = jax.random.uniform(rng, shape, jnp.float32)
  if kind == "uniform":
    return u
  if kind == "mode":
    if not -1.0 <= scale <= 2.0 / (math.pi - 2.0):
      raise errors.InvalidArgument(f"mode scale must lie in [-1, {2 / (math.pi - 2):.4f}], got {scale}")
    return 1.0 - u - scale * (jnp.cos(math.pi * u / 2) ** 2 - 1.0 + u)
  if kind == "cosmap":
    return 1.0 - 1.0 / (jnp.tan(math.pi * u / 2) + 1.0)
  raise errors.InvalidArgument(f"unknown timestep kind {kind!r}; expected one of {TIMESTEP_KINDS}")


def sampling_times(num_steps: int, shift: jax.Array | float = 1.0) -> jax.Array:
  """The inference schedule: num_steps+1 decreasing times from 1 to 0.

  Evenly spaced base times, shifted with the same `time_shift` as training.

  Args:
    num_steps: number of integration steps N >= 1.
    shift: s, a scalar (the schedule is shared by the batch).

  Returns:
    float32 [N+1], times[0] = 1, times[N] = 0.
  """
  if num_steps < 1:
    raise errors.InvalidArgument(f"num_steps must be >= 1, got {num_steps}")
  # (N - i) / N, each one rounding: linspace's 1 - i/N loses the low bits of the small times
  # to cancellation, and would give the K-step grid and every M-th time of the K*M-step
  # grid (few-step distillation's) different roundings of the same number.
  base = jnp.arange(num_steps, -1, -1, dtype=jnp.float32) / num_steps
  return time_shift(base, shift)


def training_timesteps(keys: jax.Array, seq_len: jax.Array | int, timestep_cfg: Any, shift_cfg: Any
                       ) -> jax.Array:
  """Training t [B]: one `sample_timesteps` draw per sample key, then `time_shift` by
  `resolution_shift(seq_len)`.

  Args:
    keys: [B] PRNG keys, one per sample (so a sample's t does not depend on how the batch
      is split into micro-batches or shards).
    seq_len: image tokens per sample (int or [B]).
    timestep_cfg: mapping with `kind` and that sampler's parameters.
    shift_cfg: mapping with `kind` and that shift's parameters.
  """
  timestep_cfg = dict(timestep_cfg)
  t = jax.vmap(lambda k: sample_timesteps(k, (), **timestep_cfg))(keys)
  return time_shift(t, resolution_shift(seq_len, **dict(shift_cfg)))


def inference_times(num_steps: int, seq_len: int, shift_cfg: Any) -> jax.Array:
  """The sampling schedule [N+1] for images of `seq_len` tokens, shifted as in training."""
  return sampling_times(num_steps, resolution_shift(seq_len, **dict(shift_cfg)))
