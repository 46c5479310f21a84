"""SD3 / SD3.5 transformers: diffusers' SD3Transformer2DModel <-> jdiff's MMDiT.

    kwargs = sd3.model_kwargs(diffusers_config)          # -> jdiff.models.mmdit.MMDiT(**kwargs)
    params = sd3.to_jdiff(diffusers_config, state_dict)  # numpy, unrolled block layout
    state_dict = sd3.to_diffusers(diffusers_config, params)

Covers SD3 Medium (no QK norm), SD3.5 Large (QK RMSNorm) and SD3.5 Medium (QK RMSNorm
and dual attention in its first blocks). The diffusers model takes timesteps in [0, 1000]
and jdiff t in [0, 1] (time_scale=1000), and both predict the velocity eps - x0.
"""

from __future__ import annotations

from typing import Any, Mapping

from jdiff.interop import mapping as M
from jdiff.models import layers as L


def model_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
  """diffusers SD3Transformer2DModel config -> jdiff MMDiT keyword arguments."""
  heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
  width = heads * head_dim
  if config.get("caption_projection_dim", width) != width:
    raise ValueError(f"caption_projection_dim={config['caption_projection_dim']} differs from the "
                     f"width {width}; jdiff's MMDiT projects text tokens to the model width")
  depth = config["num_layers"]
  dual = tuple(config.get("dual_attention_layers") or ())
  if dual != tuple(range(len(dual))):
    raise ValueError(f"dual_attention_layers={dual}: jdiff supports dual attention in the "
                     "leading blocks only (0, 1, ..., k-1), as SD3.5 Medium has it")
  qk_norm = config.get("qk_norm")
  if qk_norm not in (None, "rms_norm"):
    raise ValueError(f"qk_norm={qk_norm!r} is not supported; expected None or 'rms_norm'")
  return dict(
      depth=depth, width=width, num_heads=heads, patch_size=config["patch_size"],
      in_channels=config["in_channels"], out_channels=config.get("out_channels") or config["in_channels"],
      context_dim=config["joint_attention_dim"], pooled_dim=config["pooled_projection_dim"],
      pos_embed_max_size=config["pos_embed_max_size"],
      pos_embed_base_size=config["sample_size"] // config["patch_size"],
      qk_norm=qk_norm == "rms_norm", dual_attention_depth=len(dual), time_scale=1000.0,
  )


def diffusers_config(kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """jdiff MMDiT keyword arguments -> diffusers SD3Transformer2DModel config."""
  width, heads = kwargs["width"], kwargs["num_heads"]
  # diffusers scales the position grid by base / max_size with base = sample_size // patch_size;
  # jdiff's unscaled grid (pos_embed_base_size None, a model trained from scratch) is that
  # grid at base = max_size, so it exports as sample_size = max_size * patch_size.
  base = kwargs.get("pos_embed_base_size") or kwargs["pos_embed_max_size"]
  if float(kwargs.get("time_scale", 1000.0)) != 1000.0:
    raise ValueError("diffusers' SD3 embeds timesteps in [0, 1000]: time_scale must be 1000")
  return {
      "_class_name": "SD3Transformer2DModel",
      "sample_size": base * kwargs["patch_size"], "patch_size": kwargs["patch_size"],
      "in_channels": kwargs["in_channels"], "out_channels": kwargs.get("out_channels") or kwargs["in_channels"],
      "num_layers": kwargs["depth"], "attention_head_dim": L.check_divisible(width, heads),
      "num_attention_heads": heads, "joint_attention_dim": kwargs["context_dim"],
      "caption_projection_dim": width, "pooled_projection_dim": kwargs["pooled_dim"],
      "pos_embed_max_size": kwargs["pos_embed_max_size"],
      "dual_attention_layers": list(range(kwargs.get("dual_attention_depth", 0))),
      "qk_norm": "rms_norm" if kwargs.get("qk_norm", True) else None,
  }


def attention(key: str, path: tuple[str, ...], out: tuple[str, ...] | None, qk_norm: bool,
               added: bool = False) -> list[M.Rule]:
  """Q/K/V (+ norms) and output projection of one stream of a diffusers Attention."""
  names = ("add_q_proj", "add_k_proj", "add_v_proj") if added else ("to_q", "to_k", "to_v")
  rules = []
  for name, leaf in zip(names, ("q", "k", "v")):
    rules += M.linear(f"{key}.{name}", path + (leaf,))
  if qk_norm:
    norm_q, norm_k = ("norm_added_q", "norm_added_k") if added else ("norm_q", "norm_k")
    rules += [M.Rule(f"{key}.{norm_q}.weight", path + ("q_norm", "scale")),
              M.Rule(f"{key}.{norm_k}.weight", path + ("k_norm", "scale"))]
  if out is not None:
    rules += M.linear(f"{key}.to_add_out" if added else f"{key}.to_out.0", out)
  return rules


def mlp(key: str, path: tuple[str, ...]) -> list[M.Rule]:
  return M.linear(f"{key}.net.0.proj", path + ("fc1",)) + M.linear(f"{key}.net.2", path + ("fc2",))


def joint_block(key: str, name: str, qk_norm: bool, dual: bool = False, last: bool = False) -> list[M.Rule]:
  """A diffusers joint (double-stream) block at `key` <-> jdiff's JointBlock `name`."""
  p = (name,)
  rules = M.linear(f"{key}.norm1.linear", p + ("x_adaLN", "linear"))
  rules += M.linear(f"{key}.norm1_context.linear", p + ("ctx_adaLN", "linear"))
  rules += attention(f"{key}.attn", p + ("x_qkv",), p + ("x_attn_out",), qk_norm)
  rules += attention(f"{key}.attn", p + ("ctx_qkv",), None if last else p + ("ctx_attn_out",), qk_norm,
                      added=True)
  if dual:
    rules += attention(f"{key}.attn2", p + ("x_qkv2",), p + ("x_attn2_out",), qk_norm)
  rules += mlp(f"{key}.ff", p + ("x_mlp",))
  if not last:
    rules += mlp(f"{key}.ff_context", p + ("ctx_mlp",))
  return rules


def rules(kwargs: Mapping[str, Any]) -> list[M.Rule | M.Derived]:
  """The tensor rules for a jdiff MMDiT with these arguments (unrolled block layout)."""
  depth, dual = kwargs["depth"], kwargs.get("dual_attention_depth", 0)
  qk_norm = kwargs.get("qk_norm", True)
  p, c = kwargs["patch_size"], kwargs["in_channels"]
  width, max_size = kwargs["width"], kwargs["pos_embed_max_size"]
  table = lambda: L.cropped_sincos_2d(width, (max_size, max_size), max_size, kwargs["pos_embed_base_size"])[None]
  out = [
      M.Derived("pos_embed.pos_embed", table),
      M.Rule("pos_embed.proj.weight", ("patch_embed", "proj", "kernel"), "patch_conv", (p, p, c)),
      M.Rule("pos_embed.proj.bias", ("patch_embed", "proj", "bias")),
      *M.linear("time_text_embed.timestep_embedder.linear_1", ("t_embed", "mlp", "fc1")),
      *M.linear("time_text_embed.timestep_embedder.linear_2", ("t_embed", "mlp", "fc2")),
      *M.linear("time_text_embed.text_embedder.linear_1", ("pooled_embed", "fc1")),
      *M.linear("time_text_embed.text_embedder.linear_2", ("pooled_embed", "fc2")),
      *M.linear("context_embedder", ("context_embed",)),
      *M.linear("norm_out.linear", ("final_adaLN", "linear")),
      *M.linear("proj_out", ("final_proj",)),
  ]
  num_dual = min(dual, depth - 1)
  for i in range(depth - 1):
    name = f"dual_blocks_{i}" if i < num_dual else f"blocks_{i - num_dual}"
    out += joint_block(f"transformer_blocks.{i}", name, qk_norm, i < num_dual)
  out += joint_block(f"transformer_blocks.{depth - 1}", "last_block", qk_norm, dual == depth, last=True)
  return out


def to_jdiff(config: Mapping[str, Any], state_dict: Mapping[str, Any]) -> dict:
  """diffusers SD3 state dict -> jdiff MMDiT params (unrolled layout; see `scan_layout`)."""
  return M.import_params(rules(model_kwargs(config)), state_dict, "SD3 transformer")


def to_diffusers(config: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
  """jdiff MMDiT params (unrolled layout) -> diffusers SD3 state dict."""
  return M.export_params(rules(model_kwargs(config)), params, "MMDiT")


def scan_layout(params: dict, kwargs: Mapping[str, Any], scan: bool) -> dict:
  """Unrolled params -> the layout of MMDiT(scan=scan, **kwargs) (stacked block groups)."""
  if not scan:
    return params
  depth, dual = kwargs["depth"], min(kwargs.get("dual_attention_depth", 0), kwargs["depth"] - 1)
  return L.stack_groups(params, [("dual_blocks", dual), ("blocks", depth - 1 - dual)])


def unrolled_layout(params: dict) -> dict:
  """Inverse of `scan_layout`: stacked block groups -> name_0 ... name_{n-1}."""
  return L.unstack_groups(params, ("dual_blocks", "blocks"))
