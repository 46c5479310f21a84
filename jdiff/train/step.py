"""One training step: flow-matching loss, gradients (optionally accumulated over
micro-batches), AdamW update, EMA, and the non-finite guard.

train_step(state, batch, rng) -> (state, metrics) is pure; the trainer binds `networks`,
`tx` and `config` with functools.partial and jits it once with explicit shardings and a
donated state.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from jdiff import diffusion
from jdiff.train import optim
from jdiff.train.state import Networks, TrainState

NUM_T_BINS = 10


def images_to_model_space(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, C] in [0, 255] -> float32 in [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def model_input(batch: Mapping[str, jax.Array], keys: jax.Array, networks: Networks) -> jax.Array:
  """The clean sample x0 in model space [B, H, W, C]: pixels in [-1, 1], or scaled VAE latents
  z ~ N(mean, exp(logvar)) drawn with each sample's own key."""
  if not networks.latent:
    return images_to_model_space(batch["image"])
  mean, logvar = (batch[k].astype(jnp.float32) for k in ("latent_mean", "latent_logvar"))
  noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(keys)
  return (mean + jnp.exp(0.5 * logvar) * noise - networks.latent_shift) * networks.latent_scale


def drop_captions(batch: Mapping[str, jax.Array], drop: jax.Array, networks: Networks) -> dict[str, jax.Array]:
  """The conditioning inputs with the captions of samples where drop [B] is true replaced by the
  empty caption (its tokens, or its cached embeddings)."""
  out = {}
  for key, null in networks.null_inputs().items():
    mask = drop.reshape((-1,) + (1,) * (batch[key].ndim - 1))
    out[key] = jnp.where(mask, jnp.asarray(null, batch[key].dtype)[None], batch[key])
  return out


def loss_fn(params: Any, batch: Mapping[str, jax.Array], keys: jax.Array, *, networks: Networks, config):
  """Mean flow-matching loss and per-sample (loss [B], t [B]).

  batch: pixel space {'image': uint8 [B, H, W, C], 'tokens': int32 [B, T]}, or from a cache
  {'latent_mean', 'latent_logvar': [B, h, w, c], 'context': [B, L, D], 'pooled': [B, P]}.
  keys: [B] per-sample PRNG keys: each sample's caption dropout (the caption becomes the
  empty one with probability config.data.caption_dropout), t, noise and latent sample come
  from its own key, so a sample is treated the same whatever micro-batch or shard it lands in.
  """
  k_drop, k_t, k_eps, k_z = (jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys) for i in range(4))
  x0 = model_input(batch, k_z, networks)
  _, h, w, _ = x0.shape
  drop = jax.vmap(lambda k: jax.random.bernoulli(k, config.data.caption_dropout))(k_drop)
  cond = networks.conditioning(params, drop_captions(batch, drop, networks))
  d = config.diffusion
  t = diffusion.training_timesteps(k_t, networks.seq_len(h, w), d.timesteps, d.shift)
  eps = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(k_eps)
  pred = networks.predict(params["denoiser"], diffusion.interpolate(x0, eps, t), t, cond)
  per_sample = diffusion.flow_loss(pred, x0, eps, t, prediction=d.prediction, weighting=d.weighting)
  return per_sample.mean(), (per_sample, t)


def _grads(params, batch, keys, networks: Networks, config):
  """(loss, per-sample losses [B], t [B], grads), accumulated over config.train.grad_accum
  micro-batches (one optimizer update per step either way; equal results up to float
  rounding, since randomness is per sample)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  accum = config.train.grad_accum
  if accum == 1:
    (loss, (per_sample, t)), grads = grad_fn(params, batch, keys, networks=networks, config=config)
    return loss, per_sample, t, grads
  split = lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:])

  def body(acc, xs):
    mb, mk = xs
    (loss, aux), g = grad_fn(params, mb, mk, networks=networks, config=config)
    return jax.tree.map(jnp.add, acc, g), (loss, aux)

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, (losses, (per_sample, t)) = jax.lax.scan(body, zeros, (jax.tree.map(split, batch), split(keys)))
  grads = jax.tree.map(lambda g: g / accum, grads)
  return losses.mean(), per_sample.reshape(-1), t.reshape(-1), grads


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               networks: Networks, tx: optax.GradientTransformation, config) -> tuple[TrainState, dict]:
  """One update. rng: the run's base key data (uint32 [2]); this step uses
  fold_in(rng, state.step), so no key is ever reused.

  A non-finite loss or gradient leaves params, EMA and optimizer state untouched (the
  step counter still advances past the bad batch) and increments nonfinite_streak.

  Returns the new state and on-device metrics: loss, grad_norm, lr, nonfinite, streak,
  and per-t-bin loss sums and counts (NUM_T_BINS equal bins of t in [0, 1]).
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(rng), state.step)
  keys = jax.random.split(key, jax.tree.leaves(batch)[0].shape[0])
  loss, per_sample, t, grads = _grads(state.params, batch, keys, networks, config)
  train_mask = optim.trainable_mask(grads, config.optim.get("trainable", ""))
  grads = jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads, train_mask)  # frozen: no gradient
  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = optim.ema_decay(config.optim, state.step)
  ema = jax.tree.map(lambda e, p, m: decay * e + (1.0 - decay) * p if m else e, state.ema_params, params,
                     train_mask)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

  new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      ema_params=keep(ema, state.ema_params),
      opt_state=keep(opt_state, state.opt_state),
      nonfinite_streak=jnp.where(ok, 0, state.nonfinite_streak + 1),
  )
  bins = jax.nn.one_hot(jnp.clip((t * NUM_T_BINS).astype(jnp.int32), 0, NUM_T_BINS - 1), NUM_T_BINS)
  finite_losses = jnp.where(jnp.isfinite(per_sample), per_sample, 0.0)
  metrics = dict(
      loss=loss,
      grad_norm=grad_norm,
      lr=optim.learning_rate(config.optim, config.train.num_steps)(optim.applied_updates(state.opt_state)),
      nonfinite=(~ok).astype(jnp.int32),
      nonfinite_streak=new_state.nonfinite_streak,
      t_bin_loss_sum=bins.T @ finite_losses,
      t_bin_count=bins.sum(0),
  )
  return new_state, metrics
