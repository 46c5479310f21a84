"""Tensor-by-tensor rules between a diffusers state dict and a jdiff param tree.

A `Rule` ties one diffusers key (e.g. 'transformer_blocks.0.attn.to_q.weight') to one
jdiff leaf path (e.g. ('blocks_0', 'x_qkv', 'q', 'kernel')) with a layout transform that
is exactly invertible (transposes and reshapes only), so conversions are lossless.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
import safetensors.flax

def _unpack_rows(w: np.ndarray, shape) -> np.ndarray:
  """Rows ordered (C, p_row, p_col) -> (p_row, p_col, C); shape = (p, p, C)."""
  p, q, c = shape
  return w.reshape((c, p, q) + w.shape[1:]).transpose((1, 2, 0) + tuple(range(3, w.ndim + 2))).reshape(w.shape)


def _pack_rows(w: np.ndarray, shape) -> np.ndarray:
  """Inverse of `_unpack_rows`."""
  p, q, c = shape
  return w.reshape((p, q, c) + w.shape[1:]).transpose((2, 0, 1) + tuple(range(3, w.ndim + 2))).reshape(w.shape)


# name -> (to_jdiff(w, shape), to_diffusers(w, shape)); `shape` is the rule's extra geometry.
LAYOUTS = {
    "same": (lambda w, shape: w, lambda w, shape: w),
    # torch Linear weight [out, in] <-> Dense kernel [in, out]
    "linear": (lambda w, shape: w.T, lambda w, shape: w.T),
    # torch Conv2d patch weight [D, C, p, p] <-> Dense kernel [p*p*C, D] over (p_row, p_col, C)
    # torch Conv2d weight [out, in, kh, kw] <-> flax Conv kernel [kh, kw, in, out]
    "conv": (lambda w, shape: w.transpose(2, 3, 1, 0), lambda w, shape: w.transpose(3, 2, 0, 1)),
    "patch_conv": (
        lambda w, shape: w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]),
        lambda w, shape: w.reshape(shape + (-1,)).transpose(3, 2, 0, 1),
    ),
    # Flux packs 2x2 latent patches channel-first, (C, p_row, p_col); jdiff's patches are
    # (p_row, p_col, C). Linear [D, C*p*p] on packed input <-> kernel [p*p*C, D]:
    "packed_in": (lambda w, shape: _unpack_rows(w.T, shape), lambda w, shape: _pack_rows(w, shape).T),
    # Linear [C*p*p, D] producing packed output <-> kernel [D, p*p*C]; and its bias.
    "packed_out": (lambda w, shape: _unpack_rows(w, shape).T, lambda w, shape: _pack_rows(w.T, shape)),
    "packed_bias": (_unpack_rows, _pack_rows),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  """diffusers `key` <-> jdiff leaf `path`, through `layout` (a LAYOUTS name)."""

  key: str
  path: tuple[str, ...]
  layout: str = "same"
  # Extra geometry of the layout (patch_conv, packed_*: (p, p, C)).
  shape: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Derived:
  """A diffusers buffer that jdiff computes instead of storing (e.g. a sin-cos position
  table): checked against `value()` on import, written from it on export."""

  key: str
  value: Callable[[], np.ndarray]


def linear(key: str, path: tuple[str, ...], bias: bool = True) -> list[Rule]:
  """A torch Linear `key`.{weight,bias} <-> Dense at `path`.{kernel,bias}."""
  rules = [Rule(f"{key}.weight", path + ("kernel",), "linear")]
  if bias:
    rules.append(Rule(f"{key}.bias", path + ("bias",)))
  return rules


def import_params(rules: Iterable[Rule | Derived], state_dict: Mapping[str, Any], what: str = "model") -> dict:
  """diffusers state dict (numpy-like arrays) -> nested jdiff params (numpy arrays).

  Every rule's key must be present and every key of the state dict must be used; a
  mismatch raises with the keys listed, so a wrong config is caught, not half-loaded.
  """
  rules, derived = _split(rules)
  for d in derived:
    if d.key in state_dict:
      theirs = np.asarray(state_dict[d.key], np.float32)
      ours = d.value().reshape(theirs.shape)
      tol = 1e-5 if np.asarray(state_dict[d.key]).dtype == np.float32 else 1e-2
      if not np.allclose(theirs, ours, atol=tol):
        raise ValueError(f"{what} buffer {d.key} differs from the table jdiff computes "
                         f"(max abs diff {np.abs(theirs - ours).max():.3g}): check the config")
  state_dict = {k: v for k, v in state_dict.items() if k not in {d.key for d in derived}}
  wanted = {r.key for r in rules}
  missing = sorted(wanted - set(state_dict))
  unexpected = sorted(set(state_dict) - wanted)
  if missing or unexpected:
    raise ValueError(f"{what} weights do not match its config: "
                     f"missing {_few(missing)}, unexpected {_few(unexpected)}")
  params: dict = {}
  for r in rules:
    node = params
    for part in r.path[:-1]:
      node = node.setdefault(part, {})
    node[r.path[-1]] = LAYOUTS[r.layout][0](np.asarray(state_dict[r.key]), r.shape)
  return params


def export_params(rules: Iterable[Rule | Derived], params: Mapping[str, Any], what: str = "model") -> dict[str, np.ndarray]:
  """Nested jdiff params -> diffusers state dict; every jdiff leaf must be covered by a rule.
  Derived buffers are written in the dtype of the params."""
  rules, derived = _split(rules)
  leaves = dict(_flatten(params))
  wanted = {r.path for r in rules}
  missing = sorted("/".join(p) for p in wanted - set(leaves))
  unexpected = sorted("/".join(p) for p in set(leaves) - wanted)
  if missing or unexpected:
    raise ValueError(f"jdiff {what} params do not match the export rules: "
                     f"missing {_few(missing)}, unexpected {_few(unexpected)}")
  out = {}
  for r in rules:
    leaf = np.asarray(leaves[r.path])
    out[r.key] = np.ascontiguousarray(LAYOUTS[r.layout][1](leaf, r.shape))
  dtype = np.asarray(next(iter(leaves.values()))).dtype
  for d in derived:
    out[d.key] = d.value().astype(dtype)
  return out


def _split(rules: Iterable[Rule | Derived]) -> tuple[list[Rule], list[Derived]]:
  rules = list(rules)
  return [r for r in rules if isinstance(r, Rule)], [r for r in rules if isinstance(r, Derived)]


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _few(keys: list[str], n: int = 8) -> str:
  if not keys:
    return "none"
  more = f" and {len(keys) - n} more" if len(keys) > n else ""
  return ", ".join(keys[:n]) + more


# --- diffusers model directories ---------------------------------------------------------


def read_config(model_dir: str) -> dict[str, Any]:
  path = os.path.join(model_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: expected a diffusers model directory "
                            "(config.json plus *.safetensors)")
  with open(path) as f:
    return json.load(f)


def load_safetensors(model_dir: str) -> dict[str, np.ndarray]:
  """All tensors of a diffusers model directory (single file or sharded with an index).

  bfloat16 tensors come back as ml_dtypes.bfloat16 numpy arrays (no precision change).
  """
  files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"no .safetensors files in {model_dir}")
  out: dict[str, np.ndarray] = {}
  for name in files:
    with safe_open(os.path.join(model_dir, name), framework="flax") as f:
      for key in f.keys():
        out[key] = np.asarray(f.get_tensor(key))
  return out


def save_safetensors(tensors: Mapping[str, np.ndarray], model_dir: str, config: Mapping[str, Any],
                     filename: str = "diffusion_pytorch_model.safetensors") -> None:
  """Writes a diffusers model directory: config.json and one safetensors file."""
  os.makedirs(model_dir, exist_ok=True)
  with open(os.path.join(model_dir, "config.json"), "w") as f:
    json.dump(dict(config), f, indent=2)
  safetensors.flax.save_file({k: jnp.asarray(v) for k, v in tensors.items()}, os.path.join(model_dir, filename),
            metadata={"format": "pt"})
