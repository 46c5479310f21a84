"""Optimizer: AdamW with linear warmup then a constant or cosine learning rate, gradient
clipping by global norm, weight decay on kernels only."""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import optax

from jdiff import errors

SCHEDULES = ("constant", "cosine")


def learning_rate(optim_cfg: Mapping[str, Any], num_steps: int) -> optax.Schedule:
  """lr(n) for the n-th applied update: linear warmup lr*(n+1)/warmup_steps, then constant
  or cosine decay to lr*end_lr_factor.

  n counts applied updates (the optimizer's own count): a step skipped for a non-finite
  loss does not advance the schedule.
  """
  lr, warmup = optim_cfg["lr"], optim_cfg["warmup_steps"]
  kind = optim_cfg["schedule"]
  if kind == "constant":
    after = optax.constant_schedule(lr)
  elif kind == "cosine":
    after = optax.cosine_decay_schedule(lr, max(num_steps - warmup, 1), alpha=optim_cfg["end_lr_factor"])
  else:
    raise errors.InvalidArgument(f"unknown optim.schedule {kind!r}; expected one of {SCHEDULES}")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(lr / warmup, lr, warmup - 1), after], [warmup - 1])


def num_updates(config) -> int:
  """Optimizer updates in the whole run, the length of the lr schedule: one per step, or
  grpo.updates_per_rollout per step of the grpo objective."""
  per_step = config.grpo.updates_per_rollout if config.objective == "grpo" else 1
  return config.train.num_steps * per_step


def applied_updates(opt_state: Any) -> jax.Array:
  """How many updates the optimizer has applied (its AdamW count)."""
  for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)):
    if isinstance(s, optax.ScaleByAdamState):
      return s.count
  raise ValueError("no AdamW state in the optimizer state")


def decay_mask(params: Any) -> Any:
  """True for kernels (matrices), False for biases, norm scales, embeddings and positions.

  Works on boxed (LogicallyPartitioned) and plain trees alike: it looks at the path only.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(k, "key", None) == "kernel" for k in path), params)


def param_path(path) -> str:
  """A tree path as 'denoiser/blocks_0/x_qkv/q/kernel' (the names `optim.trainable` matches)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def trainable_mask(params: Any, pattern: str) -> Any:
  """True for the leaves whose path (see `param_path`) fully matches the regex `pattern`
  ('' or '.*': everything). Boxed and plain trees alike."""
  if pattern in ("", ".*"):
    return jax.tree.map(lambda _: True, params, is_leaf=is_box)
  regex = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(lambda path, _: bool(regex.fullmatch(param_path(path))), params,
                                          is_leaf=is_box)


def count_trainable(params: Any, pattern: str) -> int:
  """How many parameter values `pattern` (optim.trainable) lets train; raises InvalidArgument
  when that is none, or when it takes in 8-bit parameters (lora.quantize_base), which cannot."""
  mask = trainable_mask(params, pattern)
  trained = [(param_path(path), p) for (path, p), m in zip(jax.tree_util.tree_leaves_with_path(params),
                                                          jax.tree.leaves(mask)) if m]
  if not trained:
    raise errors.InvalidArgument(f"config.optim.trainable={pattern!r} matches no parameter path "
                                 "(paths look like 'denoiser/blocks_0/x_qkv/q/kernel')")
  eight_bit = [name for name, p in trained if jax.numpy.dtype(p.dtype).itemsize == 1]
  if eight_bit:
    raise errors.InvalidArgument(f"config.optim.trainable={pattern!r} matches 8-bit parameters, which cannot train "
                                 f"(e.g. {eight_bit[0]}): with lora.quantize_base train the adapters, e.g. "
                                 "optim.trainable='.*lora_.*'")
  return sum(p.size for _, p in trained)


def masked(x) -> bool:
  """Whether `x` stands in for a frozen parameter (optax.MaskedNode: no leaves)."""
  return isinstance(x, optax.MaskedNode)


def split_trainable(params: Any, pattern: str) -> tuple[Any, Any]:
  """(trainable, frozen): `params` twice, each with optax.MaskedNode() in place of the other's
  leaves (pattern: optim.trainable). `merge_trainable` puts them back together."""
  mask = trainable_mask(params, pattern)
  trainable = jax.tree.map(lambda p, m: p if m else optax.MaskedNode(), params, mask)
  frozen = jax.tree.map(lambda p, m: optax.MaskedNode() if m else p, params, mask)
  return trainable, frozen


def merge_trainable(trainable: Any, rest: Any) -> Any:
  """`trainable` with each MaskedNode replaced by `rest`'s leaf at that place (rest: a full
  tree, or the frozen half of `split_trainable`)."""
  return jax.tree.map(lambda t, r: r if masked(t) else t, trainable, rest, is_leaf=masked)


def trains_text(networks, pattern: str) -> bool:
  """Whether `pattern` (optim.trainable) lets any parameter of the networks' text encoder train."""
  if networks.text is None:
    return False
  shapes = jax.eval_shape(lambda: networks.init_params(jax.random.key(0)))
  return any(jax.tree.leaves(trainable_mask({"text": shapes["text"]}, pattern), is_leaf=is_box))


def is_box(x) -> bool:
  return hasattr(x, "unbox") and hasattr(x, "names")


def make_optimizer(optim_cfg: Mapping[str, Any], num_steps: int) -> optax.GradientTransformation:
  """config.optim -> clip_by_global_norm + AdamW (weight decay on kernels; first moment in
  optim.mu_dtype, '' = the parameters' dtype), applied to the parameters matching
  optim.trainable; the others get zero updates and no optimizer state."""
  tx = optax.chain(
      optax.clip_by_global_norm(optim_cfg["grad_clip"]),
      optax.adamw(learning_rate(optim_cfg, num_steps), b1=optim_cfg["b1"], b2=optim_cfg["b2"],
                  eps=optim_cfg["eps"], weight_decay=optim_cfg["weight_decay"], mask=decay_mask,
                  mu_dtype=optim_cfg["mu_dtype"] or None),
  )
  pattern = optim_cfg["trainable"]
  if pattern in ("", ".*"):
    return tx
  labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask(params, pattern))
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def ema_decay(optim_cfg: Mapping[str, Any], step: jax.Array) -> jax.Array:
  """EMA decay at `step`; with ema_warmup, min(decay, (1 + step) / (10 + step)) so early
  averages are not dominated by the random init."""
  decay = optim_cfg["ema_decay"]
  if optim_cfg["ema_warmup"]:
    return jax.numpy.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.numpy.asarray(decay)
