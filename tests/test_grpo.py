"""Online RL (objective 'grpo', Flow-GRPO): the SDE against closed forms, the GRPO loss by
hand, rewards, per-sample randomness, sharding, and a run through the CLI that raises its
reward and resumes bit for bit."""

import itertools
import json
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jdiff import config as config_lib
from jdiff import config_checks
from jdiff import diffusion
from jdiff import inference
from jdiff import networks as networks_lib
from jdiff import tokens as tokens_lib
from jdiff.data import pixels, shapes
from jdiff.eval import rewards
from jdiff.train import grpo, objectives
from jdiff.train import sharding as shard_lib
from jdiff.train import state as state_lib
from jdiff.train import optim

import helpers
from test_flow import MU, SIGMA, exact_velocity
from test_train import get_config, restored

G = diffusion.grpo


def test_sde_step_is_the_gaussian_written_out_by_hand():
  x = jnp.array([[0.3, -1.2, 2.0]])
  v = jnp.array([[0.5, 0.1, -0.7]])
  t, t_next, t_cap, a = 0.6, 0.45, 0.9, 0.7
  mean, std = G.sde_step(x, v, jnp.array([t]), jnp.array([t_next]), t_cap, a)
  sigma = a * math.sqrt(t / (1 - t))
  dt = t_next - t
  want_mean = np.array(x) + (np.array(v) + sigma**2 / (2 * t) * (np.array(x) + (1 - t) * np.array(v))) * dt
  want_std = sigma * math.sqrt(-dt)
  np.testing.assert_allclose(mean, want_mean, rtol=1e-6)
  np.testing.assert_allclose(np.broadcast_to(std, x.shape), want_std, rtol=1e-6)
  x_next = jnp.array([[0.1, -0.9, 1.5]])
  np.testing.assert_allclose(G.log_prob(x_next, mean, std),
                             [stats.norm.logpdf(np.array(x_next), want_mean, want_std).mean()], rtol=1e-6)
  # At t = 1 the coefficient uses the capped t in its denominator: finite.
  _, std1 = G.sde_step(x, v, jnp.array([1.0]), jnp.array([0.9]), 0.9, a)
  np.testing.assert_allclose(np.ravel(std1)[0], a * math.sqrt(1 / (1 - 0.9)) * math.sqrt(0.1), rtol=1e-5)


def test_kl_of_two_gaussian_steps():
  mean, ref = jnp.array([[1.0, 2.0]]), jnp.array([[0.5, 2.5]])
  np.testing.assert_allclose(G.kl(mean, ref, jnp.array(0.5)), [(0.25 + 0.25) / 2 / (2 * 0.25)], rtol=1e-6)
  assert float(G.kl(mean, mean, jnp.array(0.3))[0]) == 0.0


def _sde_samples(noise_level, steps=200, n=20_000, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x1 = jax.random.normal(k1, (n, 1))
  noise = jax.random.normal(k2, (steps, n, 1))
  return G.rollout(exact_velocity, x1, diffusion.sampling_times(steps, 1.0), noise, noise_level)


@pytest.mark.parametrize("noise_level", [0.3, 0.7])
def test_sde_has_the_odes_marginals_on_the_analytic_gaussian(noise_level):
  """x0 ~ N(MU, SIGMA^2) (tests/test_flow.py): the SDE driven by the exact velocity ends at the
  same distribution as the ODE, through different paths (each sample is not the ODE's image of
  its noise, unlike the ODE's exact flow map)."""
  states, log_probs = _sde_samples(noise_level)
  x0 = states[-1]
  assert abs(float(x0.mean()) - MU) < 0.02
  assert abs(float(x0.std()) - SIGMA) < 0.02
  assert bool(jnp.isfinite(log_probs).all())
  # Mid-way too: x_t ~ N((1 - t) MU, (1 - t)^2 SIGMA^2 + t^2) at the grid's middle time.
  t = float(diffusion.sampling_times(200, 1.0)[100])
  mid = states[100]
  assert abs(float(mid.mean()) - (1 - t) * MU) < 0.03
  assert abs(float(mid.std()) - math.sqrt((1 - t) ** 2 * SIGMA**2 + t**2)) < 0.03
  ode_image = MU + SIGMA * states[0]
  assert float(jnp.abs(x0 - ode_image).mean()) > 0.05


def test_sde_without_noise_is_the_euler_ode():
  x1 = jax.random.normal(jax.random.key(3), (64, 2))
  times = diffusion.sampling_times(10, 2.0)
  states, _ = G.rollout(exact_velocity, x1, times, jnp.zeros((10, 64, 2)), 1e-6)
  np.testing.assert_allclose(states[-1], diffusion.solve(exact_velocity, x1, times), atol=1e-4)


def test_group_advantages_and_clipped_loss_by_hand():
  r = jnp.array([[1.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25]])
  adv = G.group_advantages(r, clip=5.0, eps=1e-4)
  std = np.std([1.0, 0.0, 0.5, 0.5])
  np.testing.assert_allclose(adv[0], np.array([0.5, -0.5, 0.0, 0.0]) / (std + 1e-4), rtol=1e-6)
  np.testing.assert_array_equal(adv[1], 0.0)  # a group scored alike carries no signal
  # std of (0, 0, 0, 1) is sqrt(3)/4: advantages -1/sqrt(3) and sqrt(3), the latter clipped to 1.
  one = G.group_advantages(jnp.array([[0.0, 0.0, 0.0, 1.0]]), clip=1.0)
  np.testing.assert_allclose(one, [[-0.25 / (math.sqrt(3) / 4 + 1e-4)] * 3 + [1.0]], rtol=1e-5)

  old = jnp.zeros(4)
  new = jnp.log(jnp.array([1.0, 1.5, 0.5, 1.05]))
  a = jnp.array([2.0, 1.0, -1.0, -1.0])
  loss, ratio, clipped = G.clipped_objective(new, old, a, clip_range=0.2)
  # max(-A r, -A clip(r, 0.8, 1.2)):
  np.testing.assert_allclose(loss, [-2.0, -1.2, 0.8, 1.05], rtol=1e-6)
  np.testing.assert_allclose(ratio, [1.0, 1.5, 0.5, 1.05], rtol=1e-6)
  np.testing.assert_array_equal(clipped, [False, True, True, False])
  # The gradient flows through the unclipped term only.
  g = jax.grad(lambda lp: G.clipped_objective(lp, old, a, 0.2)[0].sum())(new)
  np.testing.assert_allclose(g, [-2.0, 0.0, 0.0, 1.05], rtol=1e-6)


def _grpo_config(**overrides):
  fields = dict(stage="posttrain", objective="grpo", init_from="parent", grpo__reward="brightness",
                grpo__group_size=4, grpo__num_steps=3, train__batch_size=2)
  config = get_config(**{**fields, **overrides})
  config_checks.validate(config)
  return config


def _setup(config, seed=0):
  networks = networks_lib.build_networks(config)
  params = nn.unbox(networks.init_params(jax.random.key(seed)))
  params = helpers.perturb(params, 0.05, seed + 1)  # zero-initialised output layers would give v = 0
  prompts = ["a large red circle in the top left", "a small blue square in the center"]
  return networks, params, jnp.asarray(tokens_lib.tokenize(prompts, config.text.max_len))


def _rollout(networks, config):
  """grpo.rollout, jitted: eager, the model's many small ops dispatch one by one."""
  return jax.jit(lambda params, tokens, keys: grpo.rollout(params, tokens, keys, networks=networks, config=config))


@pytest.mark.heavy
def test_grpo_loss_at_the_reference_has_ratio_one_no_kl_and_the_policy_gradient():
  """With the policy equal to the frozen reference and to the rollout's policy: ratio 1, KL 0,
  and the loss's gradient is -mean(A * grad log p) (the clip does not bind)."""
  config = _grpo_config()
  networks, params, tok = _setup(config)
  keys = grpo.image_keys(jax.random.key(0), 2, 4)
  tokens = jnp.repeat(tok, 4, axis=0)
  states, log_probs, times = _rollout(networks, config)(params, tokens, keys)
  adv = jnp.linspace(-1.5, 1.5, 8)
  batch = grpo.transitions(states, log_probs, times, adv, tokens, keys, 3)
  frozen = objectives.Frozen(networks)
  loss_fn = jax.jit(lambda p: objectives.loss_fn(p, batch, keys, params, networks=networks, config=config,
                                                  frozen=frozen))
  loss, (per_sample, _, extra) = loss_fn(params)
  np.testing.assert_allclose(extra["ratio"], 1.0, atol=1e-5)
  # Zero up to rounding: jitted, the policy's and the reference's forwards may fuse differently.
  np.testing.assert_allclose(extra["kl"], 0.0, atol=1e-10)
  np.testing.assert_allclose(per_sample, -batch["advantage"] * extra["ratio"], rtol=1e-5)

  @jax.jit
  def log_prob(p):  # log p(x_next | x) of each transition under params p
    mean, std = G.sde_step(batch["x"], inference.guided_velocity(
        networks, p, {"tokens": batch["tokens"]}, objectives.null_batch({"tokens": batch["tokens"]}, networks),
        config.grpo.cfg_scale, config.diffusion.prediction)(batch["x"], batch["t"]), batch["t"], batch["t_next"],
        batch["t_cap"], config.grpo.noise_level)
    return G.log_prob(batch["x_next"], mean, std)

  grad = jax.jit(jax.grad(lambda p: loss_fn(p)[0]))(params)
  surrogate = jax.jit(jax.grad(lambda p: -(batch["advantage"] * log_prob(p)).mean()))  # -mean(A * log p)
  chex.assert_trees_all_close(grad, surrogate(params), rtol=2e-3, atol=1e-7)
  assert optax_norm(grad) > 0
  # The rollout's log-probabilities are the policy's own: recomputed, they agree.
  np.testing.assert_allclose(log_prob(params), batch["log_prob"], rtol=1e-4, atol=1e-4)


def optax_norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree))))


def test_transitions_pick_each_trajectorys_own_steps():
  k, n, num = 5, 3, 2
  states = jnp.arange((k + 1) * n, dtype=jnp.float32).reshape(k + 1, n, 1, 1, 1)  # states[s, i] = s * n + i
  log_probs = jnp.arange(k * n, dtype=jnp.float32).reshape(k, n) + 0.5
  times = jnp.linspace(1.0, 0.0, k + 1)
  keys = jax.random.split(jax.random.key(0), n)
  out = grpo.transitions(states, log_probs, times, jnp.arange(n) * 1.0, jnp.arange(n)[:, None], keys, num)
  assert out["x"].shape == (n * num, 1, 1, 1)
  for row in range(n * num):
    i = row // num  # trajectory-major
    step = int(out["x"][row].item()) // n
    assert int(out["x"][row].item()) % n == i and out["x_next"][row].item() == (step + 1) * n + i
    assert out["log_prob"][row] == step * n + i + 0.5 and out["t"][row] == times[step]
    assert out["t_next"][row] == times[step + 1] and out["advantage"][row] == i and out["tokens"][row, 0] == i
  steps = [int(out["x"][r].item()) // n for r in range(n * num)]
  assert all(steps[r] != steps[r + 1] for r in range(0, n * num, num))  # distinct steps within a trajectory


def test_rollouts_do_not_depend_on_the_batch_they_are_in():
  config = _grpo_config()
  networks, params, tok = _setup(config)
  keys = grpo.image_keys(jax.random.key(4), 2, 4)
  tokens = jnp.repeat(tok, 4, axis=0)
  rollout = _rollout(networks, config)
  states, log_probs, _ = rollout(params, tokens, keys)
  part, part_lp, _ = rollout(params, tokens[4:], keys[4:])
  np.testing.assert_allclose(part[-1], states[-1, 4:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(part_lp, log_probs[:, 4:], rtol=1e-5, atol=1e-5)
  # Image i of prompt p: fold_in(split(key, P)[p], i).
  want = jax.random.fold_in(jax.random.split(jax.random.key(4), 2)[1], 2)
  np.testing.assert_array_equal(jax.random.key_data(keys[6]), jax.random.key_data(want))


def test_adherence_rewards_read_shapes_captions_and_run_inside_jit():
  scenes = [shapes.scene_for(0, "train", i) for i in range(6)]
  images = np.stack([shapes.render(s, 24) for s, _ in scenes])
  prompts = [c for _, c in scenes]
  np.testing.assert_array_equal(rewards.adherence_all(images, prompts), 1.0)
  wrong = [shapes.caption(shapes.Scene(**dict(s.attributes(), color="red" if s.color != "red" else "green",
                                              background=s.background))) for s, _ in scenes]
  np.testing.assert_array_equal(rewards.adherence_fraction(images, wrong), 0.75)
  np.testing.assert_array_equal(rewards.adherence_all(images, wrong), 0.0)
  tok = jnp.asarray(tokens_lib.tokenize(prompts + wrong, 64))
  x = jnp.asarray(pixels.from_uint8(np.concatenate([images, images])))
  jitted = jax.jit(lambda x, t: rewards.score(rewards.get("adherence"), x, t))(x, tok)
  np.testing.assert_array_equal(jitted, [1.0] * 6 + [0.75] * 6)
  np.testing.assert_allclose(rewards.score(rewards.get("brightness"), x, tok), (np.concatenate([images, images]) / 255.0)
                             .mean(axis=(1, 2, 3)), atol=1e-2)
  with pytest.raises(ValueError, match="does not name one"):
    rewards.adherence_fraction(images[:1], ["a red thing"])
  assert set(rewards.REWARDS) == set(config_lib.REWARDS)


def test_caption_parsing_inverts_every_template():
  for split in shapes.SPLITS:
    for i in range(300):
      scene, text = shapes.scene_for(3, split, i)
      assert shapes.parse_caption(text) == scene.attributes(), text
  # config.SHAPES_CAPTION_TOKENS holds every caption up to its last attribute word, and no fewer do.
  room = config_lib.SHAPES_CAPTION_TOKENS - 1
  cut_short = False
  for template in shapes._TEMPLATES:
    for c, s, z, p, b in itertools.product(shapes.ALL_COLORS, shapes.SHAPES, shapes.SIZES, shapes.POSITIONS,
                                           shapes.BACKGROUNDS):
      scene = shapes.Scene(c, s, z, p, b)
      text = shapes.caption(scene, template)
      assert shapes.parse_caption(text[:room]) == scene.attributes(), text
      cut_short |= shapes.parse_caption(text[:room - 1]) != scene.attributes()
  assert cut_short
  assert shapes.parse_caption("a large red blue circle at the top") is None
  assert shapes.parse_caption("a large red circle") is None


@pytest.mark.parametrize("changes,message", [
    (dict(grpo__group_size=1), "a group needs >= 2"),
    (dict(grpo__train_timesteps=4), "train_timesteps=4 must lie in"),
    (dict(grpo__updates_per_rollout=3), "must split into updates_per_rollout=3"),
    (dict(grpo__reward="nope"), "grpo.reward='nope' is not one of"),
    (dict(grpo__reward="adherence", data__source="tfds"), "scores shapes captions"),
    (dict(grpo__noise_level=0.0), "grpo.noise_level=0.0 must be > 0"),
    (dict(grpo__reward="adherence"), "text.max_len=32 cuts shapes captions"),
])
def test_grpo_config_errors_name_the_field(changes, message):
  with pytest.raises(ValueError, match=message):
    _grpo_config(**changes)


@pytest.mark.heavy
def test_sharded_grpo_step_equals_one_device():
  """The whole step (rollout, host reward through pure_callback, two updates) on a (data=2,
  fsdp=2) mesh gives the single-device result."""
  config = _grpo_config(grpo__reward="adherence", grpo__group_size=2, train__batch_size=4, text__max_len=64)
  networks, params, _ = _setup(config)
  tx = optim.make_optimizer(config.optim, optim.num_updates(config))
  prompts = [c for _, c in (shapes.scene_for(0, "train", i) for i in range(4))]
  batch = dict(tokens=jnp.asarray(tokens_lib.tokenize(prompts, config.text.max_len)))
  rng = jax.random.key_data(jax.random.key(5))
  rules = shard_lib.rules_tuple(config.sharding.logical_rules)
  out = {}
  for name, shape, devices in [("one", dict(data=1, fsdp=1, tensor=1), 1), ("mesh", dict(data=2, fsdp=2, tensor=1), 4)]:
    mesh = shard_lib.make_mesh(shape, jax.devices()[:devices])
    abstract, shardings = state_lib.state_shardings(networks, tx, mesh, rules)
    state = state_lib.TrainState(step=jnp.int32(0), params=params, ema_params=params, opt_state=tx.init(params),
                                 rng=rng, nonfinite_streak=jnp.int32(0))
    state = jax.device_put(state, shardings)
    frozen_params = jax.device_put(params, shardings.params)
    data = shard_lib.logical_sharding(mesh, rules, "activation_batch")
    step = jax.jit(lambda s, b, r, f: grpo.train_step(s, b, r, f, networks=networks, tx=tx, config=config,
                                                      frozen=objectives.Frozen(networks)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      new, metrics = step(state, jax.device_put(batch, data), rng, frozen_params)
    out[name] = jax.device_get((new.params, metrics))
  chex.assert_trees_all_close(out["mesh"][0], out["one"][0], rtol=2e-4, atol=2e-6)
  assert out["mesh"][1]["objective"]["reward"] == pytest.approx(out["one"][1]["objective"]["reward"])
  assert float(out["one"][1]["grad_norm"]) > 0


@pytest.mark.heavy
def test_grpo_through_the_cli_raises_its_reward_and_resumes_bit_for_bit(tmp_path, tiny_run):
  """A tiny model tuned for brightness (a reward with an obvious optimum) from an init_from
  parent: the reward rises within a few dozen steps; a run stopped half-way and resumed ends
  with the uninterrupted run's state."""
  base = ["--config=configs/mmdit_256.py:test", "--config.train.sample_every=0", "--config.mesh.data=1"]
  rl = [*base, "--config.stage=posttrain", "--config.objective=grpo", f"--config.init_from={tiny_run}",
        "--config.grpo.reward=brightness", "--config.train.batch_size=4", "--config.grpo.group_size=4",
        "--config.grpo.num_steps=4", "--config.optim.warmup_steps=1", "--config.grpo.clip_range=0.01",
        "--config.train.log_every=6", "--config.train.checkpoint_every=12"]
  helpers.cli("jdiff.main", *rl, "--config.train.num_steps=24", f"--workdir={tmp_path / 'full'}")
  logged = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
  rewards_logged = [m["reward"] for m in logged]
  assert rewards_logged[-1] > rewards_logged[0] + 0.05, rewards_logged
  assert all(m["kl"] >= 0 and 0 <= m["clip_fraction"] <= 1 for m in logged)

  helpers.cli("jdiff.main", *rl, "--config.train.num_steps=12", f"--workdir={tmp_path / 'halves'}")
  helpers.cli("jdiff.main", *rl, "--config.train.num_steps=24", f"--workdir={tmp_path / 'halves'}")
  config = _grpo_config(train__batch_size=4, train__num_steps=24)
  full, full_data, _ = restored(tmp_path / "full", config)
  halves, halves_data, _ = restored(tmp_path / "halves", config)
  chex.assert_trees_all_equal(halves, full)
  assert halves_data == full_data
