"""Logical-axis sharding of activations and weights: the names the layers use; the
rules in config.sharding.logical_rules map them onto mesh axes (data, fsdp, tensor)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """Constrains an activation's sharding by logical axis names (no-op without rules)."""
  return nn.with_logical_constraint(x, names)


# Mesh axes that only shard parameter *storage* (ZeRO-3 / FSDP): a weight is kept split
# over them and all-gathered where it is used, so compute sees it sharded only over the
# remaining axes (e.g. tensor). Making the gather explicit also keeps XLA's SPMD
# partitioner away from a miscompile it makes when it is left to reshard activations
# against fsdp-sharded weights on its own (docs/notes.md).
STORAGE_ONLY_AXES = ("fsdp",)


@functools.lru_cache(maxsize=16)
def compute_rules(rules: tuple) -> tuple:
  """Logical rules with the storage-only mesh axes dropped: how a weight is laid out where
  it is used."""
  def drop(axes):
    if axes is None or isinstance(axes, str):
      return None if axes in STORAGE_ONLY_AXES else axes
    kept = tuple(a for a in axes if a not in STORAGE_ONLY_AXES)
    return kept if len(kept) > 1 else (kept[0] if kept else None)
  return tuple((name, drop(axes)) for name, axes in rules)


def gathered(w: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """A weight with logical `axes`, constrained to its compute sharding (no-op without rules)."""
  rules = nn.get_logical_axis_rules()
  if not rules:
    return w
  return nn.with_logical_constraint(w, axes, rules=compute_rules(tuple(rules)))
