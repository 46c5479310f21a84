"""Meshes and logical-to-mesh sharding.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism
with parameters and optimizer state sharded) and `tensor` (heads and MLP hidden
split across devices). Models name their axes logically (see models/layers/partitioning.py);
`config.sharding.logical_rules` maps those names onto mesh axes, and everything
below derives shardings from that one table.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jdiff import errors

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, Any]]


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor); at most one may be -1, meaning 'all remaining devices'."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise errors.InvalidArgument(f"mesh sizes must be positive with at most one -1, got {dict(mesh_cfg)}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise errors.InvalidArgument(f"{num_devices} devices cannot fill mesh {dict(mesh_cfg)}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise errors.InvalidArgument(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                                 f"have {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all), topology-aware on TPU.

  With fixed sizes (no -1) that need fewer devices than a single process has, the mesh
  takes the first ones (useful for small runs on a many-device host).
  """
  devices = list(jax.devices() if devices is None else devices)
  wanted = math.prod(int(mesh_cfg[a]) for a in MESH_AXES)
  if wanted > 0 and wanted < len(devices) and jax.process_count() == 1:
    devices = devices[:wanted]
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def rules_tuple(rules: Rules) -> tuple[tuple[str, Any], ...]:
  """Config rules (lists from JSON or tuples) -> hashable tuple form flax expects."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def logical_sharding(mesh: Mesh, rules: Rules, *names: str | None) -> NamedSharding:
  """NamedSharding for one array whose axes have logical `names`."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules_tuple(rules)))


def tree_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """Shardings for a tree whose leaves are (abstract) nn.LogicallyPartitioned boxes.

  Unboxed leaves are replicated. The result matches `nn.unbox(boxed_tree)`'s structure.
  """
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules_tuple(rules))


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules: Rules, *args) -> tuple[Any, Any]:
  """Initialises a boxed tree directly into its shardings; no device holds it whole.

  Args:
    init_fn: (*args) -> tree with LogicallyPartitioned leaves (e.g. `model.init`).
    mesh, rules: where and how to place it.
    *args: arguments of init_fn (keys, example inputs).

  Returns:
    (unboxed tree of sharded jax.Arrays, matching tree of NamedShardings).
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = tree_shardings(abstract, mesh, rules)
  tree = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return tree, shardings


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def describe(tree: Any) -> str:
  """One line per array: path, shape and sharding spec (for logs)."""
  lines = []
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    spec = getattr(getattr(x, "sharding", None), "spec", None)
    lines.append(f"{jax.tree_util.keystr(path)} {tuple(np.shape(x))} {spec}")
  return "\n".join(lines)
