"""Flux transformers: diffusers' FluxTransformer2DModel <-> jdiff's Flux.

diffusers' Flux takes latents packed by its pipeline into 2x2 patches, channel-first
(in_channels = 4 * latent channels, patch_size 1); jdiff's Flux patchifies NHWC latents
itself (patch_size 2), so the input and output projections are reordered on conversion.
The diffusers model multiplies t and guidance by 1000 itself; jdiff's time_scale=1000
does the same.
"""

from __future__ import annotations

from typing import Any, Mapping

from jdiff.interop import mapping as M
from jdiff.interop import sd3
from jdiff.models import layers as L

PACK = 2  # the Flux pipeline's latent packing


def model_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
  """diffusers FluxTransformer2DModel config -> jdiff Flux keyword arguments."""
  if config.get("patch_size", 1) != 1:
    raise ValueError(f"patch_size={config['patch_size']}: only Flux's packed-latent layout (patch_size 1) "
                     "is supported")
  channels = config["in_channels"]
  out = config.get("out_channels") or channels
  if channels % PACK**2 or out % PACK**2:
    raise ValueError(f"in/out channels {channels}/{out} are not 2x2-packed latents")
  heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
  return dict(
      depth=config["num_layers"], single_depth=config["num_single_layers"], width=heads * head_dim,
      num_heads=heads, patch_size=PACK, in_channels=channels // PACK**2, out_channels=out // PACK**2,
      context_dim=config["joint_attention_dim"], pooled_dim=config["pooled_projection_dim"],
      guidance_embed=bool(config.get("guidance_embeds", False)),
      axes_dims=tuple(config.get("axes_dims_rope", (16, 56, 56))), qk_norm=True, time_scale=1000.0,
  )


def diffusers_config(kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """jdiff Flux keyword arguments -> diffusers FluxTransformer2DModel config."""
  if kwargs.get("patch_size", PACK) != PACK:
    raise ValueError("diffusers' Flux pipeline packs 2x2 patches: patch_size must be 2")
  if float(kwargs.get("time_scale", 1000.0)) != 1000.0:
    raise ValueError("diffusers' Flux multiplies t by 1000: time_scale must be 1000")
  channels = kwargs["in_channels"]
  return {
      "_class_name": "FluxTransformer2DModel",
      "patch_size": 1, "in_channels": channels * PACK**2,
      "out_channels": (kwargs.get("out_channels") or channels) * PACK**2,
      "num_layers": kwargs["depth"], "num_single_layers": kwargs["single_depth"],
      "attention_head_dim": L.check_divisible(kwargs["width"], kwargs["num_heads"]),
      "num_attention_heads": kwargs["num_heads"], "joint_attention_dim": kwargs["context_dim"],
      "pooled_projection_dim": kwargs["pooled_dim"], "guidance_embeds": bool(kwargs.get("guidance_embed")),
      "axes_dims_rope": list(kwargs.get("axes_dims", (16, 56, 56))),
  }


def _single_block(i: int, name: str) -> list[M.Rule]:
  key, p = f"single_transformer_blocks.{i}", (name,)
  return [
      *M.linear(f"{key}.norm.linear", p + ("adaLN", "linear")),
      *sd3.attention(f"{key}.attn", p + ("qkv",), None, qk_norm=True),
      *M.linear(f"{key}.proj_mlp", p + ("mlp_in",)),
      *M.linear(f"{key}.proj_out", p + ("out",)),
  ]


def rules(kwargs: Mapping[str, Any]) -> list[M.Rule]:
  """The tensor rules for a jdiff Flux with these arguments (unrolled block layout)."""
  geometry_in = (PACK, PACK, kwargs["in_channels"])
  geometry_out = (PACK, PACK, kwargs.get("out_channels") or kwargs["in_channels"])
  tte = "time_text_embed"
  out = [
      M.Rule("x_embedder.weight", ("patch_embed", "proj", "kernel"), "packed_in", geometry_in),
      M.Rule("x_embedder.bias", ("patch_embed", "proj", "bias")),
      *M.linear(f"{tte}.timestep_embedder.linear_1", ("t_embed", "mlp", "fc1")),
      *M.linear(f"{tte}.timestep_embedder.linear_2", ("t_embed", "mlp", "fc2")),
      *M.linear(f"{tte}.text_embedder.linear_1", ("pooled_embed", "fc1")),
      *M.linear(f"{tte}.text_embedder.linear_2", ("pooled_embed", "fc2")),
      *M.linear("context_embedder", ("context_embed",)),
      *M.linear("norm_out.linear", ("final_adaLN", "linear")),
      M.Rule("proj_out.weight", ("final_proj", "kernel"), "packed_out", geometry_out),
      M.Rule("proj_out.bias", ("final_proj", "bias"), "packed_bias", geometry_out),
  ]
  if kwargs.get("guidance_embed"):
    out += M.linear(f"{tte}.guidance_embedder.linear_1", ("guidance_embed", "mlp", "fc1"))
    out += M.linear(f"{tte}.guidance_embedder.linear_2", ("guidance_embed", "mlp", "fc2"))
  for i in range(kwargs["depth"]):
    out += sd3.joint_block(f"transformer_blocks.{i}", f"double_blocks_{i}", qk_norm=True)
  for i in range(kwargs["single_depth"]):
    out += _single_block(i, f"single_blocks_{i}")
  return out


def to_jdiff(config: Mapping[str, Any], state_dict: Mapping[str, Any]) -> dict:
  """diffusers Flux state dict -> jdiff Flux params (unrolled layout; see `scan_layout`)."""
  return M.import_params(rules(model_kwargs(config)), state_dict, "Flux transformer")


def to_diffusers(config: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
  """jdiff Flux params (unrolled layout) -> diffusers Flux state dict."""
  return M.export_params(rules(model_kwargs(config)), params, "Flux")


def scan_layout(params: dict, kwargs: Mapping[str, Any], scan: bool) -> dict:
  """Unrolled params -> the layout of Flux(scan=scan, **kwargs)."""
  if not scan:
    return params
  return L.stack_groups(params, [("double_blocks", kwargs["depth"]), ("single_blocks", kwargs["single_depth"])])


def unrolled_layout(params: dict) -> dict:
  """Inverse of `scan_layout`."""
  return L.unstack_groups(params, ("double_blocks", "single_blocks"))
