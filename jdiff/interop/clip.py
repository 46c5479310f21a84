"""CLIP: transformers' CLIPTextModel / CLIPTextModelWithProjection <-> jdiff's CLIPText, and the
vision tower of CLIPModel / CLIPVisionModelWithProjection <-> jdiff's CLIPVision."""

from __future__ import annotations

from typing import Any, Mapping

from jdiff.interop import mapping as M


def model_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
  """transformers CLIPTextConfig (dict) -> jdiff CLIPText keyword arguments."""
  with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or [])
  eos = config.get("eos_token_id", 49407)
  return dict(
      vocab_size=config["vocab_size"], width=config["hidden_size"], depth=config["num_hidden_layers"],
      num_heads=config["num_attention_heads"], mlp_dim=config["intermediate_size"],
      max_len=config["max_position_embeddings"], act=config.get("hidden_act", "quick_gelu"),
      eps=config.get("layer_norm_eps", 1e-5), eos_token_id=eos[0] if isinstance(eos, list) else eos,
      projection_dim=config.get("projection_dim") if with_projection else None,
  )


def rules(kwargs: Mapping[str, Any], prefix: str = "text_model.") -> list[M.Rule]:
  p = prefix
  out = [
      M.Rule(f"{p}embeddings.token_embedding.weight", ("token_embedding",)),
      M.Rule(f"{p}embeddings.position_embedding.weight", ("position_embedding",)),
      M.Rule(f"{p}final_layer_norm.weight", ("final_norm", "scale")),
      M.Rule(f"{p}final_layer_norm.bias", ("final_norm", "bias")),
  ]
  out += _layers(p, kwargs["depth"])
  if kwargs.get("projection_dim"):
    out += M.linear("text_projection", ("text_projection",), bias=False)
  return out


def _norm(key: str, path: tuple[str, ...]) -> list[M.Rule]:
  return [M.Rule(f"{key}.weight", path + ("scale",)), M.Rule(f"{key}.bias", path + ("bias",))]


def _layers(p: str, depth: int) -> list[M.Rule]:
  """The encoder layers, shared by the text and the vision tower."""
  out = []
  for i in range(depth):
    key, n = f"{p}encoder.layers.{i}", (f"layers_{i}",)
    for proj, leaf in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
      out += M.linear(f"{key}.self_attn.{proj}", n + ("qkv", leaf))
    out += M.linear(f"{key}.self_attn.out_proj", n + ("attn_out",))
    out += M.linear(f"{key}.mlp.fc1", n + ("fc1",)) + M.linear(f"{key}.mlp.fc2", n + ("fc2",))
    out += _norm(f"{key}.layer_norm1", n + ("ln1",)) + _norm(f"{key}.layer_norm2", n + ("ln2",))
  return out


def vision_kwargs(config: Mapping[str, Any], projection_dim: int | None = None) -> dict[str, Any]:
  """transformers CLIPVisionConfig (dict) -> jdiff CLIPVision keyword arguments."""
  return dict(
      image_size=config["image_size"], patch_size=config["patch_size"], width=config["hidden_size"],
      depth=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
      mlp_dim=config["intermediate_size"], act=config.get("hidden_act", "quick_gelu"),
      eps=config.get("layer_norm_eps", 1e-5), projection_dim=projection_dim,
  )


def vision_rules(kwargs: Mapping[str, Any], prefix: str = "vision_model.") -> list[M.Rule]:
  p = prefix
  out = [
      M.Rule(f"{p}embeddings.patch_embedding.weight", ("patch_embedding", "kernel"), "conv"),
      M.Rule(f"{p}embeddings.class_embedding", ("class_embedding",)),
      M.Rule(f"{p}embeddings.position_embedding.weight", ("position_embedding",)),
  ]
  out += _norm(f"{p}pre_layrnorm", ("pre_norm",)) + _norm(f"{p}post_layernorm", ("post_norm",))
  out += _layers(p, kwargs["depth"])
  if kwargs.get("projection_dim"):
    out += M.linear("visual_projection", ("visual_projection",), bias=False)
  return out


def vision_to_jdiff(config: Mapping[str, Any], state_dict: Mapping[str, Any]) -> dict:
  """The vision tower of a CLIPModel's weights (its full config: vision_config, projection_dim)
  -> CLIPVision(**vision_kwargs(...)) params; text keys are left to `text_from_clip_model`."""
  kwargs = vision_kwargs(config["vision_config"], config.get("projection_dim"))
  keep = {k: v for k, v in _drop_buffers(state_dict).items() if k.startswith(("vision_model.", "visual_projection."))}
  return M.import_params(vision_rules(kwargs), keep, "CLIP vision tower")


def text_from_clip_model(config: Mapping[str, Any], state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict]:
  """The text tower of a CLIPModel's weights -> (CLIPText keyword arguments, params)."""
  text = dict(config["text_config"], architectures=["CLIPTextModelWithProjection"],
              projection_dim=config.get("projection_dim"))
  keep = {k: v for k, v in _drop_buffers(state_dict).items() if k.startswith(("text_model.", "text_projection."))}
  kwargs = model_kwargs(text)
  return kwargs, M.import_params(rules(kwargs, "text_model."), keep, "CLIP text encoder")


def _drop_buffers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  # position_ids is a non-persistent buffer in current transformers but present in older files.
  return {k: v for k, v in state_dict.items() if not k.endswith("embeddings.position_ids")}


def key_prefix(state_dict: Mapping[str, Any]) -> str:
  """'text_model.' when the keys carry it (Hub files, CLIPTextModelWithProjection), else ''."""
  return "text_model." if any(k.startswith("text_model.") for k in state_dict) else ""


def to_jdiff(config: Mapping[str, Any], state_dict: Mapping[str, Any]) -> dict:
  """CLIP text weights (Hub files: 'text_model.' keys; transformers 5 modules: none) -> jdiff params."""
  prefix = key_prefix(state_dict)
  return M.import_params(rules(model_kwargs(config), prefix), _drop_buffers(state_dict), "CLIP text encoder")


def to_transformers(config: Mapping[str, Any], params: Mapping[str, Any], prefix: str = "text_model.") -> dict:
  """jdiff params -> CLIP text weights with Hub-file keys (prefix '' for a transformers 5 state_dict)."""
  return M.export_params(rules(model_kwargs(config), prefix), params, "CLIP text encoder")
