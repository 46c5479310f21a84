"""Stacks of transformer blocks: unrolled or under nn.scan, with rematerialisation
policies, and moving parameters between the two layouts."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _cudnn_attention_saveable(prim, *_, **__) -> bool:
  """True for cuDNN's fused attention forward, whose outputs (attention output and softmax
  statistics) are its backward's residuals. The kernel is bound inside
  jax.nn.dot_product_attention, out of reach of jax.ad_checkpoint.checkpoint_name, so the
  policy matches the primitive by name."""
  return prim.name == "dot_product_attention_fwd_wrapper"


# dots_no_batch, and cuDNN attention keeps its forward outputs for the backward instead of
# running the forward kernel again (GPU: [B, T, D] + f32 [B, N, T] more per attention)
_DOTS_NO_BATCH_ATTENTION = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _cudnn_attention_saveable)

# 'none' runs blocks without rematerialisation; the others wrap each block in nn.remat.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_no_batch_attention": _DOTS_NO_BATCH_ATTENTION,
    # and the MLP's GELU output (fc2's input), so the backward does not run the GELU again
    # ([B, T, 4D] more per block), and the adaLN LayerNorms' statistics (mean and 1/sigma,
    # f32 [B, T] each): recomputed, XLA:GPU writes the normalised x in f32 between the
    # backward's row and column reductions
    "dots_no_batch_attention_mlp": jax.checkpoint_policies.save_from_both_policies(
        _DOTS_NO_BATCH_ATTENTION, jax.checkpoint_policies.save_only_these_names("mlp_activation", "norm_stats")),
}


def run_blocks(
    block_cls: type[nn.Module],
    depth: int,
    carry: Any,
    cond: jax.Array,
    *,
    name: str,
    scan: bool,
    remat: str,
    **block_kwargs,
) -> Any:
  """Applies `depth` blocks of `block_cls` (call: (carry, cond) -> (carry, None)).

  Must be called from a compact method. scan=True runs them under nn.scan with params
  stacked on a leading 'layers' axis under `name` (compile time flat in depth);
  scan=False creates `name`_0 ... `name`_{depth-1}. `remat` names a policy in
  REMAT_POLICIES ('none' = no rematerialisation).
  """
  if depth == 0:
    return carry
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {remat!r}; expected one of {tuple(REMAT_POLICIES)}")
  cls = block_cls
  if remat != "none":
    cls = nn.remat(cls, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
  if scan:
    stack = nn.scan(
        cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=nn.broadcast,
        length=depth,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(name=name, **block_kwargs)
    carry, _ = stack(carry, cond)
    return carry
  for i in range(depth):
    carry, _ = cls(name=f"{name}_{i}", **block_kwargs)(carry, cond)
  return carry


def stack_unrolled(params: dict, name: str, depth: int) -> dict:
  """Unrolled block params {name_0 ... name_{depth-1}} -> scanned {name: stacked}.

  Moves weights between the scan=False and scan=True layouts of the same model.
  """
  params = dict(params)
  blocks = [params.pop(f"{name}_{i}") for i in range(depth)]
  params[name] = (jax.tree.map(lambda *xs: np.stack(xs), *blocks) if _on_host(blocks) else _stack(blocks))
  return params


def _on_host(tree: Any) -> bool:
  """Host (NumPy) weights, e.g. converted checkpoints, stay on the host."""
  return all(isinstance(x, np.ndarray) for x in jax.tree.leaves(tree))


# Whole trees in one program: eagerly, each leaf shape would compile its own slice or stack.
@jax.jit
def _stack(blocks: list[Any]) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)


def _unstack(stacked: Any) -> list[Any]:
  depth = jax.tree.leaves(stacked)[0].shape[0]
  return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(depth)]


_unstack_jit = jax.jit(_unstack)


def unstack_scanned(params: dict, name: str) -> dict:
  """Inverse of `stack_unrolled`."""
  params = dict(params)
  stacked = params.pop(name)
  blocks = _unstack(stacked) if _on_host(stacked) else _unstack_jit(stacked)
  params.update({f"{name}_{i}": block for i, block in enumerate(blocks)})
  return params


def stack_groups(params: dict, groups: Sequence[tuple[str, int]]) -> dict:
  """`stack_unrolled` for several block stacks [(name, depth), ...]; empty stacks are skipped."""
  for name, depth in groups:
    if depth:
      params = stack_unrolled(params, name, depth)
  return params


def unstack_groups(params: dict, names: Sequence[str]) -> dict:
  """`unstack_scanned` for every stack in `names` that `params` holds."""
  for name in names:
    if name in params:
      params = unstack_scanned(params, name)
  return params


def match_layout(params: Any, like: Any) -> Any:
  """`params` with its block stacks in the layout of `like` (params of the same model, or
  their shapes): a scanned stack `name` becomes name_0 ... name_{n-1} where `like` has those,
  and unrolled blocks become one stack where `like` has `name`. So a model trained with
  scan=True can start a scan=False run, and the reverse. Everything else is left as it is."""
  if not isinstance(params, dict) or not isinstance(like, dict):
    return params
  out = dict(params)
  for name in like:
    if name not in out and f"{name}_0" in out:
      depth = next(i for i in range(len(out) + 1) if f"{name}_{i}" not in out)
      out = stack_unrolled(out, name, depth)
  for name in list(out):
    if name not in like and f"{name}_0" in like and f"{name}_0" not in out:
      out = unstack_scanned(out, name)
  return {k: match_layout(v, like[k]) if k in like else v for k, v in out.items()}
