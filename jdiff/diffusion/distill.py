"""Guidance distillation (Meng et al., 2023; the recipe behind FLUX.1-dev): a student that
embeds the guidance scale w learns the teacher's classifier-free-guided velocity, so
sampling needs one forward per step instead of two.

    target(x_t, t, c, w) = v_u + w (v_c - v_u)     (teacher, frozen, 2B batched forward)
    loss = mean((v_student(x_t, t, c, w) - target)^2)   per sample
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jdiff.diffusion import flow
from jdiff.diffusion.sampling import ModelFn


def cfg_target(teacher_fn: ModelFn, x_t: jax.Array, t: jax.Array, cond: Any, uncond: Any, w: jax.Array,
               prediction: str = "v") -> jax.Array:
  """The teacher's guided velocity [B, ...] with a per-sample scale w [B] (no gradient)."""
  both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
  x2, t2 = jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t, t], axis=0)
  v_c, v_u = jnp.split(flow.convert(teacher_fn(x2, t2, both), prediction, "v", x2, t2), 2)
  w = w.reshape((-1,) + (1,) * (x_t.ndim - 1))
  return jax.lax.stop_gradient(v_u + w * (v_c - v_u))


def guidance_distillation_loss(student_fn: ModelFn, teacher_fn: ModelFn, x_t: jax.Array, t: jax.Array,
                               cond: Any, uncond: Any, w: jax.Array, prediction: str = "v") -> jax.Array:
  """Per-sample [B] squared error between the student's velocity given guidance=w and the
  teacher's guided velocity."""
  target = cfg_target(teacher_fn, x_t, t, cond, uncond, w, prediction)
  v = flow.convert(student_fn(x_t, t, dict(cond, guidance=w)), prediction, "v", x_t, t)
  return jnp.mean(jnp.square(v.astype(jnp.float32) - target), axis=tuple(range(1, x_t.ndim)))
