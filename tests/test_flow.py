"""The flow path against closed forms: for x0 ~ N(mu, sigma^2 I) everything is analytic.

x_t ~ N(m_t, s_t^2 I) with m_t = (1-t) mu, s_t^2 = (1-t)^2 sigma^2 + t^2, and
  E[eps | x_t] = t (x - m_t) / s_t^2,   E[x0 | x_t] = mu + (1-t) sigma^2 (x - m_t) / s_t^2,
so v(x, t) = E[eps - x0 | x_t] = (t - (1-t) sigma^2)(x - m_t)/s_t^2 - mu and the score is
-(x - m_t)/s_t^2. (x - m_t)/s_t is constant along the ODE, so the exact flow map sends
noise x1 to mu + sigma*x1.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import diffusion as D

MU, SIGMA = 1.5, 0.4


def _stats(x, t):
  tb = t[:, None]
  m = (1 - tb) * MU
  s2 = (1 - tb) ** 2 * SIGMA**2 + tb**2
  return m, s2


def exact_velocity(x, t):
  m, s2 = _stats(x, t)
  return (t[:, None] - (1 - t[:, None]) * SIGMA**2) * (x - m) / s2 - MU


def exact_eps(x, t):
  m, s2 = _stats(x, t)
  return t[:, None] * (x - m) / s2


def exact_x0(x, t):
  m, s2 = _stats(x, t)
  return MU + (1 - t[:, None]) * SIGMA**2 * (x - m) / s2


def exact_score(x, t):
  m, s2 = _stats(x, t)
  return -(x - m) / s2


def _points(n=512, dim=8, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  t = jax.random.uniform(k1, (n,), minval=0.05, maxval=0.95)
  x = jax.random.normal(k2, (n, dim)) * 2 + 0.5
  return x, t


def test_interpolant_and_target():
  x0 = jnp.array([[1.0, -2.0]])
  eps = jnp.array([[0.5, 0.5]])
  np.testing.assert_allclose(D.interpolate(x0, eps, jnp.array([0.25])), [[0.875, -1.375]])
  np.testing.assert_allclose(D.velocity_target(x0, eps), [[-0.5, 2.5]])


@pytest.mark.parametrize("view,fn", [("eps", exact_eps), ("x0", exact_x0), ("score", exact_score)])
def test_velocity_field_converts_to_exact_views(view, fn):
  x, t = _points()
  v = exact_velocity(x, t)
  np.testing.assert_allclose(D.convert(v, "v", view, x, t), fn(x, t), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("src", ["v", "eps", "x0", "score"])
@pytest.mark.parametrize("dst", ["v", "eps", "x0", "score"])
def test_conversions_round_trip(src, dst):
  x, t = _points(seed=1)
  fields = dict(v=exact_velocity, eps=exact_eps, x0=exact_x0, score=exact_score)
  pred = fields[src](x, t)
  there = D.convert(pred, src, dst, x, t)
  np.testing.assert_allclose(there, fields[dst](x, t), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(D.convert(there, dst, src, x, t), pred, rtol=1e-4, atol=1e-4)


def _solve(method, steps, n=20_000):
  x1 = jax.random.normal(jax.random.key(7), (n, 1))
  times = D.sampling_times(steps, 1.0)
  return x1, D.solve(exact_velocity, x1, times, method)


def test_euler_many_steps_recovers_the_gaussian():
  x1, x0 = _solve("euler", 500)
  assert abs(float(x0.mean()) - MU) < 0.01
  assert abs(float(x0.std()) - SIGMA) < 0.01
  np.testing.assert_allclose(x0, MU + SIGMA * x1, atol=2e-2)  # the exact flow map


def test_heun_few_steps_is_second_order():
  x1, heun = _solve("heun", 10)
  _, euler = _solve("euler", 10)
  exact = MU + SIGMA * x1
  heun_err = float(jnp.abs(heun - exact).max())
  euler_err = float(jnp.abs(euler - exact).max())
  assert abs(float(heun.mean()) - MU) < 0.01 and abs(float(heun.std()) - SIGMA) < 0.01
  assert heun_err < 2e-2
  assert heun_err < euler_err / 5


def test_shifted_schedule_reaches_the_same_distribution():
  x1 = jax.random.normal(jax.random.key(8), (4096, 1))
  out = D.solve(exact_velocity, x1, D.sampling_times(50, 3.0), "heun")
  np.testing.assert_allclose(out, MU + SIGMA * x1, atol=1e-2)


def test_cfg_is_one_batched_forward():
  calls = []

  def model(x, t, cond):
    calls.append(x.shape[0])
    return x * cond[:, None] + t[:, None]

  x = jnp.ones((3, 2))
  t = jnp.full((3,), 0.5)
  cond, uncond = jnp.array([1.0, 2.0, 3.0]), jnp.zeros(3)
  v = D.guided_velocity(model, cond, uncond, cfg_scale=4.0)(x, t)
  assert calls == [6]
  v_c, v_u = model(x, t, cond), model(x, t, uncond)
  np.testing.assert_allclose(v, v_u + 4.0 * (v_c - v_u), rtol=1e-6)
  with pytest.raises(ValueError, match="uncond"):
    D.guided_velocity(model, cond, None, cfg_scale=2.0)


def test_sample_is_deterministic_given_the_key():
  model = lambda x, t, c: -x + c[:, None, None, None]
  kw = dict(cond=jnp.ones(2), times=D.sampling_times(5, 2.0), uncond=jnp.zeros(2), cfg_scale=3.0)
  a = D.sample(model, jax.random.key(0), (2, 4, 4, 3), **kw)
  b = D.sample(model, jax.random.key(0), (2, 4, 4, 3), **kw)
  c = D.sample(model, jax.random.key(1), (2, 4, 4, 3), **kw)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_flow_loss_zero_at_the_target_for_every_parametrisation():
  k1, k2, k3 = jax.random.split(jax.random.key(9), 3)
  x0 = jax.random.normal(k1, (4, 6, 6, 3))
  eps = jax.random.normal(k2, (4, 6, 6, 3))
  t = jax.random.uniform(k3, (4,), minval=0.1, maxval=0.9)
  exact = dict(v=eps - x0, eps=eps, x0=x0)
  for pred in ("v", "eps", "x0"):
    loss = D.flow_loss(exact[pred], x0, eps, t, prediction=pred)
    chex.assert_shape(loss, (4,))
    np.testing.assert_allclose(loss, 0.0, atol=1e-8)


def test_flow_loss_weightings_by_hand():
  x0 = jnp.zeros((2, 3))
  eps = jnp.ones((2, 3))
  t = jnp.array([0.25, 0.5])
  pred = jnp.full((2, 3), 3.0)  # v = 1, squared error 4
  np.testing.assert_allclose(D.flow_loss(pred, x0, eps, t), [4.0, 4.0])
  np.testing.assert_allclose(D.flow_loss(pred, x0, eps, t, weighting="eps"), [4 * 0.75**2, 4 * 0.25])
  np.testing.assert_allclose(D.flow_loss(pred, x0, eps, t, weighting="x0"), [4 * 0.0625, 4 * 0.25])
  np.testing.assert_allclose(D.flow_loss(pred, x0, eps, t, weighting="sigma_sqrt"), [64.0, 16.0])
  cosmap = 2 / (np.pi * (1 - 2 * np.array([0.25, 0.5]) + 2 * np.array([0.25, 0.5]) ** 2))
  np.testing.assert_allclose(D.flow_loss(pred, x0, eps, t, weighting="cosmap"), 4 * cosmap, rtol=1e-6)


def test_eps_weighting_equals_eps_mse():
  k1, k2, k3, k4 = jax.random.split(jax.random.key(10), 4)
  x0, eps, v_hat = (jax.random.normal(k, (8, 5)) for k in (k1, k2, k3))
  t = jax.random.uniform(k4, (8,))
  x_t = D.interpolate(x0, eps, t)
  eps_hat = D.convert(v_hat, "v", "eps", x_t, t)
  np.testing.assert_allclose(D.flow_loss(v_hat, x0, eps, t, weighting="eps"),
                             jnp.mean((eps_hat - eps) ** 2, axis=1), rtol=1e-4)


def test_dpo_loss_by_hand():
  """Two pairs: errors chosen so the margins are -0.3 and +0.2; beta = 2."""
  err_w, err_ref_w = jnp.array([0.5, 0.4]), jnp.array([0.6, 0.3])
  err_l, err_ref_l = jnp.array([0.9, 0.2]), jnp.array([0.7, 0.3])
  loss, m = D.dpo_loss(err_w, err_ref_w, err_l, err_ref_l, beta=2.0)
  # margins: (0.5-0.6)-(0.9-0.7) = -0.3; (0.4-0.3)-(0.2-0.3) = 0.2
  np.testing.assert_allclose(m["margin"], [-0.3, 0.2], rtol=1e-6)
  # -log sigmoid(-2 * margin) = log(1 + exp(2 * margin))
  np.testing.assert_allclose(loss, [np.log1p(np.exp(-0.6)), np.log1p(np.exp(0.4))], rtol=1e-6)
  np.testing.assert_array_equal(m["implicit_accuracy"], [1.0, 0.0])
  # Policy == reference: margin 0, loss log 2, and the gradient pushes err_w down, err_l up.
  same = jnp.array([0.7])
  loss0, _ = D.dpo_loss(same, same, same, same, beta=5.0)
  np.testing.assert_allclose(loss0, [np.log(2.0)], rtol=1e-6)
  g_w, g_l = jax.grad(lambda w, l: D.dpo_loss(w, same, l, same, 5.0)[0].sum(), argnums=(0, 1))(same, same)
  assert float(g_w[0]) > 0 and float(g_l[0]) < 0
  # DPO-Positive, lambda = 3: only the second pair's preferred error (0.4) exceeds its
  # reference's (0.3): its margin becomes 0.2 + 3 * 0.1 = 0.5; the first is unchanged.
  loss_p, _ = D.dpo_loss(err_w, err_ref_w, err_l, err_ref_l, beta=2.0, positive=3.0)
  np.testing.assert_allclose(loss_p, [np.log1p(np.exp(-0.6)), np.log1p(np.exp(1.0))], rtol=1e-6)
