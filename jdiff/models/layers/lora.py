"""Low-rank adapters (LoRA): the spec a model carries as a field, and merging adapters
into their kernels."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LoRA:
  """Low-rank adapters (Hu et al., 2021). A model given a LoRA (its `lora` field, passed
  down to every layer it builds) adds adapters to the Dense layers whose module path matches
  `targets` (a regex over paths like 'blocks_0/x_qkv/q' or 'blocks/x_mlp/fc1'; by default
  the attention and MLP projections inside the transformer blocks):
  y = x W + (alpha / rank) (x A) B, A [in, rank] (Kaiming-uniform), B [rank, out] (zeros),
  so an adapted model starts as its base."""

  rank: int
  alpha: float = 1.0
  targets: str = r"(.*_)?blocks?(_\d+)?/.*(qkv2?/[qkv]|attn2?_out|mlp/fc[12]|mlp_in|out)"

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def merge_lora(params: Any, spec: LoRA) -> Any:
  """Folds every adapter into its kernel (W + scale A B) and drops the adapter parameters:
  the plain model's params, giving the adapted model's outputs."""
  if isinstance(params, dict) or hasattr(params, "items"):
    params = dict(params)
    if "lora_a" in params and "lora_b" in params:
      a, b = params.pop("lora_a"), params.pop("lora_b")
      delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32)) * spec.scale
      params["kernel"] = (params["kernel"].astype(jnp.float32) + delta).astype(params["kernel"].dtype)
    return {k: merge_lora(v, spec) for k, v in params.items()}
  return params
