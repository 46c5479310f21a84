"""One training step: the objective's loss (flow matching, DPO or distillation), gradients (optionally accumulated over
micro-batches), AdamW update, EMA, and the non-finite guard.

train_step(state, batch, rng) -> (state, metrics) is pure; the trainer binds `networks`,
`tx` and `config` with functools.partial and jits it once with explicit shardings and a
donated state.
"""

from __future__ import annotations

import dataclasses
import functools
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


@dataclasses.dataclass(frozen=True)
class Frozen:
  """The frozen model of a dpo / guidance / fewstep stage (the init_from model): its networks
  (static) and, passed to the step as an argument, its params. Used without gradient."""

  networks: Networks

  def velocity(self, params: Any, inputs: Mapping[str, jax.Array], null: Mapping[str, jax.Array] | None,
               w: jax.Array | float, prediction: str):
    """The frozen model's guided velocity field v(x, t) for conditioning `inputs` at scale w
    (scalar or [B]): its embedded guidance (one forward) if it has one, else classifier-free
    guidance with the null conditioning inputs `null` (two)."""
    n = self.networks
    model_fn = lambda x, t, c: n.predict(params["denoiser"], x, t, c)
    cond = n.conditioning(params, inputs)
    if n.denoiser.guidance_embed:
      return diffusion.embedded_guidance_velocity(model_fn, cond, w, prediction)
    w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (jax.tree.leaves(inputs)[0].shape[0],))
    uncond = n.conditioning(params, null)
    return lambda x, t: diffusion.cfg_target(model_fn, x, t, cond, uncond, w, prediction)


def _null_batch(batch: Mapping[str, jax.Array], networks: Networks) -> dict[str, jax.Array]:
  """The empty caption's conditioning inputs, one per sample of `batch`."""
  return drop_captions(batch, jnp.ones(jax.tree.leaves(batch)[0].shape[0], bool), networks)


def _keys(keys: jax.Array, n: int) -> list[jax.Array]:
  """n independent [B] key streams from the per-sample keys."""
  return [jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys) for i in range(n)]


def flow_objective(params, batch, keys, frozen_params, *, networks: Networks, config, frozen: Frozen | None):
  """Flow matching: per-sample (loss [B], t [B], {}).

  Each sample's caption dropout (the caption becomes the empty one with probability
  config.data.caption_dropout), t, noise and latent sample come from its own key.
  """
  del frozen_params, frozen
  k_drop, k_t, k_eps, k_z = _keys(keys, 4)
  x0 = model_input(batch, k_z, networks)
  _, h, w, _ = x0.shape
  drop = jax.vmap(lambda k: jax.random.bernoulli(k, config.data.caption_dropout))(k_drop)
  cond = networks.conditioning(params, drop_captions(batch, drop, networks))
  d = config.diffusion
  t = diffusion.training_timesteps(k_t, networks.seq_len(h, w), d.timesteps, d.shift)
  eps = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(k_eps)
  pred = networks.predict(params["denoiser"], diffusion.interpolate(x0, eps, t), t, cond)
  return diffusion.flow_loss(pred, x0, eps, t, prediction=d.prediction, weighting=d.weighting), t, {}


def dpo_objective(params, batch, keys, frozen_params, *, networks: Networks, config, frozen: Frozen):
  """Diffusion-DPO (diffusion/preference.py) on {'image_w', 'image_l', 'tokens'}: the
  preferred and the rejected image share t and noise; the policy's and the frozen
  reference's flow errors on both give the margin; dpo.sft_weight adds the flow loss on the
  preferred image. No caption dropout."""
  k_t, k_eps = _keys(keys, 2)
  x_w, x_l = images_to_model_space(batch["image_w"]), images_to_model_space(batch["image_l"])
  _, h, w, _ = x_w.shape
  d = config.diffusion
  t = diffusion.training_timesteps(k_t, networks.seq_len(h, w), d.timesteps, d.shift)
  eps = jax.vmap(lambda k: jax.random.normal(k, x_w.shape[1:], jnp.float32))(k_eps)
  pair = lambda a, b: jnp.concatenate([a, b], axis=0)
  x0, eps2, t2 = pair(x_w, x_l), pair(eps, eps), pair(t, t)
  x_t = diffusion.interpolate(x0, eps2, t2)
  inputs = {"tokens": pair(batch["tokens"], batch["tokens"])}

  def errors(nets: Networks, p):
    pred = nets.predict(p["denoiser"], x_t, t2, nets.conditioning(p, inputs))
    return jnp.split(diffusion.flow_loss(pred, x0, eps2, t2, prediction=d.prediction, weighting=d.weighting), 2)

  err_w, err_l = errors(networks, params)
  ref_w, ref_l = jax.lax.stop_gradient(errors(frozen.networks, frozen_params))
  loss, m = diffusion.dpo_loss(err_w, ref_w, err_l, ref_l, config.dpo.beta, config.dpo.get("positive", 0.0))
  loss = loss + config.dpo.get("sft_weight", 0.0) * err_w
  return loss, t, dict(dpo_margin=m["margin"], dpo_accuracy=m["implicit_accuracy"], err_w=err_w, err_l=err_l)


def guidance_objective(params, batch, keys, frozen_params, *, networks: Networks, config, frozen: Frozen):
  """Guidance distillation (diffusion/distill.py): the student, given w ~ U[guidance_min,
  guidance_max], regresses the frozen teacher's CFG velocity at the noised data."""
  k_drop, k_t, k_eps, k_z, k_w = _keys(keys, 5)
  x0 = model_input(batch, k_z, networks)
  _, h, w, _ = x0.shape
  drop = jax.vmap(lambda k: jax.random.bernoulli(k, config.data.caption_dropout))(k_drop)
  inputs = drop_captions(batch, drop, networks)
  d, g = config.diffusion, config.distill
  t = diffusion.training_timesteps(k_t, networks.seq_len(h, w), d.timesteps, d.shift)
  eps = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(k_eps)
  scale = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, g.guidance_min, g.guidance_max))(k_w)
  x_t = diffusion.interpolate(x0, eps, t)
  teacher = frozen.velocity(frozen_params, inputs, _null_batch(batch, frozen.networks), scale, d.prediction)
  student_fn = lambda x, t, c: networks.predict(params["denoiser"], x, t, c)
  per_sample = diffusion.guidance_distillation_loss(student_fn, teacher, x_t, t, networks.conditioning(params, inputs),
                                                    scale, d.prediction)
  return per_sample, t, dict(guidance=scale)


def fewstep_objective(params, batch, keys, frozen_params, *, networks: Networks, config, frozen: Frozen):
  """Few-step distillation (diffusion/distill.py): on a random interval k of the student's
  K-step grid, the student's velocity at the noised data regresses the teacher's M-sub-step
  guided jump. A student with a guidance embedding is given w = distill.cfg_scale."""
  k_drop, k_i, k_eps, k_z = _keys(keys, 4)
  x0 = model_input(batch, k_z, networks)
  _, h, w, _ = x0.shape
  drop = jax.vmap(lambda k: jax.random.bernoulli(k, config.data.caption_dropout))(k_drop)
  inputs = drop_captions(batch, drop, networks)
  d, g = config.diffusion, config.distill
  coarse, fine = diffusion.few_step_grid(g.student_steps, g.teacher_substeps, networks.seq_len(h, w), d.shift)
  k = jax.vmap(lambda key: jax.random.randint(key, (), 0, g.student_steps))(k_i)
  eps = jax.vmap(lambda key: jax.random.normal(key, x0.shape[1:], jnp.float32))(k_eps)
  teacher = frozen.velocity(frozen_params, inputs, _null_batch(batch, frozen.networks), g.cfg_scale, d.prediction)
  x_t, t, target = diffusion.few_step_target(teacher, x0, eps, k, coarse, fine)
  cond = networks.conditioning(params, inputs)
  if networks.denoiser.guidance_embed:
    cond = dict(cond, guidance=jnp.full(t.shape, g.cfg_scale, jnp.float32))
  v = diffusion.convert(networks.predict(params["denoiser"], x_t, t, cond), d.prediction, "v", x_t, t)
  return diffusion.velocity_error(v, target), t, dict(interval=k.astype(jnp.float32))


OBJECTIVES = dict(flow=flow_objective, dpo=dpo_objective, guidance=guidance_objective, fewstep=fewstep_objective)


def loss_fn(params: Any, batch: Mapping[str, jax.Array], keys: jax.Array, frozen_params: Any = None, *,
            networks: Networks, config, frozen: Frozen | None = None):
  """Mean loss of config.objective and (per-sample loss [B], t [B], per-sample diagnostics).

  batch: pixel space {'image': uint8 [B, H, W, C], 'tokens': int32 [B, T]} (dpo: 'image_w'
  and 'image_l' instead of 'image'), or from a cache {'latent_mean', 'latent_logvar':
  [B, h, w, c], 'context': [B, L, D], 'pooled': [B, P]}.
  keys: [B] per-sample PRNG keys, so a sample is treated the same whatever micro-batch or
  shard it lands in. frozen_params: the frozen model's params (dpo, guidance, fewstep).
  """
  per_sample, t, extra = OBJECTIVES[config.get("objective", "flow")](
      params, batch, keys, frozen_params, networks=networks, config=config, frozen=frozen)
  return per_sample.mean(), (per_sample, t, extra)


def _grads(params, batch, keys, frozen_params, networks: Networks, config, frozen: Frozen | None):
  """(loss, per-sample losses [B], t [B], diagnostics, grads), accumulated over
  config.train.grad_accum micro-batches (one optimizer update per step either way; equal
  results up to float rounding, since randomness is per sample)."""
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, networks=networks, config=config, frozen=frozen),
                               has_aux=True)
  accum = config.train.grad_accum
  if accum == 1:
    (loss, (per_sample, t, extra)), grads = grad_fn(params, batch, keys, frozen_params)
    return loss, per_sample, t, extra, grads
  split = lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:])

  def body(acc, xs):
    mb, mk = xs
    (loss, aux), g = grad_fn(params, mb, mk, frozen_params)
    return jax.tree.map(jnp.add, acc, g), (loss, aux)

  zeros = jax.tree.map(jnp.zeros_like, params)
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
  train_mask = optim.trainable_mask(grads, config.optim.get("trainable", ""))
  grads = jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads, train_mask)  # frozen: no gradient
  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = optim.ema_decay(config.optim, state.step)
  ema = jax.tree.map(lambda e, p, m: decay * e + (1.0 - decay) * p if m else e, state.ema_params, params,
                     train_mask)
  # A select between new and old values, not a lax.cond: XLA:GPU fuses the select into the
  # update's elementwise kernels (in place on the donated buffers), while a cond's outputs are
  # copied back into them: 65 GB of copies per step for d24, ~23 ms on an H100
  # (benchmarks/hlo_cost.py, BENCHMARKS.md). XLA:CPU copies under the select instead, at no
  # measured cost in step time.
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  params, ema, opt_state = keep(params, state.params), keep(ema, state.ema_params), keep(opt_state, state.opt_state)
  new_state = state.replace(
      step=state.step + 1,
      params=params,
      ema_params=ema,
      opt_state=opt_state,
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
      objective={k: v.mean() for k, v in extra.items()},
  )
  return new_state, metrics
