"""Guidance distillation: the student's guidance input path, the teacher's CFG target and
one-forward sampling."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import diffusion, models

from helpers import TINY_MMDIT, init, inputs, perturb


def test_student_embeds_the_guidance_scale():
  cfg = dict(TINY_MMDIT, guidance_embed=True)
  x, t, cond = inputs(cfg, batch=2)
  model = models.build(cfg)
  apply = jax.jit(model.apply)
  params = jax.jit(model.init)(jax.random.key(0), x, t, guidance=jnp.ones(2), **cond)
  assert "guidance_embed" in params["params"]
  zero = apply(params, x, t, guidance=jnp.full(2, 4.0), **cond)
  assert np.array_equal(np.asarray(zero), np.zeros(x.shape, np.float32))  # still adaLN-Zero
  params = perturb(params)
  a = apply(params, x, t, guidance=jnp.full(2, 1.0), **cond)
  b = apply(params, x, t, guidance=jnp.full(2, 4.0), **cond)
  assert float(jnp.abs(a - b).max()) > 1e-3  # the scale reaches the output
  with pytest.raises(ValueError, match="pass guidance"):
    model.apply(params, x, t, **cond)
  plain, plain_params = init(TINY_MMDIT, x, t, cond)
  with pytest.raises(ValueError, match="without guidance_embed"):
    plain.apply(plain_params, x, t, guidance=jnp.ones(2), **cond)


def test_fresh_guidance_embedding_leaves_the_teacher_unchanged():
  """A student = a teacher's params + a fresh guidance embedding gives the teacher's output
  for every w (the embedding's output layer starts at zero)."""
  x, t, cond = inputs(TINY_MMDIT, batch=2)
  teacher, t_params = init(TINY_MMDIT, x, t, cond)
  t_params = perturb(t_params)
  student = models.build(dict(TINY_MMDIT, guidance_embed=True))
  fresh = nn.unbox(student.init(jax.random.key(5), x, t, guidance=jnp.ones(2), **cond))
  s_params = {"params": dict(t_params["params"], guidance_embed=fresh["params"]["guidance_embed"])}
  want = teacher.apply(t_params, x, t, **cond)
  for w in (1.0, 4.0):
    np.testing.assert_array_equal(student.apply(s_params, x, t, guidance=jnp.full(2, w), **cond), want)


def _teacher():
  x, t, cond = inputs(TINY_MMDIT, batch=3)
  model, params = init(TINY_MMDIT, x, t, cond)
  params = perturb(params)
  uncond = jax.tree.map(jnp.zeros_like, cond)
  return jax.jit(lambda x, t, c: model.apply(params, x, t, **c)), x, t, cond, uncond


def test_cfg_target_equals_guided_sampling_velocity():
  teacher, x, t, cond, uncond = _teacher()
  w = 3.5
  target = diffusion.cfg_target(teacher, x, t, cond, uncond, jnp.full(3, w))
  guided = diffusion.guided_velocity(teacher, cond, uncond, w)(x, t)
  chex.assert_trees_all_close(target, guided, atol=1e-6)
  # Per-sample scales: each sample gets its own combination.
  ws = jnp.array([1.0, 2.0, 5.0])
  per = diffusion.cfg_target(teacher, x, t, cond, uncond, ws)
  for i, wi in enumerate(ws):
    ref = diffusion.guided_velocity(teacher, cond, uncond, float(wi))(x, t)
    np.testing.assert_allclose(per[i], ref[i], atol=1e-5)


def test_distillation_loss_is_zero_for_the_exact_student_and_one_forward_per_step():
  teacher, x, t, cond, uncond = _teacher()

  def exact_student(x, t, c):  # what distillation aims for: CFG folded into the model
    c = dict(c)
    w = c.pop("guidance")
    return diffusion.cfg_target(teacher, x, t, c, jax.tree.map(jnp.zeros_like, c), w)

  w = jnp.array([1.5, 3.0, 6.0])
  target = lambda x, t: diffusion.cfg_target(teacher, x, t, cond, uncond, w)
  loss = diffusion.guidance_distillation_loss(exact_student, target, x, t, cond, w)
  np.testing.assert_allclose(loss, 0.0, atol=1e-10)
  wrong = diffusion.guidance_distillation_loss(lambda x, t, c: teacher(x, t, {k: v for k, v in c.items()
                                                                              if k != "guidance"}),
                                               target, x, t, cond, w)
  assert float(wrong.min()) > 0  # the unguided teacher is not the guided one

  calls = []
  def student(x, t, c):
    calls.append(x.shape[0])
    return exact_student(x, t, c)
  v = diffusion.embedded_guidance_velocity(student, cond, 3.0)
  out = diffusion.solve(v, jax.random.normal(jax.random.key(1), x.shape), diffusion.sampling_times(4))
  assert calls and set(calls) == {3}  # batch B per forward, not 2B
  guided = diffusion.solve(diffusion.guided_velocity(teacher, cond, uncond, 3.0),
                           jax.random.normal(jax.random.key(1), x.shape), diffusion.sampling_times(4))
  np.testing.assert_allclose(out, guided, atol=1e-4)
