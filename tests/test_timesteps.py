import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import diffusion as D


def test_time_shift_hand_values():
  t = jnp.array([0.0, 0.25, 0.5, 0.75, 1.0])
  # s = 3: t' = 3t / (1 + 2t)
  expected = np.array([0.0, 0.75 / 1.5, 1.5 / 2.0, 2.25 / 2.5, 1.0])
  np.testing.assert_allclose(D.time_shift(t, 3.0), expected, rtol=1e-6)
  # s = 1/2: t' = 0.5t / (1 - 0.5t)
  np.testing.assert_allclose(D.time_shift(jnp.array(0.5), 0.5), 0.25 / 0.75, rtol=1e-6)


def test_time_shift_identity_at_one():
  t = jax.random.uniform(jax.random.key(0), (1000,))
  np.testing.assert_array_equal(D.time_shift(t, 1.0), t)


def test_time_shift_is_monotone_and_inverted_by_reciprocal():
  t = jnp.linspace(0, 1, 101)
  s = 2.7
  shifted = D.time_shift(t, s)
  assert np.all(np.diff(np.asarray(shifted)) > 0)
  np.testing.assert_allclose(D.time_shift(shifted, 1 / s), t, atol=1e-6)


def test_resolution_shift_sd3_and_flux():
  np.testing.assert_allclose(D.resolution_shift(4096, "sd3", base_seq_len=256), 4.0, rtol=1e-6)
  np.testing.assert_allclose(D.resolution_shift(4096, "sd3", base_seq_len=256, factor=0.75), 3.0, rtol=1e-6)
  np.testing.assert_allclose(D.resolution_shift(256, "flux"), math.exp(0.5), rtol=1e-6)
  np.testing.assert_allclose(D.resolution_shift(4096, "flux"), math.exp(1.15), rtol=1e-6)
  np.testing.assert_allclose(D.resolution_shift(2176, "flux"), math.exp(0.825), rtol=1e-6)
  np.testing.assert_allclose(D.resolution_shift(123, "fixed", shift=3.0), 3.0)
  np.testing.assert_allclose(D.resolution_shift(123, "none"), 1.0)
  per_sample = D.resolution_shift(jnp.array([256, 1024]), "sd3")
  np.testing.assert_allclose(per_sample, [1.0, 2.0], rtol=1e-6)


def test_unknown_kinds_fail_with_names():
  with pytest.raises(ValueError, match="shift kind 'bogus'"):
    D.resolution_shift(256, "bogus")
  with pytest.raises(ValueError, match="timestep kind 'bogus'"):
    D.sample_timesteps(jax.random.key(0), (4,), "bogus")
  with pytest.raises(ValueError, match="mode scale"):
    D.sample_timesteps(jax.random.key(0), (4,), "mode", scale=5.0)


def test_logit_normal_statistics():
  t = D.sample_timesteps(jax.random.key(1), (200_000,), "logit_normal", mean=0.3, std=0.8)
  logit = np.log(np.asarray(t, np.float64)) - np.log1p(-np.asarray(t, np.float64))
  assert abs(logit.mean() - 0.3) < 0.01
  assert abs(logit.std() - 0.8) < 0.01
  assert np.all((t > 0) & (t < 1))


def test_mode_and_cosmap_match_formulas():
  key = jax.random.key(2)
  u = np.asarray(jax.random.uniform(key, (1000,)), np.float64)
  s = 1.29
  mode = 1 - u - s * (np.cos(np.pi * u / 2) ** 2 - 1 + u)
  np.testing.assert_allclose(D.sample_timesteps(key, (1000,), "mode", scale=s), mode, atol=1e-6)
  cosmap = 1 - 1 / (np.tan(np.pi * u / 2) + 1)
  np.testing.assert_allclose(D.sample_timesteps(key, (1000,), "cosmap"), cosmap, atol=1e-5)
  np.testing.assert_allclose(D.sample_timesteps(key, (1000,), "uniform"), u, atol=1e-7)


def test_mode_scale_zero_is_uniform_and_positive_scale_favours_middle():
  key = jax.random.key(3)
  np.testing.assert_allclose(D.sample_timesteps(key, (100,), "mode", scale=0.0),
                             1 - jax.random.uniform(key, (100,)), atol=1e-6)
  t = np.asarray(D.sample_timesteps(key, (100_000,), "mode", scale=1.29))
  middle = np.mean((t > 0.25) & (t < 0.75))
  assert middle > 0.6  # uniform would give 0.5


def test_cosmap_median_is_half():
  t = np.asarray(D.sample_timesteps(jax.random.key(4), (100_000,), "cosmap"))
  assert abs(np.median(t) - 0.5) < 0.01


def test_sampling_times():
  times = D.sampling_times(8, 3.0)
  chex.assert_shape(times, (9,))
  assert times[0] == 1.0 and times[-1] == 0.0
  assert np.all(np.diff(np.asarray(times)) < 0)
  np.testing.assert_allclose(times, D.time_shift(jnp.linspace(1, 0, 9), 3.0), atol=1e-7)
  with pytest.raises(ValueError):
    D.sampling_times(0)


def test_training_and_inference_use_the_same_shift():
  shift_cfg = dict(kind="sd3", base_seq_len=64, factor=1.0)
  keys = jax.random.split(jax.random.key(5), 16)
  t = D.training_timesteps(keys, 256, dict(kind="uniform"), shift_cfg)
  u = jax.vmap(lambda k: jax.random.uniform(k, ()))(keys)
  np.testing.assert_allclose(t, D.time_shift(u, 2.0), atol=1e-6)
  # A sample's t depends on its own key only, not on the batch around it.
  np.testing.assert_array_equal(D.training_timesteps(keys[3:5], 256, dict(kind="uniform"), shift_cfg), t[3:5])
  np.testing.assert_allclose(D.inference_times(4, 256, shift_cfg), D.sampling_times(4, 2.0), atol=1e-7)
