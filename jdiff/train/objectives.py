"""What a stage optimises: every training objective, in one place.

An objective is a per-sample loss
  loss(params, batch, keys, frozen_params, *, networks, config, frozen) -> (loss [B], t [B], diagnostics)
declared with the batch keys it reads and whether it compares against a frozen model (the
init_from model, as the DPO reference or the distillation teacher). `noised` is the opening
they share: the clean sample x0, the timestep t, the noise eps, and the conditioning inputs
with captions dropped for classifier-free guidance, each sample drawn from its own key.

Adding an objective: write its loss here, add it to OBJECTIVES, and add its name to the
stages that may use it (jdiff.config.STAGE_OBJECTIVES).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from jdiff import diffusion
from jdiff import inference
from jdiff.data import pixels
from jdiff import errors
from jdiff.networks import Networks


def model_input(batch: Mapping[str, jax.Array], keys: jax.Array, networks: Networks, image: str = "image"
                ) -> jax.Array:
  """The clean sample x0 in model space [B, H, W, C]: pixels batch[image] in [-1, 1], or
  scaled VAE latents z ~ N(mean, exp(logvar)) drawn with each sample's own key."""
  if not networks.latent:
    return pixels.from_uint8(batch[image])
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


def null_batch(batch: Mapping[str, jax.Array], networks: Networks) -> dict[str, jax.Array]:
  """The empty caption's conditioning inputs, one per sample of `batch`."""
  return drop_captions(batch, jnp.ones(jax.tree.leaves(batch)[0].shape[0], bool), networks)


def streams(keys: jax.Array, n: int) -> list[jax.Array]:
  """n independent [B] key streams from the per-sample keys."""
  return [jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys) for i in range(n)]


class Noised(NamedTuple):
  """One noised batch: x_t = (1 - t) x0 + t eps."""

  x0: jax.Array  # clean sample in model space [B, H, W, C]
  eps: jax.Array  # standard normal noise [B, H, W, C]
  t: jax.Array  # [B] in [0, 1], from config.diffusion.timesteps and its resolution shift
  inputs: dict[str, jax.Array]  # conditioning inputs, some captions dropped

  @property
  def x_t(self) -> jax.Array:
    return diffusion.interpolate(self.x0, self.eps, self.t)


def noised(batch: Mapping[str, jax.Array], keys: jax.Array, networks: Networks, config, *, image: str = "image",
           caption_dropout: float | None = None) -> Noised:
  """Draws each sample's caption dropout, t, noise and latent (streams 0-3 of its key).

  caption_dropout: P(caption -> empty); None reads config.data.caption_dropout. Calls with
  the same keys draw the same t and eps (DPO's preferred and rejected images share them).
  """
  k_drop, k_t, k_eps, k_z = streams(keys, 4)
  x0 = model_input(batch, k_z, networks, image)
  _, h, w, _ = x0.shape
  p = config.data.caption_dropout if caption_dropout is None else caption_dropout
  drop = jax.vmap(lambda k: jax.random.bernoulli(k, p))(k_drop)
  d = config.diffusion
  t = diffusion.training_timesteps(k_t, networks.seq_len(h, w), d.timesteps, d.shift)
  eps = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(k_eps)
  return Noised(x0, eps, t, drop_captions(batch, drop, networks))


@dataclasses.dataclass(frozen=True)
class Frozen:
  """The frozen model of a dpo / guidance / fewstep stage (the init_from model): its networks
  (static) and, passed to the step as an argument, its params. Used without gradient."""

  networks: Networks

  def velocity(self, params: Any, inputs: Mapping[str, jax.Array], null: Mapping[str, jax.Array] | None,
               w: jax.Array | float, prediction: str):
    """The frozen model's guided velocity field (see `inference.guided_velocity`)."""
    return inference.guided_velocity(self.networks, params, inputs, null, w, prediction)


def conditioning(params, inputs: Mapping[str, jax.Array], t: jax.Array, networks: Networks, config
                 ) -> dict[str, jax.Array]:
  """The denoiser's conditioning under the flow and dpo losses: the caption's, plus the
  guidance input config.diffusion.guidance for a guidance-embedded model (Flux-dev)."""
  cond = networks.conditioning(params, inputs)
  if networks.denoiser.guidance_embed:
    cond = dict(cond, guidance=jnp.full(t.shape, config.diffusion.guidance, jnp.float32))
  return cond


def flow_loss(params, batch, keys, frozen_params, *, networks: Networks, config, frozen: Frozen | None):
  """Flow matching (pretraining, SFT, tuning): noise the data to x_t = (1 - t) x0 + t eps with
  t from the logit-normal (or configured) density under the resolution shift, predict with
  the caption (dropped at rate caption_dropout), and regress the velocity eps - x0 (in the
  configured prediction's parameterisation and weighting)."""
  del frozen_params, frozen
  d = config.diffusion
  n = noised(batch, keys, networks, config)
  pred = networks.predict(params["denoiser"], n.x_t, n.t, conditioning(params, n.inputs, n.t, networks, config))
  mask = batch["mask"].astype(jnp.float32) / 255.0 if "mask" in batch else None  # data.loss_mask
  return diffusion.flow_loss(pred, n.x0, n.eps, n.t, prediction=d.prediction, weighting=d.weighting,
                             mask=mask), n.t, {}


def dpo_loss(params, batch, keys, frozen_params, *, networks: Networks, config, frozen: Frozen):
  """Diffusion-DPO (diffusion/preference.py) on {'image_w', 'image_l', 'tokens'}: the
  preferred and the rejected image share t and noise; the policy's and the frozen
  reference's flow errors on both give the margin; dpo.sft_weight adds the flow loss on the
  preferred image. No caption dropout."""
  d = config.diffusion
  win = noised(batch, keys, networks, config, image="image_w", caption_dropout=0.0)
  lose = noised(batch, keys, networks, config, image="image_l", caption_dropout=0.0)
  pair = lambda a, b: jnp.concatenate([a, b], axis=0)
  x0, eps, t = pair(win.x0, lose.x0), pair(win.eps, lose.eps), pair(win.t, lose.t)
  x_t = diffusion.interpolate(x0, eps, t)
  inputs = {"tokens": pair(batch["tokens"], batch["tokens"])}

  def errors(nets: Networks, p):
    pred = nets.predict(p["denoiser"], x_t, t, conditioning(p, inputs, t, nets, config))
    return jnp.split(diffusion.flow_loss(pred, x0, eps, t, prediction=d.prediction, weighting=d.weighting), 2)

  err_w, err_l = errors(networks, params)
  ref_w, ref_l = jax.lax.stop_gradient(errors(frozen.networks, frozen_params))
  loss, m = diffusion.dpo_loss(err_w, ref_w, err_l, ref_l, config.dpo.beta, config.dpo.positive)
  loss = loss + config.dpo.sft_weight * err_w
  return loss, win.t, dict(dpo_margin=m["margin"], dpo_accuracy=m["implicit_accuracy"], err_w=err_w, err_l=err_l)


def guidance_loss(params, batch, keys, frozen_params, *, networks: Networks, config, frozen: Frozen):
  """Guidance distillation (diffusion/distill.py): the student, given w ~ U[guidance_min,
  guidance_max], regresses the frozen teacher's CFG velocity at x_t: the noised data
  (distill.states='data'), or the student's own ODE state at t, reached from the same noise
  in distill.state_steps Euler steps with the same w ('student')."""
  d, g = config.diffusion, config.distill
  n = noised(batch, keys, networks, config)
  (k_w,) = streams(keys, 5)[4:]
  scale = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, g.guidance_min, g.guidance_max))(k_w)
  teacher = frozen.velocity(frozen_params, n.inputs, null_batch(batch, frozen.networks), scale, d.prediction)
  cond = networks.conditioning(params, n.inputs)
  student_fn = lambda p: lambda x, t, c: networks.predict(p["denoiser"], x, t, c)
  x_t = n.x_t
  if g.states == "student":
    own = diffusion.embedded_guidance_velocity(student_fn(jax.lax.stop_gradient(params)), cond, scale, d.prediction)
    x_t = diffusion.ode_state(own, n.eps, n.t, g.state_steps)
  per_sample = diffusion.guidance_distillation_loss(student_fn(params), teacher, x_t, n.t, cond, scale,
                                                    d.prediction)
  return per_sample, n.t, dict(guidance=scale)


def fewstep_loss(params, batch, keys, frozen_params, *, networks: Networks, config, frozen: Frozen):
  """Few-step distillation (diffusion/distill.py): on a random interval k of the student's
  K-step grid, the student's velocity at the interval's start regresses the teacher's
  M-sub-step guided jump from there. The start is the noised data (distill.states='data') or
  the student's own state after k of its steps from the same noise ('student'). A student
  with a guidance embedding is given w = distill.cfg_scale. The interval takes the place of
  the sampled t (its stream draws k)."""
  d, g = config.diffusion, config.distill
  n = noised(batch, keys, networks, config)
  _, h, w, _ = n.x0.shape
  coarse, fine = diffusion.few_step_grid(g.student_steps, g.teacher_substeps, networks.seq_len(h, w), d.shift)
  k = jax.vmap(lambda key: jax.random.randint(key, (), 0, g.student_steps))(streams(keys, 2)[1])
  teacher = frozen.velocity(frozen_params, n.inputs, null_batch(batch, frozen.networks), g.cfg_scale, d.prediction)
  cond = networks.conditioning(params, n.inputs)
  if networks.denoiser.guidance_embed:
    cond = dict(cond, guidance=jnp.full(k.shape, g.cfg_scale, jnp.float32))
  student = lambda p: lambda x, t: diffusion.convert(networks.predict(p["denoiser"], x, t, cond), d.prediction,
                                                     "v", x, t)
  if g.states == "student":
    x_t = diffusion.student_states(student(jax.lax.stop_gradient(params)), n.eps, k, coarse)
  else:
    x_t = diffusion.interpolate(n.x0, n.eps, coarse[k])
  t, target = diffusion.few_step_target(teacher, x_t, k, coarse, fine)
  return diffusion.velocity_error(student(params)(x_t, t), target), t, dict(interval=k.astype(jnp.float32))


def grpo_loss(params, batch, keys, frozen_params, *, networks: Networks, config, frozen: Frozen):
  """Flow-GRPO's policy loss (diffusion/grpo.py) on one slice of a rollout's transitions
  {'x', 'x_next': [N, H, W, C], 't', 't_next', 't_cap', 'log_prob', 'advantage': [N],
  'tokens': [N, L]} (jdiff/train/grpo.py draws them): the policy's Gaussian step at (x, t)
  gives the log-probability of x_next, its ratio to the rollout's log_prob is clipped, and
  grpo.kl_weight x the KL between the policy's and the frozen reference's steps is added."""
  del keys
  g, prediction = config.grpo, config.diffusion.prediction
  x, t = batch["x"], batch["t"]
  inputs = {"tokens": batch["tokens"]}
  null = null_batch(inputs, networks)

  def step_mean(nets: Networks, p):
    v = inference.guided_velocity(nets, p, inputs, null, g.cfg_scale, prediction)(x, t)
    return diffusion.grpo.sde_step(x, v.astype(jnp.float32), t, batch["t_next"], batch["t_cap"], g.noise_level)

  mean, std = step_mean(networks, params)
  log_prob = diffusion.grpo.log_prob(batch["x_next"], mean, std)
  loss, ratio, clipped = diffusion.grpo.clipped_objective(log_prob, batch["log_prob"], batch["advantage"],
                                                          g.clip_range)
  extra = dict(ratio=ratio, clip_fraction=clipped.astype(jnp.float32))
  if g.kl_weight > 0:
    mean_ref, _ = jax.lax.stop_gradient(step_mean(frozen.networks, frozen_params))
    kl = diffusion.grpo.kl(mean, mean_ref, std)
    loss = loss + g.kl_weight * kl
    extra["kl"] = kl
  return loss, t, extra


@dataclasses.dataclass(frozen=True)
class Objective:
  """A training objective: its per-sample loss, whether it needs the frozen init_from model,
  and the pixel-space batch keys it reads (a latent cache supplies its own)."""

  loss: Callable[..., tuple[jax.Array, jax.Array, dict[str, jax.Array]]]
  frozen: bool = False
  frozen_role: str = ""  # what the frozen model is, for logs: 'reference' or 'teacher'
  images: tuple[str, ...] = ("image",)


OBJECTIVES = {
    "flow": Objective(flow_loss),
    "dpo": Objective(dpo_loss, frozen=True, frozen_role="reference", images=("image_w", "image_l")),
    "guidance": Objective(guidance_loss, frozen=True, frozen_role="teacher"),
    "fewstep": Objective(fewstep_loss, frozen=True, frozen_role="teacher"),
    # grpo's batch is prompts (the images are not read); train/grpo.py turns it into rollouts.
    "grpo": Objective(grpo_loss, frozen=True, frozen_role="reference"),
}


def get(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise errors.InvalidArgument(f"unknown objective {name!r}; expected one of {tuple(OBJECTIVES)}")
  return OBJECTIVES[name]


def check(config) -> Objective:
  """config.objective's Objective, after checking what it needs of the run: a frozen model
  needs config.init_from."""
  objective = get(config.objective)
  if objective.frozen and not config.init_from:
    raise errors.InvalidArgument(
        f"config.objective={config.objective!r} compares against a frozen {objective.frozen_role}: "
        "set config.init_from to the workdir of the model it starts from")
  return objective


def loss_fn(params: Any, batch: Mapping[str, jax.Array], keys: jax.Array, frozen_params: Any = None, *,
            networks: Networks, config, frozen: Frozen | None = None):
  """Mean loss of config.objective and (per-sample loss [B], t [B], per-sample diagnostics).

  batch: pixel space {'image': uint8 [B, H, W, C], 'tokens': int32 [B, T]} (dpo: 'image_w'
  and 'image_l' instead of 'image'), or from a cache {'latent_mean', 'latent_logvar':
  [B, h, w, c], 'context': [B, L, D], 'pooled': [B, P]}.
  keys: [B] per-sample PRNG keys, so a sample is treated the same whatever micro-batch or
  shard it lands in. frozen_params: the frozen model's params (dpo, guidance, fewstep).
  """
  per_sample, t, extra = get(config.objective).loss(params, batch, keys, frozen_params, networks=networks,
                                                    config=config, frozen=frozen)
  return per_sample.mean(), (per_sample, t, extra)
