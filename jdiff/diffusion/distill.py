"""Distillation targets: guidance distillation and few-step trajectory distillation.

Guidance distillation (Meng et al., 2023; the recipe behind FLUX.1-dev): a student that
embeds the guidance scale w learns the teacher's classifier-free-guided velocity, so
sampling needs one forward per step instead of two.

    target(x_t, t, c, w) = v_u + w (v_c - v_u)     (teacher, frozen, 2B batched forward)
    loss = mean((v_student(x_t, t, c, w) - target)^2)   per sample

Few-step distillation (trajectory distillation in one phase, in the spirit of progressive
distillation / TRACT): the student samples with K Euler steps on the grid
t_0 = 1 > t_1 > ... > t_K = 0 (the shifted inference schedule). On interval k the teacher
integrates its guided ODE from x_{t_k} to t_{k+1} with M Euler sub-steps (the K*M-step
schedule, whose every M-th point is t_k: the shift is monotone and applied to an even grid),
and the student learns the average velocity of that jump,

    target = (x_teacher(t_{k+1}) - x_{t_k}) / (t_{k+1} - t_k),

so one student step lands where M teacher steps land. x_{t_k} is where the jump starts:
either the forward-noised data, or (on-policy) the student's own state after k of its steps
from the noise, the state it will be in when it samples, so it learns to correct its own
errors instead of only the data's (pure noise at k = 0 either way).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jdiff.diffusion import sampling, timesteps
from jdiff.diffusion.sampling import ModelFn, VelocityFn


def cfg_target(teacher_fn: ModelFn, x_t: jax.Array, t: jax.Array, cond: Any, uncond: Any, w: jax.Array,
               prediction: str = "v") -> jax.Array:
  """The teacher's guided velocity [B, ...] with a per-sample scale w [B] (no gradient)."""
  return jax.lax.stop_gradient(sampling.guided_velocity(teacher_fn, cond, uncond, w, prediction)(x_t, t))


def velocity_error(v: jax.Array, target: jax.Array) -> jax.Array:
  """Per-sample [B] mean squared error in float32."""
  return jnp.mean(jnp.square(v.astype(jnp.float32) - target.astype(jnp.float32)), axis=tuple(range(1, v.ndim)))


def guidance_distillation_loss(student_fn: ModelFn, teacher_velocity: VelocityFn, x_t: jax.Array,
                               t: jax.Array, cond: Any, w: jax.Array, prediction: str = "v") -> jax.Array:
  """Per-sample [B] squared error between the student's velocity given conditioning `cond`
  and guidance=w [B], and the teacher's guided velocity field (e.g. `cfg_target` with the
  same w) at (x_t, t)."""
  target = jax.lax.stop_gradient(teacher_velocity(x_t, t))
  return velocity_error(sampling.embedded_guidance_velocity(student_fn, cond, w, prediction)(x_t, t), target)


def few_step_grid(student_steps: int, teacher_substeps: int, seq_len: int, shift_cfg: Any
                  ) -> tuple[jax.Array, jax.Array]:
  """(coarse [K+1], fine [K*M+1]): the student's sampling schedule and the teacher's, with
  fine[k*M] == coarse[k]."""
  coarse = timesteps.inference_times(student_steps, seq_len, shift_cfg)
  fine = timesteps.inference_times(student_steps * teacher_substeps, seq_len, shift_cfg)
  return coarse, fine


def ode_state(velocity: VelocityFn, eps: jax.Array, t: jax.Array, steps: int) -> jax.Array:
  """[B, ...]: the state at time t [B] of the ODE dx/dt = velocity from the noise eps at
  t = 1, in `steps` equal Euler steps per sample (no gradient): where a sampler with this
  velocity passes near t, for training on its own states."""
  frac = jnp.linspace(0.0, 1.0, steps + 1)[:, None]  # [S+1, 1]
  times = 1.0 + (t[None, :] - 1.0) * frac  # [S+1, B]
  return jax.lax.stop_gradient(sampling.solve(velocity, eps, times, "euler"))


def student_states(student_velocity: VelocityFn, eps: jax.Array, k: jax.Array, coarse: jax.Array) -> jax.Array:
  """[B, ...]: the student's state after k [B] of its Euler steps on `coarse` from the noise
  eps (no gradient): where its step k starts when it samples."""
  x, states = eps, [eps]
  for j in range(coarse.shape[0] - 2):  # the state after the last step is never a start
    x = x + (coarse[j + 1] - coarse[j]) * student_velocity(x, jnp.full(x.shape[:1], coarse[j]))
    states.append(x)
  pick = jax.nn.one_hot(k, len(states), dtype=eps.dtype)  # [B, K]
  chosen = jnp.einsum("kb...,bk->b...", jnp.stack(states), pick)
  return jax.lax.stop_gradient(chosen)


def few_step_target(teacher_velocity: VelocityFn, x_tk: jax.Array, k: jax.Array, coarse: jax.Array,
                    fine: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The student's time and target velocity for the jump from x_tk [B, ...] on interval k [B]
  of the coarse grid.

  Returns (t_k [B], target velocity [B, ...]): t_k = coarse[k]; the target is the teacher's
  M-sub-step jump from x_tk to coarse[k+1] divided by its length (no gradient).
  """
  substeps = (fine.shape[0] - 1) // (coarse.shape[0] - 1)
  t_k, t_next = coarse[k], coarse[k + 1]
  per_sample = fine[k[None, :] * substeps + jnp.arange(substeps + 1)[:, None]]  # [M+1, B]
  x_next = sampling.solve(teacher_velocity, x_tk, per_sample, "euler")
  dt = (t_next - t_k).reshape((-1,) + (1,) * (x_tk.ndim - 1))
  return t_k, jax.lax.stop_gradient((x_next - x_tk) / dt)
