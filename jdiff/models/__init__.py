"""Diffusion transformers. A config picks one by name from MODELS; the rest of
`config.model` (variant, sizes, dtypes, scan, remat, ...) goes to that model's `make`."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn

from jdiff.models import dit, flux, layers, mmdit

MODELS = {"dit": dit.make, "mmdit": mmdit.make, "flux": flux.make}


def build(model_cfg: Mapping[str, Any], lora: layers.LoRA | None = None) -> nn.Module:
  """config.model -> Flax module. `name` picks the model; every other field is its argument.
  lora: adapters the model carries (None: a plain model)."""
  # Unset optional fields (None) leave the model's own defaults; lists (a config read back
  # from JSON) become tuples, as a module's fields must hash.
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(model_cfg).items() if v is not None}
  name = kwargs.pop("name")
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; expected one of {tuple(MODELS)}")
  return MODELS[name](**kwargs, lora=lora)
