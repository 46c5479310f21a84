"""T5 encoders: transformers' T5EncoderModel <-> jdiff's T5Encoder."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jdiff.interop import mapping as M


def model_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
  """transformers T5Config (dict) -> jdiff T5Encoder keyword arguments."""
  proj = config.get("feed_forward_proj", "relu")
  feed_forward = {"relu": "relu", "gated-gelu": "gated-gelu"}.get(proj)
  if feed_forward is None:
    raise ValueError(f"feed_forward_proj={proj!r} is not supported; expected 'relu' or 'gated-gelu'")
  return dict(
      vocab_size=config["vocab_size"], width=config["d_model"], depth=config["num_layers"],
      num_heads=config["num_heads"], head_dim=config["d_kv"], mlp_dim=config["d_ff"], feed_forward=feed_forward,
      num_buckets=config.get("relative_attention_num_buckets", 32),
      max_distance=config.get("relative_attention_max_distance", 128),
      eps=config.get("layer_norm_epsilon", 1e-6),
  )


def rules(kwargs: Mapping[str, Any]) -> list[M.Rule]:
  out = [
      M.Rule("shared.weight", ("token_embedding",)),
      M.Rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", ("relative_attention_bias",)),
      M.Rule("encoder.final_layer_norm.weight", ("final_norm", "scale")),
  ]
  ff = ("wi_0", "wi_1", "wo") if kwargs["feed_forward"] == "gated-gelu" else ("wi", "wo")
  for i in range(kwargs["depth"]):
    key, n = f"encoder.block.{i}", (f"layers_{i}",)
    for proj, leaf in (("q", "q"), ("k", "k"), ("v", "v")):
      out += M.linear(f"{key}.layer.0.SelfAttention.{proj}", n + ("qkv", leaf), bias=False)
    out += M.linear(f"{key}.layer.0.SelfAttention.o", n + ("attn_out",), bias=False)
    out.append(M.Rule(f"{key}.layer.0.layer_norm.weight", n + ("attn_norm", "scale")))
    for name in ff:
      out += M.linear(f"{key}.layer.1.DenseReluDense.{name}", n + (name,), bias=False)
    out.append(M.Rule(f"{key}.layer.1.layer_norm.weight", n + ("mlp_norm", "scale")))
  return out


def to_jdiff(config: Mapping[str, Any], state_dict: Mapping[str, Any]) -> dict:
  """T5EncoderModel weights -> jdiff params. The tied copy encoder.embed_tokens.weight, where
  a file stores it, must equal shared.weight."""
  state_dict = dict(state_dict)
  tied = state_dict.pop("encoder.embed_tokens.weight", None)
  if tied is not None and "shared.weight" in state_dict and not np.array_equal(tied, state_dict["shared.weight"]):
    raise ValueError("encoder.embed_tokens.weight differs from shared.weight: not a tied T5 encoder")
  if tied is not None and "shared.weight" not in state_dict:
    state_dict["shared.weight"] = tied
  return M.import_params(rules(model_kwargs(config)), state_dict, "T5 encoder")


def to_transformers(config: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
  """jdiff params -> T5EncoderModel weights (shared.weight only; the tie restores the other)."""
  return M.export_params(rules(model_kwargs(config)), params, "T5 encoder")
