"""The shapes caption-adherence benchmark: generate from the benchmark prompts, read the
images back with the analyser, report accuracy per attribute for seen and held-out pairs."""

from __future__ import annotations

from typing import Any

from jdiff import inference
from jdiff.data import shapes
from jdiff.eval import adherence

# seen: trained colour-shape pairs; held_out: unseen pairs of seen words; new_color: a colour
# word absent from pre-training (learned by a tune stage on the 'new_color' data split).
SPLITS = {"seen": "train", "held_out": "held_out", "new_color": "new_color"}


def applies(config) -> bool:
  """Whether the benchmark can score a run: a model trained on the embedded shapes data (or
  its preference pairs) with the byte text encoder, whose prompts it can encode."""
  return config.data.source in ("shapes", "preference") and config.text.encoder == "bytes"


def evaluate(model: inference.Model, *, num_samples: int | None = None, num_steps: int | None = None,
             cfg_scale: float | None = None, method: str | None = None, seed: int | None = None
             ) -> dict[str, Any]:
  """{'seen': {color, shape, size, position, all, n}, 'held_out': {...}, 'new_color': {...}};
  unset settings come from config.eval."""
  e = model.config.eval
  num_samples = e.num_samples if num_samples is None else num_samples
  num_steps = e.num_steps if num_steps is None else num_steps
  out = {}
  for name, split in SPLITS.items():
    prompts = shapes.benchmark(split, num_samples)
    images = inference.generate(model, [p for p, _ in prompts], num_steps=num_steps,
                                cfg_scale=e.cfg_scale if cfg_scale is None else cfg_scale,
                                method=method or e.method, seed=e.seed if seed is None else seed)
    out[name] = adherence.score(images, [a for _, a in prompts])
  return out
