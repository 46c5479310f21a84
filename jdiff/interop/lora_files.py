"""LoRA files in the namings other tools read, both ways.

  diffusers  PEFT naming on diffusers modules, as `pipeline.load_lora_weights` reads it:
             transformer.{module}.lora_A.weight [r, in], .lora_B.weight [out, r], the scale
             alpha/r folded into B (PEFT's default alpha = r gives scale 1).
  kohya      sd-scripts' naming, which ComfyUI, Forge and diffusers' Flux loader also read:
             lora_unet_{original module, dots as underscores}.lora_down.weight [R, in],
             .lora_up.weight [out, R] and .alpha (scale alpha/R), on the layers of the
             original checkpoints (Stability's MMDiT for SD3/SD3.5, Black Forest Labs' Flux),
             where several diffusers projections are one fused layer: the attention's q, k, v
             ('...attn.qkv'), and in Flux's single blocks q, k, v and the MLP input ('linear1').

A fused layer's rows are its parts' rows in order, so adapters on its parts (rank r each)
are one adapter of rank n*r on it: down stacks the parts' A, up is block-diagonal. Reading
such a file splits the blocks back exactly; a fused adapter trained elsewhere (a dense up)
gives every part the shared down and its rows of up, the same function at rank R.

Adapters here are {diffusers module: (a [in, r], b [r, out], scale)}, jdiff's Dense layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import numpy as np

from jdiff.interop import mapping as M

NAMINGS = ("diffusers", "kohya")
KOHYA_PREFIX = "lora_unet_"
PEFT_PREFIX = "transformer."

Adapter = tuple[np.ndarray, np.ndarray, float]  # a [in, r], b [r, out], scale


@dataclasses.dataclass(frozen=True)
class Fused:
  """One layer of the original checkpoint: `key` (e.g. 'double_blocks.0.img_attn.qkv') whose
  output rows are those of the diffusers modules `parts`, in order; `swap`: its two halves
  are (shift, scale) where diffusers has (scale, shift) (the continuous adaLN norms)."""

  key: str
  parts: tuple[str, ...]
  swap: bool = False


def _same(*pairs: tuple[str, str]) -> list[Fused]:
  return [Fused(key, (part,)) for key, part in pairs]


def sd3_layers(kwargs: Mapping[str, Any]) -> list[Fused]:
  """Stability's MMDiT layers of an SD3/SD3.5 transformer with jdiff MMDiT `kwargs`
  (the layout diffusers' single-file loader converts from)."""
  depth, dual = kwargs["depth"], kwargs.get("dual_attention_depth", 0)
  out = _same(("context_embedder", "context_embedder"),
              ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
              ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
              ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
              ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
              ("final_layer.linear", "proj_out"))
  out.append(Fused("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True))
  for i in range(depth):
    o, d, last = f"joint_blocks.{i}", f"transformer_blocks.{i}", i == depth - 1
    out += [Fused(f"{o}.x_block.attn.qkv", tuple(f"{d}.attn.to_{p}" for p in "qkv")),
            Fused(f"{o}.context_block.attn.qkv", tuple(f"{d}.attn.add_{p}_proj" for p in "qkv")),
            Fused(f"{o}.context_block.adaLN_modulation.1", (f"{d}.norm1_context.linear",), swap=last)]
    out += _same((f"{o}.x_block.attn.proj", f"{d}.attn.to_out.0"),
                 (f"{o}.x_block.mlp.fc1", f"{d}.ff.net.0.proj"),
                 (f"{o}.x_block.mlp.fc2", f"{d}.ff.net.2"),
                 (f"{o}.x_block.adaLN_modulation.1", f"{d}.norm1.linear"))
    if not last:
      out += _same((f"{o}.context_block.attn.proj", f"{d}.attn.to_add_out"),
                   (f"{o}.context_block.mlp.fc1", f"{d}.ff_context.net.0.proj"),
                   (f"{o}.context_block.mlp.fc2", f"{d}.ff_context.net.2"))
    if i < dual:
      out.append(Fused(f"{o}.x_block.attn2.qkv", tuple(f"{d}.attn2.to_{p}" for p in "qkv")))
      out += _same((f"{o}.x_block.attn2.proj", f"{d}.attn2.to_out.0"))
  return out


def flux_layers(kwargs: Mapping[str, Any]) -> list[Fused]:
  """Black Forest Labs' Flux layers of a transformer with jdiff Flux `kwargs`."""
  tte = "time_text_embed"
  out = _same(("txt_in", "context_embedder"),
              ("time_in.in_layer", f"{tte}.timestep_embedder.linear_1"),
              ("time_in.out_layer", f"{tte}.timestep_embedder.linear_2"),
              ("vector_in.in_layer", f"{tte}.text_embedder.linear_1"),
              ("vector_in.out_layer", f"{tte}.text_embedder.linear_2"))
  if kwargs.get("guidance_embed"):
    out += _same(("guidance_in.in_layer", f"{tte}.guidance_embedder.linear_1"),
                 ("guidance_in.out_layer", f"{tte}.guidance_embedder.linear_2"))
  out.append(Fused("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True))
  for i in range(kwargs["depth"]):
    o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
    out += [Fused(f"{o}.img_attn.qkv", tuple(f"{d}.attn.to_{p}" for p in "qkv")),
            Fused(f"{o}.txt_attn.qkv", tuple(f"{d}.attn.add_{p}_proj" for p in "qkv"))]
    out += _same((f"{o}.img_attn.proj", f"{d}.attn.to_out.0"), (f"{o}.txt_attn.proj", f"{d}.attn.to_add_out"),
                 (f"{o}.img_mlp.0", f"{d}.ff.net.0.proj"), (f"{o}.img_mlp.2", f"{d}.ff.net.2"),
                 (f"{o}.txt_mlp.0", f"{d}.ff_context.net.0.proj"), (f"{o}.txt_mlp.2", f"{d}.ff_context.net.2"),
                 (f"{o}.img_mod.lin", f"{d}.norm1.linear"), (f"{o}.txt_mod.lin", f"{d}.norm1_context.linear"))
  for i in range(kwargs["single_depth"]):
    o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
    out.append(Fused(f"{o}.linear1", tuple(f"{d}.attn.to_{p}" for p in "qkv") + (f"{d}.proj_mlp",)))
    out += _same((f"{o}.linear2", f"{d}.proj_out"), (f"{o}.modulation.lin", f"{d}.norm.linear"))
  return out


# --- jdiff params <-> adapters on diffusers modules ---------------------------------------


def adapters_from_params(rules: Iterable[M.Rule | M.Derived], params: Mapping[str, Any],
                         scale: float) -> dict[str, Adapter]:
  """The LoRA adapters in nested jdiff params (unrolled layout), keyed by the diffusers
  module of each 'linear' rule; an adapter on any other layer raises."""
  leaves = dict(M._flatten(params))
  layers = {p[:-1] for p in leaves if p[-1] == "lora_a"}
  if not layers:
    raise ValueError("these params hold no LoRA adapters (config.lora.rank = 0?)")
  out = {}
  for r in _linear_rules(rules):
    layer = r.path[:-1]
    if layer in layers:
      out[r.key[:-len(".weight")]] = (np.asarray(leaves[layer + ("lora_a",)]), np.asarray(leaves[layer + ("lora_b",)]),
                                     scale)
      layers.discard(layer)
  if layers:
    raise ValueError(f"adapters on layers without a linear diffusers counterpart: "
                     f"{M._few(sorted('/'.join(p) for p in layers))}")
  return out


def adapters_to_params(rules: Iterable[M.Rule | M.Derived], adapters: Mapping[str, Adapter],
                       scale: float) -> dict:
  """Nested jdiff params holding only 'lora_a' and 'lora_b' (unrolled layout) for adapters
  of any scale, re-expressed at `scale` (B times their scale / `scale`: exact when equal).
  A module the model does not have, or adapters of different ranks, raise."""
  by_module = {r.key[:-len(".weight")]: r.path[:-1] for r in _linear_rules(rules)}
  unknown = sorted(set(adapters) - set(by_module))
  if unknown:
    raise ValueError(f"the LoRA file adapts modules this model does not have: {M._few(unknown)}")
  ranks = {a.shape[1] for a, _, _ in adapters.values()}
  if len(ranks) > 1:
    raise ValueError(f"the file's adapters have ranks {sorted(ranks)}; a jdiff LoRA has one rank (merge it instead)")
  params: dict = {}
  for module, (a, b, s) in adapters.items():
    node = params
    for part in by_module[module]:
      node = node.setdefault(part, {})
    node["lora_a"] = a
    node["lora_b"] = b if s == scale else (b.astype(np.float32) * (s / scale)).astype(b.dtype)
  return params


def _linear_rules(rules: Iterable[M.Rule | M.Derived]) -> list[M.Rule]:
  return [r for r in rules if isinstance(r, M.Rule) and r.layout == "linear" and r.path[-1] == "kernel"]


# --- adapters <-> files -----------------------------------------------------------------


def to_peft(adapters: Mapping[str, Adapter], prefix: str = PEFT_PREFIX) -> dict[str, np.ndarray]:
  """diffusers/PEFT naming: lora_A = a^T, lora_B = (scale b)^T."""
  out = {}
  for module, (a, b, scale) in adapters.items():
    out[f"{prefix}{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
    out[f"{prefix}{module}.lora_B.weight"] = np.ascontiguousarray((b.astype(np.float32) * scale).astype(b.dtype).T)
  return out


def from_peft(tensors: Mapping[str, np.ndarray], prefix: str = PEFT_PREFIX) -> dict[str, Adapter]:
  """Inverse of `to_peft` (the scale is in B: scale 1)."""
  out, seen = {}, set()
  for key in tensors:
    if not key.endswith(".lora_A.weight"):
      continue
    module = key[:-len(".lora_A.weight")]
    b_key = module + ".lora_B.weight"
    if b_key not in tensors:
      raise ValueError(f"{key} has no {b_key}")
    seen |= {key, b_key}
    name = module[len(prefix):] if module.startswith(prefix) else module
    out[name] = (np.asarray(tensors[key]).T, np.asarray(tensors[b_key]).T, 1.0)
  rest = sorted(set(tensors) - seen)
  if rest:
    raise ValueError(f"not LoRA tensors in diffusers/PEFT naming: {M._few(rest)}")
  return out


def _swap(rows: np.ndarray) -> np.ndarray:
  half = rows.shape[0] // 2
  return np.concatenate([rows[half:], rows[:half]])


def kohya_name(layer: Fused) -> str:
  """The kohya module name of an original layer: 'lora_unet_' + its key, dots as underscores."""
  return KOHYA_PREFIX + layer.key.replace(".", "_")


def to_kohya(adapters: Mapping[str, Adapter], layers: Iterable[Fused],
             widths: Mapping[str, int]) -> dict[str, np.ndarray]:
  """kohya naming on the original layers. A fused layer of n parts whose adapted parts have
  rank r becomes one adapter of rank n*r: down stacks the parts' A (zeros for a part without
  an adapter), up is block-diagonal in their B; alpha = scale * n*r keeps the scale.
  `widths` {diffusers module: output rows} sizes the parts. Adapters on modules no layer
  covers raise."""
  adapters, out = dict(adapters), {}
  for layer in layers:
    present = [p for p in layer.parts if p in adapters]
    if not present:
      continue
    ranks = {adapters[p][0].shape[1] for p in present}
    scales = {adapters[p][2] for p in present}
    if len(ranks) > 1 or len(scales) > 1:
      raise ValueError(f"{layer.key}: its parts' adapters differ in rank {sorted(ranks)} or scale {sorted(scales)}")
    r, n = ranks.pop(), len(layer.parts)
    a0, b0, _ = adapters[present[0]]
    down = np.zeros((n * r, a0.shape[0]), a0.dtype)
    up = np.zeros((sum(widths[p] for p in layer.parts), n * r), b0.dtype)
    row = 0
    for j, part in enumerate(layer.parts):
      if part in adapters:
        a, b, _ = adapters.pop(part)
        down[j * r:(j + 1) * r] = a.T
        up[row:row + b.shape[1], j * r:(j + 1) * r] = b.T
      row += widths[part]
    name = kohya_name(layer)
    out[f"{name}.lora_down.weight"] = down
    out[f"{name}.lora_up.weight"] = _swap(up) if layer.swap else up
    out[f"{name}.alpha"] = np.asarray(scales.pop() * n * r, np.float32)
  if adapters:
    raise ValueError(f"adapters on modules the original checkpoint layout does not name: {M._few(sorted(adapters))}")
  return out


def from_kohya(tensors: Mapping[str, np.ndarray], layers: Iterable[Fused],
               widths: Mapping[str, int]) -> dict[str, Adapter]:
  """Inverse of `to_kohya`; `widths` {diffusers module: output rows} splits a fused layer's
  rows. An up that is block-diagonal in n equal blocks (as `to_kohya` writes it) splits into
  the parts' own adapters, bit for bit, leaving out parts whose down and up blocks are both
  zero; a dense one (a fused adapter trained elsewhere) gives every part with non-zero rows
  the shared down and its rows of up: the same function, at the file's rank."""
  by_name = {kohya_name(layer): layer for layer in layers}
  out, seen = {}, set()
  for key in tensors:
    if not key.endswith(".lora_down.weight"):
      continue
    name = key[:-len(".lora_down.weight")]
    if name not in by_name:
      raise ValueError(f"{name}: not a layer of this model's original checkpoint layout")
    layer = by_name[name]
    if f"{name}.lora_up.weight" not in tensors:
      raise ValueError(f"{key} has no {name}.lora_up.weight")
    down, up = np.asarray(tensors[key]), np.asarray(tensors[f"{name}.lora_up.weight"])
    seen |= {key, f"{name}.lora_up.weight", f"{name}.alpha"}
    rank, n = down.shape[0], len(layer.parts)
    scale = (float(np.asarray(tensors[f"{name}.alpha"])) if f"{name}.alpha" in tensors else rank) / rank
    up = _swap(up) if layer.swap else up
    sizes = [widths[p] for p in layer.parts]
    if sum(sizes) != up.shape[0]:
      raise ValueError(f"{name}: lora_up has {up.shape[0]} rows; this model's layer has {sum(sizes)}")
    bounds = np.cumsum([0] + sizes)
    rows = [up[bounds[j]:bounds[j + 1]] for j in range(n)]
    r = rank // n
    block_diagonal = rank % n == 0 and all(
        not rows[j][:, k * r:(k + 1) * r].any() for j in range(n) for k in range(n) if j != k)
    for j, part in enumerate(layer.parts):
      if n > 1 and block_diagonal:
        a, b = down[j * r:(j + 1) * r], rows[j][:, j * r:(j + 1) * r]
        if a.any() or b.any():
          out[part] = (a.T, b.T, scale)
      elif n == 1 or rows[j].any():
        out[part] = (down.T, rows[j].T, scale)
  rest = sorted(set(tensors) - seen)
  if rest:
    raise ValueError(f"not LoRA tensors in kohya naming: {M._few(rest)}")
  return out


def naming_of(tensors: Mapping[str, Any]) -> str:
  """'kohya' or 'diffusers', from the keys of a LoRA file."""
  keys = list(tensors)
  if keys and all(k.startswith(KOHYA_PREFIX) for k in keys):
    return "kohya"
  if keys and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys):
    return "diffusers"
  raise ValueError(f"not a LoRA file in diffusers/PEFT or kohya naming (keys like {M._few(sorted(keys), 3)})")


def output_widths(rules: Iterable[M.Rule | M.Derived], params_shapes: Mapping[str, Any]) -> dict[str, int]:
  """{diffusers module: output width} of every linear rule, from the jdiff kernels' shapes."""
  leaves = dict(M._flatten(params_shapes))
  return {r.key[:-len(".weight")]: int(np.shape(leaves[r.path])[-1]) for r in _linear_rules(rules) if r.path in leaves}
