"""Autoencoders: diffusers' AutoencoderKL <-> jdiff's AutoencoderKL."""

from __future__ import annotations

from typing import Any, Mapping

from jdiff.interop import mapping as M


def model_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
  """diffusers AutoencoderKL config -> jdiff AutoencoderKL keyword arguments."""
  for key in ("down_block_types", "up_block_types"):
    kinds = set(config.get(key) or ())
    if kinds - {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
      raise ValueError(f"{key}={config[key]} is not supported")
  if config.get("act_fn", "silu") != "silu":
    raise ValueError(f"act_fn={config['act_fn']!r} is not supported")
  return dict(
      channels=tuple(config["block_out_channels"]), layers_per_block=config["layers_per_block"],
      in_channels=config.get("in_channels", 3), out_channels=config.get("out_channels", 3),
      latent_channels=config["latent_channels"], groups=config.get("norm_num_groups", 32),
      mid_attention=config.get("mid_block_add_attention", True),
      use_quant_conv=config.get("use_quant_conv", True), use_post_quant_conv=config.get("use_post_quant_conv", True),
      scaling_factor=config.get("scaling_factor", 0.18215), shift_factor=config.get("shift_factor") or 0.0,
  )


def _conv(key: str, path: tuple[str, ...]) -> list[M.Rule]:
  return [M.Rule(f"{key}.weight", path + ("kernel",), "conv"), M.Rule(f"{key}.bias", path + ("bias",))]


def _norm(key: str, path: tuple[str, ...]) -> list[M.Rule]:
  return [M.Rule(f"{key}.weight", path + ("scale",)), M.Rule(f"{key}.bias", path + ("bias",))]


def _resnet(key: str, path: tuple[str, ...], shortcut: bool) -> list[M.Rule]:
  out = _norm(f"{key}.norm1", path + ("norm1",)) + _conv(f"{key}.conv1", path + ("conv1",))
  out += _norm(f"{key}.norm2", path + ("norm2",)) + _conv(f"{key}.conv2", path + ("conv2",))
  if shortcut:
    out += _conv(f"{key}.conv_shortcut", path + ("shortcut",))
  return out


def _mid(key: str, path: tuple[str, ...], attention: bool) -> list[M.Rule]:
  out = _resnet(f"{key}.resnets.0", path + ("res_0",), False) + _resnet(f"{key}.resnets.1", path + ("res_1",), False)
  if attention:
    a, p = f"{key}.attentions.0", path + ("attn",)
    out += _norm(f"{a}.group_norm", p + ("norm",))
    for name, leaf in (("to_q", "q"), ("to_k", "k"), ("to_v", "v")):
      out += M.linear(f"{a}.{name}", p + ("qkv", leaf))
    out += M.linear(f"{a}.to_out.0", p + ("out",))
  return out


def rules(kwargs: Mapping[str, Any]) -> list[M.Rule]:
  channels, n = list(kwargs["channels"]), kwargs["layers_per_block"]
  attention = kwargs.get("mid_attention", True)
  out = _conv("encoder.conv_in", ("encoder", "conv_in"))
  prev = channels[0]
  for i, ch in enumerate(channels):
    for j in range(n):
      out += _resnet(f"encoder.down_blocks.{i}.resnets.{j}", ("encoder", f"down_{i}_res_{j}"), j == 0 and prev != ch)
    if i < len(channels) - 1:
      out += _conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", ("encoder", f"down_{i}_downsample"))
    prev = ch
  out += _mid("encoder.mid_block", ("encoder", "mid"), attention)
  out += _norm("encoder.conv_norm_out", ("encoder", "norm_out")) + _conv("encoder.conv_out", ("encoder", "conv_out"))

  rev = list(reversed(channels))
  out += _conv("decoder.conv_in", ("decoder", "conv_in")) + _mid("decoder.mid_block", ("decoder", "mid"), attention)
  prev = rev[0]
  for i, ch in enumerate(rev):
    for j in range(n + 1):
      out += _resnet(f"decoder.up_blocks.{i}.resnets.{j}", ("decoder", f"up_{i}_res_{j}"), j == 0 and prev != ch)
    if i < len(rev) - 1:
      out += _conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", ("decoder", f"up_{i}_upsample"))
    prev = ch
  out += _norm("decoder.conv_norm_out", ("decoder", "norm_out")) + _conv("decoder.conv_out", ("decoder", "conv_out"))
  if kwargs.get("use_quant_conv", True):
    out += _conv("quant_conv", ("quant_conv",))
  if kwargs.get("use_post_quant_conv", True):
    out += _conv("post_quant_conv", ("post_quant_conv",))
  return out


def to_jdiff(config: Mapping[str, Any], state_dict: Mapping[str, Any]) -> dict:
  return M.import_params(rules(model_kwargs(config)), state_dict, "AutoencoderKL")


def to_diffusers(config: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
  return M.export_params(rules(model_kwargs(config)), params, "AutoencoderKL")
