"""One training step: gradients of the objective's loss (train/objectives.py), optionally
accumulated over micro-batches, the AdamW update, EMA, and the non-finite guard.

train_step(state, batch, rng) -> (state, metrics) is pure; the trainer binds `networks`,
`tx` and `config` with functools.partial and jits it once with explicit shardings and a
donated state.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from jdiff.networks import Networks
from jdiff.train import objectives, optim
from jdiff.train.objectives import Frozen
from jdiff.train.state import TrainState

NUM_T_BINS = 10


def _grads(params, batch, keys, frozen_params, networks: Networks, config, frozen: Frozen | None):
  """(loss, per-sample losses [B], t [B], diagnostics, grads), accumulated over
  config.train.grad_accum micro-batches (one optimizer update per step either way; equal
  results up to float rounding, since randomness is per sample).

  Only the parameters matching optim.trainable are differentiated: grads holds
  optax.MaskedNode() in place of the frozen ones, so a frozen base gets neither a gradient
  nor an accumulator."""
  trainable, fixed = optim.split_trainable(params, config.optim.trainable)
  loss_fn = lambda tr, *args: objectives.loss_fn(optim.merge_trainable(tr, fixed), *args, networks=networks,
                                                 config=config, frozen=frozen)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  accum = config.train.grad_accum
  if accum == 1:
    (loss, (per_sample, t, extra)), grads = grad_fn(trainable, batch, keys, frozen_params)
    return loss, per_sample, t, extra, grads
  split = lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:])

  def body(acc, xs):
    mb, mk = xs
    (loss, aux), g = grad_fn(trainable, mb, mk, frozen_params)
    return jax.tree.map(jnp.add, acc, g), (loss, aux)

  zeros = jax.tree.map(jnp.zeros_like, trainable)
  grads, (losses, aux) = jax.lax.scan(body, zeros, (jax.tree.map(split, batch), split(keys)))
  per_sample, t, extra = jax.tree.map(lambda x: x.reshape(-1), aux)
  grads = jax.tree.map(lambda g: g / accum, grads)
  return losses.mean(), per_sample, t, extra, grads


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, frozen_params: Any = None, *,
               networks: Networks, tx: optax.GradientTransformation, config, frozen: Frozen | None = None
               ) -> tuple[TrainState, dict]:
  """One update. rng: the run's base key data (uint32 [2]); this step uses
  fold_in(rng, state.step), so no key is ever reused. frozen_params / frozen: the frozen
  reference or teacher of dpo / guidance / fewstep objectives.

  A non-finite loss or gradient leaves params, EMA and optimizer state untouched (the
  step counter still advances past the bad batch) and increments nonfinite_streak.

  Returns the new state and on-device metrics: loss, grad_norm, lr, nonfinite, streak,
  per-t-bin loss sums and counts (NUM_T_BINS equal bins of t in [0, 1]), and under
  'objective' the objective's diagnostics averaged over the batch.
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(rng), state.step)
  keys = jax.random.split(key, jax.tree.leaves(batch)[0].shape[0])
  loss, per_sample, t, extra, grads = _grads(state.params, batch, keys, frozen_params, networks, config, frozen)
  new_state, ok, grad_norm = apply_update(state, loss, grads, tx, config)
  new_state = new_state.replace(step=state.step + 1,
                                nonfinite_streak=jnp.where(ok, 0, state.nonfinite_streak + 1))
  return new_state, step_metrics(state, new_state, ok, loss, grad_norm, per_sample, t, extra, config)


def apply_update(state: TrainState, loss: jax.Array, grads: Any, tx: optax.GradientTransformation, config
                 ) -> tuple[TrainState, jax.Array, jax.Array]:
  """One AdamW update from `grads` (the trainable parameters', `_grads`: the frozen ones get
  none) and the EMA after it, unless the loss or the gradient is non-finite: then params, EMA
  and optimizer state stay as they were. Returns (state with new params / ema / opt_state, ok,
  gradient norm); the step counter is the caller's."""
  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  # Only the trainable parameters pass through the optimizer, the EMA and the select below;
  # the frozen ones go out as they came in (donated, so aliased), whatever XLA would or would
  # not simplify in a zero update of them.
  trainable, frozen = optim.split_trainable(state.params, config.optim.trainable)
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  new = optax.apply_updates(trainable, updates)
  decay = optim.ema_decay(config.optim, state.step)
  ema = jax.tree.map(lambda e, p: e if optim.masked(e) else decay * e + (1.0 - decay) * p, state.ema_params, new,
                     is_leaf=optim.masked)
  # A select between new and old values, not a lax.cond: XLA:GPU fuses the select into the
  # update's elementwise kernels (in place on the donated buffers), while a cond's outputs are
  # copied back into them, every state buffer every step (benchmarks/hlo_cost.py shows it).
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  new, ema, opt_state = keep(new, trainable), keep(ema, state.ema_params), keep(opt_state, state.opt_state)
  params = optim.merge_trainable(new, frozen)
  return state.replace(params=params, ema_params=ema, opt_state=opt_state), ok, grad_norm


def step_metrics(state: TrainState, new_state: TrainState, ok: jax.Array, loss: jax.Array, grad_norm: jax.Array,
                 per_sample: jax.Array, t: jax.Array, extra: Mapping[str, jax.Array], config) -> dict:
  """The on-device metrics of one step (see `train_step`)."""
  bins = jax.nn.one_hot(jnp.clip((t * NUM_T_BINS).astype(jnp.int32), 0, NUM_T_BINS - 1), NUM_T_BINS)
  finite_losses = jnp.where(jnp.isfinite(per_sample), per_sample, 0.0)
  return dict(
      loss=loss,
      grad_norm=grad_norm,
      lr=optim.learning_rate(config.optim, optim.num_updates(config))(optim.applied_updates(state.opt_state)),
      nonfinite=(~jnp.asarray(ok)).astype(jnp.int32),
      nonfinite_streak=new_state.nonfinite_streak,
      t_bin_loss_sum=bins.T @ finite_losses,
      t_bin_count=bins.sum(0),
      objective={k: v.mean() for k, v in extra.items()},
  )
