"""jdiff's shifted sampling times against diffusers' FlowMatchEulerDiscreteScheduler."""

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from jdiff import diffusion


def diffusers_sigmas(num_steps, mu=None, **scheduler_kwargs):
  """The Flux pipeline's way: base sigmas linspace(1, 1/N, N), shifted by the scheduler, then 0."""
  scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_kwargs)
  scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=mu)
  return scheduler.sigmas.numpy()


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.2])
@pytest.mark.parametrize("num_steps", [1, 4, 28])
def test_static_shift_matches_diffusers(shift, num_steps):
  ours = np.asarray(diffusion.sampling_times(num_steps, shift))
  np.testing.assert_allclose(ours, diffusers_sigmas(num_steps, shift=shift), atol=1e-6)


@pytest.mark.parametrize("seq_len", [64, 256, 1024, 2304, 4096])
def test_dynamic_shift_matches_flux_pipeline(seq_len):
  num_steps = 20
  cfg = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
  mu = calculate_shift(seq_len, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"],
                       cfg["max_shift"])
  s = diffusion.resolution_shift(seq_len, "flux", base_seq_len=256, max_seq_len=4096, base_shift=0.5,
                                 max_shift=1.15)
  np.testing.assert_allclose(float(s), np.exp(mu), rtol=1e-6)
  ours = np.asarray(diffusion.sampling_times(num_steps, s))
  theirs = diffusers_sigmas(num_steps, mu=mu, use_dynamic_shifting=True, **cfg)
  np.testing.assert_allclose(ours, theirs, atol=1e-6)
  # And the same through jdiff's config-driven path used by the sampler.
  via_cfg = diffusion.inference_times(num_steps, seq_len, dict(kind="flux", base_seq_len=256))
  np.testing.assert_allclose(np.asarray(via_cfg), theirs, atol=1e-6)


def test_default_sd3_schedule_differs_as_documented():
  """diffusers' default SD3 schedule (set_timesteps(N), no sigmas) spaces N base times from 1
  to the scheduler's shifted minimum sigma s(1/1000), shifts them again, then appends 0.
  jdiff spaces N+1 base times from 1 to 0. Both start at 1 and end at 0; in between,
  diffusers' times are smaller, and its last step is nearly
  empty (it starts from s(s(1/1000)) = 0.009), so N diffusers steps do about the work of N-1 jdiff steps (docs/interop.md)."""
  num_steps, shift = 28, 3.0
  scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
  scheduler.set_timesteps(num_steps)
  theirs = scheduler.sigmas.numpy()
  t_min = float(diffusion.time_shift(1.0 / 1000.0, shift))
  base = np.linspace(1.0, t_min, num_steps)
  expected = np.append(np.asarray(diffusion.time_shift(base, shift)), 0.0)
  np.testing.assert_allclose(theirs, expected, atol=1e-6)

  ours = np.asarray(diffusion.sampling_times(num_steps, shift))
  diff = theirs - ours
  assert diff[0] == 0 and diff[-1] == 0
  assert np.all(diff[1:-1] < 0)
  # The gap is largest just before t = 0: diffusers' last step starts from s(s(1/1000)) = 0.009,
  # jdiff's from s(1/28) = 0.1.
  assert np.argmin(diff) == num_steps - 1 and -0.1 < diff.min() < -0.08
  np.testing.assert_allclose(theirs[-2], float(diffusion.time_shift(t_min, shift)), rtol=1e-5)
  np.testing.assert_allclose(ours[-2], float(diffusion.time_shift(1.0 / num_steps, shift)), rtol=1e-6)
