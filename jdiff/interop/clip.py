"""CLIP text encoders: transformers' CLIPTextModel / CLIPTextModelWithProjection <-> jdiff's CLIPText."""

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
  for i in range(kwargs["depth"]):
    key, n = f"{p}encoder.layers.{i}", (f"layers_{i}",)
    for proj, leaf in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
      out += M.linear(f"{key}.self_attn.{proj}", n + ("qkv", leaf))
    out += M.linear(f"{key}.self_attn.out_proj", n + ("attn_out",))
    out += M.linear(f"{key}.mlp.fc1", n + ("fc1",)) + M.linear(f"{key}.mlp.fc2", n + ("fc2",))
    for ln, name in (("layer_norm1", "ln1"), ("layer_norm2", "ln2")):
      out += [M.Rule(f"{key}.{ln}.weight", n + (name, "scale")), M.Rule(f"{key}.{ln}.bias", n + (name, "bias"))]
  if kwargs.get("projection_dim"):
    out += M.linear("text_projection", ("text_projection",), bias=False)
  return out


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
