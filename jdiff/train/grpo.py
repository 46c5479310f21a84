"""One online-RL step (objective 'grpo', Flow-GRPO): roll out, score, update.

train_step(state, batch, rng, frozen_params) has the signature of jdiff.train.step.train_step,
so the trainer compiles, shards, checkpoints and resumes it the same way:

  1. rollout: for each of the batch's P prompts, G = grpo.group_size trajectories of the SDE
     (diffusion/grpo.py) sampled with the current params (the "old" policy), with
     classifier-free guidance, recording every step's state and log-probability;
  2. reward: the final images scored by grpo.reward (eval/rewards.py; a host reward runs
     through jax.pure_callback inside the compiled step), standardised within each group;
  3. update: train_timesteps transitions of each trajectory (drawn per image), split into
     updates_per_rollout slices of whole trajectories; one AdamW update per slice on the
     clipped-ratio loss plus the KL to the frozen reference (objectives.grpo_loss). The first
     slice's ratio is exactly 1; later slices see the params the earlier ones moved.

Randomness: image i of prompt p draws its noise, its SDE noise and its training steps from
fold_in(key_p, i), with key_p the prompt's key of the step, so a trajectory does not depend
on how the batch is split over devices.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from jdiff import diffusion
from jdiff import inference
from jdiff.eval import rewards as rewards_lib
from jdiff.networks import Networks
from jdiff.train import objectives
from jdiff.train import step as step_lib
from jdiff.train.objectives import Frozen
from jdiff.train.state import TrainState


def image_keys(key: jax.Array, num_prompts: int, group_size: int) -> jax.Array:
  """[P * G] keys, image i of prompt p at p * G + i: fold_in(split(key, P)[p], i)."""
  prompt_keys = jax.random.split(key, num_prompts)
  group = jnp.arange(group_size)
  return jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(group))(prompt_keys).reshape(-1)


def rollout(params: Any, tokens: jax.Array, keys: jax.Array, *, networks: Networks, config
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """SDE trajectories for prompts `tokens` [N, L], one per key [N]: (states [K + 1, N, H, W, C],
  step log-probabilities [K, N], the grid's times [K + 1])."""
  g = config.grpo
  shape = (networks.resolution, networks.resolution, networks.channels)
  times = diffusion.inference_times(g.num_steps, networks.seq_len(), config.diffusion.shift)
  k_x1, k_sde = objectives.streams(keys, 2)
  x1 = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(k_x1)
  noise = jax.vmap(lambda k: jax.random.normal(k, (g.num_steps, *shape), jnp.float32))(k_sde).swapaxes(0, 1)
  inputs = {"tokens": tokens}
  velocity = inference.guided_velocity(networks, params, inputs, objectives.null_batch(inputs, networks),
                                        g.cfg_scale, config.diffusion.prediction)
  states, log_probs = diffusion.grpo.rollout(velocity, x1, times, noise, g.noise_level)
  return states, log_probs, times


def transitions(states: jax.Array, log_probs: jax.Array, times: jax.Array, advantage: jax.Array, tokens: jax.Array,
                keys: jax.Array, num: int) -> dict[str, jax.Array]:
  """`num` of each trajectory's K steps (a random subset per trajectory, from its key), as a
  flat batch of N * num transitions, trajectory-major: {'x', 'x_next', 't', 't_next', 't_cap',
  'log_prob', 'advantage', 'tokens'} (objectives.grpo_loss reads them)."""
  k, n = log_probs.shape
  (k_steps,) = objectives.streams(keys, 3)[2:]
  idx = jax.vmap(lambda key: jax.random.permutation(key, k)[:num])(k_steps)  # [N, num]
  per_traj = lambda a: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)
  along = states.swapaxes(0, 1)  # [N, K + 1, ...]
  flat = lambda a: a.reshape(n * num, *a.shape[2:])
  repeat = lambda a: jnp.repeat(a, num, axis=0)
  return dict(x=flat(per_traj(along[:, :-1])), x_next=flat(per_traj(along[:, 1:])),
              t=flat(times[idx]), t_next=flat(times[idx + 1]), t_cap=jnp.full((n * num,), times[1]),
              log_prob=flat(per_traj(log_probs.T)), advantage=repeat(advantage), tokens=repeat(tokens))


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, frozen_params: Any = None, *,
               networks: Networks, tx: optax.GradientTransformation, config, frozen: Frozen | None = None
               ) -> tuple[TrainState, dict]:
  """One rollout and grpo.updates_per_rollout updates (see the module docstring). batch:
  {'tokens': [P, L]} (other keys are ignored). Metrics as train_step's, with the objective's
  diagnostics: reward (mean over the rollout), reward_group_std, flat_groups (the fraction
  of groups whose images all scored alike: no signal), ratio, clip_fraction, kl."""
  g = config.grpo
  key = jax.random.fold_in(jax.random.wrap_key_data(rng), state.step)
  num_prompts = batch["tokens"].shape[0]
  keys = image_keys(key, num_prompts, g.group_size)
  tokens = jnp.repeat(batch["tokens"], g.group_size, axis=0)
  params = jax.lax.stop_gradient(state.params)
  states, log_probs, times = rollout(params, tokens, keys, networks=networks, config=config)
  reward = rewards_lib.score(rewards_lib.get(g.reward), states[-1], tokens)
  grouped = reward.reshape(num_prompts, g.group_size)
  advantage = diffusion.grpo.group_advantages(grouped, g.adv_clip).reshape(-1)
  num = g.num_steps if g.train_timesteps is None else g.train_timesteps
  batch_t = transitions(states, log_probs, times, advantage, tokens, keys, num)
  slices = jax.tree.map(lambda a: a.reshape(g.updates_per_rollout, -1, *a.shape[1:]), batch_t)
  slice_keys = jax.random.split(jax.random.fold_in(key, 1), slices["t"].shape[1])  # unused by the loss

  def update(st, mb):
    loss, per_sample, t, extra, grads = step_lib._grads(st.params, mb, slice_keys, frozen_params, networks,
                                                        config, frozen)
    st, ok, grad_norm = step_lib.apply_update(st, loss, grads, tx, config)
    return st, (ok, loss, grad_norm, per_sample, t, extra)

  new_state, (ok, loss, grad_norm, per_sample, t, extra) = jax.lax.scan(update, state, slices)
  ok = ok.all()
  new_state = new_state.replace(step=state.step + 1, nonfinite_streak=jnp.where(ok, 0, state.nonfinite_streak + 1))
  extra = dict(jax.tree.map(lambda a: a.reshape(-1), extra), reward=reward, reward_group_std=grouped.std(axis=1),
               flat_groups=(grouped.max(axis=1) == grouped.min(axis=1)).astype(jnp.float32))
  return new_state, step_lib.step_metrics(state, new_state, ok, loss.mean(), grad_norm.mean(), per_sample.reshape(-1),
                                          t.reshape(-1), extra, config)
