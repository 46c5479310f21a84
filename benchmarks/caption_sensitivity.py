"""How much one edited word of a caption moves a model: the text encoder's outputs and the
denoiser's clean-image prediction, per attribute.

  python benchmarks/caption_sensitivity.py --workdir=RUN            # a trained run (EMA)
  python benchmarks/caption_sensitivity.py --config=configs/mmdit_256.py:cpu   # at init

For the caption "a large red circle in the top left" and each edit (another colour, shape,
size, position), prints the relative change |c' - c| / |c| of the encoder's pooled vector
and of its tokens, and the RMS change of the denoiser's x0 prediction at several t on the
same noise. A model that reads an attribute moves its prediction when that word changes;
docs/notes.md ("A text encoder trained from scratch erases the position words") used it.
"""

from __future__ import annotations


from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff import config as config_lib
from jdiff import diffusion
from jdiff import inference
from jdiff import networks as networks_lib
from jdiff import tokens

_WORKDIR = flags.DEFINE_string("workdir", "", "A training run (its latest EMA weights).")
_CONFIG = flags.DEFINE_string("config", "", "Or a config spec: the model at initialisation.")
_SEED = flags.DEFINE_integer("seed", 0, "Init and noise seed.")

BASE = "a large red circle in the top left"
EDITS = {"colour": "a large blue circle in the top left", "shape": "a large red square in the top left",
         "size": "a small red circle in the top left", "position": "a large red circle in the bottom right"}
TIMES = (0.98, 0.9, 0.8, 0.6)


def sensitivity(networks, params, prediction: str, seed: int = 0, num_noise: int = 16) -> dict[str, dict[str, float]]:
  """{edit: {'pooled', 'tokens', 'x0@t=...'}} for the edits of BASE."""
  if networks.text is None:
    raise ValueError("needs a model with the trainable byte text encoder")
  cond = lambda p: networks.conditioning(params, {"tokens": jnp.asarray(tokens.tokenize([p], networks.max_len))})
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  x = jax.random.normal(jax.random.key(seed), (num_noise, networks.resolution, networks.resolution, networks.channels))
  batch = lambda c: jax.tree.map(lambda a: jnp.broadcast_to(a, (num_noise,) + a.shape[1:]), c)

  def x0(c, t):
    tt = jnp.full((num_noise,), t)
    return diffusion.convert(networks.predict(params["denoiser"], x, tt, batch(c)), prediction, "x0", x, tt)

  c0 = cond(BASE)
  out = {}
  for name, caption in EDITS.items():
    c1 = cond(caption)
    row = dict(pooled=rel(c1["pooled"], c0["pooled"]), tokens=rel(c1["context"], c0["context"]))
    for t in TIMES:
      row[f"x0@t={t}"] = float(jnp.sqrt(jnp.mean((x0(c1, t) - x0(c0, t)) ** 2)))
    out[name] = row
  return out


def main(argv):
  del argv
  if bool(_WORKDIR.value) == bool(_CONFIG.value):
    raise app.UsageError("pass exactly one of --workdir and --config")
  if _WORKDIR.value:
    model = inference.load(_WORKDIR.value)
    networks, params, prediction = model.networks, model.params, model.config.diffusion.prediction
  else:
    config = config_lib.load(_CONFIG.value)
    networks = networks_lib.build_networks(config)
    params = nn.unbox(networks.init_params(jax.random.key(_SEED.value)))
    prediction = config.diffusion.prediction
  result = sensitivity(networks, params, prediction, _SEED.value)
  cols = list(next(iter(result.values())))
  print(f"{'edit':<9}" + "".join(f"{c:>11}" for c in cols))
  for name, row in result.items():
    print(f"{name:<9}" + "".join(f"{row[c]:>11.4f}" for c in cols))


if __name__ == "__main__":
  app.run(main)
